"""Writing edit results: edit files, edited diffusers folders, orbax checkpoints.

Three outputs:
  * an edit file: safetensors with only the edited `attn2.to_k/to_v` weights
    under diffusers PyTorch names, (d_out, d_in) = Flax kernel transposed, and
    string metadata (concepts, guides, preserve, config, base fingerprint,
    library version, dtype). It loads into a PyTorch UNet with
    `unet.load_state_dict(edit, strict=False)`.
  * a complete diffusers folder: the source copied byte for byte except the
    UNet weights, rewritten with the edited tensors replaced and every other
    tensor bit-identical.
  * an orbax checkpoint of the edited Flax UNet params.

Every writer follows the same rules: non-finite weights are refused before
anything touches the disk; output goes to a temporary name in the target's
directory and is renamed into place, so a crash never leaves half a file; the
source model is never overwritten (an output equal to, inside or containing
it is refused); an existing output is replaced only with `overwrite=True`.

Reading edit files needs no model code and no JAX (`scapre-jax inspect` is
quick): `models`, Flax and orbax are imported by the functions that use them.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import warnings
from collections.abc import Mapping

import numpy as np
import safetensors
import safetensors.numpy

import convert
from scapre_jax import outputs
from scapre_jax.config import ApplyConfig, EditConfig
from scapre_jax.errors import NonFiniteWeightsError
from scapre_jax.outputs import OutputExistsError  # noqa: F401  (re-exported)

# The matrices an edit file may hold: cross-attention key/value projections.
EDIT_PATH = re.compile(r"(.+/)?attn2/(to_k|to_v)/kernel")
UNET_SAFETENSORS = "diffusion_pytorch_model.safetensors"
# Metadata keys an edit file always has; `_JSON_KEYS` lists the entries stored
# as JSON (safetensors metadata is str -> str), so reading restores them.
_JSON_KEYS = "scapre_jax.json_keys"
_WEIGHT_SUFFIXES = (".safetensors", ".msgpack", ".bin", ".ckpt", ".pt", ".pth")
PathLike = str | os.PathLike


# -- edit files ---------------------------------------------------------------


def edit_metadata(*, concepts, guides, preserve, config: EditConfig,
                  base_fingerprint: str, **extra) -> dict:
  """The metadata of an edit file, as `write_edit_file` expects it."""
  return {"concepts": list(concepts), "guides": list(guides),
          "preserve": list(preserve), "config": config.to_dict(),
          "base_fingerprint": str(base_fingerprint), **extra}


def write_edit_file(path: PathLike, kernels: Mapping[str, object], *,
                    metadata: Mapping[str, object], overwrite: bool = False,
                    model_root: PathLike | None = None,
                    ldm_names: Mapping[str, str] | None = None) -> pathlib.Path:
  """Writes edited kernels {flax path: (d_in, d_out)} as a safetensors edit file.

  Tensors are stored as `...attn2.to_k.weight` (d_out, d_in) in their own
  dtype. `metadata` must hold `base_fingerprint` (checked by `apply_edit`);
  string values are stored as-is, others (lists, dicts, an EditConfig) as JSON.
  `scapre_jax_version`, `dtype` and `format` ("pt") are added. With
  `model_root`, the file may not be written inside that model folder.
  `ldm_names` ({diffusers name: LDM name}, `single_file.ldm_edit_names`)
  stores the tensors under single-file names instead, and records the map
  in the metadata so `read_edit_file` reads them back.
  """
  from scapre_jax import __version__
  path = pathlib.Path(path)
  outputs.check_output(path, overwrite, protected=[model_root] if model_root else [])
  arrays = edit_kernels(kernels)
  check_finite(arrays)
  meta = dict(metadata)
  if "base_fingerprint" not in meta:
    raise ValueError("metadata needs 'base_fingerprint' (the base model's "
                     "LoadedModel.fingerprint), so apply_edit can check it")
  reserved = {"format", "scapre_jax_version", "dtype", _JSON_KEYS} & set(meta)
  if reserved:
    raise ValueError(f"metadata keys {sorted(reserved)} are set by write_edit_file")
  encoded, json_keys = {}, []
  for key, value in meta.items():
    if isinstance(value, EditConfig):
      value = value.to_dict()
    if isinstance(value, str):
      encoded[str(key)] = value
    else:
      try:
        encoded[str(key)] = json.dumps(value, sort_keys=True)
      except TypeError as err:
        raise ValueError(f"metadata {key!r} is not JSON-serialisable: {err}") from None
      json_keys.append(str(key))
  encoded.update({
      "format": "pt",
      "scapre_jax_version": __version__,
      "dtype": ",".join(sorted({str(a.dtype) for a in arrays.values()})),
      _JSON_KEYS: json.dumps(sorted(json_keys)),
  })
  tensors = {convert.UNET.torch_name(p): np.ascontiguousarray(a.T) for p, a in arrays.items()}
  if ldm_names is not None:
    tensors = {ldm_names[n]: a for n, a in tensors.items()}
    encoded["ldm_names"] = json.dumps({ldm_names[n]: n for n in sorted(ldm_names)
                                       if ldm_names[n] in tensors}, sort_keys=True)
    encoded[_JSON_KEYS] = json.dumps(sorted(json.loads(encoded[_JSON_KEYS]) + ["ldm_names"]))
  outputs.atomic_file(path, overwrite,
               lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata=encoded))
  return path


def read_edit_file(path: PathLike) -> tuple[dict[str, np.ndarray], dict]:
  """Reads an edit file: ({flax path: kernel (d_in, d_out)}, metadata), with
  the JSON-stored metadata entries decoded. Corrupt or truncated files,
  foreign tensor names and non-finite weights raise ValueError naming the file.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"edit file {path} does not exist")
  try:
    with safetensors.safe_open(path, framework="np") as f:
      raw = f.metadata() or {}
      tensors = {name: f.get_tensor(name) for name in f.keys()}
  except (safetensors.SafetensorError, OSError, ValueError) as err:
    raise ValueError(f"cannot read edit file {path} (corrupt or truncated?): {err}") from None
  if not tensors:
    raise ValueError(f"edit file {path} holds no tensors")
  try:
    renames = json.loads(raw.get("ldm_names", "{}"))  # LDM -> diffusers names
  except json.JSONDecodeError as err:
    raise ValueError(f"edit file {path} has corrupt metadata: {err}") from None
  kernels = {}
  for name, array in tensors.items():
    flax = convert.UNET.flax_path(renames.get(name, name))
    if not EDIT_PATH.fullmatch(flax) or array.ndim != 2:
      raise ValueError(f"edit file {path} holds {name!r} {array.shape}, not a "
                       "cross-attention to_k/to_v weight (d_out, d_in)")
    kernels[flax] = np.ascontiguousarray(array.T)
  try:
    check_finite(kernels)
  except NonFiniteWeightsError as err:
    raise ValueError(f"edit file {path}: {err}") from None
  meta = dict(raw)
  try:
    for key in json.loads(meta.pop(_JSON_KEYS, "[]")):
      meta[key] = json.loads(meta[key])
  except (json.JSONDecodeError, KeyError, TypeError) as err:
    raise ValueError(f"edit file {path} has corrupt metadata: {err}") from None
  return kernels, meta


