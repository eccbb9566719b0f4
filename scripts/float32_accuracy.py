#!/usr/bin/env python
"""How far each float32 edit lies from its own float64 edit: ours and the
released procedure's, per preset, end to end (issue 10).

For every preset, on the built-in 768-wide tiny model (or --model) and one
concept set, four edits of every cross-attention matrix are computed with the
same probe noise:

  ours32      the engine in float32 (text encoder in float32), as `erase` runs
  ours64      the engine in float64 (`--precision float64`)
  released32  `scapre_jax.reference` (the PyTorch transcription of the
              released procedure, per-row loops and LAPACK Cholesky) in
              float32, its text encoded by transformers' PyTorch CLIP in float32
  released64  the same in float64

and the relative Frobenius errors ||ours32 - ours64|| / ||ours64|| and
||released32 - released64|| / ||released64|| are printed (max and mean over
matrices). ours64 and released64 agree to about 1e-11, so both float32 errors
are measured against the same answer. Two splits say where the error comes
from: the text side alone (float32 text, float64 engine) and the engine alone
(float64 text rounded to float32, float32 engine), for ours and the released.

  python scripts/float32_accuracy.py --json benchmarks/cpu/float32_accuracy.json

Needs torch (the `[torch]` extra).
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys

PRESETS = ("scapre", "scapre-nsfw", "scapre-small", "uce")


def parse(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", help="diffusers folder (default: the built-in tiny model)")
  parser.add_argument("--presets", nargs="+", default=list(PRESETS))
  parser.add_argument("--concepts", default="nudity, naked, sexual",
                      help="comma-separated concepts of the one set")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="EditConfig override for every preset (e.g. mi_mask=false)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", type=pathlib.Path, help="write the results here")
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse(argv)
  import jax
  import numpy as np
  import torch

  import bench_edit  # scripts/: its machine() record, as the benchmark JSONs have
  from scapre_jax import cli, erase, io, models, precision, requests, tiny, verify
  from scapre_jax.config import EditConfig
  from scapre_jax.edit import edit_projections

  precision.enable_x64()
  overrides = dict(cli.parse_override(s) for s in args.set)
  model_path = args.model or tiny.ensure_tiny_model()
  m32 = models.load_model(model_path)
  m64 = models.load_model(model_path, dtype="float64")
  k32 = models.cross_attention_kernels(m32.unet_params)
  k64 = precision.cast(k32, "float64")  # the same float32 weights, exactly
  key = jax.random.key(args.seed)
  concepts = requests.parse_concepts(args.concepts)

  def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))

  def released(encoded, dtype, config):
    """The reference's edit of every matrix, text `encoded` cast to `dtype`."""
    return {name: verify.reference_matrix_edit(k32[name], name, key, encoded, config, dtype).T
            for name in k32}

  def spread(got, want):
    errors = [rel(got[n], want[n]) for n in want]
    return {"max": max(errors), "mean": float(np.mean(errors))}

  results = []
  for preset in args.presets:
    config = EditConfig.preset(preset, **overrides)
    concept_set = requests.ConceptSet("set", concepts, preset=preset)
    r32 = erase.encode_set(m32, concept_set, config)
    r64 = erase.encode_set(m64, concept_set, config)
    if config.token_rows != "aligned":
      raise SystemExit(f"{preset}: the reference covers aligned token rows only")
    ours32 = edit_projections(k32, r32.inputs, config, key=key)
    ours64 = edit_projections(k64, r64.inputs, config, key=key)
    text_only = edit_projections(k64, precision.cast(r32.inputs, "float64"), config, key=key)
    engine_only = edit_projections(k32, precision.cast(r64.inputs, "float32"), config, key=key)
    ref_text = {dt: verify.encode_reference_inputs(
        m64.path, r64.prompts, r64.guides, r64.preserve, dt)
        for dt in (torch.float32, torch.float64)}
    released64 = released(ref_text[torch.float64], torch.float64, config)
    released32 = released(ref_text[torch.float32], torch.float32, config)
    released_text = released(ref_text[torch.float32], torch.float64, config)
    released_engine = released(ref_text[torch.float64], torch.float32, config)
    row = {
        "preset": preset, "config": config.to_dict(),
        "ours": spread(ours32, ours64), "released": spread(released32, released64),
        "ours_text_only": spread(text_only, ours64),
        "ours_engine_only": spread(engine_only, ours64),
        "released_text_only": spread(released_text, released64),
        "released_engine_only": spread(released_engine, released64),
        "ours64_vs_released64": max(rel(ours64[n], released64[n]) for n in k32),
    }
    row["ratio"] = row["ours"]["max"] / row["released"]["max"]
    results.append(row)
    print(f"{preset:13s} float32 vs float64, max over matrices: ours {row['ours']['max']:.2e}"
          f"  released {row['released']['max']:.2e}  (ours/released {row['ratio']:.2f}); "
          f"engine only: ours {row['ours_engine_only']['max']:.2e} released "
          f"{row['released_engine_only']['max']:.2e}; text only: ours "
          f"{row['ours_text_only']['max']:.2e} released {row['released_text_only']['max']:.2e}; "
          f"ours64 vs released64 {row['ours64_vs_released64']:.1e}", flush=True)
  record = {
      "command": "python scripts/float32_accuracy.py " + shlex.join(
          sys.argv[1:] if argv is None else list(argv)),
      "model": str(model_path), "concepts": list(concepts), "seed": args.seed,
      "machine": bench_edit.machine(), "torch": torch.__version__, "results": results,
  }
  if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    io.write_json(args.json, record, overwrite=True)
  return record


if __name__ == "__main__":
  main()
