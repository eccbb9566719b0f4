"""`scapre-jax inspect`: what an edit file holds, as text.

Reads one file with `io.read_edit_file` and nothing else: no JAX, no model
code, so the command answers in well under a second (tests/test_init.py
checks what importing this module imports).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from scapre_jax import io
from scapre_jax.config import InspectConfig


def run(config: InspectConfig) -> str:
  """The text `scapre-jax inspect` prints for `config.file`: the table of
  `describe`, or (`config.json`) the metadata and tensor shapes as JSON.
  Raises ValueError, in one line, for metadata the table cannot show."""
  kernels, meta = io.read_edit_file(config.file)
  if config.json:
    return json.dumps({"metadata": meta, "tensors": {
        n: list(k.shape) for n, k in kernels.items()}}, indent=2)
  try:  # metadata is whatever the file says: a crafted one gets one line
    return "\n".join(describe(config.file, kernels, meta))
  except (TypeError, AttributeError, ValueError) as err:
    raise ValueError(f"edit file {config.file} has metadata of an unexpected shape "
                     f"({err}); --json shows it as stored") from None


def describe(file: str | os.PathLike, kernels: Mapping[str, Any],
             meta: Mapping[str, Any]) -> list[str]:
  """The lines of the table: the request, the method and its settings'
  provenance, then one row per edited layer (weight change, target gap,
  other shift from the metadata's `layers`)."""
  config = meta.get("config", {})
  lines = [f"edit file     {file}",
           f"concepts      {', '.join(meta.get('concepts', []))}"]
  guides = sorted(set(meta.get("guides", [])))
  lines.append(f"guides        {', '.join(repr(g) for g in guides)}")
  if meta.get("preserve"):
    lines.append("preserve      " + ", ".join(
        repr(p) if not p.strip() else p for p in meta["preserve"]))
  lines += [f"method        {config.get('method')} (preset {meta.get('preset', '?')}, "
            f"seed {meta.get('seed', '?')})",
            f"base model    {meta.get('base_fingerprint')}"
            + (f" ({meta['family']})" if meta.get("family") else ""),
            f"library       scapre-jax {meta.get('scapre_jax_version')}, dtype {meta.get('dtype')}, "
            f"computed in {meta.get('precision', 'float32')}",
            f"matrices      {len(kernels)}"]
  layers = meta.get("layers", {})
  if layers:
    width = max(len(n) for n in layers)
    lines.append(f"\n{'layer'.ljust(width)}  weight_change  target_gap  other_shift")
    for name, entry in layers.items():
      lines.append(f"{name.ljust(width)}  {float(entry.get('weight_change', 'nan')):13.4f}"
                   f"  {float(entry.get('target_gap', 'nan')):10.4f}"
                   f"  {float(entry.get('other_shift', 'nan')):11.5f}")
  return lines