def read_edit_metadata(path: PathLike) -> dict:
  """The raw (str -> str) metadata of an edit file, from its header alone;
  {} when the file cannot be read as safetensors."""
  try:
    with safetensors.safe_open(pathlib.Path(path), framework="np") as f:
      return dict(f.metadata() or {})
  except (safetensors.SafetensorError, OSError, ValueError):
    return {}


# -- diffusers folders ----------------------------------------------------------


def write_model_folder(src_root: PathLike, out_root: PathLike,
                       unet_kernels: Mapping[str, object], *,
                       overwrite: bool = False) -> pathlib.Path:
  """Writes an edited copy of the diffusers folder `src_root` at `out_root`.

  Every file is copied byte for byte except the UNet weights: the file(s) the
  loader reads (`models.load_model`'s choice) are rewritten with the tensors
  of `unet_kernels` ({flax path: kernel (d_in, d_out)}) replaced, transposed
  and cast to the dtype they replace; every other tensor is bit-identical.
  A Flax msgpack UNet is converted to `diffusion_pytorch_model.safetensors`.
  Other UNet weight files (another variant, pickles) are left out with a
  warning, so no unedited copy of the UNet survives in the output.
  """
  from scapre_jax import models
  src = models.resolve(src_root)
  out = pathlib.Path(out_root)
  outputs.check_output(out, overwrite, protected=[src])
  arrays = edit_kernels(unet_kernels)
  check_finite(arrays)
  unet = src / "unet"
  fmt, files = models.weight_files(src, "unet")
  if fmt == "flax":
    written, kept = {UNET_SAFETENSORS: _from_msgpack(src, files[0], arrays)}, []
  else:
    written, kept = _from_safetensors(files, arrays)
    kept += _index_for(unet, files)
  read = {f.name for f in files}

  def is_weight(rel: str) -> bool:
    return rel.startswith("unet/") and (rel.endswith(_WEIGHT_SUFFIXES)
                                        or rel.endswith(".index.json"))

  left_out = sorted(
      rel for rel in (p.relative_to(src).as_posix() for p in unet.rglob("*") if p.is_file())
      if is_weight(rel) and rel.split("/", 1)[1] not in read | set(kept))
  if left_out:
    warnings.warn(f"left out UNet weight files that were not edited: {left_out}",
                  UserWarning, stacklevel=2)

  def build(tmp: pathlib.Path) -> None:
    def ignore(folder, names):
      rel = pathlib.Path(os.path.relpath(folder, src)).as_posix()
      return [n for n in names if is_weight(f"{rel}/{n}") and n not in kept]
    shutil.copytree(src, tmp, ignore=ignore, dirs_exist_ok=True)
    for name, (tensors, meta) in written.items():
      safetensors.numpy.save_file(tensors, tmp / "unet" / name, metadata=meta)
    drop_variant_names(tmp)

  outputs.atomic_dir(out, overwrite, build)
  return out


