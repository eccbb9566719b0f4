"""A deterministic random-weight Stable Diffusion, small enough for tests.

`write_tiny_model` writes exactly the diffusers PyTorch folder layout (what
`StableDiffusionPipeline.save_pretrained` produces), so both our loader and
diffusers/transformers' PyTorch classes read it. Weights are drawn in the
Flax models' own param shapes, mapped to PyTorch names by `convert/` and
saved with `safetensors.numpy`: no torch needed. The tokenizer is a real
CLIPTokenizer over a small byte-level BPE vocabulary learned from the
packaged concept lists.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any

import numpy as np
import safetensors.numpy

import convert
from scapre_jax import cache, models, outputs
from scapre_jax.config import TinyConfig

_DATA = pathlib.Path(__file__).parent / "data"
# Written into the configs as-is, so the files do not depend on what is
# installed.
_DIFFUSERS_VERSION = "0.39.0"
_TRANSFORMERS_VERSION = "4.57.6"
_NUM_MERGES = 300
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
# Prompt words that the edit templates use, next to the concept names.
_EXTRA_WORDS = "a photo of the an image painting picture in style by art"


@dataclasses.dataclass(frozen=True)
class TinyVariant:
  """Configs of one tiny model; `vocab_size` and token ids are filled in."""

  unet: dict[str, Any]
  vae: dict[str, Any]
  text_encoder: dict[str, Any]
  scheduler: dict[str, Any]
  pad_token: str
  # SDXL: the second text encoder (CLIPTextModelWithProjection) and the pad
  # token of its tokenizer; None for one-encoder models.
  text_encoder_2: dict[str, Any] | None = None
  pad_token_2: str | None = None
  pipeline: str = "StableDiffusionPipeline"
  # Std of the text encoder's token embeddings (position embeddings keep
  # 0.02). A larger one makes each row of the encoder's output mostly its own
  # word, as in a trained encoder, instead of a mix of position and biases
  # that every prompt shares.
  token_embedding_std: float = 0.02


_UNET_SD1 = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": _DIFFUSERS_VERSION,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [32, 64],
    "center_input_sample": False,
    "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 8,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": _DIFFUSERS_VERSION,
    "act_fn": "silu",
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 16,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
}
_TEXT_SD1 = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 32,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 32,
    "torch_dtype": "float32",
    "transformers_version": _TRANSFORMERS_VERSION,
}
_SCHEDULER = {
    "_diffusers_version": _DIFFUSERS_VERSION,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}

TINY_CONFIGS: dict[str, TinyVariant] = {
    # SD 1.x: 768-wide context -> 32 here, one head count for all blocks,
    # conv proj_in/proj_out, pad token <|endoftext|>.
    "sd1": TinyVariant(
        unet=_UNET_SD1,
        vae=_VAE,
        text_encoder=_TEXT_SD1,
        scheduler={"_class_name": "PNDMScheduler", **_SCHEDULER,
                   "skip_prk_steps": True},
        pad_token=_EOS,
    ),
    # SD 2.x: wider context (1024 -> 64 here), per-block head counts of
    # head width 8 (SD 2: 64), linear proj_in/proj_out, gelu text encoder,
    # pad token "!".
    "sd2": TinyVariant(
        unet={**_UNET_SD1, "attention_head_dim": [4, 8], "cross_attention_dim": 64,
              "use_linear_projection": True, "upcast_attention": False},
        vae=_VAE,
        text_encoder={**_TEXT_SD1, "hidden_act": "gelu", "hidden_size": 64,
                      "intermediate_size": 128, "projection_dim": 64},
        scheduler={"_class_name": "DDIMScheduler", **_SCHEDULER,
                   "prediction_type": "epsilon"},
        pad_token="!",
    ),
    # SD 1.x's real 768-wide context (the UNet blocks and the encoder's depth
    # stay tiny), with word-dominated text rows: the built-in model of
    # `scapre-jax erase`. In 32 dimensions a few dozen prompts already span
    # the space, so any erase moves every prompt; in 768, as in SD, an erase
    # can single out its concepts, and the summary shows it.
    "sd1-768": TinyVariant(
        unet={**_UNET_SD1, "cross_attention_dim": 768},
        vae=_VAE,
        text_encoder={**_TEXT_SD1, "hidden_size": 768, "intermediate_size": 64,
                      "projection_dim": 768},
        scheduler={"_class_name": "PNDMScheduler", **_SCHEDULER,
                   "skip_prk_steps": True},
        pad_token=_EOS,
        token_embedding_std=1.0,
    ),
    # SDXL: two text encoders whose penultimate hidden states are
    # concatenated (32 + 64 = 96 here; SDXL: 768 + 1280 = 2048), the second
    # with a projection whose pooled output (32; SDXL 1280) feeds the UNet's
    # "text_time" embedding with six micro-conditions (6 * 8; SDXL 6 * 256).
    # No attention in the first block and transformer depths 1, 1, 2 (SDXL:
    # 1, 2, 10), linear proj_in/proj_out; tokenizer_2 pads with "!".
    "sdxl": TinyVariant(
        unet={**_UNET_SD1,
              "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
              "addition_time_embed_dim": 8, "attention_head_dim": [2, 2, 4],
              "block_out_channels": [32, 32, 64], "cross_attention_dim": 96,
              "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                   "CrossAttnDownBlock2D"],
              "projection_class_embeddings_input_dim": 32 + 6 * 8,
              "transformer_layers_per_block": [1, 1, 2],
              "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
              "use_linear_projection": True},
        vae={**_VAE, "force_upcast": True, "scaling_factor": 0.13025},
        text_encoder=_TEXT_SD1,
        text_encoder_2={**_TEXT_SD1, "architectures": ["CLIPTextModelWithProjection"],
                        "hidden_act": "gelu", "hidden_size": 64,
                        "intermediate_size": 128, "projection_dim": 32},
        scheduler={"_class_name": "EulerDiscreteScheduler", **_SCHEDULER,
                   "interpolation_type": "linear", "prediction_type": "epsilon",
                   "timestep_spacing": "leading", "use_karras_sigmas": False},
        pad_token=_EOS,
        pad_token_2="!",
        pipeline="StableDiffusionXLPipeline",
    ),
}


def write_tiny_model(directory: str | os.PathLike, *, seed: int = 0,
                     variant: str = "sd1") -> pathlib.Path:
  """Writes a tiny diffusers Stable Diffusion folder at `directory`.

  Same seed and variant -> byte-identical files. Refuses a non-empty
  existing directory; builds in a temporary sibling and renames it into
  place, so a crash never leaves a half-written model.
  """
  if variant not in TINY_CONFIGS:
    raise ValueError(f"unknown variant {variant!r}; expected one of {tuple(TINY_CONFIGS)}")
  spec = TINY_CONFIGS[variant]
  target = pathlib.Path(directory)
  if target.exists() and (not target.is_dir() or any(target.iterdir())):
    raise ValueError(f"{target} exists and is not an empty directory")
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
  try:
    _write(tmp, spec, seed)
    outputs.normal_modes(tmp)  # mkdtemp and safetensors make private files
    os.replace(tmp, target)  # replaces an empty directory too
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return target


def run(config: TinyConfig) -> pathlib.Path:
  """`scapre-jax tiny`: writes the tiny model `config` names; returns its
  folder."""
  return write_tiny_model(config.out, seed=config.seed, variant=config.variant)


# The built-in model of `scapre-jax erase` and `generate` when no --model is
# given: tiny, random, with SD 1.x's 768-wide context.
DEFAULT_VARIANT = "sd1-768"


def default_model_dir() -> pathlib.Path:
  """Where the built-in tiny model lives: cache.cache_home() / "tiny-sd1-768"."""
  return cache.cache_home() / f"tiny-{DEFAULT_VARIANT}"


def ensure_tiny_model() -> pathlib.Path:
  """The built-in tiny model's folder, written on first use."""
  path = default_model_dir()
  if not (path / "model_index.json").exists():
    try:
      write_tiny_model(path, variant=DEFAULT_VARIANT)
    except (ValueError, OSError):
      if not (path / "model_index.json").exists():  # not a concurrent writer
        raise
  return path


