"""What an edit did, measured in the projection space (docs/algorithm.md,
last section): how far each erased concept's projections moved to their
targets, and how little the projections of preserved or unrelated prompts
moved.

What a summary shows (`selectivity`): the erased prompts' concept tokens
(the rows c_j every solver acts on) against the word tokens of prompts no set
names. Whole sequences mislead there: from the concept's last token on, X_j
is mostly EOS and padding rows, which every prompt shares, so an erase must
move them in every prompt alike.

All functions take Flax kernels (d_in, d_out), before and after the edit.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from scapre_jax._src.typing import Array, Bool, Float

from scapre_jax import edit
from scapre_jax._src import probes, targets
from scapre_jax.config import EditConfig
from scapre_jax.edit import compute_dtype
from scapre_jax.inputs import ConceptInputs


def _project(kernel, seqs, mask):
  return jnp.where(mask[..., None], targets.einsum("nli,io->nlo", seqs, kernel), 0)


def _norm(x):
  return jnp.sqrt(jnp.sum(x * x, axis=(-2, -1)))


@jax.jit
def target_gap(
    before: Float[Array, "d_in d_out"],
    after: Float[Array, "d_in d_out"],
    target: Float[Array, "m L d_out"],
    old_seqs: Float[Array, "m L d_in"],
    seq_mask: Bool[Array, "m L"],
) -> Float[Array, "m"]:
  """||X_j W'^T - V_j||_F / ||X_j W^T - V_j||_F per concept.

  1 means the edit did not move concept j towards its target, 0 that the
  edited projection of X_j equals V_j exactly.
  """
  old = _project(before, old_seqs, seq_mask) - target
  new = _project(after, old_seqs, seq_mask) - target
  return _norm(new) / jnp.maximum(_norm(old), jnp.finfo(old.dtype).tiny)


@jax.jit
def projection_shift(
    before: Float[Array, "d_in d_out"],
    after: Float[Array, "d_in d_out"],
    seqs: Float[Array, "n L d_in"],
    mask: Bool[Array, "n L"],
) -> Float[Array, "n"]:
  """||P (W' - W)^T||_F / ||P W^T||_F per sequence: 0 means untouched."""
  moved = _project(after - before, seqs, mask)
  return _norm(moved) / jnp.maximum(_norm(_project(before, seqs, mask)),
                                    jnp.finfo(moved.dtype).tiny)


def word_mask(lengths, seq_len: int) -> np.ndarray:
  """(n, seq_len) bool: the word tokens of prompts with attention-mask sums
  `lengths` (BOS + words + EOS): rows 1 .. n - 2."""
  positions = np.arange(seq_len)[None, :]
  lengths = np.asarray(lengths)[:, None]
  return (positions >= 1) & (positions <= lengths - 2)


def selectivity(before: Mapping[str, Array], after: Mapping[str, Array],
                inputs: ConceptInputs, other_seqs: Array, other_lengths,
                preserve_seqs: Array | None = None, preserve_lengths=None,
                ) -> dict[str, float]:
  """How selectively an edit acted, averaged over matrices.

  Returns floats:
    erased_moved: mean over erased prompts of ||c_j (W' - W)^T|| / ||c_j W^T||,
      c_j the prompt's concept token (its last word).
    others_moved: mean over the other prompts of `projection_shift` over
      their word tokens (BOS, EOS and padding left out: they are alike in every
      prompt).
    ratio: erased_moved / others_moved (1 = the erase did not single out its
      concepts at all).
    preserve_moved: as others_moved, for the preserve prompts (if given).
  """
  valid = np.asarray(inputs.concept_mask)
  cvecs = np.asarray(inputs.concept_vecs)[valid][:, None, :]
  cmask = np.ones(cvecs.shape[:2], bool)
  other_mask = word_mask(other_lengths, other_seqs.shape[1])
  groups = {"erased_moved": (cvecs, cmask), "others_moved": (other_seqs, other_mask)}
  if preserve_seqs is not None and len(preserve_seqs):
    groups["preserve_moved"] = (preserve_seqs,
                                word_mask(preserve_lengths, preserve_seqs.shape[1]))
  sums = dict.fromkeys(groups, 0.0)
  for name, w0 in before.items():
    ct = compute_dtype(w0.dtype)
    w0, w1 = jnp.asarray(w0, ct), jnp.asarray(after[name], ct)
    for key, (seqs, mask) in groups.items():
      sums[key] += float(jnp.mean(projection_shift(w0, w1, jnp.asarray(seqs, ct), mask)))
  out = {key: value / len(before) for key, value in sums.items()}
  out["ratio"] = out["erased_moved"] / max(out["others_moved"], float(np.finfo(np.float32).tiny))
  return out


def edit_report(before: Mapping[str, Array], after: Mapping[str, Array],
                inputs: ConceptInputs, config: EditConfig, *,
                other_seqs: Array | None = None, other_mask: Array | None = None,
                ) -> dict[str, dict]:
  """Per matrix: mean target gap, mean shift of the erased concepts' own
  projections (concept_shift), of preserved ones (preserve_shift) and of
  other, unrelated sequences (other_shift), and the relative weight change
  ||W' - W|| / ||W||.

  target_gap measures the distance to V_j, the guide's projection, which is
  the solve's whole aim only in uce. With the MI mask (presets scapre and
  scapre-small) rows of low weight r_j are pulled to zero instead of to V_j,
  and in every ScaPre preset the C^T C term (and Pi in scapre) pulls the
  concept token towards zero as well, so target_gap above 1 is expected there
  and says nothing of failure. The shifts run
  over whole sequences, EOS and padding rows included; `selectivity` is the
  measure that compares like with like.

  Returned values are Python floats (and lists per concept), ready for JSON.
  Padding concepts and sequences are left out of the means.
  """
  report = {}
  valid = np.asarray(inputs.concept_mask)
  has_preserve = bool(np.any(np.asarray(inputs.preserve_mask)))
  for name, w0 in before.items():
    ct = compute_dtype(w0.dtype)
    w0, w1 = jnp.asarray(w0, ct), jnp.asarray(after[name], ct)
    x = jnp.asarray(inputs.old_seqs, ct)
    mask = inputs.seq_mask & inputs.concept_mask[:, None]
    target = targets.target_values(w0.T, x, jnp.asarray(inputs.new_seqs, ct), mask,
                                   technique=config.technique)
    gaps = np.asarray(target_gap(w0, w1, target, x, mask))[valid]
    moved = np.asarray(projection_shift(w0, w1, x, mask))[valid]
    entry = {
        "target_gap": float(gaps.mean()),
        "target_gap_per_concept": [float(g) for g in gaps],
        "concept_shift": float(moved.mean()),
        "weight_change": float(jnp.linalg.norm(w1 - w0) / jnp.linalg.norm(w0)),
    }
    if has_preserve:
      keep = np.asarray(jnp.any(inputs.preserve_mask, axis=-1))
      shift = projection_shift(w0, w1, jnp.asarray(inputs.preserve_seqs, ct),
                               inputs.preserve_mask)
      entry["preserve_shift"] = float(np.asarray(shift)[keep].mean())
    if other_seqs is not None:
      other_mask = (jnp.ones(other_seqs.shape[:2], bool) if other_mask is None
                    else other_mask)
      shift = projection_shift(w0, w1, jnp.asarray(other_seqs, ct), other_mask)
      entry["other_shift"] = float(np.asarray(shift).mean())
    report[name] = entry
  return report


@functools.partial(jax.jit, static_argnames="config")
def _mask_measures(weight, inputs: ConceptInputs, key, config: EditConfig):
  noise = edit.probe_noise(key, inputs, config, weight.dtype)
  mi = probes.mutual_information(weight, inputs.concept_vecs, inputs.empty_vec,
                                 noise.mi_pos, noise.mi_neg, sigma=config.noise_sigma,
                                 mode=config.mi_mode)
  return (edit.row_weights(weight, inputs, noise, config),
          probes.tied_by_rounding(mi) & inputs.concept_mask)


def mask_report(kernels: Mapping[str, Array], inputs: ConceptInputs, config: EditConfig,
                *, key: Array) -> dict[str, dict]:
  """Per matrix, the MI row weights r_j the edit used (same probe noise:
  `edit.matrix_key(key, name)`): their mean, min and max over rows and real
  concepts (with p = 8 they scale the erase itself), and `mi_by_rounding`,
  how many concepts' masks are decided by float32 rounding because every
  row separates the concept from the empty prompt (their MI values tie up
  to an ulp; `mi_mode="canonical"` gives such rows equal weight). Empty
  when the mask is off.
  """
  if not config.mi_mask or config.method == "uce":
    return {}
  valid = np.asarray(inputs.concept_mask)
  report = {}
  for name, kernel in kernels.items():
    weight = jnp.asarray(kernel, compute_dtype(kernel.dtype)).T
    r, tied = _mask_measures(weight, inputs, edit.matrix_key(key, name), config)
    r = np.asarray(r)[valid]
    report[name] = {"mi_weight_mean": float(r.mean()), "mi_weight_min": float(r.min()),
                    "mi_weight_max": float(r.max()),
                    "mi_by_rounding": int(np.asarray(tied).sum())}
  return report
