"""What the command line prints besides its results: progress lines on
stderr, and the filters that keep diffusers' and transformers' deprecation
noise out of them. Nothing here runs at import time; the CLI calls
`quiet_library_logs` before it loads model code."""

from __future__ import annotations

import logging
import sys

_DEPRECATED = "classes are deprecated"


def say(message: str) -> None:
  """Prints one progress line on stderr, flushed at once."""
  print(message, file=sys.stderr, flush=True)


class DropDeprecation(logging.Filter):
  """Drops the 'Flax classes are deprecated' lines, logged on every trace."""

  def filter(self, record: logging.LogRecord) -> bool:
    return _DEPRECATED not in record.getMessage()


def quiet_library_logs() -> None:
  """Drops diffusers' and transformers' 'Flax classes are deprecated' log
  lines from here on (process-wide; idempotent). Imports both libraries'
  logging modules (not their model code), which install the one handler on
  each library's root logger that the filter sits on, so it also catches
  the lines logged while the Flax modules import."""
  from diffusers.utils import logging as diffusers_logging
  from transformers.utils import logging as transformers_logging
  diffusers_logging.get_logger("diffusers")  # makes the handler
  transformers_logging.get_logger("transformers")
  for handler in (*logging.getLogger("diffusers").handlers,
                  *logging.getLogger("transformers").handlers):
    if not any(isinstance(f, DropDeprecation) for f in handler.filters):
      handler.addFilter(DropDeprecation())
