#!/usr/bin/env python
"""How much one set's edit changes with the program that computes it.

For each precision (float32, float64) and MI mode (released, canonical), on
the built-in tiny model (or --model) and a sets file (default: the four sets
below), the edit of every set is computed four ways, as `scapre-jax erase`
and the library compute it:

  alone      `edit_sets` with that set only, on one device (the CLI, one set)
  batched    `edit_sets` with every set, on one device (the CLI, a sets file)
  sharded    `edit_sets` with every set, sharded over --devices host devices
  library    `edit_projections` with that set (the library API)

and the largest difference from `alone` is printed relative to the largest
weight of the matrix: max over sets and matrices of max|W - W_alone| / max|W_alone|.
For scale, `float64` is the float32 result's own error: float32 alone
against float64 alone, in the same measure.
Numbers for docs/reproducibility.md and README come from

  python scripts/reproducibility.py --json benchmarks/reproducibility_cpu.json
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import sys


def parse(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", help="diffusers folder (default: the built-in tiny model)")
  parser.add_argument("--sets", type=pathlib.Path,
                      help="JSONL sets file (default: four sets of 1 to 4 concepts)")
  parser.add_argument("--devices", type=int, default=8,
                      help="host devices for the sharded run (XLA_FLAGS)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", type=pathlib.Path, help="write the results here")
  return parser.parse_args(argv)


DEFAULT_SETS = [
    {"name": "a", "concepts": ["parachute", "golf ball"]},
    {"name": "b", "concepts": ["church"], "preserve": ["tench"]},
    {"name": "c", "concepts": ["gas pump", "chain saw", "french horn"]},
    {"name": "d", "concepts": ["Claude Monet", "Vincent van Gogh", "Pablo Picasso",
                               "Edward Hopper"], "templates": "art"},
]


def main(argv=None) -> dict:
  args = parse(argv)
  # Device count and x64 must be set before JAX starts.
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={args.devices}").strip()
  import jax
  import numpy as np

  import bench_edit  # scripts/: its machine() record, as the benchmark JSONs have
  from scapre_jax import io, models, precision, requests, sharding, text, tiny
  from scapre_jax import cache as cache_lib
  from scapre_jax.config import EditConfig
  from scapre_jax.edit import edit_projections
  from scapre_jax.sets import edit_sets

  precision.enable_x64()
  if args.sets:
    concept_sets = requests.load_sets_file(args.sets)
  else:
    concept_sets = [requests.set_from_dict(entry) for entry in DEFAULT_SETS]
  model_path = args.model or tiny.ensure_tiny_model()
  mesh = sharding.sets_mesh()
  key = jax.random.key(args.seed)

  def rel(got, want):
    return max(float(np.abs(np.asarray(got[n]) - np.asarray(want[n])).max()
                   / np.abs(np.asarray(want[n])).max()) for n in want)

  cache_lib.enable_compile_cache()  # as the CLI: a rerun skips compilation
  results, alone_of = [], {}
  for prec, modes in (("float32", ("released", "canonical")),
                      ("float64", ("released", "canonical"))):
    model = models.load_model(model_path, text_dtype=prec)
    kernels = precision.cast(models.cross_attention_kernels(model.unet_params), prec)
    cache: dict = {}
    inputs = [text.build_concept_inputs(
        model, list(s.concepts), guides=None if s.guides is None else list(s.guides),
        preserve=list(s.preserve), templates=s.templates, cache=cache).inputs
        for s in concept_sets]
    for mode in modes:
      config = EditConfig.preset("scapre", mi_mode=mode)
      alone = [edit_sets(kernels, [x], config, key=key)[0] for x in inputs]
      batched = edit_sets(kernels, inputs, config, key=key)
      sharded = edit_sets(kernels, inputs, config, key=key, mesh=mesh)
      library = [edit_projections(kernels, x, config, key=key) for x in inputs]
      alone_of[prec, mode] = alone
      per_set = {s.name: {"batched": rel(b, a), "sharded": rel(sh, a), "library": rel(lib, a)}
                 for s, a, b, sh, lib in zip(concept_sets, alone, batched, sharded, library)}
      row = {"precision": prec, "mi_mode": mode, "per_set": per_set}
      for kind in ("batched", "sharded", "library"):
        row[kind] = max(v[kind] for v in per_set.values())
      results.append(row)
      print(f"{prec} {mode:9s}  batched {row['batched']:.2e}  sharded over "
            f"{len(mesh.devices.flat)} devices {row['sharded']:.2e}  library "
            f"{row['library']:.2e}", flush=True)
  for row in results:
    if row["precision"] == "float32":
      exact = alone_of["float64", "released"] if row["mi_mode"] == "released" else None
      if exact is not None:
        errors = [rel(a, e) for a, e in zip(alone_of["float32", "released"], exact)]
        row["float64"] = max(errors)
        for s, err in zip(concept_sets, errors):
          row["per_set"][s.name]["float64"] = err
        print(f"float32 released  alone against float64 alone {row['float64']:.2e}",
              flush=True)
  record = {
      "command": "python scripts/reproducibility.py " + shlex.join(
          sys.argv[1:] if argv is None else list(argv)),
      "sets": [s.to_dict() for s in concept_sets], "model": str(model_path),
      "machine": bench_edit.machine(), "devices": len(mesh.devices.flat),
      "results": results,
  }
  if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    io.write_json(args.json, record, overwrite=True)
  return record


if __name__ == "__main__":
  main()
