"""The text side of an edit, already encoded (docs/algorithm.md "Text side").

`ConceptInputs` is a pytree of arrays: it can be passed through `jit`,
stacked along a leading "sets" axis and `vmap`ped. Masks are always present
after `ConceptInputs.create` (all True where the caller gave none), so every
instance of the same sizes has the same tree structure.
"""

from __future__ import annotations

import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np


# Not type-checked under pytest: JAX rebuilds pytrees with any leaves (None,
# axis numbers, ShapeDtypeStruct); `create` and `validate` check real inputs.
@typing.no_type_check
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ConceptInputs:
  """Encoded concepts of one concept set.

  Attributes:
    concept_vecs: (m, d_in) last-token vector c_j of each erased prompt.
    empty_vec: (d_in,) e0, token 1 of the empty prompt.
    old_seqs: (m, L, d_in) rows X_j of the erased prompts: aligned sequences,
      or L = 1 last-token rows (docs/algorithm.md "Token rows").
    new_seqs: (m, L, d_in) rows Y_j of the guide prompts, likewise.
    seq_mask: (m, L) bool; rows where it is False are ignored (L_j < L).
    concept_mask: (m,) bool; False marks a padding concept that changes
      nothing.
    preserve_seqs: (k, L_p, d_in) rows whose projections are kept (whole
      sequences, or last-token rows).
    preserve_mask: (k, L_p) bool.
  """

  concept_vecs: jax.Array
  empty_vec: jax.Array
  old_seqs: jax.Array
  new_seqs: jax.Array
  seq_mask: jax.Array
  concept_mask: jax.Array
  preserve_seqs: jax.Array
  preserve_mask: jax.Array

  @classmethod
  def create(cls, concept_vecs, empty_vec, old_seqs, new_seqs, seq_mask=None,
             concept_mask=None, preserve_seqs=None, preserve_mask=None,
             ) -> "ConceptInputs":
    """Builds and validates inputs; missing masks default to all-True.

    With no preserve sequences the preserve arrays get k = 0 rows.
    Raises ValueError on empty concept lists, mismatched widths or lengths,
    non-finite values and masks of the wrong shape.
    """
    concept_vecs = jnp.asarray(concept_vecs)
    empty_vec = jnp.asarray(empty_vec)
    old_seqs = jnp.asarray(old_seqs)
    new_seqs = jnp.asarray(new_seqs)
    if concept_vecs.ndim != 2:
      raise ValueError(
          f"concept_vecs must be (m, d_in), got shape {concept_vecs.shape}")
    m, d_in = concept_vecs.shape
    if m == 0:
      raise ValueError("empty concept list: concept_vecs has no rows")
    if old_seqs.ndim != 3 or old_seqs.shape[0] != m or old_seqs.shape[2] != d_in:
      raise ValueError(
          f"old_seqs must be (m={m}, L, d_in={d_in}), got {old_seqs.shape}")
    if new_seqs.shape != old_seqs.shape:
      raise ValueError(
          f"new_seqs must have the shape of old_seqs {old_seqs.shape}, got {new_seqs.shape}")
    if empty_vec.shape != (d_in,):
      raise ValueError(f"empty_vec must be (d_in={d_in},), got {empty_vec.shape}")
    length = old_seqs.shape[1]
    seq_mask = _mask(seq_mask, (m, length), "seq_mask")
    concept_mask = _mask(concept_mask, (m,), "concept_mask")
    if preserve_seqs is None:
      if preserve_mask is not None:
        raise ValueError("preserve_mask given without preserve_seqs")
      preserve_seqs = jnp.zeros((0, 1, d_in), concept_vecs.dtype)
    preserve_seqs = jnp.asarray(preserve_seqs)
    if preserve_seqs.ndim != 3 or preserve_seqs.shape[2] != d_in:
      raise ValueError(
          f"preserve_seqs must be (k, L, d_in={d_in}), got {preserve_seqs.shape}")
    preserve_mask = _mask(preserve_mask, preserve_seqs.shape[:2], "preserve_mask")
    inputs = cls(concept_vecs, empty_vec, old_seqs, new_seqs, seq_mask,
                 concept_mask, preserve_seqs, preserve_mask)
    inputs.validate()
    return inputs

  @property
  def num_concepts(self) -> int:
    """Padded number of concepts m."""
    return self.concept_vecs.shape[-2]

  @property
  def d_in(self) -> int:
    return self.concept_vecs.shape[-1]

  def validate(self) -> None:
    """Structural and finiteness checks, on concrete (not traced) arrays."""
    if self.concept_vecs.ndim != 2:
      raise ValueError(
          "ConceptInputs of one set expected; got a batch with concept_vecs "
          f"{self.concept_vecs.shape}. Use edit_sets for stacked sets.")
    if isinstance(self.concept_mask, jax.core.Tracer):
      return
    if not bool(np.any(np.asarray(self.concept_mask))):
      raise ValueError("empty concept list: every concept is masked out")
    for field in ("concept_vecs", "empty_vec", "old_seqs", "new_seqs", "preserve_seqs"):
      value = np.asarray(getattr(self, field))
      if not np.issubdtype(value.dtype, np.floating) and value.size:
        raise ValueError(f"{field} must be floating point, got {value.dtype}")
      if value.size and not np.isfinite(value.astype(np.float32)).all():
        raise ValueError(f"{field} has non-finite values (NaN or inf)")


def _mask(mask, shape, name):
  if mask is None:
    return jnp.ones(shape, bool)
  mask = jnp.asarray(mask)
  if mask.shape != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got {mask.shape}")
  if mask.dtype != jnp.bool_:
    raise ValueError(f"{name} must be boolean, got {mask.dtype}")
  return mask
