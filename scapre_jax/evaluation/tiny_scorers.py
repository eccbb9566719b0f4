"""Deterministic tiny random-weight scorers in the real file layouts.

`write_tiny_clip` writes what `CLIPModel.save_pretrained` and
`CLIPProcessor.save_pretrained` produce (config.json, model.safetensors in
PyTorch names, the tokenizer files, preprocessor_config.json), with a
32-pixel vision tower and the tiny SD's BPE vocabulary, so both our
`ClipScorer` and transformers' PyTorch `CLIPModel` load it. Weights are
drawn in the Flax model's shapes and mapped by `convert/`: no torch needed.

`write_tiny_resnet` writes a torchvision-layout ResNet state dict (the key
names of `torchvision.models.resnet50().state_dict()`, batch-norm buffers
and `num_batches_tracked` included) as one safetensors file: bottleneck
blocks, 1000 classes, but narrow (widths 16 to 128) and shallow (depths
1, 2, 1, 1), so a test runs it in seconds. Same seed -> the same files.
"""

from __future__ import annotations

import functools
import os
import pathlib
import warnings

import jax
import numpy as np
import safetensors.numpy

import convert
from convert import resnet
from scapre_jax import outputs, tiny

with warnings.catch_warnings():
  warnings.filterwarnings("ignore", ".*classes are deprecated", FutureWarning)
  from transformers import CLIPConfig, FlaxCLIPModel, FlaxResNetForImageClassification
  from transformers import ResNetConfig

_CLIP_IMAGE_SIZE = 32


def tiny_clip_config(vocab: dict[str, int]) -> dict:
  tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
           "num_attention_heads": 4, "hidden_act": "quick_gelu"}
  return {
      "architectures": ["CLIPModel"],
      "model_type": "clip",
      "projection_dim": 16,
      "logit_scale_init_value": 2.6592,
      "text_config": {**tower, "vocab_size": len(vocab), "max_position_embeddings": 77,
                      "bos_token_id": vocab["<|startoftext|>"],
                      "eos_token_id": vocab["<|endoftext|>"],
                      "pad_token_id": vocab["<|endoftext|>"]},
      "vision_config": {**tower, "image_size": _CLIP_IMAGE_SIZE, "patch_size": 8},
  }


def clip_abstract_params(config: dict) -> dict:
  module = FlaxCLIPModel(CLIPConfig.from_dict(config), _do_init=False)
  return jax.eval_shape(functools.partial(module.init_weights, input_shape=module.input_shape),
                        jax.random.key(0))


def write_tiny_clip(directory: str | os.PathLike, *, seed: int = 0) -> pathlib.Path:
  """Writes a tiny transformers CLIP folder at `directory` (which must not
  exist), atomically."""
  target = pathlib.Path(directory)

  def build(root: pathlib.Path) -> None:
    vocab = tiny.write_tokenizer(root)
    config = tiny_clip_config(vocab)
    tiny.write_json_file(root / "config.json", config)
    expected = clip_abstract_params(config)
    params = tiny.random_tree(expected, np.random.default_rng([seed, 100]))
    safetensors.numpy.save_file(convert.CLIP.to_torch(params, expected),
                                root / "model.safetensors", metadata={"format": "pt"})
    size = _CLIP_IMAGE_SIZE
    tiny.write_json_file(root / "preprocessor_config.json", {
        "crop_size": {"height": size, "width": size}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
        "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": size}})

  outputs.atomic_dir(target, False, build)
  return target


TINY_RESNET = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [16, 32, 64, 128],
               "depths": [1, 2, 1, 1], "layer_type": "bottleneck", "hidden_act": "relu",
               "downsample_in_first_stage": False, "num_labels": 1000}


def resnet_abstract_variables(config: dict) -> dict:
  module = FlaxResNetForImageClassification(ResNetConfig(**config), _do_init=False)
  return jax.eval_shape(functools.partial(module.init_weights, input_shape=module.input_shape),
                        jax.random.key(0))


def write_tiny_resnet(path_or_dir: str | os.PathLike, *, seed: int = 0) -> pathlib.Path:
  """Writes the tiny torchvision-layout ResNet to `path_or_dir` (a
  `.safetensors` path, or a folder that gets `resnet50.safetensors`), which
  must not exist; returns the file's path."""
  target = pathlib.Path(path_or_dir)
  if target.suffix != ".safetensors":
    target = target / "resnet50.safetensors"
  expected = resnet_abstract_variables(TINY_RESNET)
  variables = tiny.random_tree(expected, np.random.default_rng([seed, 101]))
  # Running variances must be positive: 0.5 plus 5 |N(0, 0.1^2)|.
  for leaf_path, array in convert.flatten(variables["batch_stats"]).items():
    if leaf_path.endswith("/var"):
      array[...] = 0.5 + np.abs(array) * 5
  state = {}
  for name, array in resnet.to_torch(variables, expected).items():
    tv = resnet.transformers_to_torchvision(name)
    state[tv] = array
    if tv.endswith(".running_var"):
      state[tv.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.array(1000, np.int64)
  outputs.atomic_file(target, False, lambda tmp: safetensors.numpy.save_file(
      state, tmp, metadata={"format": "pt"}))
  return target