def _write(root: pathlib.Path, spec: TinyVariant, seed: int) -> None:
  vocab, _ = _bpe_vocab()
  text = [("text_encoder", "tokenizer", spec.text_encoder, spec.pad_token)]
  if spec.text_encoder_2 is not None:
    text.append(("text_encoder_2", "tokenizer_2", spec.text_encoder_2, spec.pad_token_2))
  index = {
      "_class_name": spec.pipeline,
      "_diffusers_version": _DIFFUSERS_VERSION,
      "feature_extractor": [None, None],
      "scheduler": ["diffusers", spec.scheduler["_class_name"]],
      "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"],
  }
  if spec.text_encoder_2 is None:
    index.update(requires_safety_checker=False, safety_checker=[None, None])
  else:
    index.update(force_zeros_for_empty_prompt=True, image_encoder=[None, None])
  for part, tokenizer, config, _ in text:
    index[part] = ["transformers", config["architectures"][0]]
    index[tokenizer] = ["transformers", "CLIPTokenizer"]
  write_json_file(root / "model_index.json", index)
  parts = [("unet", spec.unet, "diffusion_pytorch_model.safetensors"),
           ("vae", spec.vae, "diffusion_pytorch_model.safetensors")]
  parts += [(part, {**config, "vocab_size": len(vocab), "bos_token_id": vocab[_BOS],
                    "eos_token_id": vocab[_EOS], "pad_token_id": vocab[pad]},
             "model.safetensors") for part, _, config, pad in text]
  for part, config, weights in parts:
    write_json_file(root / part / "config.json", config)
    safetensors.numpy.save_file(_torch_weights(part, config, seed, spec),
                                root / part / weights, metadata={"format": "pt"})
  write_json_file(root / "scheduler" / "scheduler_config.json", spec.scheduler)
  for _, tokenizer, _, pad in text:
    write_tokenizer(root / tokenizer, pad_token=pad)


