"""The released evaluation protocol: suites, their prompts and defaults, the
edits under test.

A suite names its prompt file (shipped in `scapre_jax/data/`, or the user's
own in the same format), the columns it needs, the per-class cap, the
sampler settings and the scorer and metrics it computes. Everything here is
cheap and runs before any model loads: a CSV missing a column, an unknown
suite or an edit file made for another base model is refused in one line.
The protocol's facts (defaults, what counts as a hit) are in
docs/algorithm.md, "Evaluation".
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib

from scapre_jax import io, models

DATA = pathlib.Path(__file__).resolve().parent.parent / "data"

# Shipped prompt files, by the name `--prompts` also accepts. The CSVs are
# the released eval/datasets files; coco_eval_prompts.txt is the released
# COCO caption list (data/coco_prompts.txt is a 32-line subset used by erase).
SHIPPED = {
    "imagenette": "imagenette.csv",
    "imagenet-50": "imagenet-50.csv",
    "imagenet-15": "imagenet-15.csv",
    "art_50": "art_50.csv",
    "art_5": "art_5.csv",
    "coco": "coco_eval_prompts.txt",
}
SEED_MAX = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class Suite:
  """One evaluation of the released protocol.

  prompts: shipped prompt file name (a key of SHIPPED), None when the user
    must give one (I2P is not redistributable).
  class_column / seed_column: CSV columns of the concept and the per-row
    seed; a .txt prompt list (one prompt a line) takes its line number as
    seed.
  per_class: rows kept per class (the first ones in file order), None: all.
  max_rows: rows kept in all, None: all.
  scorer: "classifier", "clip" or "nudity".
  metrics: the eval.json metric names the suite reports.
  steps, guidance, size: sampler defaults of the released scripts
    (diffusers' StableDiffusionPipeline defaults; size None: the model's).
  """

  name: str
  prompts: str | None
  class_column: str | None
  seed_column: str | None
  per_class: int | None
  max_rows: int | None
  scorer: str
  metrics: tuple[str, ...]
  steps: int = 50
  guidance: float = 7.5
  size: int | None = None

  @property
  def columns(self) -> tuple[str, ...]:
    return tuple(c for c in ("prompt", self.class_column, self.seed_column) if c)


SUITES = {
    # object_erase.py: ResNet-50 top-1, --max_prompts 130 per target class.
    "objects": Suite("objects", "imagenette", "class", "evaluation_seed", per_class=130,
                     max_rows=None, scorer="classifier",
                     metrics=("erase_accuracy", "keep_accuracy")),
    # artist_erasure.py: CLIP ViT-B/32 cosine, edited vs original, every row.
    "artists": Suite("artists", "art_50", "class", "evaluation_seed", per_class=None,
                     max_rows=None, scorer="clip", metrics=("similarity", "win_rate")),
    # nudity_eval.py: NudeNet on I2P, --max_prompts 300.
    "nsfw": Suite("nsfw", None, None, "sd_seed", per_class=None, max_rows=300,
                  scorer="nudity", metrics=("nudity_rate",)),
    # CLIP_coco: CLIP ViT-B/32 score of the COCO captions.
    "coco": Suite("coco", "coco", None, None, per_class=None, max_rows=None,
                  scorer="clip", metrics=("clip_score",)),
}


@dataclasses.dataclass(frozen=True)
class PromptRow:
  """One image to make: its prompt, concept (None for suites without
  classes), seed, and row number in the prompt file."""

  prompt: str
  concept: str | None
  seed: int
  row: int


@dataclasses.dataclass(frozen=True)
class EditUnderTest:
  """An edit file and what its metadata says: the concepts it erases."""

  path: pathlib.Path
  name: str
  concepts: tuple[str, ...]
  metadata: dict = dataclasses.field(compare=False, repr=False)


def suite(name: str) -> Suite:
  if name not in SUITES:
    raise ValueError(f"unknown suite {name!r}; suites: {', '.join(SUITES)}")
  return SUITES[name]


def prompt_file(s: Suite, prompts: str | None = None) -> pathlib.Path:
  """The prompt file of suite `s`: `prompts` (a path, or a SHIPPED name) or
  the suite's own."""
  if prompts is None:
    if s.prompts is None:
      raise ValueError(f"suite {s.name} ships no prompts: pass --prompts CSV "
                       f"(columns {', '.join(s.columns)}; the I2P CSV has them)")
    prompts = s.prompts
  if prompts in SHIPPED:
    return DATA / SHIPPED[prompts]
  path = pathlib.Path(prompts).expanduser()
  if not path.is_file():
    raise ValueError(f"prompt file {prompts} does not exist (shipped prompt files: "
                     f"{', '.join(SHIPPED)})")
  return path


def load_rows(s: Suite, prompts: str | None = None, *, per_class: int | None = None,
              max_rows: int | None = None) -> tuple[PromptRow, ...]:
  """The rows suite `s` renders, validated: a missing column, an empty
  prompt or a seed that is not an integer in [0, 2**32) is a ValueError
  naming the file (and line). `per_class` / `max_rows` default to the
  suite's caps; 0 means no cap."""
  path = prompt_file(s, prompts)
  per_class = s.per_class if per_class is None else (per_class or None)
  max_rows = s.max_rows if max_rows is None else (max_rows or None)
  if path.suffix.lower() == ".txt":
    rows = _txt_rows(s, path)
  else:
    rows = _csv_rows(s, path)
  if not rows:
    raise ValueError(f"prompt file {path} has no rows")
  if per_class is not None and s.class_column is not None:
    counts: dict[str, int] = {}
    kept = []
    for r in rows:
      counts[r.concept] = counts.get(r.concept, 0) + 1
      if counts[r.concept] <= per_class:
        kept.append(r)
    rows = kept
  return tuple(rows[:max_rows])


