"""scapre-jax: ScaPre concept erasure for Stable Diffusion in JAX.

The public API, re-exported by name. The math lives in `scapre_jax._src`
and `scapre_jax.edit` (docs/algorithm.md says which function runs for each
preset); model loading and file writing in thin modules beside.

Everything exported here is what the engine runs, except two reference
forms kept for checking and study: `solve_row_sylvester` (the exact
two-eigendecomposition closed form of step 6, less accurate in float32 than
the Cholesky + Woodbury solve the engine uses) and `concept_projector` (the
dense Pi; the engine works with its basis, `projector_basis`).
"""

import importlib
import typing

__version__ = "0.1.0"

__all__ = [
    # Settings and inputs.
    "EditConfig", "PRESETS", "ConceptInputs",
    # Entry points: one matrix, named matrices, many concept sets.
    "edit_projection", "edit_projections", "edit_sets", "stack_sets", "matrix_key",
    "NonFiniteWeightsError",
    # One matrix by method, and the text-side statistics each method takes.
    "edit_weight", "edit_scapre", "edit_small", "edit_uce", "concept_statistics",
    "ScaPreStatistics", "SmallStatistics", "UCEStatistics",
    # Kernels (docs/algorithm.md).
    "ProbeNoise", "draw_probe_noise", "mi_soft_mask", "entropy_factor",
    "ConceptBasis", "concept_basis", "spectral_gate", "ased_direction", "projector_basis",
    "residual_projector", "cross_covariance", "target_values", "weighted_value_sum", "shift_sum",
    "solve_row_sylvester_woodbury", "solve_spd_right", "bures_prox", "egbr",
    # Reference forms (not run by the engine).
    "solve_row_sylvester", "concept_projector",
    # Modules.
    "metrics", "precision", "sharding",
]

# Where each exported name is defined. Names are imported on first use
# (PEP 562 `__getattr__`), so importing the package, or a light module of it
# (`config`, `io`, `outputs`), does not import JAX: the command line checks
# its arguments and `scapre-jax inspect` reads a file in well under a second.
_EXPORTS = {
    "scapre_jax.config": ("EditConfig", "PRESETS"),
    "scapre_jax.inputs": ("ConceptInputs",),
    "scapre_jax.errors": ("NonFiniteWeightsError",),
    "scapre_jax.edit": (
        "edit_projection", "edit_projections", "matrix_key", "edit_weight", "edit_scapre",
        "edit_small", "edit_uce", "concept_statistics", "ScaPreStatistics",
        "SmallStatistics", "UCEStatistics"),
    "scapre_jax.sets": ("edit_sets", "stack_sets"),
    "scapre_jax._src.probes": ("ProbeNoise", "draw_probe_noise", "mi_soft_mask",
                               "entropy_factor"),
    "scapre_jax._src.spectral": (
        "ConceptBasis", "concept_basis", "spectral_gate", "ased_direction",
        "projector_basis", "residual_projector", "concept_projector"),
    "scapre_jax._src.targets": ("cross_covariance", "target_values", "weighted_value_sum", "shift_sum"),
    "scapre_jax._src.solvers": (
        "solve_row_sylvester_woodbury", "solve_spd_right", "bures_prox", "egbr",
        "solve_row_sylvester"),
}
_MODULES = ("metrics", "precision", "sharding")
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
  if name in _MODULES:
    value = importlib.import_module(f"scapre_jax.{name}")
  elif name in _WHERE:
    value = getattr(importlib.import_module(_WHERE[name]), name)
  else:
    raise AttributeError(f"module 'scapre_jax' has no attribute {name!r}")
  globals()[name] = value  # later lookups skip __getattr__
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))


if typing.TYPE_CHECKING:  # what the names are, for type checkers and IDEs
  from scapre_jax import metrics, precision, sharding  # noqa: F401
  from scapre_jax._src.probes import (  # noqa: F401
      ProbeNoise, draw_probe_noise, entropy_factor, mi_soft_mask)
  from scapre_jax._src.solvers import (  # noqa: F401
      bures_prox, egbr, solve_row_sylvester, solve_row_sylvester_woodbury, solve_spd_right)
  from scapre_jax._src.spectral import (  # noqa: F401
      ConceptBasis, ased_direction, concept_basis, concept_projector, projector_basis,
      residual_projector, spectral_gate)
  from scapre_jax._src.targets import (  # noqa: F401
      cross_covariance, target_values, weighted_value_sum, shift_sum)
  from scapre_jax.config import PRESETS, EditConfig  # noqa: F401
  from scapre_jax.edit import (  # noqa: F401
      ScaPreStatistics, SmallStatistics, UCEStatistics, concept_statistics,
      edit_projection, edit_projections, edit_scapre, edit_small, edit_uce, edit_weight,
      matrix_key)
  from scapre_jax.errors import NonFiniteWeightsError  # noqa: F401
  from scapre_jax.inputs import ConceptInputs  # noqa: F401
  from scapre_jax.sets import edit_sets, stack_sets  # noqa: F401
