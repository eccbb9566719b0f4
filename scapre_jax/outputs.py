"""Output paths: checks, atomic writes, the OUT lock, stale temp files.

The file-safety half of writing, kept free of heavy imports (no JAX, no
model code) so the command line checks every output, and takes the lock on
OUT, before it loads anything. `scapre_jax.io` writes the formats through
these helpers; nothing else in the package writes files another way.

Rules: output goes to a temporary name next to the target (`.NAME.*.tmp`)
and is renamed into place, so a crash never leaves half a file; an existing
output is replaced only with overwrite; the inputs (a model folder, an edit
or sets file) are never written over; a write that fails (full disk,
read-only folder) leaves nothing behind and says so in one line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib
import shutil
import tempfile

LOCK_FILE = ".scapre-jax.lock"
_held: dict[str, tuple[int, int]] = {}  # resolved lock path -> (fd, depth)


class OutputExistsError(FileExistsError, ValueError):
  """The output path exists and overwrite was not asked for."""


class OutputBusyError(ValueError):
  """Another run holds the lock on the output folder."""


class OutputWriteError(ValueError):
  """The file system refused a write (full, read-only, a file in the way)."""


def check_output(out, overwrite: bool = False, protected=()) -> None:
  """Refuses an output that is, lies inside or contains a protected path
  (ValueError), one whose parent is a file, and an existing output without
  `overwrite` (OutputExistsError)."""
  out = pathlib.Path(out)
  target = out.resolve()
  for source in protected:
    source = pathlib.Path(source).resolve()
    if target == source or source in target.parents or target in source.parents:
      raise ValueError(f"output {out} would overwrite the input {source}: "
                       "it must not be it, lie inside it or contain it")
  for parent in out.absolute().parents:
    if os.path.lexists(parent):
      if not parent.is_dir():
        raise OutputWriteError(f"cannot write {out}: {parent} is a file, not a folder")
      break
  if os.path.lexists(out) and not overwrite:
    raise OutputExistsError(
        f"output {out} exists; pass --overwrite (overwrite=True) to replace it")


def write_error(path, err: OSError) -> OutputWriteError:
  """A one-line OutputWriteError for an OSError met while writing `path`."""
  reason = err.strerror or str(err)
  if err.errno in (errno.ENOSPC, errno.EDQUOT):
    reason = "no space left on the device"
  elif err.errno == errno.EROFS:
    reason = "the file system is read-only"
  return OutputWriteError(f"cannot write {path}: {reason}; nothing was left half-written")


def umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def normal_modes(root) -> None:
  """Gives a written file, or a folder and everything in it, the modes a
  plain open() would (0666/0777 less the umask): mkstemp, mkdtemp and some
  writers (safetensors) make private files."""
  root = pathlib.Path(root)
  mask = umask()
  paths = [root] + (sorted(root.rglob("*")) if root.is_dir() else [])
  for p in paths:
    if not p.is_symlink():
      os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_file(path: pathlib.Path, overwrite: bool, write) -> None:
  """Calls `write(tmp)` on a temporary name next to `path`, then renames it
  into place. On any failure the temporary file is removed."""
  path = pathlib.Path(path)
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    write(tmp)
    normal_modes(tmp)
    if not overwrite and os.path.lexists(path):
      raise OutputExistsError(f"output {path} appeared while writing; not replaced")
    if path.is_dir():
      raise ValueError(f"output {path} is a directory, not a file")
    os.replace(tmp, path)
  except OSError as err:
    if not isinstance(err, OutputExistsError):
      raise write_error(path, err) from None
    raise
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)


def atomic_dir(path: pathlib.Path, overwrite: bool, build) -> None:
  """Builds a folder with `build(tmp)` next to `path`, then renames it into
  place (see `place`). On any failure the temporary folder is removed."""
  path = pathlib.Path(path)
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp",
                                        dir=path.parent))
    build(tmp)
    normal_modes(tmp)
    place(tmp, path, overwrite)
  except OSError as err:
    if not isinstance(err, OutputExistsError):
      raise write_error(path, err) from None
    raise
  finally:
    if tmp is not None and os.path.lexists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def place(staged: pathlib.Path, path: pathlib.Path, overwrite: bool) -> None:
  """Renames the finished file or folder `staged` to `path`. An existing
  folder at `path` (overwrite) is moved aside first and removed only once
  the new one is in place; a file is replaced in one rename."""
  if not os.path.lexists(path):
    os.replace(staged, path)
    return
  if not overwrite:
    raise OutputExistsError(f"output {path} appeared while writing; not replaced")
  if not (staged.is_dir() and path.is_dir() and not path.is_symlink()):
    if path.is_dir() and not path.is_symlink():
      raise ValueError(f"output {path} is a directory, not a file")
    os.replace(staged, path)
    return
  old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
  os.rmdir(old)
  os.replace(path, old)
  try:
    os.replace(staged, path)
  except BaseException:
    os.replace(old, path)
    raise
  shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staging(folder):
  """A fresh temporary folder `.run.*.tmp` inside `folder` for the body, to
  build outputs in before `place` renames them (same file system, so the
  renames are atomic); removed afterwards with whatever is left in it."""
  folder = pathlib.Path(folder)
  try:
    folder.mkdir(parents=True, exist_ok=True)
    stage = pathlib.Path(tempfile.mkdtemp(prefix=".run.", suffix=".tmp", dir=folder))
  except OSError as err:
    raise write_error(folder, err) from None
  try:
    yield stage
  except OSError as err:
    if isinstance(err, OutputExistsError):
      raise
    raise write_error(folder, err) from None
  finally:
    shutil.rmtree(stage, ignore_errors=True)


def clean_stale(folder) -> list[str]:
  """Removes the temporary files and folders (`.NAME.*.tmp`, `.NAME.*.old`)
  that a killed run left in `folder`; call it holding `lock(folder)`, so no
  live run's files are among them. Returns the names removed."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    return []
  removed = []
  for entry in folder.iterdir():
    if entry.name.startswith(".") and entry.name.endswith((".tmp", ".old")):
      if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
      else:
        entry.unlink(missing_ok=True)
      removed.append(entry.name)
  return sorted(removed)


@contextlib.contextmanager
def lock(folder, name: str = LOCK_FILE):
  """Holds an exclusive lock on the output folder `folder` (created if
  missing) for the body: a second run on the same folder is refused with
  OutputBusyError instead of interleaving its files with ours. Re-entrant
  within a process; released when the body ends or the process dies."""
  folder = pathlib.Path(folder)
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except FileExistsError:
    raise OutputWriteError(f"cannot use {folder} as the output folder: it is a file") from None
  except OSError as err:
    raise write_error(folder, err) from None
  key = str(folder.resolve() / name)
  if key in _held:
    fd, depth = _held[key]
    _held[key] = (fd, depth + 1)
  else:
    path = folder / name
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
    except OSError as err:
      raise write_error(path, err) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
      os.close(fd)
      raise OutputBusyError(
          f"{folder} is in use by another scapre-jax run"
          f"{f' (pid {owner})' if owner.isdigit() else ''}; wait for it to finish "
          "or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held[key] = (fd, 1)
  try:
    yield folder
  finally:
    fd, depth = _held[key]
    if depth > 1:
      _held[key] = (fd, depth - 1)
    else:
      del _held[key]
      os.close(fd)  # releases the flock
