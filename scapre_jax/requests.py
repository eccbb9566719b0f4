"""What users ask to erase: concept sets, from the command line or a JSONL
sets file, and the built-in concept lists of the paper's released scripts.

Everything here is checked before any model is loaded or any work starts;
errors name the sets-file line.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import pathlib
import re
import typing
import warnings
from importlib import resources

from scapre_jax.config import PRESETS

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SET_KEYS = {"name", "concepts", "guides", "preserve", "preset", "templates", "others"}

# The look-alikes a built-in list keeps: classes of the paper's evaluation
# CSV for that list which the list does not erase (imagenet-15.csv holds 15
# classes, imagenet-confuse-15 erases 10). They measure collateral damage
# on near neighbours, so they are the list's default `others`.
LIST_LOOKALIKES = {
    "imagenet-confuse-15": ("german shepherd", "persian cat", "pomegranate", "yawl",
                            "tennis ball"),
}


@functools.cache
def builtin_lists() -> dict[str, tuple[str, ...]]:
  """Named concept lists shipped in the package (imagenette-10, art-50, ...)."""
  text = resources.files("scapre_jax").joinpath("data/concept_lists.json").read_text("utf-8")
  return {name: tuple(items) for name, items in json.loads(text).items()}


@typing.no_type_check  # validated in __post_init__ (see config.EditConfig)
@dataclasses.dataclass(frozen=True)
class ConceptSet:
  """One erase request: concepts (and optional guides, preserve prompts,
  prompt templates) with the preset that edits them."""

  name: str
  concepts: tuple[str, ...]
  guides: tuple[str, ...] | None = None
  preserve: tuple[str, ...] = ()
  preset: str = "scapre"
  templates: str | tuple[str, ...] | None = None
  # Prompts the summary compares the erased ones with (`others_moved`);
  # empty: the COCO captions shipped with the package.
  others: tuple[str, ...] = ()

  def __post_init__(self):
    if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
      raise ValueError(
          f"set name {self.name!r} must be 1-128 letters, digits, '.', '_' or '-' "
          "(it names the output files)")
    if not self.concepts:
      raise ValueError(f"set {self.name!r}: empty concept list")
    blank = [i for i, c in enumerate(self.concepts) if not c.strip()]
    if blank:
      raise ValueError(f"set {self.name!r}: blank concept at position(s) {blank}")
    if self.preset not in PRESETS:
      raise ValueError(
          f"set {self.name!r}: unknown preset {self.preset!r}; expected one of {tuple(PRESETS)}")

  def to_dict(self) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()}


def parse_concepts(value) -> tuple[str, ...]:
  """Concepts from a comma-separated string, a list, or a built-in list name.

  A concept that looks like a built-in list name but is not one
  ("imagenette10") is refused with the name it resembles, rather than erased
  as a word; a concept given twice is erased once, with a warning.
  """
  if isinstance(value, str):
    if value.strip() in builtin_lists():
      return builtin_lists()[value.strip()]
    value = value.split(",")
  if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
    raise ValueError(f"concepts must be a string or a list of strings, got {value!r}")
  concepts = [c.strip() for c in value if c.strip()]
  for concept in concepts:
    _refuse_list_lookalike(concept)
  unique = tuple(dict.fromkeys(concepts))
  if len(unique) < len(concepts):
    twice = sorted({c for c in concepts if concepts.count(c) > 1})
    warnings.warn(f"concept(s) {', '.join(map(repr, twice))} given more than once; "
                  "each is erased once", UserWarning, stacklevel=2)
  return unique


def list_others(value) -> tuple[str, ...]:
  """The default `others` of a concepts argument: the look-alikes of a
  built-in list that has them (LIST_LOOKALIKES), else ()."""
  return LIST_LOOKALIKES.get(value.strip(), ()) if isinstance(value, str) else ()


def _squash(text: str) -> str:
  return re.sub(r"[^a-z0-9]", "", text.lower())


def _refuse_list_lookalike(concept: str) -> None:
  names = tuple(builtin_lists())
  if concept in names:  # a list name inside a comma-separated list
    raise ValueError(f"{concept!r} is a built-in list: give it alone, not in a "
                     "comma-separated list")
  close = [n for n in names if _squash(n) == _squash(concept)]
  close += difflib.get_close_matches(concept.lower(), names, n=1, cutoff=0.85)
  if close:
    raise ValueError(f"{concept!r} is not a built-in list; did you mean {close[0]}? "
                     f"(built-in lists: {', '.join(names)})")


def looks_like_hub_id(text: str) -> bool:
  """Whether a model argument that is no existing path can be a Hugging Face
  id ("owner/name"): not when it starts like a path ("./", "../", "~") or its
  first part is a local folder ("models/sd15" where ./models exists)."""
  if not re.fullmatch(r"[\w.-]+/[\w.-]+", text) or text.startswith("."):
    return False
  return not pathlib.Path(text.split("/", 1)[0]).is_dir()


def check_model_argument(value: str | None) -> None:
  """Refuses, before any work, a --model that is neither an existing path nor
  shaped like a Hugging Face id (whether a cached id exists is checked when
  the model loads)."""
  if value is None or pathlib.Path(value).expanduser().exists():
    return
  if not looks_like_hub_id(value):
    raise ValueError(f"--model {value}: no such model folder")
  try:
    cached_snapshot(value)
  except FileNotFoundError as e:
    raise ValueError(str(e).replace(f"model {value!r}", f"--model {value}", 1)) from None


def cached_snapshot(repo_id: str) -> pathlib.Path:
  """The local snapshot folder of a Hugging Face id, never downloading.

  Raises FileNotFoundError, in our words, when the id is not in the cache
  (huggingface_hub's own text suggests `local_files_only=False`, which no
  option of ours sets). Light enough to run before the heavy imports.
  """
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  from huggingface_hub.errors import LocalEntryNotFoundError  # pylint: disable=import-outside-toplevel
  # huggingface_hub reads these variables once at import; read them per call.
  cache = (os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
           or (os.path.join(os.environ["HF_HOME"], "hub") if "HF_HOME" in os.environ
               else None))
  try:
    # local_files_only: resolution never touches the network, whatever
    # HF_HUB_OFFLINE says.
    return pathlib.Path(huggingface_hub.snapshot_download(
        repo_id, cache_dir=cache, local_files_only=True))
  except (LocalEntryNotFoundError, FileNotFoundError):
    where = cache or huggingface_hub.constants.HF_HUB_CACHE
    raise FileNotFoundError(
        f"model {repo_id!r} is neither a local folder nor in the Hugging Face cache "
        f"{where}; scapre-jax never downloads: fetch it first "
        f"(hf download {repo_id}) or give the folder's path") from None


def _optional_strings(value, field):
  if value is None:
    return None
  if isinstance(value, str):
    return (value,)
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    raise ValueError(f"{field} must be a string or a list of strings, got {value!r}")
  return tuple(value)


def set_from_dict(entry: object, *, default_preset: str = "scapre") -> ConceptSet:
  """A ConceptSet from one parsed sets-file object."""
  if not isinstance(entry, dict):
    raise ValueError(f"expected a JSON object, got {type(entry).__name__}")
  unknown = sorted(set(entry) - _SET_KEYS)
  if unknown:
    raise ValueError(f"unknown keys {unknown}; expected some of {sorted(_SET_KEYS)}")
  if "name" not in entry:
    raise ValueError("missing 'name'")
  if "concepts" not in entry:
    raise ValueError("missing 'concepts'")
  templates = entry.get("templates")
  if isinstance(templates, list):
    templates = tuple(templates)
  return ConceptSet(
      name=entry["name"],
      concepts=parse_concepts(entry["concepts"]),
      guides=_optional_strings(entry.get("guides"), "guides"),
      preserve=_optional_strings(entry.get("preserve"), "preserve") or (),
      preset=entry.get("preset", default_preset),
      templates=templates,
      others=(_optional_strings(entry.get("others"), "others")
              or list_others(entry["concepts"])))


def load_sets_file(path, *, default_preset: str = "scapre") -> list[ConceptSet]:
  """Parses a JSONL sets file: one set per non-blank line (lines starting
  with '#' are comments); `default_preset` serves sets that name none.

  Raises ValueError "FILE:LINE: problem" for bad JSON, empty concept lists,
  unknown presets or keys, and duplicate names, before any work starts.
  """
  path = pathlib.Path(path)
  try:
    lines = path.read_text("utf-8").splitlines()
  except OSError as err:
    raise ValueError(f"cannot read sets file {path}: {err.strerror}") from None
  except UnicodeDecodeError:
    raise ValueError(f"sets file {path} is not UTF-8 text") from None
  sets, seen = [], {}
  for number, line in enumerate(lines, 1):
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    try:
      entry = json.loads(line)
    except json.JSONDecodeError as err:
      raise ValueError(f"{path}:{number}: bad JSON: {err.msg} (column {err.colno})") from None
    try:
      concept_set = set_from_dict(entry, default_preset=default_preset)
    except ValueError as err:
      raise ValueError(f"{path}:{number}: {err}") from None
    if concept_set.name in seen:
      raise ValueError(f"{path}:{number}: duplicate set name {concept_set.name!r} "
                       f"(first on line {seen[concept_set.name]})")
    seen[concept_set.name] = number
    sets.append(concept_set)
  if not sets:
    raise ValueError(f"sets file {path} holds no sets")
  return sets
