#!/usr/bin/env python
"""Where the float32 error of a mask-off ScaPre edit comes from, on one matrix.

A companion to scripts/float32_accuracy.py (BENCHMARKS.md, "float32 against
float64, end to end"). On the first cross-attention matrix of the built-in
768-wide tiny model (or --model), preset `scapre-nsfw` (no MI mask, no ASED,
no preserve prompts, so alpha = eta on every row), the step-6 system
w (G + alpha Pi) = b is built in float64 and then:

  solve      the float64 system rounded to float32, solved in float32 for W'
             by the engine's G-form solver (Cholesky + Woodbury) and by per-row LAPACK
             Cholesky (the released code's solve, `reference.scapre_row_solve`);
  formation  G and b built in float32 from the float64 text (ours: b formed as
             eta W (sum Y^T X), as the engine did before the correction form;
             released: its per-concept loops), solved exactly;
  variants   the same float32 solve for W' with b built in the released order
             sum_j (W Y_j^T) X_j, and with one float32 refinement step;
  correction the G form: W' = W + D, D solved in
             float32 from B - W G - alpha W Pi formed term by term
             (`edit.scapre_correction`, docs/algorithm.md "The correction form");
  factor     the engine's form: the text rows Z = Q R compressed once, then
             D = (H Q) (cI + R R^T)^(-1) R with the projector through an (r, r)
             eigendecomposition (`edit.factor_coefficients`,
             `solvers.solve_factored_row_sylvester`, docs/algorithm.md "The
             factor form").

Every error is ||got - exact|| / ||exact|| against the float64 solution.

  python scripts/float32_solve_split.py
"""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", help="diffusers folder (default: the built-in tiny model)")
  parser.add_argument("--concepts", default="nudity, naked, sexual")
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from scapre_jax import edit, erase, models, precision, reference, requests, tiny, verify
  from scapre_jax._src import solvers, targets
  from scapre_jax.config import EditConfig

  precision.enable_x64()
  config = EditConfig.preset("scapre-nsfw")
  assert not config.mi_mask and not config.ased
  model = models.load_model(args.model or tiny.ensure_tiny_model(), dtype="float64")
  name, kernel = next(iter(models.cross_attention_kernels(model.unet_params).items()))
  concept_set = requests.ConceptSet("set", requests.parse_concepts(args.concepts),
                                    preset="scapre-nsfw")
  request = erase.encode_set(model, concept_set, config)
  key = jax.random.key(0)

  def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))

  def system(weight, inputs, dtype):
    """(G, U, b, alpha, mu) as the engine builds them, in `dtype`."""
    stats = edit.concept_statistics(inputs, config, dtype)
    noise = precision.cast(edit.probe_noise(key, inputs, config, jnp.float32),
                           "float64" if dtype == jnp.float64 else "float32")
    mu = jnp.mean(jnp.clip(1 - edit.row_entropy(weight, inputs, noise, config), 0, 1))
    mask = inputs.seq_mask & inputs.concept_mask[:, None]
    yx = targets.cross_covariance(inputs.new_seqs, inputs.old_seqs, mask)
    b = (config.lamb + mu) * weight + config.erase_scale * targets.matmul(weight, yx)
    alpha = jnp.full(weight.shape[:1], config.erase_scale, dtype)
    return edit.scapre_gram(stats, config, mu), stats.projector_basis, b, alpha, mu

  inputs64 = request.inputs
  inputs32 = precision.cast(inputs64, "float32")
  w64 = kernel.T
  w32 = w64.astype(jnp.float32)
  g64, u64, b64, a64, mu64 = system(w64, inputs64, jnp.float64)
  exact = edit.solve_scapre_system(g64, u64, b64, a64)
  to32 = lambda *xs: [jnp.asarray(x, jnp.float32) for x in xs]
  to64 = lambda *xs: [jnp.asarray(x, jnp.float64) for x in xs]
  eig = np.linalg.eigvalsh(np.asarray(g64))
  print(f"{name}: d_out {w64.shape[0]}, d_in {w64.shape[1]}, cond(G) {eig[-1] / eig[0]:.1e}")

  g, u, b, a = to32(g64, u64, b64, a64)
  projector = np.asarray(u64) @ np.asarray(u64).T
  with reference.precision(torch.float32), torch.no_grad():
    rows = reference.scapre_row_solve(*(torch.from_numpy(np.asarray(x, np.float32)) for x in (
        g64, projector, b64, a64))).numpy()
  print(f"solve      G form {rel(edit.solve_scapre_system(g, u, b, a), exact):.2e}   "
        f"per-row Cholesky {rel(rows, exact):.2e}")

  g32, u32, b32, a32, mu32 = system(w32, inputs32, jnp.float32)
  ours_g = edit.solve_scapre_system(*to64(g32), u64, b64, a64)
  ours_b = edit.solve_scapre_system(g64, u64, *to64(b32), a64)
  vecs, _, old, new, _ = verify.encode_reference_inputs(
      model.path, request.prompts, request.guides, request.preserve, torch.float64)
  wt = torch.from_numpy(np.array(w32))
  d_in = wt.shape[1]
  lam_mu = config.lamb + torch.tensor(float(mu32))
  s_sum, v_sum = torch.zeros(d_in, d_in), torch.zeros(wt.shape[0], d_in)
  for x, y in zip(old, new):  # the released code's per-concept loop
    x, y = x.float(), y.float()
    v_sum = v_sum + config.erase_scale * ((y @ wt.T).T @ x)
    s_sum = s_sum + config.erase_scale * (x.T @ x)
  c = vecs.float()
  rel_g = lam_mu * torch.eye(d_in) + c.T @ c + s_sum
  rel_b = lam_mu * wt + v_sum
  theirs_g = edit.solve_scapre_system(jnp.asarray(rel_g.double().numpy()), u64, b64, a64)
  theirs_b = edit.solve_scapre_system(g64, u64, jnp.asarray(rel_b.double().numpy()), a64)
  print(f"formation  ours: G {rel(ours_g, exact):.2e}  b {rel(ours_b, exact):.2e}   "
        f"released: G {rel(theirs_g, exact):.2e}  b {rel(theirs_b, exact):.2e}")

  mask = inputs32.seq_mask & inputs32.concept_mask[:, None]
  values = targets.target_values(w32, inputs32.old_seqs, inputs32.new_seqs, mask,
                                 technique=config.technique)
  ones = jnp.broadcast_to(inputs32.concept_mask[:, None],
                          (values.shape[0], values.shape[2])).astype(jnp.float32)
  b_rows = (config.lamb + mu32) * w32 + config.erase_scale * targets.einsum(
      "mo,mlo,mli->oi", ones, values, inputs32.old_seqs)

  def apply(w):
    return targets.matmul(w, g32) + a32[:, None] * targets.matmul(targets.matmul(w, u32), u32.T)

  for label, rhs in (("G-form b", b32), ("released-order b", b_rows)):
    plain = edit.solve_scapre_system(g32, u32, rhs, a32)
    refined = plain + edit.solve_scapre_system(g32, u32, rhs - apply(plain), a32)
    print(f"variants   {label}: plain {rel(plain, exact):.2e}  one refinement step "
          f"{rel(refined, exact):.2e}")

  correction = edit.scapre_correction(w32, inputs32, edit.concept_statistics(
      inputs32, config, jnp.float32), a32, mu32, config)
  print(f"correction the G form, W + (D solved from B - W G - alpha W Pi): "
        f"{rel(w32 + edit.solve_scapre_system(g32, u32, correction, a32), exact):.2e}")

  def factor_solve(weight, inputs, basis, alpha, mu):
    stats = edit.concept_statistics(inputs, config, weight.dtype)
    coeffs = edit.factor_coefficients(weight, inputs, stats, config, None)
    return weight + solvers.solve_factored_row_sylvester(
        stats.factor.rows, coeffs, config.lamb + mu, basis, alpha,
        -alpha[:, None] * targets.matmul(weight, basis))

  print(f"factor     the engine's form: float64 "
        f"{rel(factor_solve(w64, inputs64, u64, a64, mu64), exact):.1e} (the same system)   "
        f"float32 {rel(factor_solve(w32, inputs32, u, a, mu32), exact):.2e}")


if __name__ == "__main__":
  main()
