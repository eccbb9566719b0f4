"""notebooks/walkthrough.ipynb runs from top to bottom, so it never goes stale."""

import os
import pathlib

import nbformat
from nbclient import NotebookClient

from scapre_jax import tiny

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "walkthrough.ipynb"


def test_walkthrough_executes(tmp_path, monkeypatch):
  model = tiny.write_tiny_model(tmp_path / "tiny")
  monkeypatch.setenv("SCAPRE_MODEL", str(model))
  monkeypatch.setenv("SCAPRE_NOTEBOOK_DIR", str(tmp_path))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "matrices edited" in outputs
  assert (tmp_path / "edit.safetensors").exists()
  assert (tmp_path / "per_layer_change.png").stat().st_size > 1000
