"""Smoke test of scripts/bench_edit.py and scripts/plot_benchmarks.py on the
tiny shapes, so the benchmark keeps running as the engine changes."""

import collections
import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

import convert
from scapre_jax import models

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
  # The tiny model's UNet: one attention in down_blocks_0 and mid, two in up_blocks_1.
  assert record["concepts"] == 2 and record["matrices"] == 8
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


def test_sdxl_family_has_sdxl_base_sizes(bench):
  # SDXL-base: 70 attn2 layers (docs: down 2x2 + 2x10, mid 10, up 3x10 + 3x2),
  # to_k and to_v each, d_in 768 + 1280.
  shapes = bench.kernel_shapes(bench.FAMILIES["sdxl"])
  assert len(shapes) == bench.SDXL_BASE_MATRICES == 140
  assert collections.Counter(shapes.values()) == {(2048, 640): 20, (2048, 1280): 120}
  assert len(bench.kernel_shapes(bench.FAMILIES["sd15"])) == 32
  # Both encoders at full size: with CLIP's 49408-token vocabulary their
  # parameter counts are the released ones (CLIP ViT-L/14's text model,
  # SDXL-base's text_encoder_2, OpenCLIP bigG with projection).
  family = bench.FAMILIES["sdxl"]
  sizes = []
  for part, overrides in zip(models.TEXT_PARTS, family.text):
    base = getattr(bench.tiny.TINY_CONFIGS["sdxl"], part)
    abstract = models.abstract_params(part, {**base, **overrides, "vocab_size": 49408})
    sizes.append(sum(int(np.prod(a.shape)) for a in convert.flatten(abstract).values()))
  assert sizes == [123_060_480, 694_659_840]


def test_sdxl_family_runs_and_times_the_engine_edit(bench, tmp_path):
  # tiny-sdxl: the tiny SDXL's UNet (22 matrices, context 32 + 64) and both
  # of its encoders, through the same path as --family sdxl. In float64 the
  # timed phases (statistics, then one edit_kernel_stack per shape group)
  # must give edit_projections' result to rounding.
  [record] = bench.main(["--family", "tiny-sdxl", "--concepts", "2", "--repeat", "1",
                         "--in-process", "--no-profile", "--precision", "float64",
                         "--mi-mode", "canonical", "--json", str(tmp_path / "sdxl.json")])
  assert "reference_total_s" not in record  # no released SDXL procedure
  assert record["shapes"] == "tiny-sdxl" and record["matrices"] == 22
  assert record["d_in"] == 96
  assert record["phases_max_rel_diff"] < 1e-12
  model = bench.build_model("tiny-sdxl", 0, "float64")
  assert [t.part for t in model.text_encoders] == list(models.TEXT_PARTS)
  assert model.context_layer == "penultimate"
  assert record["ours_encode_s"] > 0 and record["ours_solve_s"] > 0


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
