"""LDM single-file <-> diffusers names for Stable Diffusion checkpoints.

The one-file checkpoints that AUTOMATIC1111 and ComfyUI load keep the
original latent-diffusion key layout: the UNet under `model.diffusion_model.`
(`input_blocks.N.M`, `middle_block.N`, `output_blocks.N.M`), the VAE under
`first_stage_model.` (`encoder.down.I.block.J`, the decoder's `up.I` in
reverse order), and the text encoder under `cond_stage_model.`: SD 1.x keeps
transformers' CLIP names after `transformer.`, SD 2.x keeps OpenCLIP's
(`model.transformer.resblocks.N`, with one fused `attn.in_proj_weight` for
q, k and v).

A `Table` is built from a `FamilyLayout` and, per network, the diffusers
PyTorch names and shapes that the config implies (`convert.Layout.
torch_shapes`), so every LDM tensor has a checked shape and each diffusers
tensor comes from exactly one LDM tensor. Three kinds of entry:

  same     one tensor, same shape in both layouts
  conv1x1  the VAE's mid-block attention: LDM (C, C, 1, 1) conv, diffusers
           (C, C) linear
  fused    OpenCLIP `in_proj_weight` (3D, D) / `in_proj_bias` (3D,): the
           diffusers q, k, v projections stacked along axis 0

Everything is numpy; torch is never imported.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from convert.mapping import _check_shapes
from convert.mapping import _listing

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclasses.dataclass(frozen=True)
class TextEncoderLayout:
  """Where one text encoder of a family lives in a single file."""

  part: str  # diffusers folder: "text_encoder" (SDXL adds "text_encoder_2")
  prefix: str  # e.g. "cond_stage_model.transformer."
  style: str  # "clip" (transformers names) or "open_clip" (fused in_proj)


@dataclasses.dataclass(frozen=True)
class FamilyLayout:
  """The single-file key layout of one model family."""

  name: str
  text_encoders: tuple[TextEncoderLayout, ...]
  unet_prefix: str = UNET_PREFIX
  vae_prefix: str = VAE_PREFIX


# The family table. SDXL (issue 13) adds its entry here: two text encoders
# under `conditioner.embedders.0.transformer.` (clip) and
# `conditioner.embedders.1.model.` (open_clip), and `label_emb` in the UNet.
FAMILY_LAYOUTS = {
    "sd1": FamilyLayout("sd1", (TextEncoderLayout(
        "text_encoder", "cond_stage_model.transformer.", "clip"),)),
    "sd2": FamilyLayout("sd2", (TextEncoderLayout(
        "text_encoder", "cond_stage_model.model.", "open_clip"),)),
}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One LDM tensor and the diffusers tensor(s) it holds."""

  ldm: str
  part: str
  names: tuple[str, ...]  # diffusers PyTorch names in `part`; 3 if fused
  shape: tuple[int, ...]  # LDM shape
  kind: str  # "same", "conv1x1" or "fused"


