"""`scapre-jax verify`: recompute an edit file with the PyTorch reference.

An edit file records what made it: the prompts, guides and preserve prompts,
the EditConfig, the probe seed and the precision (`io.edit_metadata`). This
module recomputes every matrix of the file from the base model with the
literal PyTorch transcription of the released procedure
(`scapre_jax.reference`), fed the same probe noise as the engine
(`probes.draw_probe_noise` with `edit.matrix_key`), the prompts encoded by
transformers' PyTorch CLIP text encoder; then runs diffusers' PyTorch UNet
and the Flax UNet on the written weights with the same input. Nothing here
uses the JAX edit engine: agreement is evidence that the written weights are
the released procedure's.

Tolerances (docs/reproducibility.md):

- float64 edits: the reference runs in float64; each written weight must be
  the reference weight rounded to the file's dtype, up to 1e-10 of the
  largest weight (`FLOAT64_TOL`).
- float32 edits: the reference runs in float32, as the released code does.
  Two float32 solves of the same system each lie within about cond(G) * u of
  the exact answer (u = 2**-24, G the step-5 matrix, or mat2 of the small
  solvers, whose condition number is measured in float64 per matrix), so the
  relative Frobenius distance of the two edits may be
  `FLOAT32_FACTOR * cond(G) * u`: 2 for the two solves, and room for the two
  float32 text encoders feeding them.
- The UNets run in float64 on both sides with the written weights; their
  outputs must agree to `UNET_TOL` of the largest output (float32 timestep
  frequencies in both set that floor), after aligning the two places
  where diffusers' Flax UNet computes something else than its PyTorch twin
  (tanh-GELU in GEGLU, GroupNorm eps 1e-5 in Transformer2DModel).

Needs torch (pip install 'scapre-jax[torch]') and JAX's 64-bit mode.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from scapre_jax import edit, io, models, tiny
from scapre_jax import precision as precision_lib
from scapre_jax._src import probes
from scapre_jax.config import EditConfig, VerifyConfig

FLOAT64_TOL = 1e-10
FLOAT32_FACTOR = 8.0
UNIT_ROUNDOFF_32 = 2.0 ** -24
# Both diffusers UNets (PyTorch and Flax) form the timestep embedding's
# frequencies in float32 whatever the model dtype, with different formulas, so
# float64 runs agree to about 1e-8 of the output, not 1e-10 (measured 3e-8 on
# the tiny model). A weight in the wrong place moves the output by O(1e-2).
UNET_TOL = 1e-6
TORCH_MISSING = ("PyTorch is not installed, and verify runs the PyTorch reference: "
                 "pip install 'scapre-jax[torch]'")


@dataclasses.dataclass(frozen=True)
class MatrixCheck:
  """One matrix: its distance to the reference and what is allowed."""

  name: str  # diffusers PyTorch name
  shape: tuple[int, int]  # (d_out, d_in)
  error: float  # float64: max excess over rounding / max |ref|; float32: relative Frobenius
  tolerance: float
  condition: float  # cond(G) measured in float64

  @property
  def ok(self) -> bool:
    return bool(self.error <= self.tolerance)


@dataclasses.dataclass(frozen=True)
class VerifyResult:
  precision: str  # the edit's: "float32" or "float64"
  matrices: tuple[MatrixCheck, ...]
  unet_error: float | None  # relative max distance of the two UNets' outputs
  mi_mode: str

  @property
  def ok(self) -> bool:
    unet_ok = self.unet_error is None or self.unet_error <= UNET_TOL
    return all(m.ok for m in self.matrices) and unet_ok


def _torch():
  try:
    import torch
  except ImportError:
    raise ValueError(TORCH_MISSING) from None
  return torch


def _check_x64() -> None:
  if not jax.config.jax_enable_x64:
    raise ValueError("verify runs the Flax UNet in float64 and needs JAX's 64-bit mode: "
                     "set JAX_ENABLE_X64=1 or call jax.config.update('jax_enable_x64', True) "
                     "first (the scapre-jax CLI does)")


def edit_precision(meta: dict, kernels: dict) -> str:
  """The precision an edit was computed in: recorded, else float64 for
  float64 weights, else float32."""
  recorded = meta.get("precision")
  if recorded is not None:
    if recorded not in ("float32", "float64"):
      raise ValueError(f"edit file records an unknown precision {recorded!r}")
    return recorded
  return "float64" if all(k.dtype == np.float64 for k in kernels.values()) else "float32"


def _request(meta: dict, path) -> tuple[list[str], list[str], list[str], EditConfig, int]:
  missing = [k for k in ("prompts", "guides", "config", "seed") if k not in meta]
  if missing:
    raise ValueError(f"edit file {path} does not record {', '.join(missing)}; it was not "
                     "written by scapre-jax erase, or by a version too old to verify")
  prompts, guides = list(meta["prompts"]), list(meta["guides"])
  if len(guides) != len(prompts):
    raise ValueError(f"edit file {path} records {len(prompts)} prompts but "
                     f"{len(guides)} guides")
  config = EditConfig.from_dict(meta["config"])
  return prompts, guides, list(meta.get("preserve", [])), config, int(meta["seed"])


def encode_reference_inputs(model_dir: pathlib.Path, prompts, guides, preserve, dtype):
  """The text side of docs/algorithm.md with transformers' PyTorch CLIP text
  encoder, no attention mask (as the released code): (concept_vecs (m, d_in),
  empty_vec, X_j list, Y_j list, P_k list), torch tensors of `dtype`."""
  torch = _torch()
  from transformers import CLIPTextModel, CLIPTokenizer
  from scapre_jax import reference

  tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True)
  encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder", local_files_only=True)
  encoder = encoder.to(dtype).eval()
  seq_len = int(tokenizer.model_max_length)
  unique = sorted(set(prompts) | set(guides) | set(preserve) | {""})
  tokens = tokenizer(unique, padding="max_length", max_length=seq_len, truncation=True,
                     return_tensors="pt")
  # transformers builds CLIP's causal mask in the default dtype: float64
  # activations need a float64 default, or the mask's minimum overflows.
  previous = torch.get_default_dtype()
  torch.set_default_dtype(dtype)
  try:
    with torch.no_grad():
      hidden = encoder(tokens.input_ids).last_hidden_state.to(dtype)
  finally:
    torch.set_default_dtype(previous)
  index = {p: i for i, p in enumerate(unique)}
  length = tokens.attention_mask.sum(dim=1)
  embed = lambda p: hidden[index[p]]
  count = lambda p: int(length[index[p]])
  concept_vecs, old_seqs, new_seqs = [], [], []
  for o, g in zip(prompts, guides):
    _, _, s_old, e_old, s_new, e_new = reference.released_token_positions(
        count(o), count(g), seq_len=seq_len)
    concept_vecs.append(embed(o)[count(o) - 2])
    old_seqs.append(embed(o)[s_old:e_old])
    new_seqs.append(embed(g)[s_new:e_new])
  return (torch.stack(concept_vecs), embed("")[1], old_seqs, new_seqs,
          [embed(p) for p in preserve])


def reference_matrix_edit(kernel, name: str, key, encoded, config: EditConfig,
                          dtype) -> np.ndarray:
  """`reference.reference_edit` of one matrix in torch `dtype`, with the probe
  noise the engine draws for `name` under `key`.

  kernel: the original Flax kernel (d_in, d_out); encoded: the tuple of
  `encode_reference_inputs`. Returns W' (d_out, d_in), numpy of `dtype`.
  """
  torch = _torch()
  from scapre_jax import reference
  vecs, empty, old, new, kept = encoded
  weight = np.array(kernel, np.float32).T  # (d_out, d_in), writable for torch
  noise = probes.draw_probe_noise(
      edit.matrix_key(key, name), len(old), weight.shape[1],
      num_pos=config.mi_num_pos, entropy_samples=config.entropy_samples,
      dtype=jnp.float32)
  noise = {f: torch.from_numpy(np.array(getattr(noise, f))).to(dtype)
           for f in ("mi_pos", "mi_neg", "entropy")}
  cast = lambda t: t.to(dtype)
  with reference.precision(dtype), torch.no_grad():
    return reference.reference_edit(
        torch.from_numpy(weight).to(dtype), cast(vecs), cast(empty),
        [cast(x) for x in old], [cast(y) for y in new], config, noise,
        [cast(p) for p in kept]).numpy()


def system_condition(config: EditConfig, concept_vecs, old_seqs, preserve_seqs) -> float:
  """cond(A) in float64 of the matrix every solver inverts, less the parts
  that only add to it (mu I and the ASED term of the large-scale solver):
  A = lambda I + [CCt] + eta sum_j X_j^T X_j + gamma sum_k P_k^T P_k."""
  c = np.asarray(concept_vecs, np.float64)
  d_in = c.shape[1]
  gram = config.lamb * np.eye(d_in)
  if config.method != "uce":
    gram += c.T @ c
  for x in old_seqs:
    x = np.asarray(x, np.float64)
    gram += config.erase_scale * (x.T @ x)
  if preserve_seqs:
    gamma = (config.preserve_scale if config.preserve_scale is not None
             else max(0.1, 1.0 / (1 + len(preserve_seqs))))
    for p in preserve_seqs:
      p = np.asarray(p, np.float64)
      gram += gamma * (p.T @ p)
  eig = np.linalg.eigvalsh((gram + gram.T) / 2)
  return float(eig[-1] / eig[0])


def _excess_over_rounding(written: np.ndarray, want: np.ndarray) -> float:
  """max_i (|w_i - r_i| - |fl(r_i) - r_i|) / max |r|, fl = rounding to the
  written dtype: 0 when every written weight is the reference rounded once."""
  rounded = want.astype(written.dtype).astype(np.float64)
  excess = np.abs(written.astype(np.float64) - want) - np.abs(rounded - want)
  return float(max(excess.max(), 0.0) / np.abs(want).max())


def _flax_unet_output(model, kernels, sample, steps, context):
  f64 = lambda tree: jax.tree.map(
      lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
      tree)
  params = f64(models.replace_kernels(model.unet_params, kernels))
  module = models.build("unet", model.unet_config)
  module = module.clone(dtype=jnp.float64)
  out = module.apply({"params": params}, jnp.asarray(sample), jnp.asarray(steps),
                     jnp.asarray(context)).sample
  return np.asarray(out, np.float64)


def _torch_unet_output(model_dir, edit_file, sample, steps, context):
  torch = _torch()
  import torch.nn.functional as F
  from diffusers import UNet2DConditionModel
  from diffusers.models import activations
  from safetensors.torch import load_file

  unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", low_cpu_mem_usage=False,
                                              local_files_only=True)
  missing, unexpected = unet.load_state_dict(load_file(str(edit_file)), strict=False)
  if unexpected:
    raise ValueError(f"the edit file holds tensors the PyTorch UNet does not have: "
                     f"{unexpected[:5]}")
  unet = unet.double().eval()
  # The two places where diffusers' Flax UNet computes differently from its
  # PyTorch twin; aligned on this instance so the weights are what is compared.
  for name, module in unet.named_modules():
    if isinstance(module, activations.GEGLU):
      module.gelu = lambda gate: F.gelu(gate, approximate="tanh")
    if name.endswith(".norm") and isinstance(module, torch.nn.GroupNorm):
      module.eps = 1e-5
  with torch.no_grad():
    out = unet(torch.from_numpy(sample), torch.from_numpy(steps),
               torch.from_numpy(context)).sample
  return out.numpy()


def run(config: VerifyConfig, *,
        progress: Callable[[str], None] | None = None) -> VerifyResult:
  """`scapre-jax verify`: turns on JAX's 64-bit mode (which the float64
  reference and UNet check need: call it before other JAX work), then
  `verify_edit` of `config` (the built-in tiny model when it names none)."""
  precision_lib.enable_x64()
  model = config.model if config.model is not None else tiny.ensure_tiny_model()
  return verify_edit(model, config.edit, progress=progress, unet=config.unet)


def verify_edit(model_path, edit_file, *, progress: Callable[[str], None] | None = None,
                unet: bool = True) -> VerifyResult:
  """Recomputes every matrix of `edit_file` with the reference and compares
  (module docstring). Raises ValueError for a file made for another model."""
  torch = _torch()
  _check_x64()
  say = progress or (lambda _: None)
  edit_file = pathlib.Path(edit_file)
  written, meta = io.read_edit_file(edit_file)
  prompts, guides, preserve, config, seed = _request(meta, edit_file)
  precision = edit_precision(meta, written)
  model = models.load_model(model_path)
  if model.family not in ("sd1", "sd2"):
    raise ValueError(f"verify recomputes SD 1.x/2.x edits; {model.path} is "
                     f"{models.FAMILIES[model.family]}, which it does not support yet")
  io.check_fingerprint(edit_file, meta, model.fingerprint, model.path, action="verify")
  originals = models.cross_attention_kernels(model.unet_params, targets=config.targets)
  unknown = sorted(set(written) - set(originals))
  if unknown:
    raise ValueError(f"edit file {edit_file} holds matrices this model does not edit: "
                     f"{[models.torch_name(n) for n in unknown[:5]]}")

  tdtype = torch.float64 if precision == "float64" else torch.float32
  encoded = encode_reference_inputs(model.path, prompts, guides, preserve, torch.float64)
  vecs, _, old, _, kept = encoded
  condition = system_condition(config, vecs, old, kept)
  key = jax.random.key(seed)
  checks = []
  for name, kernel in written.items():
    want = reference_matrix_edit(originals[name], name, key, encoded, config,
                                 tdtype).astype(np.float64)
    got = kernel.T
    if precision == "float64":
      error, tol = _excess_over_rounding(got, want), FLOAT64_TOL
    else:
      error = float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want))
      tol = FLOAT32_FACTOR * condition * UNIT_ROUNDOFF_32
    checks.append(MatrixCheck(models.torch_name(name), tuple(got.shape), error, tol,
                              condition))
    say(f"verify: {checks[-1].name} {'ok' if checks[-1].ok else 'DIFFERS'}")

  unet_error = None
  if unet:
    rng = np.random.default_rng(0)
    cfg = model.unet_config
    size = cfg.get("sample_size", 8)
    sample = rng.standard_normal((1, cfg.get("in_channels", 4), size, size))
    steps = np.array([500])
    context = _context(old[0])
    ours = _flax_unet_output(model, written, sample, steps, context)
    theirs = _torch_unet_output(model.path, edit_file, sample, steps, context)
    unet_error = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
  return VerifyResult(precision, tuple(checks), unet_error, config.mi_mode)


def _context(rows) -> np.ndarray:
  """A (1, 77, d_in) float64 context: the first erased prompt's aligned
  rows, repeated to fill the sequence, so the edited projections matter."""
  rows = np.asarray(rows, np.float64)
  reps = -(-77 // rows.shape[0])
  return np.tile(rows, (reps, 1))[None, :77]


def format_result(result: VerifyResult, edit_file) -> str:
  """The per-matrix table, the tolerances and the PASS/FAIL line."""
  lines = [f"verify {edit_file}: {len(result.matrices)} matrices, edit computed in "
           f"{result.precision}, recomputed with the PyTorch reference in {result.precision}"]
  if result.precision == "float64":
    lines.append(f"tolerance: each written weight is the reference weight rounded to the "
                 f"file's dtype, up to {FLOAT64_TOL:g} of the largest weight")
    head = "excess/max|w|"
  else:
    lines.append(f"tolerance: relative Frobenius distance <= {FLOAT32_FACTOR:g} * cond(G) * "
                 f"2**-24 (two float32 solves of one system, cond measured in float64)")
    head = "rel. distance"
  width = max(len(m.name) for m in result.matrices)
  lines.append(f"{'matrix'.ljust(width)}  {'shape':>10}  {head:>13}  {'tolerance':>9}  "
               f"{'cond(G)':>9}")
  for m in result.matrices:
    shape = f"{m.shape[0]}x{m.shape[1]}"
    lines.append(f"{m.name.ljust(width)}  {shape:>10}  {m.error:13.3e}  {m.tolerance:9.2e}  "
                 f"{m.condition:9.3g}{'' if m.ok else '  FAIL'}")
  if result.unet_error is not None:
    lines.append(f"UNet (diffusers PyTorch vs Flax, float64, written weights): max "
                 f"difference {result.unet_error:.3e} of the largest output (tolerance "
                 f"{UNET_TOL:g}){'' if result.unet_error <= UNET_TOL else '  FAIL'}")
  bad = sum(not m.ok for m in result.matrices)
  if result.ok:
    lines.append(f"PASS: all {len(result.matrices)} matrices agree with the reference")
  else:
    what = [f"{bad} of {len(result.matrices)} matrices"] if bad else []
    if result.unet_error is not None and result.unet_error > UNET_TOL:
      what.append("the UNet outputs")
    lines.append(f"FAIL: {' and '.join(what)} differ beyond the tolerance")
  return "\n".join(lines)
