#!/usr/bin/env python
"""Benchmarks the ScaPre edit on Stable Diffusion 1.5 or SDXL shapes.

Ours: the JAX engine (`text.build_concept_inputs` + `edit_projections`), timed
by phase: compilation, text encoding, statistics (text-side sums shared by all
matrices), solve (all per-matrix work: probes, target values, linear solves,
Bures step), total; and profiled piece by piece with the engine's own
per-matrix functions (`edit.probe_noise`, `edit.row_weights`, ...), so the
profile times what `edit_scapre` runs. Beside it, in the same process and on
the same inputs, the released procedure in PyTorch float32
(`scripts/bench_reference.py`, skipped with `--no-reference`).

`--family` picks the model whose shapes are measured (`FAMILIES`: sd15;
sdxl, SDXL-base's 140 matrices and both of its text encoders at full size,
with no PyTorch reference, as the released code has no SDXL procedure; tiny
and tiny-sdxl for the smoke tests); a new family is one more entry there.
The matrices are listed from the family's UNet config by the package
(`models.cross_attention_kernels` of the Flax UNet's abstract params).

With `--sets K ...` it measures batched throughput instead: K sets of N
concepts in one `edit_sets` call against K `edit_projections` calls.

With `--precision float64` the text encoder and the edit run in float64, as
`scapre-jax erase --precision float64` runs them (docs/reproducibility.md);
the PyTorch reference, a float32 procedure, is then skipped.

Each configuration runs in a fresh subprocess, so `peak_rss_mib` (ru_maxrss)
is that configuration's own peak.

  python scripts/bench_edit.py --concepts 10 50 100 --json benchmarks/edit_cpu.json
  python scripts/bench_edit.py --concepts 10 --sets 1 2 4 8 --json benchmarks/sets_cpu.json
  python scripts/bench_edit.py --concepts 10 50 --precision float64 --no-profile
  python scripts/bench_edit.py --family sdxl --concepts 50 --no-solver-comparison \
      --json benchmarks/cpu/edit_sdxl.json
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import functools
import hashlib
import importlib
import json
import os
import pathlib
import platform
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  # Appended: an engine copy on PYTHONPATH (a candidate fix) is measured instead.
  sys.path.append(str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import transformers  # noqa: E402

import scapre_jax  # noqa: E402
from scapre_jax import edit, models, precision, sets, single_file, text, tiny  # noqa: E402
from scapre_jax.config import MI_MODES, PRESETS, EditConfig  # noqa: E402

CONCEPT_LISTS = ROOT / "scapre_jax" / "data" / "concept_lists.json"


# The UNet configs whose cross-attention to_k/to_v kernels are benchmarked
# (only what places and sizes them; `models.cross_attention_kernels` of the
# Flax UNet's abstract params lists them). SDXL-base 1.0's
# unet/config.json: no attention in the first block, transformer depths
# 1, 2, 10 (the mid block takes the last), 3 attentions per up block: 70
# attn2 layers, 140 matrices, d_in 2048; d_out 640 (down_blocks_1: 2 x 2
# layers, up_blocks_1: 3 x 2) x 2 = 20 and 1280 (down_blocks_2: 2 x 10,
# mid: 10, up_blocks_0: 3 x 10) x 2 = 120.
SDXL_BASE_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_BASE_MATRICES = 140

# Text encoders at full size (CLIPTextConfig overrides of the tiny model's
# configs, which keep the tiny tokenizer's vocabulary: the embedding lookup
# costs nothing either way). CLIP ViT-L/14: SD 1.x's encoder and SDXL's
# first; OpenCLIP ViT-bigG/14 with projection: SDXL's text_encoder_2.
CLIP_L = dict(hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072,
              num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
OPENCLIP_BIGG = dict(hidden_act="gelu", hidden_size=1280, intermediate_size=5120,
                     num_hidden_layers=32, num_attention_heads=20, projection_dim=1280)


@dataclasses.dataclass(frozen=True)
class Shapes:
  """UNet cross-attention layout and text-encoder sizes of one benchmark."""

  # models.FAMILIES key, and the scapre_jax.tiny variant whose tokenizer(s)
  # and text configs the encoders start from.
  family: str
  unet: dict[str, Any]  # diffusers UNet config: its attn2 to_k/to_v are edited
  # Per text encoder (models.TEXT_PARTS order): CLIPTextConfig overrides.
  text: tuple[dict[str, Any], ...] = ({},)


# One entry per --family.
FAMILIES = {
    # SD 1.5: 16 attn2 layers, context 768, CLIP ViT-L/14 text encoder.
    "sd15": Shapes("sd1", single_file.FAMILIES["sd1"].unet, (CLIP_L,)),
    # SDXL-base 1.0: 140 matrices, context 768 + 1280 = 2048.
    "sdxl": Shapes("sdxl", SDXL_BASE_UNET, (CLIP_L, OPENCLIP_BIGG)),
    # The tiny models of scapre_jax.tiny (contexts 32 and 32 + 64): for the
    # smoke tests.
    "tiny": Shapes("sd1", tiny.TINY_CONFIGS["sd1"].unet),
    "tiny-sdxl": Shapes("sdxl", tiny.TINY_CONFIGS["sdxl"].unet, ({}, {})),
}
# numpy streams of the random weights: [seed, stream].
_STREAMS = {"text_encoder": 1, "unet": 2, "text_encoder_2": 3}


@dataclasses.dataclass(frozen=True, eq=False)
class BenchModel:
  """What `text.build_concept_inputs` needs: the text encoder(s) as
  `models.LoadedModel` holds them and the hidden state that is the context;
  plus each encoder's config, from which the reference builds its PyTorch copy."""

  text_encoders: tuple[models.TextEncoder, ...]
  context_layer: str  # models.CONTEXT_LAYERS of the family
  text_configs: tuple[dict[str, Any], ...]

  @property
  def text_encoder(self):
    return self.text_encoders[0].module

  @property
  def text_params(self):
    return self.text_encoders[0].params

  @property
  def tokenizer(self):
    return self.text_encoders[0].tokenizer


