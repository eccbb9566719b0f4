"""The erase job: model -> encoded prompts -> edited kernels -> files.

`run(job)` is what `scapre-jax erase` calls; the CLI only parses arguments
into an `EraseJob`. All prompts of all sets are encoded once; sets that share
a preset are solved together (`edit_sets`), a chunk at a time, sharded over
the local devices; each set's files are written as soon as its chunk is done,
so an interrupted run keeps finished sets and a rerun skips them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
import typing
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from scapre_jax import console, io, metrics, models, outputs, sharding, text, tiny
from scapre_jax import precision as precision_lib
from scapre_jax.config import EditConfig
from scapre_jax.requests import ConceptSet
from scapre_jax.sets import edit_sets

EDIT_FILE = "edit.safetensors"
REPORT_FILE = "report.json"
MODEL_DIR = "model"
SINGLE_FILE_MODEL = "model.safetensors"  # --full from a single-file model
ORBAX_DIR = "orbax"


@typing.no_type_check  # validated in __post_init__ (see config.EditConfig)
@dataclasses.dataclass(frozen=True)
class EraseJob:
  """Everything one `scapre-jax erase` run does.

  Attributes:
    sets: the concept sets to erase.
    out: output folder. With `single`, the one set's files are
      `out/edit.safetensors` and `out/report.json`; otherwise
      `out/<set name>.safetensors` and `out/<set name>.json`.
    model: diffusers folder or cached Hugging Face id; None = built-in tiny.
    full: also write the complete edited diffusers folder `out/model/`
      (single set only).
    orbax: also write an orbax checkpoint of the edited UNet params
      `out/orbax/` (single set only).
    seed: PRNG seed of the probes; every set uses it, as if run alone.
    dtype: weights dtype the model is loaded in, and the edit is written in.
    precision: "float32" or "float64" (docs/reproducibility.md): with
      "float64" the text encoding and the whole edit run in float64 and the
      result is rounded to `dtype` once, when written. None: "float64" for a
      float64 model, else "float32". float64 needs JAX's 64-bit mode
      (`precision.enable_x64`, which the CLI calls).
    overrides: EditConfig fields applied on top of every set's preset.
    overwrite: replace existing outputs; without it a sets run skips sets
      whose files exist and a single erase refuses to write over them.
    sets_per_call: sets solved in one compiled call; None = 8 per device.
    config: with a single-file `model`, a diffusers folder whose configs and
      tokenizer replace the family's built-in ones.
    tokenizer: with a single-file `model`, a folder with the CLIP vocabulary.
    names: "diffusers" or "ldm": tensor names in the edit files. With a
      single-file `model`, `full` writes `out/model.safetensors`.
    inputs: files the job reads besides the model (a sets file): no output
      may write over them.
  """

  sets: tuple[ConceptSet, ...]
  out: pathlib.Path
  model: str | None = None
  single: bool = False
  full: bool = False
  orbax: bool = False
  seed: int = 0
  dtype: str = "float32"
  precision: str | None = None
  overrides: tuple[tuple[str, Any], ...] = ()
  overwrite: bool = False
  sets_per_call: int | None = None
  text_batch_size: int = 16
  config: str | None = None
  tokenizer: str | None = None
  names: str = "diffusers"
  inputs: tuple[pathlib.Path, ...] = ()

  def __post_init__(self):
    if not self.sets:
      raise ValueError("no concept sets to erase")
    names = [s.name for s in self.sets]
    if len(set(names)) != len(names):
      raise ValueError(f"duplicate set names: {sorted({n for n in names if names.count(n) > 1})}")
    if (self.full or self.orbax) and not self.single:
      raise ValueError("--full and --orbax write one model folder, so they need one "
                       "set (--concepts), not --sets")
    if self.single and len(self.sets) != 1:
      raise ValueError("single-set output needs exactly one set")
    if self.names not in ("diffusers", "ldm"):
      raise ValueError(f"names must be 'diffusers' or 'ldm', got {self.names!r}")
    if self.sets_per_call is not None and (
        not isinstance(self.sets_per_call, int) or self.sets_per_call < 1):
      raise ValueError(f"--sets-per-call must be at least 1, got {self.sets_per_call!r}")
    if not 0 <= self.seed < 2 ** 32:
      raise ValueError(f"--seed must be in [0, 2**32 - 1], got {self.seed!r}")
    if self.dtype not in models.DTYPES:
      raise ValueError(f"dtype must be one of {tuple(models.DTYPES)}, got {self.dtype!r}")
    if self.dtype == "float64" and self.precision == "float32":
      raise ValueError("a float64 model is edited in float64: drop --precision float32")
    precision_lib.require(self.edit_precision)
    for s in self.sets:  # bad overrides fail here, before any work
      self.config_for(s)

  @property
  def edit_precision(self) -> str:
    """The precision the edit runs in: `precision`, or the default for `dtype`."""
    if self.precision is not None:
      return self.precision
    return "float64" if self.dtype == "float64" else "float32"

  def config_for(self, concept_set: ConceptSet) -> EditConfig:
    return EditConfig.preset(concept_set.preset, **dict(self.overrides))

  def replaces(self, concept_set: ConceptSet) -> bool:
    """Whether this set's existing outputs may be replaced: with --overwrite,
    or in a sets run, where a set still to do has no files or files that do
    not belong together (see `is_done`), the remains of a stopped run."""
    return self.overwrite or not self.single

  def outputs(self, concept_set: ConceptSet) -> list[pathlib.Path]:
    """Every path a set's run writes: its files, and model/ and orbax/."""
    paths = list(self.files(concept_set))
    if self.full:
      single = self.model is not None and pathlib.Path(self.model).expanduser().is_file()
      paths.append(self.out / (SINGLE_FILE_MODEL if single else MODEL_DIR))
    if self.orbax:
      paths.append(self.out / ORBAX_DIR)
    return paths

  def files(self, concept_set: ConceptSet) -> tuple[pathlib.Path, pathlib.Path]:
    """(edit file, report file) of a set."""
    if self.single:
      return self.out / EDIT_FILE, self.out / REPORT_FILE
    return (self.out / f"{concept_set.name}.safetensors",
            self.out / f"{concept_set.name}.json")


