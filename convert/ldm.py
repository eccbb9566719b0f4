"""LDM single-file <-> diffusers names for Stable Diffusion checkpoints.

The one-file checkpoints that AUTOMATIC1111 and ComfyUI load keep the
original latent-diffusion key layout: the UNet under `model.diffusion_model.`
(`input_blocks.N.M`, `middle_block.N`, `output_blocks.N.M`), the VAE under
`first_stage_model.` (`encoder.down.I.block.J`, the decoder's `up.I` in
reverse order), and the text encoder(s): SD 1.x keeps transformers' CLIP
names under `cond_stage_model.transformer.` (old files without the
`text_model.` level), SD 2.x OpenCLIP's under `cond_stage_model.model.`
(`transformer.resblocks.N`, with one fused `attn.in_proj_weight` for q, k
and v), and SDXL both: CLIP ViT-L under `conditioner.embedders.0.transformer.`
and OpenCLIP bigG under `conditioner.embedders.1.model.`, whose
`text_projection` is stored as OpenCLIP multiplies by it, `x @ P`: the
transpose of transformers' `text_projection.weight`. SDXL's UNet numbers its
blocks as SD 1.x's does (`input_blocks.1 + b (layers_per_block + 1) + j`);
only the block types differ (no attention in its first level, so its first
up level's upsampler is slot 2), and its `label_emb.0` is diffusers'
`add_embedding`.

A `Table` is built from a `FamilyLayout` and, per network, the diffusers
PyTorch names and shapes that the config implies (`convert.Layout.
torch_shapes`), so every LDM tensor has a checked shape and each diffusers
tensor comes from exactly one LDM tensor. Three kinds of entry:

  same     one tensor, same shape in both layouts
  conv1x1  the VAE's mid-block attention: LDM (C, C, 1, 1) conv, diffusers
           (C, C) linear
  fused    OpenCLIP `in_proj_weight` (3D, D) / `in_proj_bias` (3D,): the
           diffusers q, k, v projections stacked along axis 0
  transposed  OpenCLIP `text_projection` (D, P): diffusers (P, D)

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
  # "clip" (transformers names), "clip_flat" (the same without the
  # `text_model.` level: files saved by transformers < 4.x) or "open_clip"
  # (fused in_proj).
  style: str
  # SD 2.x: OpenCLIP ViT-H has 24 blocks and a text projection; diffusers
  # keeps 23 blocks (SD 2.x conditions on the penultimate one) and no
  # projection. `open_clip_fills` gives what a written file adds.
  dropped: bool = False


@dataclasses.dataclass(frozen=True)
class FamilyLayout:
  """The single-file key layout of one model family."""

  name: str
  text_encoders: tuple[TextEncoderLayout, ...]
  unet_prefix: str = UNET_PREFIX
  vae_prefix: str = VAE_PREFIX


FAMILY_LAYOUTS = {
    "sd1": FamilyLayout("sd1", (TextEncoderLayout(
        "text_encoder", "cond_stage_model.transformer.", "clip"),)),
    "sd2": FamilyLayout("sd2", (TextEncoderLayout(
        "text_encoder", "cond_stage_model.model.", "open_clip", dropped=True),)),
    "sdxl": FamilyLayout("sdxl", (
        TextEncoderLayout("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
        TextEncoderLayout("text_encoder_2", "conditioner.embedders.1.model.", "open_clip"))),
}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One LDM tensor and the diffusers tensor(s) it holds."""

  ldm: str
  part: str
  names: tuple[str, ...]  # diffusers PyTorch names in `part`; 3 if fused
  shape: tuple[int, ...]  # LDM shape
  kind: str  # "same", "conv1x1", "fused" or "transposed"


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
      elif entry.kind == "transposed":
        part[entry.names[0]] = np.ascontiguousarray(array.T)
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
      elif entry.kind == "transposed":
        array = arrays[0].T
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