# -- setup ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def build_model(family: str, seed: int, dtype: str = "float32") -> BenchModel:
  """Random-weight text encoder(s) of `FAMILIES[family]` over the tiny
  tokenizer's vocab, computing in `dtype`.

  Params are drawn with numpy (Flax's init compiles slowly on CPU), with the
  scales of tiny.py, one encoder at a time, so the float32 draws of one
  (2.6 GiB for bigG) are freed once it is on the device.
  """
  shapes = FAMILIES[family]
  with tempfile.TemporaryDirectory() as tmp:
    root = tiny.write_tiny_model(pathlib.Path(tmp) / "tiny", variant=shapes.family)
    loaded = models.load_model(root, weights="edit")
    configs = [models.read_config(root, t.part) for t in loaded.text_encoders]
  if len(configs) != len(shapes.text):
    raise ValueError(f"family {family!r} sizes {len(shapes.text)} text encoder(s); the "
                     f"tiny {shapes.family} model has {len(configs)}")
  towers = []
  for tower, config, overrides in zip(loaded.text_encoders, configs, shapes.text):
    config.update(overrides)
    params = tiny.random_params(tower.part, config,
                                np.random.default_rng([seed, _STREAMS[tower.part]]),
                                other_std=0.02)
    towers.append(models.TextEncoder(
        tower.part, models.build(tower.part, config, dtype=dtype),
        jax.tree.map(lambda a: jnp.asarray(a, models.jax_dtype(dtype)), params),
        tower.tokenizer))
    del params
  return BenchModel(text_encoders=tuple(towers), context_layer=loaded.context_layer,
                    text_configs=tuple(configs))


def kernel_shapes(shapes: Shapes) -> dict[str, tuple[int, int]]:
  """(d_in, d_out) of every attn2 to_k/to_v kernel of the family's UNet, by
  Flax path in UNet order, as the package lists them from the Flax model."""
  abstract = models.abstract_params("unet", shapes.unet)
  return {name: tuple(spec.shape)
          for name, spec in models.cross_attention_kernels(abstract).items()}


