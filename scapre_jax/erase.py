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
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from scapre_jax import io, metrics, models, sharding, text, tiny
from scapre_jax import precision as precision_lib
from scapre_jax.config import EditConfig
from scapre_jax.requests import ConceptSet
from scapre_jax.sets import edit_sets

EDIT_FILE = "edit.safetensors"
REPORT_FILE = "report.json"


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

  def __post_init__(self):
    if not self.sets:
      raise ValueError("no concept sets to erase")
    names = [s.name for s in self.sets]
    if len(set(names)) != len(names):
      raise ValueError(f"duplicate set names: {sorted({n for n in names if names.count(n) > 1})}")
    if (self.full or self.orbax) and not self.single:
      raise ValueError("--full and --orbax write one model, so they need a single set")
    if self.single and len(self.sets) != 1:
      raise ValueError("single-set output needs exactly one set")
    if self.names not in ("diffusers", "ldm"):
      raise ValueError(f"names must be 'diffusers' or 'ldm', got {self.names!r}")
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
    or (sets files) when only the edit file exists, the remains of an
    interrupted run, since the report is always written last."""
    edit_path, report_path = self.files(concept_set)
    return self.overwrite or (not self.single and edit_path.exists()
                              and not report_path.exists())

  def files(self, concept_set: ConceptSet) -> tuple[pathlib.Path, pathlib.Path]:
    """(edit file, report file) of a set."""
    if self.single:
      return self.out / EDIT_FILE, self.out / REPORT_FILE
    return (self.out / f"{concept_set.name}.safetensors",
            self.out / f"{concept_set.name}.json")


def cache_home() -> pathlib.Path:
  """$SCAPRE_JAX_HOME, else $XDG_CACHE_HOME/scapre-jax (~/.cache by default)."""
  home = os.environ.get("SCAPRE_JAX_HOME")
  if home:
    return pathlib.Path(home)
  cache = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(cache) / "scapre-jax"


# The built-in model: tiny, random, with SD 1.x's 768-wide context (see
# tiny.TINY_CONFIGS).
DEFAULT_TINY_VARIANT = "sd1-768"


def default_model_dir() -> pathlib.Path:
  """Where the built-in tiny model lives: cache_home() / "tiny-sd1-768"."""
  return cache_home() / f"tiny-{DEFAULT_TINY_VARIANT}"


def enable_compile_cache(path: str | os.PathLike | None = None) -> pathlib.Path | None:
  """Turns on JAX's persistent compilation cache, so a later run with the same
  shapes loads its programs instead of compiling them (a minute on a GPU,
  where XLA autotunes every matrix product; see BENCHMARKS.md).

  `path` None: $SCAPRE_JAX_COMPILE_CACHE, else cache_home() / "xla"; "off"
  leaves the cache as it is. A directory the user configured in JAX already
  wins. Returns the directory in use, or None.
  """
  if path is None:
    path = os.environ.get("SCAPRE_JAX_COMPILE_CACHE") or cache_home() / "xla"
  if str(path).lower() in ("off", "none", ""):
    return None
  configured = jax.config.jax_compilation_cache_dir
  if configured:
    return pathlib.Path(configured)
  jax.config.update("jax_compilation_cache_dir", str(path))
  return pathlib.Path(path)


def ensure_tiny_model() -> pathlib.Path:
  """The tiny model's folder, written on first use."""
  path = default_model_dir()
  if not (path / "model_index.json").exists():
    try:
      tiny.write_tiny_model(path, variant=DEFAULT_TINY_VARIANT)
    except (ValueError, OSError):
      if not (path / "model_index.json").exists():  # not a concurrent writer
        raise
  return path


def unrelated_prompts() -> list[str]:
  """COCO captions shipped with the package: prompts no erase should move."""
  path = pathlib.Path(__file__).parent / "data" / "coco_prompts.txt"
  return [line.strip() for line in path.read_text("utf-8").splitlines() if line.strip()]


def _stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _chunks(items: Sequence, size: int):
  for i in range(0, len(items), size):
    yield items[i:i + size]


