"""Array type for jaxtyping annotations: JAX arrays (tracers included) or
NumPy arrays, so the public functions accept either."""

from typing import Union

import jax
import numpy as np
from jaxtyping import Bool, Float, Int  # noqa: F401  (re-exported)

Array = Union[jax.Array, np.ndarray]
Scalar = Union[float, Float[Array, ""]]
