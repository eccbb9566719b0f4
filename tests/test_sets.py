"""Many concept sets in one call, on one device and sharded over eight."""

import jax
import numpy as np
import pytest

import scapre_jax as sj
from scapre_jax import sets as sets_module
from scapre_jax import sharding

from builders import kernels, random_inputs


@pytest.fixture(scope="module")
def problem():
  # float64, so "equal" can be tight (docs/reproducibility.md).
  dtype = np.float64
  config = sj.EditConfig.preset("scapre", noise_sigma=0.3, entropy_samples=4)
  ks = kernels(0, 24, [8, 12], dtype)
  sets = [random_inputs(10 + i, m=m, d_in=24, length=ln, num_preserve=p, dtype=dtype)
          for i, (m, ln, p) in enumerate([(3, 5, 0), (5, 4, 2), (1, 6, 1)])]
  alone = [sj.edit_projections(ks, s, config, key=jax.random.key(4)) for s in sets]
  return config, ks, sets, alone


def assert_same(results, alone):
  """Equal up to float64 rounding: padding reorders sums, nothing more
  (float32 would round them differently on different CPUs)."""
  assert len(results) == len(alone)
  for got, want in zip(results, alone):
    assert set(got) == set(want)
    for name in want:
      assert got[name].dtype == want[name].dtype == np.float64
      np.testing.assert_allclose(got[name], want[name], rtol=0,
                                 atol=1e-10 * float(np.abs(want[name]).max()))


def test_batched_sets_equal_each_set_alone(problem):
  config, ks, sets, alone = problem
  assert_same(sj.edit_sets(ks, sets, config, key=jax.random.key(4)), alone)


def test_sharded_over_eight_devices(problem):
  config, ks, sets, alone = problem
  assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
  mesh = sharding.sets_mesh()
  # 3 sets on 8 devices: padded to 8, the extra results dropped.
  results = sj.edit_sets(ks, sets, config, key=jax.random.key(4), mesh=mesh)
  assert_same(results, alone)
  batched = sets_module.stack_sets(sets, num_sets=8)
  sharded = sharding.shard_sets(batched, mesh)
  assert len(sharded.concept_vecs.sharding.device_set) == 8


def test_stack_sets_pads_with_masks(problem):
  _, _, sets, _ = problem
  batched = sets_module.stack_sets(sets)
  assert batched.concept_vecs.shape == (3, 5, 24)
  assert batched.old_seqs.shape == (3, 5, 6, 24)
  assert batched.preserve_seqs.shape[:2] == (3, 2)
  np.testing.assert_array_equal(batched.concept_mask.sum(1), [3, 5, 1])
  with pytest.raises(ValueError, match="no concept sets"):
    sets_module.stack_sets([])
  with pytest.raises(ValueError, match="one text encoder"):
    sets_module.stack_sets([sets[0], random_inputs(0, m=2, d_in=8)])