_VARIANT = re.compile(r"\.(fp16|bf16|fp32)(?=\.safetensors$|\.json$|-\d{5}-of-\d{5}\.safetensors$)")


def drop_variant_names(root: pathlib.Path) -> list[str]:
  """Renames variant weight files (`model.fp16.safetensors`, sharded ones and
  their index) to the plain names, in every folder of `root` that has no
  plain weights of its own and only one variant (with two, both would take
  the same name: such a folder is left as it is), so that
  `from_pretrained(root)` loads the folder without a `variant=` argument.
  Returns the renamed paths (relative)."""
  renamed = []
  for folder in sorted({p.parent for p in root.rglob("*.safetensors")}):
    files = [p for p in folder.iterdir() if p.is_file()]
    variant = [p for p in files if _VARIANT.search(p.name)
               and (p.suffix == ".safetensors" or ".index." in p.name)]
    plain = [p for p in files if p.suffix == ".safetensors" and p not in variant]
    if not variant or plain or len({_VARIANT.search(p.name)[1] for p in variant}) > 1:
      continue
    for path in variant:
      target = path.with_name(_VARIANT.sub("", path.name))
      if ".index." in path.name:  # the shard names inside change the same way
        index = json.loads(path.read_text("utf-8"))
        index["weight_map"] = {k: _VARIANT.sub("", v) for k, v in index["weight_map"].items()}
        target.write_text(json.dumps(index, indent=2), "utf-8")
        path.unlink()
      else:
        path.rename(target)
      renamed.append(target.relative_to(root).as_posix())
  return renamed


def _index_for(unet: pathlib.Path, files) -> list[str]:
  """The index file of sharded weights `files` (copied as-is), if any."""
  for index in sorted(unet.glob("*.index.json")):
    try:
      shards = set(json.loads(index.read_text())["weight_map"].values())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
      continue
    if shards == {f.name for f in files}:
      return [index.name]
  return []


