"""CLIP as the released `artist_erasure.py` uses it, in JAX.

transformers' `FlaxCLIPModel` on the weights of a transformers CLIP folder
(`openai/clip-vit-base-patch32` for the paper's numbers, ViT-L/14 for
SPEED's): `model.safetensors` mapped to Flax without torch
(`convert.CLIP`), or `flax_model.msgpack`. The folder's tokenizer and
`preprocessor_config.json` are read as `CLIPProcessor.from_pretrained`
reads them; images go through `pixels.clip_pixels` (CLIPImageProcessor's
steps). A local folder or an id already in the Hugging Face cache; never
downloads.

`cosine(images, texts)` is the cosine of `get_image_features` and
`get_text_features` for each image-prompt pair, the released similarity.
Prompts are padded to the tokenizer's 77 tokens (the causal mask and the
pooled end-of-text token make padding inert) and cut there, where the
released script would fail on longer prompts. `zero_shot` picks, per image,
the class whose prompt (`template`) has the highest cosine (UCE's and MACE's
CLIP classification); CLIP's logit scale does not change the argmax.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import pathlib
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import convert
from scapre_jax import models
from scapre_jax.evaluation import pixels
from scapre_jax.evaluation.files import locate_folder

with warnings.catch_warnings():
  warnings.filterwarnings("ignore", ".*classes are deprecated", FutureWarning)
  from transformers import CLIPConfig, CLIPTokenizer, FlaxCLIPModel

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "flax_model.msgpack",
            "model.fp16.safetensors")
_TOKENIZER = ("vocab.json", "merges.txt")


def _root(path_or_id) -> pathlib.Path:
  return locate_folder(path_or_id, "CLIP model")


def check_clip(path_or_id) -> None:
  """Raises ValueError naming the problem unless `path_or_id` is a
  transformers CLIP folder with weights and a tokenizer. Reads only
  config.json and lists the folder."""
  root = _root(path_or_id)
  config = root / "config.json"
  if not config.is_file():
    kind = " (a diffusers pipeline)" if (root / "model_index.json").is_file() else ""
    raise ValueError(f"{root} is not a CLIP model folder{kind}: no config.json")
  try:
    model_type = json.loads(config.read_text()).get("model_type")
  except (json.JSONDecodeError, AttributeError) as err:
    raise ValueError(f"cannot parse {config}: {err}") from None
  if model_type != "clip":
    raise ValueError(f"{root} is not a CLIP model (image and text towers): its "
                     f"config.json says model_type={model_type!r}, expected 'clip'")
  if not any((root / n).is_file() for n in _WEIGHTS):
    only_bin = " (only pickled pytorch_model.bin: save it as safetensors)" if (
        root / "pytorch_model.bin").is_file() else ""
    raise ValueError(f"{root} holds no CLIP weights{only_bin}: expected one of "
                     f"{', '.join(_WEIGHTS)}")
  missing = [n for n in _TOKENIZER if not (root / n).is_file()]
  if missing:
    raise ValueError(f"{root} has no CLIP tokenizer: missing {', '.join(missing)}")


def _preprocessing(root: pathlib.Path, image_size: int) -> dict:
  """CLIPImageProcessor's settings from the folder, CLIP's defaults else."""
  path = root / "preprocessor_config.json"
  settings = json.loads(path.read_text()) if path.is_file() else {}
  size = settings.get("size", image_size)
  crop = settings.get("crop_size", image_size)
  size = size.get("shortest_edge", image_size) if isinstance(size, dict) else size
  crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
  return {"size": int(size), "crop": int(crop),
          "mean": tuple(settings.get("image_mean", pixels.CLIP_MEAN)),
          "std": tuple(settings.get("image_std", pixels.CLIP_STD))}


class ClipScorer:
  """A loaded CLIP; see the module docstring. Build with `ClipScorer.load`."""

  def __init__(self, module, params, tokenizer, preprocessing: dict, *, info: dict,
               batch_size: int = 32):
    self.module, self.params, self.tokenizer = module, params, tokenizer
    self.preprocessing = preprocessing
    self.batch_size = batch_size
    self._info = info
    self._image = jax.jit(lambda p, x: _unit(module.get_image_features(x, params=p)))
    self._text = jax.jit(lambda p, ids, mask: _unit(
        module.get_text_features(ids, attention_mask=mask, params=p)))

  @classmethod
  def load(cls, path_or_id, *, dtype: str = "float32", batch_size: int = 32) -> ClipScorer:
    check_clip(path_or_id)
    root = _root(path_or_id)
    config = CLIPConfig.from_pretrained(root, local_files_only=True)
    jdtype = models.jax_dtype(dtype)
    module = FlaxCLIPModel(config, dtype=jdtype, _do_init=False)
    expected = jax.eval_shape(
        functools.partial(module.init_weights, input_shape=module.input_shape),
        jax.random.key(0))
    params, fmt, files = models.read_folder_weights(root, convert.CLIP, expected)
    tokenizer = CLIPTokenizer.from_pretrained(root, local_files_only=True)
    info = {"path": str(root), "weights_format": fmt,
            "fingerprint": models.fingerprint(files), "dtype": dtype,
            "image_size": config.vision_config.image_size,
            "patch_size": config.vision_config.patch_size,
            "transformers_version": importlib.metadata.version("transformers")}
    return cls(module, models.cast(params, jdtype), tokenizer,
               _preprocessing(root, config.vision_config.image_size), info=info,
               batch_size=batch_size)

  def pixels(self, images) -> np.ndarray:
    """CLIPImageProcessor's pixel_values for uint8 [N, H, W, 3] images."""
    return pixels.clip_pixels(images, **self.preprocessing)

  def image_features(self, images) -> np.ndarray:
    """Unit-norm image embeddings [N, D]."""
    return pixels.batched(self._image, self.params, self.pixels(images),
                          size=self.batch_size)

  def text_features(self, texts: Sequence[str]) -> np.ndarray:
    """Unit-norm text embeddings [N, D]."""
    if isinstance(texts, str) or not len(texts):
      raise ValueError("texts must be a non-empty list of prompts")
    tokens = self.tokenizer(list(texts), padding="max_length", truncation=True,
                            max_length=self.tokenizer.model_max_length, return_tensors="np")
    return pixels.batched(self._text, self.params, tokens["input_ids"],
                          tokens["attention_mask"], size=self.batch_size)

  def cosine(self, images, texts: Sequence[str]) -> np.ndarray:
    """Per pair, cos(image i, text i): float64 [N]."""
    images = pixels.check_images(images)
    if len(texts) != len(images):
      raise ValueError(f"{len(images)} images but {len(texts)} prompts")
    return np.sum(self.image_features(images).astype(np.float64)
                  * self.text_features(texts).astype(np.float64), axis=-1)

  def zero_shot(self, images, class_names: Sequence[str],
                template: str = "a photo of a {}.") -> np.ndarray:
    """Per image, the index of the class whose prompt is closest: int [N]."""
    if not len(class_names):
      raise ValueError("zero_shot needs at least one class name")
    texts = self.text_features([template.format(c) for c in class_names])
    return np.argmax(self.image_features(images) @ texts.T, axis=-1)

  def describe(self) -> dict:
    return {"scorer": "clip", **self._info, "preprocessing": dict(self.preprocessing),
            "text_max_length": int(self.tokenizer.model_max_length)}


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)
