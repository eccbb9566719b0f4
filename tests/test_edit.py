"""The public edit functions: padding, determinism, compilation, dtypes,
scale past the context width, bad input, and the metrics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scapre_jax as sj
from scapre_jax import edit as edit_module

from builders import kernels, random_inputs


def pad(inputs, extra_concepts, extra_rows):
  """Adds garbage padding concepts and sequence rows, masked out."""
  rng = np.random.default_rng(99)
  m, length, d = inputs.old_seqs.shape

  def grow(x, shape):
    return np.concatenate([np.asarray(x), rng.normal(size=shape).astype(x.dtype)], axis=0)

  def grow_rows(x):
    x = np.concatenate([np.asarray(x), rng.normal(size=(m, extra_rows, d)).astype(x.dtype)], axis=1)
    return grow(x, (extra_concepts, length + extra_rows, d))

  seq_mask = np.concatenate([np.asarray(inputs.seq_mask), np.zeros((m, extra_rows), bool)], axis=1)
  seq_mask = np.concatenate([seq_mask, rng.random((extra_concepts, length + extra_rows)) < 0.5])
  return sj.ConceptInputs.create(
      grow(inputs.concept_vecs, (extra_concepts, d)), inputs.empty_vec,
      grow_rows(inputs.old_seqs), grow_rows(inputs.new_seqs), seq_mask,
      np.arange(m + extra_concepts) < m)


@pytest.mark.parametrize("preset,overrides,m", [
    ("scapre", {}, 5),
    # Fewer text rows than d_in alone (k < d_in in "The factor form"), more padded.
    ("scapre", {}, 2),
    ("scapre", dict(technique="tensor", egbr=True), 5),
    ("scapre-nsfw", {}, 5),
    ("scapre-small", dict(spectral_residual=True), 5),
    ("uce", {}, 6),
    ("uce", {}, 2),
])
def test_padding_changes_nothing(preset, overrides, m):
  config = sj.EditConfig.preset(preset, noise_sigma=0.5, **overrides)
  inputs = random_inputs(0, m=m, d_in=32, dtype=np.float64)
  ks = kernels(1, 32, [16, 24], jnp.float64)
  key = jax.random.key(7)
  alone = sj.edit_projections(ks, inputs, config, key=key)
  padded = sj.edit_projections(ks, pad(inputs, 4, 3), config, key=key)
  for name in ks:
    np.testing.assert_allclose(padded[name], alone[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("preset,overrides,num_preserve,m", [
    ("scapre", {}, 0, 3),
    ("scapre", {}, 1, 8),
    ("scapre", dict(technique="tensor"), 2, 3),
    ("scapre", dict(mi_mask=False, ased=False, egbr=True), 1, 8),
    ("scapre-nsfw", {}, 2, 3),
    ("scapre-small", {}, 2, 8),
    ("scapre-small", dict(mi_mask=False, technique="tensor"), 0, 3),
    ("uce", {}, 2, 3),
    ("uce", dict(technique="tensor"), 0, 8),
])
def test_factor_form_equals_g_form(preset, overrides, num_preserve, m, monkeypatch):
  # docs/algorithm.md "The factor form": the same solution, rearranged; with
  # 3 concepts Z has fewer rows than d_in = 32, with 8 more. In float64 the
  # two agree to cond(G) * 1e-16 = 1e-13 here (cond(G) < 1e3: lamb >= 0.5
  # against rows of norm ~5).
  config = sj.EditConfig.preset(preset, noise_sigma=0.5, **overrides)
  inputs = random_inputs(3, m=m, d_in=32, length=4, num_preserve=num_preserve,
                         dtype=np.float64)
  assert edit_module.uses_factor_form(config)
  weight = next(iter(kernels(2, 32, [24], jnp.float64).values())).T
  stats = edit_module.concept_statistics(inputs, config, dtype=jnp.float64)
  key = jax.random.key(4)
  # A new jit wrapper per call, so the second traces the patched choice.
  solve = lambda: jax.jit(edit_module.edit_weight, static_argnames="config")(
      weight, inputs, stats, key, config)
  factor = solve()
  monkeypatch.setattr(edit_module, "uses_factor_form", lambda config: False)
  dense = solve()
  change = np.linalg.norm(dense - weight)
  assert change > 0.05 * np.linalg.norm(weight)
  np.testing.assert_allclose(factor, dense, rtol=0, atol=1e-12 * change)


def test_same_key_same_result_and_keys_matter():
  config = sj.EditConfig.preset("scapre", noise_sigma=0.5)
  inputs = random_inputs(1, m=4, d_in=16)
  ks = kernels(2, 16, [8])
  a = sj.edit_projections(ks, inputs, config, key=jax.random.key(0))
  b = sj.edit_projections(ks, inputs, config, key=jax.random.key(0))
  c = sj.edit_projections(ks, inputs, config, key=jax.random.key(1))
  for name in ks:
    np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a[name], c[name])


def test_zero_noise_is_deterministic_across_keys():
  config = sj.EditConfig.preset("scapre", noise_sigma=0.0)
  inputs = random_inputs(2, m=4, d_in=16)
  ks = kernels(3, 16, [8])
  a = sj.edit_projections(ks, inputs, config, key=jax.random.key(0))
  b = sj.edit_projections(ks, inputs, config, key=jax.random.key(123))
  for name in ks:
    np.testing.assert_array_equal(a[name], b[name])


def test_projections_equal_single_edits_with_matrix_keys():
  config = sj.EditConfig.preset("scapre", noise_sigma=0.3)
  inputs = random_inputs(3, m=3, d_in=16, dtype=np.float64)
  ks = kernels(4, 16, [8, 12], jnp.float64)
  key = jax.random.key(5)
  together = sj.edit_projections(ks, inputs, config, key=key, matrix_batch=1)
  for name, k in ks.items():
    alone = sj.edit_projection(k, inputs, config, key=sj.matrix_key(key, name))
    np.testing.assert_allclose(together[name], alone, rtol=1e-12, atol=1e-14)


def test_second_call_does_not_recompile():
  config = sj.EditConfig.preset("scapre", noise_sigma=0.2, entropy_samples=3)
  ks = kernels(5, 16, [8, 8, 12])
  sj.edit_projections(ks, random_inputs(4, m=3, d_in=16), config, key=jax.random.key(0))
  stack_size = edit_module.edit_kernel_stack._cache_size()
  stats_size = edit_module.concept_statistics._cache_size()
  # New values, same shapes, an equal (not identical) config.
  config2 = dataclasses.replace(config)
  ks2 = {n: k + 1 for n, k in ks.items()}
  sj.edit_projections(ks2, random_inputs(5, m=3, d_in=16), config2, key=jax.random.key(1))
  assert edit_module.edit_kernel_stack._cache_size() == stack_size
  assert edit_module.concept_statistics._cache_size() == stats_size


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64])
def test_kernels_keep_their_dtype(dtype):
  config = sj.EditConfig.preset("scapre", noise_sigma=0.2, entropy_samples=3)
  ks = kernels(6, 16, [8], dtype)
  out = sj.edit_projections(ks, random_inputs(6, m=3, d_in=16), config, key=jax.random.key(0))
  for name in ks:
    assert out[name].dtype == dtype and out[name].shape == ks[name].shape
  # Half-precision kernels run the math in float32: the result is the float32
  # edit of the same (rounded) kernel, rounded once.
  if dtype in (jnp.bfloat16, jnp.float16):
    ref = sj.edit_projections({n: k.astype(jnp.float32) for n, k in ks.items()},
                              random_inputs(6, m=3, d_in=16), config, key=jax.random.key(0))
    for name in ks:
      np.testing.assert_array_equal(out[name], ref[name].astype(dtype))


def test_thousand_concepts_past_context_width():
  # m = 1000 > d_in = 768: the released (C C^T + 1e-8 I)^-1 is singular here,
  # while the concepts span the whole context, so Pi = I and each row solves
  # w_i (G + alpha_i I) = b_i. Checked in float64 against that system built
  # from the same pieces and solved densely, row by row. Canonical MI mode
  # computes the mask in float64 too (released mode rounds it in float32,
  # differently in the engine's fused program and in the eager one below).
  config = sj.EditConfig.preset("scapre", entropy_samples=2, mi_mode="canonical")
  inputs = random_inputs(7, m=1000, d_in=768, length=3, dtype=np.float64)
  ks = {"to_k": kernels(7, 768, [64], jnp.float64)["layer_0/to_k/kernel"]}
  key = jax.random.key(0)
  out = sj.edit_projections(ks, inputs, config, key=key)
  assert bool(jnp.all(jnp.isfinite(out["to_k"])))
  # Pi = I, so every row is pulled hard towards the targets: weights move.
  assert float(jnp.abs(out["to_k"] - ks["to_k"]).max()) > 1e-3

  w = ks["to_k"].T
  stats = sj.concept_statistics(inputs, config, dtype=jnp.float64)
  basis = np.asarray(stats.projector_basis)
  np.testing.assert_allclose(basis @ basis.T, np.eye(768), rtol=0, atol=1e-10)
  noise = sj.draw_probe_noise(sj.matrix_key(key, "to_k"), 1000, 768, num_pos=config.mi_num_pos,
                              entropy_samples=config.entropy_samples, dtype=jnp.float64)
  r = sj.mi_soft_mask(w, inputs.concept_vecs, inputs.empty_vec, noise.mi_pos, noise.mi_neg,
                      inputs.concept_mask, sigma=config.noise_sigma,
                      temperature=config.mi_temperature, power=config.p, mode=config.mi_mode)
  h = jnp.clip(1 - sj.entropy_factor(w, inputs.concept_vecs, noise.entropy, inputs.concept_mask,
                                     sigma=config.noise_sigma, bins=config.entropy_bins), 0, 1)
  mu = float(jnp.mean(h))
  eta = config.erase_scale
  values = sj.target_values(w, inputs.old_seqs, inputs.new_seqs, inputs.seq_mask,
                            technique="replace")
  rhs = np.asarray((config.lamb + mu) * w) + eta * np.einsum("mo,mlo,mli->oi", r, values, inputs.old_seqs)
  gram = np.asarray(edit_module.scapre_gram(stats, config, mu))
  alpha = eta * np.asarray(r).max(axis=0)
  solved = np.stack([np.linalg.solve((gram + a * np.eye(768)).T, b) for a, b in zip(alpha, rhs)])
  want = sj.bures_prox(w, solved, mu=mu, lam_prox=config.lamb + mu, iters=config.bures_iters)
  # G is well conditioned here (cond ~ 1e4): float64 solves agree to ~1e-12.
  np.testing.assert_allclose(out["to_k"].T, want, rtol=0,
                             atol=1e-9 * float(np.abs(want).max()))


def test_statistics_are_built_for_their_method():
  inputs = random_inputs(1, m=3, d_in=16)
  uce = sj.concept_statistics(inputs, sj.EditConfig.preset("uce"))
  assert type(uce) is sj.UCEStatistics
  nsfw = sj.concept_statistics(inputs, sj.EditConfig.preset("scapre-nsfw"))
  assert type(nsfw) is sj.ScaPreStatistics and nsfw.ased is None
  assert nsfw.projector_basis.shape == (16, 3)
  tensor = sj.concept_statistics(inputs, sj.EditConfig.preset("scapre-small", technique="tensor"))
  assert type(tensor) is sj.SmallStatistics and tensor.shift is None and tensor.residual is None
  # A wrong combination is a clear error before tracing, not a missing key.
  with pytest.raises(ValueError, match="needs ScaPreStatistics"):
    sj.edit_weight(jnp.ones((4, 16)), inputs, uce, jax.random.key(0),
                   sj.EditConfig.preset("scapre"))


def test_public_api_resolves():
  assert len(set(sj.__all__)) == len(sj.__all__)
  for name in sj.__all__:
    assert getattr(sj, name) is not None, name


def test_edit_moves_concepts_to_targets_and_spares_preserved():
  # Concepts live in the first 24 dims; preserved prompts in the last 24.
  d = 48
  rng = np.random.default_rng(8)
  base = random_inputs(8, m=6, d_in=d, dtype=np.float64)
  zero_tail = lambda x: np.concatenate([np.asarray(x)[..., :24], np.zeros_like(np.asarray(x)[..., 24:])], -1)
  inputs = sj.ConceptInputs.create(
      zero_tail(base.concept_vecs), zero_tail(base.empty_vec), zero_tail(base.old_seqs),
      zero_tail(base.new_seqs), base.seq_mask,
      preserve_seqs=np.concatenate([np.zeros((4, 5, 24)), rng.normal(size=(4, 5, 24))], -1))
  ks = kernels(9, d, [20], jnp.float64)
  # ScaPre also pulls concept directions towards zero (C^T C and Pi terms)
  # and restores row norms (Bures), so it closes less of the gap to V.
  for preset, max_gap in (("scapre", 0.85), ("scapre-small", 0.75), ("uce", 0.6)):
    config = sj.EditConfig.preset(preset, noise_sigma=0.0, erase_scale=5.0)
    out = sj.edit_projections(ks, inputs, config, key=jax.random.key(0))
    report = sj.metrics.edit_report(ks, out, inputs, config)
    for entry in report.values():
      assert entry["target_gap"] < max_gap, (preset, entry)
      assert entry["preserve_shift"] < 0.3, (preset, entry)
      assert len(entry["target_gap_per_concept"]) == 6


def test_metrics_hand_worked():
  # W = I (2x2); edited W' = 0. Concept X = [[1, 0]], target from guide
  # Y = [[0, 0]] is V = 0: gap = ||X W'^T - 0|| / ||X W^T - 0|| = 0.
  eye = jnp.eye(2)
  gap = sj.metrics.target_gap(eye, jnp.zeros((2, 2)), jnp.zeros((1, 1, 2)),
                              jnp.array([[[1.0, 0.0]]]), jnp.array([[True]]))
  np.testing.assert_allclose(gap, [0.0])
  # Halving W moves every projection by half its size.
  shift = sj.metrics.projection_shift(eye, eye / 2, jnp.array([[[3.0, 4.0]]]), jnp.array([[True]]))
  np.testing.assert_allclose(shift, [0.5])


# ---- bad input -------------------------------------------------------------


def test_empty_concept_list():
  with pytest.raises(ValueError, match="empty concept list"):
    sj.ConceptInputs.create(np.zeros((0, 4)), np.zeros(4), np.zeros((0, 2, 4)), np.zeros((0, 2, 4)))
  inputs = random_inputs(0, m=2, d_in=4)
  with pytest.raises(ValueError, match="every concept is masked"):
    sj.ConceptInputs.create(inputs.concept_vecs, inputs.empty_vec, inputs.old_seqs,
                            inputs.new_seqs, concept_mask=np.zeros(2, bool))


def test_mismatched_widths():
  inputs = random_inputs(0, m=2, d_in=8)
  with pytest.raises(ValueError, match="input width 6.*width 8"):
    sj.edit_projection(jnp.zeros((6, 4)), inputs, sj.EditConfig(), key=jax.random.key(0))
  with pytest.raises(ValueError, match="new_seqs must have the shape"):
    sj.ConceptInputs.create(inputs.concept_vecs, inputs.empty_vec, inputs.old_seqs,
                            np.zeros((2, 3, 8)))
  with pytest.raises(ValueError, match="empty_vec"):
    sj.ConceptInputs.create(inputs.concept_vecs, np.zeros(5), inputs.old_seqs, inputs.new_seqs)


def test_wrong_kernel_rank_and_dtype():
  inputs = random_inputs(0, m=2, d_in=8)
  with pytest.raises(ValueError, match="must be 2-D"):
    sj.edit_projection(jnp.zeros((8, 4, 1)), inputs, sj.EditConfig(), key=jax.random.key(0))
  with pytest.raises(ValueError, match="floating point"):
    sj.edit_projection(jnp.zeros((8, 4), jnp.int32), inputs, sj.EditConfig(), key=jax.random.key(0))
  with pytest.raises(ValueError, match="no kernels"):
    sj.edit_projections({}, inputs, sj.EditConfig(), key=jax.random.key(0))


def test_unknown_preset_method_and_bad_settings():
  with pytest.raises(ValueError, match="unknown preset 'fast'"):
    sj.EditConfig.preset("fast")
  with pytest.raises(ValueError, match="unknown method 'sgd'"):
    sj.EditConfig(method="sgd")
  with pytest.raises(ValueError, match="unknown technique"):
    sj.EditConfig(technique="swap")
  with pytest.raises(ValueError, match="lamb must be > 0"):
    sj.EditConfig(lamb=0.0)
  with pytest.raises(ValueError, match="noise_sigma must be >= 0"):
    sj.EditConfig.preset("scapre", noise_sigma=-1.0)
  with pytest.raises(ValueError, match="unknown EditConfig fields"):
    sj.EditConfig.from_dict({"lambda": 1})
  cfg = dataclasses.replace(sj.EditConfig.preset("scapre"), noise_sigma=0.0)
  assert cfg.noise_sigma == 0.0 and cfg.p == 8.0
  assert sj.EditConfig.from_dict(cfg.to_dict()) == cfg


def test_non_finite_inputs_rejected():
  inputs = random_inputs(0, m=2, d_in=8)
  bad = np.asarray(inputs.old_seqs).copy()
  bad[0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="old_seqs has non-finite"):
    sj.ConceptInputs.create(inputs.concept_vecs, inputs.empty_vec, bad, inputs.new_seqs)


def test_non_finite_result_is_reported():
  inputs = random_inputs(0, m=2, d_in=8)
  kernel = jnp.full((8, 4), jnp.inf, jnp.float32)
  with pytest.raises(sj.NonFiniteWeightsError, match="non-finite weights"):
    sj.edit_projections({"k": kernel}, inputs, sj.EditConfig(), key=jax.random.key(0))
