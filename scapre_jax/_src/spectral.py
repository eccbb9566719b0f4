"""Spectral pieces built from the concept matrix C (m, d_in).

docs/algorithm.md large-scale steps 2 and 4 (ASED regulariser, projector Pi) and
the small-scale spectral residual. All three come from one thin SVD of C^T.
Padding concepts are zero rows of C: they add zero singular values, which are
marked invalid so they change neither the lower median nor any output.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from scapre_jax._src.typing import Array, Bool, Float

from scapre_jax._src.targets import einsum
from scapre_jax.precision import EPS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ConceptBasis:
  """Thin SVD of C^T = U diag(s) V^T; `valid` marks the singular values of
  the unpadded matrix (the first min(d_in, m_valid) in descending order)."""

  u: Array  # (d_in, k)
  s: Array  # (k,)
  valid: Array  # (k,) bool


def concept_basis(concept_vecs: Float[Array, "m d_in"],
                  concept_mask: Bool[Array, "m"]) -> ConceptBasis:
  """SVD of the masked concept matrix, singular values descending."""
  c = jnp.where(concept_mask[:, None], concept_vecs, 0)
  u, s, _ = jnp.linalg.svd(c.T, full_matrices=False)
  count = jnp.minimum(jnp.sum(concept_mask), c.shape[1])
  return ConceptBasis(u, s, jnp.arange(s.shape[0]) < count)


def spectral_gate(basis: ConceptBasis, *, temperature: float,
                  power: float) -> Float[Array, "k"]:
  """sigmoid((s - lower_median(s)) / (T_sigma + 1e-8)) ** p_sigma; 0 where invalid.

  The lower median is taken over the valid singular values only; with n of
  them sorted descending it is entry n - 1 - (n - 1) // 2.
  """
  n = jnp.sum(basis.valid)
  median = basis.s[n - 1 - (n - 1) // 2]
  gate = jax.nn.sigmoid((basis.s - median) / (temperature + EPS)) ** power
  return jnp.where(basis.valid, gate, 0)


def ased_direction(basis: ConceptBasis, gate: Float[Array, "k"]
                   ) -> Float[Array, "d_in d_in"]:
  """U diag(1 - gate) U^T over valid directions; R = mu times this."""
  scale = jnp.where(basis.valid, 1 - gate, 0)
  return einsum("ik,k,jk->ij", basis.u, scale, basis.u)


def ased_rows(basis: ConceptBasis, gate: Float[Array, "k"]) -> Float[Array, "k d_in"]:
  """diag(sqrt(1 - gate)) U^T over valid directions: the rows A with
  A^T A = `ased_direction(basis, gate)`, for the factor form."""
  scale = jnp.where(basis.valid, 1 - gate, 0)
  return jnp.sqrt(scale)[:, None] * basis.u.T


def projector_basis(basis: ConceptBasis, *, rtol: float | None = None
                    ) -> Float[Array, "d_in k"]:
  """Orthonormal basis of span(C^T) as the columns of U above a relative
  singular-value cut-off; the other columns are zero. Pi = U_r U_r^T.

  Pi equals the released C^T (C C^T + 1e-8 I)^{-1} C where C C^T is well
  conditioned, and stays a projector when m > d_in or concepts repeat.
  """
  d_in = basis.u.shape[0]
  if rtol is None:
    rtol = d_in * jnp.finfo(basis.s.dtype).eps
  keep = basis.valid & (basis.s > rtol * basis.s[0])
  return jnp.where(keep[None, :], basis.u, 0)


def concept_projector(basis: ConceptBasis, *, rtol: float | None = None
                      ) -> Float[Array, "d_in d_in"]:
  """Pi onto span(C^T) (see `projector_basis`)."""
  u = projector_basis(basis, rtol=rtol)
  return einsum("ik,jk->ij", u, u)


def residual_projector(basis: ConceptBasis, concept_vecs: Float[Array, "m d_in"],
                       concept_mask: Bool[Array, "m"], gate: Float[Array, "k"]
                       ) -> Float[Array, "d_in d_in"]:
  """C_res C_res^T with C_res = (I - U diag(w) U^T) C^T (released --svd).

  The small solver subtracts eta_res W (C_res C_res^T) from mat1.
  """
  c = jnp.where(concept_mask[:, None], concept_vecs, 0)
  coeff = einsum("ik,mi->km", basis.u, c)
  residual = c.T - einsum("ik,k,km->im", basis.u, gate, coeff)
  return einsum("im,jm->ij", residual, residual)
