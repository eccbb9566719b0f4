#!/usr/bin/env python
"""Plots and markdown tables from the JSON files of scripts/bench_edit.py.

  python scripts/plot_benchmarks.py benchmarks/edit_cpu.json benchmarks/sets_cpu.json \\
      --out benchmarks --markdown

Writes time_vs_concepts.png (ours and the reference against N),
ours_phases.png (where our time goes, per N) and throughput_vs_sets.png
(K sets in one call against K calls); --markdown prints the tables.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(paths) -> tuple[list[dict], list[dict]]:
  """(edit records sorted by N, sets records sorted by N, K); failures dropped."""
  records = []
  for path in paths:
    data = json.loads(pathlib.Path(path).read_text())
    for record in data["results"]:
      if "error" not in record:
        record.setdefault("source", str(path))
        records.append(record)
  edits = sorted((r for r in records if r["kind"] == "edit"),
                 key=lambda r: (r["concepts"], r.get("matrix_batch") or 0))
  sets = sorted((r for r in records if r["kind"] == "sets"),
                key=lambda r: (r["concepts"], r["sets"]))
  return edits, sets


SHAPE_NAMES = {"sd15": "SD-1.5", "sdxl": "SDXL-base"}


def shapes_of(records) -> str:
  """The model whose shapes the records measure ("SD-1.5 shapes"); records
  written before `shapes` was recorded are SD 1.5's."""
  names = sorted({SHAPE_NAMES.get(r.get("shapes", "sd15"), r.get("shapes"))
                  for r in records})
  return " and ".join(names) + " shapes"


def plot_times(edits, out: pathlib.Path) -> pathlib.Path:
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  series = [
      (edits, "ours_total_s", "ours: whole edit (encoding included)", "C0", "-", "o"),
      (edits, "ours_solve_s", "ours: per-matrix phase", "C0", "--", "o"),
      (edits, "ours_linear_solve_s", "ours: step-6 solves", "C0", ":", "o"),
      (edits, "reference_total_s", "reference: released procedure", "C3", "-", "s"),
      (edits, "reference_hoisted_total_s", "reference: encoding hoisted", "C1", "-", "s"),
      (edits, "reference_solve_s", "reference: per-matrix phase", "C3", "--", "s"),
      (edits, "reference_linear_solve_s", "reference: step-6 per-row Cholesky", "C3", ":",
       "s"),
  ]
  for records, key, label, color, style, marker in series:
    points = [(r["concepts"], r[key]) for r in records if key in r]
    if points:
      x, y = zip(*points)
      ax.plot(x, y, style, color=color, marker=marker, label=label)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("concepts N")
  ax.set_ylabel("seconds (after compilation)")
  ax.set_title(f"ScaPre edit, {shapes_of(edits)}, {edits[0]['jax_device_kind']}")
  return _save(fig, ax, out / "time_vs_concepts.png")


def plot_phases(edits, out: pathlib.Path) -> pathlib.Path:
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  labels = [str(r["concepts"]) for r in edits]
  bottom = [0.0] * len(edits)
  for key, label in (("ours_encode_s", "text encoding"),
                     ("ours_statistics_s", "statistics"),
                     ("ours_solve_s", "per-matrix edit")):
    values = [r[key] for r in edits]
    ax.bar(labels, values, bottom=bottom, label=label)
    bottom = [b + v for b, v in zip(bottom, values)]
  ax.set_xlabel("concepts N")
  ax.set_ylabel("seconds (after compilation)")
  ax.set_title("Where our time goes")
  ax.legend()
  fig.tight_layout()
  path = out / "ours_phases.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_sets(sets, out: pathlib.Path) -> pathlib.Path:
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for n in sorted({r["concepts"] for r in sets}):
    rows = [r for r in sets if r["concepts"] == n]
    k = [r["sets"] for r in rows]
    ax.plot(k, [r["batched_sets_per_s"] for r in rows], "-o",
            label=f"one edit_sets call (N={n})")
    ax.plot(k, [r["sequential_sets_per_s"] for r in rows], "--s",
            label=f"K edit_projections calls (N={n})")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("concept sets K")
  ax.set_ylabel("sets per second")
  ax.set_title(f"Batched throughput, {shapes_of(sets)}, {sets[0]['jax_device_kind']}")
  return _save(fig, ax, out / "throughput_vs_sets.png")


def _save(fig, ax, path: pathlib.Path) -> pathlib.Path:
  """Grid, legend, layout, PNG file; closes the figure."""
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _fmt(value, digits=2) -> str:
  if value is None:
    return "-"
  if value >= 100:
    return f"{value:.0f}"
  return f"{value:.{digits}f}"


