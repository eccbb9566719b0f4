"""PyTorch's CPU mean and std of a float vector, rounding included.

docs/algorithm.md "MI soft mask r_j": the released code standardises the MI
values with `mi.mean()` and `mi.std()` of a float32 tensor. When every row
separates the concept from the empty prompt, the MI values tie at log 2 up
to one float32 step, and the standardisation turns the rounding of that
mean into the mask: an XLA float32 `jnp.mean` lands a step away from
torch's and changes the weights by orders of magnitude. These kernels form
both statistics the way torch 2.x does on CPU, so released mode gets the
released weights:

- `torch.sum` (and so `mean`, which is `sum / n`) is a cascade sum: the
  vector is read as 8-wide lanes (torch's `Vectorized<float>` width of the
  sum kernel; 4 for float64), the lanes are summed as 4 interleaved streams,
  each stream in blocks of 16 with the block sums carried up to 4 levels,
  then the streams, the tail and the lanes are added left to right
  (aten/src/ATen/native/cpu/SumKernel.cpp). Every addition is in the input
  dtype.
- `torch.std` of a 1-D float tensor is sqrt(sum((x - m)^2) / (n - 1))
  computed in float64 with m = that float32 mean, then rounded to float32.
  Without jax_enable_x64 the float64 part is carried as unevaluated sums of
  two float32 numbers (double-float arithmetic built from exact products).

Checked against torch 2.13 on AVX2 and AVX-512 machines (tests/test_probes.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scapre_jax._src.typing import Array, Float

_LANE_BYTES = 32  # torch's Vectorized<T> width in the sum kernel: 8 floats
_STREAMS = 4  # row_sum's ilp_factor
_LEVELS = 4  # multi_row_sum's num_levels


def _multi_row_sum(items: list) -> Array:
  """multi_row_sum: blocks of 2**level_power items, block sums carried up."""
  size = len(items)
  level_power = max(4, (max(size - 1, 0)).bit_length() // _LEVELS)
  step = 1 << level_power
  zero = jnp.zeros_like(items[0]) if items else None
  acc = [zero] * _LEVELS
  i = 0
  while i + step <= size:
    for _ in range(step):
      acc[0] = acc[0] + items[i]
      i += 1
    for j in range(1, _LEVELS):
      acc[j] = acc[j] + acc[j - 1]
      acc[j - 1] = zero
      if i & ((step - 1) << (j * level_power)):
        break
  while i < size:
    acc[0] = acc[0] + items[i]
    i += 1
  for j in range(1, _LEVELS):
    acc[0] = acc[0] + acc[j]
  return acc[0]


def _row_sum(items: list, zero: Array) -> Array:
  """row_sum: 4 interleaved streams, then the tail, then streams 1..3."""
  size_ilp = len(items) // _STREAMS
  if size_ilp:
    streams = [_multi_row_sum(items[k:size_ilp * _STREAMS:_STREAMS]) for k in range(_STREAMS)]
  else:
    streams = [zero] * _STREAMS
  total = streams[0]
  for item in items[size_ilp * _STREAMS:]:
    total = total + item
  for k in range(1, _STREAMS):
    total = total + streams[k]
  return total


def torch_sum(x: Float[Array, "... n"]) -> Float[Array, "..."]:
  """`torch.sum` of each contiguous row of x on CPU, in x's dtype, with
  torch's order of additions (module docstring)."""
  n = x.shape[-1]
  lanes = _LANE_BYTES // x.dtype.itemsize
  zero = jnp.zeros(x.shape[:-1], x.dtype)
  if n < lanes:
    return _row_sum([x[..., i] for i in range(n)], zero)
  count = n // lanes
  vectors = x[..., :count * lanes].reshape(*x.shape[:-1], count, lanes)
  lane_sums = _row_sum([vectors[..., v, :] for v in range(count)],
                       jnp.zeros(x.shape[:-1] + (lanes,), x.dtype))
  total = zero
  for k in range(count * lanes, n):
    total = total + x[..., k]
  for lane in range(lanes):
    total = total + lane_sums[..., lane]
  return total


