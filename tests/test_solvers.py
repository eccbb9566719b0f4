"""Closed-form solves and row-wise steps against float64 oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from scapre_jax._src import solvers


def spd(rng, d, cond):
  """Random SPD matrix with condition number `cond`."""
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return (q * np.geomspace(1, cond, d)) @ q.T


def projector(rng, d, rank):
  q, _ = np.linalg.qr(rng.normal(size=(d, rank)))
  return q @ q.T


@pytest.mark.parametrize("cond", [1e1, 1e4, 1e7])
@pytest.mark.parametrize("rank", [1, 5, 24])
def test_row_sylvester_matches_per_row_solves(cond, rank):
  rng = np.random.default_rng(int(cond) + rank)
  d_in, d_out = 24, 9
  g, pi = spd(rng, d_in, cond), projector(rng, d_in, rank)
  b = rng.normal(size=(d_out, d_in))
  alpha = rng.uniform(0, 3, size=d_out)
  got = np.asarray(solvers.solve_row_sylvester(g, pi, b, alpha))
  want = np.stack([np.linalg.solve((g + a * pi).T, row) for a, row in zip(alpha, b)])
  # Backward-stable solves: error grows like cond * eps.
  np.testing.assert_allclose(got, want, rtol=0, atol=cond * 1e-13 * np.abs(want).max())


def test_row_sylvester_matches_scipy_when_projector_is_identity():
  # W G + diag(alpha) W = B is scipy's A X + X B = Q with A = diag(alpha).
  rng = np.random.default_rng(1)
  g = spd(rng, 16, 1e3)
  b = rng.normal(size=(7, 16))
  alpha = rng.uniform(0.1, 2, size=7)
  got = solvers.solve_row_sylvester(g, np.eye(16), b, alpha)
  want = scipy.linalg.solve_sylvester(np.diag(alpha), g, b)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_row_sylvester_float32_keeps_dtype_and_accuracy():
  rng = np.random.default_rng(2)
  g, pi = spd(rng, 32, 1e3), projector(rng, 32, 4)
  b = rng.normal(size=(5, 32))
  alpha = rng.uniform(0, 2, size=5)
  want = np.asarray(solvers.solve_row_sylvester(g, pi, b, alpha))
  got = solvers.solve_row_sylvester(*(jnp.asarray(x, jnp.float32) for x in (g, pi, b, alpha)))
  assert got.dtype == jnp.float32
  # Against float64: a backward-stable float32 solve errs by about
  # cond * eps32 = 1e3 * 1.2e-7 = 1.2e-4 of the largest entry on any CPU;
  # 1e-3 leaves a factor 8 for the two eigendecompositions.
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())


def test_solve_spd_right():
  rng = np.random.default_rng(3)
  g = spd(rng, 12, 1e3)
  b = rng.normal(size=(4, 12))
  np.testing.assert_allclose(solvers.solve_spd_right(b, g), b @ np.linalg.inv(g),
                             rtol=1e-9, atol=1e-12)


def test_bures_prox_hand_worked():
  # One row: w0 = (2, 0), we = (0, 1); lam_p = 1, mu = 1, one iteration.
  # a = 1, u_a = (0, 1), r0 = 2, u0 = (1, 0); kappa = max(u_a . u0, 0) = 0
  # -> r = (1*1 + 0) / 2 = 0.5 and u = normalise((0, 1)) -> result (0, 0.5).
  w0 = jnp.array([[2.0, 0.0]])
  we = jnp.array([[0.0, 1.0]])
  out = solvers.bures_prox(w0, we, mu=1.0, lam_prox=1.0, iters=1)
  np.testing.assert_allclose(out, [[0.0, 0.5]], atol=1e-15)
  # Second iteration: u = (0, 1) still orthogonal to u0, so the same result.
  np.testing.assert_allclose(solvers.bures_prox(w0, we, mu=1.0, lam_prox=1.0, iters=2),
                             [[0.0, 0.5]], atol=1e-15)
  # Aligned rows: w0 = (2, 0), we = (1, 0): kappa = 1, r = (1 + 2)/2 = 1.5.
  out = solvers.bures_prox(w0, jnp.array([[1.0, 0.0]]), mu=1.0, lam_prox=1.0, iters=3)
  np.testing.assert_allclose(out, [[1.5, 0.0]], atol=1e-15)


def test_bures_prox_without_mu_returns_solution():
  rng = np.random.default_rng(4)
  w0, we = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  np.testing.assert_allclose(solvers.bures_prox(w0, we, mu=0.0, lam_prox=0.7, iters=2),
                             we, rtol=1e-12)


def test_egbr_hand_worked():
  # Row 0 has h = max(h): alpha = 1 - e^-1; row 1 has h = 0: alpha = 0, so it
  # keeps w0 exactly.
  w0 = jnp.array([[3.0, 0.0], [0.0, 2.0]])
  wb = jnp.array([[0.0, 4.0], [5.0, 5.0]])
  h = jnp.array([0.5, 0.0])
  out = np.asarray(solvers.egbr(w0, wb, h))
  np.testing.assert_allclose(out[1], [0.0, 2.0], atol=1e-15)
  # Row 0: cos(w0, wb) = 0 -> beta = 0, direction u0 = (1, 0);
  # squared norm = exp((1-a) log 9 + a log 16).
  a = 1 - np.exp(-1.0)
  np.testing.assert_allclose(out[0], [np.sqrt(np.exp((1 - a) * np.log(9) + a * np.log(16))), 0],
                             rtol=1e-14)


@pytest.mark.parametrize("cond", [1e1, 1e5])
@pytest.mark.parametrize("rank,zero_cols", [(1, 0), (6, 2), (12, 0), (20, 3), (24, 0)])
def test_woodbury_solve_matches_per_row_solves(cond, rank, zero_cols):
  # Ranks past d_in / 2 up to d_in (more concepts than context width).
  rng = np.random.default_rng(rank + zero_cols)
  d_in, d_out = 24, 9
  g = spd(rng, d_in, cond)
  basis, _ = np.linalg.qr(rng.normal(size=(d_in, rank)))
  basis[:, :zero_cols] = 0  # cut-off directions arrive as zero columns
  pi = basis @ basis.T
  b = rng.normal(size=(d_out, d_in))
  alpha = rng.uniform(0, 3, size=d_out)
  got = np.asarray(solvers.solve_row_sylvester_woodbury(g, basis, b, alpha))
  want = np.stack([np.linalg.solve((g + a * pi).T, row) for a, row in zip(alpha, b)])
  np.testing.assert_allclose(got, want, rtol=0, atol=cond * 1e-13 * np.abs(want).max())
  full = np.asarray(solvers.solve_row_sylvester(g, pi, b, alpha))
  np.testing.assert_allclose(got, full, rtol=0, atol=cond * 1e-13 * np.abs(want).max())


@pytest.mark.parametrize("seed", [0, 1])
def test_woodbury_float32_as_accurate_as_per_row_cholesky(seed):
  # An ill-conditioned G (cond 1e6) and a projector of rank 45 > d_in / 2, in
  # float32: the engine's solve must be as accurate as the released per-row
  # Cholesky solves. The two-eigendecomposition form misses by 30-160x here
  # (8e-2 and 3e-1 against about 2e-3), which is why the engine does not use it.
  rng = np.random.default_rng(seed)
  d_in, d_out = 64, 16
  g = spd(rng, d_in, 1e6)
  basis, _ = np.linalg.qr(rng.normal(size=(d_in, 48)))
  basis[:, :3] = 0
  b = rng.normal(size=(d_out, d_in))
  alpha = rng.uniform(0, 3, size=d_out)
  pi = basis @ basis.T
  want = np.stack([np.linalg.solve((g + a * pi).T, row) for a, row in zip(alpha, b)])
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  error = lambda x: np.abs(np.asarray(x, np.float64) - want).max() / np.abs(want).max()
  per_row = np.stack([solvers.solve_spd_right(f32(row[None]), f32(g + a * pi))[0]
                      for a, row in zip(alpha, b)])
  got = solvers.solve_row_sylvester_woodbury(f32(g), f32(basis), f32(b), f32(alpha))
  assert got.dtype == jnp.float32
  assert error(got) <= 2 * error(per_row) + 1e-4


def _bures_numpy(w0, we, mu, lam_prox, iters):
  """Step 7 of docs/algorithm.md as a plain float64 loop."""
  norm = lambda x: np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)
  a, r0 = norm(we), norm(w0)
  u_a, u0, u = we / a, w0 / r0, we / a
  for _ in range(max(1, iters)):
    kappa = np.maximum(np.sum(u * u0, axis=-1, keepdims=True), 0)
    r = (lam_prox * a + mu * r0 * kappa) / (lam_prox + mu)
    d = lam_prox * a * u_a + mu * r0 * kappa * u0
    u = d / norm(d)
  return r * u


def test_bures_prox_is_a_compiled_loop():
  """Many iterations agree with the plain loop, and the traced program does
  not grow with the count (the issue: bures_iters=2000 took 3 GB unrolled)."""
  rng = np.random.default_rng(5)
  w0, we = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  for iters in (0, 1, 7):
    np.testing.assert_allclose(
        solvers.bures_prox(w0, we, mu=0.3, lam_prox=0.8, iters=iters),
        _bures_numpy(w0, we, 0.3, 0.8, iters), rtol=1e-12)
  sizes = {n: len(jax.make_jaxpr(lambda a, b: solvers.bures_prox(
      a, b, mu=0.3, lam_prox=0.8, iters=n))(w0, we).jaxpr.eqns) for n in (2, 1000)}
  assert sizes[1000] == sizes[2]


def factored_problem(rng, k, d_in, d_out, scale):
  """Rows Z whose Gram c I + Z^T Z is ill conditioned (row norms up to
  `scale`) and coefficients H."""
  rows = rng.normal(size=(k, d_in)) * np.geomspace(1, scale, k)[:, None] / np.sqrt(d_in)
  return rows, rng.normal(size=(d_out, k))


@pytest.mark.parametrize("k,scale", [(1, 1.0), (7, 30.0), (20, 300.0)])
def test_factored_solve_matches_dense_solve(k, scale):
  rng = np.random.default_rng(k)
  rows, coeffs = factored_problem(rng, k, 24, 9, scale)
  c = 0.7
  gram = c * np.eye(24) + rows.T @ rows
  want = np.linalg.solve(gram, (coeffs @ rows).T).T  # D G = H Z
  got = np.asarray(solvers.solve_factored(rows, coeffs, c))
  cond = np.linalg.cond(gram)
  np.testing.assert_allclose(got, want, rtol=0, atol=cond * 1e-14 * np.abs(want).max())


@pytest.mark.parametrize("rank,zero_cols", [(1, 0), (4, 1), (6, 0)])
def test_factored_row_sylvester_matches_per_row_solves(rank, zero_cols):
  # U spans part of the row space of Z, as Pi = span(C^T) does in the engine
  # (the concept rows are rows of Z); some rows have alpha = 0.
  rng = np.random.default_rng(10 + rank)
  d_in, d_out, k, c = 24, 9, 15, 0.8
  rows, coeffs = factored_problem(rng, k, d_in, d_out, 100.0)
  basis, _ = np.linalg.qr(rows[-rank:].T)
  basis[:, :zero_cols] = 0
  alpha = rng.uniform(0, 3, size=d_out)
  alpha[0] = 0
  basis_coeffs = rng.normal(size=(d_out, rank))
  gram = c * np.eye(d_in) + rows.T @ rows
  rhs = coeffs @ rows + basis_coeffs @ basis.T
  want = np.stack([np.linalg.solve(gram + a * basis @ basis.T, b) for a, b in zip(alpha, rhs)])
  got = np.asarray(solvers.solve_factored_row_sylvester(rows, coeffs, c, basis, alpha,
                                                        basis_coeffs))
  cond = np.linalg.cond(gram)
  np.testing.assert_allclose(got, want, rtol=0, atol=cond * 1e-14 * np.abs(want).max())


def test_factored_solve_leaves_the_complement_of_the_rows_exactly():
  # Rows supported on the first 5 coordinates: D = H K^{-1} Z is zero on the
  # other 19 exactly, in float32 as in float64 (every product there is 0 * x),
  # where solving with G = c I + Z^T Z formed leaves rounding noise there.
  rng = np.random.default_rng(5)
  rows, coeffs = factored_problem(rng, 8, 24, 6, 50.0)
  rows[:, 5:] = 0
  for dtype in (jnp.float32, jnp.float64):
    got = np.asarray(solvers.solve_factored(jnp.asarray(rows, dtype), jnp.asarray(coeffs, dtype),
                                            0.5))
    assert got.dtype == dtype
    assert np.all(got[:, 5:] == 0) and np.all(np.abs(got[:, :5]) > 0)
    basis = np.zeros((24, 2))
    basis[:2, :2] = np.eye(2)
    got = np.asarray(solvers.solve_factored_row_sylvester(
        *(jnp.asarray(x, dtype) for x in (rows, coeffs, 0.5, basis, np.ones(6), np.ones((6, 2))))))
    assert np.all(got[:, 5:] == 0)
