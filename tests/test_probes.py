"""MI soft mask and entropy factor on hand-worked inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scapre_jax._src import probes


def test_lower_median_is_torch_median():
  x = jnp.array([[4.0, 1.0, 3.0, 2.0], [5.0, 5.0, 0.0, 9.0]])
  np.testing.assert_array_equal(probes.lower_median(x), [2.0, 5.0])
  np.testing.assert_array_equal(probes.lower_median(jnp.array([3.0, 1.0, 2.0])), 2.0)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 11])
def test_above_lower_median_matches_the_sort(n):
  # Small integers: many ties, including all-equal rows.
  rng = np.random.default_rng(n)
  x = jnp.asarray(rng.integers(0, 3, size=(200, n)).astype(np.float32))
  want = np.asarray(x) > np.asarray(probes.lower_median(x))[:, None]
  got = probes.above_lower_median(x)
  np.testing.assert_array_equal(got, want)
  # Hand-worked: lower median of (3, 1, 2, 2) is 2, so only 3 fires.
  np.testing.assert_array_equal(probes.above_lower_median(jnp.array([3.0, 1.0, 2.0, 2.0])),
                                [True, False, False, False])


def two_level_case():
  """d_in = 2 (concept axis, empty axis); 4 rows, K = 2, sigma = 0.

  Without noise all positives are equal and all negatives are equal. Row 0
  fires for the concept only, row 1 for the empty prompt only (both separate
  perfectly: MI = log 2), rows 2 and 3 respond equally to both, so nothing is
  above the median: z = 0 everywhere and MI = 0 (up to the 1e-8 cells).
  """
  weight = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
  concept = jnp.array([[1.0, 0.0]])
  empty = jnp.array([0.0, 1.0])
  zeros = jnp.zeros((1, 2, 2))
  return weight, concept, empty, zeros


@pytest.mark.parametrize("mode", ["released", "canonical"])
def test_mi_mask_two_levels(mode):
  weight, concept, empty, zeros = two_level_case()
  r = probes.mi_soft_mask(weight, concept, empty, zeros, zeros, jnp.array([True]),
                          sigma=0.0, temperature=0.7, power=2.0, mode=mode)
  # MI = (log 2, log 2, 0, 0): mean log2/2, sample std log2/sqrt(3) ->
  # standardised +-sqrt(3)/2.
  z = np.sqrt(3) / 2
  sig = lambda x: 1 / (1 + np.exp(-x))
  want = np.array([sig(z / 0.7), sig(z / 0.7), sig(-z / 0.7), sig(-z / 0.7)]) ** 2
  np.testing.assert_allclose(np.asarray(r)[0], want, rtol=1e-5)


def test_canonical_mode_ties_swapped_rows_exactly():
  # Rows 0 and 1 separate perfectly but in opposite directions; their cell
  # counts are permutations of each other. Canonical MI is bit-identical.
  weight, concept, empty, zeros = two_level_case()
  args = (weight[:2], concept, empty, zeros, zeros, jnp.array([True]))
  canonical = probes.mi_soft_mask(*args, sigma=0.0, temperature=0.7, power=8.0,
                                  mode="canonical")
  assert canonical[0, 0] == canonical[0, 1]
  # Every row tied at the maximum: std = 0, so every weight is sigmoid(0)^p.
  np.testing.assert_allclose(canonical, 0.5 ** 8, rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_canonical_mode_all_rows_tied_standardise_to_exactly_zero(dtype):
  # 100 rows, half firing above and half below the empty prompt: every MI
  # is the same value x, but the mean of 100 copies of x rounds away from x
  # (by 2.4e-7 in float32, 2.2e-16 in float64), which the standardisation
  # used to divide by a std of the same size. Measured from the row minimum,
  # every weight is exactly sigmoid(0)^p.
  weight = jnp.asarray(np.tile([[1.0, 0.0], [0.0, 1.0]], (50, 1)), dtype)
  zeros = jnp.zeros((1, 2, 2), dtype)
  r = probes.mi_soft_mask(weight, jnp.array([[1.0, 0.0]], dtype), jnp.array([0.0, 1.0], dtype),
                          zeros, zeros, jnp.array([True]), sigma=0.0, temperature=0.7,
                          power=8.0, mode="canonical")
  np.testing.assert_array_equal(r, np.full((1, 100), 0.5 ** 8, dtype))


def test_mi_mask_padding_concepts_get_zero_weight():
  weight, concept, empty, zeros = two_level_case()
  concepts = jnp.concatenate([concept, concept])
  noise = jnp.zeros((2, 2, 2))
  r = probes.mi_soft_mask(weight, concepts, empty, noise, noise, jnp.array([True, False]),
                          sigma=0.0, temperature=0.7, power=2.0)
  np.testing.assert_array_equal(r[1], 0)
  assert float(r[0].min()) > 0


def test_entropy_factor_hand_worked():
  # d_in = 1, two rows, one concept c = 1, S = 4 samples with noise
  # (0, 1, 2, 3) and sigma = 1: acts = w * (1, 2, 3, 4).
  # Row 0 (w = 1) with B = 4 bins: scaled (0, 1/3, 2/3, 1) -> one value per
  # bin -> H = log 4 -> e = 0. Row 1 (w = 0): every act is 0 -> all in bin 0
  # -> H = 0 -> e = 1.
  weight = jnp.array([[1.0], [0.0]])
  noise = jnp.array([[[0.0], [1.0], [2.0], [3.0]]])
  e = probes.entropy_factor(weight, jnp.array([[1.0]]), noise, jnp.array([True]),
                            sigma=1.0, bins=4)
  np.testing.assert_allclose(e, [0.0, 1.0], atol=1e-6)


def test_entropy_factor_two_bins_and_padding():
  # Acts (0, 0, 0, 9) over B = 3 bins: p = (3/4, 0, 1/4); a padding concept
  # whose acts would widen the range must change nothing.
  weight = jnp.array([[1.0]])
  noise = jnp.array([[[0.0], [0.0], [0.0], [9.0]], [[100.0], [-50.0], [7.0], [1.0]]])
  e = probes.entropy_factor(weight, jnp.zeros((2, 1)), noise, jnp.array([True, False]),
                            sigma=1.0, bins=3)
  p = np.array([0.75, 0.25])
  want = 1 - (-(p * np.log(p)).sum()) / np.log(3)
  np.testing.assert_allclose(e, [want], rtol=1e-6)


def test_probe_noise_per_concept_independent_of_set_size():
  import jax
  key = jax.random.key(3)
  small = probes.draw_probe_noise(key, 3, 5, num_pos=2, entropy_samples=4)
  large = probes.draw_probe_noise(key, 7, 5, num_pos=2, entropy_samples=4)
  for name in ("mi_pos", "mi_neg", "entropy"):
    np.testing.assert_array_equal(getattr(small, name), getattr(large, name)[:3])
  assert small.entropy.shape == (3, 4, 5)
  assert not np.allclose(small.mi_pos[0], small.mi_pos[1])


# -- released mode: torch's float32 standardisation -------------------------------------


def _float32_vectors(seed, n):
  """Random float32 rows, and rows tied at log 2 up to one float32 step."""
  rng = np.random.default_rng(seed)
  ln2 = np.float32(np.log(2))
  tied = np.where(rng.random(n) < rng.random(), ln2, np.nextafter(ln2, np.float32(0)))
  return [rng.standard_normal(n).astype(np.float32), tied.astype(np.float32),
          rng.uniform(0, 0.7, n).astype(np.float32)]


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 31, 77, 320, 333, 640, 1280, 2600])
def test_torch_reductions_match_torch_bit_for_bit(n):
  import torch
  from scapre_jax._src import reductions
  for x in _float32_vectors(n, n):
    t = torch.from_numpy(x)
    np.testing.assert_array_equal(reductions.torch_sum(jnp.asarray(x)), t.sum().numpy())
    mean = jax.jit(reductions.torch_mean)(jnp.asarray(x))
    np.testing.assert_array_equal(mean, t.mean().numpy())
    if n > 1:
      # float64 inside, rounded once to float32: equal unless the float64
      # value lies within about 1e-14 of a float32 rounding boundary, which
      # these fixed inputs do not.
      np.testing.assert_array_equal(jax.jit(reductions.torch_std)(jnp.asarray(x), mean),
                                    t.std().numpy())


def tied_rows_case(d_out, seed):
  """The issue's case: every row separates the concept from the empty prompt
  (sigma = 0), some firing above it and some below, so every MI value is
  log 2 up to one float32 step. d_in = 2: concept (1, 0), empty (0, 1)."""
  rng = np.random.default_rng(seed)
  scale = rng.uniform(0.5, 2.0, d_out)
  above = rng.random(d_out) < rng.uniform(0.1, 0.9)
  weight = np.where(above[:, None], [1.0, 0.0], [0.0, 1.0]) * scale[:, None]
  return weight.astype(np.float32), above


@pytest.mark.parametrize("d_out,seed", [(320, 0), (1280, 2), (333, 3)])
def test_released_mask_on_tied_rows_equals_torch_float32(d_out, seed):
  import torch
  from scapre_jax import reference
  weight, above = tied_rows_case(d_out, seed)
  concept, empty = np.array([[1.0, 0.0]], np.float32), np.array([0.0, 1.0], np.float32)
  k, power, temperature = 5, 8.0, 0.7
  zeros = np.zeros((1, k, 2), np.float32)
  got = probes.mi_soft_mask(jnp.asarray(weight), concept, empty, zeros, zeros,
                            jnp.array([True]), sigma=0.0, temperature=temperature,
                            power=power, mode="released")[0]
  with reference.precision(torch.float32):
    want = reference.mi_soft_mask(weight, concept[0], empty, zeros[0], zeros[0], sigma=0.0,
                                  temperature=temperature, power=power).numpy()
  assert want.dtype == np.float32 and got.dtype == jnp.float32
  # Two weight levels, the rows above the empty prompt against those below.
  assert len(np.unique(want[above])) == 1 and len(np.unique(want[~above])) == 1
  # Mean, std and the divisions are torch's, bit for bit; sigmoid and pow are
  # two implementations of the same functions, each within about 1 ulp
  # (2 ulp apart measured), and the power p = 8 multiplies a relative error
  # by 8: 2 * 8 + 2 = 18 ulp, rounded up to 32 ulp of float32.
  np.testing.assert_allclose(got, want, rtol=32 * 2.0 ** -24, atol=0)