def unrelated_prompts() -> list[str]:
  """COCO captions shipped with the package: prompts no erase should move."""
  path = pathlib.Path(__file__).parent / "data" / "coco_prompts.txt"
  return [line.strip() for line in path.read_text("utf-8").splitlines() if line.strip()]


def _chunks(items: Sequence, size: int):
  for i in range(0, len(items), size):
    yield items[i:i + size]


def run(job: EraseJob, *, progress: Callable[[str], None] | None = console.say) -> dict:
  """Runs the job; returns a summary {"sets": [...], "skipped": [...], ...}.

  In a multi-process run (`jax.distributed.initialize` done by the caller)
  process i of n handles sets i, i + n, ... and writes only their files.
  """
  with outputs.lock(job.out, name=lock_name(jax.process_index(), jax.process_count())):
    # Only a lone process may clean: in a multi-host run the others' temp
    # files in OUT are live.
    removed = outputs.clean_stale(job.out) if jax.process_count() == 1 else []
    if removed and progress:
      progress(f"clean: removed {len(removed)} temporary file(s) a stopped run left "
               f"in {job.out}")
    return _run(job, progress)


def lock_name(process: int, count: int) -> str:
  """The lock file of process `process` of `count` in OUT: processes of one
  multi-host run write disjoint files, so each locks its own share."""
  return outputs.LOCK_FILE if count == 1 else f"{outputs.LOCK_FILE}.{process}-of-{count}"


def is_done(job: EraseJob, concept_set: ConceptSet) -> bool:
  """Whether a set's edit file and report exist and come from the same run
  (their run ids agree): only such a set is skipped by a rerun."""
  edit_path, report_path = job.files(concept_set)
  if not (edit_path.is_file() and report_path.is_file()):
    return False
  try:
    report_id = json.loads(report_path.read_text("utf-8")).get("run_id")
  except (OSError, ValueError, AttributeError):
    return False
  return report_id == io.read_edit_metadata(edit_path).get("run_id", False)


