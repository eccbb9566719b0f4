"""Settings, as frozen dataclasses: the edit's (`EditConfig`, named presets)
and those of the subcommands that take no edit settings (`TinyConfig`,
`ApplyConfig`, `InspectConfig`, `VerifyConfig`, `GenerateConfig`).

Every EditConfig field maps to a setting of docs/algorithm.md; the comments
name the symbol used there. The config is hashable, so jitted functions take
it as a static argument: two calls with equal configs share one compiled
program.

Pure Python, no JAX: the command line builds a subcommand's config from its
arguments, so a bad argument fails in the CLI's words before any model code
loads, and the subcommand's module runs it (`tiny.run`, `io.apply`,
`inspection.run`, `verify.run`, `generate.run`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import typing
from typing import Literal

Method = Literal["scapre", "scapre-small", "uce"]
Technique = Literal["replace", "tensor"]
MIMode = Literal["released", "canonical"]
TokenRows = Literal["aligned", "last"]

# Upper bounds of the settings (validate; lower ones: > 0 or >= 0). Where
# the float32 solve is sound on SD-shaped systems: the Gram matrix's
# condition grows like erase_scale ||S|| / lamb, and past erase_scale ~1e3
# its Cholesky breaks down (non-finite weights, refused); past lamb ~1e20
# the squares overflow and the edit came out as zeros. The released
# scripts use lamb 0.5, erase_scale 1-3. bures_iters: the fixed point
# settles in a few steps (released: 1). Every float must be finite.
UPPER_BOUNDS: dict[str, float] = {
    "lamb": 1e4, "erase_scale": 100.0, "preserve_scale": 100.0,
    "residual_scale": 100.0, "mi_temperature": 1e4, "spectral_temperature": 1e4,
    "p": 100.0, "spectral_power": 100.0, "noise_sigma": 10.0,
}
MAX_BURES_ITERS = 1000

METHODS: tuple[str, ...] = ("scapre", "scapre-small", "uce")
TECHNIQUES: tuple[str, ...] = ("replace", "tensor")
MI_MODES: tuple[str, ...] = ("released", "canonical")
TOKEN_ROWS: tuple[str, ...] = ("aligned", "last")


# Not type-checked under pytest (jaxtyping's import hook): __post_init__
# validates every field with an error in the user's words, which a type
# checker's TypeCheckError would pre-empt.
@typing.no_type_check
@dataclasses.dataclass(frozen=True)
class EditConfig:
  """Settings of one edit.

  `method` picks the solver: "scapre" (large-scale: Sylvester solve + Bures
  step, docs/algorithm.md "Large-scale solver"), "scapre-small" (erase.py solve
  with entropy rollback) or "uce" (the baseline). `token_rows`,
  `guide_templates` and `preserve_empty` are text-side choices that
  `text.build_concept_inputs` honours (docs/algorithm.md "Text side"): a
  method is one solver plus a choice of token rows.
  """

  method: Method = "scapre"
  lamb: float = 0.5  # lambda: pull towards the original weights
  erase_scale: float = 2.0  # eta
  # gamma for preserve terms; None = max(0.1, 1 / (1 + number of preserve
  # prompts)), the UCE default.
  preserve_scale: float | None = None
  technique: Technique = "replace"
  noise_sigma: float = 0.01  # sigma of the MI and entropy probes
  # MI soft mask (Informax Decoupler).
  mi_mask: bool = True
  p: float = 8.0  # exponent of the soft mask
  mi_temperature: float = 0.7  # T
  mi_num_pos: int = 5  # K positives and K negatives
  mi_mode: MIMode = "released"
  # Entropy factor.
  entropy_samples: int = 30  # S
  entropy_bins: int = 20  # B
  # Spectral pieces: ASED regulariser (scapre) and residual (scapre-small).
  ased: bool = True
  spectral_temperature: float = 1.0  # T_sigma
  spectral_power: float = 1.0  # p_sigma
  # Bures proximal step and EGBR safety valve (scapre).
  bures_iters: int = 1
  egbr: bool = False
  # Small-scale solver.
  alpha_min: float = 0.8  # rollback floor
  spectral_residual: bool = False  # released --svd
  residual_scale: float | None = None  # eta_res; None = erase_scale
  # Relative singular-value cut-off of the concept projector Pi; None picks
  # d_in * eps(dtype), which matches the released inverse where it is well
  # conditioned and stays finite past m = d_in.
  projector_rtol: float | None = None
  # Which projections of each cross-attention layer an erase edits.
  targets: tuple[str, ...] = ("to_k", "to_v")
  # Text side (docs/algorithm.md "Token rows"). Which rows of each encoded
  # prompt feed the edit: "aligned" = X_j, Y_j from the last concept token to
  # the end and all rows of a preserve prompt (ScaPre, UCE's edit_model);
  # "last" = one row per prompt, its last token (UCE's uce_sd_erase.py).
  token_rows: TokenRows = "aligned"
  # With templates, a template prompt's guide is the template filled with the
  # concept's guide ("photo of {guide}", uce_sd_erase.py --expand_prompts)
  # instead of the guide itself (train_erase.py, ScaPre).
  guide_templates: bool = False
  # Also preserve the empty prompt "", put first in the preserve list (the
  # command line of UCE's train_erase.py always does). The default gamma
  # counts it as the 1 of 1 + k, as that script does.
  preserve_empty: bool = False

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first setting that is out of range."""
    if self.method not in METHODS:
      raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
    if self.technique not in TECHNIQUES:
      raise ValueError(
          f"unknown technique {self.technique!r}; expected one of {TECHNIQUES}")
    if self.mi_mode not in MI_MODES:
      raise ValueError(f"unknown mi_mode {self.mi_mode!r}; expected one of {MI_MODES}")
    if self.token_rows not in TOKEN_ROWS:
      raise ValueError(
          f"unknown token_rows {self.token_rows!r}; expected one of {TOKEN_ROWS}")
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{f.name} must be finite, got {value!r}")
    positive = {
        "lamb": self.lamb,
        "erase_scale": self.erase_scale,
        "mi_temperature": self.mi_temperature,
        "spectral_temperature": self.spectral_temperature,
    }
    for name, value in positive.items():
      if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    for name, top in UPPER_BOUNDS.items():
      value = getattr(self, name)
      if value is not None and not value <= top:
        raise ValueError(f"{name} must be at most {top:g}, got {value!r}")
    non_negative = {
        "noise_sigma": self.noise_sigma,
        "p": self.p,
        "spectral_power": self.spectral_power,
        "alpha_min": self.alpha_min,
        "preserve_scale": self.preserve_scale or 0.0,
        "residual_scale": self.residual_scale or 0.0,
        "projector_rtol": self.projector_rtol or 0.0,
    }
    for name, value in non_negative.items():
      if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    if self.alpha_min > 1:
      raise ValueError(f"alpha_min must be in [0, 1], got {self.alpha_min!r}")
    for name in ("mi_num_pos", "entropy_samples", "entropy_bins"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if (not isinstance(self.bures_iters, int) or isinstance(self.bures_iters, bool)
        or not 0 <= self.bures_iters <= MAX_BURES_ITERS):
      raise ValueError(f"bures_iters must be an int in [0, {MAX_BURES_ITERS}], "
                       f"got {self.bures_iters!r}")
    if not self.targets or any(t not in ("to_k", "to_v") for t in self.targets):
      raise ValueError(
          f"targets must be a non-empty subset of ('to_k', 'to_v'), got {self.targets!r}")
    for name in ("mi_mask", "ased", "egbr", "spectral_residual", "guide_templates",
                 "preserve_empty"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

  @classmethod
  def preset(cls, name: str, **overrides) -> "EditConfig":
    """A named preset, optionally with some fields replaced."""
    try:
      fields = PRESETS[name]
    except KeyError:
      raise ValueError(
          f"unknown preset {name!r}; expected one of {tuple(PRESETS)}") from None
    return cls(**{**fields, **overrides})

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["targets"] = list(self.targets)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "EditConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown EditConfig fields: {unknown}")
    d = dict(d)
    if "targets" in d:
      d["targets"] = tuple(d["targets"])
    return cls(**d)


# The released scripts' settings (docs/algorithm.md "Presets").
PRESETS: dict[str, dict] = {
    # Many objects or artists at once.
    "scapre": dict(
        method="scapre", lamb=0.5, erase_scale=2.0, mi_mask=True, p=8.0,
        ased=True, entropy_samples=30, entropy_bins=20, bures_iters=1,
        technique="replace", noise_sigma=0.01),
    # Explicit content: no MI mask, no ASED.
    "scapre-nsfw": dict(
        method="scapre", lamb=0.5, erase_scale=2.0, mi_mask=False, p=3.0,
        ased=False, entropy_samples=20, entropy_bins=20, bures_iters=1,
        technique="replace", noise_sigma=0.01),
    # The small-scale solver of erase.py (Imagenette-10 settings).
    "scapre-small": dict(
        method="scapre-small", lamb=0.5, erase_scale=1.0, mi_mask=True, p=2.0,
        alpha_min=0.8, entropy_samples=20, entropy_bins=20, ased=False,
        technique="replace", noise_sigma=0.01),
    # Unified Concept Editing (Gandikota et al., WACV 2024), as ScaPre compares
    # with it: `edit_model` of UCE's train-scripts/train_erase.py. Aligned
    # rows, whole preserve sequences, only the preserve prompts given.
    "uce": dict(
        method="uce", lamb=0.5, erase_scale=1.0, mi_mask=False, ased=False,
        technique="replace", preserve_scale=None),
    # train_erase.py as its command line runs it: "" is always preserved and
    # gamma defaults to max(0.1, 1 / (1 + k)).
    "uce-train-erase": dict(
        method="uce", lamb=0.5, erase_scale=1.0, mi_mask=False, ased=False,
        technique="replace", preserve_scale=None, preserve_empty=True),
    # UCE as released today: trainscripts/uce_sd_erase.py. One last-token row
    # per prompt (the default guide "" is the start-of-text token), preserve
    # prompts by their last token too, preserve scale 1, templated guides.
    "uce-sd-erase": dict(
        method="uce", lamb=0.5, erase_scale=1.0, mi_mask=False, ased=False,
        technique="replace", preserve_scale=1.0, token_rows="last",
        guide_templates=True),
}

# One line per preset for `--help` and the README: the paper and the script
# each reproduces.
PRESET_HELP: dict[str, str] = {
    "scapre": "ScaPre (ICLR 2026) large-scale editor: many objects, artists",
    "scapre-nsfw": "ScaPre large-scale editor, explicit-content settings",
    "scapre-small": "ScaPre small-scale editor, Imagenette-10 settings",
    "uce": "UCE (WACV 2024) as ScaPre compares: edit_model of train_erase.py",
    "uce-train-erase": "UCE train_erase.py as its command line runs: keeps '' too",
    "uce-sd-erase": "UCE as released now, uce_sd_erase.py: last-token rows",
}


# -- the subcommands' settings ---------------------------------------------------

# The dtypes a model loads in (`models.DTYPES` maps them to JAX's); float64
# needs JAX's 64-bit mode.
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")
# tiny.TINY_CONFIGS' keys, spelled out so parsing imports no model code
# (tests/test_cli.py checks they agree).
TINY_VARIANTS: tuple[str, ...] = ("sd1", "sd2", "sd1-768", "sdxl")


def check_seed(seed) -> None:
  """Refuses a PRNG seed that is not an int in [0, 2**32 - 1]."""
  if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 32:
    raise ValueError(f"--seed must be in [0, 2**32 - 1], got {seed!r}")


def check_positive(name: str, value) -> None:
  """Refuses a count that is not a positive int, naming it."""
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def prompt_list(prompts) -> list[str]:
  """`prompts` as a non-empty list of strings (one string is refused: it
  would be read as its characters)."""
  if isinstance(prompts, str):
    raise ValueError("prompts must be a sequence of strings, got one string")
  prompts = list(prompts)
  if not prompts:
    raise ValueError("no prompts given")
  for i, p in enumerate(prompts):
    if not isinstance(p, str):
      raise ValueError(f"prompt {i} is not a string: {p!r}")
  return prompts


def _check_path(flag: str, value) -> None:
  if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
    raise ValueError(f"{flag} must name a path, got {value!r}")


# The subcommand configs below are not type-checked under pytest either (see
# EditConfig): their __post_init__ gives the errors in the CLI's words.
@typing.no_type_check
@dataclasses.dataclass(frozen=True)
class TinyConfig:
  """One `scapre-jax tiny` run (`tiny.run`): the built-in tiny random-weight
  model, written at `out` (which must not exist, or be an empty folder).

  Attributes:
    out: the folder to write.
    variant: one of TINY_VARIANTS (`tiny.TINY_CONFIGS`).
    seed: weights seed; the same seed and variant give byte-identical files.
  """

  out: str | os.PathLike
  variant: str = "sd1"
  seed: int = 0

  def __post_init__(self):
    _check_path("DIR", self.out)
    if self.variant not in TINY_VARIANTS:
      raise ValueError(f"--variant: unknown variant {self.variant!r}; expected one of "
                       f"{TINY_VARIANTS}")
    check_seed(self.seed)


@typing.no_type_check
@dataclasses.dataclass(frozen=True)
class ApplyConfig:
  """One `scapre-jax apply` run (`io.apply`): an edit file applied to the base
  model it was made for.

  Attributes:
    model: diffusers folder, cached Hugging Face id or single .safetensors
      file.
    edit: the edit file.
    out: the edited diffusers folder to write (a .safetensors file for a
      single-file `model`).
    config: single-file `model` only: a diffusers folder with its configs
      (None: the family's built-in ones).
    overwrite: replace an existing `out`.
  """

  model: str | os.PathLike
  edit: str | os.PathLike
  out: str | os.PathLike
  config: str | os.PathLike | None = None
  overwrite: bool = False

  def __post_init__(self):
    for flag, value in (("--model", self.model), ("--edit", self.edit), ("--out", self.out)):
      _check_path(flag, value)
    if self.config is not None:
      _check_path("--config", self.config)


@typing.no_type_check
@dataclasses.dataclass(frozen=True)
class InspectConfig:
  """One `scapre-jax inspect` run (`inspection.run`): what an edit file holds,
  as a table or (`json`) as its metadata and tensor shapes."""

  file: str | os.PathLike
  json: bool = False

  def __post_init__(self):
    _check_path("FILE", self.file)


@typing.no_type_check
@dataclasses.dataclass(frozen=True)
class VerifyConfig:
  """One `scapre-jax verify` run (`verify.run`).

  Attributes:
    edit: the edit file to recompute with the PyTorch reference.
    model: the base model it was made for; None = the built-in tiny model.
    unet: also run the PyTorch and Flax UNets on the written weights.
  """

  edit: str | os.PathLike
  model: str | os.PathLike | None = None
  unet: bool = True

  def __post_init__(self):
    _check_path("--edit", self.edit)
    if self.model is not None:
      _check_path("--model", self.model)


@typing.no_type_check
@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """One `scapre-jax generate` run (`generate.run`).

  Attributes:
    prompts: one grid row each.
    out: the PNG file to write.
    model: diffusers folder, cached Hugging Face id or single-file
      checkpoint; None = the built-in tiny model (`tiny.ensure_tiny_model`).
    edit: an edit file made for `model`: adds the "after" column.
    steps, seed, guidance: sampler steps, noise seed (prompt i's noise is
      `split(key(seed), n)[i]`), classifier-free guidance scale.
    size: image side in pixels; None = the model's.
    dtype: the dtype the model runs in.
    config, tokenizer, prediction_type: a single-file `model`'s diffusers
      config folder, CLIP vocabulary folder and what its UNet predicts
      ("epsilon" or "v_prediction", `single_file.scheduler_config`); None =
      found from the file.
    overwrite: replace an existing `out`.
  """

  prompts: tuple[str, ...]
  out: pathlib.Path
  model: str | None = None
  edit: str | None = None
  steps: int = 25
  seed: int = 0
  guidance: float = 7.5
  size: int | None = None
  dtype: str = "float32"
  config: str | None = None
  tokenizer: str | None = None
  prediction_type: str | None = None
  overwrite: bool = False

  def __post_init__(self):
    object.__setattr__(self, "prompts", tuple(prompt_list(self.prompts)))
    _check_path("--out", self.out)
    object.__setattr__(self, "out", pathlib.Path(self.out))
    if self.out.suffix.lower() != ".png":
      raise ValueError(f"--out {self.out} must name a .png file")
    check_positive("--steps", self.steps)
    check_seed(self.seed)
    if not isinstance(self.guidance, (int, float)) or not math.isfinite(self.guidance):
      raise ValueError(f"--guidance must be finite, got {self.guidance!r}")
    if self.size is not None:
      check_positive("--size", self.size)
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    if self.prediction_type not in (None, "epsilon", "v_prediction"):
      raise ValueError("--prediction-type must be epsilon or v_prediction, got "
                       f"{self.prediction_type!r}")
