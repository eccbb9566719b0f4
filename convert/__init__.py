"""PyTorch <-> Flax weight mapping for Stable Diffusion, without torch."""

from convert import ldm
from convert.mapping import CLIP
from convert.mapping import CLIP_TEXT
from convert.mapping import Layout
from convert.mapping import UNET
from convert.mapping import VAE
from convert.mapping import check
from convert.mapping import flatten
from convert.mapping import unflatten

__all__ = ["CLIP", "CLIP_TEXT", "ldm", "Layout", "UNET", "VAE", "check", "flatten", "unflatten"]