def torch_mean(x: Float[Array, "... n"]) -> Float[Array, "..."]:
  """`torch.mean` on CPU: the cascade sum divided by n, in x's dtype."""
  return true_divide(torch_sum(x), x.shape[-1])


# -- double-float arithmetic: a value is hi + lo, |lo| <= ulp(hi) / 2 -------------


def _two_sum(a, b):
  """a + b = s + e exactly (Knuth)."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _fast_two_sum(a, b):
  """a + b = s + e exactly when |a| >= |b| (Dekker)."""
  s = a + b
  return s, b - (s - a)


def _split(a):
  """a = hi + lo with hi the top 12 significand bits of a float32 and lo the
  rest: products of halves are exact in float32. A bit mask, not Dekker's
  multiply-and-subtract, which a fused multiply-add would break."""
  bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
  hi = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
  return hi, a - hi


def _two_prod(a, b):
  """a * b as a double-float: the four half products are exact, their sum
  is carried to about 2**-48."""
  ah, al = _split(a)
  bh, bl = _split(b)
  total = _two_sum(ah * bh, ah * bl)
  total = _df_add(total, (al * bh, jnp.zeros_like(a)))
  return _df_add(total, (al * bl, jnp.zeros_like(a)))


def _df_add(a, b):
  s, e = _two_sum(a[0], b[0])
  return _fast_two_sum(s, e + (a[1] + b[1]))


def _df_sum(hi, lo):
  """Sum over the last axis of double-floats, pairwise."""
  while hi.shape[-1] > 1:
    if hi.shape[-1] % 2:
      pad = [(0, 0)] * (hi.ndim - 1) + [(0, 1)]
      hi, lo = jnp.pad(hi, pad), jnp.pad(lo, pad)
    hi, lo = _df_add((hi[..., 0::2], lo[..., 0::2]), (hi[..., 1::2], lo[..., 1::2]))
  return hi[..., 0], lo[..., 0]


def _df_div_int(a, count: int):
  """Double-float a divided by a positive integer below 2**24."""
  c = jnp.asarray(count, jnp.float32)
  q = a[0] / c
  p = _two_prod(q, c)
  r = (((a[0] - p[0]) - p[1]) + a[1]) / c
  return _fast_two_sum(q, r)


def _df_sqrt_to_float32(a):
  """sqrt of a double-float, rounded to float32."""
  s = jnp.sqrt(a[0])
  p = _two_prod(s, s)
  r = (((a[0] - p[0]) - p[1]) + a[1]) / (2 * s)
  return jnp.where(a[0] > 0, s + r, s)


def torch_std(x: Float[Array, "... n"], mean: Float[Array, "..."]) -> Float[Array, "..."]:
  """`torch.std(x)` (ddof = 1) of each row, given `mean` = `torch_mean(x)`:
  sqrt(sum((x - mean)^2) / (n - 1)) in float64 rounded to x's dtype."""
  n = x.shape[-1]
  if x.dtype != jnp.float32:
    return jnp.sqrt(jnp.sum((x - mean[..., None]) ** 2, axis=-1) / (n - 1)).astype(x.dtype)
  if n - 1 >= 1 << 24:
    raise ValueError(f"torch_std: rows of {n} values are longer than supported (2**24)")
  dh, dl = _two_sum(x, jnp.broadcast_to(-mean[..., None], x.shape))  # x - mean, exactly
  sq = _two_prod(dh, dh)
  sq = _fast_two_sum(sq[0], sq[1] + 2 * dh * dl)  # (dh + dl)^2 less dl^2 (< 2**-48 of it)
  total = _df_sum(*sq)
  return _df_sqrt_to_float32(_df_div_int(total, max(n - 1, 1)))


def true_divide(a: Array, b) -> Array:
  """a / b rounded once, as torch divides.

  XLA turns a division by a broadcast value (a scalar, a per-row statistic)
  into a multiplication by its reciprocal, which rounds differently in about
  one case in ten. A divisor that depends on `a` (it is b wherever a is not
  NaN) is not a broadcast, so the division stays a division.
  """
  b = jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape)
  return a / jnp.where(jnp.isnan(a), a, b)