def unet_kernels(shapes: Shapes, seed: int) -> dict[str, np.ndarray]:
  """to_k and to_v kernels (d_in, d_out) of every attn2 layer, std 1/sqrt(d_in)."""
  rng = np.random.default_rng([seed, _STREAMS["unet"]])
  return {name: (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
          for name, (d_in, d_out) in kernel_shapes(shapes).items()}


def concept_names(count: int) -> list[str]:
  """The packaged concept lists in order (deduplicated), then "concept 123"."""
  lists = json.loads(CONCEPT_LISTS.read_text(encoding="utf-8"))
  names = list(dict.fromkeys(c.strip().lower() for v in lists.values() for c in v))
  names += [f"concept {i}" for i in range(len(names), count)]
  return names[:count]


def machine() -> dict[str, Any]:
  cpu = "unknown CPU"
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  cores = os.cpu_count()
  kind = jax.devices()[0].device_kind
  git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True,
                                  text=True).stdout.strip()
  engine = pathlib.Path(scapre_jax.__file__).parent
  diff = "" if engine == ROOT / "scapre_jax" else subprocess.run(
      ["diff", "-ru", "-x", "__pycache__", str(ROOT / "scapre_jax"), str(engine)],
      capture_output=True, text=True).stdout
  sources = sorted(p for d in (engine, ROOT / "convert") for p in d.rglob("*.py"))
  digest = hashlib.sha256()
  for path in sources:
    digest.update(path.read_bytes())
  return {
      "engine_path": str(engine),
      # Identifies the code even where git metadata is stale (a copied tree).
      "engine_sha256": digest.hexdigest()[:16],
      "engine_diff_from_checkout": diff,
      "git_commit": git("rev-parse", "--short", "HEAD"),
      "git_modified": git("status", "--porcelain", "--", "scapre_jax", "convert").split("\n"),
      "device": f"{kind} | {cpu} | {cores} cores",
      "jax_device_kind": kind, "cpu_model": cpu, "cores": cores,
      "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
      "python": platform.python_version(), "jax": jax.__version__,
      "transformers": transformers.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


_START = time.perf_counter()


def log(message: str) -> None:
  """Progress on stderr, with seconds since start."""
  print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def device_peak_mib() -> float | None:
  """Peak accelerator memory of this process (None on CPU, where RSS says it)."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def timed(fn, *args, **kwargs):
  """(seconds, result) with every JAX array of the result ready."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return time.perf_counter() - start, out


# -- ours -----------------------------------------------------------------------------


def shape_groups(kernels, key):
  """(kernels, keys) of each group, as `edit_projections` groups them."""
  return [(tuple(kernels[n] for n in names), edit.matrix_keys(key, names))
          for names in edit.shape_groups(kernels).values()]


def temp_memory_gib(groups, inputs, config, matrix_batch, dtype) -> list[float]:
  """XLA's temporary buffer size of each shape group's compiled edit (GiB)."""
  stats = jax.eval_shape(lambda x: edit.concept_statistics(x, config, dtype), inputs)
  sizes = []
  for stack, keys in groups:
    compiled = edit.edit_kernel_stack.lower(
        stack, keys, inputs, stats, config, matrix_batch).compile()
    sizes.append(compiled.memory_analysis().temp_size_in_bytes / 2**30)
  return sizes


def bench_ours(model, kernels, concepts, config, key, *, repeat, matrix_batch,
               max_temp_gib):
  """Phases of ours; compile = first call minus the fastest later call."""
  # What edit_projections runs with (one matrix at a time on CPU).
  matrix_batch = edit.default_matrix_batch(matrix_batch)
  # *_cpu: CPU seconds of this process (all threads), which a loaded machine
  # inflates far less than wall time.
  runs = {"encode": [], "edit": [], "statistics": [], "solve": [],
          "encode_cpu": [], "edit_cpu": []}
  first = {}
  groups = shape_groups(kernels, key)
  dtype = precision.compute_dtype(next(iter(kernels.values())).dtype)
  for i in range(repeat + 1):
    log(f"ours: run {i}" + (" (compiles)" if i == 0 else ""))
    cpu_start = time.process_time()
    t_encode, request = timed(text.build_concept_inputs, model, concepts)
    cpu_encode = time.process_time() - cpu_start
    inputs = request.inputs
    log(f"ours: encoded in {t_encode:.2f} s")
    if i == 0:
      # Compiles the per-group programs ahead of time (XLA caches them for the
      # first call), so this time is part of the compile time.
      t_aot, temp = timed(temp_memory_gib, groups, inputs, config, matrix_batch, dtype)
      log(f"ours: compiled temporaries per shape group {[round(t, 2) for t in temp]} GiB")
      if max(temp) > max_temp_gib:
        raise MemoryError(
            f"the edit needs {max(temp):.1f} GiB of temporaries (> --max-temp-gib "
            f"{max_temp_gib:.1f}); pass --matrix-batch to bound it")
    cpu_start = time.process_time()
    t_edit, edited = timed(edit.edit_projections, kernels, inputs, config, key=key,
                           matrix_batch=matrix_batch)
    cpu_edit = time.process_time() - cpu_start
    log(f"ours: edit_projections in {t_edit:.2f} s")
    # The timed phases below must be the engine's edit. What each edited
    # matrix makes of one fixed context row is kept to check it, not the
    # matrices (1.3 GiB on SDXL shapes): a random row shows any change.
    row = jax.random.normal(jax.random.key(1), (inputs.d_in,), dtype)
    seen = {name: row @ e.astype(dtype) for name, e in edited.items()}
    del edited
    t_stats, stats = timed(edit.concept_statistics, inputs, config, dtype)
    t_solve, phases_diff = 0.0, 0.0
    # The compiling run skips the solve phase: its programs are the ones
    # compiled above, and on SDXL shapes it is minutes of discarded work.
    for (stack, keys), names in zip(groups if i else [], edit.shape_groups(kernels).values()):
      # Positional, as edit_projections calls it, so the compiled program is shared.
      seconds, (solved, _) = timed(edit.edit_kernel_stack, stack, keys, inputs, stats,
                                   config, matrix_batch)
      t_solve += seconds
      phases_diff = max(phases_diff, *(
          float(jnp.max(jnp.abs(row @ s.astype(dtype) - seen[n])) / jnp.max(jnp.abs(seen[n])))
          for n, s in zip(names, solved)))
      del solved
    if i == 0:
      first = {"encode": t_encode, "edit": t_edit}
    else:
      for name, value in (("encode", t_encode), ("edit", t_edit),
                          ("statistics", t_stats), ("solve", t_solve),
                          ("encode_cpu", cpu_encode), ("edit_cpu", cpu_edit)):
        runs[name].append(value)
  best = {name: min(values) for name, values in runs.items()}
  compile_edit = t_aot + first["edit"] - best["edit"]
  out = {
      "ours_compile_s": (first["encode"] - best["encode"]) + compile_edit,
      "ours_compile_encode_s": first["encode"] - best["encode"],
      "ours_compile_edit_s": compile_edit,
      "ours_encode_s": best["encode"],
      "ours_statistics_s": best["statistics"],
      "ours_solve_s": best["solve"],
      "ours_edit_s": best["edit"],
      "ours_total_s": best["encode"] + best["edit"],
      "ours_encode_cpu_s": best["encode_cpu"],
      "ours_edit_cpu_s": best["edit_cpu"],
      "ours_runs": runs,
      "ours_temp_gib": temp,
      # statistics + solve phases against edit_projections: one random
      # context row through each matrix, relative to the largest entry (last run)
      "phases_max_rel_diff": phases_diff,
      "prompts_encoded": len(set(request.prompts) | set(request.guides) | {""}),
      "sequence_rows": int(inputs.old_seqs.shape[1]),
  }
  return out, request, stats, groups


def over_matrices(fn, xs, matrix_batch):
  """fn over the leading (matrix) axis, batched as `edit.edit_kernel_stack`
  batches it: vmap, or lax.map `matrix_batch` matrices at a time."""
  if matrix_batch is None or matrix_batch >= jax.tree.leaves(xs)[0].shape[0]:
    return jax.vmap(lambda x: fn(*x))(xs)
  return jax.lax.map(lambda x: fn(*x), xs, batch_size=matrix_batch)


# The pieces below are the engine's own per-matrix functions (`edit.probe_noise`,
# `edit.row_weights`, `edit.row_entropy`, `edit.factor_coefficients`,
# `edit.scapre_factor_change`), each compiled alone, so the profile times what
# `edit_scapre` runs.


@functools.partial(jax.jit, static_argnames=("config", "matrix_batch"))
def _probe_noise(keys, inputs, config, matrix_batch):
  return over_matrices(lambda key: edit.probe_noise(key, inputs, config), (keys,), matrix_batch)


@functools.partial(jax.jit, static_argnames=("config", "matrix_batch"))
def _mi_masks(stack, noise, inputs, config, matrix_batch):
  return over_matrices(lambda k, n: edit.row_weights(k.T, inputs, n, config),
                       (stack, noise), matrix_batch)


@functools.partial(jax.jit, static_argnames=("config", "matrix_batch"))
def _entropy(stack, noise, inputs, config, matrix_batch):
  return over_matrices(lambda k, n: edit.row_entropy(k.T, inputs, n, config),
                       (stack, noise), matrix_batch)


@functools.partial(jax.jit, static_argnames=("config", "matrix_batch"))
def _coefficients(stack, row_weights, inputs, stats, config, matrix_batch):
  # The factor form's H Q (`edit.factor_coefficients`); row_weights None
  # without the MI mask.
  if row_weights is None:
    return over_matrices(
        lambda k: edit.factor_coefficients(k.T, inputs, stats, config, None),
        (stack,), matrix_batch)
  return over_matrices(
      lambda k, r: edit.factor_coefficients(k.T, inputs, stats, config, r),
      (stack, row_weights), matrix_batch)


def projector_of(stats):
  return stats.projector_basis @ stats.projector_basis.T


@functools.partial(jax.jit, static_argnames=("config", "matrix_batch"))
def _linear_solve(stack, stats, coeffs, alpha, mu, config, matrix_batch):
  # The engine's step-6 solve in the factor form, as `edit_scapre` calls it.
  return over_matrices(
      lambda k, h, a, m: k.T + edit.scapre_factor_change(k.T, stats, h, a, m, config),
      (stack, coeffs, alpha, mu), matrix_batch)


@functools.partial(jax.jit, static_argnames=("matrix_batch",))
def _two_eigh(grams, projector, rhs, alpha, matrix_batch):
  return over_matrices(lambda g, b, a: scapre_jax.solve_row_sylvester(g, projector, b, a),
                       (grams, rhs, alpha), matrix_batch)


@functools.partial(jax.jit, static_argnames=("matrix_batch",))
def _eigh(grams, matrix_batch):
  return over_matrices(jnp.linalg.eigh, (grams,), matrix_batch)


@functools.partial(jax.jit, static_argnames=("matrix_batch",))
def _cholesky(grams, matrix_batch):
  return over_matrices(lambda g: jax.scipy.linalg.cho_factor(g)[0], (grams,), matrix_batch)


@functools.partial(jax.jit, static_argnames=("matrix_batch",))
def _bures(stack, solved, matrix_batch):
  return over_matrices(
      lambda w, s: scapre_jax.bures_prox(w.T, s, mu=0.3, lam_prox=0.8, iters=1),
      (stack, solved), matrix_batch)


def solve_problem(stack, stats, config):
  """Step-6 inputs from real statistics, one mu per matrix as in the engine."""
  count, d_in, d_out = stack.shape
  mu = 0.2 + 0.01 * jnp.arange(count, dtype=stack.dtype)[:, None, None]
  rhs = jnp.swapaxes(stack, 1, 2) * (config.lamb + 0.2)
  return (edit.scapre_gram(stats, config, mu), rhs,
          jnp.full((count, d_out), config.erase_scale, stack.dtype))


def profile_ours(groups, inputs, stats, config, matrix_batch, *, over_sets=False,
                 compare_solvers=True):
  """Seconds of each piece of the per-matrix edit, summed over shape groups.

  Each piece is its own compiled program (first call discarded), batched over
  matrices as the engine batches them, so the sum can differ from the fused
  `ours_solve_s`. `target_values` is the factor form's coefficients H Q and
  `linear_solve` the engine's step 6 from them (docs/algorithm.md "The factor
  form"); with `compare_solvers`, `eigh`, `cholesky` and `solve_two_eigh` (G
  formed: its eigendecomposition, its Cholesky factor, the two-eigh closed
  form) are timed for comparison.

  With `over_sets`, `inputs` and `stats` carry a leading sets axis (`sets.stack_sets`,
  `sets.set_statistics`) and every piece that depends on the concepts is
  vmapped over it, as `edit_sets` runs it; the probe noise does not depend on
  the set (every set uses the same key) and runs once. Comparing K = 1 with
  K = 8 shows which pieces make up the cost of each further set.
  """
  parts: dict[str, float] = {}

  def add(name, fn, *args, set_axes=None, **static):
    log(f"profile: {name}")
    piece = functools.partial(fn, matrix_batch=matrix_batch, **static)
    if over_sets and set_axes is not None:
      piece = jax.jit(jax.vmap(piece, in_axes=set_axes))
    piece(*args)  # compile
    seconds = []
    for _ in range(3):  # the fastest of three: a piece is short, a hiccup is not
      t, out = timed(piece, *args)
      seconds.append(t)
    parts[name] = parts.get(name, 0.0) + min(seconds)
    return out

  problem = lambda stack, s: solve_problem(stack, s, config)
  dtype = precision.compute_dtype(groups[0][0][0].dtype)
  if over_sets:
    add("statistics", lambda x, matrix_batch: sets.set_statistics(
        x, config, dtype), inputs)
  # The noise has the shapes of one set; every set draws the same.
  one_set = jax.tree.map(lambda x: x[0], inputs) if over_sets else inputs
  for kernels, keys in groups:
    stack = jnp.stack(kernels)
    noise = add("probe_noise", _probe_noise, keys, one_set, config=config)
    weights = (add("mi_mask", _mi_masks, stack, noise, inputs, config=config,
                   set_axes=(None, None, 0)) if config.mi_mask else None)
    add("entropy", _entropy, stack, noise, inputs, config=config, set_axes=(None, None, 0))
    coeffs = add("target_values", _coefficients, stack, weights, inputs, stats, config=config,
                 set_axes=(None, None if weights is None else 0, 0, 0))
    grams, rhs, alpha = (jax.vmap(problem, in_axes=(None, 0))(stack, stats) if over_sets
                         else problem(stack, stats))
    mu = 0.2 + 0.01 * jnp.arange(stack.shape[0], dtype=stack.dtype)
    solved = add("linear_solve", _linear_solve, stack, stats, coeffs, alpha, mu, config=config,
                 set_axes=(None, 0, 0, 0, None))
    if compare_solvers:
      add("eigh", _eigh, grams, set_axes=0)
      add("cholesky", _cholesky, grams, set_axes=0)
      if not over_sets:
        add("solve_two_eigh", _two_eigh, grams, projector_of(stats), rhs, alpha)
    add("bures", _bures, stack, solved, set_axes=(None, 0))
  return parts


# -- configurations -------------------------------------------------------------------


def reference_module():
  """scripts/bench_reference.py (imported on use: it needs torch)."""
  here = str(pathlib.Path(__file__).resolve().parent)
  if here not in sys.path:
    sys.path.insert(0, here)
  return importlib.import_module("bench_reference")


def run_edit(args, n: int) -> dict[str, Any]:
  shapes = FAMILIES[args.family]
  config = EditConfig.preset(args.preset, mi_mode=args.mi_mode)
  log("building the text encoder")
  model = build_model(args.family, args.seed, args.precision)
  kernels = {k: jnp.asarray(v, args.precision)
             for k, v in unet_kernels(shapes, args.seed).items()}
  d_in = next(iter(kernels.values())).shape[0]
  concepts = concept_names(n)
  key = jax.random.key(args.seed)
  record = {"kind": "edit", "concepts": n, "preset": args.preset, "shapes": args.family,
            "precision": args.precision, "mi_mode": args.mi_mode,
            "matrices": len(kernels), "d_in": d_in,
            "loadavg_start": os.getloadavg()}
  ours, request, stats, groups = bench_ours(
      model, kernels, concepts, config, key, repeat=args.repeat,
      matrix_batch=args.matrix_batch, max_temp_gib=args.max_temp_gib)
  record["matrix_batch"] = edit.default_matrix_batch(args.matrix_batch)
  # docs/algorithm.md "The factor form"; "gram" only for scapre-small with
  # spectral_residual.
  record["solve_form"] = "factor" if edit.uses_factor_form(config) else "gram"
  record.update(ours)
  record["peak_rss_mib"] = peak_rss_mib()
  if args.profile and config.method == "scapre":
    record["ours_profile_s"] = profile_ours(groups, request.inputs, stats, config,
                                           edit.default_matrix_batch(args.matrix_batch),
                                           compare_solvers=args.compare_solvers)
    # Step 6 alone, for the like-for-like ratio with the per-row Cholesky solves.
    record["ours_linear_solve_s"] = record["ours_profile_s"]["linear_solve"]
  if args.reference:
    reference = reference_module()
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), model.text_params)
    encoder = reference.torch_text_encoder(model.text_configs[0], params)
    record.update(reference.bench_reference(
        model.tokenizer, encoder, kernels, request, config,
        sample_concepts=args.ref_concepts, sample_encodes=args.ref_encodes,
        rows=args.ref_rows, seed=args.seed, log=log))
    record["speedup_total"] = record["reference_total_s"] / record["ours_total_s"]
    record["speedup_total_hoisted"] = (record["reference_hoisted_total_s"]
                                       / record["ours_total_s"])
    record["speedup_solve"] = record["reference_solve_s"] / record["ours_solve_s"]
    if "ours_linear_solve_s" in record:
      record["speedup_linear_solve"] = (record["reference_linear_solve_s"]
                                        / record["ours_linear_solve_s"])
  record["peak_rss_end_mib"] = peak_rss_mib()
  record["device_peak_mib"] = device_peak_mib()
  record["loadavg_end"] = os.getloadavg()
  return record


