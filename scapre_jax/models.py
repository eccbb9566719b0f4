"""Loads a Stable Diffusion folder into Flax modules and params.

The one module that imports diffusers' and transformers' Flax classes. It
reads PyTorch safetensors (converted by `convert/`, without torch) or Flax
msgpack files, checks every tensor against the model config, and selects the
cross-attention matrices that ScaPre edits by their flattened param path.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

import convert
from scapre_jax import io, precision, requests
from scapre_jax import config as config_lib


# The Flax classes warn that they are deprecated; their log lines are dropped
# by `console.quiet_library_logs`, which the CLI calls.
with warnings.catch_warnings():
  warnings.filterwarnings("ignore", ".*classes are deprecated", FutureWarning)
  from diffusers import FlaxAutoencoderKL
  from diffusers import FlaxUNet2DConditionModel
  from transformers import CLIPTextConfig
  from transformers import CLIPTokenizer
  from transformers import FlaxCLIPTextModel
  from transformers import FlaxCLIPTextModelWithProjection

# config.DTYPES by name; float64 needs JAX's 64-bit mode (scapre_jax.precision).
DTYPES = {name: getattr(jnp, name) for name in config_lib.DTYPES}
_CHUNK = 16 << 20  # hashing chunk: 16 MiB


@dataclasses.dataclass(frozen=True)
class _Part:
  """Where one network lives in a diffusers folder and how to map it."""

  folder: str
  torch_stem: str  # <stem>.safetensors, <stem>.fp16.safetensors, sharded
  flax_file: str
  layout: convert.Layout
  # PyTorch config settings the Flax classes do not implement, with the only
  # value they support.
  torch_only: tuple[tuple[str, Any], ...] = ()


PARTS = {
    "unet": _Part(
        "unet", "diffusion_pytorch_model",
        "diffusion_flax_model.msgpack", convert.UNET,
        torch_only=(
            ("act_fn", "silu"), ("norm_num_groups", 32), ("norm_eps", 1e-5),
            ("resnet_time_scale_shift", "default"),
            ("time_embedding_type", "positional"), ("conv_in_kernel", 3),
            ("conv_out_kernel", 3), ("class_embed_type", None),
            ("num_class_embeds", None), ("encoder_hid_dim", None),
            ("time_cond_proj_dim", None), ("downsample_padding", 1),
            ("mid_block_scale_factor", 1), ("center_input_sample", False),
            ("dual_cross_attention", False), ("attention_type", "default"),
            ("cross_attention_norm", None),
        )),
    "vae": _Part(
        "vae", "diffusion_pytorch_model",
        "diffusion_flax_model.msgpack", convert.VAE,
        torch_only=(("use_quant_conv", True), ("use_post_quant_conv", True),
                    ("mid_block_add_attention", True))),
    "text_encoder": _Part(
        "text_encoder", "model", "flax_model.msgpack", convert.CLIP_TEXT),
    # SDXL's second text encoder: CLIPTextModelWithProjection (OpenCLIP bigG).
    "text_encoder_2": _Part(
        "text_encoder_2", "model", "flax_model.msgpack", convert.CLIP_TEXT),
}
TEXT_PARTS = ("text_encoder", "text_encoder_2")
_TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}

# Model families a diffusers folder can hold (`detect_family`), and which
# hidden state of the text encoder(s) is the UNet context
# (docs/algorithm.md "SDXL"): the last one (after the final layer norm) for
# SD 1.x/2.x, the penultimate one (`hidden_states[-2]`) of each encoder for
# SDXL, concatenated in TEXT_PARTS order.
FAMILIES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL",
            "sdxl-refiner": "SDXL refiner"}
CONTEXT_LAYERS = {"sd1": "last", "sd2": "last", "sdxl": "penultimate",
                  "sdxl-refiner": "penultimate"}


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
  """One text encoder of a model, its params and its tokenizer.

  Call it as `module(input_ids, params=params)`; `part` is its folder
  ("text_encoder", or SDXL's "text_encoder_2").
  """

  part: str
  module: Any  # FlaxCLIPTextModel or FlaxCLIPTextModelWithProjection, no params
  params: dict[str, Any]
  tokenizer: Any  # CLIPTokenizer


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
  """A Stable Diffusion UNet and text encoder(s) as Flax modules + params.

  Call the UNet as `unet.apply({"params": unet_params}, sample (B,C,H,W),
  timesteps (B,), context (B,77,d_in)).sample` (SDXL adds
  `added_cond_kwargs={"text_embeds", "time_ids"}`). `text_encoders` holds
  one encoder (SD 1.x/2.x, the SDXL refiner's text_encoder_2) or two
  (SDXL); `text_encoder`, `text_params` and `tokenizer` are the first one's.
  """

  unet: Any  # FlaxUNet2DConditionModel
  unet_params: dict[str, Any]
  text_encoders: tuple[TextEncoder, ...]
  path: pathlib.Path  # the diffusers folder
  unet_config: dict[str, Any]
  fingerprint: str  # sha256 of the UNet weight file(s) as read
  weights_format: str  # "safetensors" or "flax": the UNet file read
  unet_files: tuple[pathlib.Path, ...]
  dtype: str
  family: str = "sd1"  # a key of FAMILIES

  @property
  def text_encoder(self):
    return self.text_encoders[0].module

  @property
  def text_params(self) -> dict[str, Any]:
    return self.text_encoders[0].params

  @property
  def tokenizer(self):
    return self.text_encoders[0].tokenizer

  @property
  def context_layer(self) -> str:
    """Which hidden state is the UNet context: "last" or "penultimate"."""
    return CONTEXT_LAYERS[self.family]


# -- building -----------------------------------------------------------------


def build(part: str, config: Mapping[str, Any], *, dtype: str = "float32"):
  """Flax module of `part` ("unet", "vae", "text_encoder", "text_encoder_2")
  from its diffusers/transformers config dict."""
  jdtype = _dtype(dtype)
  if part in TEXT_PARTS:
    cls = FlaxCLIPTextModel if part == "text_encoder" else FlaxCLIPTextModelWithProjection
    return cls(CLIPTextConfig.from_dict(dict(config)), dtype=jdtype, _do_init=False)
  spec = PARTS[part]
  for key, supported in spec.torch_only:
    if key in config and config[key] != supported:
      raise ValueError(f"{part} config sets {key}={config[key]!r}; the Flax "
                       f"model only implements {key}={supported!r}")
  cls = FlaxUNet2DConditionModel if part == "unet" else FlaxAutoencoderKL
  fields = {f.name for f in dataclasses.fields(cls)} - {"dtype", "parent", "name"}
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in config.items() if k in fields}
  return cls(**kwargs, dtype=jdtype)


def _init_fn(part: str, module):
  if part in TEXT_PARTS:
    return functools.partial(module.init_weights, input_shape=(1, 1))
  return module.init_weights


@functools.lru_cache(maxsize=16)
def _abstract(part: str, config_json: str):
  module = build(part, json.loads(config_json))
  return jax.eval_shape(_init_fn(part, module), jax.random.key(0))


def abstract_params(part: str, config: Mapping[str, Any]) -> dict[str, Any]:
  """Param tree of `part` as ShapeDtypeStructs (`jax.eval_shape` of init)."""
  return _abstract(part, json.dumps(config, sort_keys=True))


# -- loading ------------------------------------------------------------------


def load_model(path_or_id: str | os.PathLike, *, dtype: str = "float32",
               text_dtype: str | None = None, config=None, tokenizer=None,
               weights: str = "all") -> LoadedModel:
  """Loads UNet, text encoder(s) and tokenizer(s) from a local diffusers folder
  (SD 1.x, SD 2.x, SDXL or the SDXL refiner: `detect_family`), an
  already-cached Hugging Face id (never downloads) or a single-file
  checkpoint (`scapre_jax.single_file`: SD 1.x/2.x/SDXL `.safetensors`). Params
  are cast to `dtype` ("float32", "bfloat16", "float16", "float64"); the
  modules compute in it. `text_dtype` (default: `dtype`) sets the text
  encoder's alone: "float64" gives float64 encodings of a float32 model
  (`--precision float64`). float64 needs JAX's 64-bit mode
  (`precision.enable_x64`). `weights="edit"` keeps only the UNet's attn2
  to_k/to_v (a single file then reads nothing else of the UNet). `config`
  (a diffusers folder) and `tokenizer` (a vocabulary folder) apply to
  single files only."""
  if weights not in ("all", "edit"):
    raise ValueError(f"weights must be 'all' or 'edit', got {weights!r}")
  if pathlib.Path(path_or_id).expanduser().is_file():
    from scapre_jax import single_file
    return single_file.load(path_or_id, dtype=dtype, text_dtype=text_dtype, config=config,
                            tokenizer=tokenizer, weights=weights)
  if config is not None or tokenizer is not None:
    raise ValueError("config and tokenizer apply to single-file models; "
                     f"{path_or_id} is a folder with its own")
  jdtype = _dtype(dtype)
  text_dtype = dtype if text_dtype is None else text_dtype
  text_jdtype = _dtype(text_dtype)
  root = resolve(path_or_id)
  unet_config = _read_config(root, PARTS["unet"])
  text_configs = {part: _read_config(root, PARTS[part]) for part in text_parts(root)}
  unet_params, unet_format, unet_files = _read_params(root, "unet", unet_config)
  family = detect_family(root, unet_config, text_configs)
  encoders = tuple(
      TextEncoder(part=part, module=build(part, config, dtype=text_dtype),
                  params=_cast(_read_params(root, part, config)[0], text_jdtype),
                  tokenizer=_tokenizer(root / _TOKENIZERS[part]))
      for part, config in text_configs.items())
  if weights == "edit":
    unet_params = convert.unflatten(cross_attention_kernels(unet_params))
  return LoadedModel(
      unet=build("unet", unet_config, dtype=dtype),
      unet_params=_cast(unet_params, jdtype),
      text_encoders=encoders,
      family=family,
      path=root,
      unet_config=unet_config,
      fingerprint=fingerprint(unet_files),
      weights_format=unet_format,
      unet_files=unet_files,
      dtype=dtype,
  )


def resolve(path_or_id: str | os.PathLike) -> pathlib.Path:
  """Local diffusers folder of `path_or_id`: the folder itself, or the
  snapshot of a Hugging Face id in the local cache (offline only)."""
  path = pathlib.Path(path_or_id).expanduser()
  if not path.exists():
    text = str(path_or_id)
    if requests.looks_like_hub_id(text):
      path = requests.cached_snapshot(text)
    else:
      raise FileNotFoundError(f"model folder {text} does not exist")
  if not path.is_dir():
    raise ValueError(f"{path} is a file, not a diffusers model folder")
  missing = [n for n in ("model_index.json", "unet") if not (path / n).exists()]
  if not text_parts(path):
    missing.append("text_encoder")
  missing += [_TOKENIZERS[p] for p in text_parts(path)
              if not (path / _TOKENIZERS[p]).exists()]
  if missing:
    raise ValueError(f"{path} is not a diffusers Stable Diffusion folder: "
                     f"missing {', '.join(missing)}")
  return path


def text_parts(root: pathlib.Path) -> tuple[str, ...]:
  """The text encoder folders of a diffusers folder, in TEXT_PARTS order."""
  return tuple(p for p in TEXT_PARTS if (pathlib.Path(root) / p).is_dir())


def detect_family(root, unet_config: Mapping[str, Any],
                  text_configs: Mapping[str, Mapping[str, Any]]) -> str:
  """The family (a key of FAMILIES) of a diffusers folder, from its UNet
  config and text encoder configs {part: config}: SD 1.x/2.x have one
  `text_encoder` as wide as the UNet context (CLIP's quick_gelu: 1.x,
  OpenCLIP's gelu: 2.x); SDXL has `text_encoder` and `text_encoder_2`, whose
  widths add up to it, and a "text_time" UNet; the SDXL refiner has
  `text_encoder_2` alone. Anything else raises ValueError naming what was
  found."""
  width = unet_config.get("cross_attention_dim")
  text_time = unet_config.get("addition_embed_type") == "text_time"
  widths = {p: c.get("hidden_size") for p, c in text_configs.items()}
  parts = tuple(widths)
  if sum(w or 0 for w in widths.values()) == width:
    if parts == ("text_encoder",) and not text_time:
      return "sd2" if text_configs["text_encoder"].get("hidden_act") == "gelu" else "sd1"
    if parts == TEXT_PARTS and text_time:
      return "sdxl"
    if parts == ("text_encoder_2",) and text_time:
      return "sdxl-refiner"
  found = ", ".join(f"{p} ({w} wide)" for p, w in widths.items()) or "no text encoder"
  raise ValueError(
      f"{root} has an unknown model layout: UNet cross_attention_dim={width}, "
      f"addition_embed_type={unet_config.get('addition_embed_type')!r}, {found}; "
      "expected SD 1.x/2.x (text_encoder as wide as the context), SDXL (text_encoder "
      "and text_encoder_2 whose widths add up to it, a text_time UNet) or the SDXL "
      "refiner (text_encoder_2 alone)")


def _tokenizer(folder: pathlib.Path):
  return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _read_config(root: pathlib.Path, spec: _Part) -> dict[str, Any]:
  path = root / spec.folder / "config.json"
  if not path.is_file():
    raise ValueError(f"{root} is not a diffusers model folder: no {spec.folder}/config.json")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as err:
    raise ValueError(f"cannot parse {path}: {err}") from None


def _weight_files(folder: pathlib.Path, spec: _Part) -> tuple[str, list[pathlib.Path]]:
  """Which files hold the weights, in order of preference: full-precision
  safetensors (single or sharded), Flax msgpack, fp16 safetensors."""
  stem = spec.torch_stem
  candidates = [  # (single file, shard index as diffusers names it, format)
      (f"{stem}.safetensors", f"{stem}.safetensors.index.json", "safetensors"),
      (spec.flax_file, None, "flax"),
      (f"{stem}.fp16.safetensors", f"{stem}.safetensors.index.fp16.json", "safetensors"),
  ]
  for name, index, fmt in candidates:
    if (folder / name).is_file():
      return fmt, [folder / name]
    if index and (folder / index).is_file():
      try:
        shards = json.loads((folder / index).read_text())["weight_map"].values()
      except (json.JSONDecodeError, KeyError, AttributeError) as err:
        raise ValueError(f"cannot read shard index {folder / index}: {err!r}") from None
      return fmt, [folder / f for f in sorted(set(shards))]
  if list(folder.glob("*.bin")):
    raise ValueError(f"{folder} holds only pickled PyTorch weights (.bin); "
                     "save them as safetensors first")
  raise FileNotFoundError(f"no weights in {folder}: expected one of "
                          f"{[n for n, _, _ in candidates]}")


def _read_params(root, part, config):
  spec = PARTS[part]
  return _read_weights(root / spec.folder, spec, abstract_params(part, config))


def _read_weights(folder: pathlib.Path, spec: _Part, expected):
  fmt, files = _weight_files(folder, spec)
  part = spec.layout.name
  if fmt == "flax":
    tree = io.read_msgpack(files[0])
    return convert.check(tree, expected, part), fmt, tuple(files)
  state = {}
  for file in files:
    state.update(_read_safetensors(file))
  return spec.layout.to_flax(state, expected), fmt, tuple(files)


def _read_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(file)
  except (safetensors.SafetensorError, OSError) as err:
    raise ValueError(f"cannot read {file} (corrupt or truncated safetensors?): {err}") from None


def fingerprint(files) -> str:
  """sha256 over the bytes of `files`, in order (16 MiB reads)."""
  digest = hashlib.sha256()
  buffer = bytearray(_CHUNK)
  view = memoryview(buffer)
  for file in files:
    with open(file, "rb") as f:
      while n := f.readinto(buffer):
        digest.update(view[:n])
  return digest.hexdigest()


def _dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {tuple(DTYPES)}")
  if name == "float64":
    precision.require("float64")
  return DTYPES[name]


def _cast(params, dtype):
  return jax.tree.map(
      lambda a: jnp.asarray(a, dtype if jnp.issubdtype(a.dtype, jnp.floating) else None),
      params)


# -- selecting by path --------------------------------------------------------


def select(params: Mapping[str, Any], pattern: str) -> dict[str, Any]:
  """Leaves whose '/'-joined path `re.fullmatch`es `pattern`, in tree order.
  Raises ValueError listing the paths that exist when nothing matches."""
  flat = convert.flatten(params)
  found = {p: a for p, a in flat.items() if re.fullmatch(pattern, p)}
  if not found:
    raise ValueError(f"no parameter path matches {pattern!r}; the {len(flat)} "
                     f"paths include: {', '.join(list(flat)[:40])}")
  return found


def cross_attention_kernels(
    unet_params: Mapping[str, Any], *, targets: tuple[str, ...] = ("to_k", "to_v"),
) -> dict[str, jax.Array | np.ndarray | jax.ShapeDtypeStruct]:
  """Every cross-attention (`attn2`) projection kernel named in `targets`,
  keyed by Flax path, each (d_in, d_out) = W.T of the PyTorch (d_out, d_in).

  Also takes an abstract tree (`abstract_params`) to inspect a config.
  """
  names = "|".join(re.escape(t) for t in targets)
  return select(unet_params, rf"(.+/)?attn2/({names})/kernel")


def replace_kernels(unet_params: Mapping[str, Any],
                    kernels: Mapping[str, Any]) -> dict[str, Any]:
  """New param tree with `kernels` (path -> array) swapped in, each cast to
  the dtype it replaces. Unknown paths or changed shapes raise ValueError."""
  flat = convert.flatten(unet_params)
  unknown = [p for p in kernels if p not in flat]
  if unknown:
    raise ValueError(f"unknown parameter paths: {', '.join(unknown)}")
  bad = [f"{p}: expected {tuple(flat[p].shape)}, found {tuple(np.shape(k))}"
         for p, k in kernels.items() if tuple(np.shape(k)) != tuple(flat[p].shape)]
  if bad:
    raise ValueError("replacement kernels have the wrong shape: " + "; ".join(bad))
  for path, kernel in kernels.items():
    flat[path] = jnp.asarray(kernel, flat[path].dtype)
  return convert.unflatten(flat)


def torch_name(flax_path: str) -> str:
  """UNet Flax path -> diffusers PyTorch name
  (`.../attn2/to_k/kernel` -> `....attn2.to_k.weight`)."""
  return convert.UNET.torch_name(flax_path)


def flax_path(torch_name: str) -> str:
  """Diffusers PyTorch UNet name -> Flax path; inverse of `torch_name`."""
  return convert.UNET.flax_path(torch_name)


# -- public readers for other modules -------------------------------------------


def load_part(path_or_id, part: str, *, dtype: str = "float32"):
  """(Flax module, params cast to `dtype`, config dict) of one network of a
  diffusers folder: "unet", "vae", "text_encoder" or "text_encoder_2"."""
  if part not in PARTS:
    raise ValueError(f"unknown part {part!r}; expected one of {tuple(PARTS)}")
  root = resolve(path_or_id)
  config = _read_config(root, PARTS[part])
  params, _, _ = _read_params(root, part, config)
  return build(part, config, dtype=dtype), _cast(params, _dtype(dtype)), config


def weight_files(path_or_id, part: str = "unet") -> tuple[str, list[pathlib.Path]]:
  """(format, files) the loader reads for `part`: what `fingerprint` hashes
  and what a writer must replace."""
  spec = PARTS[part]
  return _weight_files(resolve(path_or_id) / spec.folder, spec)


def jax_dtype(name: str):
  """jnp dtype of a dtype name ("float32", "bfloat16", "float16", "float64")."""
  return _dtype(name)


cast = _cast
read_safetensors = _read_safetensors
TOKENIZERS = _TOKENIZERS  # {text encoder part: its tokenizer folder}


def read_folder_weights(folder, layout: convert.Layout, expected: Mapping[str, Any], *,
                        torch_stem: str = "model", flax_file: str = "flax_model.msgpack"):
  """(params, format, files) of a transformers-style model folder (a CLIP
  scorer, say): `<torch_stem>.safetensors` (single or sharded), Flax
  msgpack or fp16 safetensors, mapped by `layout` and checked against
  `expected` (abstract params)."""
  spec = _Part(folder="", torch_stem=torch_stem, flax_file=flax_file, layout=layout)
  return _read_weights(pathlib.Path(folder), spec, expected)


def read_params(root, part: str, config: Mapping[str, Any]) -> dict[str, Any]:
  """Flax params of `part` of the diffusers folder `root`, in the stored dtype."""
  return _read_params(pathlib.Path(root), part, config)[0]


def read_config(root, part: str) -> dict[str, Any]:
  """The config dict of `part` in the diffusers folder `root`."""
  return _read_config(pathlib.Path(root), PARTS[part])
