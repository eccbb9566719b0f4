"""Before/after images of an edit: the original and the edited UNet, same seed.

Sampling is diffusers' `FlaxStableDiffusionPipeline` (SDXL:
`FlaxStableDiffusionXLPipeline`), built from our loaded modules and params
(no safety checker). Its denoising loop is jitted once per
model config, sampler, image size, step count and batch, and serves both
columns and later calls: the edited UNet is only other params in one tree.
"""

from __future__ import annotations

import contextlib
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
from PIL import Image
from PIL import PngImagePlugin

# models first: importing it installs the filter on diffusers' log handler
# that drops the Flax deprecation lines.
from scapre_jax import io, models, outputs, text

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


def generate_grid(model_path, prompts: Sequence[str], *, edit_file=None,
                  steps: int = 25, seed: int = 0, guidance: float = 7.5,
                  size: int | None = None, dtype: str = "float32",
                  batch_size: int = 4) -> np.ndarray:
  """Renders each prompt with the original UNet and, given `edit_file`, with
  the edited one (its kernels swapped in), from the same initial noise.

  Returns the grid (len(prompts) * size, n_columns * size, 3) uint8: one row
  per prompt, columns before[, after]. Prompt i's noise comes from key
  `split(key(seed), n)[i]`, so an image depends neither on the other prompts
  nor on `batch_size` (prompts per compiled call; the last batch is padded),
  up to float rounding (one uint8 level).
  `size` defaults to `unet sample_size * vae scale factor`. Raises ValueError
  on an edit made for another base model and on non-finite images.
  """
  prompts = _prompts(prompts)
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps must be a positive int, got {steps!r}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  # The edit file first: a wrong or corrupt file fails before the model loads.
  edit = io.read_edit_file(edit_file) if edit_file is not None else None
  model = models.load_model(model_path, dtype=dtype)
  if model.family not in PIPELINES:
    raise ValueError(f"generate renders SD 1.x, SD 2.x and SDXL; {model.path} is "
                     f"{models.FAMILIES[model.family]}, which has no Flax pipeline")
  unet_variants = [model.unet_params]
  if edit is not None:
    kernels, meta = edit
    _check_fingerprint(edit_file, meta, model)
    unet_variants.append(models.replace_kernels(model.unet_params, kernels))
  # The module is dropped: the cached pipeline holds an equal one.
  _, vae_params, vae_config = load_vae(model.path, dtype=dtype)
  scheduler_config = read_scheduler_config(model.path)
  size = _image_size(size, model.unet_config, vae_config)
  pipe = _pipeline(model.family, json.dumps(model.unet_config, sort_keys=True),
                   json.dumps(vae_config, sort_keys=True),
                   tuple(t.module.config.to_json_string() for t in model.text_encoders),
                   json.dumps(scheduler_config, sort_keys=True), dtype)

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
  scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
  latent_shape = (model.unet_config.get("in_channels", 4), size // scale, size // scale)
  keys = jax.random.split(jax.random.key(seed), len(prompts))
  latents = np.asarray(jax.vmap(
      lambda k: jax.random.normal(k, latent_shape, jnp.float32))(keys))

  n = len(prompts)
  batch = min(batch_size, 1 << (n - 1).bit_length())
  padded = -(-n // batch) * batch
  ids = np.concatenate([ids, np.repeat(ids[:1], padded - n, axis=0)])
  latents = np.concatenate([latents, np.repeat(latents[:1], padded - n, axis=0)])
  if empty is not None:
    empty = np.repeat(empty, batch, axis=0)

  columns = []
  for column, unet_params in zip(COLUMNS, unet_variants):
    params = {"unet": unet_params, "vae": vae_params,
              "scheduler": pipe.scheduler.create_state(),
              **{t.part: t.params for t in model.text_encoders}}
    images = np.concatenate([
        np.asarray(_render(pipe, params, ids[i:i + batch], empty,
                           latents[i:i + batch], float(guidance),
                           steps=steps, size=size), np.float32)
        for i in range(0, padded, batch)])[:n]  # (n, size, size, 3) in [0, 1]
    bad = [p for p, image in zip(prompts, images) if not np.isfinite(image).all()]
    if bad:
      raise ValueError(
          f"the {column} image of {len(bad)} prompt(s) is not finite (NaN or inf "
          f"pixels; numerical overflow in {dtype}?): {', '.join(map(repr, bad[:5]))}")
    columns.append(images)
  # (column, row, y, x, rgb) -> (row * y, column * x, rgb)
  grid = np.stack(columns).transpose(1, 2, 0, 3, 4).reshape(
      n * size, len(columns) * size, 3)
  return (grid * 255).round().astype(np.uint8)


def run_cli(args) -> pathlib.Path:
  """`scapre-jax generate`: writes the before/after grid of `args.prompts`
  (';'-separated) as the PNG `args.out` and returns its path."""
  out = pathlib.Path(args.out)
  if out.suffix.lower() != ".png":
    raise ValueError(f"--out {out} must name a .png file")
  prompts = [p.strip() for p in args.prompts.split(";") if p.strip()]
  if args.model is None:
    from scapre_jax import erase
    model_path = erase.ensure_tiny_model()
  else:
    model_path = models.resolve(args.model)
  protected = [model_path] + ([args.edit] if args.edit else [])
  # Checked now so a refusal comes before minutes of sampling, and again on
  # rename in case the file appeared meanwhile.
  io.check_output_path(out, overwrite=args.overwrite, protected=protected)
  grid = generate_grid(model_path, prompts, edit_file=args.edit, steps=args.steps,
                       seed=args.seed, guidance=args.guidance, size=args.size)
  info = {"prompts": prompts, "columns": list(COLUMNS[:1 + (args.edit is not None)]),
          "model": str(model_path), "edit": args.edit, "steps": args.steps,
          "seed": args.seed, "guidance": args.guidance, "size": grid.shape[0] // len(prompts)}
  write_png(out, grid, metadata={"scapre-jax": json.dumps(info)}, overwrite=args.overwrite)
  return out


def write_png(path, image: np.ndarray, *, metadata: dict[str, str] | None = None,
              overwrite: bool = False) -> pathlib.Path:
  """Writes an (H, W, 3) uint8 image as PNG, with `metadata` as text chunks,
  atomically (temp file in the same folder + rename)."""
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


# -- checks ---------------------------------------------------------------------


def _prompts(prompts) -> list[str]:
  if isinstance(prompts, str):
    raise ValueError("prompts must be a sequence of strings, got one string")
  prompts = list(prompts)
  if not prompts:
    raise ValueError("no prompts given")
  for i, p in enumerate(prompts):
    if not isinstance(p, str):
      raise ValueError(f"prompt {i} is not a string: {p!r}")
  return prompts


def _check_fingerprint(edit_file, meta: dict, model) -> None:
  expected = meta.get("base_fingerprint")
  if not expected:
    raise ValueError(f"edit file {edit_file} records no base_fingerprint")
  if expected != model.fingerprint:
    raise ValueError(
        f"edit file {edit_file} was made for the base model with UNet fingerprint "
        f"{expected}, but {model.path} has fingerprint {model.fingerprint}; "
        "refusing to render it")


def _image_size(size, unet_config: dict, vae_config: dict) -> int:
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