def run_sets(args, n: int, num_sets: int) -> dict[str, Any]:
  shapes = FAMILIES[args.family]
  config = EditConfig.preset(args.preset, mi_mode=args.mi_mode)
  model = build_model(args.family, args.seed, args.precision)
  kernels = {k: jnp.asarray(v, args.precision)
             for k, v in unet_kernels(shapes, args.seed).items()}
  d_in = next(iter(kernels.values())).shape[0]
  names = concept_names(n * num_sets)
  key = jax.random.key(args.seed)
  record = {"kind": "sets", "concepts": n, "sets": num_sets, "preset": args.preset,
            "shapes": args.family, "precision": args.precision, "mi_mode": args.mi_mode,
            "matrices": len(kernels),
            "d_in": d_in,
            "matrix_batch": edit.default_matrix_batch(args.matrix_batch),
            "loadavg_start": os.getloadavg()}
  start = time.perf_counter()
  inputs = [text.build_concept_inputs(model, names[i * n:(i + 1) * n]).inputs
            for i in range(num_sets)]
  record["encode_s"] = time.perf_counter() - start
  t_first, batched = timed(sets.edit_sets, kernels, inputs, config, key=key,
                           matrix_batch=args.matrix_batch)
  start = time.perf_counter()
  alone = [jax.block_until_ready(edit.edit_projections(
      kernels, x, config, key=key, matrix_batch=args.matrix_batch)) for x in inputs]
  t_first_seq = time.perf_counter() - start  # compiles once per distinct L
  record["max_abs_diff"] = max(
      float(jnp.max(jnp.abs(b[name] - a[name]))) for b, a in zip(batched, alone)
      for name in kernels)
  record["max_rel_diff"] = max(
      float(jnp.max(jnp.abs(b[name] - a[name])) / jnp.max(jnp.abs(a[name])))
      for b, a in zip(batched, alone) for name in kernels)
  runs = {"batched": [], "sequential": []}
  for _ in range(args.repeat):
    runs["batched"].append(timed(sets.edit_sets, kernels, inputs, config, key=key,
                                 matrix_batch=args.matrix_batch)[0])
    start = time.perf_counter()
    for x in inputs:
      jax.block_until_ready(edit.edit_projections(kernels, x, config, key=key,
                                                  matrix_batch=args.matrix_batch))
    runs["sequential"].append(time.perf_counter() - start)
  batched_s, sequential_s = min(runs["batched"]), min(runs["sequential"])
  record.update({
      "batched_s": batched_s, "sequential_s": sequential_s,
      "batched_compile_s": t_first - batched_s,
      "sequential_first_s": t_first_seq,
      "speedup_batched": sequential_s / batched_s,
      "batched_sets_per_s": num_sets / batched_s,
      "sequential_sets_per_s": num_sets / sequential_s,
      "runs": runs, "peak_rss_mib": peak_rss_mib(), "device_peak_mib": device_peak_mib(),
  })
  if args.profile and config.method == "scapre":
    # Where the batched call's time goes, piece by piece, vmapped over the K sets.
    stacked = sets.stack_sets(inputs)
    record["batched_profile_s"] = profile_ours(
        shape_groups(kernels, key), stacked,
        sets.set_statistics(stacked, config, precision.compute_dtype(args.precision)),
        config, edit.default_matrix_batch(args.matrix_batch), over_sets=True,
        compare_solvers=args.compare_solvers)
  record["loadavg_end"] = os.getloadavg()
  return record


