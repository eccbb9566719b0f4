"""scapre-jax: ScaPre concept erasure for Stable Diffusion in JAX.

The public API, re-exported by name. The math lives in `scapre_jax._src`
and `scapre_jax.edit`; model loading and file writing in thin modules beside.
"""

from scapre_jax import metrics, sharding
from scapre_jax._src.probes import ProbeNoise, draw_probe_noise, entropy_factor, mi_soft_mask
from scapre_jax._src.solvers import (
    bures_prox, egbr, solve_row_sylvester, solve_row_sylvester_woodbury, solve_spd_right)
from scapre_jax._src.spectral import (
    ConceptBasis, ased_direction, concept_basis, concept_projector, projector_basis,
    residual_projector,
    spectral_gate)
from scapre_jax._src.targets import cross_covariance, target_values, weighted_value_sum
from scapre_jax.config import PRESETS, EditConfig
from scapre_jax.edit import (
    NonFiniteWeightsError, concept_statistics, edit_projection, edit_projections,
    edit_weight, matrix_key)
from scapre_jax.inputs import ConceptInputs
from scapre_jax.sets import edit_sets, stack_sets

__version__ = "0.1.0"
