"""The released `object_erase.py` classifier, ResNet-50, in JAX.

transformers' `FlaxResNetForImageClassification` on either
  - a torchvision/timm-layout state dict in one `.safetensors` file (the
    paper's `ResNet50_Weights.DEFAULT`, i.e. IMAGENET1K_V2, saved as
    safetensors; the network's depths and widths are read off its shapes),
    mapped to Flax without torch by `convert.resnet`; or
  - a transformers ResNet folder (`microsoft/resnet-50` layout: config.json
    and model.safetensors), local or already in the Hugging Face cache.
Images take torchvision's `ImageClassification` preset of those weights
(`pixels.torchvision_pixels`: shorter side 232, crop 224), whatever the
source, since that is what the released protocol measures with. `top1`
returns torchvision's ImageNet category text (`weights.meta["categories"]`,
shipped as `scapre_jax/data/imagenet_categories.txt`, taken from
torchvision 0.28.0's `torchvision/models/_meta.py`), which
`metrics.class_hit` compares with the CSV's class names.
"""

from __future__ import annotations

import functools
import json
import pathlib
import warnings

import jax
import numpy as np
import safetensors

from convert import resnet
from scapre_jax import models
from scapre_jax.evaluation import pixels
from scapre_jax.evaluation.files import locate

with warnings.catch_warnings():
  warnings.filterwarnings("ignore", ".*classes are deprecated", FutureWarning)
  from transformers import FlaxResNetForImageClassification, ResNetConfig

_CATEGORIES = pathlib.Path(__file__).parent.parent / "data" / "imagenet_categories.txt"
NUM_CLASSES = 1000
RESIZE, CROP = 232, 224  # ResNet50_Weights.IMAGENET1K_V2.transforms()


@functools.cache
def imagenet_categories() -> tuple[str, ...]:
  """torchvision's 1000 ImageNet category names, in class-index order."""
  names = tuple(_CATEGORIES.read_text(encoding="utf-8").splitlines())
  assert len(names) == NUM_CLASSES, _CATEGORIES
  return names


def _shapes(file: pathlib.Path) -> dict[str, tuple[int, ...]]:
  try:
    with safetensors.safe_open(file, framework="numpy") as f:
      return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
  except (safetensors.SafetensorError, OSError) as err:
    raise ValueError(f"cannot read {file} (corrupt or truncated safetensors?): {err}") from None


def _source(path) -> tuple[str, pathlib.Path, dict]:
  """("torchvision" | "transformers", weights file, ResNetConfig dict), or a
  ValueError naming the problem; reads only headers and config.json."""
  where = locate(path, "classifier")
  if where.is_file():
    if where.suffix != ".safetensors":
      raise ValueError(f"{where}: the classifier must be a .safetensors file (a "
                       "torchvision/timm resnet50 state dict) or a transformers ResNet folder")
    config = resnet.torchvision_config(_shapes(where))
    kind, file = "torchvision", where
  else:
    config_file, file = where / "config.json", where / "model.safetensors"
    if not config_file.is_file():
      kind_hint = " (a diffusers pipeline)" if (where / "model_index.json").is_file() else ""
      raise ValueError(f"{where} is not a ResNet classifier folder{kind_hint}: no config.json")
    try:
      config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
      raise ValueError(f"cannot parse {config_file}: {err}") from None
    if config.get("model_type") != "resnet":
      raise ValueError(f"{where} is not a ResNet classifier: its config.json says "
                       f"model_type={config.get('model_type')!r}, expected 'resnet'")
    if config.get("downsample_in_bottleneck"):
      raise ValueError(f"{where}: downsample_in_bottleneck=True is not implemented by "
                       "transformers' Flax ResNet")
    if not file.is_file():
      raise ValueError(f"{where} holds no model.safetensors")
    kind = "transformers"
  labels = config.get("num_labels", len(config.get("id2label", {})) or None)
  if labels != NUM_CLASSES:
    raise ValueError(f"{where}: a classifier over {labels} classes; the objects "
                     f"suite needs an ImageNet-1k one ({NUM_CLASSES} classes)")
  return kind, file, config


def check_classifier(path) -> None:
  """Raises ValueError naming the problem unless `path` is a ResNet
  classifier the loader reads (headers and config only)."""
  _source(path)


class ImageClassifier:
  """A loaded ImageNet classifier; build with `ImageClassifier.load`."""

  def __init__(self, module, variables, *, info: dict, batch_size: int = 32):
    self.module, self.variables = module, variables
    self.batch_size = batch_size
    self._info = info
    self._logits = jax.jit(lambda v, x: module(x, params=v, train=False).logits)

  @classmethod
  def load(cls, path, *, dtype: str = "float32", batch_size: int = 32) -> ImageClassifier:
    kind, file, config = _source(path)
    jdtype = models.jax_dtype(dtype)
    fields = {k: v for k, v in config.items() if k not in ("id2label", "label2id")}
    module = FlaxResNetForImageClassification(
        ResNetConfig(**{**fields, "num_labels": NUM_CLASSES}), dtype=jdtype, _do_init=False)
    expected = jax.eval_shape(
        functools.partial(module.init_weights, input_shape=module.input_shape),
        jax.random.key(0))
    state = models.read_safetensors(file)
    if kind == "torchvision":
      state = resnet.from_torchvision(state)
    variables = resnet.to_flax(state, expected)
    info = {"path": str(file if kind == "torchvision" else file.parent),
            "layout": kind, "fingerprint": models.fingerprint([file]), "dtype": dtype,
            "depths": list(config["depths"]), "hidden_sizes": list(config["hidden_sizes"]),
            "preprocessing": {"resize": RESIZE, "crop": CROP, "resample": "bilinear",
                              "mean": list(pixels.IMAGENET_MEAN),
                              "std": list(pixels.IMAGENET_STD)},
            "labels": "torchvision ImageNet categories"}
    return cls(module, models.cast(variables, jdtype), info=info, batch_size=batch_size)

  def pixels(self, images) -> np.ndarray:
    return pixels.torchvision_pixels(images, resize=RESIZE, crop=CROP)

  def logits(self, images) -> np.ndarray:
    """[N, 1000] logits of uint8 [N, H, W, 3] images."""
    return pixels.batched(self._logits, self.variables, self.pixels(images),
                          size=self.batch_size)

  def top1(self, images) -> list[str]:
    """Top-1 category text per image, as the released script reads it."""
    names = imagenet_categories()
    return [names[i] for i in np.argmax(self.logits(images), axis=-1)]

  def describe(self) -> dict:
    return {"scorer": "resnet", **self._info}
