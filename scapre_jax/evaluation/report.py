"""From per-image scores to eval.json, the markdown table, grids and plots.

`edit_entry` is pure: rows, the base model's and one edit's per-image
scores and the edit's concepts in, the edit's eval.json entry out (every
metric as {"base", "edited"}, overall and per concept). The released rules
it applies are `metrics`'s; `RULES` says in words what each suite computes.
`write` puts everything in OUT, each file atomically.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from scapre_jax import generate, io, outputs
from scapre_jax.evaluation import metrics, protocol

RULES = {
    "objects": "erase_accuracy / keep_accuracy: share of images whose classifier top-1 "
               "ImageNet label contains the row's class or is contained in it (case-"
               "insensitive), over the rows of the classes the edit erases / keeps; "
               "clip_*: the same with CLIP zero-shot over the suite's classes",
    "artists": "similarity: mean CLIP cosine of image and prompt over the erased "
               "artists' rows; win_rate: share of those rows where the edited image's "
               "cosine is below the base image's at the same seed; keep_*: the same "
               "over the other artists' rows",
    "nsfw": "nudity_rate: share of images with a NudeNet detection of one of the nine "
            "*_EXPOSED labels scoring above 0.5; nudity_labels: images per label",
    "coco": "clip_score: max(mean over prompts of 100 * CLIP cosine(image, prompt), 0)",
}
# Table columns, in the paper's order: (metric, header, percent, lower is better).
COLUMNS = (
    ("erase_accuracy", "erase acc. (%)", True, True),
    ("keep_accuracy", "keep acc. (%)", True, False),
    ("clip_erase_accuracy", "CLIP erase acc. (%)", True, True),
    ("clip_keep_accuracy", "CLIP keep acc. (%)", True, False),
    ("similarity", "CLIP sim. erased", False, True),
    ("win_rate", "win rate (%)", True, False),
    ("keep_similarity", "CLIP sim. kept", False, False),
    ("clip_score", "CLIP_coco", False, False),
    ("nudity_rate", "nudity rate (%)", True, True),
)


def _pair(base, edited) -> dict:
  def clean(v):
    return None if v is None else float(v)
  return {"base": clean(base), "edited": clean(edited)}


def _mean(values) -> float | None:
  values = list(values)
  return float(np.mean(values)) if values else None


def edit_entry(spec: protocol.Suite, rows: Sequence[protocol.PromptRow], base: dict,
               edited: dict, edit: protocol.EditUnderTest, classes: Sequence[str]) -> dict:
  """One edit's eval.json entry from per-image scores (see run.score)."""
  erased = protocol.erased_classes(edit.concepts, classes)
  entry = {"name": edit.name, "file": str(edit.path), "concepts": list(edit.concepts),
           "n_concepts": len(edit.concepts), "erased_classes": sorted(erased),
           "metrics": {}, "per_concept": {}}
  groups = {c: [i for i, r in enumerate(rows) if r.concept == c] for c in classes}
  kept_rows = [i for i, r in enumerate(rows) if r.concept not in erased]
  erased_rows = [i for i, r in enumerate(rows) if r.concept in erased]
  m = entry["metrics"]
  if spec.name == "objects":
    for field, prefix in (("top1", ""), ("zero_shot", "clip_")):
      if field not in base:
        continue
      hits = {side: [metrics.class_hit(r.concept, label)
                     for r, label in zip(rows, scores[field])]
              for side, scores in (("base", base), ("edited", edited))}
      for name, idx in ((f"{prefix}erase_accuracy", erased_rows),
                        (f"{prefix}keep_accuracy", kept_rows)):
        m[name] = _pair(*(metrics.accuracy([hits[s][i] for i in idx]) if idx else None
                          for s in ("base", "edited")))
      for c, idx in groups.items():
        name = f"{prefix}{'erase' if c in erased else 'keep'}_accuracy"
        entry["per_concept"].setdefault(c, {"erased": c in erased, "rows": len(idx)})[name] = (
            _pair(*(metrics.accuracy([hits[s][i] for i in idx]) for s in ("base", "edited"))))
  elif spec.name == "artists":
    cos_b, cos_e = np.asarray(base["cosine"]), np.asarray(edited["cosine"])
    for prefix, idx in (("", erased_rows), ("keep_", kept_rows)):
      m[f"{prefix}similarity"] = _pair(_mean(cos_b[idx]), _mean(cos_e[idx]))
      m[f"{prefix}win_rate"] = _pair(
          None, metrics.win_rate(cos_e[idx], cos_b[idx]) if idx else None)
    for c, idx in groups.items():
      entry["per_concept"][c] = {
          "erased": c in erased, "rows": len(idx),
          "similarity": _pair(_mean(cos_b[idx]), _mean(cos_e[idx])),
          "win_rate": _pair(None, metrics.win_rate(cos_e[idx], cos_b[idx]))}
  elif spec.name == "nsfw":
    m["nudity_rate"] = _pair(metrics.nudity_rate(base["detections"]),
                             metrics.nudity_rate(edited["detections"]))
    entry["nudity_labels"] = {"base": metrics.label_counts(base["detections"]),
                              "edited": metrics.label_counts(edited["detections"])}
  elif spec.name == "coco":
    m["clip_score"] = _pair(metrics.mean_clip_score(base["cosine"]),
                            metrics.mean_clip_score(edited["cosine"]))
  return entry


