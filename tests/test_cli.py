"""The command line on the tiny model: erase, sets files, reruns, inspect,
multi-process runs, and bad input."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import scapre_jax as sj
from scapre_jax import cli, erase, io, models, requests, text


@pytest.fixture(scope="module")
def sets_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("sets") / "sets.jsonl"
  lines = [
      {"name": "a", "concepts": ["parachute", "golf ball"]},
      {"name": "b", "concepts": ["church"], "preserve": ["tench"], "guides": ["house"]},
      {"name": "c", "concepts": ["gas pump", "chain saw", "french horn"]},
  ]
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  return path


def run(*argv):
  return cli.main([str(a) for a in argv])


# The float64 guarantee (docs/reproducibility.md) is shown with canonical MI:
# mi_mode=released keeps the released code's float32 MI standardisation, so
# with every row tied at log 2 one rounding can move a row weight (measured
# up to 4e-2 batched against alone before 88965e8 fixed its summation order
# to torch's; not yet re-measured).
CANONICAL = ("--set", "mi_mode=canonical")
CONFIG64 = sj.EditConfig.preset("scapre", mi_mode="canonical")


def assert_same_edit(got, want):
  """Equal to 1e-10 of the largest weight: the float64 guarantee of
  docs/reproducibility.md (different XLA programs round float64 sums
  differently, ~1e-16 relative; nothing CPU-specific reaches 1e-10)."""
  assert set(got) == set(want)
  for name in want:
    assert np.asarray(got[name]).dtype == np.float64
    np.testing.assert_allclose(got[name], want[name], rtol=0,
                               atol=1e-10 * float(np.abs(want[name]).max()))


def library_edit(tiny_dir, concepts, seed, *, preserve=(), guides=None):
  """The float64 edit of one set through the library API."""
  model = models.load_model(tiny_dir, dtype="float64")
  request = text.build_concept_inputs(model, list(concepts), preserve=list(preserve),
                                      guides=None if guides is None else list(guides))
  assert request.inputs.old_seqs.dtype == np.float64
  original = models.cross_attention_kernels(model.unet_params)
  return sj.edit_projections(original, request.inputs, CONFIG64, key=jax.random.key(seed))


def test_erase_writes_edit_equal_to_library_result(tiny_dir, tmp_path, capsys):
  out = tmp_path / "out"
  assert run("erase", "--model", tiny_dir, "--concepts", "parachute, golf ball",
             "--out", out, "--seed", 3, "--dtype", "float64", *CANONICAL) == 0
  table = capsys.readouterr().out
  assert "erased_moved" in table and "1 set(s) written" in table
  kernels, meta = io.read_edit_file(out / "edit.safetensors")
  assert meta["concepts"] == ["parachute", "golf ball"]
  assert meta["config"] == CONFIG64.to_dict()
  assert meta["precision"] == "float64" and meta["dtype"] == "float64"
  report = json.loads((out / "report.json").read_text())
  assert report["base_fingerprint"] == meta["base_fingerprint"]
  assert report["precision"] == "float64"
  # The same edit through the library API.
  want = library_edit(tiny_dir, ["parachute", "golf ball"], 3)
  assert_same_edit(kernels, want)
  # --precision float64 on the float32 model: the same float64 edit, rounded
  # to float32 once when written. Each element is within float32's rounding
  # (2**-24 relative, doubled for the margin) of a value within 1e-10 of the
  # float64 result.
  assert run("erase", "--model", tiny_dir, "--concepts", "parachute, golf ball",
             "--out", tmp_path / "f32", "--seed", 3, "--precision", "float64", "--quiet",
             *CANONICAL) == 0
  kernels, meta = io.read_edit_file(tmp_path / "f32" / "edit.safetensors")
  assert meta["precision"] == "float64" and meta["dtype"] == "float32"
  for name in want:
    assert kernels[name].dtype == np.float32
    np.testing.assert_allclose(kernels[name], want[name], rtol=2.0 ** -23,
                               atol=1e-10 * float(np.abs(want[name]).max()))
  # Refuses to overwrite without --overwrite; nothing changed.
  before = (out / "edit.safetensors").read_bytes()
  assert run("erase", "--model", tiny_dir, "--concepts", "church", "--out", out) == 2
  assert "exists" in capsys.readouterr().err
  assert (out / "edit.safetensors").read_bytes() == before


def test_sets_file_equals_single_runs_and_reruns_skip(tiny_dir, sets_file, tmp_path, capsys):
  # In float64 (docs/reproducibility.md): the CLI solves the three sets in
  # one batch sharded over the 8 host devices of tests/conftest.py; each
  # equals the set run alone through the CLI, alone through the library,
  # and batched on one device through the library.
  out = tmp_path / "sets"
  assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
  assert run("erase", "--model", tiny_dir, "--sets", sets_file, "--out", out, "--json",
             "--precision", "float64", "--dtype", "float64", *CANONICAL) == 0
  summary = json.loads(capsys.readouterr().out)
  assert [s["name"] for s in summary["sets"]] == ["a", "b", "c"]
  entries = requests.load_sets_file(sets_file)
  model = models.load_model(tiny_dir, dtype="float64")
  original = models.cross_attention_kernels(model.unet_params)
  inputs = [text.build_concept_inputs(model, list(e.concepts), preserve=list(e.preserve),
                                      guides=None if e.guides is None else list(e.guides)).inputs
            for e in entries]
  one_device = sj.edit_sets(original, inputs, CONFIG64, key=jax.random.key(0), mesh=None)
  for entry, set_inputs, batched in zip(entries, inputs, one_device):
    single = tmp_path / f"single-{entry.name}"
    args = ["erase", "--model", tiny_dir, "--concepts", ", ".join(entry.concepts),
            "--out", single, "--quiet", "--dtype", "float64", *CANONICAL]
    if entry.preserve:
      args += ["--preserve", ", ".join(entry.preserve)]
    if entry.guides:
      args += ["--guides", ", ".join(entry.guides)]
    assert run(*args) == 0
    got, meta = io.read_edit_file(out / f"{entry.name}.safetensors")
    alone, _ = io.read_edit_file(single / "edit.safetensors")
    assert meta["name"] == entry.name and meta["precision"] == "float64"
    assert_same_edit(got, alone)
    assert_same_edit(alone, sj.edit_projections(original, set_inputs, CONFIG64,
                                                key=jax.random.key(0)))
    assert_same_edit(got, batched)
  # A rerun skips every finished set; --overwrite redoes them.
  stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
  assert run("erase", "--model", tiny_dir, "--sets", sets_file, "--out", out, "--json") == 0
  assert json.loads(capsys.readouterr().out)["skipped"] == ["a", "b", "c"]
  assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
  # The report is written last: a set without it is redone, its stale edit
  # file replaced.
  (out / "b.json").unlink()
  assert run("erase", "--model", tiny_dir, "--sets", sets_file, "--out", out, "--json") == 0
  summary = json.loads(capsys.readouterr().out)
  assert [s["name"] for s in summary["sets"]] == ["b"] and summary["skipped"] == ["a", "c"]


def test_interrupted_run_leaves_no_partial_files(tiny_dir, sets_file, tmp_path, monkeypatch):
  out = tmp_path / "out"
  calls = []
  real = io.write_edit_file

  def write_then_die(path, *args, **kwargs):
    calls.append(path)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(path, *args, **kwargs)

  monkeypatch.setattr(io, "write_edit_file", write_then_die)
  with pytest.raises(KeyboardInterrupt):
    run("erase", "--model", tiny_dir, "--sets", sets_file, "--out", out, "--quiet")
  assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.safetensors"]
  monkeypatch.setattr(io, "write_edit_file", real)
  assert run("erase", "--model", tiny_dir, "--sets", sets_file, "--out", out, "--quiet") == 0
  assert sorted(p.name for p in out.iterdir()) == [
      "a.json", "a.safetensors", "b.json", "b.safetensors", "c.json", "c.safetensors"]


@pytest.mark.parametrize("line,message", [
    ('{"name": "x", "concepts": ["a"]}\n{"name": "y", "concepts": [', "sets.jsonl:2: bad JSON"),
    ('{"name": "x", "concepts": []}', "sets.jsonl:1: set 'x': empty concept list"),
    ('{"name": "x", "concepts": ["a"], "preset": "fast"}', "sets.jsonl:1: set 'x': unknown preset"),
    ('{"name": "x", "concepts": ["a"]}\n\n{"name": "x", "concepts": ["b"]}',
     "sets.jsonl:3: duplicate set name 'x' \\(first on line 1\\)"),
    ('{"name": "../x", "concepts": ["a"]}', "sets.jsonl:1: set name"),
    ('{"name": "x", "concept": ["a"]}', "sets.jsonl:1: unknown keys \\['concept'\\]"),
])
def test_bad_sets_file_is_rejected_before_work(tmp_path, line, message, capsys):
  path = tmp_path / "sets.jsonl"
  path.write_text(line)
  with pytest.raises(ValueError, match=message):
    requests.load_sets_file(path)
  # Through the CLI: exit 2, nothing written, no model even loaded.
  assert run("erase", "--model", tmp_path / "no-model", "--sets", path, "--out", tmp_path / "o") == 2
  assert "sets.jsonl:" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_builtin_lists_and_settings(tmp_path):
  assert len(requests.parse_concepts("imagenette-10")) == 10
  assert requests.parse_concepts(" a, b ,, c") == ("a", "b", "c")
  assert cli.parse_override("erase_scale=3") == ("erase_scale", 3.0)
  assert cli.parse_override("mi_mask=false") == ("mi_mask", False)
  assert cli.parse_override("bures_iters=2") == ("bures_iters", 2)
  assert cli.parse_override("preserve_scale=none") == ("preserve_scale", None)
  with pytest.raises(ValueError, match="unknown setting 'eta'"):
    cli.parse_override("eta=1")
  with pytest.raises(ValueError, match="expected a int"):
    cli.parse_override("bures_iters=two")
  job = erase.EraseJob(sets=(requests.ConceptSet("s", ("a",)),), out=tmp_path,
                       overrides=(("erase_scale", 3.0),))
  assert job.config_for(job.sets[0]).erase_scale == 3.0
  with pytest.raises(ValueError, match="lamb must be > 0"):
    erase.EraseJob(sets=(requests.ConceptSet("s", ("a",)),), out=tmp_path,
                   overrides=(("lamb", 0.0),))
  one = (requests.ConceptSet("s", ("a",)),)
  assert erase.EraseJob(sets=one, out=tmp_path).edit_precision == "float32"
  assert erase.EraseJob(sets=one, out=tmp_path, dtype="float64").edit_precision == "float64"
  with pytest.raises(ValueError, match="unknown precision 'half'"):
    erase.EraseJob(sets=one, out=tmp_path, precision="half")
  with pytest.raises(ValueError, match="float64 model is edited in float64"):
    erase.EraseJob(sets=one, out=tmp_path, dtype="float64", precision="float32")


def test_missing_model_and_output_inside_model(tiny_dir, tmp_path, capsys):
  assert run("erase", "--model", tmp_path / "nothing", "--concepts", "a", "--out", tmp_path / "o") == 2
  assert "nothing" in capsys.readouterr().err
  before = sorted(p.name for p in tiny_dir.rglob("*"))
  assert run("erase", "--model", tiny_dir, "--concepts", "a", "--out", tiny_dir / "unet") == 2
  assert "would overwrite the input" in capsys.readouterr().err
  assert sorted(p.name for p in tiny_dir.rglob("*")) == before


def test_inspect(tiny_dir, tmp_path, capsys):
  out = tmp_path / "o"
  assert run("erase", "--model", tiny_dir, "--concepts", "tench", "--out", out, "--quiet") == 0
  assert run("inspect", out / "edit.safetensors") == 0
  shown = capsys.readouterr().out
  assert "concepts      tench" in shown and "attn2.to_k.weight" in shown
  assert run("inspect", out / "edit.safetensors", "--json") == 0
  assert json.loads(capsys.readouterr().out)["metadata"]["concepts"] == ["tench"]


def test_uce_presets_and_the_empty_preserve_prompt(tiny_dir, tmp_path, capsys):
  """Each UCE preset's text-side choices reach the job: the float64 files
  equal the float64 transcription of the script the preset names
  (tests/uce_reference.py) to 1e-10 of the edit, and the sets file keeps ""."""
  try:
    import uce_reference as uce
  except ImportError:  # pragma: no cover
    from tests import uce_reference as uce
  path = tmp_path / "sets.jsonl"
  path.write_text(
      '{"name": "now", "concepts": ["church"], "preserve": ["", "kite"], "preset": "uce-sd-erase"}\n'
      '{"name": "old", "concepts": ["church"], "preset": "uce-train-erase"}\n')
  out = tmp_path / "out"
  assert run("erase", "--model", tiny_dir, "--sets", path, "--out", out, "--json",
             "--dtype", "float64") == 0
  summary = {s["name"]: s for s in json.loads(capsys.readouterr().out)["sets"]}
  assert summary["now"]["preserve"] == ["", "kite"]
  assert summary["old"]["preserve"] == [""]  # train_erase.py's retain list
  assert summary["now"]["config"]["token_rows"] == "last"

  model = models.load_model(tiny_dir, dtype="float64")
  original = models.cross_attention_kernels(model.unet_params)
  weights = {n: np.asarray(k).T for n, k in original.items()}
  encode = lambda prompts: text.encode_prompts(model, prompts)[0]
  want = {
      "now": uce.uce_sd_erase(weights, model.tokenizer, encode, ["church"],
                              preserve_concepts=["", "kite"]),
      "old": uce.train_erase_main(weights, model.tokenizer, encode, ["church"]),
  }
  for name, script in want.items():
    got, _ = io.read_edit_file(out / f"{name}.safetensors")
    for key, w in original.items():
      expected = script[key].numpy().T
      assert got[key].dtype == np.float64
      err = np.linalg.norm(got[key] - expected)
      assert err <= 1e-10 * np.linalg.norm(expected - np.asarray(w)), (name, key)

  # --preserve-empty is train_erase.py's implicit "": recorded and shown.
  single = tmp_path / "single"
  assert run("erase", "--model", tiny_dir, "--concepts", "church", "--preset", "uce",
             "--preserve-empty", "--preserve", "kite", "--out", single, "--quiet") == 0
  assert run("inspect", single / "edit.safetensors") == 0
  shown = capsys.readouterr().out
  assert "preserve      '', kite" in shown
  _, meta = io.read_edit_file(single / "edit.safetensors")
  assert meta["config"] == sj.EditConfig.preset("uce-train-erase").to_dict()


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_split_a_sets_file(tiny_dir, sets_file, tmp_path):
  one = tmp_path / "one"
  # float64: the two processes batch the sets differently from the one
  # (a and c, then b), which float32 would round differently.
  assert run("erase", "--model", tiny_dir, "--sets", sets_file, "--out", one, "--quiet",
             "--dtype", "float64", *CANONICAL) == 0
  two = tmp_path / "two"
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "scapre_jax.cli", "erase", "--model", str(tiny_dir),
       "--sets", str(sets_file), "--out", str(two), "--quiet", "--dtype", "float64",
       *CANONICAL,
       "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
       "--compile-cache", str(tmp_path / f"xla{i}")],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
  assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
  # The persistent compilation cache was filled (JAX writes from process 0 only).
  assert len(list((tmp_path / "xla0").iterdir())) > 5
  for name in ("a", "b", "c"):
    got, _ = io.read_edit_file(two / f"{name}.safetensors")
    want, _ = io.read_edit_file(one / f"{name}.safetensors")
    assert_same_edit(got, want)
