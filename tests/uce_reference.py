"""Float64 PyTorch transcriptions of UCE's two released erase scripts.

UCE (Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV
2024) is public at github.com/rohitgandikota/unified-concept-editing. Two
versions of its erase script are in use, and they pick different token rows:

- train-scripts/train_erase.py (2023, the version ScaPre compares with).
  `train_erase_edit_model` is its `edit_model`: each (erased, guide) pair
  gives the rows from the last erased token to the end of the padded
  sequence, aligned at that token; each retain prompt gives all its rows.
  `train_erase_main` is the script's command line around it: it builds the
  erased prompts, the guides, and a retain list that always starts with "",
  with gamma = max(0.1, 1 / len(retain)).
- trainscripts/uce_sd_erase.py (the current release). `uce_sd_erase`: every
  prompt (erased, guide, preserve) gives one row, its last token
  E(p)[n(p) - 2]; "" gives its start-of-text row; preserve scale 1.

Written from what the scripts compute, not from their code, in the plainest
form: one prompt at a time, one outer product per row, `torch.inverse`.
These are the yardstick of tests/test_uce_presets.py.

What the scripts get from the model is shared with the JAX side, so a test
checks the row choice and the equations, not the text encoder:
  tokenizer: a transformers tokenizer; its attention mask picks the rows,
    exactly as in the scripts (padding to model_max_length, truncation).
  encode(prompts): E(p) of each prompt, (n, L, d_in), the text encoder's last
    hidden state (no attention mask, as both scripts run it).
  weights: {name: W (d_out, d_in)}, PyTorch orientation, y = W x (to_k and
    to_v have no bias).
Everything is computed in torch.float64.
"""

from __future__ import annotations

import torch

DTYPE = torch.float64

# Both scripts' prompt templates, by concept type.
ART_TEMPLATES = ("painting by {}", "art by {}", "artwork by {}", "picture by {}",
                 "style of {}")
OBJECT_TEMPLATES = ("image of {}", "photo of {}", "portrait of {}", "picture of {}",
                    "painting of {}")


def _templates(concept_type: str) -> tuple[str, ...]:
  return ART_TEMPLATES if concept_type == "art" else OBJECT_TEMPLATES


def _mask_sum(tokenizer, prompt: str) -> int:
  """n(p): the attention-mask sum of the padded, truncated prompt."""
  enc = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                  truncation=True, return_tensors="pt")
  return int(enc["attention_mask"].sum())


def _embed(encode, prompt: str) -> torch.Tensor:
  return torch.as_tensor(encode([prompt])[0], dtype=DTYPE)