def run_config(args, n: int, num_sets: int | None) -> dict[str, Any]:
  record = run_edit(args, n) if num_sets is None else run_sets(args, n, num_sets)
  record.update(machine())
  return record


# -- command line ---------------------------------------------------------------------


def parse(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--concepts", type=int, nargs="+", default=[10, 50],
                      help="concept counts N (e.g. 10 50 100 500 1000)")
  parser.add_argument("--sets", type=int, nargs="+", default=None,
                      help="batched throughput: K sets of N concepts (e.g. 1 2 4 8)")
  parser.add_argument("--preset", default="scapre", choices=sorted(PRESETS))
  parser.add_argument("--family", "--shapes", dest="family", default="sd15",
                      choices=sorted(FAMILIES),
                      help="the model whose shapes are measured: sd15, SD-1.5 UNet and "
                           "CLIP-L sizes; sdxl, SDXL-base UNet, CLIP-L and OpenCLIP bigG "
                           "(no PyTorch reference); tiny and tiny-sdxl, for the smoke tests")
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="write the results here (and print a summary)")
  parser.add_argument("--repeat", type=int, default=2,
                      help="timed runs after the compiling one; the fastest is kept")
  parser.add_argument("--matrix-batch", type=int, default=None,
                      help="edit_projections matrix_batch (bounds memory)")
  parser.add_argument("--max-temp-gib", type=float, default=None,
                      help="refuse an edit whose compiled temporaries exceed this "
                           "(default: 70%% of physical memory)")
  parser.add_argument("--no-reference", dest="reference", action="store_false",
                      help="skip the PyTorch reference")
  parser.add_argument("--no-profile", dest="profile", action="store_false",
                      help="skip the per-piece profile of ours")
  parser.add_argument("--no-solver-comparison", dest="compare_solvers", action="store_false",
                      help="profile only the engine's pieces, not the eigh, cholesky and "
                           "two-eigh solves beside them (slow at d_in 2048)")
  parser.add_argument("--ref-concepts", type=int, default=4,
                      help="concepts whose MI masks and accumulation the reference times")
  parser.add_argument("--ref-encodes", type=int, default=3,
                      help="timed [old, new] encoder calls of the reference")
  parser.add_argument("--ref-rows", type=int, default=None,
                      help="rows per matrix for the reference's per-row loops (default all)")
  parser.add_argument("--mi-mode", default="released", choices=MI_MODES,
                      help="EditConfig.mi_mode of the preset")
  parser.add_argument("--precision", default="float32", choices=precision.PRECISIONS,
                      help="float64: text encoder and edit in float64, as erase "
                           "--precision float64 (no PyTorch reference)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--in-process", action="store_true",
                      help="run every configuration in this process (peaks accumulate)")
  parser.add_argument("--worker", nargs=2, type=int, metavar=("N", "K"),
                      help=argparse.SUPPRESS)  # internal: one config, K = 0 for edit
  args = parser.parse_args(argv)
  if args.precision == "float64" and args.reference:
    log("--precision float64: the PyTorch reference (a float32 procedure) is skipped")
    args.reference = False
  if len(FAMILIES[args.family].text) > 1 and args.reference:
    # The released code stops at SD 2.1: there is no released SDXL procedure.
    log(f"--family {args.family}: the PyTorch reference (one text encoder) is skipped")
    args.reference = False
  if args.max_temp_gib is None:
    args.max_temp_gib = 0.7 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return args


