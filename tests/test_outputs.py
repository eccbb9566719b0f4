"""Output safety: the OUT lock, writes that fail (full disk, read-only
folder) leaving nothing behind, stale temp files, and file modes."""

import errno
import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from scapre_jax import generate, outputs, tiny


def _mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
  old = os.umask(0o022)
  yield
  os.umask(old)


def test_lock_refuses_a_second_run(tmp_path):
  out = tmp_path / "out"
  holder = subprocess.Popen(
      [sys.executable, "-c", textwrap.dedent(f"""
          import sys, time
          from scapre_jax import outputs
          with outputs.lock({str(out)!r}):
            print("locked", flush=True)
            sys.stdin.readline()
          """)],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(outputs.OutputBusyError,
                       match=f"in use by another scapre-jax run \\(pid {holder.pid}\\)"):
      with outputs.lock(out):
        pass
  finally:
    holder.communicate("\n", timeout=60)
  with outputs.lock(out):  # free again once the holder is gone
    with outputs.lock(out):  # and re-entrant within one process
      pass


@pytest.mark.parametrize("code,reason", [(errno.ENOSPC, "no space left on the device"),
                                         (errno.EROFS, "the file system is read-only")])
def test_failed_writes_leave_nothing(tmp_path, code, reason):
  target = tmp_path / "report.json"
  target.write_text("old")

  def write(tmp):
    with open(tmp, "w") as f:
      f.write("partial")
    raise OSError(code, os.strerror(code))

  with pytest.raises(outputs.OutputWriteError, match=f"cannot write .*: {reason}"):
    outputs.atomic_file(target, True, write)
  with pytest.raises(outputs.OutputWriteError, match=reason):
    outputs.atomic_dir(tmp_path / "model", True, lambda tmp: write(tmp / "x"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
  assert target.read_text() == "old"


def test_clean_stale_removes_only_temporaries(tmp_path):
  (tmp_path / ".edit.safetensors.k3j2.tmp").write_text("x")
  (tmp_path / ".model.a1.tmp").mkdir()
  (tmp_path / ".model.a1.tmp" / "f").write_text("x")
  (tmp_path / ".model.b2.old").mkdir()
  (tmp_path / "edit.safetensors").write_text("keep")
  (tmp_path / ".scapre-jax.lock").write_text("")
  (tmp_path / "notes.tmp").write_text("keep: not one of ours")
  assert outputs.clean_stale(tmp_path) == [
      ".edit.safetensors.k3j2.tmp", ".model.a1.tmp", ".model.b2.old"]
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      ".scapre-jax.lock", "edit.safetensors", "notes.tmp"]


def test_check_output_parent_is_a_file(tmp_path):
  (tmp_path / "f").write_text("")
  with pytest.raises(outputs.OutputWriteError, match="is a file, not a folder"):
    outputs.check_output(tmp_path / "f" / "out" / "edit.safetensors")
  with pytest.raises(outputs.OutputExistsError, match="--overwrite"):
    outputs.check_output(tmp_path / "f")


def test_tiny_and_png_get_umask_modes(tmp_path, umask_022):
  root = tiny.write_tiny_model(tmp_path / "tiny")
  assert _mode(root) == 0o755
  for path in root.rglob("*"):
    assert _mode(path) == (0o755 if path.is_dir() else 0o644), path
  png = generate.write_png(tmp_path / "grid.png", np.zeros((4, 4, 3), np.uint8))
  assert _mode(png) == 0o644
