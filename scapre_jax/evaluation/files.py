"""Where a scorer's weights are: a local path or a cached Hugging Face id."""

from __future__ import annotations

import os
import pathlib

from scapre_jax import requests


def locate(path_or_id: str | os.PathLike, what: str) -> pathlib.Path:
  """An existing local file or folder, or the cached snapshot of a Hugging
  Face id (never downloads). ValueError naming `what` otherwise."""
  path = pathlib.Path(path_or_id).expanduser()
  if path.exists():
    return path
  text = str(path_or_id)
  if not requests.looks_like_hub_id(text):
    raise ValueError(f"{what} {text} does not exist")
  try:
    return requests.cached_snapshot(text)
  except FileNotFoundError as err:
    raise ValueError(str(err)) from None


def locate_folder(path_or_id: str | os.PathLike, what: str) -> pathlib.Path:
  """`locate`, refusing a file."""
  path = locate(path_or_id, what)
  if not path.is_dir():
    raise ValueError(f"{path} is a file; the {what} must be a folder")
  return path
