"""Noisy probes of a weight matrix: the MI soft mask and the entropy factor.

docs/algorithm.md "MI soft mask" and "Entropy factor". Both estimators take
their standard-normal noise as arguments; `draw_probe_noise` draws it from a
key, one fold of the key per concept, so concept j gets the same noise
whether it sits in a set of 3 or in a padded set of 300.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from scapre_jax._src.typing import Array, Bool, Float

from scapre_jax._src import reductions
from scapre_jax._src.targets import einsum
from scapre_jax.precision import EPS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ProbeNoise:
  """Standard normals: MI positives/negatives (m, K, d_in), entropy (m, S, d_in)."""

  mi_pos: Array
  mi_neg: Array
  entropy: Array


def draw_probe_noise(key: Array, num_concepts: int, d_in: int, *,
                     num_pos: int, entropy_samples: int,
                     dtype=jnp.float32) -> ProbeNoise:
  """Noise for every concept: concept j uses `fold_in(key, j)` only.

  Samples are drawn in float32 and then cast, so a float64 edit probes with
  the same values as a float32 one.
  """

  def one(index):
    k_pos, k_neg, k_ent = jax.random.split(jax.random.fold_in(key, index), 3)
    return tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype) for k, shape in (
        (k_pos, (num_pos, d_in)), (k_neg, (num_pos, d_in)), (k_ent, (entropy_samples, d_in))))

  pos, neg, ent = jax.vmap(one)(jnp.arange(num_concepts))
  return ProbeNoise(pos, neg, ent)


def lower_median(x: Float[Array, "... n"]) -> Float[Array, "..."]:
  """torch.median semantics: for an even count, the smaller middle value."""
  n = x.shape[-1]
  return jnp.sort(x, axis=-1)[..., (n - 1) // 2]


def above_lower_median(x: Float[Array, "... n"]) -> Bool[Array, "... n"]:
  """x > lower_median(x), without a sort.

  x_i exceeds the ((n - 1) // 2)-th smallest value exactly when at least
  (n - 1) // 2 + 1 values are strictly below it, ties included. For the few
  probes per row (n = 2K) the pairwise count is several times faster than
  sorting on CPU.
  """
  below = jnp.sum(x[..., None, :] < x[..., :, None], axis=-1)
  return below > (x.shape[-1] - 1) // 2


def mutual_information(
    weight: Float[Array, "d_out d_in"],
    concept_vecs: Float[Array, "m d_in"],
    empty_vec: Float[Array, "d_in"],
    pos_noise: Float[Array, "m K d_in"],
    neg_noise: Float[Array, "m K d_in"],
    *,
    sigma: float,
    mode: str = "released",
) -> Float[Array, "m d_out"]:
  """MI of each row's response to concept j against the empty prompt
  (docs/algorithm.md "MI soft mask", steps 1-3): float32 in released mode,
  the weights' dtype in canonical mode (`mutual_information_table`)."""
  num_pos = pos_noise.shape[1]
  pos = concept_vecs[:, None, :] + sigma * pos_noise
  neg = empty_vec + sigma * neg_noise
  acts = einsum("oi,mki->mok", weight, jnp.concatenate([pos, neg], axis=1))
  fired = above_lower_median(acts)
  label = jnp.arange(2 * num_pos) < num_pos
  n11 = jnp.sum(fired & label, axis=-1)
  n10 = jnp.sum(fired & ~label, axis=-1)
  dtype = jnp.float32 if mode == "released" else weight.dtype
  table = mutual_information_table(num_pos, np.dtype(dtype).name, mode == "released")
  return jnp.asarray(table)[n11, n10]


def tied_by_rounding(mi: Float[Array, "m d_out"]) -> Bool[Array, "m"]:
  """Whether concept j's MI values differ only by rounding: not all equal,
  but within two steps of their dtype of each other. Its standardised mask
  is then decided by that rounding, not by information (docs/algorithm.md
  "MI soft mask")."""
  high, low = jnp.max(mi, axis=-1), jnp.min(mi, axis=-1)
  step = jnp.nextafter(high, jnp.asarray(jnp.inf, high.dtype)) - high
  return (high > low) & (high - low <= 2 * step)


def mi_soft_mask(
    weight: Float[Array, "d_out d_in"],
    concept_vecs: Float[Array, "m d_in"],
    empty_vec: Float[Array, "d_in"],
    pos_noise: Float[Array, "m K d_in"],
    neg_noise: Float[Array, "m K d_in"],
    concept_mask: Bool[Array, "m"],
    *,
    sigma: float,
    temperature: float,
    power: float,
    mode: str = "released",
) -> Float[Array, "m d_out"]:
  """Row weights r_j of every concept; zero for padding concepts.

  mode "released" forms the MI exactly as the released code: float32 cell
  counts, the four terms summed in the order 11, 10, 01, 00, standardised
  with torch's mean and std (in float32, torch's order of additions and
  rounding). mode "canonical" (our departure, see README) makes the MI a
  function of the cell counts alone: the four terms are summed in sorted
  order, so rows whose cells are a permutation of each other (a concept firing
  above vs. below the empty prompt) get bit-identical MI, and rows tied at the
  maximum get equal weight instead of weights decided by one float ulp.
  """
  mi = mutual_information(weight, concept_vecs, empty_vec, pos_noise, neg_noise,
                          sigma=sigma, mode=mode)
  # The standardisation runs in the weights' dtype (float32 MI values are
  # exact in float64) with torch's float32 mean and std: where every row
  # separates, the MI values tie up to one float32 step and the rounding of
  # these two numbers decides the mask (reductions.py).
  mi = mi.astype(weight.dtype)
  if mode == "released":
    mean = reductions.torch_mean(mi)[:, None]
    std = reductions.torch_std(mi, mean[:, 0])[:, None]
  else:
    # Around the minimum, so rows tied exactly have mean and deviation 0
    # exactly (a rounded mean of n equal values need not equal them).
    low = jnp.min(mi, axis=-1, keepdims=True)
    mean = low + jnp.mean(mi - low, axis=-1, keepdims=True)
    std = jnp.std(mi - low, axis=-1, keepdims=True, ddof=1)
  standard = reductions.true_divide(mi - mean, std + EPS)
  weights = jax.nn.sigmoid(reductions.true_divide(standard, temperature)) ** power
  return jnp.where(concept_mask[:, None], weights, 0)


_RELEASED_TABLE = pathlib.Path(__file__).parent.parent / "data" / "mi_released_float32.json"


@functools.lru_cache(maxsize=None)
def _released_tables() -> dict[int, np.ndarray]:
  tables = json.loads(_RELEASED_TABLE.read_text("utf-8"))["tables"]
  return {int(k): np.asarray(v, np.float32) for k, v in tables.items()}


@functools.lru_cache(maxsize=None)
def mutual_information_table(num_pos: int, dtype: str, ordered: bool) -> np.ndarray:
  """MI of every 2x2 table of K = num_pos positives and K negatives:
  entry [n11, n10] (n01 = K - n11, n00 = K - n10), shape (K + 1, K + 1).

  The MI depends on the counts alone, so it is a table, not device code:
  XLA's log and its fused multiply-adds round some of these values one ulp
  away from torch's, and with every row tied at log 2 one ulp decides the
  mask. Released mode (`ordered`, float32) for K <= 16 reads torch's own
  float32 values (scripts/mi_table.py wrote them; torch's float32 log is
  SLEEF's, not correctly rounded). Otherwise the table is computed here, one
  IEEE operation at a time in `dtype`: cells (n + 1e-8) / 2K, the terms
  p_ab log(p_ab / (p_a. p_.b)) with the C library's log, summed in the order
  11, 10, 01, 00 (`ordered`) or ascending (canonical mode).
  """
  if ordered and dtype == "float32" and num_pos in _released_tables():
    return _released_tables()[num_pos]
  t = np.dtype(dtype).type
  total = t(2 * num_pos)
  table = np.zeros((num_pos + 1, num_pos + 1), dtype)
  for n11 in range(num_pos + 1):
    for n10 in range(num_pos + 1):
      p11, p10, p01, p00 = (t(t(n) + t(EPS)) / total
                            for n in (n11, n10, num_pos - n11, num_pos - n10))
      p1_, p0_, p_1, p_0 = t(p11 + p10), t(p01 + p00), t(p11 + p01), t(p10 + p00)
      terms = [t(p * t(math.log(t(p / t(a * b)))))
               for p, a, b in ((p11, p1_, p_1), (p10, p1_, p_0), (p01, p0_, p_1),
                               (p00, p0_, p_0))]
      if not ordered:
        terms.sort()
      value = terms[0]
      for term in terms[1:]:
        value = t(value + term)
      table[n11, n10] = value
  return table


def entropy_factor(
    weight: Float[Array, "d_out d_in"],
    concept_vecs: Float[Array, "m d_in"],
    noise: Float[Array, "m S d_in"],
    concept_mask: Bool[Array, "m"],
    *,
    sigma: float,
    bins: int,
) -> Float[Array, "d_out"]:
  """e = 1 - H / log B of each row's response to noisy concept vectors.

  Padding concepts are left out of the min-max range and of the histogram.
  Binning follows torch.histc on [0, 1]: a value on the top edge falls in
  the last bin.
  """
  d_out = weight.shape[0]
  samples = concept_vecs[:, None, :] + sigma * noise
  acts = einsum("oi,msi->oms", weight, samples).reshape(d_out, -1)
  valid = jnp.broadcast_to(concept_mask[:, None], noise.shape[:2]).reshape(-1)
  low = jnp.min(jnp.where(valid, acts, jnp.inf), axis=-1, keepdims=True)
  high = jnp.max(jnp.where(valid, acts, -jnp.inf), axis=-1, keepdims=True)
  scaled = (acts - low) / (high - low + EPS)
  index = jnp.clip(jnp.floor(scaled * bins).astype(jnp.int32), 0, bins - 1)
  in_range = valid & (scaled >= 0) & (scaled <= 1)
  # Out-of-range samples count in an extra bin that is dropped. A scatter-add
  # instead of a (d_out, n, bins) one-hot: 4x faster on CPU, less memory.
  index = jnp.where(in_range, index, bins)
  rows = jnp.arange(d_out)[:, None]
  hist = jnp.zeros((d_out, bins + 1), jnp.int32).at[rows, index].add(1)[:, :bins]
  hist = hist.astype(weight.dtype)
  prob = hist / (jnp.sum(hist, axis=-1, keepdims=True) + EPS)
  entropy = -jnp.sum(prob * jnp.log(prob + EPS), axis=-1)
  return 1 - entropy / jnp.log(jnp.asarray(bins, weight.dtype))
