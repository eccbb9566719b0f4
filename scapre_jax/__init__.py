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

from scapre_jax import metrics, precision, sharding
from scapre_jax._src.probes import ProbeNoise, draw_probe_noise, entropy_factor, mi_soft_mask
from scapre_jax._src.solvers import (
    bures_prox, egbr, solve_row_sylvester, solve_row_sylvester_woodbury, solve_spd_right)
from scapre_jax._src.spectral import (
    ConceptBasis, ased_direction, concept_basis, concept_projector, projector_basis,
    residual_projector, spectral_gate)
from scapre_jax._src.targets import cross_covariance, target_values, weighted_value_sum
from scapre_jax.config import PRESETS, EditConfig
from scapre_jax.edit import (
    NonFiniteWeightsError, ScaPreStatistics, SmallStatistics, UCEStatistics,
    concept_statistics, edit_projection, edit_projections, edit_scapre, edit_small, edit_uce,
    edit_weight, matrix_key)
from scapre_jax.inputs import ConceptInputs
from scapre_jax.sets import edit_sets, stack_sets

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
    "residual_projector", "cross_covariance", "target_values", "weighted_value_sum",
    "solve_row_sylvester_woodbury", "solve_spd_right", "bures_prox", "egbr",
    # Reference forms (not run by the engine).
    "solve_row_sylvester", "concept_projector",
    # Modules.
    "metrics", "precision", "sharding",
]
