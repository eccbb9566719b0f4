"""Concept encoding: prompts -> `ConceptInputs` (docs/algorithm.md "Text side").

Every prompt of a request (erased prompts, guides, preserve prompts and the
empty prompt) is tokenized once, deduplicated by token ids and run through the
Flax text encoder in fixed-size batches, so one jit compilation serves the
whole request. The released code re-encodes each prompt for every layer; the
encoder is deterministic, so encoding once gives the same sequences.

Token positions, with n(p) the attention-mask sum (BOS + tokens + EOS):
  c_j = E(o_j)[n(o_j) - 2]   (last concept token)
  e0  = E("")[1]             (the EOS of the empty prompt)
Which rows feed the edit is a choice (docs/algorithm.md "Token rows"):
  "aligned" (ScaPre, UCE's edit_model):
    X_j = E(o_j)[f_o : f_o + L_j],  Y_j = E(g_j)[f_n : f_n + L_j],
    f = n - 2, far = max(f_o, f_n), L_j = 77 - far;  P_k = E(p_k), all rows
  "last" (UCE's uce_sd_erase.py): one row per prompt, its last token:
    X_j = E(o_j)[n(o_j) - 2],  Y_j = E(g_j)[n(g_j) - 2],  P_k = E(p_k)[n(p_k) - 2]
    (a blank guide has n = 2: its row is the start-of-text token)
E(p) is the UNet context of p: the text encoder's last hidden state (SD
1.x/2.x), or for SDXL both encoders' penultimate hidden states concatenated
(docs/algorithm.md "SDXL"); positions are taken on that context.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scapre_jax.inputs import ConceptInputs
from scapre_jax.precision import compute_dtype

# The released `--add_prompts` templates, by `--concept_type`.
TEMPLATES: dict[str, list[str]] = {
    "art": ["painting by {}", "art by {}", "artwork by {}", "picture by {}",
            "style of {}"],
    "object": ["image of {}", "photo of {}", "portrait of {}", "picture of {}",
               "painting of {}"],
}

# Guide of an unguided erase: erasing towards the unconditional prompt.
UNCONDITIONAL = " "
# The choices of EditConfig.token_rows.
TOKEN_ROWS = ("aligned", "last")
_SHOWN_CHARS = 80  # how much of a truncated prompt the warning quotes


@dataclasses.dataclass(frozen=True)
class EncodedRequest:
  """An encoded erase request and the strings it was built from.

  Attributes:
    inputs: the engine's `ConceptInputs`; concept j (row j of every per-concept
      array) is `prompts[j]` guided towards `guides[j]`.
    concepts: the concepts as given (whitespace stripped).
    prompts: the erased prompts o_j, m = len(prompts): each concept, then its
      template prompts.
    guides: the guide g_j of each erased prompt (" " = unconditional).
    preserve: the preserve prompts, in the order of `inputs.preserve_seqs`.
  """

  inputs: ConceptInputs
  concepts: list[str]
  prompts: list[str]
  guides: list[str]
  preserve: list[str]


def _towers(model) -> tuple:
  """`model.text_encoders` (`models.LoadedModel`); a model object with only
  `text_encoder`, `text_params` and `tokenizer` counts as one encoder."""
  towers = getattr(model, "text_encoders", None)
  if towers is None:
    towers = (types.SimpleNamespace(part="text_encoder", module=model.text_encoder,
                                    params=model.text_params, tokenizer=model.tokenizer),)
  return tuple(towers)


def sequence_length(model) -> int:
  """Padded prompt length: the tokenizer's `model_max_length` (77 for SD),
  the same for every tokenizer of the model."""
  lengths = {int(t.tokenizer.model_max_length) for t in _towers(model)}
  if len(lengths) != 1:
    raise ValueError(f"the model's tokenizers pad to different lengths {sorted(lengths)}; "
                     "their contexts cannot be concatenated")
  [length] = lengths
  for t in _towers(model):
    positions = getattr(t.module.config, "max_position_embeddings", length)
    if not 2 < length <= positions:
      raise ValueError(
          f"tokenizer model_max_length {length} does not fit the text encoder "
          f"{t.part} ({positions} positions)")
  return length


def tokenize_model(model, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Token ids (n, T, 77) int32 of every tokenizer of `model` (T = 1, or 2
  for SDXL, in `model.text_encoders` order) and the attention-mask sums n(p)
  (n,). SDXL's tokenizers differ only in their padding token, so each prompt
  has one n(p); tokenizers that disagree on it raise ValueError."""
  length = sequence_length(model)
  towers = _towers(model)
  tokenized = [tokenize(t.tokenizer, prompts, max_length=length) for t in towers]
  lengths = tokenized[0][1]
  for t, (_, other) in zip(towers[1:], tokenized[1:]):
    differ = np.flatnonzero(other != lengths)
    if differ.size:
      i = int(differ[0])
      raise ValueError(
          f"{t.part}'s tokenizer splits {prompts[i]!r} into {other[i]} tokens, "
          f"{towers[0].part}'s into {lengths[i]}: the token positions "
          "of the edit need tokenizers with one vocabulary")
  return np.stack([ids for ids, _ in tokenized], axis=1), lengths


