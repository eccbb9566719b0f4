"""PyTorch float64 reference of ScaPre, transcribed literally from docs/algorithm.md.

This module is the yardstick the JAX engine is tested against, and what
`scapre-jax verify` recomputes an edit with. It needs PyTorch (the optional
`[torch]` extra: pip install 'scapre-jax[torch]'). It is written
the way the authors' released code computes things, on purpose NOT vectorised
and NOT clever: per-row loops, one Cholesky factorisation and solve per row,
`torch.median` (the lower median), `torch.histc` binning, Python loops over
concepts and over the rows of each aligned sequence. Its value is that it is
an independent, plain transcription of the equations; speed is irrelevant
(keep test shapes small).

Conventions:
  * Every tensor is torch.float64 (inputs are converted), W is in PyTorch
    orientation (d_out, d_in), y = W x.
  * Randomness is injected: the estimators take standard-normal samples and
    scale them by sigma (`config.noise_sigma`) inside, so the JAX side can be
    fed exactly the same draws.
  * Section names in the docstrings refer to docs/algorithm.md.

Deliberate choices where docs/algorithm.md leaves room:
  * MI mask, `released` mode: per-row counts, probabilities, logs and the
    four-term sum are float32 (as in the released code); the per-row MI is
    then stored in a vector of the reference dtype, so the standardisation
    and the sigmoid run in float64 (the released code run with a float64
    default dtype), or in float32 under `precision(torch.float32)`, with
    torch's own mean and std. `canonical` mode (config.mi_mode) is
    scapre-jax's departure, transcribed too.
  * One MI-mask draw per concept serves both r_j and r_max (the released code
    draws the mask twice per concept).
  * Preserve sequences are honoured in every solver (gamma * W P^T P and
    gamma * P^T P terms); the released ScaPre code ignores them.
  * The concept projector is the released formula C^T (C C^T + 1e-8 I)^-1 C
    (config.projector_rtol is not used here).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

try:
  import torch
except ImportError as err:  # pragma: no cover - depends on the environment
  raise ImportError(
      "scapre_jax.reference needs PyTorch, which is not installed; install it with "
      "pip install 'scapre-jax[torch]'") from err

EPS = 1e-8
DTYPE = torch.float64


@contextlib.contextmanager
def precision(dtype: torch.dtype):
  """Runs the reference in `dtype` inside the block; float64 again after it.

  For benchmarks (scripts/bench_edit.py): the released code computes in the
  model dtype, float32. Tests use the float64 default. The MI cell counts are
  float32 either way, as in the released code.
  """
  global DTYPE
  previous, DTYPE = DTYPE, dtype
  try:
    yield
  finally:
    DTYPE = previous


def _t(x) -> torch.Tensor:
  """Any array (torch, numpy, jax) -> torch.float64 tensor on the CPU."""
  if isinstance(x, torch.Tensor):
    return x.detach().to(device="cpu", dtype=DTYPE)
  return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=DTYPE)


def _rows(concept_vecs) -> list[torch.Tensor]:
  """(m, d_in) tensor or a list of (d_in,) vectors -> list of (d_in,) tensors."""
  if isinstance(concept_vecs, (list, tuple)):
    return [_t(c) for c in concept_vecs]
  c = _t(concept_vecs)
  return [c[j] for j in range(c.shape[0])]


def _stack_concepts(concept_vecs) -> torch.Tensor:
  """C = [c_1 ... c_m]^T, shape (m, d_in)."""
  return torch.stack(_rows(concept_vecs), dim=0)


def lower_median(x: torch.Tensor) -> torch.Tensor:
  """torch.median of a 1-D tensor: for an even count, the smaller middle value."""
  return torch.median(x)


# ---------------------------------------------------------------------------
# Text side
# ---------------------------------------------------------------------------


def released_token_positions(attention_mask_old: int, attention_mask_new: int,
                             *, seq_len: int = 77):
  """docs/algorithm.md "Text side": aligned slices of the (old, guide) pair.

  Args:
    attention_mask_old: n(o_j), the attention-mask sum of the old prompt.
    attention_mask_new: n(g_j), the attention-mask sum of the guide prompt.
    seq_len: padded sequence length (tokenizer model_max_length, 77).

  Returns:
    (f_o, f_n, start_old, stop_old, start_new, stop_new) with
    X_j = E(o_j)[start_old:stop_old], Y_j = E(g_j)[start_new:stop_new]; both
    slices have seq_len - max(f_o, f_n) rows.
  """
  f_o = int(attention_mask_old) - 2
  f_n = int(attention_mask_new) - 2
  far = max(f_o, f_n)
  start_old, stop_old = f_o, seq_len - max(0, far - f_o)
  start_new, stop_new = f_n, seq_len - max(0, far - f_n)
  return f_o, f_n, start_old, stop_old, start_new, stop_new


# ---------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------


def entropy_factor(W, concept_vecs, noise, *, sigma, bins) -> torch.Tensor:
  """docs/algorithm.md "Entropy factor e (per row of W)".

  Sample s of concept j is c_j + sigma * noise[j, s]; activations are stacked
  j-major into (d_out, m*S), min-max normalised per row (+1e-8), binned with
  torch.histc(bins, 0, 1) row by row, and e = 1 - H / log(bins).

  Args:
    W: (d_out, d_in).
    concept_vecs: (m, d_in) or a list of m (d_in,) vectors.
    noise: (m, S, d_in) standard normals.
  Returns:
    e: (d_out,) float64.
  """
  W = _t(W)
  noise = _t(noise)
  concepts = _rows(concept_vecs)
  out_dim = W.shape[0]
  acts = []
  for j, c in enumerate(concepts):
    for s in range(noise.shape[1]):
      x = c + sigma * noise[j, s]
      acts.append((W @ x).unsqueeze(1))  # (d_out, 1)
  acts = torch.cat(acts, dim=1)  # (d_out, m*S)
  min_v = acts.min(dim=1, keepdim=True).values
  max_v = acts.max(dim=1, keepdim=True).values
  acts = (acts - min_v) / (max_v - min_v + EPS)
  e = torch.zeros(out_dim, dtype=DTYPE)
  log_b = math.log(float(bins))
  for i in range(out_dim):
    hist = torch.histc(acts[i], bins=bins, min=0.0, max=1.0)
    p = hist / (hist.sum() + EPS)
    H = -(p * torch.log(p + EPS)).sum()
    e[i] = 1.0 - H / log_b
  return e


def mi_soft_mask(W, c_vec, empty_vec, pos_noise, neg_noise, *, sigma,
                 temperature, power, mode="released") -> torch.Tensor:
  """docs/algorithm.md "MI soft mask r_j (the Informax Decoupler)", `released` mode.

  Positives c + sigma * pos_noise[k], negatives e0 + sigma * neg_noise[k];
  acts = W [pos; neg]^T (d_out, 2K); per row the lower median tau, z = acts >
  tau, and the four counts (z vs label) formed in float32 as
  `.sum().float() + 1e-8`, divided by 2K, MI summed in the order 11, 10, 01,
  00 (float32). Then, in float64, mi_std = (mi - mean) / (std_unbiased +
  1e-8) and r = sigmoid(mi_std / T) ** p.

  mode "canonical" (scapre-jax's departure, docs/algorithm.md): the counts,
  probabilities and logs in the reference dtype, the four terms summed in
  ascending order.

  Args:
    W: (d_out, d_in); c_vec, empty_vec: (d_in,);
    pos_noise, neg_noise: (K, d_in) standard normals.
  Returns:
    r: (d_out,) float64.
  """
  W = _t(W)
  c_vec = _t(c_vec)
  empty_vec = _t(empty_vec)
  pos_noise = _t(pos_noise)
  neg_noise = _t(neg_noise)
  num_pos = pos_noise.shape[0]
  if neg_noise.shape[0] != num_pos:
    raise ValueError("pos_noise and neg_noise must have the same number of rows")
  out_dim = W.shape[0]
  pos = c_vec.repeat(num_pos, 1) + sigma * pos_noise
  neg = empty_vec.repeat(num_pos, 1) + sigma * neg_noise
  samples = torch.cat([pos, neg], dim=0)  # (2K, d_in)
  labels = torch.cat([torch.ones(num_pos), torch.zeros(num_pos)])
  acts = W @ samples.t()  # (d_out, 2K)
  tau = acts.median(dim=1, keepdim=True).values  # lower median
  Z = (acts > tau).long()
  mi = torch.zeros(out_dim, dtype=DTYPE)
  if mode not in ("released", "canonical"):
    raise ValueError(f"unknown mi mode {mode!r}")
  cell_dtype = torch.float32 if mode == "released" else DTYPE
  for i in range(out_dim):
    z = Z[i]
    cells = [int(((z == a) & (labels == b)).sum()) for a, b in ((1, 1), (1, 0), (0, 1), (0, 0))]
    mi[i] = mi_from_counts(*cells, dtype=cell_dtype, ordered=mode == "released")
  if mode == "released":
    mi_std = (mi - mi.mean()) / (mi.std() + EPS)  # std: unbiased (ddof = 1)
  else:  # canonical: around the minimum, so exact ties standardise to exactly 0
    low = mi.min()
    mean = low + (mi - low).mean()
    mi_std = (mi - mean) / ((mi - low).std() + EPS)
  r = torch.sigmoid(mi_std / temperature) ** power
  return r.to(DTYPE)


def mi_from_counts(n11: int, n10: int, n01: int, n00: int, *, dtype=torch.float32,
                   ordered: bool = True) -> float:
  """The MI of one row's 2x2 table: cells `.sum().float() + 1e-8` (float32,
  as the released code, whatever the model dtype), divided by 2K, terms
  p_ab log(p_ab / (p_a. p_.b)) summed in the order 11, 10, 01, 00
  (`ordered`), or ascending (canonical mode, in `dtype`)."""
  two_k = n11 + n10 + n01 + n00
  p11, p10, p01, p00 = ((torch.tensor(n).to(dtype) + EPS) / two_k
                        for n in (n11, n10, n01, n00))
  p1_ = p11 + p10
  p0_ = p01 + p00
  p_1 = p11 + p01
  p_0 = p10 + p00
  terms = [p11 * torch.log(p11 / (p1_ * p_1)), p10 * torch.log(p10 / (p1_ * p_0)),
           p01 * torch.log(p01 / (p0_ * p_1)), p00 * torch.log(p00 / (p0_ * p_0))]
  if not ordered:
    terms = sorted(terms, key=float)
  value = terms[0]
  for term in terms[1:]:
    value = value + term
  return float(value)


def ased_regulariser(C, mu, *, temperature, power) -> torch.Tensor:
  """docs/algorithm.md "Large-scale solver" step 2 (ASED spectral regulariser).

  Thin SVD C^T = U diag(s) V^T; gate = sigmoid((s - lower_median(s)) /
  (T_sigma + 1e-8)) ** p_sigma; R = U diag((1 - gate) * mu) U^T.

  Args:
    C: (m, d_in) stacked concept vectors; mu: float.
  Returns:
    R: (d_in, d_in).
  """
  C = _stack_concepts(C)
  U, s, _ = torch.linalg.svd(C.t(), full_matrices=False)  # U: (d_in, r)
  med = lower_median(s)
  gate = torch.sigmoid((s - med) / (temperature + EPS)) ** power
  reg_diag = (1.0 - gate) * mu
  return U @ torch.diag(reg_diag) @ U.t()


def concept_projector(C) -> torch.Tensor:
  """docs/algorithm.md "Large-scale solver" step 4, the released formula.

  Pi = C^T (C C^T + 1e-8 I)^{-1} C, shape (d_in, d_in).
  """
  C = _stack_concepts(C)
  Ct = C.t()  # (d_in, m), the released C_full
  gram = Ct.t() @ Ct  # (m, m) = C C^T
  m = gram.shape[0]
  return Ct @ torch.linalg.inv(gram + EPS * torch.eye(m, dtype=DTYPE)) @ Ct.t()


def targets(W, old_seq, new_seq, technique) -> torch.Tensor:
  """docs/algorithm.md "Per matrix W (shared pieces)": target values V_j.

  replace: V_j = Y_j W^T. tensor: u = X_j W^T / ||X_j W^T||_F, v = Y_j W^T,
  V_j = v - <u, v>_F u.

  Returns:
    V_j: (L_j, d_out).
  """
  W = _t(W)
  old_seq = _t(old_seq)
  new_seq = _t(new_seq)
  if technique == "replace":
    return new_seq @ W.t()
  if technique == "tensor":
    u = old_seq @ W.t()
    u = u / u.norm()
    v = new_seq @ W.t()
    return v - (u * v).sum() * u
  raise ValueError(f"unknown technique {technique!r}")


def _outer_sum(left_rows: torch.Tensor, right_rows: torch.Tensor) -> torch.Tensor:
  """sum_l outer(left_rows[l], right_rows[l]), a loop over sequence rows."""
  total = torch.zeros(left_rows.shape[1], right_rows.shape[1], dtype=DTYPE)
  for l in range(left_rows.shape[0]):
    total = total + torch.outer(left_rows[l], right_rows[l])
  return total


def bures_prox(W0, We, *, mu, lam_prox, iters) -> torch.Tensor:
  """docs/algorithm.md "Large-scale solver" step 7 (Bures proximal step), per row.

  a = ||w_e||, u_a = w_e / a, r0 = ||w_0||, u0 = w_0 / r0 (norms clamped to
  >= 1e-8); u = u_a; repeat max(1, iters) times: kappa = max(u . u0, 0),
  r = (lam_p a + mu r0 kappa) / (lam_p + mu), u = normalise(lam_p a u_a +
  mu r0 kappa u0). Row result r u.
  """
  W0 = _t(W0)
  We = _t(We)
  out = torch.empty_like(W0)
  for i in range(W0.shape[0]):
    a = We[i].norm().clamp_min(EPS)
    u_a = We[i] / a
    r0 = W0[i].norm().clamp_min(EPS)
    u0 = W0[i] / r0
    u = u_a.clone()
    r = a.clone()
    for _ in range(max(1, int(iters))):
      kappa = torch.clamp((u * u0).sum(), min=0.0)
      r = (lam_prox * a + mu * r0 * kappa) / (lam_prox + mu)
      num = lam_prox * a * u_a + mu * r0 * kappa * u0
      u = num / num.norm().clamp_min(EPS)
    out[i] = r * u
  return out


def egbr(W0, Wb, h) -> torch.Tensor:
  """docs/algorithm.md "Large-scale solver" step 8 (EGBR safety valve), per row.

  alpha = 1 - exp(-h / max(max(h), 1e-6)); beta = alpha * max(cos(w0, wb), 0);
  direction normalise((1 - beta) u0 + beta ub); squared norm
  exp((1 - alpha) log ||w0||^2 + alpha log ||wb||^2). Norms clamped >= 1e-8.
  """
  W0 = _t(W0)
  Wb = _t(Wb)
  h = _t(h)
  h_max = h.max().clamp_min(1e-6)
  out = torch.empty_like(W0)
  for i in range(W0.shape[0]):
    alpha = 1.0 - torch.exp(-h[i] / h_max)
    n0 = W0[i].norm().clamp_min(EPS)
    nb = Wb[i].norm().clamp_min(EPS)
    u0 = W0[i] / n0
    ub = Wb[i] / nb
    cos = (u0 * ub).sum()
    beta = alpha * torch.clamp(cos, min=0.0)
    direction = (1.0 - beta) * u0 + beta * ub
    direction = direction / direction.norm().clamp_min(EPS)
    energy = torch.exp((1.0 - alpha) * torch.log(n0 ** 2) + alpha * torch.log(nb ** 2))
    out[i] = torch.sqrt(energy) * direction
  return out


def spectral_residual_term(W, C, *, temperature, power) -> torch.Tensor:
  """docs/algorithm.md "Small-scale solver", the optional spectral residual (--svd).

  Thin SVD C^T = U diag(s) V^T; w = sigmoid((s - lower_median(s)) /
  (T_sigma + 1e-8)) ** p_sigma; P = I - U diag(w) U^T; C_res = P C^T.
  Returns (W C_res) C_res^T, shape (d_out, d_in) (the caller subtracts
  eta_res times it from mat1).
  """
  W = _t(W)
  C = _stack_concepts(C)
  d_in = C.shape[1]
  U, s, _ = torch.linalg.svd(C.t(), full_matrices=False)
  w = torch.sigmoid((s - lower_median(s)) / (temperature + EPS)) ** power
  P = torch.eye(d_in, dtype=DTYPE) - (U * w.unsqueeze(0)) @ U.t()
  C_res = P @ C.t()  # (d_in, m)
  return (W @ C_res) @ C_res.t()


def scapre_row_solve(G, Pi, B, alpha) -> torch.Tensor:
  """docs/algorithm.md "Large-scale solver" step 6: w_i (G + alpha_i Pi) = b_i.

  One Cholesky factorisation and one cholesky_solve per row, as the released
  code does. G, Pi: (d_in, d_in) symmetric; B: (d_out, d_in); alpha: (d_out,).
  Returns W_e (d_out, d_in).
  """
  G = _t(G)
  Pi = _t(Pi)
  B = _t(B)
  alpha = _t(alpha)
  We = torch.empty_like(B)
  for i in range(B.shape[0]):
    alpha_i = float(alpha[i].item())
    M_i = G + alpha_i * Pi
    b_i = B[i].unsqueeze(1)  # (d_in, 1)
    L = torch.linalg.cholesky(M_i)
    We[i] = torch.cholesky_solve(b_i, L).squeeze(1)
  return We


# ---------------------------------------------------------------------------
# Whole edit of one matrix
# ---------------------------------------------------------------------------


def _preserve_gamma(config, num_preserve: int) -> float:
  if config.preserve_scale is not None:
    return float(config.preserve_scale)
  return max(0.1, 1.0 / (1 + num_preserve))


def _preserve_gram(preserve_seqs, d_in: int) -> torch.Tensor:
  """sum_k P_k^T P_k as a loop over preserve prompts and their rows."""
  total = torch.zeros(d_in, d_in, dtype=DTYPE)
  for P in preserve_seqs:
    P = _t(P)
    total = total + _outer_sum(P, P)
  return total


def _mi_masks(W, concepts, empty_vec, noise, config) -> list[torch.Tensor]:
  """r_j for every concept (ones when the mask is off)."""
  out_dim = W.shape[0]
  if not config.mi_mask:
    return [torch.ones(out_dim, dtype=DTYPE) for _ in concepts]
  pos_all = _t(noise["mi_pos"])
  neg_all = _t(noise["mi_neg"])
  if pos_all.shape[1] != config.mi_num_pos or neg_all.shape[1] != config.mi_num_pos:
    raise ValueError(
        f"MI noise must have K = mi_num_pos = {config.mi_num_pos} rows per concept, "
        f"got {tuple(pos_all.shape)} and {tuple(neg_all.shape)}")
  masks = []
  for j, c in enumerate(concepts):
    masks.append(mi_soft_mask(
        W, c, empty_vec, pos_all[j], neg_all[j], sigma=config.noise_sigma,
        temperature=config.mi_temperature, power=config.p, mode=config.mi_mode))
  return masks


def reference_edit(W, concept_vecs, empty_vec, old_seqs, new_seqs, config,
                   noise, preserve_seqs=()) -> torch.Tensor:
  """Edits one matrix W (d_out, d_in) with config.method; returns (d_out, d_in).

  Args:
    W: (d_out, d_in) original weights.
    concept_vecs: (m, d_in) (or a list of m (d_in,) vectors) c_j.
    empty_vec: (d_in,) e0.
    old_seqs, new_seqs: lists of m tensors (L_j, d_in), X_j and Y_j (ragged).
    config: scapre_jax.config.EditConfig.
    noise: dict of standard normals: "mi_pos" (m, K, d_in), "mi_neg"
      (m, K, d_in), "entropy" (m, S, d_in).
    preserve_seqs: list of (L_k, d_in) preserve sequences P_k.

  Methods:
    "scapre": docs/algorithm.md "Large-scale solver" steps 1-8.
    "scapre-small": docs/algorithm.md "Small-scale solver".
    "uce": docs/algorithm.md "Baseline: UCE".
  """
  method = config.method
  if method not in ("scapre", "scapre-small", "uce"):
    raise ValueError(f"unknown method {method!r}")
  W = _t(W)
  concepts = _rows(concept_vecs)
  empty_vec = _t(empty_vec)
  old_seqs = [_t(x) for x in old_seqs]
  new_seqs = [_t(y) for y in new_seqs]
  preserve_seqs = [_t(p) for p in preserve_seqs]
  m = len(concepts)
  if len(old_seqs) != m or len(new_seqs) != m:
    raise ValueError(
        f"need one old and one new sequence per concept: m={m}, "
        f"got {len(old_seqs)} and {len(new_seqs)}")
  out_dim, in_dim = W.shape
  eye = torch.eye(in_dim, dtype=DTYPE)
  lamb = float(config.lamb)
  eta = float(config.erase_scale)
  gamma = _preserve_gamma(config, len(preserve_seqs))
  C = torch.stack(concepts, dim=0)  # (m, d_in)
  CCt = C.t() @ C  # (d_in, d_in) = sum_j c_j c_j^T
  pres = _preserve_gram(preserve_seqs, in_dim)

  def entropy():
    return entropy_factor(W, concepts, _t(noise["entropy"]),
                          sigma=config.noise_sigma, bins=config.entropy_bins)

  if method == "uce":
    mat1 = lamb * W.clone()
    mat2 = lamb * eye.clone()
    for j in range(m):
      V_j = targets(W, old_seqs[j], new_seqs[j], config.technique)
      mat1 = mat1 + eta * _outer_sum(V_j, old_seqs[j])
      mat2 = mat2 + eta * _outer_sum(old_seqs[j], old_seqs[j])
    mat1 = mat1 + gamma * (W @ pres)
    mat2 = mat2 + gamma * pres
    return mat1 @ torch.inverse(mat2)

  r = _mi_masks(W, concepts, empty_vec, noise, config)

  if method == "scapre-small":
    mat1 = lamb * W.clone()
    mat2 = lamb * eye + CCt
    for j in range(m):
      V_j = targets(W, old_seqs[j], new_seqs[j], config.technique)
      A_j = _outer_sum(V_j, old_seqs[j])  # (d_out, d_in)
      S_j = _outer_sum(old_seqs[j], old_seqs[j])  # (d_in, d_in)
      mat1 = mat1 + eta * (A_j * r[j].unsqueeze(1))
      mat2 = mat2 + eta * S_j
    mat1 = mat1 + gamma * (W @ pres)
    mat2 = mat2 + gamma * pres
    if config.spectral_residual:
      eta_res = eta if config.residual_scale is None else float(config.residual_scale)
      mat1 = mat1 - eta_res * spectral_residual_term(
          W, C, temperature=config.spectral_temperature, power=config.spectral_power)
    W_new = mat1 @ torch.inverse(mat2)
    e = entropy()
    a = config.alpha_min + (1.0 - config.alpha_min) * e
    return a.unsqueeze(1) * W_new + (1.0 - a).unsqueeze(1) * W

  # method == "scapre": the large-scale solver.
  # 1. entropy, h, mu.
  e = entropy()
  h = torch.clamp(1.0 - e, min=0.0, max=1.0)
  mu = float(h.mean().item())
  # 2. ASED.
  if config.ased:
    R = ased_regulariser(C, mu, temperature=config.spectral_temperature,
                         power=config.spectral_power)
  else:
    R = torch.zeros(in_dim, in_dim, dtype=DTYPE)
  # 3. r_max over the same per-concept masks.
  r_max = torch.max(torch.stack(r, dim=-1), dim=-1).values  # (d_out,)
  # 4. projector.
  Pi = concept_projector(C)
  # 5. V, S, G, B.
  V = torch.zeros(out_dim, in_dim, dtype=DTYPE)
  S = torch.zeros(in_dim, in_dim, dtype=DTYPE)
  for j in range(m):
    V_j = targets(W, old_seqs[j], new_seqs[j], config.technique)
    A_j = _outer_sum(V_j, old_seqs[j])
    S_j = _outer_sum(old_seqs[j], old_seqs[j])
    V = V + eta * (A_j * r[j].unsqueeze(1))
    S = S + eta * S_j
  lam_mu = lamb + mu
  G = lam_mu * eye + R + CCt + S + gamma * pres
  B = lam_mu * W + V + gamma * (W @ pres)
  # 6. per-row Cholesky solves.
  alpha = eta * r_max
  We = scapre_row_solve(G, Pi, B, alpha)
  # 7. Bures proximal step.
  Wb = bures_prox(W, We, mu=mu, lam_prox=lam_mu, iters=config.bures_iters)
  # 8. EGBR.
  if config.egbr:
    return egbr(W, Wb, h)
  return Wb
