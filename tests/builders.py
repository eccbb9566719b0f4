"""Inputs shared by several test modules (imported, never collected): random
concept inputs and kernels for the engine tests, bad sets files."""

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


# (sets-file text, the error it gives, as a regex): tests/test_requests.py
# checks the library's message, tests/test_cli.py the command line's exit.
BAD_SETS_FILES = [
    ('{"name": "x", "concepts": ["a"]}\n{"name": "y", "concepts": [', "sets.jsonl:2: bad JSON"),
    ('{"name": "x", "concepts": []}', "sets.jsonl:1: set 'x': empty concept list"),
    ('{"name": "x", "concepts": ["a"], "preset": "fast"}', "sets.jsonl:1: set 'x': unknown preset"),
    ('{"name": "x", "concepts": ["a"]}\n\n{"name": "x", "concepts": ["b"]}',
     "sets.jsonl:3: duplicate set name 'x' \\(first on line 1\\)"),
    ('{"name": "../x", "concepts": ["a"]}', "sets.jsonl:1: set name"),
    ('{"name": "x", "concept": ["a"]}', "sets.jsonl:1: unknown keys \\['concept'\\]"),
]
