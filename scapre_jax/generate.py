"""Before/after images of an edit: the original and the edited UNet, same seed.

Sampling is diffusers' `FlaxStableDiffusionPipeline` (SDXL:
`FlaxStableDiffusionXLPipeline`), built from our loaded modules and params
(no safety checker). Its denoising loop is jitted once per
model config, sampler, image size, step count and batch, and serves both
columns and later calls: the edited UNet is only other params in one tree.

Three layers: `render` (a loaded model's sampler, UNet params, prompts and
seeds -> uint8 images), `generate_grid` (a model folder and an edit file ->
the before/after grid) and `run(GenerateConfig)` (`scapre-jax generate`: the
grid with its labels, written as a PNG).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import math
import pathlib
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from scapre_jax import io, models, outputs, sharding, text, tiny
# GenerateConfig lives with the other settings, free of JAX, so the CLI
# checks its arguments before this module loads; re-exported here.
from scapre_jax.config import GenerateConfig, check_positive, prompt_list

with warnings.catch_warnings():
  warnings.filterwarnings("ignore", ".*classes are deprecated", FutureWarning)
  import diffusers
  from diffusers import FlaxStableDiffusionPipeline
  from diffusers import FlaxStableDiffusionXLPipeline
  from diffusers.pipelines.stable_diffusion import pipeline_flax_stable_diffusion

# Flax schedulers whose integer timesteps and step(state, eps, t, x) the
# pipeline's loop drives correctly. LMS and Euler keep float timesteps that
# the loop casts to int32 (their sigma lookup then misses), DDPM's step needs
# a key: those, and samplers with no Flax version, fall back to DDIM.
SCHEDULERS = ("DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler")
COLUMNS = ("before", "after")


def run(config: GenerateConfig) -> pathlib.Path:
  """Writes the labelled before/after grid of `config` as a PNG; returns its
  path. The output is checked before any sampling."""
  if config.model is None:
    model_path = tiny.ensure_tiny_model()
  elif pathlib.Path(config.model).expanduser().is_file():
    model_path = pathlib.Path(config.model).expanduser()
  else:
    model_path = models.resolve(config.model)
  protected = [model_path] + ([config.edit] if config.edit else [])
  # Checked now so a refusal comes before minutes of sampling, and again on
  # rename in case the file appeared meanwhile.
  outputs.check_output(config.out, config.overwrite, protected)
  grid = generate_grid(model_path, config.prompts, edit_file=config.edit,
                       steps=config.steps, seed=config.seed, guidance=config.guidance,
                       size=config.size, dtype=config.dtype, config=config.config,
                       tokenizer=config.tokenizer, prediction_type=config.prediction_type)
  columns = COLUMNS[:1 + (config.edit is not None)]
  size = grid.shape[0] // len(config.prompts)
  image, origin = label_grid(grid, config.prompts, columns)
  info = {"prompts": list(config.prompts), "columns": list(columns),
          "model": str(model_path), "edit": config.edit, "steps": config.steps,
          "seed": config.seed, "guidance": config.guidance, "size": size,
          "grid_origin": list(origin)}
  write_png(config.out, image, metadata={"scapre-jax": json.dumps(info)},
            overwrite=config.overwrite)
  return config.out


def generate_grid(model_path, prompts: Sequence[str], *, edit_file=None,
                  steps: int = 25, seed: int = 0, guidance: float = 7.5,
                  size: int | None = None, dtype: str = "float32",
                  batch_size: int = 4, config=None, tokenizer=None,
                  prediction_type: str | None = None) -> np.ndarray:
  """Renders each prompt with the original UNet and, given `edit_file`, with
  the edited one (its kernels swapped in), from the same initial noise.
  `config`, `tokenizer`, `prediction_type`: for a single-file model
  (`GenerateConfig`).

  Returns the grid (len(prompts) * size, n_columns * size, 3) uint8, without
  labels: one row per prompt, columns before[, after] (`render` of each).
  Raises ValueError on an edit made for another base model and on
  non-finite images.
  """
  prompts = prompt_list(prompts)
  check_positive("steps", steps)
  check_positive("batch_size", batch_size)
  # The edit file first: a wrong or corrupt file fails before the model loads.
  edit = io.read_edit_file(edit_file) if edit_file is not None else None
  model = models.load_model(model_path, dtype=dtype, config=config, tokenizer=tokenizer)
  # Refuses a family with no Flax pipeline.
  sampling = sampler(model, size=size, config=config, prediction_type=prediction_type)
  unet_variants = [model.unet_params]
  if edit is not None:
    kernels, meta = edit
    io.check_fingerprint(edit_file, meta, model.fingerprint, model.path, action="render")
    unet_variants.append(models.replace_kernels(model.unet_params, kernels))
  columns = [render(sampling, unet_params, prompts, seeds=seed, steps=steps,
                    guidance=guidance, batch_size=batch_size, label=column)
             for column, unet_params in zip(COLUMNS, unet_variants)]
  n, size = len(prompts), sampling.size
  # (column, row, y, x, rgb) -> (row * y, column * x, rgb)
  return np.stack(columns).transpose(1, 2, 0, 3, 4).reshape(
      n * size, len(columns) * size, 3)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """What `render` needs of a model besides the UNet params: the pipeline
  (its VAE, text encoder and scheduler modules), the VAE params and the
  image size. Build it with `sampler`."""

  model: models.LoadedModel
  pipe: Any  # FlaxStableDiffusionPipeline
  vae_params: dict[str, Any]
  vae_config: dict[str, Any]
  size: int


def sampler(model: models.LoadedModel, *, size: int | None = None, config=None,
            prediction_type: str | None = None) -> Sampler:
  """The `Sampler` of a loaded model, in its dtype; `size` (pixels)
  defaults to `unet sample_size * vae scale factor`. A single-file model's
  VAE and scheduler come from the file (`single_file.sampling_parts`, with
  its `config` folder and `prediction_type`)."""
  if model.family not in PIPELINES:
    raise ValueError(f"generate renders SD 1.x, SD 2.x and SDXL; {model.path} is "
                     f"{models.FAMILIES[model.family]}, which has no Flax pipeline")
  unet_config = model.unet_config
  if model.weights_format == "single-file":
    from scapre_jax import single_file
    parts = single_file.sampling_parts(model.path, config=config,
                                       prediction_type=prediction_type, dtype=model.dtype)
    vae_params, vae_config = parts.vae_params, parts.vae_config
    scheduler_config = parts.scheduler
    unet_config = {**unet_config, "sample_size": parts.sample_size}
  else:
    if prediction_type is not None:
      raise ValueError("--prediction-type applies to a single-file --model; a folder "
                       "has its scheduler config")
    # The module is dropped: the cached pipeline holds an equal one.
    _, vae_params, vae_config = load_vae(model.path, dtype=model.dtype)
    scheduler_config = read_scheduler_config(model.path)
  size = image_size(size, unet_config, vae_config)
  pipe = _pipeline(model.family, json.dumps(model.unet_config, sort_keys=True),
                   json.dumps(vae_config, sort_keys=True),
                   tuple(t.module.config.to_json_string() for t in model.text_encoders),
                   json.dumps(scheduler_config, sort_keys=True), model.dtype)
  return Sampler(model=model, pipe=pipe, vae_params=vae_params, vae_config=vae_config,
                 size=size)


def render(sampling: Sampler, unet_params, prompts: Sequence[str], *,
           seeds: int | Sequence[int] = 0, steps: int = 25, guidance: float = 7.5,
           batch_size: int = 4, label: str = "", mesh=None) -> np.ndarray:
  """Images (len(prompts), size, size, 3) uint8 of `prompts` with the UNet
  `unet_params` (the model's own, or edited ones of the same shapes).

  `seeds` an int: prompt i's initial noise comes from key
  `split(key(seeds), n)[i]`; a sequence: prompt i gets the noise a lone
  prompt gets from the int `seeds[i]` (`split(key(seeds[i]), 1)[0]`), so
  its image is `scapre-jax generate --seed seeds[i]`'s. Either way an
  image depends neither on the other prompts nor on `batch_size` (prompts
  per compiled call; the last batch is padded), up to float rounding (one
  uint8 level). With `mesh` (`sharding.sets_mesh()`), each batch, rounded
  up to a multiple of the devices, is split over them. Raises ValueError,
  naming the prompts (and `label`, e.g. "after"), if an image is not finite.
  """
  prompts = prompt_list(prompts)
  check_positive("steps", steps)
  check_positive("batch_size", batch_size)
  model, pipe, size = sampling.model, sampling.pipe, sampling.size
  n = len(prompts)
  if isinstance(seeds, int):
    keys = jax.random.split(jax.random.key(seeds), n)
  else:
    seeds = list(seeds)
    if len(seeds) != n or not all(isinstance(s, int) and 0 <= s < 2 ** 32 for s in seeds):
      raise ValueError(f"seeds must be one int or {n} ints in [0, 2**32 - 1], got {seeds!r}")
    keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s), 1)[0])(
        jnp.asarray(seeds, jnp.uint32))
  # SD: ids (n, L); SDXL: (n, 2, L), one row per tokenizer, as the pipeline's
  # prepare_inputs stacks them.
  ids, _ = text.tokenize_model(model, prompts)
  empty, _ = text.tokenize_model(model, [""])
  if model.family == "sdxl":
    # StableDiffusionXLPipeline's force_zeros_for_empty_prompt: the
    # unconditional branch is a zero context and zero pooled embedding,
    # which the Flax pipeline builds when it gets no negative ids.
    empty = None
  else:
    ids, empty = ids[:, 0], empty[:, 0]
  scale = 2 ** (len(sampling.vae_config["block_out_channels"]) - 1)
  latent_shape = (model.unet_config.get("in_channels", 4), size // scale, size // scale)
  latents = np.asarray(jax.vmap(
      lambda k: jax.random.normal(k, latent_shape, jnp.float32))(keys))

  batch = min(batch_size, 1 << (n - 1).bit_length())
  if mesh is not None:
    batch = -(-batch // mesh.size) * mesh.size
  padded = -(-n // batch) * batch
  ids = np.concatenate([ids, np.repeat(ids[:1], padded - n, axis=0)])
  latents = np.concatenate([latents, np.repeat(latents[:1], padded - n, axis=0)])
  if empty is not None:
    empty = np.repeat(empty, batch, axis=0)
  params = {"unet": unet_params, "vae": sampling.vae_params,
            "scheduler": pipe.scheduler.create_state(),
            **{t.part: t.params for t in model.text_encoders}}
  place = (lambda x: x) if mesh is None else (lambda x: sharding.shard_sets(x, mesh))
  images = np.concatenate([
      np.asarray(_render(pipe, params, *place((ids[i:i + batch], empty,
                                               latents[i:i + batch])),
                         float(guidance), steps=steps, size=size), np.float32)
      for i in range(0, padded, batch)])[:n]  # (n, size, size, 3) in [0, 1]
  bad = [p for p, image in zip(prompts, images) if not np.isfinite(image).all()]
  if bad:
    raise ValueError(
        f"the {label + ' ' if label else ''}image of {len(bad)} prompt(s) is not finite "
        f"(NaN or inf pixels; numerical overflow in {model.dtype}?): "
        f"{', '.join(map(repr, bad[:5]))}")
  return (images * 255).round().astype(np.uint8)


def label_grid(grid: np.ndarray, prompts: Sequence[str],
               columns: Sequence[str]) -> tuple[np.ndarray, tuple[int, int]]:
  """The grid (rows * size, len(columns) * size, 3) uint8 with a white
  header naming each column and a white margin giving each row's prompt
  (cut with "..." past four image widths). Returns (image, (x, y)): where
  the grid's top-left pixel lies in it; the grid's pixels are unchanged.
  Names wider than an image (a tiny model's) are staggered, and the image is
  then widened on the right, in white, to fit them."""
  grid = np.asarray(grid)
  rows, cols = len(prompts), len(columns)
  if grid.dtype != np.uint8 or grid.ndim != 3 or grid.shape[0] % max(rows, 1) or (
      grid.shape[1] != cols * (grid.shape[0] // max(rows, 1))):
    raise ValueError(f"expected a ({rows} * size, {cols} * size, 3) uint8 grid, got "
                     f"{grid.dtype} {grid.shape}")
  size = grid.shape[0] // rows
  font = ImageFont.load_default(size=max(10, size // 20))
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

  def width(s: str) -> int:
    return math.ceil(measure.textlength(s, font=font))

  limit = 4 * size
  labels = []
  for prompt in prompts:
    label = prompt
    while width(label) > limit and len(label) > 1:
      label = label[:-4].rstrip() + "..." if len(label) > 4 else label[:-1]
    labels.append(label)
  pad = max(2, size // 32)
  line = font.getbbox("Ag")[3] + 2 * pad
  x0 = max(width(s) for s in labels) + 2 * pad
  # Names wider than an image (a tiny model's) go on lines of their own.
  stagger = any(width(name) > size for name in columns)
  y0 = line * (cols if stagger else 1)
  right = max([grid.shape[1]] + [j * size + width(name) + pad
                                  for j, name in enumerate(columns)])
  image = Image.new("RGB", (x0 + right, y0 + grid.shape[0]), "white")
  image.paste(Image.fromarray(grid, "RGB"), (x0, y0))
  draw = ImageDraw.Draw(image)
  for j, name in enumerate(columns):
    x = x0 + j * size + (0 if stagger else (size - width(name)) // 2)
    draw.text((x, pad + (j * line if stagger else 0)), name, fill="black", font=font)
  for i, label in enumerate(labels):
    draw.text((pad, y0 + i * size + max(0, (size - line) // 2) + pad), label,
              fill="black", font=font)
  return np.asarray(image), (x0, y0)


def write_png(path, image: np.ndarray, *, metadata: dict[str, str] | None = None,
              overwrite: bool = False) -> pathlib.Path:
  """Writes an (H, W, 3) uint8 image as PNG, with `metadata` as text chunks,
  atomically (`outputs.atomic_file`: temp file in the same folder + rename,
  the mode a plain open() would give)."""
  path = pathlib.Path(path)
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
  info = PngImagePlugin.PngInfo()
  for key, value in (metadata or {}).items():
    info.add_text(key, value)
  # format="PNG": the temp name's suffix would not tell PIL.
  outputs.atomic_file(path, overwrite, lambda tmp: Image.fromarray(image, "RGB").save(
      tmp, format="PNG", pnginfo=info))
  return path


# -- loading --------------------------------------------------------------------


def load_vae(root, *, dtype: str = "float32") -> tuple[Any, dict[str, Any], dict[str, Any]]:
  """(FlaxAutoencoderKL, params cast to `dtype`, config dict) of the `vae/`
  folder of a diffusers model."""
  return models.load_part(root, "vae", dtype=dtype)


def read_scheduler_config(root) -> dict[str, Any]:
  """The model's `scheduler/scheduler_config.json` as a dict."""
  path = models.resolve(root) / "scheduler" / "scheduler_config.json"
  if not path.is_file():
    raise ValueError(f"{path.parent.parent} has no scheduler/scheduler_config.json")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as err:
    raise ValueError(f"cannot parse {path}: {err}") from None


def make_scheduler(config: dict[str, Any]):
  """The Flax scheduler named by `config["_class_name"]` ("PNDMScheduler" ->
  FlaxPNDMScheduler), float32; unsupported ones become FlaxDDIMScheduler with
  a warning."""
  name = config.get("_class_name", "")
  if name in SCHEDULERS:
    return getattr(diffusers, "Flax" + name).from_config(config)
  warnings.warn(f"no supported Flax version of scheduler {name or '(unnamed)'}; "
                f"sampling with FlaxDDIMScheduler (supported: {', '.join(SCHEDULERS)})",
                UserWarning, stacklevel=2)
  # Only the settings DDIM has: the others belong to the replaced sampler.
  known = inspect.signature(diffusers.FlaxDDIMScheduler.__init__).parameters
  return diffusers.FlaxDDIMScheduler.from_config(
      {k: v for k, v in config.items() if k in known})


# The Flax pipeline of each family generate renders.
PIPELINES = {"sd1": "FlaxStableDiffusionPipeline", "sd2": "FlaxStableDiffusionPipeline",
             "sdxl": "FlaxStableDiffusionXLPipeline"}


@functools.lru_cache(maxsize=4)
def _pipeline(family: str, unet_json: str, vae_json: str, text_json: tuple[str, ...],
              scheduler_json: str, dtype: str):
  """The pipeline of these configs (JSON strings, so they hash; one per text
  encoder). Equal configs give the same object, which `_render` takes as its
  static key."""
  common = dict(vae=models.build("vae", json.loads(vae_json), dtype=dtype),
                unet=models.build("unet", json.loads(unet_json), dtype=dtype),
                scheduler=make_scheduler(json.loads(scheduler_json)),
                dtype=models.jax_dtype(dtype))
  encoders = [models.build(part, json.loads(config), dtype=dtype)
              for part, config in zip(models.TEXT_PARTS, text_json)]
  # We tokenize; the loop then bakes in no tokenizer.
  if family == "sdxl":
    return FlaxStableDiffusionXLPipeline(
        text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=None,
        tokenizer_2=None, **common)
  with _quiet(pipeline_flax_stable_diffusion.__name__):
    return FlaxStableDiffusionPipeline(
        text_encoder=encoders[0], tokenizer=None, safety_checker=None,
        feature_extractor=None, **common)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("steps", "size"))
def _render(pipe, params, prompt_ids, empty_ids, latents, guidance, *, steps, size):
  """Images (B, size, size, 3) in [0, 1] of prompt ids (B, L) (SDXL: (B, 2, L))
  from initial noise `latents` (B, C, h, w), classifier-free guided towards
  "" ids (B, L), or for SDXL (`empty_ids` None) towards a zero context."""
  # `_generate` is the pipeline's whole sampler; its public __call__ either
  # pmaps over every device or runs eagerly (and then broadcasts a float
  # guidance scale wrongly), so it is jitted here instead.
  return pipe._generate(prompt_ids, params, None, steps, size, size, guidance,
                        latents, empty_ids)


@contextlib.contextmanager
def _quiet(logger_name: str):
  # The pipeline warns that safety_checker=None; comparing an edit's effect
  # on the network is the use that warning allows, and it would print on
  # every model.
  logger = logging.getLogger(logger_name)
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


# -- sizes ----------------------------------------------------------------------


def image_size(size, unet_config: dict, vae_config: dict) -> int:
  """Image side in pixels: a multiple of 8 (the pipeline's demand) whose
  latent the UNet can halve at each of its down blocks."""
  scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
  halvings = 2 ** (len(unet_config.get("block_out_channels", (0,) * 4)) - 1)
  unit = math.lcm(8, scale * halvings)
  if size is None:
    size = unet_config.get("sample_size", 64) * scale
  if not isinstance(size, int) or size < unit or size % unit:
    raise ValueError(f"image size must be a positive multiple of {unit} for this "
                     f"model (VAE scale {scale}, {halvings}x UNet downsampling), "
                     f"got {size!r}")
  return size
