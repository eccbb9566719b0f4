"""Many concept sets in one compiled call.

Sets are padded to common sizes (concepts, sequence rows, preserve prompts)
with masks and stacked along a leading "sets" axis; `edit_sets` vmaps the
engine over that axis. Padding changes nothing in exact arithmetic
(tests/test_edit.py), so each set's result equals running that set alone
with the same key up to rounding: to 1e-10 in float64 with canonical MI, and
in float32 up to a rounding the MI mask can amplify (docs/reproducibility.md).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scapre_jax import sharding
from scapre_jax.config import EditConfig
from scapre_jax.edit import (
    check_request, concept_statistics, default_matrix_batch, edit_in_shape_groups, edit_stack,
    matrix_keys)
from scapre_jax.inputs import ConceptInputs


def _pad_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return np.pad(x, widths)


def stack_sets(sets: Sequence[ConceptInputs], *, num_sets: int | None = None
               ) -> ConceptInputs:
  """Pads every set to the largest m, L, k, L_p and stacks them: (K, ...).

  `num_sets` > len(sets) appends copies of the first set (whose results the
  caller drops), so the sets axis can divide a device count.
  """
  if not sets:
    raise ValueError("no concept sets to stack")
  d_in = {s.d_in for s in sets}
  if len(d_in) != 1:
    raise ValueError(f"all sets must be encoded with one text encoder; widths {sorted(d_in)}")
  sets = list(sets) + [sets[0]] * ((num_sets or len(sets)) - len(sets))
  m = max(s.num_concepts for s in sets)
  length = max(s.old_seqs.shape[1] for s in sets)
  k = max(s.preserve_seqs.shape[0] for s in sets)
  p_len = max(s.preserve_seqs.shape[1] for s in sets)
  sizes = {  # field -> target size per axis
      "concept_vecs": (m, None), "empty_vec": (None,),
      "old_seqs": (m, length, None), "new_seqs": (m, length, None),
      "seq_mask": (m, length), "concept_mask": (m,),
      "preserve_seqs": (k, p_len, None), "preserve_mask": (k, p_len),
  }
  stacked = {}
  for field, target in sizes.items():
    arrays = []
    for s in sets:
      x = np.asarray(getattr(s, field))
      for axis, size in enumerate(target):
        if size is not None:
          x = _pad_axis(x, axis, size)
      arrays.append(x)
    stacked[field] = jnp.asarray(np.stack(arrays))
  return ConceptInputs(**stacked)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def set_statistics(inputs, config, dtype):
  """`concept_statistics` of every set of a stacked batch."""
  return jax.vmap(lambda x: concept_statistics(x, config, dtype))(inputs)


@functools.partial(jax.jit, static_argnames=("config", "matrix_batch", "count"))
def _edit_set_stack(kernels, keys, inputs, stats, config, matrix_batch, count):
  """Every set's edit of one shape group in one compiled call.

  Returns, for the first `count` sets, a tuple of edited kernels per set and
  a (sets, matrices) finite flag, so the host slices nothing.
  """
  stack = jnp.stack(kernels)
  edited = jax.vmap(
      lambda x, s: edit_stack(stack, keys, x, s, config, matrix_batch))(inputs, stats)[:count]
  return tuple(tuple(e) for e in edited), jnp.all(jnp.isfinite(edited), axis=(2, 3))


def edit_sets(kernels: Mapping[str, jax.Array], sets: Sequence[ConceptInputs],
              config: EditConfig, *, key: jax.Array, mesh: jax.sharding.Mesh | None = None,
              matrix_batch: int | None = None) -> list[dict[str, jax.Array]]:
  """Edits the same kernels for every concept set; one dict per set.

  Every set uses `key` (as if it ran alone with that key), so results depend
  on which sets share a batch only through rounding (docs/reproducibility.md).
  With a `mesh` (see `sharding.sets_mesh`)
  the sets axis is sharded over its devices and the kernels replicated; the
  number of sets is padded up to a multiple of the device count.
  """
  kernels = check_request(kernels, sets, config)
  count = len(sets)
  devices = 1 if mesh is None else mesh.devices.size
  batched = stack_sets(sets, num_sets=-(-count // devices) * devices)
  if mesh is not None:
    batched = sharding.shard_sets(batched, mesh)
  batch = default_matrix_batch(matrix_batch)

  def edit_group(names, stack, stats):
    keys = matrix_keys(key, names)  # every set uses `key`
    if mesh is not None:
      stack, keys = sharding.replicate((stack, keys), mesh)
    return _edit_set_stack(stack, keys, batched, stats, config, batch, count)

  results = edit_in_shape_groups(
      kernels, lambda dtype: set_statistics(batched, config, dtype), edit_group)
  out: list[dict[str, jax.Array]] = [{} for _ in range(count)]
  for names, edited in results:
    for result, per_set in zip(out, edited):
      result.update(zip(names, per_set))
  return [{name: result[name] for name in kernels} for result in out]