def tokenize(tokenizer, prompts: Sequence[str], *, max_length: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """Token ids (n, max_length) int32 and attention-mask sums n(p) (n,) int.

  Pads to `max_length` and truncates longer prompts, with one warning naming
  every prompt that was cut.
  """
  prompts = list(prompts)
  if not prompts:
    return np.zeros((0, max_length), np.int32), np.zeros((0,), np.int64)
  encoded = tokenizer(prompts, padding="max_length", max_length=max_length,
                      truncation=True, return_tensors="np")
  ids = np.asarray(encoded["input_ids"], np.int32)
  lengths = np.asarray(encoded["attention_mask"]).sum(axis=1).astype(np.int64)
  if ids.shape != (len(prompts), max_length):
    raise ValueError(f"tokenizer returned ids of shape {ids.shape}, expected "
                     f"{(len(prompts), max_length)}")
  # Only a prompt that fills every position can have been cut; re-tokenize
  # those without truncation (verbose=False: the tokenizer's own warning would
  # fire once per process and not name the prompt).
  full = [i for i in np.flatnonzero(lengths == max_length)]
  if full:
    untruncated = tokenizer([prompts[i] for i in full], truncation=False,
                            verbose=False)["input_ids"]
    cut = {prompts[i]: len(t) for i, t in zip(full, untruncated) if len(t) > max_length}
    if cut:
      names = "; ".join(f"{_shorten(p)!r} ({n} tokens)" for p, n in cut.items())
      warnings.warn(
          f"{len(cut)} prompt(s) longer than {max_length} tokens were truncated "
          f"to their first {max_length - 2} tokens: {names}", UserWarning, stacklevel=3)
  return ids, lengths


def _shorten(prompt: str) -> str:
  return prompt if len(prompt) <= _SHOWN_CHARS else prompt[:_SHOWN_CHARS] + "..."


@functools.partial(jax.jit, static_argnums=0, static_argnames="layer")
def _run_encoder(text_encoder, params, input_ids, layer="last"):
  # No attention mask, as in the SD pipelines and the released code: CLIP's
  # causal mask already keeps padding out of the earlier positions, and the
  # padding rows themselves are part of X_j, Y_j.
  if layer == "penultimate":  # SDXL: hidden_states[-2], no final layer norm
    out = text_encoder(input_ids, params=params, output_hidden_states=True).hidden_states[-2]
  else:
    out = text_encoder(input_ids, params=params)[0]
  return out.astype(_out_dtype(text_encoder))


def _out_dtype(text_encoder) -> np.dtype:
  """float32 encodings, or float64 from a float64 encoder (--precision float64)."""
  return np.dtype(compute_dtype(text_encoder.dtype))


def encode_ids(model, input_ids: np.ndarray, *, batch_size: int = 16) -> np.ndarray:
  """UNet contexts (n, L, d_in) of token ids (n, L), or (n, T, L) with one
  row of ids per text encoder (`tokenize_model`): the last hidden state, or
  for SDXL the penultimate ones of both encoders concatenated
  (`model.context_layer`). float32, or float64 when the text encoder is
  float64 (`models.load_model(text_dtype="float64")`).

  Every call runs batches of exactly `batch_size` rows (the last one
  padded): the jitted encoder compiles once, and a prompt's embedding is
  bit-for-bit the same whichever prompts share its batch. That matters: the
  released MI mask can turn a one-ulp change of an embedding into a visibly
  different edit (docs/algorithm.md, "MI soft mask"), and a set must give
  the same edit alone as inside a sets file.
  """
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  input_ids = np.asarray(input_ids)
  if input_ids.ndim == 2:
    input_ids = input_ids[:, None]
  towers = _towers(model)
  if input_ids.ndim != 3 or input_ids.shape[1] != len(towers):
    raise ValueError(f"token ids must be (n, L) or (n, {len(towers)}, L) for this "
                     f"model's {len(towers)} text encoder(s), got {input_ids.shape}")
  n, _, length = input_ids.shape
  width = sum(t.module.config.hidden_size for t in towers)
  if n == 0:
    return np.zeros((0, length, width), _out_dtype(model.text_encoder))
  size = int(batch_size)
  padded = -(-n // size) * size
  ids = np.concatenate([input_ids, np.repeat(input_ids[:1], padded - n, axis=0)])
  out = [np.concatenate([
      np.asarray(_run_encoder(t.module, t.params, jnp.asarray(ids[i:i + size, k]),
                              layer=getattr(model, "context_layer", "last")))
      for k, t in enumerate(towers)], axis=-1) for i in range(0, padded, size)]
  return np.concatenate(out)[:n]


def encode_prompts(model, prompts: Sequence[str], *, batch_size: int = 16,
                   cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Encodes prompts with `model`'s tokenizer(s) and Flax text encoder(s).

  Returns (embeddings (n, 77, d_in) = E(p), float32 or float64 as `encode_ids`,
  lengths (n,) int = the attention-mask sums n(p)). Prompts with identical token ids are encoded
  once. Longer-than-77-token prompts are truncated with one warning.
  `cache` (a dict owned by the caller, one per model) keeps encodings across
  calls: a job encodes every prompt of every set in one batched call and the
  per-set calls then find them all there.
  """
  if isinstance(prompts, str):
    raise ValueError("prompts must be a sequence of strings, got one string")
  prompts = list(prompts)
  for i, p in enumerate(prompts):
    if not isinstance(p, str):
      raise ValueError(f"prompt {i} is not a string: {p!r}")
  ids, lengths = tokenize_model(model, prompts)
  unique, inverse = np.unique(ids, axis=0, return_inverse=True)
  if cache is None:
    embeddings = encode_ids(model, unique, batch_size=batch_size)
  else:
    keys = [row.tobytes() for row in unique]
    missing = [i for i, k in enumerate(keys) if k not in cache]
    if missing:
      fresh = encode_ids(model, unique[missing], batch_size=batch_size)
      cache.update((keys[i], e) for i, e in zip(missing, fresh))
    embeddings = np.stack([cache[k] for k in keys])
  return embeddings[inverse.reshape(-1)], lengths


def aligned_slices(n_old: int, n_new: int, *, seq_len: int = 77) -> tuple[int, int, int]:
  """(start_old, start_new, L_j) of the aligned pair: X_j = E(o)[start_old :
  start_old + L_j], Y_j = E(g)[start_new : start_new + L_j]
  (docs/algorithm.md "Text side": f = n - 2, far = max(f_o, f_n), L_j = 77 - far)."""
  f_o, f_n = int(n_old) - 2, int(n_new) - 2
  if f_o < 0 or f_n < 0:
    raise ValueError(f"attention-mask sums must be >= 2 (BOS + EOS), got {n_old}, {n_new}")
  return f_o, f_n, seq_len - max(f_o, f_n)


def expand_templates(concepts: Sequence[str], templates) -> list[str]:
  """Erased prompts: each concept, then `template.format(concept)` for each
  template ("{}" or "{concept}" placeholders; a key of TEMPLATES picks that
  list)."""
  templates = _templates(templates)
  return [p for c in concepts
          for p in [c] + [t.format(c, concept=c) for t in templates]]


def _templates(templates) -> list[str]:
  if templates is None:
    return []
  if isinstance(templates, str):
    if templates not in TEMPLATES:
      raise ValueError(
          f"templates must be a list of format strings or one of {tuple(TEMPLATES)}, "
          f"got {templates!r}")
    return list(TEMPLATES[templates])
  templates = list(templates)
  for t in templates:
    if not isinstance(t, str) or ("{}" not in t and "{concept}" not in t):
      raise ValueError(f"template {t!r} has no '{{}}' placeholder for the concept")
    try:
      t.format("x", concept="x")
    except (IndexError, KeyError, ValueError) as err:
      raise ValueError(f"template {t!r} is not a valid format string: {err}") from None
  return templates


def _strings(value, name: str) -> list[str]:
  if isinstance(value, str):
    return [value]
  value = list(value)
  for i, v in enumerate(value):
    if not isinstance(v, str):
      raise ValueError(f"{name}[{i}] is not a string: {v!r}")
  return value


def _guides(guides, concepts: list[str], prompts: list[str], templates=None) -> list[str]:
  """One guide per erased prompt; a blank guide is " " (unconditional).

  With `templates` (a list), a concept's guide g is itself filled into each
  template for the concept's template prompts (uce_sd_erase.py); without, g
  serves them as it is (train_erase.py, ScaPre).
  """
  if guides is None:
    guides = [UNCONDITIONAL]
  guides = _strings(guides, "guides")
  per_concept = len(prompts) // len(concepts)
  if len(guides) == len(prompts) and len(guides) != len(concepts):
    return [g if g.strip() else UNCONDITIONAL for g in guides]
  if len(guides) == 1:
    guides = guides * len(concepts)
  elif len(guides) != len(concepts):
    raise ValueError(
        f"got {len(guides)} guides for {len(concepts)} concepts and {len(prompts)} "
        f"erased prompts; give one guide, one per concept or one per erased prompt")
  if templates:
    # The concept prompt itself keeps g; "photo of {}" with g = "" is
    # "photo of ", whose last token is "of", as in the released script.
    guides = [p for g in guides
              for p in [g] + [t.format(g.strip(), concept=g.strip()) for t in templates]]
  else:
    # A concept's guide is used as-is for each of its template prompts, like
    # the released single guide: alignment at the last concept token already
    # pairs "photo of cat" with "dog".
    guides = [g for g in guides for _ in range(per_concept)]
  return [g if g.strip() else UNCONDITIONAL for g in guides]


def expand_guides(guides, concepts: Sequence[str], templates=None, *,
                  guide_templates: bool = False) -> list[str]:
  """The guide of every erased prompt of `expand_templates(concepts,
  templates)`, as `build_concept_inputs` pairs them."""
  concepts = list(concepts)
  prompts = expand_templates(concepts, templates)
  return _guides(guides, concepts, prompts,
                 _templates(templates) if guide_templates else None)


def _aligned_rows(old, new, n_old, n_new, kept, n_kept):
  """Aligned X_j, Y_j (padded to the longest L_j, with a row mask) and whole
  preserve sequences (docs/algorithm.md "Token rows", "aligned")."""
  seq_len = old.shape[1]
  slices = [aligned_slices(int(a), int(b), seq_len=seq_len)
            for a, b in zip(n_old, n_new)]
  rows = max(length for _, _, length in slices)
  old_seqs = np.zeros((len(slices), rows, old.shape[2]), old.dtype)
  new_seqs = np.zeros_like(old_seqs)
  seq_mask = np.zeros((len(slices), rows), bool)
  for j, (start_old, start_new, length) in enumerate(slices):
    old_seqs[j, :length] = old[j, start_old:start_old + length]
    new_seqs[j, :length] = new[j, start_new:start_new + length]
    seq_mask[j, :length] = True
  return old_seqs, new_seqs, seq_mask, kept, np.ones(kept.shape[:2], bool)


def _last_rows(old, new, n_old, n_new, kept, n_kept):
  """One row per prompt, its last token E(p)[n(p) - 2] (docs/algorithm.md
  "Token rows", "last"); a blank prompt gives its start-of-text row."""
  def last(embeddings, lengths):
    return embeddings[np.arange(len(lengths)), np.asarray(lengths) - 2][:, None]
  old_seqs, new_seqs, preserve = last(old, n_old), last(new, n_new), last(kept, n_kept)
  return (old_seqs, new_seqs, np.ones(old_seqs.shape[:2], bool), preserve,
          np.ones(preserve.shape[:2], bool))


_ROW_SELECTIONS = {"aligned": _aligned_rows, "last": _last_rows}


def build_concept_inputs(model, concepts, *, guides=None, preserve=(), templates=None,
                         token_rows: str = "aligned", guide_templates: bool = False,
                         preserve_empty: bool = False, batch_size: int = 16,
                         cache: dict | None = None) -> EncodedRequest:
  """Encodes an erase request into `ConceptInputs` (docs/algorithm.md "Text side").

  Args:
    model: a `LoadedModel` (tokenizer, text_encoder, text_params).
    concepts: concept strings (a bare string is one concept).
    guides: None (erase towards " ", the unconditional prompt), one string for
      every erased prompt, one per concept (used for all its template prompts)
      or one per erased prompt. A blank guide counts as " ".
    preserve: prompts whose projections are kept (the engine adds gamma W P^T P
      and gamma P^T P, as UCE's retain terms). "" is a valid preserve prompt.
    templates: None, a list of format strings like "photo of {}", or a key of
      TEMPLATES ("art", "object"). Each concept then contributes itself plus
      one erased prompt per template.
    token_rows: which rows of each prompt feed the edit (`EditConfig.token_rows`):
      "aligned" (X_j, Y_j aligned at the last concept token, all rows of a
      preserve prompt) or "last" (the last token of every prompt only).
    guide_templates: fill a concept's guide into the templates too, for its
      template prompts (`EditConfig.guide_templates`).
    preserve_empty: put "" first in the preserve prompts
      (`EditConfig.preserve_empty`).
    batch_size: text-encoder batch size.
    cache: encodings shared across requests (see `encode_prompts`).

  Returns:
    EncodedRequest with m = len(prompts) concepts of L rows each
    (seq_mask[j, :L_j] True); concept_vecs, empty_vec, old_seqs, new_seqs and
    preserve_seqs are float32, or float64 when the model's text encoder is
    float64 (the float64 edit of docs/reproducibility.md).
  """
  if token_rows not in _ROW_SELECTIONS:
    raise ValueError(f"unknown token_rows {token_rows!r}; expected one of {TOKEN_ROWS}")
  concepts = _strings(concepts, "concepts")
  if not concepts:
    raise ValueError("empty concept list: give at least one concept to erase")
  blank = [i for i, c in enumerate(concepts) if not c.strip()]
  if blank:
    raise ValueError(f"blank concept at position(s) {blank} of {concepts!r}")
  concepts = [c.strip() for c in concepts]
  prompts = expand_templates(concepts, templates)
  guides = _guides(guides, concepts, prompts,
                   _templates(templates) if guide_templates else None)
  preserve = ([""] if preserve_empty else []) + _strings(preserve, "preserve")
  m, k = len(prompts), len(preserve)

  embeddings, lengths = encode_prompts(
      model, prompts + guides + preserve + [""], batch_size=batch_size, cache=cache)
  old, new, kept = embeddings[:m], embeddings[m:2 * m], embeddings[2 * m:2 * m + k]
  n_old, n_new, n_kept = lengths[:m], lengths[m:2 * m], lengths[2 * m:2 * m + k]
  empty = [p for p, n in zip(prompts, n_old) if n < 3]
  if empty:
    raise ValueError(f"erased prompt(s) {empty!r} tokenize to no tokens")

  old_seqs, new_seqs, seq_mask, preserve_seqs, preserve_mask = _ROW_SELECTIONS[token_rows](
      old, new, n_old, n_new, kept, n_kept)
  inputs = ConceptInputs.create(
      concept_vecs=old[np.arange(m), n_old - 2],
      empty_vec=embeddings[-1, 1],
      old_seqs=old_seqs,
      new_seqs=new_seqs,
      seq_mask=seq_mask,
      preserve_seqs=preserve_seqs if k else None,
      preserve_mask=preserve_mask if k else None,
  )
  return EncodedRequest(inputs=inputs, concepts=concepts, prompts=prompts,
                        guides=guides, preserve=preserve)