def _worker_argv(args, n: int, num_sets: int | None, out: pathlib.Path) -> list[str]:
  argv = [sys.executable, str(pathlib.Path(__file__).resolve()),
          "--worker", str(n), str(num_sets or 0), "--json", str(out),
          "--preset", args.preset, "--family", args.family, "--repeat", str(args.repeat),
          "--ref-concepts", str(args.ref_concepts), "--ref-encodes", str(args.ref_encodes),
          "--seed", str(args.seed), "--max-temp-gib", str(args.max_temp_gib),
          "--precision", args.precision, "--mi-mode", args.mi_mode]
  if args.matrix_batch is not None:
    argv += ["--matrix-batch", str(args.matrix_batch)]
  if args.ref_rows is not None:
    argv += ["--ref-rows", str(args.ref_rows)]
  if not args.reference:
    argv.append("--no-reference")
  if not args.profile:
    argv.append("--no-profile")
  if not args.compare_solvers:
    argv.append("--no-solver-comparison")
  return argv


def summary(record: dict[str, Any]) -> str:
  if "error" in record:
    return f"N={record['concepts']} K={record.get('sets')}: FAILED {record['error']}"
  if record["kind"] == "sets":
    return (f"N={record['concepts']} K={record['sets']}: batched {record['batched_s']:.2f} s, "
            f"sequential {record['sequential_s']:.2f} s "
            f"({record['speedup_batched']:.2f}x), peak {record['peak_rss_mib']:.0f} MiB")
  line = (f"N={record['concepts']}: ours total {record['ours_total_s']:.2f} s (encode "
          f"{record['ours_encode_s']:.2f}, stats {record['ours_statistics_s']:.2f}, solve "
          f"{record['ours_solve_s']:.2f}; compile {record['ours_compile_s']:.1f}), "
          f"peak {record['peak_rss_mib']:.0f} MiB")
  if "reference_total_s" in record:
    line += (f"; reference {record['reference_total_s']:.0f} s released "
             f"({record['speedup_total']:.0f}x), {record['reference_hoisted_total_s']:.0f} s "
             f"hoisted ({record['speedup_total_hoisted']:.0f}x), solve "
             f"{record['reference_solve_s']:.1f} s ({record['speedup_solve']:.0f}x)")
    if "speedup_linear_solve" in record:
      line += (f", step-6 solves {record['reference_linear_solve_s']:.1f} s "
               f"({record['speedup_linear_solve']:.0f}x)")
  return line


