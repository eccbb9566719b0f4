#!/usr/bin/env python
"""The released ScaPre procedure in PyTorch float32, timed on the inputs of
one `scripts/bench_edit.py` configuration: the reference column of
BENCHMARKS.md.

It is built from the per-row functions of `scapre_jax.reference` in the loop
order of the released erase_scale.py (text encoder re-run per matrix and
concept, MI masks and histograms per row, one Cholesky per row), and the
same with the encoding hoisted out. It is timed on a sample (one matrix per
distinct d_out, a few concepts, a few encoder calls) and scaled up; every
factor is written to the JSON. `reference_solve_s` is the reference's
per-matrix work, like for like with bench_edit's `ours_solve_s`;
`reference_linear_solve_s` (its per-row Cholesky solves) pairs with
`ours_linear_solve_s` (our step 6). Without a GPU build of PyTorch the
reference runs on the CPU.

bench_edit.py runs it for every configuration unless `--no-reference`:

  python scripts/bench_edit.py --concepts 10 50 100 --json benchmarks/cpu/edit.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
import transformers

import convert
from scapre_jax import edit, models
from scapre_jax import reference as ref


def _stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def versions() -> dict[str, Any]:
  """The PyTorch side of the machine record."""
  return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
          "transformers": transformers.__version__}


def torch_text_encoder(config: Mapping[str, Any], params) -> transformers.CLIPTextModel:
  """transformers' PyTorch CLIPTextModel (float32, eval mode) holding the Flax
  text-encoder `params` of `config`, mapped by `convert.CLIP_TEXT`."""
  abstract = models.abstract_params("text_encoder", dict(config))
  encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(dict(config)))
  state = convert.CLIP_TEXT.to_torch(params, abstract)
  encoder.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32))
                           for k, v in state.items()})
  return encoder.eval()


def bench_reference(tokenizer, encoder, kernels, request, config, *, sample_concepts,
                    sample_encodes, rows, seed, log: Callable[[str], None] = _stderr):
  """The released procedure in torch float32, timed on a sample and scaled.

  Per distinct d_out one matrix stands for all of that width. Per matrix, as
  erase_scale.py: the entropy factor (histc per row), MI masks per concept
  for r_max, then per concept the text encoder on [old, new], the target
  values of every layer of this projection type (the released loop computes
  all 16 and keeps one), the batched outer-product sums, the MI mask again,
  then one Cholesky per row and the Bures step. `encoder` is the PyTorch
  copy of the text encoder (`torch_text_encoder`) that encoded `request`.
  """
  inputs = request.inputs
  m = inputs.num_concepts
  q = min(sample_concepts, m)
  length = tokenizer.model_max_length
  f32 = lambda x: torch.from_numpy(np.array(x, np.float32))
  concept_vecs = f32(inputs.concept_vecs)
  empty_vec = f32(inputs.empty_vec)
  old_seqs, new_seqs = np.asarray(inputs.old_seqs), np.asarray(inputs.new_seqs)
  seq_mask = np.asarray(inputs.seq_mask)
  xs = [f32(old_seqs[j][seq_mask[j]]) for j in range(q)]
  ys = [f32(new_seqs[j][seq_mask[j]]) for j in range(q)]
  rng = np.random.default_rng([seed, 3])
  d_in = inputs.d_in
  ent_noise = f32(rng.standard_normal((m, config.entropy_samples, d_in)))
  pos_noise = f32(rng.standard_normal((q, config.mi_num_pos, d_in)))
  neg_noise = f32(rng.standard_normal((q, config.mi_num_pos, d_in)))
  eta, lamb = config.erase_scale, config.lamb
  stats32 = edit.concept_statistics(inputs, config, jnp.float32)
  xx = f32(np.asarray(stats32.xx))
  projector64 = ref.concept_projector(concept_vecs)  # float64, the released formula

  def encode(prompts):
    tok = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt")
    return encoder(tok.input_ids)[0], tok.attention_mask

  out: dict[str, Any] = {}
  with ref.precision(torch.float32), torch.no_grad():
    # Text side: one batch of every erased prompt + the empty prompt (once),
    # then [old, new] per concept and matrix.
    log("reference: encoding")
    start = time.perf_counter()
    encode(list(request.prompts))
    encode([""])
    out["reference_encode_once_s"] = time.perf_counter() - start
    pairs = list(zip(request.prompts, request.guides))
    encode(list(pairs[0]))  # warm-up
    k = min(sample_encodes, m)
    start = time.perf_counter()
    for pair in pairs[:k]:
      encode(list(pair))
    t_pair = (time.perf_counter() - start) / k

    start = time.perf_counter()
    projector = ref.concept_projector(concept_vecs)
    t_projector = time.perf_counter() - start

    by_width: dict[int, list[str]] = {}
    for name, kernel in kernels.items():
      by_width.setdefault(kernel.shape[1], []).append(name)
    per_width = {}
    accuracy = None
    for d_out, names in by_width.items():
      name = names[0]
      log(f"reference: matrices of width {d_out}")
      proj = "to_k" if "/to_k/" in name else "to_v"
      weight = f32(np.asarray(kernels[name]).T)
      same_type = [n for n in kernels if f"/{proj}/" in n]
      layers = [f32(np.asarray(kernels[n]).T) for n in same_type]
      index = same_type.index(name)
      r = d_out if rows is None else min(rows, d_out)
      row_scale = d_out / r
      t = {}
      start = time.perf_counter()
      e = ref.entropy_factor(weight[:r], concept_vecs, ent_noise, sigma=config.noise_sigma,
                             bins=config.entropy_bins)
      t["entropy"] = (time.perf_counter() - start) * row_scale
      mu = float(torch.clamp(1 - e, 0, 1).mean())
      mask = lambda j: ref.mi_soft_mask(
          weight[:r], concept_vecs[j], empty_vec, pos_noise[j], neg_noise[j],
          sigma=config.noise_sigma, temperature=config.mi_temperature, power=config.p)
      if config.mi_mask:
        start = time.perf_counter()
        masks = [mask(j) for j in range(q)]
        # Twice per concept: once for r_max, once in the accumulation loop.
        t["mi_mask"] = 2 * (time.perf_counter() - start) * row_scale * m / q
      else:
        masks = [torch.ones(r) for _ in range(q)]
        t["mi_mask"] = 0.0
      start = time.perf_counter()
      ased = (ref.ased_regulariser(concept_vecs, mu, temperature=config.spectral_temperature,
                                   power=config.spectral_power)
              if config.ased else torch.zeros(d_in, d_in))
      t["ased"] = time.perf_counter() - start
      start = time.perf_counter()
      value_sum, square_sum = torch.zeros(d_out, d_in), torch.zeros(d_in, d_in)
      for j in range(q):
        values = [ref.targets(w, xs[j], ys[j], config.technique) for w in layers]
        v = values[index]
        # As released: (L, d_out, d_in) and (L, d_in, d_in) products, then sum.
        a = (v[:, :, None] * xs[j][:, None, :]).sum(0)
        square_sum += eta * (xs[j][:, :, None] * xs[j][:, None, :]).sum(0)
        weights = torch.ones(d_out)
        weights[:r] = masks[j]
        value_sum += eta * (a * weights[:, None])
      t["accumulate"] = (time.perf_counter() - start) * m / q
      gram = ((lamb + mu) * torch.eye(d_in) + ased * mu + concept_vecs.T @ concept_vecs
              + eta * xx)
      rhs = (lamb + mu) * weight + value_sum
      alpha = eta * torch.ones(d_out)
      start = time.perf_counter()
      solved = ref.scapre_row_solve(gram, projector, rhs[:r], alpha[:r])
      t["solve"] = (time.perf_counter() - start) * row_scale
      if not accuracy:
        # Both float32 solves against float64 (alpha is constant here, so one
        # inverse serves every row).
        exact = rhs[:r].double().numpy() @ np.linalg.inv(
            gram.double().numpy() + eta * projector64.numpy())
        # The engine's step-6 solve, as `edit_scapre` calls it.
        ours = edit.solve_scapre_system(
            jnp.asarray(gram.numpy()), stats32.projector_basis,
            jnp.asarray(rhs[:r].numpy()), jnp.asarray(alpha[:r].numpy()))
        error = lambda x: float(np.abs(np.asarray(x, np.float64) - exact).max()
                                / np.abs(exact).max())
        accuracy = {"d_out": d_out, "ours": error(ours), "reference": error(solved.numpy()),
                    "ours_vs_reference": float(np.abs(np.asarray(ours) - solved.numpy()).max()
                                               / np.abs(solved.numpy()).max()),
                    "gram_condition": float(np.linalg.cond(gram.double().numpy()))}
      start = time.perf_counter()
      ref.bures_prox(weight[:r], solved, mu=mu, lam_prox=lamb + mu, iters=config.bures_iters)
      t["bures"] = (time.perf_counter() - start) * row_scale
      t["encode_per_matrix"] = m * t_pair
      per_width[d_out] = {"matrices": len(names), "rows_timed": r, "seconds": t}

  num_matrices = len(kernels)
  phases = {p: sum(w["matrices"] * w["seconds"][p] for w in per_width.values())
            for p in ("entropy", "mi_mask", "ased", "accumulate", "solve", "bures")}
  phases["projector"] = t_projector
  matrix_s = sum(phases.values())
  encode_released = out["reference_encode_once_s"] + num_matrices * m * t_pair
  encode_hoisted = out["reference_encode_once_s"] + m * t_pair
  out.update(versions())
  out.update({
      "reference_total_s": encode_released + matrix_s,
      "reference_hoisted_total_s": encode_hoisted + matrix_s,
      # Like for like with ours_solve_s: all per-matrix work after the shared
      # text statistics (probes, targets, linear solves, Bures).
      "reference_solve_s": matrix_s,
      "reference_linear_solve_s": phases["solve"],
      "reference_encode_s": encode_released,
      "reference_hoisted_encode_s": encode_hoisted,
      "reference_encode_pair_s": t_pair,
      "reference_phases_s": phases,
      "reference_per_width": {str(k): v for k, v in per_width.items()},
      "solve_rel_error_f32": accuracy,
      "reference_sample": {
          "matrices_timed": len(per_width), "matrices": num_matrices,
          "concepts_timed": q, "concepts": m, "encoder_calls_timed": k,
          "encoder_calls_released": num_matrices * m, "encoder_calls_hoisted": m,
          "rows_timed": None if rows is None else rows,
          "note": ("one matrix per distinct d_out, scaled by the number of matrices of that "
                   "width; MI masks and accumulation timed on concepts_timed concepts and "
                   "scaled by concepts / concepts_timed; encoder [old, new] calls timed "
                   "encoder_calls_timed times and scaled by the call count; per-row loops "
                   "timed on rows_timed rows (None = all) and scaled by d_out / rows"),
      },
  })
  return out


def main(argv=None) -> None:
  argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      epilog="No options of its own: run scripts/bench_edit.py, which times the "
             "reference beside the engine (see --ref-concepts, --ref-encodes, "
             "--ref-rows, --no-reference).").parse_args(argv)
  print("run scripts/bench_edit.py (it imports this module); --help says more",
        file=sys.stderr)


if __name__ == "__main__":
  main()