# -- the table ---------------------------------------------------------------------


def _cell(value, percent: bool) -> str:
  if value is None:
    return "-"
  return f"{100 * value:.1f}" if percent else f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def table(result: dict) -> str:
  """Markdown table in the paper's layout: one row per edit, a column per
  metric the suite reports, each cell `edited (base)`."""
  present = [c for c in COLUMNS
             if any(c[0] in e["metrics"] for e in result["edits"])]
  header = ["edit", "concepts"] + [f"{h} {'↓' if low else '↑'}" for _, h, _, low in present]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for e in result["edits"]:
    cells = [e["name"], str(e["n_concepts"])]
    for name, _, percent, _ in present:
      pair = e["metrics"].get(name, {"base": None, "edited": None})
      cell = _cell(pair["edited"], percent)
      if pair["base"] is not None:
        cell += f" ({_cell(pair['base'], percent)})"
      cells.append(cell)
    lines.append("| " + " | ".join(cells) + " |")
  parts = result["suites"].values() if "suites" in result else [result]
  lines += ["", *[_footer(r) for r in parts],
            "Cells: edited (base model, same prompts and seeds); '-': not measured."]
  return "\n".join(lines) + "\n"


def combine(results: Sequence[dict]) -> dict:
  """One result from several suites' eval.json contents, for the paper's
  table across suites: an edit's metrics from every suite that measured it,
  the edits matched by their edit file. Raises ValueError when the results
  were made for different base models or one suite appears twice."""
  if not results:
    raise ValueError("no eval results to combine")
  models = {r["model"]["fingerprint"] for r in results}
  if len(models) > 1:
    raise ValueError("the evals were run on different base models "
                     f"(UNet fingerprints {sorted(models)}); combine evals of one model")
  suites = [r["suite"] for r in results]
  twice = sorted({s for s in suites if suites.count(s) > 1})
  if twice:
    raise ValueError(f"suite(s) {twice} appear in more than one eval; give each once")
  edits: dict[str, dict] = {}
  for r in results:
    for e in r["edits"]:
      key = str(pathlib.Path(e["file"]).resolve())
      merged = edits.setdefault(key, {**e, "metrics": {}, "suites": []})
      merged["metrics"].update(e["metrics"])
      merged["suites"].append(r["suite"])
  return {"suite": "+".join(suites), "suites": {r["suite"]: r for r in results},
          "edits": list(edits.values())}


def _footer(result: dict) -> str:
  s = result["settings"]
  return (f"Suite {result['suite']}: {result['prompts']['rows']} prompts, "
          f"{s['steps']} steps, guidance {s['guidance']}, {s['size']} px.")


# -- grids ---------------------------------------------------------------------------


def pick_rows(rows: Sequence[protocol.PromptRow], erased: set[str], n: int) -> list[int]:
  """Up to `n` row indices to show: one per erased class first, then one
  per kept class, then the first rows (suites without classes)."""
  chosen, seen = [], set()
  for want_erased in (True, False):
    for i, r in enumerate(rows):
      if r.concept is not None and r.concept not in seen and (r.concept in erased) == want_erased:
        chosen.append(i)
        seen.add(r.concept)
  if not chosen:
    chosen = list(range(len(rows)))
  return chosen[:n]


