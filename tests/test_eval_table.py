"""`scapre-jax eval-table`: the paper's table across suites from several
eval OUT folders (report.combine), checked on hand-written eval.json files."""

import json

import pytest

from scapre_jax import cli
from scapre_jax.evaluation import report


def result(suite, fingerprint, edits, rows=10):
  return {"format": "scapre-jax-eval/1", "suite": suite,
          "settings": {"steps": 50, "guidance": 7.5, "size": 512},
          "model": {"path": "/m", "fingerprint": fingerprint},
          "prompts": {"file": "x.csv", "rows": rows, "classes": []},
          "edits": [{"name": name, "file": file, "concepts": ["a"], "n_concepts": n,
                     "metrics": metrics} for name, file, n, metrics in edits]}


def pair(base, edited):
  return {"base": base, "edited": edited}


@pytest.fixture
def evals(tmp_path):
  objects = result("objects", "f0", [
      ("small", str(tmp_path / "small.safetensors"), 1,
       {"erase_accuracy": pair(0.8, 0.1), "keep_accuracy": pair(0.9, 0.85)}),
      ("big", str(tmp_path / "big.safetensors"), 10,
       {"erase_accuracy": pair(0.75, 0.05), "keep_accuracy": pair(0.9, 0.6)})])
  coco = result("coco", "f0", [
      ("big", str(tmp_path / "big.safetensors"), 10, {"clip_score": pair(31.4, 30.2)})],
      rows=480)
  dirs = []
  for r in (objects, coco):
    d = tmp_path / r["suite"]
    d.mkdir()
    (d / "eval.json").write_text(json.dumps(r))
    dirs.append(d)
  return dirs


def test_combined_table_by_hand(evals, tmp_path, capsys):
  out = tmp_path / "table.md"
  assert cli.main(["eval-table", *map(str, evals), "--out", str(out)]) == 0
  shown = capsys.readouterr().out
  assert out.read_text() == shown
  lines = shown.splitlines()
  assert lines[0] == "| edit | concepts | erase acc. (%) ↓ | keep acc. (%) ↑ | CLIP_coco ↑ |"
  # Cells: edited (base); percentages of the shares; '-' where a suite did
  # not measure the edit (coco ran on "big" only).
  assert lines[2] == "| small | 1 | 10.0 (80.0) | 85.0 (90.0) | - |"
  assert lines[3] == "| big | 10 | 5.0 (75.0) | 60.0 (90.0) | 30.20 (31.40) |"
  assert "Suite objects: 10 prompts" in shown and "Suite coco: 480 prompts" in shown


def test_combine_refuses_mixed_models_and_repeated_suites(evals, tmp_path, capsys):
  other = json.loads((evals[1] / "eval.json").read_text())
  other["model"]["fingerprint"] = "f1"
  (tmp_path / "other.json").write_text(json.dumps(other))
  assert cli.main(["eval-table", str(evals[0]), str(tmp_path / "other.json")]) == 2
  assert "different base models" in capsys.readouterr().err
  with pytest.raises(ValueError, match=r"suite\(s\) \['objects'\] appear in more than one"):
    report.combine([json.loads((evals[0] / "eval.json").read_text())] * 2)
  assert cli.main(["eval-table", str(tmp_path / "none")]) == 2
  assert "no eval.json" in capsys.readouterr().err
  (tmp_path / "bad.json").write_text("{}")
  assert cli.main(["eval-table", str(tmp_path / "bad.json")]) == 2
  assert "not an eval.json written by scapre-jax eval" in capsys.readouterr().err
  out = tmp_path / "t.md"
  out.write_text("keep")
  assert cli.main(["eval-table", str(evals[0]), "--out", str(out)]) == 2
  assert out.read_text() == "keep"
