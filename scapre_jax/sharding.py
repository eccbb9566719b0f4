"""The one sharding module: concept sets split over devices, weights
replicated. On CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=8`
gives 8 devices to test with."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = "sets"


def sets_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: every local device) named "sets"."""
  devices = jax.local_devices() if devices is None else list(devices)
  return jax.sharding.Mesh(devices, (AXIS,))


def shard_sets(tree, mesh: jax.sharding.Mesh):
  """Puts every leaf's leading axis (the sets axis) across the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P(AXIS)))


def replicate(tree, mesh: jax.sharding.Mesh):
  """A full copy of every leaf on every device of the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P()))
