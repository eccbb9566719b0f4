"""Self-checks of the PyTorch reference (scapre_jax.reference).

Small shapes only (d_in = 12, d_out = 7, m = 3): these run in a second or two.
Hand-worked cases for the estimators, an independent (Kronecker / numpy) solve
for the large-scale solver, and algebraic identities for the rest.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from scapre_jax import reference as ref

from scapre_jax.config import EditConfig

D_IN, D_OUT, M = 12, 7, 3


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def _problem(seed=0, lengths=(4, 6, 5), K=5, S=6):
  g = torch.Generator().manual_seed(seed)
  rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
  W = rnd(D_OUT, D_IN)
  C = rnd(M, D_IN)
  e0 = rnd(D_IN)
  old = [torch.cat([C[j:j + 1], rnd(L - 1, D_IN)]) for j, L in enumerate(lengths)]
  new = [rnd(L, D_IN) for L in lengths]
  noise = {"mi_pos": rnd(M, K, D_IN), "mi_neg": rnd(M, K, D_IN),
           "entropy": rnd(M, S, D_IN)}
  return W, C, e0, old, new, noise


# --------------------------------------------------------------------------
# Large-scale solver
# --------------------------------------------------------------------------


def _kron_row_solve(G, Pi, B, alpha):
  """Solves W G + diag(alpha) W Pi = B as one (d_out d_in) dense system."""
  d_out, d_in = B.shape
  big = np.kron(np.eye(d_out), G.T) + np.kron(np.diag(alpha), Pi.T)
  return np.linalg.solve(big, B.reshape(-1)).reshape(d_out, d_in)


def test_row_cholesky_solve_matches_dense_kronecker_solve():
  W, C, _, old, _, _ = _problem()
  rng = np.random.default_rng(1)
  S = sum(x.numpy().T @ x.numpy() for x in old)
  G = 0.7 * np.eye(D_IN) + C.numpy().T @ C.numpy() + 2.0 * S
  Pi = ref.concept_projector(C).numpy()
  B = rng.standard_normal((D_OUT, D_IN))
  alpha = rng.uniform(0.0, 2.0, D_OUT)
  got = ref.scapre_row_solve(G, Pi, B, alpha).numpy()
  want = _kron_row_solve(G, Pi, B, alpha)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  # And the closed form of docs/algorithm.md step 6 (two eigendecompositions).
  g, Q = np.linalg.eigh(G)
  G_mhalf = Q @ np.diag(g ** -0.5) @ Q.T
  kappa, P = np.linalg.eigh(G_mhalf @ Pi @ G_mhalf)
  closed = ((B @ G_mhalf @ P) / (1.0 + np.outer(alpha, kappa))) @ P.T @ G_mhalf
  np.testing.assert_allclose(got, closed, rtol=1e-9, atol=1e-11)


def test_scapre_edit_matches_numpy_assembly():
  """reference_edit("scapre") against the equations assembled in numpy."""
  W, C, e0, old, new, noise = _problem(seed=3)
  pres = [torch.randn(3, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(9))]
  cfg = EditConfig(method="scapre", p=2.0, noise_sigma=0.3, mi_num_pos=5,
                   entropy_samples=6, entropy_bins=5, bures_iters=2, ased=True,
                   egbr=True)
  got = ref.reference_edit(W, C, e0, old, new, cfg, noise, preserve_seqs=pres).numpy()

  Wn, Cn = W.numpy(), C.numpy()
  e = ref.entropy_factor(W, C, noise["entropy"], sigma=cfg.noise_sigma,
                         bins=cfg.entropy_bins).numpy()
  h = np.clip(1 - e, 0, 1)
  mu = h.mean()
  r = [ref.mi_soft_mask(W, C[j], e0, noise["mi_pos"][j], noise["mi_neg"][j],
                        sigma=cfg.noise_sigma, temperature=cfg.mi_temperature,
                        power=cfg.p).numpy() for j in range(M)]
  U, s, _ = np.linalg.svd(Cn.T, full_matrices=False)
  gate = 1 / (1 + np.exp(-(s - np.sort(s)[(len(s) - 1) // 2]) / (1 + 1e-8)))
  R = U @ np.diag((1 - gate) * mu) @ U.T
  Pi = Cn.T @ np.linalg.solve(Cn @ Cn.T + 1e-8 * np.eye(M), Cn)
  V = sum(cfg.erase_scale * r[j][:, None] * ((y.numpy() @ Wn.T).T @ x.numpy())
          for j, (x, y) in enumerate(zip(old, new)))
  S = sum(cfg.erase_scale * x.numpy().T @ x.numpy() for x in old)
  P = pres[0].numpy()
  gamma = max(0.1, 1 / 2)
  lm = cfg.lamb + mu
  G = lm * np.eye(D_IN) + R + Cn.T @ Cn + S + gamma * P.T @ P
  B = lm * Wn + V + gamma * Wn @ P.T @ P
  We = _kron_row_solve(G, Pi, B, cfg.erase_scale * np.max(r, axis=0))
  Wb = ref.bures_prox(W, We, mu=mu, lam_prox=lm, iters=2).numpy()
  want = ref.egbr(W, Wb, h).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)


def test_bures_prox_with_mu_zero_returns_we():
  W, *_ = _problem()
  We = W + 0.5 * torch.randn(D_OUT, D_IN, dtype=torch.float64)
  for iters in (0, 1, 3):
    out = ref.bures_prox(W, We, mu=0.0, lam_prox=0.5, iters=iters)
    torch.testing.assert_close(out, We, rtol=1e-13, atol=1e-13)
  out = ref.bures_prox(W, We, mu=1e-12, lam_prox=0.5, iters=2)
  torch.testing.assert_close(out, We, rtol=1e-9, atol=1e-9)


def test_bures_prox_hand_worked_row():
  # w0 = (2, 0), we = (0, 1) orthogonal: kappa = 0 -> r = lam a / (lam + mu).
  W0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
  We = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
  out = ref.bures_prox(W0, We, mu=1.0, lam_prox=1.0, iters=1)
  torch.testing.assert_close(out, torch.tensor([[0.0, 0.5]], dtype=torch.float64))
  # Parallel: kappa = 1 -> r = (lam a + mu r0) / (lam + mu) = (1 + 2) / 2.
  We = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
  out = ref.bures_prox(W0, We, mu=1.0, lam_prox=1.0, iters=3)
  torch.testing.assert_close(out, torch.tensor([[1.5, 0.0]], dtype=torch.float64))


def test_egbr_alpha_zero_row_keeps_w0():
  W0 = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
  Wb = torch.tensor([[0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
  h = torch.tensor([0.0, 0.5], dtype=torch.float64)
  out = ref.egbr(W0, Wb, h)
  torch.testing.assert_close(out[0], W0[0])  # alpha = 0
  alpha = 1 - math.exp(-1.0)  # h / max(h) = 1
  beta = alpha * (1 / math.sqrt(2))
  d = (1 - beta) * np.array([1.0, 0.0]) + beta * np.array([1.0, 1.0]) / math.sqrt(2)
  d /= np.linalg.norm(d)
  norm = math.exp(0.5 * ((1 - alpha) * math.log(1.0) + alpha * math.log(8.0)))
  np.testing.assert_allclose(out[1].numpy(), norm * d, rtol=1e-12)


# --------------------------------------------------------------------------
# Entropy factor
# --------------------------------------------------------------------------


def _entropy_probe(values_per_row, bins):
  """W with row i = values_per_row[i] * e_0 reading noise[.., 0], concepts 0."""
  values = np.asarray(values_per_row, dtype=np.float64)  # (rows, m*S)
  rows, n = values.shape
  m, S = 2, n // 2
  W = torch.zeros(rows, D_IN, dtype=torch.float64)
  noise = torch.zeros(m, S, D_IN, dtype=torch.float64)
  for i in range(rows):
    W[i, i] = 1.0
    noise[:, :, i] = torch.as_tensor(values[i].reshape(m, S))
  C = torch.zeros(m, D_IN, dtype=torch.float64)
  return ref.entropy_factor(W, C, noise, sigma=1.0, bins=bins)


def test_entropy_factor_hand_worked():
  B = 20
  one_bin = np.full(20, 3.0)  # all equal: everything in bin 0
  uniform = (np.arange(B) + 0.5) / B  # one value in each bin after min-max
  two_ends = np.array([0.0] * 10 + [1.0] * 10)  # bins 0 and B-1, half each
  e = _entropy_probe([one_bin, uniform, two_ends], bins=B).numpy()
  np.testing.assert_allclose(e[0], 1.0, atol=1e-7)
  np.testing.assert_allclose(e[1], 0.0, atol=1e-6)
  np.testing.assert_allclose(e[2], 1 - math.log(2) / math.log(B), atol=1e-6)
  # B = 4 with values spread 3:1 -> H = -(3/4 log 3/4 + 1/4 log 1/4).
  vals = np.array([0.0, 0.1, 0.2, 1.0] * 5)
  e4 = _entropy_probe([vals], bins=4).numpy()[0]
  # 0, 0.1, 0.2 all land in bin 0 (width 0.25); 1.0 in the last bin.
  H = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
  np.testing.assert_allclose(e4, 1 - H / math.log(4), atol=1e-6)


def test_entropy_factor_with_zero_sigma_ignores_noise():
  W, C, _, _, _, noise = _problem()
  e1 = ref.entropy_factor(W, C, noise["entropy"], sigma=0.0, bins=20)
  e2 = ref.entropy_factor(W, C, 7 * noise["entropy"], sigma=0.0, bins=20)
  torch.testing.assert_close(e1, e2, rtol=0, atol=0)
  assert e1.dtype == torch.float64 and e1.shape == (D_OUT,)


# --------------------------------------------------------------------------
# MI soft mask
# --------------------------------------------------------------------------


def _mi_setup(row_kinds):
  """c = e_0, e0 = e_1; row kind 'up': W c > W e0, 'down': W c < W e0,
  'flat': W c = W e0 (no separation)."""
  c = torch.zeros(D_IN, dtype=torch.float64)
  c[0] = 1.0
  e0 = torch.zeros(D_IN, dtype=torch.float64)
  e0[1] = 1.0
  W = torch.zeros(len(row_kinds), D_IN, dtype=torch.float64)
  for i, kind in enumerate(row_kinds):
    W[i, 2:] = 0.1 * (i + 1)  # irrelevant columns, differ per row
    W[i, 0], W[i, 1] = {"up": (2.0 + i, -1.0), "down": (-1.0, 3.0 + i),
                        "flat": (0.5, 0.5)}[kind]
  noise = torch.randn(5, D_IN, dtype=torch.float64)
  return W, c, e0, noise


def test_mi_soft_mask_equal_mi_gives_sigmoid_zero():
  W, c, e0, noise = _mi_setup(["up"] * D_OUT)
  for p in (1.0, 2.0, 8.0):
    r = ref.mi_soft_mask(W, c, e0, noise, -noise, sigma=0.0, temperature=0.7, power=p)
    assert r.dtype == torch.float64
    np.testing.assert_allclose(r.numpy(), 0.5 ** p, rtol=1e-6)


def test_mi_soft_mask_hand_worked_two_levels():
  # Two rows separate perfectly (MI = log 2), two not at all (MI = 0):
  # mi = [a, a, 0, 0] -> mi_std = +-(a/2) / (a / sqrt 3) = +-sqrt(3)/2.
  W, c, e0, noise = _mi_setup(["up", "up", "flat", "flat"])
  T, p = 0.7, 3.0
  r = ref.mi_soft_mask(W, c, e0, noise, noise, sigma=0.0, temperature=T, power=p).numpy()
  z = math.sqrt(3) / 2
  want = [_sigmoid(z / T) ** p] * 2 + [_sigmoid(-z / T) ** p] * 2
  np.testing.assert_allclose(r, want, rtol=1e-6)


def test_mi_soft_mask_reproduces_float32_orientation_quirk():
  """docs/algorithm.md: rows separating 'up' vs 'down' differ by a float32 ulp of
  log 2, and standardisation blows it up (the `released` behaviour)."""
  W, c, e0, noise = _mi_setup(["up", "up", "up", "down", "down"])
  r = ref.mi_soft_mask(W, c, e0, noise, noise, sigma=0.0, temperature=0.7, power=8.0)
  r = r.numpy()
  assert np.all(r[:3] == r[0]) and np.all(r[3:] == r[3])
  assert abs(r[0] - r[3]) > 1e-3  # decided by rounding, not information


# --------------------------------------------------------------------------
# Projector, spectral pieces, targets, text side, dispatch
# --------------------------------------------------------------------------


def test_concept_projector_is_idempotent_projector_onto_concepts():
  _, C, *_ = _problem()
  Pi = ref.concept_projector(C)
  # The released 1e-8 ridge makes Pi exact only to ~1e-8 / sigma_min(C)^2.
  torch.testing.assert_close(Pi @ Pi, Pi, rtol=1e-7, atol=1e-7)
  torch.testing.assert_close(Pi, Pi.T, rtol=1e-12, atol=1e-12)
  torch.testing.assert_close(Pi @ C.T, C.T, rtol=1e-7, atol=1e-7)
  assert abs(torch.trace(Pi).item() - M) < 1e-7
  # Without the ridge it is the orthogonal projector onto span(c_j).
  Q, _ = np.linalg.qr(C.numpy().T)
  np.testing.assert_allclose(Pi.numpy(), Q @ Q.T, atol=1e-7)


def test_ased_and_residual_match_scipy_svd():
  W, C, *_ = _problem()
  U, s, _ = scipy.linalg.svd(C.numpy().T, full_matrices=False)
  med = np.sort(s)[(len(s) - 1) // 2]  # lower median
  gate = (1 / (1 + np.exp(-(s - med) / (0.5 + 1e-8)))) ** 2.0
  R = ref.ased_regulariser(C, 0.3, temperature=0.5, power=2.0).numpy()
  np.testing.assert_allclose(R, U @ np.diag((1 - gate) * 0.3) @ U.T, atol=1e-12)
  P = np.eye(D_IN) - U @ np.diag(gate) @ U.T
  C_res = P @ C.numpy().T
  want = W.numpy() @ C_res @ C_res.T
  got = ref.spectral_residual_term(W, C, temperature=0.5, power=2.0).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_targets_tensor_is_orthogonal_to_u():
  W, _, _, old, new, _ = _problem()
  V = ref.targets(W, old[0], new[0], "tensor")
  u = old[0] @ W.T
  assert abs((u * V).sum().item()) < 1e-10
  torch.testing.assert_close(ref.targets(W, old[0], new[0], "replace"), new[0] @ W.T)
  with pytest.raises(ValueError):
    ref.targets(W, old[0], new[0], "bogus")


def test_released_token_positions():
  # Old prompt: BOS + 3 tokens + EOS (n = 5); guide " ": BOS + EOS (n = 2).
  f_o, f_n, so, eo, sn, en = ref.released_token_positions(5, 2)
  assert (f_o, f_n, so, eo, sn, en) == (3, 0, 3, 77, 0, 74)
  assert eo - so == en - sn == 77 - 3
  assert ref.released_token_positions(4, 6, seq_len=10) == (2, 4, 2, 8, 4, 10)


def test_uce_and_small_solver_closed_forms():
  W, C, e0, old, new, noise = _problem(seed=5)
  Wn = W.numpy()
  A = sum((y.numpy() @ Wn.T).T @ x.numpy() for x, y in zip(old, new))
  S = sum(x.numpy().T @ x.numpy() for x in old)
  cfg = EditConfig(method="uce", lamb=0.5, erase_scale=1.5)
  got = ref.reference_edit(W, C, e0, old, new, cfg, noise).numpy()
  want = (0.5 * Wn + 1.5 * A) @ np.linalg.inv(0.5 * np.eye(D_IN) + 1.5 * S)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)

  cfg = EditConfig(method="scapre-small", lamb=0.5, erase_scale=1.5, mi_mask=False,
                   alpha_min=0.8, entropy_samples=6, entropy_bins=5, noise_sigma=0.2)
  got = ref.reference_edit(W, C, e0, old, new, cfg, noise).numpy()
  Cn = C.numpy()
  W_new = (0.5 * Wn + 1.5 * A) @ np.linalg.inv(0.5 * np.eye(D_IN) + Cn.T @ Cn + 1.5 * S)
  e = ref.entropy_factor(W, C, noise["entropy"], sigma=0.2, bins=5).numpy()
  a = (0.8 + 0.2 * e)[:, None]
  np.testing.assert_allclose(got, a * W_new + (1 - a) * Wn, rtol=1e-9, atol=1e-10)


def test_unknown_method_raises():
  W, C, e0, old, new, noise = _problem()
  cfg = EditConfig()
  object.__setattr__(cfg, "method", "bogus")  # bypass the config's own check
  with pytest.raises(ValueError):
    ref.reference_edit(W, C, e0, old, new, cfg, noise)
