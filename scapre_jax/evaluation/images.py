"""Images of the base and the edited models, made once and kept on disk.

`Renderer` loads the model once and renders (prompt, seed) rows with any
UNet param tree (the base one or an edit's), batched, sharded over the local
devices, through `scapre_jax.generate`'s compiled sampler: row i's initial
noise comes from its own seed exactly as `scapre-jax generate --seed S`
draws it for one prompt, so a base image equals that command's.

`ImageCache` keeps every image as a PNG under a content key (model
fingerprints, edit content, prompt, seed, sampler settings): an interrupted
eval resumes where it stopped, and a rerun with the same settings renders
nothing.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from PIL import Image

from scapre_jax import generate, models, sharding


class ImageCache:
  """PNG images under `folder/<key[:2]>/<key>.png`, written atomically."""

  def __init__(self, folder):
    self.folder = pathlib.Path(folder)

  def path(self, key: str) -> pathlib.Path:
    return self.folder / key[:2] / f"{key}.png"

  def has(self, key: str) -> bool:
    """Whether a complete PNG is stored under `key` (writes are atomic, so
    only a file damaged since fails this)."""
    try:
      with open(self.path(key), "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
      return False

  def get(self, key: str) -> np.ndarray | None:
    path = self.path(key)
    if not path.is_file():
      return None
    try:
      with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
    except (OSError, ValueError):
      return None  # a damaged file is rendered again

  def put(self, key: str, image: np.ndarray) -> None:
    generate.write_png(self.path(key), image, overwrite=True)


def content_key(context: Mapping, prompt: str, seed: int) -> str:
  """sha256 of everything an image depends on: `context` (model, edit,
  sampler settings) and its prompt and seed."""
  text = json.dumps({"context": context, "prompt": prompt, "seed": int(seed)},
                    sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


def edit_digest(kernels: Mapping[str, np.ndarray]) -> str:
  """sha256 of an edit's tensors (names, dtypes, shapes, bytes): the same
  weights give the same key whatever else the file's header holds."""
  digest = hashlib.sha256()
  for name in sorted(kernels):
    array = np.ascontiguousarray(kernels[name])
    digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def model_context(model_path, *, steps: int, guidance: float, size: int,
                  dtype: str) -> dict:
  """What a base image depends on besides prompt and seed: every network's
  weights (by fingerprint), the scheduler config and the sampler settings."""
  parts = {part: models.fingerprint(models.weight_files(model_path, part)[1])
           for part in ("unet", "vae", "text_encoder")}
  return {"weights": parts, "scheduler": generate.read_scheduler_config(model_path),
          "steps": int(steps), "guidance": float(guidance), "size": int(size),
          "dtype": dtype}


class Renderer:
  """The model and its compiled sampler (`generate.sampler`), loaded once.

  `render(unet_params, prompts, seeds)` -> uint8 images (N, size, size, 3)
  through `generate.render`, row i with the noise of its own seed. Rows go
  through in batches of `batch` (rounded up to a multiple of the local
  device count and sharded over the devices; the last batch is padded), so
  the sampler compiles once for every edit.
  """

  def __init__(self, model_path, *, steps: int, guidance: float, size: int | None,
               batch: int, dtype: str = "float32"):
    self.model = models.load_model(model_path, dtype=dtype)
    if self.model.family not in ("sd1", "sd2"):
      raise ValueError(f"eval renders SD 1.x and 2.x models; {self.model.path} is "
                       f"{self.model.family}")
    self.sampling = generate.sampler(self.model, size=size)
    self.size = self.sampling.size
    self.steps, self.guidance = steps, float(guidance)
    devices = len(jax.local_devices())
    self.batch = -(-batch // devices) * devices
    self.mesh = sharding.sets_mesh() if devices > 1 else None

  @property
  def base_params(self):
    return self.model.unet_params

  def edited_params(self, kernels: Mapping[str, np.ndarray]):
    return models.replace_kernels(self.model.unet_params, kernels)

  def render(self, unet_params, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
    return generate.render(self.sampling, unet_params, list(prompts),
                           seeds=[int(s) for s in seeds], steps=self.steps,
                           guidance=self.guidance, batch_size=self.batch, mesh=self.mesh)


def image_size(model_path, size: int | None) -> int:
  """The image side an eval renders: `size`, checked against the model, or
  the model's default; read from the configs alone."""
  return generate.image_size(size, models.read_config(model_path, "unet"),
                             models.read_config(model_path, "vae"))
