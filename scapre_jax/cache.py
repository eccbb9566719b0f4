"""Where scapre-jax keeps files between runs: the cache folder (the built-in
tiny model, `tiny.default_model_dir`) and JAX's persistent compilation cache."""

from __future__ import annotations

import os
import pathlib


def cache_home() -> pathlib.Path:
  """$SCAPRE_JAX_HOME, else $XDG_CACHE_HOME/scapre-jax (~/.cache by default)."""
  home = os.environ.get("SCAPRE_JAX_HOME")
  if home:
    return pathlib.Path(home)
  cache = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(cache) / "scapre-jax"


def enable_compile_cache(path: str | os.PathLike | None = None) -> pathlib.Path | None:
  """Turns on JAX's persistent compilation cache, so a later run with the same
  shapes loads its programs instead of compiling them (a minute on a GPU,
  where XLA autotunes every matrix product; see BENCHMARKS.md).

  `path` None: $SCAPRE_JAX_COMPILE_CACHE, else cache_home() / "xla"; "off"
  leaves the cache as it is. A directory the user configured in JAX already
  wins. Returns the directory in use, or None.
  """
  import jax
  if path is None:
    path = os.environ.get("SCAPRE_JAX_COMPILE_CACHE") or cache_home() / "xla"
  if str(path).lower() in ("off", "none", ""):
    return None
  configured = jax.config.jax_compilation_cache_dir
  if configured:
    return pathlib.Path(configured)
  jax.config.update("jax_compilation_cache_dir", str(path))
  return pathlib.Path(path)