@dataclasses.dataclass(frozen=True)
class Table:
  """The checked, reversible name table of one model; see module docstring."""

  family: str
  entries: tuple[Entry, ...]

  def __post_init__(self):
    seen: dict[str, Entry] = {}
    names: set[tuple[str, str]] = set()
    for entry in self.entries:
      if entry.ldm in seen:
        raise ValueError(f"{self.family}: {entry.names} and {seen[entry.ldm].names} "
                         f"both map to {entry.ldm!r}")
      seen[entry.ldm] = entry
      for name in entry.names:
        if (entry.part, name) in names:
          raise ValueError(f"{self.family}: {entry.part} {name!r} mapped twice")
        names.add((entry.part, name))

  @property
  def ldm_names(self) -> list[str]:
    return [e.ldm for e in self.entries]

  def ldm_name(self, part: str, name: str) -> str:
    """LDM key holding diffusers tensor `name` of `part`."""
    for entry in self.entries:
      if entry.part == part and name in entry.names:
        return entry.ldm
    raise KeyError(f"{self.family}: no LDM name for {part} {name!r}")

  def diffusers_name(self, ldm: str) -> tuple[str, tuple[str, ...]]:
    """(part, diffusers names) held by LDM key `ldm`."""
    for entry in self.entries:
      if entry.ldm == ldm:
        return entry.part, entry.names
    raise KeyError(f"{self.family}: {ldm!r} is not in the name table")

  def select(self, keep: Callable[[Entry], bool]) -> "Table":
    return Table(self.family, tuple(e for e in self.entries if keep(e)))

  def to_diffusers(self, get: Callable[[str], np.ndarray],
                   ) -> dict[str, dict[str, np.ndarray]]:
    """{part: {diffusers name: array}} from `get(ldm name)` (which raises
    KeyError for a missing tensor). Missing and mis-shaped tensors raise one
    ValueError listing them. Dtypes kept."""
    out: dict[str, dict[str, np.ndarray]] = {}
    missing, bad = [], []
    for entry in self.entries:
      try:
        array = get(entry.ldm)
      except KeyError:
        missing.append(entry.ldm)
        continue
      # Some files store the VAE's 1x1 attention convs already as linears.
      linear = entry.kind == "conv1x1" and tuple(array.shape) == entry.shape[:2]
      if tuple(array.shape) != entry.shape and not linear:
        bad.append(f"{entry.ldm}: expected {entry.shape}, found {tuple(array.shape)}")
        continue
      part = out.setdefault(entry.part, {})
      if entry.kind == "fused":
        for name, piece in zip(entry.names, np.split(array, len(entry.names), axis=0)):
          part[name] = np.ascontiguousarray(piece)
      elif entry.kind == "conv1x1":
        part[entry.names[0]] = array.reshape(array.shape[:2])
      else:
        part[entry.names[0]] = array
    if missing:
      raise ValueError(f"{self.family} single file: missing {len(missing)} tensors: "
                       f"{_listing(missing)}")
    _check_shapes(f"{self.family} single file", bad)
    return out

  def to_ldm(self, states: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """{LDM name: array} from {part: {diffusers name: array}}, in table
    order. Missing and mis-shaped tensors raise ValueError. Dtypes kept."""
    out, missing, bad = {}, [], []
    for entry in self.entries:
      state = states.get(entry.part, {})
      absent = [f"{entry.part}/{n}" for n in entry.names if n not in state]
      if absent:
        missing += absent
        continue
      arrays = [np.asarray(state[n]) for n in entry.names]
      if entry.kind == "fused":
        array = np.concatenate(arrays, axis=0)
      elif entry.kind == "conv1x1":
        array = arrays[0].reshape(arrays[0].shape + (1, 1))
      else:
        array = arrays[0]
      if tuple(array.shape) != entry.shape:
        bad.append(f"{entry.ldm}: expected {entry.shape}, found {tuple(array.shape)}")
        continue
      out[entry.ldm] = np.ascontiguousarray(array)
    if missing:
      raise ValueError(f"{self.family}: missing {len(missing)} diffusers tensors: "
                       f"{_listing(missing)}")
    _check_shapes(self.family, bad)
    return out


def build_table(family: str, configs: Mapping[str, Mapping],
                torch_shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
                parts: Sequence[str] | None = None) -> Table:
  """The name table of one model of `family` ("sd1", "sd2").

  `configs[part]` is the diffusers config of each network ("unet", "vae",
  text encoder parts), `torch_shapes[part]` its diffusers PyTorch names and
  shapes in the model's order (`convert.Layout.torch_shapes`). `parts`
  limits the table to some networks (default: every one of the family).
  """
  if family not in FAMILY_LAYOUTS:
    raise ValueError(f"unknown family {family!r}; expected one of {tuple(FAMILY_LAYOUTS)}")
  layout = FAMILY_LAYOUTS[family]
  namers: dict[str, tuple[str, Callable[[str], tuple[str, str]]]] = {
      "unet": (layout.unet_prefix, lambda n: (_unet_ldm(n, configs["unet"]), "same")),
      "vae": (layout.vae_prefix, lambda n: _vae_ldm(n, configs["vae"])),
  }
  for text in layout.text_encoders:
    namers[text.part] = (text.prefix, _clip_ldm if text.style == "clip" else _open_clip_ldm)
  wanted = list(namers) if parts is None else list(parts)
  unknown = [p for p in wanted if p not in namers]
  if unknown:
    raise ValueError(f"{family} has no networks {unknown}; it has {list(namers)}")
  entries: list[Entry] = []
  fused: dict[str, list] = {}
  for part in wanted:
    prefix, namer = namers[part]
    for name, shape in torch_shapes[part].items():
      ldm, kind = namer(name)
      ldm = prefix + ldm
      shape = tuple(int(s) for s in shape)
      if kind == "fused":
        if ldm not in fused:
          fused[ldm] = [part, [], []]
          entries.append(Entry(ldm, part, (), (), "fused"))  # filled in below
        fused[ldm][1].append(name)
        fused[ldm][2].append(shape)
      elif kind == "conv1x1":
        entries.append(Entry(ldm, part, (name,), shape + (1, 1), kind))
      else:
        entries.append(Entry(ldm, part, (name,), shape, kind))
  done = []
  for entry in entries:
    if entry.kind == "fused":
      part, names, shapes = fused[entry.ldm]
      order = sorted(range(len(names)), key=lambda i: _QKV.index(_qkv_of(names[i])))
      names = [names[i] for i in order]
      shapes = [shapes[i] for i in order]
      if len(names) != 3 or len({s for s in shapes}) != 1:
        raise ValueError(f"{family}: {entry.ldm} fuses {names} of shapes {shapes}")
      entry = Entry(entry.ldm, part, tuple(names),
                    (3 * shapes[0][0],) + shapes[0][1:], "fused")
    done.append(entry)
  return Table(family, tuple(done))


# -- UNet ---------------------------------------------------------------------

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}


