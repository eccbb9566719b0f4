"""Target values and the covariance sums of the closed-form edit.

docs/algorithm.md "Per-matrix terms". W is in PyTorch orientation
(d_out, d_in); sequences are (m, L, d_in) with a (m, L) row mask.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from scapre_jax._src.typing import Array, Bool, Float

HIGHEST = lax.Precision.HIGHEST


def einsum(subscripts: str, *operands) -> Array:
  """`jnp.einsum` at full float32 precision (no TF32 or bf16 passes on GPU)."""
  return jnp.einsum(subscripts, *operands, precision=HIGHEST)


def matmul(a: Array, b: Array) -> Array:
  """`a @ b` at full float32 precision."""
  return jnp.matmul(a, b, precision=HIGHEST)


def target_values(
    weight: Float[Array, "d_out d_in"],
    old_seqs: Float[Array, "m L d_in"],
    new_seqs: Float[Array, "m L d_in"],
    seq_mask: Bool[Array, "m L"],
    *,
    technique: str,
) -> Float[Array, "m L d_out"]:
  """V_j for every concept; masked rows are zero.

  replace: V_j = Y_j W^T. tensor: u = X_j W^T / ||X_j W^T||_F, v = Y_j W^T,
  V_j = v - <u, v>_F u.
  """
  mask = seq_mask[..., None]
  values = jnp.where(mask, einsum("oi,mli->mlo", weight, new_seqs), 0)
  if technique == "replace":
    return values
  if technique != "tensor":
    raise ValueError(f"unknown technique {technique!r}")
  old = jnp.where(mask, einsum("oi,mli->mlo", weight, old_seqs), 0)
  norm = jnp.sqrt(jnp.sum(old * old, axis=(1, 2), keepdims=True))
  unit = old / jnp.where(norm > 0, norm, 1)
  inner = jnp.sum(unit * values, axis=(1, 2), keepdims=True)
  return values - inner * unit


def weighted_value_sum(
    row_weights: Float[Array, "m d_out"],
    values: Float[Array, "m L d_out"],
    old_seqs: Float[Array, "m L d_in"],
) -> Float[Array, "d_out d_in"]:
  """sum_j diag(r_j) A_j with A_j = V_j^T X_j, as one contraction."""
  return einsum("mo,mlo,mli->oi", row_weights, values, old_seqs)


def shift_sum(
    weight: Float[Array, "d_out d_in"],
    values: Float[Array, "m L d_out"],
    old_seqs: Float[Array, "m L d_in"],
    seq_mask: Bool[Array, "m L"],
) -> Float[Array, "d_out d_in"]:
  """sum_j (V_j^T - W X_j^T) X_j as one contraction: sum_j A_j less
  W sum_j X_j^T X_j, each row's difference taken before the product."""
  old = jnp.where(seq_mask[..., None], einsum("oi,mli->mlo", weight, old_seqs), 0)
  return einsum("mlo,mli->oi", values - old, old_seqs)


def cross_covariance(
    left: Float[Array, "m L d_a"],
    right: Float[Array, "m L d_b"],
    mask: Bool[Array, "m L"],
) -> Float[Array, "d_a d_b"]:
  """sum over concepts and unmasked rows of left_l^T right_l."""
  left = jnp.where(mask[..., None], left, 0)
  return einsum("mla,mlb->ab", left, right)
