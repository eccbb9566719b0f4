"""`scapre-jax eval`: render a suite's prompts with the base model and every
edit, score them with the suite's scorer, write eval.json, a table, grids
and plots.

Order of work: everything that can be wrong in the input (suite, prompt
CSV, scorer folder, edit files and their base model, output paths) is
checked before the model loads; then images are rendered (base once, then
each edit) into the content-keyed cache in OUT/images, so an interrupted
run resumes and a rerun renders nothing; then scored; then reported.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from scapre_jax import console, io, models, outputs, tiny
from scapre_jax.evaluation import images, protocol, report

EVAL_FILE = "eval.json"
TABLE_FILE = "table.md"
IMAGES_DIR = "images"
SCORE_CHUNK = 64  # images handed to a scorer at once


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Settings of one eval. None means the suite's released default.

  model: diffusers folder or cached Hugging Face id (None: the built-in
    tiny model). edits: edit files. suite: a key of protocol.SUITES.
  prompts: prompt file (path or shipped name). per_class / max_rows: row
    caps (0: none). steps, guidance, size: sampler settings. batch: images
    per compiled call. classifier / clip: scorer locations (folder, file or
    cached id). grid_rows: rows in each before/after grid.
  """

  edits: tuple[str, ...]
  suite: str
  out: str
  model: str | None = None
  prompts: str | None = None
  per_class: int | None = None
  max_rows: int | None = None
  steps: int | None = None
  guidance: float | None = None
  size: int | None = None
  batch: int = 8
  classifier: str | None = None
  clip: str | None = None
  dtype: str = "float32"
  grid_rows: int = 8

  def __post_init__(self):
    protocol.suite(self.suite)
    if isinstance(self.edits, str) or not self.edits:
      raise ValueError("no edit given: pass --edit FILE [FILE ...] or --edits DIR")
    for name in ("per_class", "max_rows"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    for name in ("steps", "batch", "grid_rows"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if self.guidance is not None and not (np.isfinite(self.guidance) and self.guidance >= 0):
      raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

  @property
  def spec(self) -> protocol.Suite:
    return protocol.suite(self.suite)

  def settings(self, size: int) -> dict:
    """Every setting as run: defaults filled in."""
    s = self.spec
    return {"suite": self.suite, "prompts": self.prompts or s.prompts,
            "per_class": s.per_class if self.per_class is None else (self.per_class or None),
            "max_rows": s.max_rows if self.max_rows is None else (self.max_rows or None),
            "steps": self.steps or s.steps,
            "guidance": s.guidance if self.guidance is None else float(self.guidance),
            "size": size, "batch": self.batch, "dtype": self.dtype,
            "seed_rule": "row seed s -> noise of jax.random.split(jax.random.key(s), 1)[0] "
                         "(as scapre-jax generate --seed s)"}


# -- scorers ------------------------------------------------------------------------


def check_scorer(config: EvalConfig) -> None:
  """Refuses a missing or wrong-kind scorer before anything is rendered."""
  kind = config.spec.scorer
  if kind == "classifier":
    if config.classifier is None:
      raise ValueError(f"suite {config.suite} needs --classifier (a ResNet-50: torchvision/"
                       "timm .safetensors file or a Hugging Face ResNet folder)")
    from scapre_jax.evaluation import classifier
    classifier.check_classifier(config.classifier)
  if kind == "clip" or config.clip is not None:
    if config.clip is None:
      raise ValueError(f"suite {config.suite} needs --clip (a CLIP ViT-B/32 folder or "
                       "cached id, e.g. openai/clip-vit-base-patch32)")
    from scapre_jax.evaluation import clip
    clip.check_clip(config.clip)
  if kind == "nudity" and importlib.util.find_spec("nudenet") is None:
    raise ValueError(f"suite {config.suite} needs NudeNet: pip install 'scapre-jax[eval]'")


def load_scorers(config: EvalConfig) -> dict:
  """{"classifier" | "clip" | "nudity": scorer} of the suite (and CLIP for
  zero-shot accuracy when --clip is given)."""
  found = {}
  if config.spec.scorer == "classifier":
    from scapre_jax.evaluation import classifier
    found["classifier"] = classifier.ImageClassifier.load(config.classifier)
  if config.clip is not None:
    from scapre_jax.evaluation import clip
    found["clip"] = clip.ClipScorer.load(config.clip)
  if config.spec.scorer == "nudity":
    from scapre_jax.evaluation import nudity
    found["nudity"] = nudity.NudityDetector()
  return found


def score(suite: protocol.Suite, scorers: dict, rows: Sequence[protocol.PromptRow],
          imgs: np.ndarray, classes: Sequence[str]) -> dict:
  """Per-image raw scores of one model's images: "top1" (labels), "zero_shot"
  (predicted class names), "cosine" (CLIP image-prompt cosine) or
  "detections" (NudeNet), as the suite needs."""
  out = {}
  if "classifier" in scorers:
    out["top1"] = list(scorers["classifier"].top1(imgs))
  if "clip" in scorers:
    if suite.class_column is not None and suite.scorer == "classifier":
      index = scorers["clip"].zero_shot(imgs, list(classes))
      out["zero_shot"] = [classes[int(i)] for i in index]
    if suite.scorer == "clip":
      out["cosine"] = [float(c) for c in scorers["clip"].cosine(imgs, [r.prompt for r in rows])]
  if "nudity" in scorers:
    out["detections"] = scorers["nudity"].detect(imgs)
  return out


# -- the run ---------------------------------------------------------------------------


def run(config: EvalConfig, *, scorers: dict | None = None, progress: bool = True,
        say: Callable[[str], None] | None = console.say,
        stop: Callable[[], None] | None = None) -> dict:
  """Runs the eval and returns eval.json's content. `scorers` replaces the
  configured ones (tests pass stand-ins); `stop()` is called between
  batches (the CLI's Ctrl-C check)."""
  say = say or (lambda _: None)
  spec = config.spec
  out = pathlib.Path(config.out)
  # -- every check before the model loads
  rows = protocol.load_rows(spec, config.prompts, per_class=config.per_class,
                            max_rows=config.max_rows)
  if scorers is None:
    check_scorer(config)
  model_path = (tiny.ensure_tiny_model() if config.model is None
                else models.resolve(config.model))
  fingerprint = protocol.base_fingerprint(model_path)
  edits = protocol.read_edits(config.edits, fingerprint, model_path)
  size = images.image_size(model_path, config.size)
  settings = config.settings(size)
  protected = [model_path, *(e.path for e in edits)]
  for name in (EVAL_FILE, TABLE_FILE):
    outputs.check_output(out / name, True, protected)
  with outputs.lock(out):
    outputs.clean_stale(out)
    return _run(config, spec, rows, model_path, fingerprint, edits, settings, out,
                scorers, progress, say, stop or (lambda: None))


def _run(config, spec, rows, model_path, fingerprint, edits, settings, out, scorers,
         progress, say, stop) -> dict:
  started = time.perf_counter()
  classes = sorted({r.concept for r in rows if r.concept is not None})
  context = images.model_context(model_path, steps=settings["steps"],
                                 guidance=settings["guidance"], size=settings["size"],
                                 dtype=config.dtype)
  cache = images.ImageCache(out / IMAGES_DIR)
  variants = [("base", None, None)] + [
      (e.name, e, images.edit_digest(io.read_edit_file(e.path)[0])) for e in edits]
  keys = {name: [images.content_key({**context, "edit": digest}, r.prompt, r.seed)
                 for r in rows] for name, _, digest in variants}
  missing = {name: [i for i, k in enumerate(keys[name]) if not cache.has(k)]
             for name, _, _ in variants}
  todo = sum(map(len, missing.values()))
  total = len(rows) * len(variants)
  say(f"eval: suite {spec.name}, {len(rows)} prompts x {len(variants)} models "
      f"(base + {len(edits)} edit(s)); {total - todo} image(s) cached, {todo} to render")
  generated = 0
  if todo:
    t0 = time.perf_counter()
    renderer = images.Renderer(model_path, steps=settings["steps"],
                               guidance=settings["guidance"], size=settings["size"],
                               batch=config.batch, dtype=config.dtype)
    say(f"load: {renderer.model.path} in {time.perf_counter() - t0:.1f} s")
    bar = _bar(todo, "render", progress)
    for name, edit, _ in variants:
      if not missing[name]:
        continue
      params = (renderer.base_params if edit is None
                else renderer.edited_params(io.read_edit_file(edit.path)[0]))
      todo_rows = missing[name]
      for start in range(0, len(todo_rows), renderer.batch):
        stop()
        chunk = todo_rows[start:start + renderer.batch]
        made = renderer.render(params, [rows[i].prompt for i in chunk],
                               [rows[i].seed for i in chunk])
        for i, image in zip(chunk, made):
          cache.put(keys[name][i], image)
        generated += len(chunk)
        bar.update(len(chunk))
    bar.close()

  if scorers is None:
    scorers = load_scorers(config)
  bar = _bar(total, "score", progress)
  scores = {}
  for name, _, _ in variants:
    # In chunks: 1300 SD-size images of one model are 1 GB.
    parts = []
    for start in range(0, len(rows), SCORE_CHUNK):
      stop()
      chunk = range(start, min(start + SCORE_CHUNK, len(rows)))
      imgs = np.stack([cache.get(keys[name][i]) for i in chunk])
      parts.append(score(spec, scorers, rows[chunk.start:chunk.stop], imgs, classes))
      bar.update(len(chunk))
    scores[name] = {field: [v for part in parts for v in part[field]] for field in parts[0]}
  bar.close()

  result = {
      "format": "scapre-jax-eval/1",
      "suite": spec.name,
      "settings": settings,
      "model": {"path": str(model_path), "fingerprint": fingerprint},
      "prompts": {"file": str(protocol.prompt_file(spec, config.prompts)),
                  "rows": len(rows), "classes": classes},
      "scorers": {kind: _describe(s) for kind, s in scorers.items()},
      "metrics_rule": report.RULES[spec.name],
      "edits": [report.edit_entry(spec, rows, scores["base"], scores[e.name], e, classes)
                for e in edits],
      "images": {"rendered": generated, "cached": total - generated},
  }
  result["time_s"] = round(time.perf_counter() - started, 3)
  report.write(out, result, lambda name, i: cache.get(keys[name][i]), rows, edits,
               grid_rows=config.grid_rows)
  say(f"wrote {out / EVAL_FILE}, {out / TABLE_FILE}")
  return result


def _describe(scorer) -> dict:
  describe = getattr(scorer, "describe", None)
  return describe() if callable(describe) else {"kind": type(scorer).__name__}


class _NoBar:
  def update(self, n: int) -> None:
    pass

  def close(self) -> None:
    pass


def _bar(total: int, label: str, enabled: bool):
  if not enabled:
    return _NoBar()
  from tqdm import tqdm
  return tqdm(total=total, desc=label, unit="img", file=sys.stderr, leave=False)
