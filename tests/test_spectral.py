"""Concept projector, ASED regulariser and spectral residual."""

import numpy as np

from scapre_jax._src import spectral

from scapre_jax import reference as ref


def basis(c, mask=None):
  mask = np.ones(len(c), bool) if mask is None else mask
  return spectral.concept_basis(c, mask)


def test_projector_matches_released_inverse_when_well_conditioned():
  c = np.random.default_rng(0).normal(size=(12, 40))
  got = spectral.concept_projector(basis(c))
  np.testing.assert_allclose(got, ref.concept_projector(c).numpy(), atol=1e-8)


def test_projector_past_context_width_is_identity():
  # m = 60 concepts in 40 dimensions: C C^T is singular, span(C^T) is all.
  c = np.random.default_rng(1).normal(size=(60, 40))
  np.testing.assert_allclose(spectral.concept_projector(basis(c)), np.eye(40), atol=1e-10)


def test_projector_of_repeated_concepts_is_a_projector():
  c = np.random.default_rng(2).normal(size=(3, 20))
  c = np.concatenate([c, c, c[:1]])  # rank 3, m = 7
  pi = np.asarray(spectral.concept_projector(basis(c)))
  np.testing.assert_allclose(pi @ pi, pi, atol=1e-10)
  np.testing.assert_allclose(np.trace(pi), 3, atol=1e-10)


def test_ased_matches_reference_and_ignores_padding():
  rng = np.random.default_rng(3)
  c = rng.normal(size=(7, 30))
  gate = spectral.spectral_gate(basis(c), temperature=1.0, power=2.0)
  got = 0.37 * np.asarray(spectral.ased_direction(basis(c), gate))
  want = ref.ased_regulariser(c, 0.37, temperature=1.0, power=2.0).numpy()
  np.testing.assert_allclose(got, want, atol=1e-10)
  padded = np.concatenate([c, np.zeros((5, 30))])
  mask = np.arange(12) < 7
  b = basis(padded, mask)
  gate_p = spectral.spectral_gate(b, temperature=1.0, power=2.0)
  np.testing.assert_allclose(0.37 * np.asarray(spectral.ased_direction(b, gate_p)), want,
                             atol=1e-10)
  np.testing.assert_allclose(spectral.concept_projector(b), spectral.concept_projector(basis(c)),
                             atol=1e-10)


def test_residual_matches_reference():
  rng = np.random.default_rng(4)
  c, w = rng.normal(size=(9, 25)), rng.normal(size=(6, 25))
  b = basis(c)
  gate = spectral.spectral_gate(b, temperature=1.0, power=1.0)
  got = w @ np.asarray(spectral.residual_projector(b, c, np.ones(9, bool), gate))
  want = ref.spectral_residual_term(w, c, temperature=1.0, power=1.0).numpy()
  np.testing.assert_allclose(got, want, atol=1e-9)