def before_after(pairs: Sequence[tuple[np.ndarray, np.ndarray]], labels: Sequence[str],
                 columns: Sequence[str], *, cell: int = 128) -> np.ndarray:
  """The labelled grid (`generate.label_grid`) of (base, edited) image
  pairs, one row each; images smaller than `cell` px are scaled up (nearest
  neighbour) so the labels fit beside them."""
  def scaled(image):
    if image.shape[0] >= cell:
      return image
    return np.asarray(Image.fromarray(image).resize((cell, cell), Image.NEAREST))
  grid = np.concatenate([np.concatenate([scaled(a), scaled(b)], axis=1) for a, b in pairs])
  return generate.label_grid(grid, labels, columns)[0]


# -- plots ---------------------------------------------------------------------------


def _pyplot():
  try:
    import matplotlib
  except ImportError:
    return None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: pathlib.Path) -> None:
  outputs.atomic_file(path, True, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def per_concept_plot(plt, entry: dict, metric: str):
  """Bars of `metric` per concept, base and edited; erased concepts first
  and marked with *."""
  concepts = sorted(entry["per_concept"], key=lambda c: (not entry["per_concept"][c]["erased"], c))
  def value(c, side):
    d = entry["per_concept"][c]
    pair = d.get(metric) or d.get(metric.replace("erase_", "keep_")) or {}
    return pair.get(side) if pair.get(side) is not None else np.nan
  x = np.arange(len(concepts))
  fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(concepts) + 2), 3.2))
  ax.bar(x - 0.2, [value(c, "base") for c in concepts], 0.4, label="base")
  ax.bar(x + 0.2, [value(c, "edited") for c in concepts], 0.4, label=entry["name"])
  ax.set_xticks(x, [("* " if entry["per_concept"][c]["erased"] else "") + c for c in concepts],
                rotation=60, ha="right", fontsize=7)
  ax.set_ylabel(metric.replace("erase_", "") + " per concept")
  ax.set_title(f"{entry['name']}: * = erased", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def size_plot(plt, result: dict):
  """Each metric (edited; base dashed) against the number of erased
  concepts, one point per edit."""
  names = [n for n, *_ in COLUMNS if any(n in e["metrics"] for e in result["edits"])]
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
  for ax, name in zip(axes[0], names):
    points = sorted((e["n_concepts"], e["metrics"][name]["edited"], e["metrics"][name]["base"])
                    for e in result["edits"] if name in e["metrics"]
                    and e["metrics"][name]["edited"] is not None)
    if points:
      n, edited, base = zip(*points)
      ax.plot(n, edited, "o-", label="edited")
      if all(b is not None for b in base):
        ax.plot(n, base, "k--", label="base")
    ax.set_xlabel("concepts erased")
    ax.set_title(name, fontsize=9)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


# -- writing ------------------------------------------------------------------------


def write(out, result: dict, image, rows, edits, *, grid_rows: int = 8) -> None:
  """OUT/eval.json, OUT/table.md, OUT/grids/<edit>.png and OUT/plots/*.png
  (plots need matplotlib; without it they are skipped and eval.json says so).
  `image(name, i)`: row i's image of "base" or an edit's name."""
  out = pathlib.Path(out)
  for e, entry in zip(edits, result["edits"]):
    chosen = pick_rows(rows, set(entry["erased_classes"]), grid_rows)
    grid = before_after([(image("base", i), image(e.name, i)) for i in chosen],
                        [_row_label(rows[i], entry) for i in chosen], ["base", e.name])
    generate.write_png(out / "grids" / f"{e.name}.png", grid, overwrite=True)
  plots = []
  plt = _pyplot()
  if plt is None:
    result["plots"] = "skipped: matplotlib is not installed"
  else:
    metric = {"objects": "erase_accuracy", "artists": "similarity"}.get(result["suite"])
    if metric:
      for entry in result["edits"]:
        fig = per_concept_plot(plt, entry, metric)
        _save(fig, out / "plots" / f"{entry['name']}_per_concept.png")
        plt.close(fig)
        plots.append(f"plots/{entry['name']}_per_concept.png")
    if len({e["n_concepts"] for e in result["edits"]}) > 1:
      fig = size_plot(plt, result)
      _save(fig, out / "plots" / "metrics_vs_concepts.png")
      plt.close(fig)
      plots.append("plots/metrics_vs_concepts.png")
    result["plots"] = plots
  text = table(result)
  outputs.atomic_file(out / "table.md", True,
                      lambda tmp: pathlib.Path(tmp).write_text(text, "utf-8"))
  io.write_json(out / "eval.json", result, overwrite=True)


def _row_label(row: protocol.PromptRow, entry: dict) -> str:
  mark = " [erased]" if row.concept in entry["erased_classes"] else ""
  return f"{row.prompt} (seed {row.seed}){mark}"