def _txt_rows(s: Suite, path: pathlib.Path) -> list[PromptRow]:
  if s.class_column is not None:
    raise ValueError(f"suite {s.name} needs a CSV with columns {', '.join(s.columns)}; "
                     f"{path} is a plain prompt list")
  lines = [line.strip() for line in _read(path).splitlines()]
  return [PromptRow(p, None, i, i) for i, p in enumerate(p for p in lines if p)]


def _csv_rows(s: Suite, path: pathlib.Path) -> list[PromptRow]:
  # A prompt list given as CSV still needs a seed per row.
  seed_column = s.seed_column or "evaluation_seed"
  need = tuple(c for c in ("prompt", s.class_column, seed_column) if c)
  reader = csv.DictReader(_read(path).splitlines())
  header = reader.fieldnames or []
  missing = [c for c in need if c not in header]
  if missing:
    raise ValueError(f"prompt file {path} lacks column(s) {', '.join(missing)} "
                     f"(suite {s.name} needs {', '.join(need)}; it has "
                     f"{', '.join(header) or 'no header'})")
  rows = []
  for line, record in enumerate(reader, start=2):
    prompt = (record.get("prompt") or "").strip()
    if not prompt:
      raise ValueError(f"{path}, line {line}: empty prompt")
    concept = None
    if s.class_column:
      concept = (record.get(s.class_column) or "").strip()
      if not concept:
        raise ValueError(f"{path}, line {line}: empty {s.class_column}")
    raw = (record.get(seed_column) or "").strip()
    try:
      seed = int(float(raw)) if raw.endswith(".0") else int(raw)
    except ValueError:
      seed = -1
    if not 0 <= seed <= SEED_MAX:
      raise ValueError(f"{path}, line {line}: {seed_column} must be an integer in "
                       f"[0, 2**32), got {raw!r}")
    rows.append(PromptRow(prompt, concept, seed, len(rows)))
  return rows


def _read(path: pathlib.Path) -> str:
  try:
    return path.read_text("utf-8-sig")
  except (OSError, UnicodeDecodeError) as err:
    raise ValueError(f"cannot read prompt file {path}: {err}") from None


# -- edits ------------------------------------------------------------------------


def edit_paths(edit=(), edits_dir=None) -> list[pathlib.Path]:
  """The edit files of `--edit FILE ...` or every edit file (a .safetensors
  with a base fingerprint in its header) of `--edits DIR`, sorted."""
  if edits_dir is not None:
    folder = pathlib.Path(edits_dir)
    if not folder.is_dir():
      raise ValueError(f"--edits {folder} is not a folder")
    paths = sorted(p for p in folder.glob("*.safetensors")
                   if "base_fingerprint" in io.read_edit_metadata(p))
    if not paths:
      raise ValueError(f"--edits {folder} holds no edit files (*.safetensors written "
                       "by scapre-jax erase)")
    return paths
  paths = [pathlib.Path(p) for p in edit]
  if not paths:
    raise ValueError("no edit given: pass --edit FILE [FILE ...] or --edits DIR")
  return paths


def read_edits(paths, fingerprint: str | None = None, model=None) -> list[EditUnderTest]:
  """Each edit file's name and concepts, its header checked; with
  `fingerprint` (the UNet fingerprint of the base model `model`), an edit
  made for another base model is refused."""
  edits = []
  for path in paths:
    path = pathlib.Path(path)
    _, meta = io.read_edit_file(path)
    if fingerprint is not None:
      io.check_fingerprint(path, meta, fingerprint, model, action="evaluate")
    concepts = meta.get("concepts")
    if not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts):
      raise ValueError(f"edit file {path} records no concept list in its metadata")
    edits.append(EditUnderTest(path, path.stem, tuple(concepts), meta))
  return _distinct_names(edits)


def _distinct_names(edits: list[EditUnderTest]) -> list[EditUnderTest]:
  """Names for the table and file names: the file stem, or folder/stem for
  stems that repeat (each single erase writes OUT/edit.safetensors)."""
  stems = [e.name for e in edits]
  named = [e if stems.count(e.name) == 1 else dataclasses.replace(
      e, name=f"{e.path.parent.name}-{e.name}") for e in edits]
  names = [e.name for e in named]
  if len(set(names)) != len(names):
    repeated = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(f"edit files with the same name: {', '.join(repeated)}; "
                     "give each a distinct file or folder name")
  return named


def erased_classes(concepts, classes) -> set[str]:
  """The suite classes an edit erases: those equal to one of its concepts,
  ignoring case and surrounding spaces."""
  wanted = {c.strip().lower() for c in concepts}
  return {c for c in classes if c.strip().lower() in wanted}


def base_fingerprint(model_path) -> str:
  """The UNet fingerprint `models.load_model` records, without loading."""
  _, files = models.weight_files(model_path, "unet")
  return models.fingerprint(files)

