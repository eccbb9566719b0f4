"""Single-file Stable Diffusion checkpoints (AUTOMATIC1111, ComfyUI) in and out.

A single file is one safetensors file in the original LDM key layout
(`convert/ldm.py`). This module detects its family from keys and shapes,
holds a built-in diffusers config per family (nothing is fetched), reads the
text encoder and the cross-attention to_k/to_v lazily (`safe_open`: a 7 GB
file is never loaded whole), finds the CLIP tokenizer without a download,
and writes edited or converted files. The math never sees any of this: it
gets the same `LoadedModel` as from a diffusers folder.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import os
import pathlib
import re
import shutil
import struct
import tempfile
import typing
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

import convert
from convert import ldm
from scapre_jax import models, outputs

SUFFIXES = (".safetensors",)
PREDICTION_TYPES = ("epsilon", "v_prediction")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_CHUNK = 16 << 20


# -- families -------------------------------------------------------------------

_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "steps_offset": 1, "trained_betas": None,
}
_UNET_SD1 = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}
_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 512, "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
_TEXT_SD1 = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
    "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "projection_dim": 768, "torch_dtype": "float32", "vocab_size": 49408,
}


_VAE_SDXL = {**_VAE, "force_upcast": True, "sample_size": 1024, "scaling_factor": 0.13025}
_UNET_SDXL = {
    **_UNET_SD1, "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
_TEXT_BIGG = {
    **_TEXT_SD1, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
    "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
    "num_hidden_layers": 32, "projection_dim": 1280,
}


@dataclasses.dataclass(frozen=True)
class Family:
  """Built-in diffusers configs of one model family (SD 1.5, SD 2.1 768-v,
  SDXL-base 1.0): `text` holds {part: config} of its text encoder(s) in
  TEXT_PARTS order, `pad_tokens` their tokenizers' pad tokens."""

  name: str
  title: str
  unet: dict[str, Any]
  vae: dict[str, Any]
  text: dict[str, dict[str, Any]]
  scheduler: dict[str, Any]
  pad_tokens: dict[str, str]
  pipeline: str = "StableDiffusionPipeline"
  flat_clip: bool = False  # SD 1.x files without `text_model.` in the CLIP keys

  @property
  def layout(self) -> ldm.FamilyLayout:
    layout = ldm.FAMILY_LAYOUTS[self.name]
    return ldm.flat_clip(layout) if self.flat_clip else layout

  @property
  def text_parts(self) -> tuple[str, ...]:
    return tuple(self.text)

  @property
  def parts(self) -> tuple[str, ...]:
    return ("unet", "vae") + self.text_parts

  def configs(self) -> dict[str, dict[str, Any]]:
    return {"unet": self.unet, "vae": self.vae, **self.text}