def _outer_sum(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
  """sum_l outer(left[l], right[l]), one row at a time."""
  total = torch.zeros(left.shape[1], right.shape[1], dtype=DTYPE)
  for l in range(left.shape[0]):
    total = total + torch.outer(left[l], right[l])
  return total


# ---------------------------------------------------------------------------
# train-scripts/train_erase.py
# ---------------------------------------------------------------------------


def train_erase_edit_model(weights, tokenizer, encode, old_texts, new_texts, retain_texts,
                           *, lamb, erase_scale, preserve_scale, technique="replace"):
  """`edit_model` of train_erase.py: new weights {name: (d_out, d_in)}.

  A guide "" is replaced by " ". For each pair, f_o = n(old) - 2,
  f_n = n(new) - 2, far = max(f_o, f_n); X = E(old)[f_o : 77 - (far - f_o)],
  Y = E(new)[f_n : 77 - (far - f_n)]. Values: "replace" Y W^T; "tensor"
  v - <u, v> u with u = X W^T / ||X W^T|| (whole-matrix norm and inner
  product), v = Y W^T. Each retain prompt r contributes all rows of E(r)
  with the value of the same rows. Then
  W' = (lamb W + eta sum V^T X + gamma sum W R^T R)
       (lamb I + eta sum X^T X + gamma sum R^T R)^{-1}.
  (Called with retain_texts=None the script preserves [""]; pass that list.)
  """
  new_texts = [" " if t == "" else t for t in new_texts]
  edited = {}
  for name, w in weights.items():
    w = torch.as_tensor(w, dtype=DTYPE)
    mat1 = lamb * w
    mat2 = lamb * torch.eye(w.shape[1], dtype=DTYPE)
    for old, new in zip(old_texts, new_texts):
      old_emb, new_emb = _embed(encode, old), _embed(encode, new)
      length = old_emb.shape[0]
      f_o, f_n = _mask_sum(tokenizer, old) - 2, _mask_sum(tokenizer, new) - 2
      far = max(f_o, f_n)
      x = old_emb[f_o:length - max(0, far - f_o)]
      y = new_emb[f_n:length - max(0, far - f_n)]
      if technique == "tensor":
        u = x @ w.T
        u = u / u.norm()
        v = y @ w.T
        values = v - (u * v).sum() * u
      else:
        values = y @ w.T
      mat1 = mat1 + erase_scale * _outer_sum(values, x)
      mat2 = mat2 + erase_scale * _outer_sum(x, x)
    for retain in retain_texts:
      r = _embed(encode, retain)
      mat1 = mat1 + preserve_scale * _outer_sum(r @ w.T, r)
      mat2 = mat2 + preserve_scale * _outer_sum(r, r)
    edited[name] = mat1 @ torch.inverse(mat2)
  return edited


def train_erase_main(weights, tokenizer, encode, concepts, *, guided_concepts=None,
                     preserve=(), erase_scale=1.0, preserve_scale=None,
                     technique="replace", concept_type="object", add_prompts=False):
  """train_erase.py as its command line runs it, for the given concepts.

  Erased prompts: each concept, then (with add_prompts) its five templates.
  Guides: " " for all (none given), the one guide for all, or each concept's
  guide for the concept and its template prompts. Retain list: "" followed
  by `preserve` (the script fills `preserve` only from its artist list for
  art; its --preserve_concepts string cannot be appended to a list as
  released, so `preserve` stands for the list it would hold).
  gamma = max(0.1, 1 / len(retain)) unless given; lambda = 0.5.
  """
  templates = _templates(concept_type) if add_prompts else ()
  old_texts = []
  for concept in concepts:
    old_texts.append(concept)
    old_texts.extend(t.format(concept) for t in templates)
  per_concept = 1 + len(templates)
  if guided_concepts is None:
    new_texts = [" "] * len(old_texts)
  elif len(guided_concepts) == 1:
    new_texts = [guided_concepts[0]] * len(old_texts)
  else:
    new_texts = [g for g in guided_concepts for _ in range(per_concept)]
  retain = [""] + list(preserve)
  if preserve_scale is None:
    preserve_scale = max(0.1, 1 / len(retain))
  return train_erase_edit_model(weights, tokenizer, encode, old_texts, new_texts, retain,
                                lamb=0.5, erase_scale=erase_scale,
                                preserve_scale=preserve_scale, technique=technique)


# ---------------------------------------------------------------------------
# trainscripts/uce_sd_erase.py
# ---------------------------------------------------------------------------


def uce_sd_erase(weights, tokenizer, encode, edit_concepts, *, guide_concepts=None,
                 preserve_concepts=(), concept_type="object", expand_prompts=False,
                 erase_scale=1.0, preserve_scale=1.0, lamb=0.5):
  """uce_sd_erase.py with its defaults: new weights {name: (d_out, d_in)}.

  Guides default to "" ("art" for concept_type "art"); one guide serves every
  concept. With expand_prompts, each concept's template prompts are appended
  and so are its guide's ("photo of " for the guide ""). Every prompt p gives
  one row k_p = E(p)[n(p) - 2]. Then, with the original W,
  W' = (lamb W + eta sum_j (W k_g) k_e^T + gamma sum_p (W k_p) k_p^T)
       (lamb I + eta sum_j k_e k_e^T + gamma sum_p k_p k_p^T)^{-1}.
  """
  edit_concepts = [c.strip() for c in edit_concepts]
  if guide_concepts is None:
    guide_concepts = ["art" if concept_type == "art" else ""]
  guide_concepts = [g.strip() for g in guide_concepts]
  if len(guide_concepts) == 1:
    guide_concepts = guide_concepts * len(edit_concepts)
  if len(guide_concepts) != len(edit_concepts):
    raise ValueError("one guide, or one per erased concept")
  preserve_concepts = [p.strip() for p in preserve_concepts]
  if expand_prompts:
    for concept, guide in list(zip(edit_concepts, guide_concepts)):
      edit_concepts = edit_concepts + [t.format(concept) for t in _templates(concept_type)]
      guide_concepts = guide_concepts + [t.format(guide) for t in _templates(concept_type)]

  rows = {}
  for prompt in edit_concepts + guide_concepts + preserve_concepts:
    if prompt not in rows:
      rows[prompt] = _embed(encode, prompt)[_mask_sum(tokenizer, prompt) - 2]

  edited = {}
  for name, w in weights.items():
    w = torch.as_tensor(w, dtype=DTYPE)
    mat1 = lamb * w
    mat2 = lamb * torch.eye(w.shape[1], dtype=DTYPE)
    for erase, guide in zip(edit_concepts, guide_concepts):
      c = rows[erase]
      mat1 = mat1 + erase_scale * torch.outer(w @ rows[guide], c)
      mat2 = mat2 + erase_scale * torch.outer(c, c)
    for keep in preserve_concepts:
      c = rows[keep]
      mat1 = mat1 + preserve_scale * torch.outer(w @ c, c)
      mat2 = mat2 + preserve_scale * torch.outer(c, c)
    edited[name] = mat1 @ torch.inverse(mat2)
  return edited
