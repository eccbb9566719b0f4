"""Progress lines and the library log filter: installed only when asked."""

import logging

from scapre_jax import console


def test_say_prints_one_line_on_stderr(capsys):
  console.say("load: done")
  captured = capsys.readouterr()
  assert captured.err == "load: done\n" and captured.out == ""


def _record(name: str, message: str) -> logging.LogRecord:
  return logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)


def test_quiet_library_logs_drops_only_deprecations():
  console.quiet_library_logs()
  console.quiet_library_logs()  # idempotent: one filter per handler
  for name in ("diffusers", "transformers"):
    handlers = logging.getLogger(name).handlers
    assert handlers
    for handler in handlers:  # every line of the library passes through these
      assert sum(isinstance(f, console.DropDeprecation) for f in handler.filters) == 1
      assert not handler.filter(_record(f"{name}.models", "Flax classes are deprecated "
                                        "and will be removed in v0.40"))
      assert handler.filter(_record(f"{name}.models", "something else"))
