"""Float32 accuracy of forms of the step-6 solve on SD-1.5-shaped systems.

docs/algorithm.md step 6: w_i (G + alpha_i Pi) = b_i. The system is built as the
engine builds it, from the statistics of N concepts encoded by the
benchmark's CLIP-L-sized text encoder (`scripts/bench_edit.py`), the first
of the narrowest to_k matrices (320 wide on SD 1.5), mu = --mu and alpha_i
drawn from 8 levels in (0, eta].
Each form runs in float32 on the same float32 inputs and is compared with
float64 solves of those inputs, one `numpy.linalg.solve` per alpha level;
the error is max |got - exact| / max |exact|.

Forms:
- released: one Cholesky factorisation per row (here per alpha level), as
  the released code solves;
- engine: `edit.solve_scapre_system`, what the engine runs;
- woodbury: `solvers.solve_row_sylvester_woodbury` (Cholesky of G, Woodbury in
  the concept basis), at every rank;
- two_eigh: `solvers.solve_row_sylvester`, the closed form of docs/algorithm.md;
- shared_eigh: a form the engine does not use. G = A + mu (I + ASED) where
  A = lambda I + CCt + eta S + preserve is the same for every matrix of a
  set, so one eigendecomposition of A per set would serve all 32 matrices
  (mu I is diagonal in A's eigenbasis; ASED and Pi are absorbed by Woodbury
  in the concept basis U). It replaces every per-matrix factorization by
  matrix products, which is what a GPU batches well; this script measures
  what it costs in accuracy.

  python scripts/solver_accuracy.py --concepts 10 50 500 1000 \
      --json benchmarks/cpu/solver_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_edit  # noqa: E402

from scapre_jax import edit, text  # noqa: E402
from scapre_jax._src import solvers, spectral  # noqa: E402
from scapre_jax._src.targets import matmul  # noqa: E402
from scapre_jax.config import EditConfig  # noqa: E402


FORMS = ("released", "engine", "woodbury", "two_eigh", "shared_eigh")


def solve_shared_eigh(eigvals, eigvecs, basis, scale, keep, mu, rhs, alpha):
  """w_i (Q diag(a) Q^T + mu I + mu U diag(scale) U^T + alpha_i U_k U_k^T) = b_i,
  U_k = U * keep, from the eigendecomposition (a, Q) of the shared part.

  With At = A + mu I, F = At^-1 U, M = U^T F and s = sqrt(mu scale):
  G^-1 = At^-1 - F s N^-1 s F^T with N = I + s M s (SPD), so
  G^-1 U = F - (F s) N^-1 s M and U^T G^-1 U = M - (M s) N^-1 s M; the
  alpha_i U_k U_k^T part is the engine's Woodbury step on top.
  """
  inv = 1 / (eigvals + mu)
  coords = matmul(eigvecs.T, basis)  # Q^T U
  rq = matmul(rhs, eigvecs) * inv  # B At^-1 Q
  fq = inv[:, None] * coords  # Q^T F
  m = matmul(coords.T, fq)
  s = jnp.sqrt(mu * scale)
  n = jnp.eye(m.shape[0], dtype=m.dtype) + s[:, None] * m * s[None, :]
  t = jnp.linalg.solve(n, s[:, None] * m)  # N^-1 s M
  g_basis = fq - matmul(fq * s, t)  # Q^T G^-1 U
  gram_basis = m - matmul(m * s, t)  # U^T G^-1 U
  zq = rq - matmul(matmul(matmul(rq, coords) * s, jnp.linalg.inv(n)), (fq * s).T)  # B G^-1 Q
  kept = jnp.where(keep[:, None] & keep[None, :], (gram_basis + gram_basis.T) / 2, 0)
  kappa, e = jnp.linalg.eigh(kept)
  f = matmul(g_basis * keep, e)
  y = matmul(matmul(zq, coords * keep), e)
  factor = alpha[:, None] / (1 + alpha[:, None] * kappa[None, :])
  return matmul(zq - matmul(y * factor, f.T), eigvecs.T)


def measure(model, kernels, n: int, mu: float, seed: int) -> dict:
  config = EditConfig.preset("scapre")
  inputs = text.build_concept_inputs(model, bench_edit.concept_names(n)).inputs
  stats = edit.concept_statistics(inputs, config, jnp.float32)
  basis = spectral.concept_basis(inputs.concept_vecs, inputs.concept_mask)
  gate = spectral.spectral_gate(basis, temperature=config.spectral_temperature,
                                power=config.spectral_power)
  scale = jnp.where(basis.valid, 1 - gate, 0).astype(jnp.float32)
  u = basis.u.astype(jnp.float32)
  u_kept = stats.projector_basis
  keep = jnp.any(u_kept != 0, axis=0)
  width = min(k.shape[1] for k in kernels.values())  # 320 on SD 1.5
  name = next(k for k in kernels if kernels[k].shape[1] == width and "/to_k/" in k)
  weight = jnp.asarray(kernels[name]).T
  eta, lamb = config.erase_scale, config.lamb
  shared = edit.scapre_gram(stats, config, 0.0)  # A: the part without mu
  gram = edit.scapre_gram(stats, config, mu)
  rhs = (lamb + mu) * weight + eta * matmul(weight, stats.shift + stats.xx)
  rng = np.random.default_rng(seed)
  levels = np.linspace(eta / 8, eta, 8, dtype=np.float32)
  alpha = jnp.asarray(levels[rng.integers(0, 8, weight.shape[0])])

  u64 = np.asarray(u_kept, np.float64)
  g64, pi64 = np.asarray(gram, np.float64), u64 @ u64.T
  b64, a64 = np.asarray(rhs, np.float64), np.asarray(alpha, np.float64)
  exact = np.zeros_like(b64)
  for level in np.unique(a64):
    rows = a64 == level
    exact[rows] = np.linalg.solve((g64 + level * pi64).T, b64[rows].T).T

  eigvals, eigvecs = jnp.linalg.eigh(shared)

  def released(gram, u_kept, rhs, alpha):  # one Cholesky per row, as released;
    out = jnp.zeros_like(rhs)              # rows of one alpha share it
    for level in levels:
      solved = solvers.solve_spd_right(rhs, gram + level * matmul(u_kept, u_kept.T))
      out = jnp.where((alpha == level)[:, None], solved, out)
    return out

  two_eigh = lambda gram, u_kept, rhs, alpha: solvers.solve_row_sylvester(
      gram, matmul(u_kept, u_kept.T), rhs, alpha)
  system = (gram, u_kept, rhs, alpha)
  forms = {"released": (released, system), "engine": (edit.solve_scapre_system, system),
           "woodbury": (solvers.solve_row_sylvester_woodbury, system),
           "two_eigh": (two_eigh, system),
           "shared_eigh": (solve_shared_eigh, (eigvals, eigvecs, u, scale, keep,
                                               jnp.float32(mu), rhs, alpha))}
  scale_max = np.abs(exact).max()
  errors = {}
  for form, (fn, args) in forms.items():  # arrays as arguments: no constant folding
    got = jax.jit(fn)(*args)
    errors[form] = float(np.abs(np.asarray(got, np.float64) - exact).max() / scale_max)
  return {"concepts": n, "matrix": name, "mu": mu, "rank": int(jnp.sum(keep)),
          "gram_condition": float(np.linalg.cond(g64)), "rel_error_f32": errors}


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--concepts", type=int, nargs="+", default=[10, 50])
  parser.add_argument("--mu", type=float, default=0.3)
  parser.add_argument("--family", "--shapes", dest="family", default="sd15",
                      choices=sorted(bench_edit.FAMILIES))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", type=pathlib.Path, default=None)
  args = parser.parse_args(argv)
  model = bench_edit.build_model(args.family, args.seed)
  kernels = bench_edit.unet_kernels(bench_edit.FAMILIES[args.family], args.seed)
  results = []
  print("| N | rank | cond(G) | " + " | ".join(FORMS) + " |")
  print("|" + "---|" * (3 + len(FORMS)))
  for n in args.concepts:
    r = measure(model, kernels, n, args.mu, args.seed)
    results.append(r)
    e = r["rel_error_f32"]
    print(f"| {n} | {r['rank']} | {r['gram_condition']:.1e} | "
          + " | ".join(f"{e[f]:.1e}" for f in FORMS) + " |", flush=True)
  if args.json:
    command = "python scripts/solver_accuracy.py " + shlex.join(
        sys.argv[1:] if argv is None else list(argv))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": command, "machine": bench_edit.machine(),
                                     "results": results}, indent=1))
  return results


if __name__ == "__main__":
  main()
