"""Linear solves and row-wise proximal steps.

docs/algorithm.md large-scale steps 6-8, the small-scale solve and UCE. All
functions act on one matrix in PyTorch orientation (d_out, d_in); batching
over matrices and sets happens outside with vmap.
"""

from __future__ import annotations

import jax.numpy as jnp
import jax.scipy.linalg
from scapre_jax._src.typing import Array, Float, Scalar

from scapre_jax._src.targets import einsum
from scapre_jax.precision import EPS


def symmetrize(a: Float[Array, "d d"]) -> Float[Array, "d d"]:
  return (a + a.T) / 2


def solve_row_sylvester(
    gram: Float[Array, "d_in d_in"],
    projector: Float[Array, "d_in d_in"],
    rhs: Float[Array, "d_out d_in"],
    alpha: Float[Array, "d_out"],
) -> Float[Array, "d_out d_in"]:
  """Solves W G + diag(alpha) W Pi = B, i.e. w_i (G + alpha_i Pi) = b_i.

  Step 6: with G = Q diag(g) Q^T and G^{-1/2} Pi G^{-1/2} = P diag(k) P^T,
  W = [(B M) / (1 + alpha k^T)] M^T where M = G^{-1/2} P. Two symmetric
  eigendecompositions replace one Cholesky solve per row. G must be SPD and
  Pi symmetric PSD. The exact closed form of docs/algorithm.md; the engine solves
  with `solve_row_sylvester_woodbury`, which is more accurate in float32.
  """
  g, q = jnp.linalg.eigh(symmetrize(gram))
  inv_sqrt = einsum("ik,k,jk->ij", q, g ** -0.5, q)
  kappa, p = jnp.linalg.eigh(
      symmetrize(einsum("ij,jk,kl->il", inv_sqrt, projector, inv_sqrt)))
  m = einsum("ik,kj->ij", inv_sqrt, p)
  z = einsum("oi,ik->ok", rhs, m) / (1 + alpha[:, None] * kappa[None, :])
  return einsum("ok,ik->oi", z, m)


def solve_row_sylvester_woodbury(
    gram: Float[Array, "d_in d_in"],
    basis: Float[Array, "d_in k"],
    rhs: Float[Array, "d_out d_in"],
    alpha: Float[Array, "d_out"],
) -> Float[Array, "d_out d_in"]:
  """The solve of `solve_row_sylvester` for Pi = U U^T given by its basis U
  (d_in, k), any k <= d_in; zero columns of U are allowed.

  Woodbury: (G + a U U^T)^{-1} = G^{-1} - a G^{-1} U (I + a M)^{-1} U^T G^{-1}
  with M = U^T G^{-1} U = E diag(k) E^T, so
  W = Z - [(a * B G^{-1} U E) / (1 + a k^T)] (G^{-1} U E)^T, Z = B G^{-1}.
  One Cholesky factorisation of G and a (k, k) eigendecomposition. G is
  applied through its Cholesky factor, which is backward stable: in float32
  this form is as accurate as the released per-row Cholesky solves, where
  the two-eigendecomposition form is several times less accurate on
  ill-conditioned G (scripts/solver_accuracy.py). A Cholesky factorisation
  also costs a fraction of a (d_in, d_in) eigendecomposition.
  """
  factor = jax.scipy.linalg.cho_factor(symmetrize(gram))
  z = jax.scipy.linalg.cho_solve(factor, rhs.T).T
  g_basis = jax.scipy.linalg.cho_solve(factor, basis)
  kappa, e = jnp.linalg.eigh(symmetrize(einsum("ik,il->kl", basis, g_basis)))
  f = einsum("ik,kl->il", g_basis, e)
  y = einsum("oi,ik,kl->ol", z, basis, e)
  scale = alpha[:, None] / (1 + alpha[:, None] * kappa[None, :])
  return z - einsum("ol,il->oi", y * scale, f)


def _factor_inner(rows: Float[Array, "k d_in"], shift: Scalar):
  """Cholesky factor of K = c I + Z Z^T, the (k, k) matrix of the factor form."""
  inner = shift * jnp.eye(rows.shape[0], dtype=rows.dtype) + einsum("ki,li->kl", rows, rows)
  return jax.scipy.linalg.cho_factor(symmetrize(inner))


def solve_factored(
    rows: Float[Array, "k d_in"],
    coeffs: Float[Array, "d_out k"],
    shift: Scalar,
) -> Float[Array, "d_out d_in"]:
  """Solves D (c I + Z^T Z) = H Z for D, given the rows Z and coefficients H.

  The factor form (docs/algorithm.md "The factor form"): D = H K^{-1} Z with
  K = c I + Z Z^T (k, k), since Z (c I + Z^T Z) = K Z. D lies exactly in
  the row space of Z and G = c I + Z^T Z is never formed. Needs c > 0. The
  engine passes the R of a QR factorisation of its rows (`edit.factor_basis`),
  so k <= d_in, plus a few rows per matrix.
  """
  factor = _factor_inner(rows, shift)
  return einsum("ok,ki->oi", jax.scipy.linalg.cho_solve(factor, coeffs.T).T, rows)


