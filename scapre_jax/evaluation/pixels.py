"""Scorer preprocessing: uint8 RGB images -> normalized float32 NCHW pixels.

Two originals, each followed step by step (PIL does the resizing in both,
as it does when the released scripts pass PIL images):

  `clip_pixels`    transformers' `CLIPImageProcessor`: shorter side to
                   `size` (bicubic), center crop with offsets rounded down,
                   x * (1/255) in float64 then float32, (x - mean) / std.
  `torchvision_pixels`  torchvision's `ImageClassification` preset on a PIL
                   image (what `ResNet50_Weights.DEFAULT.transforms()` is):
                   shorter side to `resize` (bilinear, antialiased), center
                   crop with offsets rounded half to even, x / 255 in
                   float32, (x - mean) / std.

Both resize the longer side to int(size * long / short) and leave an image
whose shorter side already has the size as it is. `batched` runs a scorer's
compiled function over fixed-size batches.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_images(images) -> np.ndarray:
  """`images` as a uint8 [N, H, W, 3] array, or a ValueError naming the
  problem."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be uint8 [N, H, W, 3] (RGB), got "
                     f"{images.dtype} {list(images.shape)}")
  return images


def resized_size(height: int, width: int, shorter: int) -> tuple[int, int]:
  """(height, width) with the shorter side `shorter` (torchvision's rule,
  which transformers replicates)."""
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(shorter * long / short)
  return (new_long, shorter) if width <= height else (shorter, new_long)


def _resize(image: np.ndarray, shorter: int, resample) -> np.ndarray:
  height, width = resized_size(*image.shape[:2], shorter)
  if (height, width) == image.shape[:2]:
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def _crop(image: np.ndarray, size: int, offset) -> np.ndarray:
  height, width = image.shape[:2]
  if height < size or width < size:
    raise ValueError(f"image {height}x{width} is smaller than the {size} crop")
  top, left = offset(height - size), offset(width - size)
  return image[top:top + size, left:left + size]


def clip_pixels(images, *, size: int = 224, crop: int = 224, mean=CLIP_MEAN,
                std=CLIP_STD) -> np.ndarray:
  """CLIPImageProcessor's pixel_values for uint8 [N, H, W, 3]: [N, 3, crop, crop]."""
  out = []
  for image in check_images(images):
    image = _crop(_resize(image, size, Image.BICUBIC), crop, lambda d: d // 2)
    x = (image.astype(np.float64) * (1 / 255)).astype(np.float32)
    out.append((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
  return np.stack(out).transpose(0, 3, 1, 2)


def torchvision_pixels(images, *, resize: int = 232, crop: int = 224,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
  """torchvision ImageClassification's tensor for uint8 [N, H, W, 3]:
  [N, 3, crop, crop]."""
  out = []
  for image in check_images(images):
    image = _crop(_resize(image, resize, Image.BILINEAR), crop,
                  lambda d: int(round(d / 2.0)))
    x = image.astype(np.float32) / np.float32(255)
    out.append((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
  return np.stack(out).transpose(0, 3, 1, 2)


def batched(fn, params, *arrays, size: int) -> np.ndarray:
  """`fn(params, *chunks)` over batches of `size` rows (the last padded with
  copies of its last row, the padding dropped from the result), so one
  compiled shape serves any number of inputs."""
  out = []
  for start in range(0, len(arrays[0]), size):
    chunk = [a[start:start + size] for a in arrays]
    pad = size - len(chunk[0])
    if pad:
      chunk = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) for c in chunk]
    out.append(np.asarray(fn(params, *chunk))[:size - pad])
  return np.concatenate(out)
