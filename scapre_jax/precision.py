"""Precision: which float type an edit computes in, and the epsilon it uses.

Two precisions (docs/reproducibility.md):

* "float32" (default): half and single precision weights are edited in
  float32. Fast; results can differ by float32 rounding between programs
  (batch compositions, device counts, CPU makes, CLI vs library).
* "float64": the text encoding and the whole edit run in float64; the weights
  are written back in the model's dtype. With `mi_mode="canonical"` a set's
  edit is then the same to 1e-10 (relative) however it is batched, sharded
  or called; `mi_mode="released"` keeps the released code's float32 MI
  standardisation, whose rounding the mask can still amplify.

float64 arrays need JAX's 64-bit mode, which is process-global and must be on
before any array is made. The `scapre-jax` CLI turns it on itself; the library
does not flip a global switch behind a caller's back: `require` raises a
clear error instead, and `enable_x64` is the one call a script makes first.

    from scapre_jax import precision
    precision.enable_x64()  # at start-up, before any JAX work
    model = models.load_model(path, text_dtype="float64")
    request = text.build_concept_inputs(model, concepts)   # float64 inputs
    edited = sj.edit_projections(precision.cast(kernels, "float64"), request.inputs,
                                 config, key=key)            # float64 edit
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The epsilon of the released code (norm clamps, MI cells, histograms, the
# spectral gate), kept as 1e-8 in every precision so float64 reproduces it.
EPS = 1e-8

PRECISIONS: tuple[str, ...] = ("float32", "float64")


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for half and single precision kernels, float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def x64_enabled() -> bool:
  """Whether JAX's 64-bit mode (`jax_enable_x64`) is on in this process."""
  return bool(jax.config.jax_enable_x64)


def enable_x64() -> None:
  """Turns on JAX's 64-bit mode for this process. Call it at start-up, before
  any JAX array exists: arrays made earlier keep their 32-bit types."""
  jax.config.update("jax_enable_x64", True)


def require(precision: str) -> str:
  """`precision` if it is known and usable here, else a clear ValueError."""
  if precision not in PRECISIONS:
    raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
  if precision == "float64" and not x64_enabled():
    raise ValueError(
        "precision float64 needs JAX's 64-bit mode, which is off in this process: "
        "call scapre_jax.precision.enable_x64() (or set JAX_ENABLE_X64=1) before "
        "any JAX work")
  return precision


def dtype_of(precision: str) -> jnp.dtype:
  """The float type arrays are cast to for `precision`."""
  return jnp.dtype(require(precision))


def cast(tree, precision: str):
  """Every floating leaf of `tree` (a dict of kernels, `ConceptInputs`, ...)
  cast to `precision`'s dtype; other leaves unchanged."""
  dtype = dtype_of(precision)
  return jax.tree.map(
      lambda x: jnp.asarray(x).astype(dtype)
      if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree)