def solve_factored_row_sylvester(
    rows: Float[Array, "k d_in"],
    coeffs: Float[Array, "d_out k"],
    shift: Scalar,
    basis: Float[Array, "d_in r"],
    alpha: Float[Array, "d_out"],
    basis_coeffs: Float[Array, "d_out r"],
) -> Float[Array, "d_out d_in"]:
  """Solves d_i (c I + Z^T Z + alpha_i U U^T) = h_i Z + g_i U^T for every row
  i, U with orthonormal or zero columns (docs/algorithm.md "The factor form").

  With d_i = f_i Z + e_i U^T, K = c I + Z Z^T and P = Z U, matching the
  coefficients of Z and U^T gives f_i K + e_i P^T = h_i and
  e_i (c I + alpha_i M) = g_i - alpha_i h_i K^{-1} P, where
  M = U^T U - P^T K^{-1} P = c U^T G^{-1} U (r, r) is shared by all rows:
  one Cholesky factorisation of K and one (r, r) eigendecomposition of M,
  as in `solve_row_sylvester_woodbury`.
  """
  factor = _factor_inner(rows, shift)
  solved = jax.scipy.linalg.cho_solve(factor, coeffs.T).T  # H K^{-1}
  cross = einsum("ki,ir->kr", rows, basis)  # P
  k_cross = jax.scipy.linalg.cho_solve(factor, cross)  # K^{-1} P
  kappa, e = jnp.linalg.eigh(symmetrize(
      einsum("ir,is->rs", basis, basis) - einsum("kr,ks->rs", cross, k_cross)))
  rhs = einsum("or,rs->os", basis_coeffs - alpha[:, None] * einsum("ok,kr->or", solved, cross), e)
  basis_part = einsum("os,rs->or", rhs / (shift + alpha[:, None] * kappa[None, :]), e)
  row_part = solved - einsum("or,kr->ok", basis_part, k_cross)
  return einsum("ok,ki->oi", row_part, rows) + einsum("or,ir->oi", basis_part, basis)


def solve_spd_right(
    lhs: Float[Array, "d_out d_in"], gram: Float[Array, "d_in d_in"]
) -> Float[Array, "d_out d_in"]:
  """lhs @ inv(gram) for symmetric positive definite gram (Cholesky)."""
  factor = jax.scipy.linalg.cho_factor(symmetrize(gram))
  return jax.scipy.linalg.cho_solve(factor, lhs.T).T


def _row_norm(x):
  return jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), EPS)


def bures_prox(
    original: Float[Array, "d_out d_in"],
    solved: Float[Array, "d_out d_in"],
    *,
    mu: Scalar,
    lam_prox: Scalar,
    iters: int,
) -> Float[Array, "d_out d_in"]:
  """Step 7: row-wise Bures proximal fixed point, max(1, iters) iterations."""
  a = _row_norm(solved)
  u_a = solved / a
  r0 = _row_norm(original)
  u0 = original / r0

  def step(_, carry):
    u, _ = carry
    kappa = jnp.maximum(jnp.sum(u * u0, axis=-1, keepdims=True), 0)
    r = (lam_prox * a + mu * r0 * kappa) / (lam_prox + mu)
    direction = lam_prox * a * u_a + mu * r0 * kappa * u0
    return direction / _row_norm(direction), r

  # A compiled loop: program size and memory do not grow with `iters`.
  u, r = jax.lax.fori_loop(0, max(1, iters), step, (u_a, a))
  return r * u


def egbr(
    original: Float[Array, "d_out d_in"],
    edited: Float[Array, "d_out d_in"],
    spread: Float[Array, "d_out"],
) -> Float[Array, "d_out d_in"]:
  """Step 8: entropy-gated blend of direction and log squared norm.

  `spread` is h = clip(1 - e, 0, 1) of each row.
  """
  alpha = (1 - jnp.exp(-spread / jnp.maximum(jnp.max(spread), 1e-6)))[:, None]
  n0, nb = _row_norm(original), _row_norm(edited)
  u0, ub = original / n0, edited / nb
  beta = alpha * jnp.maximum(jnp.sum(u0 * ub, axis=-1, keepdims=True), 0)
  direction = (1 - beta) * u0 + beta * ub
  direction = direction / _row_norm(direction)
  sq_norm = jnp.exp((1 - alpha) * jnp.log(n0 ** 2) + alpha * jnp.log(nb ** 2))
  return jnp.sqrt(sq_norm) * direction
