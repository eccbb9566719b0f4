"""Test setup: float64 on, so reference comparisons can run in double."""

import os

# Eight host devices for the sharding tests; LLVM -O0 cuts XLA compile time
# about 3x, which dominates this suite (the heavy ops are library calls).
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