def _rename_head(rest: str, table: Mapping[str, str]) -> str:
  module, leaf = rest.rsplit(".", 1)
  if module not in table:
    raise ValueError(f"no LDM name for the diffusers module {module!r}")
  return f"{table[module]}.{leaf}"


def _unet_ldm(name: str, config: Mapping) -> str:
  """Diffusers UNet2DConditionModel name -> LDM `openaimodel.UNetModel` name."""
  per = config["layers_per_block"]
  if not isinstance(per, int):
    raise ValueError(f"layers_per_block={per!r}: the LDM layout needs one count for all blocks")
  if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
    b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
    index = 1 + b * (per + 1) + j
    return (f"input_blocks.{index}.0.{_rename_head(rest, _UNET_RESNET)}" if kind == "resnets"
            else f"input_blocks.{index}.1.{rest}")
  if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
    return f"input_blocks.{(int(m[1]) + 1) * (per + 1)}.0.op.{m[2]}"
  if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", name):
    return f"middle_block.{2 * int(m[1])}.{_rename_head(m[2], _UNET_RESNET)}"
  if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", name):
    return f"middle_block.1.{m[1]}"
  if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
    b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
    index = b * (per + 1) + j
    return (f"output_blocks.{index}.0.{_rename_head(rest, _UNET_RESNET)}" if kind == "resnets"
            else f"output_blocks.{index}.1.{rest}")
  if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
    b = int(m[1])
    slot = 2 if "CrossAttn" in config["up_block_types"][b] else 1
    return f"output_blocks.{b * (per + 1) + per}.{slot}.conv.{m[2]}"
  return _rename_head(name, _UNET_TOP)


# -- VAE ----------------------------------------------------------------------

_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}


def _vae_ldm(name: str, config: Mapping) -> tuple[str, str]:
  """Diffusers AutoencoderKL name -> (LDM name, kind)."""
  n_up = len(config["up_block_types"])
  if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
    return f"encoder.down.{m[1]}.block.{m[2]}.{_rename_head(m[3], _VAE_RESNET)}", "same"
  if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
    return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", "same"
  if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
    return (f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}."
            f"{_rename_head(m[3], _VAE_RESNET)}", "same")
  if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
    return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}", "same"
  if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", name):
    return (f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_head(m[3], _VAE_RESNET)}", "same")
  if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", name):
    module, leaf = m[2].rsplit(".", 1)
    ldm = f"{m[1]}.mid.attn_1.{_rename_head(m[2], _VAE_ATTENTION)}"
    return ldm, "conv1x1" if leaf == "weight" and module != "group_norm" else "same"
  if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", name):
    return f"{m[1]}.norm_out.{m[2]}", "same"
  if re.fullmatch(r"(encoder\.|decoder\.)?(conv_in|conv_out|quant_conv|post_quant_conv)\.\w+",
                  name):
    return name, "same"
  raise ValueError(f"no LDM name for the diffusers VAE tensor {name!r}")


# -- text encoders --------------------------------------------------------------

_QKV = ("q_proj", "k_proj", "v_proj")
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _qkv_of(name: str) -> str:
  return name.rsplit(".", 2)[-2]


def _clip_ldm(name: str) -> tuple[str, str]:
  """transformers CLIPTextModel names are kept as they are."""
  return name, "same"


def _open_clip_ldm(name: str) -> tuple[str, str]:
  """transformers CLIPTextModel name -> (OpenCLIP name, kind)."""
  if name in _OPEN_CLIP_TOP:
    return _OPEN_CLIP_TOP[name], "same"
  m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
  if not m:
    raise ValueError(f"no OpenCLIP name for the text encoder tensor {name!r}")
  block, module, leaf = f"transformer.resblocks.{m[1]}", m[2], m[3]
  if module in tuple(f"self_attn.{p}" for p in _QKV):
    return f"{block}.attn.in_proj_{leaf}", "fused"
  if module not in _OPEN_CLIP_LAYER:
    raise ValueError(f"no OpenCLIP name for the text encoder tensor {name!r}")
  return f"{block}.{_OPEN_CLIP_LAYER[module]}.{leaf}", "same"
