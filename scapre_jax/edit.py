"""The ScaPre edit of cross-attention key/value projections.

Data flow: `ConceptInputs` -> `concept_statistics` (text-side sums and the
spectral basis, once per call) -> `edit_weight` (per matrix: probes, solve,
proximal step) -> edited kernels. Kernels come in Flax orientation
(d_in, d_out); the math runs on W = kernel.T as in ALGORITHM.md, in float32,
or float64 where the kernel is float64.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from scapre_jax._src.typing import Array, Float

from scapre_jax._src import probes, solvers, spectral, targets
from scapre_jax.config import EditConfig
from scapre_jax.inputs import ConceptInputs


class NonFiniteWeightsError(ValueError):
  """The edit produced NaN or infinite weights; nothing should be saved."""


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for half and single precision kernels, float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


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
  """gamma: the configured value, or max(0.1, 1 / (1 + k)) for k preserve prompts."""
  if config.preserve_scale is not None:
    return jnp.asarray(config.preserve_scale)
  count = jnp.sum(jnp.any(inputs.preserve_mask, axis=-1))
  return jnp.maximum(0.1, 1.0 / (1.0 + count))


def _cast(inputs: ConceptInputs, dtype) -> ConceptInputs:
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, inputs)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def concept_statistics(inputs: ConceptInputs, config: EditConfig, dtype=jnp.float32
                       ) -> dict[str, Array]:
  """Every text-side term shared by all matrices of the same context width.

  Returns a dict of (d_in, d_in) matrices: `xx` = sum_j X_j^T X_j, `cct` =
  C^T C, `preserve` = gamma sum_k P_k^T P_k, and as the method needs them
  `yx` = sum_j Y_j^T X_j, `projector_basis` (U_r, Pi = U_r U_r^T), `ased` (U diag(1 - gate) U^T) and
  `residual` (C_res C_res^T).
  """
  inputs = _cast(inputs, dtype)
  mask = inputs.seq_mask & inputs.concept_mask[:, None]
  vecs = jnp.where(inputs.concept_mask[:, None], inputs.concept_vecs, 0)
  stats = {
      "xx": targets.cross_covariance(inputs.old_seqs, inputs.old_seqs, mask),
      "cct": targets.matmul(vecs.T, vecs),
      "preserve": preserve_scale(config, inputs).astype(dtype) * targets.cross_covariance(
          inputs.preserve_seqs, inputs.preserve_seqs, inputs.preserve_mask),
  }
  if config.technique == "replace":
    stats["yx"] = targets.cross_covariance(inputs.new_seqs, inputs.old_seqs, mask)
  needs_basis = config.method == "scapre" or (
      config.method == "scapre-small" and config.spectral_residual)
  if needs_basis:
    basis = spectral.concept_basis(inputs.concept_vecs, inputs.concept_mask)
    gate = spectral.spectral_gate(basis, temperature=config.spectral_temperature,
                                  power=config.spectral_power)
  if config.method == "scapre":
    # Pi as its basis U_r (Pi = U_r U_r^T): the Woodbury solve works in it.
    stats["projector_basis"] = spectral.projector_basis(basis, rtol=config.projector_rtol)
    if config.ased:
      stats["ased"] = spectral.ased_direction(basis, gate)
  if config.method == "scapre-small" and config.spectral_residual:
    stats["residual"] = spectral.residual_projector(
        basis, inputs.concept_vecs, inputs.concept_mask, gate)
  return stats


def edit_weight(
    weight: Float[Array, "d_out d_in"],
    inputs: ConceptInputs,
    stats: dict[str, Array],
    key: Array,
    config: EditConfig,
) -> Float[Array, "d_out d_in"]:
  """One edited matrix W' (PyTorch orientation) for the configured method."""
  dtype = weight.dtype
  inputs = _cast(inputs, dtype)
  eta = config.erase_scale
  eye = jnp.eye(weight.shape[1], dtype=dtype)
  mask = inputs.seq_mask & inputs.concept_mask[:, None]
  noise = probes.draw_probe_noise(
      key, inputs.num_concepts, inputs.d_in, num_pos=config.mi_num_pos,
      entropy_samples=config.entropy_samples, dtype=dtype)
  use_mask = config.mi_mask and config.method != "uce"
  if use_mask:
    row_weights = probes.mi_soft_mask(
        weight, inputs.concept_vecs, inputs.empty_vec, noise.mi_pos, noise.mi_neg,
        inputs.concept_mask, sigma=config.noise_sigma,
        temperature=config.mi_temperature, power=config.p, mode=config.mi_mode)
  if config.technique == "replace" and not use_mask:
    # A_j = W Y_j^T X_j, so with r_j = 1 the sum needs only sum_j Y_j^T X_j.
    value_sum = eta * (targets.matmul(weight, stats["yx"]))
  else:
    values = targets.target_values(weight, inputs.old_seqs, inputs.new_seqs, mask,
                                   technique=config.technique)
    if not use_mask:
      row_weights = jnp.broadcast_to(inputs.concept_mask[:, None],
                                     values.shape[::2]).astype(dtype)
    value_sum = eta * targets.weighted_value_sum(row_weights, values, inputs.old_seqs)
  preserve = stats["preserve"]

  if config.method == "uce":
    return solvers.solve_spd_right(
        config.lamb * weight + value_sum + targets.matmul(weight, preserve),
        config.lamb * eye + eta * stats["xx"] + preserve)

  entropy = lambda: probes.entropy_factor(
      weight, inputs.concept_vecs, noise.entropy, inputs.concept_mask,
      sigma=config.noise_sigma, bins=config.entropy_bins)

  if config.method == "scapre-small":
    lhs = config.lamb * weight + value_sum + targets.matmul(weight, preserve)
    if config.spectral_residual:
      eta_res = eta if config.residual_scale is None else config.residual_scale
      lhs = lhs - eta_res * (targets.matmul(weight, stats["residual"]))
    solved = solvers.solve_spd_right(
        lhs, config.lamb * eye + stats["cct"] + eta * stats["xx"] + preserve)
    keep = (config.alpha_min + (1 - config.alpha_min) * entropy())[:, None]
    return keep * solved + (1 - keep) * weight

  spread = jnp.clip(1 - entropy(), 0, 1)  # h
  mu = jnp.mean(spread)
  lam_prox = config.lamb + mu
  gram = scapre_gram(stats, config, mu)
  rhs = lam_prox * weight + value_sum + targets.matmul(weight, preserve)
  if use_mask:
    alpha = eta * jnp.max(row_weights, axis=0)
  else:
    alpha = jnp.full(weight.shape[:1], eta, dtype)
  solved = solve_scapre_system(gram, stats["projector_basis"], rhs, alpha)
  edited = solvers.bures_prox(weight, solved, mu=mu, lam_prox=lam_prox,
                              iters=config.bures_iters)
  if config.egbr:
    edited = solvers.egbr(weight, edited, spread)
  return edited


