"""The JAX engine against the PyTorch float64 transcription of the released
algorithm (scapre_jax.reference): every preset, both techniques, with and
without MI mask, ASED, EGBR and preserve terms, on small and SD-1.5 shapes.

The MI mask is decided by which side of a row median each probe falls, so the
probes use a noise level at which rows separate to different degrees: the MI
values are then well separated and the test checks information, not float32
rounding (docs/algorithm.md, "MI soft mask").
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scapre_jax as sj
from scapre_jax._src.probes import draw_probe_noise

from scapre_jax import reference as ref


@dataclasses.dataclass
class Case:
  kernel: np.ndarray  # (d_in, d_out) float64
  inputs: sj.ConceptInputs
  old: list  # ragged (L_j, d_in)
  new: list
  preserve: list


def make_case(seed, *, m, d_in, d_out, length=10, num_preserve=0):
  """Random inputs with ragged sequence lengths and CLIP-like scales."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(length // 2, length + 1, size=m)
  concepts = rng.normal(size=(m, d_in))
  old = [np.concatenate([c[None], rng.normal(size=(n - 1, d_in))]) for c, n in zip(concepts, lengths)]
  new = [rng.normal(size=(n, d_in)) for n in lengths]
  preserve = [rng.normal(size=(int(n), d_in)) for n in rng.integers(3, length + 1, size=num_preserve)]

  def pad(seqs, size):
    out = np.zeros((len(seqs), size, d_in))
    mask = np.zeros((len(seqs), size), bool)
    for i, s in enumerate(seqs):
      out[i, :len(s)], mask[i, :len(s)] = s, True
    return out, mask

  old_p, seq_mask = pad(old, length)
  new_p, _ = pad(new, length)
  kwargs = {}
  if num_preserve:
    kwargs["preserve_seqs"], kwargs["preserve_mask"] = pad(preserve, length)
  inputs = sj.ConceptInputs.create(concepts, rng.normal(size=d_in), old_p, new_p,
                                   seq_mask, **kwargs)
  kernel = rng.normal(size=(d_in, d_out)) / np.sqrt(d_in)
  return Case(kernel, inputs, old, new, preserve)


def reference(case, config, key):
  """The reference fed the probe noise our engine draws from `key`."""
  noise = draw_probe_noise(key, case.inputs.num_concepts, case.inputs.d_in,
                           num_pos=config.mi_num_pos,
                           entropy_samples=config.entropy_samples, dtype=jnp.float64)
  noise = {name: np.asarray(getattr(noise, name)) for name in ("mi_pos", "mi_neg", "entropy")}
  out = ref.reference_edit(case.kernel.T, case.inputs.concept_vecs, case.inputs.empty_vec,
                           case.old, case.new, config, noise, case.preserve)
  return out.numpy().T


def ours(case, config, key, dtype):
  inputs = jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, case.inputs)
  out = sj.edit_projection(jnp.asarray(case.kernel, dtype), inputs, config, key=key)
  assert out.dtype == dtype
  return np.asarray(out, np.float64)


def assert_agrees(got, want, original, tol):
  """Relative Frobenius error of the weights, and of the change they made."""
  err = np.linalg.norm(got - want)
  assert err <= tol * np.linalg.norm(want), err / np.linalg.norm(want)
  change = np.linalg.norm(want - original)
  assert err <= 10 * tol * change, err / change


def check(case, config, seed=0):
  key = jax.random.key(seed)
  want = reference(case, config, key)
  for dtype, tol in ((jnp.float64, 1e-6), (jnp.float32, 1e-3)):
    assert_agrees(ours(case, config, key, dtype), want, case.kernel, tol)


# Probes at sigma = 1 against unit-scale concept projections: rows separate
# to different degrees, so MI values are spread over several levels.
NOISY = dict(noise_sigma=1.0, entropy_samples=6)

SMALL = [
    # (preset, overrides, m, preserve)
    ("scapre", {}, 1, 0),
    ("scapre", {}, 10, 3),
    ("scapre", {}, 50, 0),
    ("scapre", dict(technique="tensor"), 10, 0),
    ("scapre", dict(technique="tensor", egbr=True, bures_iters=2), 50, 4),
    ("scapre", dict(mi_mask=False, ased=False), 10, 2),
    ("scapre", dict(egbr=True, ased=False), 10, 0),
    ("scapre", dict(p=0.0, noise_sigma=0.0), 10, 0),
    ("scapre-nsfw", {}, 1, 0),
    ("scapre-nsfw", dict(technique="tensor"), 10, 2),
    ("scapre-nsfw", {}, 50, 0),
    ("scapre-small", {}, 1, 0),
    ("scapre-small", {}, 10, 2),
    ("scapre-small", dict(spectral_residual=True), 10, 0),
    ("scapre-small", dict(spectral_residual=True, residual_scale=0.3, technique="tensor"), 50, 3),
    ("scapre-small", dict(mi_mask=False), 10, 0),
    ("uce", {}, 1, 0),
    ("uce", {}, 10, 3),
    ("uce", dict(technique="tensor", preserve_scale=0.5), 50, 5),
]


@pytest.mark.parametrize("preset,overrides,m,num_preserve", SMALL)
def test_small_shapes(preset, overrides, m, num_preserve):
  config = sj.EditConfig.preset(preset, **{**NOISY, **overrides})
  case = make_case(m * 31 + num_preserve, m=m, d_in=64, d_out=24, num_preserve=num_preserve)
  check(case, config, seed=m)


SD15 = [
    # (d_out, preset, overrides, m, preserve): one SD-1.5 matrix shape each,
    # settings rotated so every shape meets a different solver.
    # The reference's per-row Cholesky loop costs about 30 s per 1000 rows,
    # so the large-scale solver runs on the two narrower shapes.
    (320, "scapre", dict(technique="tensor", egbr=True), 50, 3),
    (640, "scapre", {}, 10, 0),
    (640, "scapre-small", dict(spectral_residual=True), 10, 2),
    (1280, "scapre-small", {}, 10, 0),
    (1280, "uce", {}, 10, 3),
]


@pytest.mark.parametrize("d_out,preset,overrides,m,num_preserve", SD15)
def test_sd15_shapes(d_out, preset, overrides, m, num_preserve):
  config = sj.EditConfig.preset(preset, **{**NOISY, **overrides})
  case = make_case(d_out + m, m=m, d_in=768, d_out=d_out, length=20,
                   num_preserve=num_preserve)
  check(case, config)


SDXL = [
    # (d_out, preset, overrides, m, preserve): SDXL-base's two matrix shapes,
    # d_in 2048 (the concatenated context of both text encoders), d_out 640
    # and 1280.
    (640, "scapre-small", dict(technique="tensor"), 10, 2),
    (1280, "uce", {}, 10, 3),
    # The large-scale solver at d_in 2048 on 32 rows: every d_in-sized piece
    # (ASED, projector, Gram, probes) at SDXL's width, while the reference's
    # one-Cholesky-per-row loop, minutes for a whole 640-row matrix, stays short.
    (32, "scapre", {}, 3, 2),
]


@pytest.mark.parametrize("d_out,preset,overrides,m,num_preserve", SDXL)
def test_sdxl_shapes(d_out, preset, overrides, m, num_preserve):
  config = sj.EditConfig.preset(preset, **{**NOISY, **overrides})
  case = make_case(d_out + m + 1, m=m, d_in=2048, d_out=d_out, length=20,
                   num_preserve=num_preserve)
  check(case, config)
