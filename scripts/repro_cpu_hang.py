#!/usr/bin/env python
"""Reproduces the XLA CPU wedge seen with jaxlib 0.10.2 (open problem).

Edits 32 random SD-1.5-shaped kernels (context 768) for 50 random concepts,
`--calls` times, printing each call's time. With `--matrix-batch 0` (all
matrices of a shape vmapped at once) most runs on our 2-core machines
stopped making progress inside the first call: every XLA worker thread idle,
the main thread waiting for the result. Since the probe changes of 326d311
(no sort, no one-hot histogram) 6 runs of 6 finished (BENCHMARKS.md). Run it
under `timeout`:

  timeout 300 python scripts/repro_cpu_hang.py --matrix-batch 0
  timeout 300 python scripts/repro_cpu_hang.py --matrix-batch 1
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import scapre_jax as sj

SD15_WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280,
               640, 640, 640, 320, 320, 320]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--concepts", type=int, default=50)
  parser.add_argument("--calls", type=int, default=4)
  parser.add_argument("--matrix-batch", type=int, default=1,
                      help="matrices per step; 0 = all of a shape at once (vmap)")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  d, length, m = 768, 76, args.concepts
  kernels = {f"l{i}/to_{kv}/kernel":
             jnp.asarray(rng.normal(size=(d, w)).astype(np.float32) / np.sqrt(d))
             for i, w in enumerate(SD15_WIDTHS) for kv in "kv"}
  inputs = sj.ConceptInputs.create(
      rng.normal(size=(m, d)).astype(np.float32), rng.normal(size=d).astype(np.float32),
      rng.normal(size=(m, length, d)).astype(np.float32),
      rng.normal(size=(m, length, d)).astype(np.float32))
  config = sj.EditConfig.preset("scapre")
  batch = args.matrix_batch or 10 ** 6
  for i in range(args.calls):
    start = time.perf_counter()
    out = sj.edit_projections(kernels, inputs, config, key=jax.random.key(i),
                              matrix_batch=batch)
    jax.block_until_ready(out)
    print(f"call {i}: {time.perf_counter() - start:.2f} s", flush=True)


if __name__ == "__main__":
  main()