FAMILIES = {
    "sd1": Family("sd1", "SD 1.x", _UNET_SD1, _VAE, {"text_encoder": _TEXT_SD1},
                  {**_SCHEDULER, "_class_name": "PNDMScheduler", "skip_prk_steps": True},
                  {"text_encoder": "<|endoftext|>"}),
    "sd2": Family(
        "sd2", "SD 2.x",
        {**_UNET_SD1, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
         "sample_size": 96, "use_linear_projection": True, "upcast_attention": True},
        {**_VAE, "sample_size": 768},
        {"text_encoder": {
            **_TEXT_SD1, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
            "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512}},
        {**_SCHEDULER, "prediction_type": "v_prediction"},
        {"text_encoder": "!"}),
    "sdxl": Family(
        "sdxl", "SDXL", _UNET_SDXL, _VAE_SDXL,
        {"text_encoder": _TEXT_SD1, "text_encoder_2": _TEXT_BIGG},
        {**_SCHEDULER, "_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
         "prediction_type": "epsilon", "timestep_spacing": "leading",
         "use_karras_sigmas": False},
        {"text_encoder": "<|endoftext|>", "text_encoder_2": "!"},
        pipeline="StableDiffusionXLPipeline"),
}
# Keys that only each family's text encoder(s) have; any one alternative of
# a tuple suffices.
_SIGNATURES = {
    "sd1": (("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
             "cond_stage_model.transformer.embeddings.token_embedding.weight"),),
    "sd2": (("cond_stage_model.model.token_embedding.weight",),),
    "sdxl": (("conditioner.embedders.0.transformer.text_model.embeddings."
              "token_embedding.weight",),
             ("conditioner.embedders.1.model.token_embedding.weight",)),
}
_FLAT_CLIP = "cond_stage_model.transformer.embeddings.token_embedding.weight"


def is_single_file(path) -> bool:
  """Whether `path` names a file (not a folder or a Hugging Face id)."""
  return pathlib.Path(path).expanduser().is_file()


def check_file(path) -> pathlib.Path:
  """The path of a readable safetensors single file; a pickle is refused
  with how to convert it safely."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"model file {path} does not exist")
  with open(path, "rb") as f:
    head = f.read(8)
  if path.suffix.lower() in PICKLE_SUFFIXES or head[:2] in (b"PK", b"\x80\x02"):
    raise ValueError(
        f"{path} is a pickled PyTorch checkpoint; scapre-jax reads only safetensors, "
        "because unpickling a file can run any code in it. Convert it once with "
        "torch's safe loader: python -c \"import sys, torch, safetensors.torch as st; "
        "sd = torch.load(sys.argv[1], map_location='cpu', weights_only=True); "
        "sd = sd.get('state_dict', sd); st.save_file({k: v.contiguous() for k, v in "
        "sd.items() if isinstance(v, torch.Tensor)}, sys.argv[2])\" MODEL.ckpt "
        "MODEL.safetensors")
  return path


def _open(path: pathlib.Path):
  try:
    return safetensors.safe_open(path, framework="np")
  except (safetensors.SafetensorError, OSError) as err:
    raise ValueError(f"cannot read {path} (corrupt or truncated safetensors?): {err}") from None


def detect_family(path, keys) -> Family:
  """The family of a single file from its tensor names; an unknown file
  raises ValueError naming the key prefixes it holds."""
  keys = set(keys)
  for name, signature in _SIGNATURES.items():
    if (all(any(k in keys for k in alternatives) for alternatives in signature)
        and f"{ldm.UNET_PREFIX}input_blocks.0.0.weight" in keys):
      if name == "sd1" and _FLAT_CLIP in keys:
        return dataclasses.replace(FAMILIES[name], flat_clip=True)
      return FAMILIES[name]
  prefixes: dict[str, int] = {}
  for key in keys:
    head = ".".join(key.split(".")[:2]) + "."
    prefixes[head] = prefixes.get(head, 0) + 1
  found = ", ".join(f"{p}* ({n})" for p, n in sorted(prefixes.items(), key=lambda x: -x[1])[:8])
  raise ValueError(
      f"{path} is not an SD 1.x, SD 2.x or SDXL single file: it holds {len(keys)} "
      f"tensors, under {found or 'nothing'}; expected model.diffusion_model.* with "
      "cond_stage_model.transformer.* (SD 1.x), cond_stage_model.model.* (SD 2.x) or "
      "conditioner.embedders.0.transformer.* + conditioner.embedders.1.model.* (SDXL)")


def family_configs(family: Family, config=None) -> dict[str, dict[str, Any]]:
  """The diffusers configs of the networks: the family's built-in ones, or
  those of the diffusers folder `config` (as diffusers' `config=`)."""
  if config is None:
    return family.configs()
  root = models.resolve(config)
  return {part: models.read_config(root, part) for part in family.parts}


def name_table(family: Family, configs, parts=None) -> ldm.Table:
  """The checked LDM <-> diffusers name table of a model of `family`."""
  parts = list(parts or family.parts)
  shapes = {p: models.PARTS[p].layout.torch_shapes(models.abstract_params(p, configs[p]))
            for p in parts}
  return ldm.build_table(family.layout, configs, shapes, parts)


def _is_edit_entry(entry: ldm.Entry) -> bool:
  return entry.part == "unet" and bool(re.search(r"\.attn2\.to_[kv]\.weight$", entry.names[0]))


# -- reading --------------------------------------------------------------------


def load(path, *, dtype: str = "float32", text_dtype: str | None = None, config=None,
         tokenizer=None, weights: str = "all") -> models.LoadedModel:
  """`models.load_model` of a single file. `weights="edit"` reads only the
  text encoder(s) and the UNet's attn2 to_k/to_v (the rest of the file is
  never read); "all" reads the whole UNet too. `config`: a diffusers folder
  whose configs and tokenizer(s) replace the family's built-in ones.
  `tokenizer`: a folder with the CLIP vocabulary (see `find_tokenizer`)."""
  from scapre_jax import io
  if weights not in ("all", "edit"):
    raise ValueError(f"weights must be 'all' or 'edit', got {weights!r}")
  path = check_file(path)
  jdtype = models.jax_dtype(dtype)
  text_dtype = dtype if text_dtype is None else text_dtype
  with _open(path) as f:
    family = detect_family(path, f.keys())
    configs = family_configs(family, config)
    table = name_table(family, configs, ("unet",) + family.text_parts)
    if weights == "edit":
      table = table.select(lambda e: e.part != "unet" or _is_edit_entry(e))
    states = _fitted(table.to_diffusers, _getter(f, path), path, family, config)
  params = {}
  for part in ("unet",) + family.text_parts:
    expected = models.abstract_params(part, configs[part])
    if part == "unet" and weights == "edit":
      flat = convert.flatten(expected)
      expected = convert.unflatten({p: a for p, a in flat.items()
                                    if io.EDIT_PATH.fullmatch(p)})
    params[part] = models.PARTS[part].layout.to_flax(states[part], expected)
  return models.LoadedModel(
      unet=models.build("unet", configs["unet"], dtype=dtype),
      unet_params=models.cast(params["unet"], jdtype),
      text_encoders=tuple(models.TextEncoder(
          part=part,
          module=models.build(part, configs[part], dtype=text_dtype),
          params=models.cast(params[part], models.jax_dtype(text_dtype)),
          tokenizer=tokenizer_of(family, part, config, tokenizer))
          for part in family.text_parts),
      family=family.name,
      path=path,
      unet_config=configs["unet"],
      fingerprint=models.fingerprint([path]),
      weights_format="single-file",
      unet_files=(path,),
      dtype=dtype,
  )


def tokenizer_of(family: Family, part: str, config=None, tokenizer=None):
  """The tokenizer of text encoder `part`: the `config` folder's own when
  one is given (and no `tokenizer` folder), else `find_tokenizer`."""
  if tokenizer is None and config is not None:
    tokenizer = models.resolve(config) / models.TOKENIZERS[part]
  return find_tokenizer(family, tokenizer, part=part)


def _fitted(convert_fn, arg, path, family: Family, config):
  """Runs a table conversion; says which configs a misfit was checked against."""
  try:
    return convert_fn(arg)
  except ValueError as err:
    against = (f"the configs of {config}" if config is not None else
               f"the built-in {family.title} configs (pass --config DIR, a diffusers "
               "folder of the same architecture, for another one)")
    raise ValueError(f"{path} does not fit {against}: {err}") from None


def _getter(f, path):
  keys = set(f.keys())

  def get(name):
    if name not in keys:
      raise KeyError(name)
    try:
      return f.get_tensor(name)
    except (safetensors.SafetensorError, OSError, TypeError) as err:
      raise ValueError(f"cannot read tensor {name} of {path}: {err}") from None
  return get


# -- tokenizer ------------------------------------------------------------------

CLIP_REPO = "openai/clip-vit-large-patch14"
_BPE_GZ = "bpe_simple_vocab_16e6.txt.gz"
# (package, file inside it): packages that ship the CLIP BPE vocabulary.
_PACKAGES = (("open_clip", _BPE_GZ), ("clip", _BPE_GZ),
             ("comfy", "sd1_tokenizer/vocab.json"))


def find_tokenizer(family: Family, folder=None, *, part: str = "text_encoder"):
  """A CLIPTokenizer with the real CLIP vocabulary, found without a download:
  `folder` (vocab.json + merges.txt, or bpe_simple_vocab_16e6.txt.gz), else
  the Hugging Face cache's openai/clip-vit-large-patch14, else a package
  that ships the vocabulary (open_clip, OpenAI's clip, ComfyUI). The pad
  token is that of the family's text encoder `part` (every SD encoder
  shares the vocabulary; SD 2.x and SDXL's second pad with "!")."""
  looked = []
  if folder is not None:
    folder = pathlib.Path(folder).expanduser()
    found = _vocab_in(folder)
    if found is None:
      raise FileNotFoundError(
          f"tokenizer folder {folder} holds neither vocab.json + merges.txt nor {_BPE_GZ}")
    return _tokenizer(found, family.pad_tokens[part])
  found = _vocab_in_hf_cache()
  looked.append(f"the Hugging Face cache ({CLIP_REPO})")
  for package, rel in _PACKAGES:
    if found is not None:
      break
    spec = importlib.util.find_spec(package)
    looked.append(f"the {package} package")
    if spec and spec.submodule_search_locations:
      for location in spec.submodule_search_locations:
        found = _vocab_in((pathlib.Path(location) / rel).parent)
        if found is not None:
          break
  if found is None:
    raise FileNotFoundError(
        "no CLIP tokenizer vocabulary found (looked in " + ", ".join(looked) + "). "
        f"Put vocab.json and merges.txt of {CLIP_REPO} (or {_BPE_GZ}) in a folder and "
        "pass --tokenizer FOLDER, or install a package that ships it: "
        "pip install openai-clip")
  return _tokenizer(found, family.pad_tokens[part])


def _vocab_in(folder: pathlib.Path):
  if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
    return folder
  if (folder / _BPE_GZ).is_file():
    return folder / _BPE_GZ
  if folder.is_file() and folder.name.endswith(".txt.gz"):
    return folder
  return None


def _vocab_in_hf_cache():
  import huggingface_hub
  try:
    vocab = huggingface_hub.try_to_load_from_cache(CLIP_REPO, "vocab.json")
    merges = huggingface_hub.try_to_load_from_cache(CLIP_REPO, "merges.txt")
  except Exception:  # a malformed cache is as good as none
    return None
  if isinstance(vocab, str) and isinstance(merges, str):
    folder = pathlib.Path(vocab).parent
    if pathlib.Path(merges).parent == folder:
      return folder
  return None


def bpe_files(gz: pathlib.Path) -> tuple[dict[str, int], list[str]]:
  """(vocab, merge lines) of CLIP's BPE from OpenAI's merges file: the 256
  byte symbols, the same with '</w>', one token per merge (the first
  49152 - 256 - 2 merges), then <|startoftext|>, <|endoftext|>."""
  from scapre_jax import tiny
  lines = gzip.open(gz, "rt", encoding="utf-8").read().split("\n")
  merges = lines[1:49152 - 256 - 2 + 1]
  symbols = list(tiny._byte_table().values())
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  return {t: i for i, t in enumerate(tokens)}, merges


def _tokenizer(found: pathlib.Path, pad_token: str):
  from transformers import CLIPTokenizer
  if found.is_dir() and (found / "tokenizer_config.json").is_file():
    return CLIPTokenizer.from_pretrained(found, local_files_only=True)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    if found.is_dir():
      vocab_file, merges_file = found / "vocab.json", found / "merges.txt"
    else:
      vocab, merges = bpe_files(found)
      vocab_file, merges_file = tmp / "vocab.json", tmp / "merges.txt"
      vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
      merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token,
                         model_max_length=77)


# -- writing --------------------------------------------------------------------


@typing.no_type_check  # validated in __post_init__ (see config.EditConfig)
@dataclasses.dataclass(frozen=True)
class ConvertConfig:
  """One `scapre-jax convert` run: a diffusers folder -> one single file,
  or a single file -> a diffusers folder; the direction follows `src`.

  Attributes:
    src: a diffusers folder (or cached Hugging Face id), or a single
      `.safetensors` file.
    dst: the file (`.safetensors`) or folder to write.
    config: single-file `src` only: a diffusers folder whose configs and
      tokenizers to use (default: the family's built-in ones).
    tokenizer: single-file `src` only: a folder with the CLIP vocabulary.
    prediction_type: single-file `src` only: "epsilon" or "v_prediction"
      for the scheduler config (default: `read_prediction_type`).
    overwrite: replace an existing `dst`.
  """

  src: str
  dst: pathlib.Path
  config: str | None = None
  tokenizer: str | None = None
  prediction_type: str | None = None
  overwrite: bool = False

  def __post_init__(self):
    object.__setattr__(self, "dst", pathlib.Path(self.dst))
    if self.prediction_type not in (None,) + PREDICTION_TYPES:
      raise ValueError(f"--prediction-type must be one of {PREDICTION_TYPES}, "
                       f"got {self.prediction_type!r}")
    if not self.from_file:
      given = [f"--{n.replace('_', '-')}" for n in ("config", "tokenizer", "prediction_type")
               if getattr(self, n) is not None]
      if given:
        raise ValueError(f"{', '.join(given)} apply when SRC is a single file; "
                         f"{self.src} is a folder")
      if self.dst.suffix != ".safetensors":
        raise ValueError(f"output {self.dst} must end in .safetensors")

  @property
  def from_file(self) -> bool:
    return is_single_file(self.src)


def run(config: ConvertConfig) -> pathlib.Path:
  """Writes `config.dst` from `config.src` (`ConvertConfig`); returns it."""
  if config.from_file:
    return file_to_folder(config.src, config.dst, config=config.config,
                          tokenizer=config.tokenizer, prediction_type=config.prediction_type,
                          overwrite=config.overwrite)
  return folder_to_file(config.src, config.dst, overwrite=config.overwrite)


def folder_family(root) -> Family:
  """The family whose single-file layout fits the diffusers folder `root`
  (`models.detect_family`: SD 1.x, SD 2.x or SDXL; the SDXL refiner has no
  single-file layout here yet)."""
  root = models.resolve(root)
  parts = models.text_parts(root)
  name = models.detect_family(root, models.read_config(root, "unet"),
                              {p: models.read_config(root, p) for p in parts})
  if name not in FAMILIES:
    known = ", ".join(f.title for f in FAMILIES.values())
    raise ValueError(f"{root} is an {models.FAMILIES[name]} model; its single-file "
                     f"layout is not supported yet, only {known}")
  return FAMILIES[name]


def folder_to_file(src, out, *, overwrite: bool = False) -> pathlib.Path:
  """Writes the diffusers folder `src` as one LDM-layout safetensors file
  `out` (UNet, VAE, text encoder(s); each tensor in its stored dtype). An
  SD 2.x file also gets what diffusers drops (`ldm.open_clip_fills`: a
  pass-through 24th OpenCLIP block and an identity text projection), so
  that it has every tensor the LDM model of AUTOMATIC1111 and ComfyUI
  builds; the names of these are recorded in the metadata."""
  from scapre_jax import __version__, io
  root = models.resolve(src)
  out = pathlib.Path(out)
  io.check_output_path(out, overwrite=overwrite, protected=[root])
  if out.suffix != ".safetensors":
    raise ValueError(f"output {out} must end in .safetensors")
  family = folder_family(root)
  configs = {p: models.read_config(root, p) for p in family.parts}
  table = name_table(family, configs)
  states = {}
  for part in configs:
    params = models.read_params(root, part, configs[part])
    states[part] = models.PARTS[part].layout.to_torch(
        params, models.abstract_params(part, configs[part]))
  tensors = table.to_ldm(states)
  io.check_finite(tensors)
  fills = {}
  for text in family.layout.text_encoders:
    dtype = next(iter(states[text.part].values())).dtype
    fills.update(ldm.open_clip_fills(text, configs[text.part], dtype))
  meta = {"format": "pt", "scapre_jax.family": family.name,
          "scapre_jax.source": root.name, "scapre_jax_version": __version__}
  if fills:
    meta["scapre_jax.filled"] = json.dumps(sorted(fills))
  outputs.atomic_file(out, overwrite, lambda tmp: safetensors.numpy.save_file(
      {**tensors, **fills}, tmp, metadata=meta))
  return out


def file_to_folder(src, out, *, config=None, tokenizer=None, prediction_type=None,
                   overwrite: bool = False) -> pathlib.Path:
  """Writes the single file `src` as a diffusers folder `out`: the
  family's built-in configs (or those of the folder `config`), the CLIP
  tokenizer(s) (`tokenizer_of`) and the scheduler config
  (`scheduler_config`; `prediction_type` overrides)."""
  from scapre_jax import io
  path = check_file(src)
  out = pathlib.Path(out)
  io.check_output_path(out, overwrite=overwrite, protected=[path])
  with _open(path) as f:
    family = detect_family(path, f.keys())
    configs = family_configs(family, config)
    states = _fitted(name_table(family, configs).to_diffusers, _getter(f, path), path,
                     family, config)
    scheduler = scheduler_config(f, path, family, configs["unet"], config=config,
                                 prediction_type=prediction_type)
  configs = _sized(configs, family, scheduler, config)
  toks = {part: tokenizer_of(family, part, config, tokenizer) for part in family.text_parts}
  for part, state in states.items():
    io.check_finite(state)

  def build(tmp: pathlib.Path) -> None:
    index = {"_class_name": family.pipeline, "feature_extractor": [None, None],
             "scheduler": ["diffusers", scheduler["_class_name"]],
             "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if family.pipeline == "StableDiffusionPipeline":
      index.update(requires_safety_checker=False, safety_checker=[None, None])
    else:
      index.update(force_zeros_for_empty_prompt=True, image_encoder=[None, None])
    for part in family.text_parts:
      index[part] = ["transformers", configs[part].get("architectures", ["CLIPTextModel"])[0]]
      index[models.TOKENIZERS[part]] = ["transformers", "CLIPTokenizer"]
    _json(tmp / "model_index.json", index)
    for part, state in states.items():
      spec = models.PARTS[part]
      _json(tmp / spec.folder / "config.json", configs[part])
      safetensors.numpy.save_file(
          {n: np.ascontiguousarray(a) for n, a in state.items()},
          tmp / spec.folder / f"{spec.torch_stem}.safetensors", metadata={"format": "pt"})
    _json(tmp / "scheduler" / "scheduler_config.json", scheduler)
    for part, tok in toks.items():
      tok.save_pretrained(tmp / models.TOKENIZERS[part])

  outputs.atomic_dir(out, overwrite, build)
  return out


# ComfyUI's rule for SD 2.x files that say nothing (its SD20.model_type): the
# 768-v models' last up block's first transformer norm1 bias has a standard
# deviation above 0.09, the 512 epsilon models' below.
_V_STD = 0.09
_V_NORM = re.compile(r"up_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.0\.norm1\.bias")


def read_prediction_type(f, path, family: Family, unet_config, *, flag=None) -> tuple[str, str]:
  """(prediction type, why) of the single file open as `f`: `flag` if
  given, else what the file says (a `v_pred` key, as ComfyUI reads it;
  the metadata's `modelspec.prediction_type` or kohya's
  `ss_v_parameterization`), else for SD 2.x ComfyUI's statistic (the std of
  the last up block's first norm1 bias above 0.09: 768-v; below: the 512
  base), else epsilon (SD 1.x, SDXL)."""
  if flag is not None:
    if flag not in PREDICTION_TYPES:
      raise ValueError(f"prediction type must be one of {PREDICTION_TYPES}, got {flag!r}")
    return flag, "given"
  keys = set(f.keys())
  meta = f.metadata() or {}
  if "v_pred" in keys:
    return "v_prediction", "the file's v_pred key"
  said = meta.get("modelspec.prediction_type")
  if said is not None:
    by_word = {"epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
    if said not in by_word:
      raise ValueError(f"{path}: metadata modelspec.prediction_type={said!r} is neither "
                       "'epsilon' nor 'v'; pass --prediction-type")
    return by_word[said], "the file's modelspec.prediction_type"
  if meta.get("ss_v_parameterization", "").lower() == "true":
    return "v_prediction", "the file's ss_v_parameterization"
  if family.name != "sd2":
    return "epsilon", f"{family.title} default"
  table = name_table(family, {"unet": unet_config}, ("unet",))
  name = [e.ldm for e in table.entries if _V_NORM.fullmatch(e.names[0])][-1]
  bias = np.asarray(_getter(f, path)(name), np.float64)
  if bias.std() > _V_STD:
    return "v_prediction", f"std {bias.std():.3f} > {_V_STD} of {name} (ComfyUI's rule)"
  return "epsilon", f"std {bias.std():.3f} <= {_V_STD} of {name} (ComfyUI's rule)"


def scheduler_config(f, path, family: Family, unet_config, *, config=None,
                     prediction_type=None) -> dict[str, Any]:
  """The scheduler config of the single file open as `f`: the `config`
  folder's if it has one, else the family's built-in one; its
  `prediction_type` from `read_prediction_type` (`prediction_type` is the
  --prediction-type flag), unless the folder's own config was taken and no
  flag was given."""
  from_folder = None
  if config is not None:
    candidate = models.resolve(config) / "scheduler" / "scheduler_config.json"
    if candidate.is_file():
      from_folder = json.loads(candidate.read_text())
  if from_folder is not None and prediction_type is None:
    return from_folder
  chosen, _ = read_prediction_type(f, path, family, unet_config, flag=prediction_type)
  return {**(from_folder or family.scheduler), "prediction_type": chosen}


def _sized(configs, family: Family, scheduler, config):
  """The SD 2.x epsilon models are the 512 px base ones: the built-in
  configs (SD 2.1 768-v) get their sample sizes."""
  if config is None and family.name == "sd2" and scheduler["prediction_type"] == "epsilon":
    return {**configs, "unet": {**configs["unet"], "sample_size": 64},
            "vae": {**configs["vae"], "sample_size": 512}}
  return configs


@dataclasses.dataclass(frozen=True, eq=False)
class SamplingParts:
  """What sampling needs from a single file besides the UNet and text
  encoders (`sampling_parts`): VAE params and config, scheduler config and
  the UNet's sample size (latent pixels)."""

  vae_params: dict[str, Any]
  vae_config: dict[str, Any]
  scheduler: dict[str, Any]
  sample_size: int


def sampling_parts(path, *, config=None, prediction_type=None,
                   dtype: str = "float32") -> SamplingParts:
  """The VAE (`first_stage_model.*` alone is read), scheduler config
  (`scheduler_config`) and sample size of the single file `path`."""
  path = check_file(path)
  with _open(path) as f:
    family = detect_family(path, f.keys())
    configs = family_configs(family, config)
    scheduler = scheduler_config(f, path, family, configs["unet"], config=config,
                                 prediction_type=prediction_type)
    configs = _sized(configs, family, scheduler, config)
    state = _fitted(name_table(family, configs, ("vae",)).to_diffusers, _getter(f, path),
                    path, family, config)["vae"]
  params = models.PARTS["vae"].layout.to_flax(state, models.abstract_params("vae", configs["vae"]))
  return SamplingParts(vae_params=models.cast(params, models.jax_dtype(dtype)),
                       vae_config=configs["vae"], scheduler=scheduler,
                       sample_size=int(configs["unet"]["sample_size"]))


def _json(path: pathlib.Path, obj) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _header(path: pathlib.Path) -> tuple[dict, int]:
  """(header dict, data start) of a safetensors file."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"cannot read {path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw)
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
      raise ValueError(f"cannot read {path}: corrupt safetensors header: {err}") from None
  return header, 8 + n


def ldm_edit_names(unet_config, family: str = "sd1") -> dict[str, str]:
  """{diffusers UNet name: LDM name} of every attn2 to_k/to_v weight."""
  shapes = models.PARTS["unet"].layout.torch_shapes(models.abstract_params("unet", unet_config))
  shapes = {n: s for n, s in shapes.items() if re.search(r"\.attn2\.to_[kv]\.weight$", n)}
  table = ldm.build_table(family, {"unet": unet_config}, {"unet": shapes}, ["unet"])
  return {e.names[0]: e.ldm for e in table.entries}


def write_edited(src, out, kernels: Mapping[str, Any], *, metadata: Mapping[str, str] = (),
                 config=None, overwrite: bool = False) -> pathlib.Path:
  """Writes the single file `src` with the UNet kernels {flax path: (d_in,
  d_out)} replaced, at `out`: same tensor names, order, dtypes and byte
  offsets; every other tensor byte-identical; the original metadata kept
  and `metadata` added. `config`: the diffusers folder the file was read
  with, if any (`load`). The data is streamed, never loaded whole; the disk
  must hold the copy (checked first), and a failed write leaves no file."""
  from scapre_jax import io
  path = check_file(src)
  out = pathlib.Path(out)
  io.check_output_path(out, overwrite=overwrite, protected=[path])
  arrays = io.edit_kernels(kernels)
  io.check_finite(arrays)
  with _open(path) as f:
    family = detect_family(path, f.keys())
    keys = set(f.keys())
    header, start = _header(path)
    names = ldm_edit_names(family_configs(family, config)["unet"], family.name)
    patches = {}
    for flax_path, kernel in arrays.items():
      name = names.get(models.torch_name(flax_path))
      if name is None or name not in keys:
        raise ValueError(f"{path} has no tensor for {flax_path}")
      original = f.get_tensor(name)
      patches[name] = io.replacement(name, original, kernel.T)
  meta = dict(header.get("__metadata__") or {})
  meta.update({str(k): str(v) for k, v in dict(metadata).items()})
  new_header = {"__metadata__": meta, **{k: v for k, v in header.items() if k != "__metadata__"}}
  blob = json.dumps(new_header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)
  size = os.path.getsize(path)
  need = 8 + len(blob) + size - start
  free = shutil.disk_usage(out.parent if out.parent.exists() else ".").free
  if free < need:
    raise ValueError(f"not enough disk space for {out}: {need} bytes needed, {free} free")

  def write(tmp) -> None:
    with open(path, "rb") as source, open(tmp, "wb") as target:
      target.write(struct.pack("<Q", len(blob)) + blob)
      source.seek(start)
      shutil.copyfileobj(source, target, _CHUNK)
      for name, array in patches.items():
        begin, end = header[name]["data_offsets"]
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        if len(data) != end - begin:
          raise AssertionError(f"{name}: {len(data)} bytes for {end - begin}")
        target.seek(8 + len(blob) + begin)
        target.write(data)
      target.flush()
      os.fsync(target.fileno())

  outputs.atomic_file(out, overwrite, write)
  return out



def file_metadata(edit_meta: Mapping[str, Any]) -> dict[str, str]:
  """What an edited single file records of its edit (under `scapre_jax.edit`)."""
  from scapre_jax import __version__
  keep = ("concepts", "guides", "preserve", "preset", "seed", "base_fingerprint", "config")
  record = {k: edit_meta[k] for k in keep if k in edit_meta}
  record["scapre_jax_version"] = __version__
  return {"scapre_jax.edit": json.dumps(record, sort_keys=True)}


def apply_edit(model_file, edit_file, out, *, config=None,
               overwrite: bool = False) -> pathlib.Path:
  """Writes the single file `model_file` with `edit_file` applied at `out`,
  after checking that the edit was made for this file (its
  `base_fingerprint` is the file's sha256)."""
  from scapre_jax import io
  path = check_file(model_file)
  io.check_output_path(out, overwrite=overwrite, protected=[path, edit_file])
  kernels, meta = io.read_edit_file(edit_file)
  io.check_fingerprint(edit_file, meta, models.fingerprint([path]), path)
  return write_edited(path, out, kernels, metadata=file_metadata(meta), config=config,
                      overwrite=overwrite)


def model_family(model: models.LoadedModel) -> Family:
  """The single-file family of a loaded model (file or folder)."""
  if model.weights_format == "single-file":
    with _open(model.path) as f:
      return detect_family(model.path, f.keys())
  return folder_family(model.path)