def main(argv=None) -> list[dict[str, Any]]:
  args = parse(argv)
  if args.precision == "float64":
    precision.enable_x64()  # before this process makes any array
  if args.worker:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: stacks
    n, num_sets = args.worker
    record = run_config(args, n, num_sets or None)
    args.json.write_text(json.dumps(record, indent=1))
    return [record]
  command = "python scripts/bench_edit.py " + shlex.join(
      sys.argv[1:] if argv is None else list(argv))
  configs = ([(n, None) for n in args.concepts] if args.sets is None
             else [(n, k) for n in args.concepts for k in args.sets])
  records = []
  for n, num_sets in configs:
    if args.in_process:
      record = run_config(args, n, num_sets)
    else:
      with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "record.json"
        last = ""
        with subprocess.Popen(_worker_argv(args, n, num_sets, out), cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) as proc:
          for line in proc.stderr:  # pass progress through, keep the last error line
            sys.stderr.write(line)
            if line.strip() and not line.startswith("["):
              last = line.strip()
        record = (json.loads(out.read_text()) if proc.returncode == 0 and out.exists()
                  else {"concepts": n, "sets": num_sets,
                        "error": f"worker exited with status {proc.returncode}: {last}"})
    record["command"] = command
    records.append(record)
    print(summary(record), flush=True)
    if args.json:
      args.json.parent.mkdir(parents=True, exist_ok=True)
      args.json.write_text(json.dumps({"command": command, "results": records}, indent=1))
  return records


if __name__ == "__main__":
  main()
