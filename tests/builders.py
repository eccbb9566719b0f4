"""Random inputs and kernels shared by the engine tests (imported, never collected)."""

import jax.numpy as jnp
import numpy as np

import scapre_jax as sj


def random_inputs(seed, m, d_in, length=6, num_preserve=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, length + 1, size=m)
  mask = np.arange(length)[None] < lengths[:, None]
  kwargs = {}
  if num_preserve:
    kwargs["preserve_seqs"] = rng.normal(size=(num_preserve, length, d_in)).astype(dtype)
  return sj.ConceptInputs.create(
      rng.normal(size=(m, d_in)).astype(dtype), rng.normal(size=d_in).astype(dtype),
      rng.normal(size=(m, length, d_in)).astype(dtype),
      rng.normal(size=(m, length, d_in)).astype(dtype), mask, **kwargs)


def kernels(seed, d_in, widths, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {f"layer_{i}/to_{kv}/kernel": jnp.asarray(rng.normal(size=(d_in, w)) / np.sqrt(d_in), dtype)
          for i, w in enumerate(widths) for kv in "kv"}