def _run(job: EraseJob, progress) -> dict:
  say = progress or (lambda _: None)
  started = time.perf_counter()
  mine = [s for i, s in enumerate(job.sets) if i % jax.process_count() == jax.process_index()]
  # Sets runs skip finished sets; a single erase never skips: its existing
  # outputs are refused below unless --overwrite.
  todo = [s for s in mine if job.single or job.overwrite or not is_done(job, s)]
  skipped = [s.name for s in mine if s not in todo]
  if skipped:
    say(f"skip: {len(skipped)} set(s) already done (--overwrite redoes them): "
        + ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
  summary = {"sets": [], "skipped": skipped, "out": str(job.out),
             "process": [jax.process_index(), jax.process_count()]}
  if not todo:
    return summary
  # Every output is checked before the model loads, and again (the inputs
  # protected) once the model's folder is known.
  for s in todo:
    for f in job.outputs(s):
      io.check_output_path(f, overwrite=job.replaces(s), protected=job.inputs)

  model_path = job.model if job.model is not None else tiny.ensure_tiny_model()
  t0 = time.perf_counter()
  model = models.load_model(model_path, dtype=job.dtype, text_dtype=job.edit_precision
                            if job.edit_precision == "float64" else None,
                            config=job.config, tokenizer=job.tokenizer,
                            weights="all" if job.orbax else "edit")
  say(f"load: {model.path} ({model.weights_format}, {job.dtype}, edit in "
      f"{job.edit_precision}) in {time.perf_counter() - t0:.1f} s")
  for s in todo:
    for f in job.outputs(s):
      io.check_output_path(f, overwrite=job.replaces(s),
                           protected=[model.path, *job.inputs])
  # float64: the kernels are widened once here, edited in float64, and
  # rounded back to the model's dtype only when written (_write_set).
  kernels = models.cross_attention_kernels(
      model.unet_params, targets=job.config_for(todo[0]).targets)
  if job.edit_precision == "float64":
    kernels = precision_lib.cast(kernels, "float64")
  if any(job.config_for(s).targets != job.config_for(todo[0]).targets for s in todo):
    raise ValueError("all sets of one run must edit the same targets (to_k/to_v)")
  broken = [models.torch_name(n) for n, k in kernels.items()
            if not np.isfinite(np.asarray(jax.device_get(k))).all()]
  if broken:
    raise ValueError(f"the model {model.path} has non-finite (NaN or inf) weights in "
                     f"{len(broken)} cross-attention matrices, e.g. {broken[0]}")

  t0 = time.perf_counter()
  other = unrelated_prompts()
  cache: dict = {}
  prompts = [p for s in todo for p in (*_request_prompts(s, job.config_for(s)), *s.others)]
  prompts += other
  text.encode_prompts(model, prompts, batch_size=job.text_batch_size, cache=cache)
  requests = {s.name: encode_set(model, s, job.config_for(s),
                                 batch_size=job.text_batch_size, cache=cache)
              for s in todo}
  # Each set is compared with its own `others` (a list's look-alikes) or,
  # by default, with the shipped captions.
  others = {s.others: text.encode_prompts(model, list(s.others or other), cache=cache)
            for s in todo}
  summary["others"] = len(other)
  encode_s = time.perf_counter() - t0
  say(f"encode: {len(set(prompts))} prompts of {len(todo)} set(s) in {encode_s:.1f} s")

  mesh = sharding.sets_mesh() if len(jax.local_devices()) > 1 else None
  per_call = job.sets_per_call or 8 * len(jax.local_devices())
  key = jax.random.key(job.seed)
  run_id = uuid.uuid4().hex
  by_config: dict[EditConfig, list[ConceptSet]] = {}
  for s in todo:
    by_config.setdefault(job.config_for(s), []).append(s)
  done = 0
  for config, group in by_config.items():
    for chunk in _chunks(group, per_call):
      t0 = time.perf_counter()
      edited = edit_sets(kernels, [requests[s.name].inputs for s in chunk], config,
                         key=key, mesh=mesh)
      jax.block_until_ready(edited)
      solve_s = time.perf_counter() - t0
      done += len(chunk)
      say(f"solve: {len(chunk)} set(s) [{', '.join(s.name for s in chunk)}] "
          f"({config.method}) in {solve_s:.1f} s ({done}/{len(todo)})")
      for s, result in zip(chunk, edited):
        t0 = time.perf_counter()
        entry = _write_set(job, s, config, model, kernels, result, requests[s.name],
                           others[s.others], cache, run_id)
        entry["solve_s"] = solve_s / len(chunk)
        entry["write_s"] = time.perf_counter() - t0
        summary["sets"].append(entry)
        say(f"write: {job.files(s)[0]}")
  summary["encode_s"] = encode_s
  summary["total_s"] = time.perf_counter() - started
  return summary


def encode_set(model, concept_set: ConceptSet, config: EditConfig, *,
               batch_size: int = 16, cache: dict | None = None) -> text.EncodedRequest:
  """A set's encoded request, with the text-side choices of its config
  (token rows, templated guides, the preserved empty prompt)."""
  s = concept_set
  return text.build_concept_inputs(
      model, list(s.concepts), guides=None if s.guides is None else list(s.guides),
      preserve=list(s.preserve), templates=s.templates, token_rows=config.token_rows,
      guide_templates=config.guide_templates, preserve_empty=config.preserve_empty,
      batch_size=batch_size, cache=cache)


def _request_prompts(s: ConceptSet, config: EditConfig) -> list[str]:
  prompts = text.expand_templates(list(s.concepts), s.templates)
  guides = text.expand_guides(None if s.guides is None else list(s.guides),
                              [c.strip() for c in s.concepts], s.templates,
                              guide_templates=config.guide_templates)
  return prompts + guides + list(s.preserve) + [""]


def check_collapse(before, after, *, low: float = 1e-3, high: float = 1e3) -> None:
  """Refuses edited matrices that collapsed: ||W'||_F / ||W||_F outside
  [low, high] (all-zero included). A sound erase changes a projection by a
  fraction of its size (weight_change in the reports is O(0.1-1)); a ratio
  of 1e-3 or 1e3 only comes from a solve that lost its terms."""
  bad = []
  for name, w0 in before.items():
    w0 = np.asarray(jax.device_get(w0), np.float64)
    w1 = np.asarray(jax.device_get(after[name]), np.float64)
    ratio = np.linalg.norm(w1) / max(np.linalg.norm(w0), np.finfo(np.float64).tiny)
    if not low <= ratio <= high:
      bad.append(f"{models.torch_name(name)} (||W'||/||W|| = {ratio:.3g})")
  if bad:
    raise CollapsedWeightsError(
        f"the edit collapsed {len(bad)} matrices, e.g. {bad[0]}; nothing was written. "
        "The settings are outside the range where the solve is sound (lamb, erase_scale)")


class CollapsedWeightsError(ValueError):
  """The edited weights are degenerate (zero or exploded), though finite."""


def _write_set(job, s, config, model, kernels, edited, request, others, cache,
               run_id) -> dict:
  """Measures one set's edit and writes its files. Everything is written
  into a staging folder in OUT first and renamed into place only when all of
  it is there, the report last; edit and report carry the run's id, so a set
  whose renames a crash split is not taken as done (see `is_done`)."""
  edit_path, report_path = job.files(s)
  overwrite = job.replaces(s)
  check_collapse(kernels, edited)
  other_seqs, other_lengths = others
  report = metrics.edit_report(kernels, edited, request.inputs, config,
                               other_seqs=other_seqs)
  mask = metrics.mask_report(kernels, request.inputs, config, key=jax.random.key(job.seed))
  for name, measures in mask.items():
    report[name].update(measures)
  kept = (text.encode_prompts(model, request.preserve, cache=cache)
          if request.preserve else (None, None))
  selectivity = metrics.selectivity(kernels, edited, request.inputs, other_seqs,
                                    other_lengths, *kept)
  layers = {name: {k: v for k, v in entry.items() if k != "target_gap_per_concept"}
            for name, entry in report.items()}
  means = {key: float(np.mean([e[key] for e in layers.values()]))
           for key in ("target_gap", "concept_shift", "preserve_shift", "other_shift",
                       "weight_change")
           if all(key in e for e in layers.values())}
  metadata = io.edit_metadata(
      concepts=request.concepts, guides=request.guides, preserve=request.preserve,
      config=config, base_fingerprint=model.fingerprint, name=s.name,
      prompts=request.prompts, seed=job.seed, preset=s.preset, run_id=run_id,
      precision=job.edit_precision, family=model.family,
      layers={models.torch_name(n): v for n, v in layers.items()})
  # Written in the model's dtype: one rounding of the (float64) edit.
  edited = {n: k.astype(models.jax_dtype(job.dtype)) for n, k in edited.items()}
  ldm_names = None
  if job.names == "ldm":
    from scapre_jax import single_file
    ldm_names = single_file.ldm_edit_names(model.unet_config,
                                           single_file.model_family(model).name)
  single_full = job.full and model.weights_format == "single-file"
  written = {"edit": str(edit_path)}
  if job.full:
    written["model"] = str(job.out / (SINGLE_FILE_MODEL if single_full else MODEL_DIR))
  if job.orbax:
    written["orbax"] = str(job.out / ORBAX_DIR)
  entry = {
      "name": s.name, "preset": s.preset, "run_id": run_id,
      "concepts": list(request.concepts),
      "prompts": request.prompts, "guides": request.guides,
      "preserve": request.preserve,
      # None: the shipped COCO captions (summary["others"] of them).
      "others": list(s.others) or None,
      "config": config.to_dict(), "seed": job.seed,
      "precision": job.edit_precision,
      "model": str(model.path), "family": model.family,
      "base_fingerprint": model.fingerprint,
      "files": written, **selectivity, **means,
      "layers": {models.torch_name(n): e for n, e in report.items()},
  }
  with outputs.staging(job.out) as stage:
    staged = [(stage / edit_path.name, edit_path)]
    io.write_edit_file(staged[0][0], edited, metadata=metadata, model_root=model.path,
                       ldm_names=ldm_names)
    if single_full:
      from scapre_jax import single_file
      staged.append((single_file.write_edited(
          model.path, stage / SINGLE_FILE_MODEL, edited, config=job.config,
          metadata=single_file.file_metadata(metadata)), job.out / SINGLE_FILE_MODEL))
    elif job.full:
      staged.append((io.write_model_folder(model.path, stage / MODEL_DIR, edited),
                     job.out / MODEL_DIR))
    if job.orbax:
      params = models.replace_kernels(model.unet_params, edited)
      staged.append((io.write_orbax(stage / ORBAX_DIR, params, model_root=model.path),
                     job.out / ORBAX_DIR))
    staged.append((io.write_json(stage / report_path.name, entry), report_path))
    for source, target in staged:
      outputs.place(source, target, overwrite)
  return entry
