"""The notebooks run from top to bottom, so they never go stale."""

import json
import pathlib

import nbformat
from nbclient import NotebookClient

from scapre_jax import tiny

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "walkthrough.ipynb"
EVALUATE = NOTEBOOK.parent / "evaluate.ipynb"


def _execute(path, tmp_path, monkeypatch) -> str:
  """Runs the notebook at `path` on a fresh tiny model with tmp_path as its
  working folder; returns its text and markdown outputs, joined."""
  model = tiny.write_tiny_model(tmp_path / "tiny")
  monkeypatch.setenv("SCAPRE_MODEL", str(model))
  monkeypatch.setenv("SCAPRE_NOTEBOOK_DIR", str(tmp_path))
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  return "".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                 for c in notebook.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))


def test_walkthrough_executes(tmp_path, monkeypatch):
  outputs = _execute(NOTEBOOK, tmp_path, monkeypatch)
  assert "matrices edited" in outputs
  assert (tmp_path / "edit.safetensors").exists()
  assert (tmp_path / "per_layer_change.png").stat().st_size > 1000


def test_evaluate_executes(tmp_path, monkeypatch):
  outputs = _execute(EVALUATE, tmp_path, monkeypatch)
  assert "| edit | concepts | erase acc. (%) ↓ | keep acc. (%) ↑ |" in outputs
  result = json.loads((tmp_path / "eval" / "eval.json").read_text())
  assert [e["name"] for e in result["edits"]] == ["one", "three"]
  assert result["edits"][1]["erased_classes"] == ["church", "parachute", "tench"]
  assert result["images"] == {"rendered": 60, "cached": 0}  # 10 classes x 2 rows x 3 models
  assert (tmp_path / "eval" / "grids" / "three.png").stat().st_size > 1000