def scapre_gram(stats: dict[str, Array], config: EditConfig, mu) -> Array:
  """G of large-scale step 5 for entropy mean `mu` (a scalar, or any shape
  that broadcasts against (d_in, d_in)):
  (lambda + mu) I + R + CCt + eta S + preserve, with R = mu ASED when on."""
  cct = stats["cct"]
  eye = jnp.eye(cct.shape[-1], dtype=cct.dtype)
  gram = (config.lamb + mu) * eye + cct + config.erase_scale * stats["xx"] + stats["preserve"]
  if config.ased:
    gram = gram + mu * stats["ased"]
  return gram


def solve_scapre_system(gram, basis, rhs, alpha):
  """w_i (G + alpha_i U U^T) = b_i: one Cholesky factorisation of G and
  Woodbury in the concept basis U, at every rank (see
  `solvers.solve_row_sylvester_woodbury` for why not two eigendecompositions)."""
  return solvers.solve_row_sylvester_woodbury(gram, basis, rhs, alpha)


def edit_stack(kernels: Array, keys: Array, inputs: ConceptInputs, stats: dict[str, Array],
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
def _edit_kernel_stack(kernels, keys, inputs, stats, config, matrix_batch=None):
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


def _shape_groups(kernels: Mapping[str, Array]) -> dict[tuple, list[str]]:
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


def _check_config(config) -> None:
  if not isinstance(config, EditConfig):
    raise ValueError(f"config must be an EditConfig, got {type(config).__name__}")
  config.validate()


def _check_kernel(name: str, kernel, d_in: int) -> None:
  if kernel.ndim != 2:
    raise ValueError(f"kernel {name!r} must be 2-D (d_in, d_out), got shape {kernel.shape}")
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(f"kernel {name!r} must be floating point, got {kernel.dtype}")
  if kernel.shape[0] != d_in:
    raise ValueError(
        f"kernel {name!r} has input width {kernel.shape[0]} but the concepts are "
        f"encoded with width {d_in}; the text encoder does not match this model")


def edit_projection(kernel: Array, inputs: ConceptInputs, config: EditConfig, *,
                    key: Array) -> Array:
  """Edits one Flax kernel (d_in, d_out); returns the same shape and dtype."""
  return edit_projections({"kernel": kernel}, inputs, config, key=key,
                          _keys={"kernel": key})["kernel"]


def edit_projections(kernels: Mapping[str, Array], inputs: ConceptInputs,
                     config: EditConfig, *, key: Array, matrix_batch: int | None = None,
                     _keys: Mapping[str, Array] | None = None) -> dict[str, Array]:
  """Edits a dict of named Flax kernels; returns a dict with the same names.

  Matrices of one shape and dtype are solved together in one compiled call.
  Matrix `name` draws its probe noise from `matrix_key(key, name)`, so the
  result for one name equals `edit_projection(kernel, key=matrix_key(key, name))`.
  `matrix_batch` bounds how many matrices run at once (memory), without
  changing results; None picks `default_matrix_batch`. Raises
  NonFiniteWeightsError if any result is not finite.
  """
  _check_config(config)
  if not isinstance(inputs, ConceptInputs):
    raise ValueError(f"inputs must be ConceptInputs, got {type(inputs).__name__}")
  inputs.validate()
  if not kernels:
    raise ValueError("no kernels to edit")
  kernels = {name: jnp.asarray(k) for name, k in kernels.items()}
  for name, kernel in kernels.items():
    _check_kernel(name, kernel, inputs.d_in)

  stats_by_dtype = {}
  results, finite = {}, []
  for (_, dtype), names in _shape_groups(kernels).items():
    ct = compute_dtype(dtype)
    if ct not in stats_by_dtype:
      stats_by_dtype[ct] = concept_statistics(inputs, config, dtype=ct)
    keys = (jnp.stack([_keys[n] for n in names]) if _keys is not None
            else matrix_keys(key, names))
    edited, ok = _edit_kernel_stack(
        tuple(kernels[n] for n in names), keys, inputs, stats_by_dtype[ct], config,
        default_matrix_batch(matrix_batch))
    results.update(zip(names, edited))
    finite.append((names, ok))
  bad = _nonfinite_names(finite)
  if bad:
    raise NonFiniteWeightsError(
        f"the edit produced non-finite weights for {len(bad)} matrices: {bad[:5]}; "
        "check the inputs and settings (erase_scale, lamb, noise_sigma)")
  return {name: results[name] for name in kernels}