def run(job: EraseJob, *, progress: Callable[[str], None] | None = _stderr) -> dict:
  """Runs the job; returns a summary {"sets": [...], "skipped": [...], ...}.

  In a multi-process run (`jax.distributed.initialize` done by the caller)
  process i of n handles sets i, i + n, ... and writes only their files.
  """
  say = progress or (lambda _: None)
  started = time.perf_counter()
  mine = [s for i, s in enumerate(job.sets) if i % jax.process_count() == jax.process_index()]
  # Sets runs skip finished sets; a single erase never skips: its existing
  # outputs are refused below unless --overwrite.
  todo = [s for s in mine
          if job.single or job.overwrite or not all(f.exists() for f in job.files(s))]
  skipped = [s.name for s in mine if s not in todo]
  if skipped:
    say(f"skip: {len(skipped)} set(s) already done (--overwrite redoes them): "
        + ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
  summary = {"sets": [], "skipped": skipped, "out": str(job.out),
             "process": [jax.process_index(), jax.process_count()]}
  if not todo:
    return summary

  model_path = job.model if job.model is not None else ensure_tiny_model()
  t0 = time.perf_counter()
  model = models.load_model(model_path, dtype=job.dtype, text_dtype=job.edit_precision
                            if job.edit_precision == "float64" else None,
                            config=job.config, tokenizer=job.tokenizer,
                            weights="all" if job.orbax else "edit")
  say(f"load: {model.path} ({model.weights_format}, {job.dtype}, edit in "
      f"{job.edit_precision}) in {time.perf_counter() - t0:.1f} s")
  for s in todo:
    for f in job.files(s):
      io.check_output_path(f, overwrite=job.replaces(s), protected=[model.path])
  # float64: the kernels are widened once here, edited in float64, and
  # rounded back to the model's dtype only when written (_write_set).
  kernels = models.cross_attention_kernels(
      model.unet_params, targets=job.config_for(todo[0]).targets)
  if job.edit_precision == "float64":
    kernels = precision_lib.cast(kernels, "float64")
  if any(job.config_for(s).targets != job.config_for(todo[0]).targets for s in todo):
    raise ValueError("all sets of one run must edit the same targets (to_k/to_v)")

  t0 = time.perf_counter()
  other = unrelated_prompts()
  cache: dict = {}
  prompts = [p for s in todo for p in _request_prompts(s, job.config_for(s))] + other
  text.encode_prompts(model, prompts, batch_size=job.text_batch_size, cache=cache)
  requests = {s.name: encode_set(model, s, job.config_for(s),
                                 batch_size=job.text_batch_size, cache=cache)
              for s in todo}
  others = text.encode_prompts(model, other, cache=cache)
  summary["others"] = len(other)
  encode_s = time.perf_counter() - t0
  say(f"encode: {len(set(prompts))} prompts of {len(todo)} set(s) in {encode_s:.1f} s")

  mesh = sharding.sets_mesh() if len(jax.local_devices()) > 1 else None
  per_call = job.sets_per_call or 8 * len(jax.local_devices())
  key = jax.random.key(job.seed)
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
                           others, cache)
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


def _write_set(job, s, config, model, kernels, edited, request, others, cache) -> dict:
  edit_path, report_path = job.files(s)
  overwrite = job.replaces(s)
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
      prompts=request.prompts, seed=job.seed, preset=s.preset,
      precision=job.edit_precision,
      layers={models.torch_name(n): v for n, v in layers.items()})
  # Written in the model's dtype: one rounding of the (float64) edit.
  edited = {n: k.astype(models.jax_dtype(job.dtype)) for n, k in edited.items()}
  ldm_names = None
  if job.names == "ldm":
    from scapre_jax import single_file
    ldm_names = single_file.ldm_edit_names(model.unet_config,
                                           single_file.model_family(model).name)
  io.write_edit_file(edit_path, edited, metadata=metadata, overwrite=overwrite,
                     model_root=model.path, ldm_names=ldm_names)
  written = {"edit": str(edit_path)}
  if job.full and model.weights_format == "single-file":
    from scapre_jax import single_file
    written["model"] = str(single_file.write_edited(
        model.path, job.out / "model.safetensors", edited, config=job.config,
        metadata=single_file.file_metadata(metadata), overwrite=job.overwrite))
  elif job.full:
    written["model"] = str(io.write_model_folder(
        model.path, job.out / "model", edited, overwrite=job.overwrite))
  if job.orbax:
    params = models.replace_kernels(model.unet_params, edited)
    written["orbax"] = str(io.write_orbax(job.out / "orbax", params, overwrite=job.overwrite,
                                          model_root=model.path))
  entry = {
      "name": s.name, "preset": s.preset, "concepts": list(request.concepts),
      "prompts": request.prompts, "guides": request.guides,
      "preserve": request.preserve, "config": config.to_dict(), "seed": job.seed,
      "precision": job.edit_precision,
      "model": str(model.path), "base_fingerprint": model.fingerprint,
      "files": written, **selectivity, **means,
      "layers": {models.torch_name(n): e for n, e in report.items()},
  }
  io.write_json(report_path, entry, overwrite=overwrite)
  return entry