def build_table(family: str | FamilyLayout, configs: Mapping[str, Mapping],
                torch_shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
                parts: Sequence[str] | None = None) -> Table:
  """The name table of one model of `family` ("sd1", "sd2", "sdxl", or a
  FamilyLayout such as `flat_clip(...)`).

  `configs[part]` is the diffusers config of each network ("unet", "vae",
  text encoder parts), `torch_shapes[part]` its diffusers PyTorch names and
  shapes in the model's order (`convert.Layout.torch_shapes`). `parts`
  limits the table to some networks (default: every one of the family).
  """
  if isinstance(family, FamilyLayout):
    layout, family = family, family.name
  elif family in FAMILY_LAYOUTS:
    layout = FAMILY_LAYOUTS[family]
  else:
    raise ValueError(f"unknown family {family!r}; expected one of {tuple(FAMILY_LAYOUTS)}")
  namers: dict[str, tuple[str, Callable[[str], tuple[str, str]]]] = {
      "unet": (layout.unet_prefix, lambda n: (_unet_ldm(n, configs["unet"]), "same")),
      "vae": (layout.vae_prefix, lambda n: _vae_ldm(n, configs["vae"])),
  }
  for text in layout.text_encoders:
    namers[text.part] = (text.prefix, _TEXT_NAMERS[text.style])
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
      elif kind == "transposed":
        entries.append(Entry(ldm, part, (name,), shape[::-1], kind))
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
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's text_time embedding
    "add_embedding.linear_2": "label_emb.0.2",
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


def _clip_flat_ldm(name: str) -> tuple[str, str]:
  """transformers CLIPTextModel name -> the same without `text_model.`."""
  return name.removeprefix("text_model."), "same"


def _open_clip_ldm(name: str) -> tuple[str, str]:
  """transformers CLIPTextModel(WithProjection) name -> (OpenCLIP name, kind)."""
  if name in _OPEN_CLIP_TOP:
    return _OPEN_CLIP_TOP[name], "same"
  if name == "text_projection.weight":
    return "text_projection", "transposed"
  m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
  if not m:
    raise ValueError(f"no OpenCLIP name for the text encoder tensor {name!r}")
  block, module, leaf = f"transformer.resblocks.{m[1]}", m[2], m[3]
  if module in tuple(f"self_attn.{p}" for p in _QKV):
    return f"{block}.attn.in_proj_{leaf}", "fused"
  if module not in _OPEN_CLIP_LAYER:
    raise ValueError(f"no OpenCLIP name for the text encoder tensor {name!r}")
  return f"{block}.{_OPEN_CLIP_LAYER[module]}.{leaf}", "same"


_TEXT_NAMERS = {"clip": _clip_ldm, "clip_flat": _clip_flat_ldm, "open_clip": _open_clip_ldm}


def flat_clip(layout: FamilyLayout) -> FamilyLayout:
  """`layout` with its "clip" text encoders in the old key layout without
  `text_model.` (`cond_stage_model.transformer.embeddings...`)."""
  return dataclasses.replace(layout, text_encoders=tuple(
      dataclasses.replace(t, style="clip_flat") if t.style == "clip" else t
      for t in layout.text_encoders))


def open_clip_fills(text: TextEncoderLayout, config: Mapping,
                    dtype) -> dict[str, np.ndarray]:
  """What an OpenCLIP file holds that the diffusers encoder of `text` does
  not (SD 2.x, `text.dropped`): block `num_hidden_layers` as a pass-through
  block (its attention and MLP output projections zero, so `x + 0 + 0`:
  the last hidden state equals the penultimate one, which is what SD 2.x
  and the diffusers folder condition on) and an identity `text_projection`
  (the pooled embedding, which SD 2.x does not use, left unprojected).
  Empty for encoders that drop nothing."""
  if not text.dropped:
    return {}
  width, mlp = int(config["hidden_size"]), int(config["intermediate_size"])
  block = f"{text.prefix}transformer.resblocks.{int(config['num_hidden_layers'])}."
  shapes = {"ln_1.weight": (width,), "ln_1.bias": (width,),
            "attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
            "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
            "ln_2.weight": (width,), "ln_2.bias": (width,),
            "mlp.c_fc.weight": (mlp, width), "mlp.c_fc.bias": (mlp,),
            "mlp.c_proj.weight": (width, mlp), "mlp.c_proj.bias": (width,)}
  out = {block + name: (np.ones if name.startswith("ln_") and name.endswith("weight")
                        else np.zeros)(shape, dtype) for name, shape in shapes.items()}
  out[f"{text.prefix}text_projection"] = np.eye(width, dtype=dtype)
  return out
