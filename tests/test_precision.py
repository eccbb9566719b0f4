"""Precision helpers: names, casts, and the clear error when float64 is
asked for with JAX's 64-bit mode off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scapre_jax as sj
from scapre_jax import models, precision


@pytest.fixture
def x64_off():
  """JAX's 64-bit mode off for one test, restored after (conftest turns it on)."""
  jax.config.update("jax_enable_x64", False)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", True)


def test_names_dtypes_and_cast():
  assert precision.PRECISIONS == ("float32", "float64")
  assert precision.compute_dtype(jnp.bfloat16) == jnp.float32
  assert precision.compute_dtype(jnp.float64) == jnp.float64
  tree = {"k": np.ones((2, 3), np.float32), "mask": np.ones(2, bool)}
  cast = precision.cast(tree, "float64")
  assert cast["k"].dtype == jnp.float64 and cast["mask"].dtype == jnp.bool_
  assert precision.cast(cast, "float32")["k"].dtype == jnp.float32
  with pytest.raises(ValueError, match="unknown precision 'float16'"):
    precision.require("float16")


def test_float64_with_x64_off_is_a_clear_error(tiny_dir, x64_off):
  assert not precision.x64_enabled()
  assert precision.require("float32") == "float32"
  message = "precision float64 needs JAX's 64-bit mode"
  with pytest.raises(ValueError, match=message):
    precision.require("float64")
  with pytest.raises(ValueError, match=message):
    models.load_model(tiny_dir, text_dtype="float64")
  # float64 NumPy kernels would be truncated to float32 without a word.
  inputs = sj.ConceptInputs.create(np.ones((1, 4), np.float32), np.zeros(4, np.float32),
                                   np.ones((1, 2, 4), np.float32),
                                   np.ones((1, 2, 4), np.float32))
  with pytest.raises(ValueError, match=message):
    sj.edit_projections({"k": np.eye(4)}, inputs, sj.EditConfig.preset("uce"),
                        key=jax.random.key(0))