def write_tokenizer(folder: pathlib.Path, *, pad_token: str = _EOS) -> dict[str, int]:
  """Writes the tiny CLIPTokenizer's files into `folder`; returns its vocab."""
  vocab, merges = _bpe_vocab()
  write_json_file(folder / "vocab.json", vocab)
  (folder / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
  special = {"bos_token": _BOS, "eos_token": _EOS, "pad_token": pad_token,
             "unk_token": _EOS}
  write_json_file(folder / "special_tokens_map.json", special)
  write_json_file(folder / "tokenizer_config.json", {
      **special, "add_prefix_space": False, "clean_up_tokenization_spaces": True,
      "do_lower_case": True, "errors": "replace", "model_max_length": 77,
      "tokenizer_class": "CLIPTokenizer"})
  return vocab


def _torch_weights(part: str, config: dict[str, Any], seed: int,
                   spec: TinyVariant) -> dict[str, np.ndarray]:
  """Random weights in PyTorch layout, drawn in the Flax model's shapes
  (`jax.eval_shape` of its init) and scaled like Flax's default inits.

  numpy draws them because XLA takes 15-30 s to compile the Flax init's
  truncated-normal draws on CPU, and numpy's PCG64 stream does not change
  with the JAX version. Biases and norm scales get noise (Flax would give 0
  and 1), so a misplaced bias or scale shows up in the parity tests.
  """
  rng = np.random.default_rng([seed, list(models.PARTS).index(part)])
  params = random_params(part, config, rng)
  if part.startswith("text_encoder"):
    embeddings = params["text_model"]["embeddings"]["token_embedding"]
    embeddings["embedding"] = embeddings["embedding"] * np.float32(
        spec.token_embedding_std / 0.02)
  return models.PARTS[part].layout.to_torch(params, models.abstract_params(part, config))


def random_params(part: str, config: dict[str, Any], rng: np.random.Generator, *,
                  other_std: float = 0.1) -> dict[str, Any]:
  """Random float32 Flax params of `part` (numpy arrays), drawn from `rng` in
  the order of the flattened abstract params (`random_tree`)."""
  return random_tree(models.abstract_params(part, config), rng, other_std=other_std)


def random_tree(abstract: dict[str, Any], rng: np.random.Generator, *,
                other_std: float = 0.1) -> dict[str, Any]:
  """Random float32 numpy leaves for the abstract param tree `abstract`,
  drawn from `rng` in flattened order: kernels N(0, 1/fan_in), embeddings
  N(0, 0.02^2), norm scales N(1, other_std^2), the rest N(0, other_std^2)."""
  flat = {}
  for path, spec in convert.flatten(abstract).items():
    leaf, shape = path.rsplit("/", 1)[-1], tuple(spec.shape)
    if leaf == "kernel":  # (..., d_in, d_out): lecun scale 1/sqrt(fan_in)
      std, mean = 1.0 / np.sqrt(np.prod(shape[:-1])), 0.0
    elif leaf == "embedding":
      std, mean = 0.02, 0.0
    else:
      std, mean = other_std, 1.0 if leaf == "scale" else 0.0
    flat[path] = (mean + std * rng.standard_normal(shape)).astype(np.float32)
  return convert.unflatten(flat)


def write_json_file(path: pathlib.Path, obj: Any) -> None:
  """Writes `obj` as sorted, indented JSON (parents made)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                  encoding="utf-8")


# -- tokenizer ----------------------------------------------------------------


def _byte_table() -> dict[int, str]:
  """One printable character per byte, in CLIP's (GPT-2's) vocab order: the
  printable Latin-1 bytes as themselves, then the rest shifted past U+0100."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  rest = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable},
          **{b: chr(256 + i) for i, b in enumerate(rest)}}


@functools.cache
def _bpe_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
  """(vocab, merges) of a CLIP-style BPE learned from the concept lists.

  Vocab order as in CLIP: bytes, bytes + '</w>', one token per merge,
  then <|startoftext|>, <|endoftext|>. Greedy BPE; ties go to the
  lexicographically smallest pair, so the result is deterministic.
  """
  by_byte = _byte_table()
  symbols = list(by_byte.values())
  concepts = json.loads((_DATA / "concept_lists.json").read_text(encoding="utf-8"))
  text = " ".join([_EXTRA_WORDS] + [c for names in concepts.values() for c in names])
  words = collections.Counter()
  for word in re.findall(r"[^\W\d_]+", text.lower()):
    pieces = [by_byte[b] for b in word.encode("utf-8")]
    words[tuple(pieces[:-1] + [pieces[-1] + "</w>"])] += 1
  merges = []
  for _ in range(_NUM_MERGES):
    pairs = collections.Counter()
    for word, count in words.items():
      for pair in zip(word, word[1:]):
        pairs[pair] += count
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))
    merges.append(best)
    words = collections.Counter({_merge(w, best): c for w, c in words.items()})
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
  tokens = list(dict.fromkeys(tokens)) + [_BOS, _EOS]
  return {t: i for i, t in enumerate(tokens)}, tuple(merges)


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
  out, i = [], 0
  while i < len(word):
    if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
      out.append(word[i] + word[i + 1])
      i += 2
    else:
      out.append(word[i])
      i += 1
  return tuple(out)
