"""The erase job without a model: its settings and checks, where its files
go, when a set counts as done, and the collapse check before writing."""

import json

import numpy as np
import pytest

from scapre_jax import erase, io, outputs, requests
from scapre_jax.config import EditConfig

ONE = (requests.ConceptSet("s", ("a",)),)
KERNEL = "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel"


def test_job_settings_are_checked_when_built(tmp_path):
  job = erase.EraseJob(sets=ONE, out=tmp_path, overrides=(("erase_scale", 3.0),))
  assert job.config_for(job.sets[0]) == EditConfig.preset("scapre", erase_scale=3.0)
  with pytest.raises(ValueError, match="lamb must be > 0"):
    erase.EraseJob(sets=ONE, out=tmp_path, overrides=(("lamb", 0.0),))
  assert erase.EraseJob(sets=ONE, out=tmp_path).edit_precision == "float32"
  assert erase.EraseJob(sets=ONE, out=tmp_path, dtype="float64").edit_precision == "float64"
  with pytest.raises(ValueError, match="unknown precision 'half'"):
    erase.EraseJob(sets=ONE, out=tmp_path, precision="half")
  with pytest.raises(ValueError, match="float64 model is edited in float64"):
    erase.EraseJob(sets=ONE, out=tmp_path, dtype="float64", precision="float32")
  two = ONE + (requests.ConceptSet("t", ("b",)),)
  for kwargs, message in [
      (dict(sets=()), "no concept sets"),
      (dict(sets=ONE + ONE), "duplicate set names: \\['s'\\]"),
      (dict(sets=two, full=True), "--full and --orbax .* need one set"),
      (dict(sets=two, single=True), "exactly one set"),
      (dict(sets=ONE, names="torch"), "names must be 'diffusers' or 'ldm'"),
      (dict(sets=ONE, sets_per_call=0), "--sets-per-call must be at least 1"),
      (dict(sets=ONE, seed=2 ** 64), "--seed must be in"),
      (dict(sets=ONE, dtype="int8"), "dtype must be one of")]:
    with pytest.raises(ValueError, match=message):
      erase.EraseJob(out=tmp_path, **kwargs)


def test_where_a_sets_files_go(tmp_path):
  single = erase.EraseJob(sets=ONE, out=tmp_path, single=True, full=True, orbax=True)
  assert single.files(ONE[0]) == (tmp_path / "edit.safetensors", tmp_path / "report.json")
  assert single.outputs(ONE[0]) == [tmp_path / "edit.safetensors", tmp_path / "report.json",
                                    tmp_path / "model", tmp_path / "orbax"]
  model_file = tmp_path / "sd15.safetensors"
  model_file.write_bytes(b"")
  from_file = erase.EraseJob(sets=ONE, out=tmp_path, single=True, full=True,
                             model=str(model_file))
  assert from_file.outputs(ONE[0])[-1] == tmp_path / "model.safetensors"
  many = erase.EraseJob(sets=ONE, out=tmp_path)
  assert many.files(ONE[0]) == (tmp_path / "s.safetensors", tmp_path / "s.json")
  # A sets run redoes a set whose files do not belong together; a single
  # erase replaces its files only with --overwrite.
  assert many.replaces(ONE[0]) and not single.replaces(ONE[0])
  assert erase.EraseJob(sets=ONE, out=tmp_path, single=True, overwrite=True).replaces(ONE[0])
  assert erase.lock_name(0, 1) == outputs.LOCK_FILE
  assert erase.lock_name(2, 4) == f"{outputs.LOCK_FILE}.2-of-4"


def _files(job, run_id, *, report_id=None):
  edit_path, report_path = job.files(ONE[0])
  io.write_edit_file(edit_path, {KERNEL: np.eye(4, dtype=np.float32)},
                     metadata={"base_fingerprint": "f", "run_id": run_id}, overwrite=True)
  io.write_json(report_path, {"run_id": run_id if report_id is None else report_id},
                overwrite=True)


def test_a_set_is_done_only_when_edit_and_report_share_a_run(tmp_path):
  job = erase.EraseJob(sets=ONE, out=tmp_path)
  edit_path, report_path = job.files(ONE[0])
  assert not erase.is_done(job, ONE[0])
  _files(job, "run-1")
  assert erase.is_done(job, ONE[0])
  _files(job, "run-1", report_id="run-2")  # a crash between the two renames
  assert not erase.is_done(job, ONE[0])
  _files(job, "run-1")
  report_path.write_text("{not json")
  assert not erase.is_done(job, ONE[0])
  report_path.write_text(json.dumps({"run_id": "run-1"}))
  edit_path.unlink()
  assert not erase.is_done(job, ONE[0])


def test_collapse_check_bounds_the_norm_ratio():
  w = {KERNEL: np.full((4, 2), 2.0, np.float32)}  # ||W||_F = 2 sqrt(8)
  erase.check_collapse(w, {KERNEL: w[KERNEL] * 0.5})  # an ordinary edit
  # Ratios inside [1e-3, 1e3], near its ends, pass.
  erase.check_collapse(w, {KERNEL: w[KERNEL] * 2e-3})
  erase.check_collapse(w, {KERNEL: w[KERNEL] * 5e2})
  for scale, ratio in ((0.0, "0"), (1e-4, "0.0001"), (1e4, "1e\\+04")):
    with pytest.raises(erase.CollapsedWeightsError,
                       match=f"collapsed 1 matrices, .*to_k.weight \\(\\|\\|W'\\|\\|/\\|\\|W\\|\\| = {ratio}\\)"):
      erase.check_collapse(w, {KERNEL: w[KERNEL] * scale})


def test_unrelated_prompts_are_captions():
  prompts = erase.unrelated_prompts()
  assert len(prompts) == len(set(prompts)) >= 32
  assert all(p == p.strip() and len(p.split()) >= 3 for p in prompts)
