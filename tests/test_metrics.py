"""metrics.mask_report: the MI row-weight spread per matrix, and the flag for
masks decided by float32 rounding, on hand-built rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scapre_jax as sj
from scapre_jax import edit, metrics
from scapre_jax._src import probes


def rows_case(separated: bool):
  """d_in = 2, concept (1, 0), empty (0, 1). `separated`: every row fires
  for one of them only (above or below), so every MI is log 2 up to rounding.
  Otherwise a third of the rows respond to both equally (MI near 0)."""
  rng = np.random.default_rng(0)
  d_out = 48
  above = rng.random(d_out) < 0.5
  weight = np.where(above[:, None], [1.0, 0.0], [0.0, 1.0]) * rng.uniform(0.5, 2, (d_out, 1))
  if not separated:
    weight[::3] = [1.0, 1.0]
  inputs = sj.ConceptInputs.create(np.array([[1.0, 0.0]]), np.array([0.0, 1.0]),
                                   np.ones((1, 3, 2)), np.ones((1, 3, 2)))
  return {"w/attn2/to_k/kernel": jnp.asarray(weight.T, jnp.float32)}, inputs


@pytest.mark.parametrize("separated,mode,flagged", [
    (True, "released", 1), (True, "canonical", 0), (False, "released", 0)])
def test_mask_report_spread_and_rounding_flag(separated, mode, flagged):
  kernels, inputs = rows_case(separated)
  config = sj.EditConfig(noise_sigma=0.0, p=8.0, mi_mode=mode)
  key = jax.random.key(0)
  report = metrics.mask_report(kernels, inputs, config, key=key)
  (name, entry), = report.items()
  assert entry["mi_by_rounding"] == flagged
  # The spread is that of the weights the edit uses (same matrix key).
  weight = kernels[name].T
  noise = edit.probe_noise(edit.matrix_key(key, name), inputs, config)
  r = np.asarray(probes.mi_soft_mask(weight, inputs.concept_vecs, inputs.empty_vec,
                                     noise.mi_pos, noise.mi_neg, inputs.concept_mask,
                                     sigma=0.0, temperature=0.7, power=8.0, mode=mode))
  assert (entry["mi_weight_mean"], entry["mi_weight_min"], entry["mi_weight_max"]) == (
      float(r.mean()), float(r.min()), float(r.max()))
  if mode == "canonical":  # exact ties: every weight sigmoid(0) ** p
    assert entry["mi_weight_min"] == entry["mi_weight_max"] == pytest.approx(0.5 ** 8)
  if not separated:  # MI near 0 and log 2: weights far apart
    assert entry["mi_weight_min"] < 1e-3 * entry["mi_weight_max"]


def test_mask_report_is_empty_without_the_mask():
  kernels, inputs = rows_case(True)
  assert metrics.mask_report(kernels, inputs, sj.EditConfig(mi_mask=False),
                             key=jax.random.key(0)) == {}


def test_tied_by_rounding_hand_worked():
  ln2 = np.float32(np.log(2))
  step = np.nextafter(ln2, np.float32(1)) - ln2
  mi = jnp.asarray(np.array([[ln2, ln2 + step, ln2], [ln2, ln2, ln2], [ln2, 0.5, ln2]],
                            np.float32))
  np.testing.assert_array_equal(probes.tied_by_rounding(mi), [True, False, False])


def test_cli_suggests_canonical_mode_once():
  from scapre_jax import cli
  layer = lambda n: {"target_gap": 0.5, "mi_by_rounding": n}
  summary = {"sets": [{"layers": {"a": layer(2), "b": layer(0)}},
                      {"layers": {"a": layer(1), "b": {"target_gap": 0.1}}}]}
  note = cli.rounding_note(summary)
  assert note.startswith("note: in 2 matrices the MI mask") and "\n" not in note
  assert note.count("--set mi_mode=canonical") == 1
  assert cli.rounding_note({"sets": [{"layers": {"a": layer(0)}}]}) is None