def _from_safetensors(files, arrays):
  """({file name: (tensors, metadata)} to rewrite, [file names to copy])."""
  pending = {convert.UNET.torch_name(p): a.T for p, a in arrays.items()}
  written, kept = {}, []
  for file in files:
    try:
      with safetensors.safe_open(file, framework="np") as f:
        names = list(f.keys())
        hits = [n for n in names if n in pending]
        if not hits:
          kept.append(file.name)
          continue
        meta = f.metadata() or {"format": "pt"}
        tensors = {n: f.get_tensor(n) for n in names}
    except (safetensors.SafetensorError, OSError) as err:
      raise ValueError(f"cannot read {file} (corrupt or truncated safetensors?): {err}") from None
    for name in hits:
      tensors[name] = replacement(name, tensors[name], pending.pop(name))
    written[file.name] = (tensors, meta)
  if pending:
    raise ValueError(f"the UNet in {files[0].parent} has no tensors {sorted(pending)}")
  return written, kept


def _from_msgpack(src, file, arrays):
  from scapre_jax import models
  config = json.loads((src / "unet" / "config.json").read_text())
  expected = models.abstract_params("unet", config)
  tree = read_msgpack(file)
  flat = convert.flatten(convert.check(tree, expected, "unet"))
  unknown = sorted(set(arrays) - set(flat))
  if unknown:
    raise ValueError(f"the UNet in {file.parent} has no params {unknown}")
  for path, kernel in arrays.items():
    flat[path] = replacement(path, np.asarray(flat[path]), kernel)
  state = convert.UNET.to_torch(convert.unflatten(flat), expected)
  return state, {"format": "pt"}


def replacement(name: str, original: np.ndarray, new: np.ndarray) -> np.ndarray:
  if new.shape != original.shape:
    raise ValueError(f"{name}: edited shape {new.shape} does not match the "
                     f"model's {original.shape}")
  with np.errstate(over="ignore", invalid="ignore"):
    cast = np.ascontiguousarray(new.astype(original.dtype))
  # A float16 model can overflow where the float32 edit did not.
  if not np.isfinite(cast).all():
    raise NonFiniteWeightsError(
        f"{name} is not finite once cast to the model's {original.dtype}")
  return cast


def apply(config: ApplyConfig) -> pathlib.Path:
  """`scapre-jax apply`: `apply_edit` with the settings of `config`; returns
  what it wrote."""
  return apply_edit(config.model, config.edit, config.out, config=config.config,
                    overwrite=config.overwrite)


def apply_edit(model_root: PathLike, edit_file: PathLike, out_root: PathLike, *,
               config: PathLike | None = None, overwrite: bool = False) -> pathlib.Path:
  """Writes the diffusers folder `model_root` with `edit_file` applied at
  `out_root`, after checking that the edit was made for this base model
  (its `base_fingerprint` equals the sha256 of the model's UNet files).
  A single-file base gives an edited single file (`single_file.apply_edit`;
  `config`, a diffusers folder with its configs, is for that case only)."""
  if pathlib.Path(model_root).expanduser().is_file():
    from scapre_jax import single_file
    return single_file.apply_edit(model_root, edit_file, out_root, config=config,
                                  overwrite=overwrite)
  if config is not None:
    raise ValueError("--config applies to a single-file --model")
  from scapre_jax import models
  src = models.resolve(model_root)
  out = pathlib.Path(out_root)
  outputs.check_output(out, overwrite, protected=[src, edit_file])
  kernels, meta = read_edit_file(edit_file)
  _, files = models.weight_files(src, "unet")
  check_fingerprint(edit_file, meta, models.fingerprint(files), src)
  return write_model_folder(src, out, kernels, overwrite=overwrite)


def check_fingerprint(edit_file: PathLike, meta: Mapping[str, object], actual: str,
                      model: PathLike, *, action: str = "apply") -> None:
  """Refuses (ValueError) an edit file whose metadata `meta` records no
  `base_fingerprint`, or one other than `actual`, the fingerprint of `model`
  (`LoadedModel.fingerprint`: the sha256 of its UNet weight files, or of
  the single file). `action` names the refused use in the message."""
  expected = meta.get("base_fingerprint")
  if not expected:
    raise ValueError(f"edit file {edit_file} records no base_fingerprint")
  if expected != actual:
    raise ValueError(
        f"edit file {edit_file} was made for the base model with fingerprint "
        f"{expected}, but {model} has fingerprint {actual}; refusing to {action} it")


