"""PyTorch <-> Flax weight mapping for Stable Diffusion's three networks.

A `Layout` is the table of name rules of one model family. Torch names are
dotted (`down_blocks.0.attentions.0.proj_in.weight`), Flax paths are
'/'-joined keys of the param tree (`down_blocks_0/attentions_0/proj_in/kernel`).
The rules, applied per name segment:

  lists     `down_blocks.0` <-> `down_blocks_0` (diffusers' Flax modules name
            list members `<list>_<i>`; transformers keeps `layers/0`)
  renames   module names that differ after that join (VAE attention:
            `to_q` <-> `query`, `to_out.0` <-> `proj_attn`)
  leaf      `weight` <-> `kernel` (linear: transpose; conv: (O,I,H,W) <->
            (H,W,I,O)), `scale` for modules whose name contains "norm",
            `embedding` for the layout's embedding modules; `bias` unchanged.

Everything is numpy; torch is never imported. Both directions check every
tensor against the Flax model's abstract params (`jax.eval_shape` of its init)
and raise ValueError naming missing, unexpected and mis-shaped tensors.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

# (O,I,H,W) -> (H,W,I,O) and back.
_CONV_TO_FLAX = (2, 3, 1, 0)
_CONV_TO_TORCH = (3, 2, 0, 1)
_LIST_INDEX = re.compile(r"(.+)_(\d+)")
_MAX_LISTED = 20


def flatten(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}, in insertion order."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      for sub, leaf in flatten(value, sep).items():
        flat[f"{key}{sep}{sub}"] = leaf
    else:
      flat[str(key)] = value
  return flat


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """{'a/b/c': leaf} -> nested dict."""
  tree: dict[str, Any] = {}
  for path, leaf in flat.items():
    *parents, last = path.split(sep)
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = leaf
  return tree


def _listing(names) -> str:
  names = sorted(names)
  shown = ", ".join(names[:_MAX_LISTED])
  more = len(names) - _MAX_LISTED
  return shown + (f", ... ({more} more)" if more > 0 else "")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Name rules of one model family; see the module docstring."""

  name: str
  lists: frozenset[str] = frozenset()
  renames: tuple[tuple[str, str], ...] = ()  # (torch module, flax module)
  embeddings: frozenset[str] = frozenset()
  ignored: frozenset[str] = frozenset()  # torch buffers without a Flax param

  # -- names ------------------------------------------------------------------

  def flax_path(self, torch_name: str) -> str:
    """`a.0.b.weight` -> `a_0/b/kernel` (or `scale`, `embedding`)."""
    *modules, leaf = torch_name.split(".")
    joined = []
    for part in modules:
      if part.isdigit() and joined and joined[-1] in self.lists:
        joined[-1] = f"{joined[-1]}_{part}"
      else:
        joined.append(part)
    renames = dict(self.renames)
    joined = [renames.get(part, part) for part in joined]
    if leaf == "weight":
      leaf = self._weight_leaf(joined[-1] if joined else "")
    return "/".join(joined + [leaf])

  def torch_name(self, flax_path: str) -> str:
    """`a_0/b/kernel` -> `a.0.b.weight`."""
    *modules, leaf = flax_path.split("/")
    back = {flax: torch for torch, flax in self.renames}
    parts = []
    for part in modules:
      part = back.get(part, part)
      m = _LIST_INDEX.fullmatch(part)
      if m and m.group(1) in self.lists:
        parts += [m.group(1), m.group(2)]
      else:
        parts.append(part)
    if leaf in ("kernel", "scale", "embedding"):
      leaf = "weight"
    return ".".join(parts + [leaf])

  def _weight_leaf(self, module: str) -> str:
    if module in self.embeddings:
      return "embedding"
    if "norm" in module:
      return "scale"
    return "kernel"

  def torch_shapes(self, expected: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """{torch name: torch shape} of the params `expected` describes (nested
    dict of arrays or ShapeDtypeStructs), in its order."""
    return {self.torch_name(p): _torch_shape(p, tuple(a.shape))
            for p, a in flatten(expected).items()}

  # -- tensors ----------------------------------------------------------------

  def to_flax(self, state: Mapping[str, np.ndarray],
              expected: Mapping[str, Any]) -> dict[str, Any]:
    """Torch state dict -> nested Flax params (numpy), checked against
    `expected` (nested dict of arrays or ShapeDtypeStructs). Dtypes kept."""
    want = flatten(expected)
    found: dict[str, str] = {}  # flax path -> torch name
    for name in state:
      if name in self.ignored:
        continue
      path = self.flax_path(name)
      if path in found:
        raise ValueError(
            f"{self.name}: tensors {found[path]!r} and {name!r} both map to {path!r}")
      found[path] = name
    _check_names(self.name, want, found, lambda p: self.torch_name(p))
    bad = []
    for path, name in found.items():
      shape = _torch_shape(path, tuple(want[path].shape))
      if tuple(state[name].shape) != shape:
        bad.append(f"{name}: expected {shape}, found {tuple(state[name].shape)}")
    _check_shapes(self.name, bad)
    return unflatten({path: _to_flax_array(path, state[found[path]])
                      for path in want})

  def to_torch(self, params: Mapping[str, Any],
               expected: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Nested Flax params -> torch state dict (contiguous numpy), checked
    against `expected`. Dtypes kept."""
    have = flatten(check(params, expected, self.name))
    state = {}
    for path, array in have.items():
      name = self.torch_name(path)
      if name in state:
        raise ValueError(f"{self.name}: two Flax params map to {name!r}")
      array = _to_torch_array(path, np.asarray(array))
      # ascontiguousarray makes 0-d arrays 1-d (CLIP's logit_scale is 0-d).
      state[name] = np.ascontiguousarray(array).reshape(array.shape)
    return state


def check(params: Mapping[str, Any], expected: Mapping[str, Any],
          model: str = "model") -> dict[str, Any]:
  """Checks Flax `params` against `expected` (same paths and shapes) and
  returns them as a nested dict in `expected`'s key order."""
  want = flatten(expected)
  have = flatten(params)
  _check_names(model, want, {p: p for p in have}, lambda p: p)
  bad = [f"{p}: expected {tuple(want[p].shape)}, found {tuple(np.shape(have[p]))}"
         for p in want if tuple(np.shape(have[p])) != tuple(want[p].shape)]
  _check_shapes(model, bad)
  return unflatten({p: have[p] for p in want})


def _check_names(model, want, found, show_missing):
  missing = [show_missing(p) for p in want if p not in found]
  unexpected = [found[p] for p in found if p not in want]
  if missing or unexpected:
    lines = [f"{model}: the weights do not match the model config."]
    if missing:
      lines.append(f"missing {len(missing)} tensors: {_listing(missing)}")
    if unexpected:
      lines.append(f"unexpected {len(unexpected)} tensors: {_listing(unexpected)}")
    raise ValueError("\n".join(lines))


def _check_shapes(model, bad):
  if bad:
    raise ValueError(f"{model}: {len(bad)} tensors have the wrong shape: "
                     + "; ".join(bad[:_MAX_LISTED]))


def _is_kernel(path: str) -> bool:
  return path.endswith("/kernel") or path == "kernel"


def _torch_shape(path: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if _is_kernel(path) and len(flax_shape) == 2:
    return flax_shape[::-1]
  if _is_kernel(path) and len(flax_shape) == 4:
    return tuple(flax_shape[i] for i in _CONV_TO_TORCH)
  return flax_shape


def _to_flax_array(path: str, a: np.ndarray) -> np.ndarray:
  if _is_kernel(path) and a.ndim == 2:
    return a.T
  if _is_kernel(path) and a.ndim == 4:
    return a.transpose(_CONV_TO_FLAX)
  return a


def _to_torch_array(path: str, a: np.ndarray) -> np.ndarray:
  if _is_kernel(path) and a.ndim == 2:
    return a.T
  if _is_kernel(path) and a.ndim == 4:
    return a.transpose(_CONV_TO_TORCH)
  return a


# diffusers UNet2DConditionModel (SD 1.x, 2.x, XL): every ModuleList or
# Sequential that holds parameters.
UNET = Layout(
    name="unet",
    lists=frozenset({"down_blocks", "up_blocks", "attentions", "resnets",
                     "transformer_blocks", "downsamplers", "upsamplers",
                     "to_out", "net"}),
)

# diffusers AutoencoderKL. Its Flax attention block keeps the old names;
# legacy torch files that still use `query`/`proj_attn` read as-is and are
# written back with the current names.
VAE = Layout(
    name="vae",
    lists=frozenset({"down_blocks", "up_blocks", "attentions", "resnets",
                     "downsamplers", "upsamplers", "to_out"}),
    renames=(("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
             ("to_out_0", "proj_attn")),
)

# transformers CLIPTextModel: `layers.0` is a tree level `layers/0` in Flax.
# Older checkpoints store the `position_ids` buffer; Flax rebuilds it.
CLIP_TEXT = Layout(
    name="text_encoder",
    embeddings=frozenset({"token_embedding", "position_embedding"}),
    ignored=frozenset({"text_model.embeddings.position_ids"}),
)

# transformers CLIPModel, both towers and their projections (the scorer of
# `scapre-jax eval`). The vision tower's `patch_embedding` is a conv (kernel
# transposed like any conv); `class_embedding` and `logit_scale` keep their
# names. Older checkpoints store both `position_ids` buffers.
CLIP = Layout(
    name="clip",
    embeddings=frozenset({"token_embedding", "position_embedding"}),
    ignored=frozenset({"text_model.embeddings.position_ids",
                       "vision_model.embeddings.position_ids"}),
)
