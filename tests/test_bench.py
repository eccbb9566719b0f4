"""Smoke test of scripts/bench_edit.py and scripts/plot_benchmarks.py on the
tiny shapes, so the benchmark keeps running as the engine changes."""

import importlib.util
import json
import pathlib
import sys

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"


def load_script(name):
  spec = importlib.util.spec_from_file_location(f"bench_{name}", SCRIPTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def bench():
  return load_script("bench_edit")


def test_edit_and_sets_benchmarks_run(bench, tmp_path):
  edit_json, sets_json = tmp_path / "edit.json", tmp_path / "sets.json"
  common = ["--family", "tiny", "--concepts", "2", "--repeat", "1", "--in-process",
            "--ref-concepts", "1", "--ref-encodes", "1", "--ref-rows", "8"]
  [record] = bench.main(common + ["--json", str(edit_json), "--no-profile"])
  for key in ("ours_total_s", "reference_total_s", "ours_solve_s", "reference_solve_s",
              "peak_rss_mib", "concepts", "device", "speedup_total", "speedup_solve"):
    assert key in record, key
  assert record["concepts"] == 2 and record["matrices"] == 6
  assert record["ours_total_s"] > 0 and record["reference_total_s"] > 0
  assert record["solve_rel_error_f32"]["ours"] < 1e-2
  assert json.loads(edit_json.read_text())["results"][0]["concepts"] == 2

  # Batched against alone in float64 with canonical MI, where they agree
  # whatever the CPU (docs/reproducibility.md); in float32 they differ by
  # CPU-specific rounding.
  [two] = bench.main(common + ["--sets", "2", "--json", str(sets_json),
                               "--precision", "float64", "--mi-mode", "canonical"])
  assert two["sets"] == 2 and two["concepts"] == 2 and two["precision"] == "float64"
  assert two["max_rel_diff"] < 1e-10
  assert two["batched_s"] > 0 and two["sequential_s"] > 0
  profile = two["batched_profile_s"]  # each piece vmapped over the two sets
  assert {"statistics", "mi_mask", "target_values", "linear_solve", "cholesky"} <= set(profile)
  assert all(seconds > 0 for seconds in profile.values())

  plots = load_script("plot_benchmarks")
  written = plots.main([str(edit_json), str(sets_json), "--out", str(tmp_path), "--markdown"])
  assert {p.name for p in written} == {
      "time_vs_concepts.png", "ours_phases.png", "throughput_vs_sets.png"}
  assert all(p.stat().st_size > 0 for p in written)


def test_help_lists_the_options(bench, capsys):
  with pytest.raises(SystemExit):
    bench.parse(["--help"])
  out = capsys.readouterr().out
  for option in ("--concepts", "--sets", "--preset", "--json", "--precision", "--family"):
    assert option in out


def test_solver_accuracy_script(tmp_path):
  # Tiny shapes (context 32): 20 concepts put the projector's rank past
  # d_in / 2, where the engine once switched to two eigendecompositions.
  accuracy = load_script("solver_accuracy")
  out = tmp_path / "accuracy.json"
  results = accuracy.main(["--shapes", "tiny", "--concepts", "3", "20", "--json", str(out)])
  assert [r["concepts"] for r in results] == [3, 20]
  assert results[1]["rank"] > 16
  for r in results:
    errors = r["rel_error_f32"]
    assert set(errors) == set(accuracy.FORMS)
    # Every form solves the same system; the engine's (Woodbury) is as
    # accurate as one Cholesky per row.
    assert errors["engine"] <= 2 * errors["released"] + 1e-5
    assert max(errors.values()) < 0.5
  assert json.loads(out.read_text())["results"][1]["rank"] == results[1]["rank"]