def read_msgpack(file: PathLike) -> dict:
  """The param tree of a Flax msgpack weights file, without the top-level
  {"params": ...} wrapper some writers add."""
  from flax import serialization
  file = pathlib.Path(file)
  try:
    tree = serialization.msgpack_restore(file.read_bytes())
  except Exception as err:  # msgpack raises several unrelated types
    raise ValueError(f"cannot read {file} (corrupt or truncated msgpack?): {err}") from None
  if isinstance(tree, dict) and set(tree) == {"params"}:
    tree = tree["params"]
  return tree


# -- orbax --------------------------------------------------------------------


def write_orbax(path: PathLike, unet_params, *, overwrite: bool = False,
                model_root: PathLike | None = None) -> pathlib.Path:
  """Saves Flax params as an orbax checkpoint (StandardCheckpointer) and waits
  for it to finish; refuses non-finite params."""
  import orbax.checkpoint as ocp
  path = pathlib.Path(path).absolute()
  outputs.check_output(path, overwrite, protected=[model_root] if model_root else [])
  flat = convert.flatten(unet_params)
  check_finite({p: a for p, a in flat.items() if _is_float(a)})

  def build(tmp: pathlib.Path) -> None:
    with ocp.StandardCheckpointer() as checkpointer:
      # Orbax makes the folder itself (and refuses an existing one).
      checkpointer.save(tmp / "params", unet_params)
      checkpointer.wait_until_finished()
    for item in (tmp / "params").iterdir():
      os.replace(item, tmp / item.name)
    (tmp / "params").rmdir()

  outputs.atomic_dir(path, overwrite, build)
  return path


def read_orbax(path: PathLike):
  """Restores the params saved by `write_orbax` (jax arrays, saved dtypes)."""
  import orbax.checkpoint as ocp
  path = pathlib.Path(path).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"orbax checkpoint {path} does not exist")
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(path)
  except Exception as err:  # orbax raises many unrelated types
    raise ValueError(f"cannot read orbax checkpoint {path}: {err}") from None


# -- checks and atomic writes ---------------------------------------------------


def _is_float(a) -> bool:
  dtype = np.dtype(a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype)
  # bfloat16 (ml_dtypes) is a float that numpy does not call floating.
  return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def edit_kernels(kernels: Mapping[str, object]) -> dict[str, np.ndarray]:
  """Validated {flax path: numpy kernel (d_in, d_out)}."""
  if not kernels:
    raise ValueError("no kernels given")
  arrays = {}
  for path, kernel in kernels.items():
    if not EDIT_PATH.fullmatch(path):
      raise ValueError(f"{path!r} is not a cross-attention to_k/to_v kernel path "
                       "(.../attn2/to_k/kernel)")
    array = np.asarray(kernel)
    if array.ndim != 2 or not _is_float(array):
      raise ValueError(f"{path}: expected a floating (d_in, d_out) kernel, got "
                       f"{array.dtype} {array.shape}")
    arrays[path] = array
  return arrays


def check_finite(arrays: Mapping[str, object]) -> None:
  bad = [p for p, a in arrays.items()
         if not np.isfinite(np.asarray(a)).all()]
  if bad:
    raise NonFiniteWeightsError(
        f"refusing to write non-finite (NaN or inf) weights in {len(bad)} tensors: "
        f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}")


def check_output_path(out, *, overwrite: bool = False, protected=()) -> None:
  """Refuses an output that is, lies inside or contains a protected path
  (ValueError), and an existing output without `overwrite` (OutputExistsError).
  Callers check every output of a job before the work starts."""
  outputs.check_output(pathlib.Path(out), overwrite, protected)


def write_json(path, obj, *, overwrite: bool = False) -> pathlib.Path:
  """Writes `obj` as indented JSON, atomically (temp file + rename)."""
  path = pathlib.Path(path)
  outputs.check_output(path, overwrite, ())
  try:  # allow_nan=False: Infinity and NaN are not JSON
    data = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
  except ValueError as err:
    raise ValueError(f"cannot write {path}: {err}") from None
  outputs.atomic_file(path, overwrite, lambda tmp: pathlib.Path(tmp).write_text(data, "utf-8"))
  return path