def _profile_table(records, field: str, keys: tuple[str, ...]) -> list[str]:
  """Markdown lines of the per-piece seconds in `field`, one row per record
  that has them, led by the `keys` columns (N, K)."""
  profiled = [r for r in records if field in r]
  if not profiled:
    return []
  parts = list(profiled[0][field])
  names = {"concepts": "N", "sets": "K"}
  lines = ["", "| " + " | ".join([names[k] for k in keys] + [p + " s" for p in parts]) + " |",
           "|" + "---|" * (len(keys) + len(parts))]
  for r in profiled:
    lines.append("| " + " | ".join([str(r[k]) for k in keys]
                                   + [_fmt(r[field].get(p), 3) for p in parts]) + " |")
  return lines


def tables(edits, sets) -> str:
  lines = []
  if edits:
    lines += [
        "| N | matrix_batch | compile s | encode s | statistics s | solve s | ours total s | "
        "peak RSS MiB | reference released s | reference hoisted s | "
        "reference solve s | total speedup | hoisted speedup | solve speedup | "
        "step-6 ours s | step-6 reference s | step-6 speedup |",
        "|" + "---|" * 17]
    for r in edits:
      lines.append("| " + " | ".join([
          str(r["concepts"]), str(r.get("matrix_batch") or "all"),
          _fmt(r["ours_compile_s"], 1), _fmt(r["ours_encode_s"]),
          _fmt(r["ours_statistics_s"]), _fmt(r["ours_solve_s"]), _fmt(r["ours_total_s"]),
          _fmt(r["peak_rss_mib"], 0), _fmt(r.get("reference_total_s"), 0),
          _fmt(r.get("reference_hoisted_total_s"), 0), _fmt(r.get("reference_solve_s"), 1),
          _fmt(r.get("speedup_total"), 1) + ("x" if "speedup_total" in r else ""),
          _fmt(r.get("speedup_total_hoisted"), 1) + ("x" if "speedup_total" in r else ""),
          _fmt(r.get("speedup_solve"), 1) + ("x" if "speedup_solve" in r else ""),
          _fmt(r.get("ours_linear_solve_s"), 3), _fmt(r.get("reference_linear_solve_s"), 1),
          _fmt(r.get("speedup_linear_solve"), 1)
          + ("x" if "speedup_linear_solve" in r else ""),
      ]) + " |")
    lines += _profile_table(edits, "ours_profile_s", ("concepts",))
    referenced = [r for r in edits if "reference_phases_s" in r]
    if referenced:
      parts = list(referenced[0]["reference_phases_s"])
      lines += ["", "| N | encode (released) s | " + " | ".join(p + " s" for p in parts)
                + " |", "|" + "---|" * (len(parts) + 2)]
      for r in referenced:
        lines.append(f"| {r['concepts']} | {_fmt(r['reference_encode_s'], 0)} | " + " | ".join(
            _fmt(r["reference_phases_s"][p], 1) for p in parts) + " |")
  if sets:
    lines += ["", "| N | K | one call s | K calls s | speedup | sets/s batched | "
              "sets/s sequential | compile s | peak RSS MiB | max abs diff |",
              "|" + "---|" * 10]
    for r in sets:
      lines.append("| " + " | ".join([
          str(r["concepts"]), str(r["sets"]), _fmt(r["batched_s"]), _fmt(r["sequential_s"]),
          _fmt(r["speedup_batched"]) + "x", _fmt(r["batched_sets_per_s"], 3),
          _fmt(r["sequential_sets_per_s"], 3), _fmt(r["batched_compile_s"], 1),
          _fmt(r["peak_rss_mib"], 0), f"{r['max_abs_diff']:.1e}"]) + " |")
    lines += _profile_table(sets, "batched_profile_s", ("concepts", "sets"))
  return "\n".join(lines)


def main(argv=None) -> list[pathlib.Path]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("json", nargs="+", type=pathlib.Path,
                      help="result files of scripts/bench_edit.py")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks"),
                      help="folder for the PNG files")
  parser.add_argument("--markdown", action="store_true", help="print markdown tables")
  args = parser.parse_args(argv)
  edits, sets = load(args.json)
  args.out.mkdir(parents=True, exist_ok=True)
  written = []
  if edits:
    written += [plot_times(edits, args.out), plot_phases(edits, args.out)]
  if sets:
    written.append(plot_sets(sets, args.out))
  for path in written:
    print(f"wrote {path}")
  if args.markdown:
    print(tables(edits, sets))
  return written


if __name__ == "__main__":
  main()
