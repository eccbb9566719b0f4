"""The closed-form edit of cross-attention key/value projections.

Data flow: `ConceptInputs` -> `concept_statistics` (the text-side sums the
method needs, once per call, as a typed pytree) -> one function per method
(`edit_scapre`, `edit_small`, `edit_uce`: probes, solve, proximal step) ->
edited kernels. `edit_in_shape_groups` is the one loop that groups kernels
by shape, dispatches one compiled call per group and checks the results, for
`edit_projections` here and `sets.edit_sets`. Kernels come in Flax
orientation (d_in, d_out); the math runs on W = kernel.T as in
docs/algorithm.md, in float32, or float64 where the kernel is float64
(`precision.compute_dtype`; `precision.cast` the kernels and inputs for a
float64 edit, docs/reproducibility.md).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scapre_jax._src.typing import Array, Float

from scapre_jax._src import probes, solvers, spectral, targets
from scapre_jax.config import EditConfig
from scapre_jax.inputs import ConceptInputs
from scapre_jax import precision
from scapre_jax.errors import NonFiniteWeightsError
from scapre_jax.precision import compute_dtype


def _name_hash(name: str) -> int:
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


def matrix_key(key: Array, name: str) -> Array:
  """The key `edit_projections` gives the matrix called `name`."""
  return jax.random.fold_in(key, _name_hash(name))


@jax.jit
def _fold_in_each(key: Array, data: Array) -> Array:
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, data)


def matrix_keys(key: Array, names) -> Array:
  """`matrix_key(key, name)` of every name, stacked, in one dispatch."""
  return _fold_in_each(key, np.array([_name_hash(n) for n in names], np.uint32))


def preserve_scale(config: EditConfig, inputs: ConceptInputs) -> Array:
  """gamma: the configured value, or max(0.1, 1 / (1 + k)) for k preserve
  prompts, not counting the "" that `config.preserve_empty` puts first: UCE's
  train_erase.py takes max(0.1, 1 / len(retain)) of its retain list, "" plus
  the k prompts given (docs/algorithm.md "UCE baseline")."""
  if config.preserve_scale is not None:
    return jnp.asarray(config.preserve_scale)
  count = jnp.sum(jnp.any(inputs.preserve_mask, axis=-1))
  if config.preserve_empty:
    count = jnp.maximum(count - 1, 0)
  return jnp.maximum(0.1, 1.0 / (1.0 + count))


def _cast(inputs: ConceptInputs, dtype) -> ConceptInputs:
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, inputs)


# The statistics are pytrees: not type-checked under pytest, as JAX rebuilds
# them with any leaves (ShapeDtypeStruct under eval_shape; see ConceptInputs).
@typing.no_type_check
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FactorBasis:
  """The text rows Z_0 of G = c I + Z_0^T Z_0 (+ the ASED rows), compressed
  once per width by Z_0 = Q R (docs/algorithm.md "The factor form").

  Attributes:
    rows: R, (k', d_in) with k' = min(k, d_in).
    tokens: the token rows' block of Q, (m, L, k').
    weight_coeffs: (d_in, k'): H_0 Q = (value part) + W @ weight_coeffs,
      -(Z_X^T Q_X + C^T Q_C).
    shift_coeffs: (d_in, k'), technique "replace" only: without the MI mask
      H_0 Q = W @ shift_coeffs, sqrt(eta) (Y - X)^T Q_X - C^T Q_C, each token's
      difference taken in the text.
  """

  rows: Array
  tokens: Array
  weight_coeffs: Array
  shift_coeffs: Array | None


@typing.no_type_check
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UCEStatistics:
  """Text-side sums of the UCE solve, shared by every matrix of one width
  (docs/algorithm.md "Per-matrix terms", "UCE baseline"); each (d_in, d_in).

  Attributes:
    xx: S = sum_j X_j^T X_j.
    preserve: Q = gamma sum_k P_k^T P_k.
    shift: sum_j (Y_j - X_j)^T X_j, the differences taken before the
      product (technique "replace"; None for "tensor", whose targets need W).
  """

  xx: Array
  preserve: Array
  shift: Array | None
  factor: FactorBasis | None


@typing.no_type_check
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SmallStatistics(UCEStatistics):
  """The UCE sums plus C^T C and, with the released --svd, the spectral
  residual C_res C_res^T (docs/algorithm.md "Small-scale solver")."""

  cct: Array
  residual: Array | None


@typing.no_type_check
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaPreStatistics(UCEStatistics):
  """The UCE sums plus C^T C, the projector basis U_r (Pi = U_r U_r^T) and,
  with ASED on, U diag(1 - gate) U^T and its factor rows
  diag(sqrt(1 - gate)) U^T (docs/algorithm.md "Large-scale solver", "The
  factor form")."""

  cct: Array
  projector_basis: Array
  ased: Array | None
  ased_rows: Array | None


def _shared_sums(inputs: ConceptInputs, config: EditConfig) -> dict[str, Array | None]:
  mask = inputs.seq_mask & inputs.concept_mask[:, None]
  return dict(
      xx=targets.cross_covariance(inputs.old_seqs, inputs.old_seqs, mask),
      preserve=preserve_scale(config, inputs).astype(inputs.old_seqs.dtype)
      * targets.cross_covariance(inputs.preserve_seqs, inputs.preserve_seqs,
                                 inputs.preserve_mask),
      shift=(targets.cross_covariance(inputs.new_seqs - inputs.old_seqs, inputs.old_seqs, mask)
             if config.technique == "replace" else None))


def _cct(inputs: ConceptInputs) -> Array:
  vecs = jnp.where(inputs.concept_mask[:, None], inputs.concept_vecs, 0)
  return targets.matmul(vecs.T, vecs)


def _basis_and_gate(inputs: ConceptInputs, config: EditConfig):
  basis = spectral.concept_basis(inputs.concept_vecs, inputs.concept_mask)
  gate = spectral.spectral_gate(basis, temperature=config.spectral_temperature,
                                power=config.spectral_power)
  return basis, gate


def factor_basis(inputs: ConceptInputs, config: EditConfig) -> FactorBasis:
  """Z_0 = [sqrt(eta) X; sqrt(gamma) P; C] (C for the ScaPre solvers only),
  masked rows zero, and its QR factorisation (docs/algorithm.md "The factor
  form")."""
  d_in = inputs.d_in
  dtype = inputs.old_seqs.dtype
  mask = (inputs.seq_mask & inputs.concept_mask[:, None])[..., None]
  m, length = inputs.old_seqs.shape[:2]
  root_eta = jnp.sqrt(jnp.asarray(config.erase_scale, dtype))
  old = jnp.where(mask, inputs.old_seqs, 0).reshape(-1, d_in)
  gamma = preserve_scale(config, inputs).astype(dtype)
  preserve = jnp.where(inputs.preserve_mask[..., None], inputs.preserve_seqs, 0)
  blocks = [root_eta * old, jnp.sqrt(gamma) * preserve.reshape(-1, d_in)]
  concepts = None
  if config.method != "uce":
    concepts = jnp.where(inputs.concept_mask[:, None], inputs.concept_vecs, 0)
    blocks.append(concepts)
  q, r = jnp.linalg.qr(jnp.concatenate(blocks))
  tokens = q[:m * length]
  concept_part = 0 if concepts is None else targets.matmul(concepts.T, q[q.shape[0] - m:])
  weight_coeffs = -root_eta * targets.matmul(old.T, tokens) - concept_part
  shift_coeffs = None
  if config.technique == "replace":
    new = jnp.where(mask, inputs.new_seqs, 0).reshape(-1, d_in)
    shift_coeffs = root_eta * targets.matmul((new - old).T, tokens) - concept_part
  return FactorBasis(r, tokens.reshape(m, length, -1), weight_coeffs, shift_coeffs)


def uses_factor_form(config: EditConfig) -> bool:
  """Whether the edit is solved in the factor form (docs/algorithm.md "The
  factor form"): always, but for the small-scale solver's spectral residual,
  whose right-hand side term is not a combination of the text rows."""
  return not (config.method == "scapre-small" and config.spectral_residual)


def _factor(inputs: ConceptInputs, config: EditConfig) -> FactorBasis | None:
  return factor_basis(inputs, config) if uses_factor_form(config) else None


def uce_statistics(inputs: ConceptInputs, config: EditConfig) -> UCEStatistics:
  return UCEStatistics(**_shared_sums(inputs, config), factor=_factor(inputs, config))


def small_statistics(inputs: ConceptInputs, config: EditConfig) -> SmallStatistics:
  residual = None
  if config.spectral_residual:
    basis, gate = _basis_and_gate(inputs, config)
    residual = spectral.residual_projector(
        basis, inputs.concept_vecs, inputs.concept_mask, gate)
  return SmallStatistics(**_shared_sums(inputs, config), factor=_factor(inputs, config),
                         cct=_cct(inputs), residual=residual)


def scapre_statistics(inputs: ConceptInputs, config: EditConfig) -> ScaPreStatistics:
  basis, gate = _basis_and_gate(inputs, config)
  return ScaPreStatistics(
      **_shared_sums(inputs, config), factor=_factor(inputs, config), cct=_cct(inputs),
      # Pi as its basis U_r (Pi = U_r U_r^T): the Woodbury solve works in it.
      projector_basis=spectral.projector_basis(basis, rtol=config.projector_rtol),
      ased=spectral.ased_direction(basis, gate) if config.ased else None,
      ased_rows=spectral.ased_rows(basis, gate) if config.ased else None)


Statistics = UCEStatistics | SmallStatistics | ScaPreStatistics


def probe_noise(key: Array, inputs: ConceptInputs, config: EditConfig,
                dtype=jnp.float32) -> probes.ProbeNoise:
  """The probe noise of one matrix (docs/algorithm.md "Probe noise")."""
  return probes.draw_probe_noise(
      key, inputs.num_concepts, inputs.d_in, num_pos=config.mi_num_pos,
      entropy_samples=config.entropy_samples, dtype=dtype)


def row_weights(weight, inputs: ConceptInputs, noise: probes.ProbeNoise,
                 config: EditConfig) -> Array | None:
  """r_j of every concept (docs/algorithm.md "MI soft mask"), or None when
  the mask is off."""
  if not config.mi_mask:
    return None
  return probes.mi_soft_mask(
      weight, inputs.concept_vecs, inputs.empty_vec, noise.mi_pos, noise.mi_neg,
      inputs.concept_mask, sigma=config.noise_sigma,
      temperature=config.mi_temperature, power=config.p, mode=config.mi_mode)


def correction_sum(weight, inputs: ConceptInputs, stats: UCEStatistics,
                   config: EditConfig) -> Array:
  """V - eta W S without the MI mask: eta sum_j (V_j^T - W X_j^T) X_j, formed
  without the cancellation of the two terms (docs/algorithm.md "The
  correction form")."""
  eta = config.erase_scale
  if config.technique == "replace":
    # V_j = Y_j W^T, so the sum is W sum_j (Y_j - X_j)^T X_j.
    return eta * targets.matmul(weight, stats.shift)
  mask, values = _target_values(weight, inputs, config)
  return eta * targets.shift_sum(weight, values, inputs.old_seqs, mask)


def value_sum(weight, inputs: ConceptInputs, row_weights, config: EditConfig) -> Array:
  """V = eta sum_j diag(r_j) A_j with the MI mask's row weights r_j."""
  _, values = _target_values(weight, inputs, config)
  return config.erase_scale * targets.weighted_value_sum(row_weights, values, inputs.old_seqs)


def _target_values(weight, inputs: ConceptInputs, config: EditConfig):
  """(row mask, V_j of every real concept), padding concepts masked out."""
  mask = inputs.seq_mask & inputs.concept_mask[:, None]
  return mask, targets.target_values(weight, inputs.old_seqs, inputs.new_seqs, mask,
                                     technique=config.technique)


def factor_coefficients(weight, inputs: ConceptInputs, stats: UCEStatistics,
                        config: EditConfig, row_weights) -> Array:
  """H_0 Q, (d_out, k'): B - W G = (H_0 Q) R without the ASED and projector
  terms (docs/algorithm.md "The factor form"). H_0 holds sqrt(eta)
  (r_j V_j - X_j W^T) per token row (r_j = 1 without the MI mask), 0 per
  preserve row (W Q is on both sides) and -W c_j per concept row."""
  factor = stats.factor
  if row_weights is None and config.technique == "replace":
    return targets.matmul(weight, factor.shift_coeffs)
  _, values = _target_values(weight, inputs, config)
  if row_weights is not None:
    values = row_weights[:, None, :] * values
  root_eta = jnp.sqrt(jnp.asarray(config.erase_scale, weight.dtype))
  return (root_eta * targets.einsum("mlo,mlr->or", values, factor.tokens)
          + targets.matmul(weight, factor.weight_coeffs))


def row_entropy(weight, inputs: ConceptInputs, noise: probes.ProbeNoise,
                config: EditConfig) -> Array:
  """e of every row (docs/algorithm.md "Entropy factor")."""
  return probes.entropy_factor(
      weight, inputs.concept_vecs, noise.entropy, inputs.concept_mask,
      sigma=config.noise_sigma, bins=config.entropy_bins)


def edit_uce(weight: Float[Array, "d_out d_in"], inputs: ConceptInputs,
             stats: UCEStatistics, key: Array, config: EditConfig
             ) -> Float[Array, "d_out d_in"]:
  """docs/algorithm.md "UCE baseline": (lambda W + V + W Q)(lambda I + eta S + Q)^{-1}.
  No probes (the MI mask setting is ignored); `key` is unused."""
  del key
  if uses_factor_form(config):  # "The factor form"
    return weight + solvers.solve_factored(
        stats.factor.rows, factor_coefficients(weight, inputs, stats, config, None), config.lamb)
  eye = jnp.eye(weight.shape[1], dtype=weight.dtype)
  correction = correction_sum(weight, inputs, stats, config)
  return weight + solvers.solve_spd_right(
      correction, config.lamb * eye + config.erase_scale * stats.xx + stats.preserve)


def edit_small(weight: Float[Array, "d_out d_in"], inputs: ConceptInputs,
               stats: SmallStatistics, key: Array, config: EditConfig
               ) -> Float[Array, "d_out d_in"]:
  """docs/algorithm.md "Small-scale solver": one solve, entropy rollback."""
  noise = probe_noise(key, inputs, config, weight.dtype)
  weights = row_weights(weight, inputs, noise, config)
  if uses_factor_form(config):  # "The factor form"
    solved = weight + solvers.solve_factored(
        stats.factor.rows, factor_coefficients(weight, inputs, stats, config, weights),
        config.lamb)
  else:
    solved = _small_gram_solve(weight, inputs, stats, config, weights)
  keep = (config.alpha_min + (1 - config.alpha_min) * row_entropy(weight, inputs, noise, config)
          )[:, None]
  return keep * solved + (1 - keep) * weight


def _small_gram_solve(weight, inputs: ConceptInputs, stats: SmallStatistics,
                      config: EditConfig, weights) -> Array:
  """The small-scale solve with G formed: W' G = B = lambda W + V + W Q -
  eta_res W C_res C_res^T (the spectral residual's only form)."""
  eta = config.erase_scale
  eye = jnp.eye(weight.shape[1], dtype=weight.dtype)
  gram = config.lamb * eye + stats.cct + eta * stats.xx + stats.preserve
  eta_res = eta if config.residual_scale is None else config.residual_scale
  if weights is None:  # solved for W' - W ("The correction form")
    cross = stats.cct + eta_res * stats.residual if config.spectral_residual else stats.cct
    correction = correction_sum(weight, inputs, stats, config) - targets.matmul(weight, cross)
    return weight + solvers.solve_spd_right(correction, gram)
  rhs = (config.lamb * weight + value_sum(weight, inputs, weights, config)
         + targets.matmul(weight, stats.preserve))
  if config.spectral_residual:
    rhs = rhs - eta_res * (targets.matmul(weight, stats.residual))
  return solvers.solve_spd_right(rhs, gram)


def edit_scapre(weight: Float[Array, "d_out d_in"], inputs: ConceptInputs,
                stats: ScaPreStatistics, key: Array, config: EditConfig
                ) -> Float[Array, "d_out d_in"]:
  """docs/algorithm.md "Large-scale solver", steps 1-8."""
  eta = config.erase_scale
  noise = probe_noise(key, inputs, config, weight.dtype)
  weights = row_weights(weight, inputs, noise, config)
  spread = jnp.clip(1 - row_entropy(weight, inputs, noise, config), 0, 1)  # h
  mu = jnp.mean(spread)
  lam_prox = config.lamb + mu
  alpha = (jnp.full(weight.shape[:1], eta, weight.dtype) if weights is None
           else eta * jnp.max(weights, axis=0))
  basis = stats.projector_basis
  if uses_factor_form(config):  # "The factor form"
    coeffs = factor_coefficients(weight, inputs, stats, config, weights)
    solved = weight + scapre_factor_change(weight, stats, coeffs, alpha, mu, config)
  elif weights is None:  # solved for W_e - W ("The correction form")
    correction = scapre_correction(weight, inputs, stats, alpha, mu, config)
    solved = weight + solve_scapre_system(scapre_gram(stats, config, mu), basis, correction, alpha)
  else:
    rhs = (lam_prox * weight + value_sum(weight, inputs, weights, config)
           + targets.matmul(weight, stats.preserve))
    solved = solve_scapre_system(scapre_gram(stats, config, mu), basis, rhs, alpha)
  edited = solvers.bures_prox(weight, solved, mu=mu, lam_prox=lam_prox,
                              iters=config.bures_iters)
  if config.egbr:
    edited = solvers.egbr(weight, edited, spread)
  return edited


@dataclasses.dataclass(frozen=True)
class _Method:
  statistics: Callable[[ConceptInputs, EditConfig], Statistics]
  statistics_type: type
  edit: Callable[..., Array]


# One entry per `EditConfig.method`: its statistics builder and its edit.
_METHODS: dict[str, _Method] = {
    "scapre": _Method(scapre_statistics, ScaPreStatistics, edit_scapre),
    "scapre-small": _Method(small_statistics, SmallStatistics, edit_small),
    "uce": _Method(uce_statistics, UCEStatistics, edit_uce),
}


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def concept_statistics(inputs: ConceptInputs, config: EditConfig, dtype=jnp.float32
                       ) -> Statistics:
  """The text-side terms `config.method` needs, shared by every matrix of
  one context width, computed in `dtype`."""
  return _METHODS[config.method].statistics(_cast(inputs, dtype), config)


def edit_weight(
    weight: Float[Array, "d_out d_in"],
    inputs: ConceptInputs,
    stats: Statistics,
    key: Array,
    config: EditConfig,
) -> Float[Array, "d_out d_in"]:
  """One edited matrix W' (PyTorch orientation) by the configured method;
  `stats` from `concept_statistics` with the same config."""
  method = _METHODS[config.method]
  if not isinstance(stats, method.statistics_type):
    raise ValueError(
        f"method {config.method!r} needs {method.statistics_type.__name__} (from "
        f"concept_statistics with the same config), got {type(stats).__name__}")
  return method.edit(weight, _cast(inputs, weight.dtype), stats, key, config)


def scapre_factor_change(weight, stats: ScaPreStatistics, coeffs, alpha, mu,
                         config: EditConfig) -> Array:
  """W_e - W of large-scale step 6 in the factor form, from the coefficients
  of `factor_coefficients`: the ASED rows of this matrix's mu (mu R =
  (sqrt(mu) A)^T (sqrt(mu) A)) are stacked under R, then
  `solvers.solve_factored_row_sylvester` (docs/algorithm.md "The factor form")."""
  rows = stats.factor.rows
  if config.ased:
    ased = jnp.sqrt(mu) * stats.ased_rows
    rows = jnp.concatenate([rows, ased])
    coeffs = jnp.concatenate([coeffs, -targets.matmul(weight, ased.T)], axis=1)
  basis = stats.projector_basis
  return solvers.solve_factored_row_sylvester(
      rows, coeffs, config.lamb + mu, basis, alpha,
      -alpha[:, None] * targets.matmul(weight, basis))


def scapre_gram(stats: ScaPreStatistics, config: EditConfig, mu) -> Array:
  """G of large-scale step 5 for entropy mean `mu` (a scalar, or any shape
  that broadcasts against (d_in, d_in)):
  (lambda + mu) I + R + CCt + eta S + preserve, with R = mu ASED when on."""
  eye = jnp.eye(stats.cct.shape[-1], dtype=stats.cct.dtype)
  gram = (config.lamb + mu) * eye + stats.cct + config.erase_scale * stats.xx + stats.preserve
  if config.ased:
    gram = gram + mu * stats.ased
  return gram


def scapre_correction(weight, inputs: ConceptInputs, stats: ScaPreStatistics,
                      alpha, mu, config: EditConfig) -> Array:
  """B - W G - diag(alpha) W Pi of large-scale step 6 without the MI mask,
  the right-hand side whose solution is W_e - W (docs/algorithm.md "The
  correction form")."""
  cross = stats.cct + mu * stats.ased if config.ased else stats.cct
  basis = stats.projector_basis
  return (correction_sum(weight, inputs, stats, config)
          - targets.matmul(weight, cross)
          - alpha[:, None] * targets.matmul(targets.matmul(weight, basis), basis.T))


def solve_scapre_system(gram, basis, rhs, alpha):
  """w_i (G + alpha_i U U^T) = b_i: one Cholesky factorisation of G and
  Woodbury in the concept basis U, at every rank (see
  `solvers.solve_row_sylvester_woodbury` for why not two eigendecompositions)."""
  return solvers.solve_row_sylvester_woodbury(gram, basis, rhs, alpha)


def edit_stack(kernels: Array, keys: Array, inputs: ConceptInputs, stats: Statistics,
               config: EditConfig, matrix_batch: int | None = None) -> Array:
  """`edit_weight` of every Flax kernel of a (n, d_in, d_out) stack: vmapped,
  or `lax.map` over `matrix_batch` matrices at a time (same results)."""
  def one(kernel, key):
    weight = kernel.T.astype(compute_dtype(kernel.dtype))
    return edit_weight(weight, inputs, stats, key, config).T.astype(kernel.dtype)

  if matrix_batch is None or matrix_batch >= kernels.shape[0]:
    return jax.vmap(one)(kernels, keys)
  return jax.lax.map(lambda args: one(*args), (kernels, keys), batch_size=matrix_batch)


@functools.partial(jax.jit, static_argnames=("config", "matrix_batch"))
def edit_kernel_stack(kernels, keys, inputs, stats, config, matrix_batch=None):
  """One compiled call per shape group: stacks the kernels, edits them and
  hands back each matrix and whether it is finite, so the host dispatches
  once and syncs once per group."""
  edited = edit_stack(jnp.stack(kernels), keys, inputs, stats, config, matrix_batch)
  return tuple(edited), jnp.all(jnp.isfinite(edited), axis=(1, 2))


def default_matrix_batch(matrix_batch: int | None) -> int | None:
  """`matrix_batch` as given, or the platform default when None: one matrix
  at a time on CPU, all at once elsewhere.

  On CPU the per-matrix work is large enough to fill the cores alone, and
  jaxlib 0.10.2's CPU runtime wedged (every worker idle, the result never
  ready) on the vmapped 32-matrix SD-1.5 edit in most of our runs on 2-core
  machines; the sequential `lax.map` form ran through (BENCHMARKS.md).
  """
  if matrix_batch is not None:
    if not isinstance(matrix_batch, int) or matrix_batch < 1:
      raise ValueError(f"matrix_batch must be a positive int, got {matrix_batch!r}")
    return matrix_batch
  return 1 if jax.default_backend() == "cpu" else None


def shape_groups(kernels: Mapping[str, Array]) -> dict[tuple, list[str]]:
  """Names of the kernels by (shape, dtype): one compiled call per group."""
  groups: dict[tuple, list[str]] = {}
  for name, kernel in kernels.items():
    groups.setdefault((kernel.shape, kernel.dtype), []).append(name)
  return groups


def _nonfinite_names(finite: list[tuple[list[str], Array]]) -> list[str]:
  """Names whose flag is False in any row, from (names, flags[..., names])
  pairs of every group, fetched in one host sync; in group order."""
  flags = jax.device_get([ok for _, ok in finite])
  bad = [n for (names, _), ok in zip(finite, flags)
         for n, good in zip(names, np.reshape(ok, (-1, len(names))).all(axis=0)) if not good]
  return list(dict.fromkeys(bad))


def _check_kernel(name: str, kernel, d_in: int) -> None:
  if kernel.ndim != 2:
    raise ValueError(f"kernel {name!r} must be 2-D (d_in, d_out), got shape {kernel.shape}")
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(f"kernel {name!r} must be floating point, got {kernel.dtype}")
  if kernel.shape[0] != d_in:
    raise ValueError(
        f"kernel {name!r} has input width {kernel.shape[0]} but the concepts are "
        f"encoded with width {d_in}; the text encoder does not match this model")


def check_request(kernels: Mapping[str, Array], sets: Sequence[ConceptInputs],
                  config: EditConfig) -> dict[str, Array]:
  """The structural checks of every entry point, before any tracing: the
  config, each concept set, and each kernel against the sets' text width.
  Returns the kernels as arrays."""
  if not isinstance(config, EditConfig):
    raise ValueError(f"config must be an EditConfig, got {type(config).__name__}")
  config.validate()
  if not sets:
    raise ValueError("no concept sets to edit")
  for inputs in sets:
    if not isinstance(inputs, ConceptInputs):
      raise ValueError(f"inputs must be ConceptInputs, got {type(inputs).__name__}")
    inputs.validate()
  widths = sorted({inputs.d_in for inputs in sets})
  if len(widths) != 1:
    raise ValueError(f"all sets must be encoded with one text encoder; widths {widths}")
  if not kernels:
    raise ValueError("no kernels to edit")
  if any(np.dtype(getattr(k, "dtype", np.float32)) == np.float64 for k in kernels.values()):
    # Without x64, jnp.asarray would truncate them to float32 without a word.
    precision.require("float64")
  kernels = {name: jnp.asarray(k) for name, k in kernels.items()}
  for name, kernel in kernels.items():
    _check_kernel(name, kernel, widths[0])
  return kernels


GroupEdit = Callable[[list[str], tuple[Array, ...], Statistics], tuple[Any, Array]]


def edit_in_shape_groups(kernels: Mapping[str, Array], statistics: Callable[[Any], Statistics],
                         edit_group: GroupEdit) -> list[tuple[list[str], Any]]:
  """The loop of `edit_projections` and `sets.edit_sets`: for each group of
  kernels of one shape and dtype, the text statistics of its compute dtype
  (`statistics(dtype)`, built once per dtype) and one compiled call
  `edit_group(names, kernels, stats) -> (edited, finite flags)`; then one
  host sync for every group's flags.

  Returns (names, edited) per group. Raises NonFiniteWeightsError naming the
  matrices whose result is not finite.
  """
  stats_by_dtype: dict[Any, Statistics] = {}
  results, finite = [], []
  for (_, dtype), names in shape_groups(kernels).items():
    ct = compute_dtype(dtype)
    if ct not in stats_by_dtype:
      stats_by_dtype[ct] = statistics(ct)
    edited, ok = edit_group(names, tuple(kernels[n] for n in names), stats_by_dtype[ct])
    results.append((names, edited))
    finite.append((names, ok))
  bad = _nonfinite_names(finite)
  if bad:
    raise NonFiniteWeightsError(
        f"the edit produced non-finite weights for {len(bad)} matrices: {bad[:5]}; "
        "check the inputs and settings (erase_scale, lamb, noise_sigma)")
  return results


def _edit_projections(kernels, inputs, config, keys_for, matrix_batch):
  kernels = check_request(kernels, [inputs], config)
  batch = default_matrix_batch(matrix_batch)

  def edit_group(names, stack, stats):
    return edit_kernel_stack(stack, keys_for(names), inputs, stats, config, batch)

  results = edit_in_shape_groups(
      kernels, lambda dtype: concept_statistics(inputs, config, dtype=dtype), edit_group)
  edited = {name: e for names, group in results for name, e in zip(names, group)}
  return {name: edited[name] for name in kernels}


def edit_projection(kernel: Array, inputs: ConceptInputs, config: EditConfig, *,
                    key: Array) -> Array:
  """Edits one Flax kernel (d_in, d_out) with probe key `key`; returns the
  same shape and dtype."""
  return _edit_projections({"kernel": kernel}, inputs, config,
                           lambda names: jnp.stack([key]), None)["kernel"]


def edit_projections(kernels: Mapping[str, Array], inputs: ConceptInputs,
                     config: EditConfig, *, key: Array, matrix_batch: int | None = None
                     ) -> dict[str, Array]:
  """Edits a dict of named Flax kernels; returns a dict with the same names.

  Matrices of one shape and dtype are solved together in one compiled call.
  Matrix `name` draws its probe noise from `matrix_key(key, name)`, so the
  result for one name equals `edit_projection(kernel, key=matrix_key(key, name))`.
  `matrix_batch` bounds how many matrices run at once (memory), without
  changing results; None picks `default_matrix_batch`. Raises
  NonFiniteWeightsError if any result is not finite.
  """
  return _edit_projections(kernels, inputs, config,
                           lambda names: matrix_keys(key, names), matrix_batch)
