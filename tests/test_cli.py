"""The command line on the tiny model: erase, sets files, reruns, inspect,
multi-process runs, and bad input."""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import scapre_jax as sj
from builders import BAD_SETS_FILES
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
  stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("[!.]*")}
  capsys.readouterr()
  assert run("erase", "--model", tiny_dir, "--sets", sets_file, "--out", out, "--json") == 0
  assert json.loads(capsys.readouterr().out)["skipped"] == ["a", "b", "c"]
  assert {p.name: p.stat().st_mtime_ns for p in out.glob("[!.]*")} == stamps
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
  assert run("erase", "--model", tiny_dir, "--sets", sets_file, "--out", out, "--quiet") == 130
  # Set b's staged edit was removed with its staging folder; only the lock
  # file (hidden, kept for the next run) is left beside set a.
  assert sorted(p.name for p in out.iterdir()) == [
      ".scapre-jax.lock", "a.json", "a.safetensors"]
  monkeypatch.setattr(io, "write_edit_file", real)
  assert run("erase", "--model", tiny_dir, "--sets", sets_file, "--out", out, "--quiet") == 0
  assert sorted(p.name for p in out.iterdir()) == [".scapre-jax.lock",
      "a.json", "a.safetensors", "b.json", "b.safetensors", "c.json", "c.safetensors"]


@pytest.mark.parametrize("line,message", BAD_SETS_FILES)
def test_bad_sets_file_is_rejected_before_work(tmp_path, line, message, capsys):
  # The library's messages: tests/test_requests.py. Through the CLI: exit 2,
  # the message with its line, nothing written, no model even loaded.
  path = tmp_path / "sets.jsonl"
  path.write_text(line)
  assert run("erase", "--model", tmp_path / "no-model", "--sets", path, "--out", tmp_path / "o") == 2
  err = capsys.readouterr().err
  assert re.search(message, err) and len(err.strip().splitlines()) == 1
  assert not (tmp_path / "o").exists()


def test_settings_overrides():
  # EraseJob's own checks: tests/test_erase.py; the lists: tests/test_requests.py.
  assert cli.parse_override("erase_scale=3") == ("erase_scale", 3.0)
  assert cli.parse_override("mi_mask=false") == ("mi_mask", False)
  assert cli.parse_override("bures_iters=2") == ("bures_iters", 2)
  assert cli.parse_override("preserve_scale=none") == ("preserve_scale", None)
  with pytest.raises(ValueError, match="unknown setting 'eta'"):
    cli.parse_override("eta=1")
  with pytest.raises(ValueError, match="expected a int"):
    cli.parse_override("bures_iters=two")


def test_generate_and_light_commands_check_arguments_before_jax(tmp_path):
  """generate (and apply, verify, tiny) refuse bad arguments from their
  config, in CLI words, exit 2, before JAX or any model code is imported:
  in about a second, not the many a jax + diffusers import takes."""
  (tmp_path / "grid.png").write_bytes(b"x")
  generate = ["generate", "--prompts", "a cat;a dog"]
  cases = [
      (generate + ["--out", "grid.jpg"], "--out grid.jpg must name a .png file"),
      (generate + ["--out", "g.png", "--steps", "0"], "--steps must be a positive int, got 0"),
      (generate + ["--out", "g.png", "--size", "-8"], "--size must be a positive int, got -8"),
      (generate + ["--out", "g.png", "--guidance", "inf"], "--guidance must be finite"),
      (["generate", "--prompts", " ; ", "--out", "g.png"], "no prompts given"),
      (generate + ["--out", "grid.png"], "grid.png exists; pass --overwrite"),
      (["apply", "--model", "m", "--edit", "", "--out", "o"], "--edit must name a path"),
      (["verify", "--edit", ""], "--edit must name a path"),
      (["tiny", ""], "DIR must name a path"),
  ]
  results, heavy = run_fresh([argv for argv, _ in cases], tmp_path)
  assert heavy == []
  for (argv, message), (rc, err) in zip(cases, results):
    assert rc == 2, (argv, err)
    assert err.startswith(f"scapre-jax {argv[0]}: error: "), (argv, err)
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, (argv, err)
  assert (tmp_path / "grid.png").read_bytes() == b"x"
  assert not (tmp_path / "g.png").exists()


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
  assert sorted(p.name for p in two.glob("[!.]*")) == sorted(p.name for p in one.glob("[!.]*"))
  # Each process locked its own share of OUT.
  assert sorted(p.name for p in two.glob(".*")) == [
      ".scapre-jax.lock.0-of-2", ".scapre-jax.lock.1-of-2"]
  # The persistent compilation cache was filled (JAX writes from process 0 only).
  assert len(list((tmp_path / "xla0").iterdir())) > 5
  for name in ("a", "b", "c"):
    got, _ = io.read_edit_file(two / f"{name}.safetensors")
    want, _ = io.read_edit_file(one / f"{name}.safetensors")
    assert_same_edit(got, want)


def run_fresh(argvs, tmp_path):
  """Runs `cli.main` on each argv in one fresh Python process; returns
  ([exit code, stderr] per argv, the heavy modules it imported: diffusers,
  transformers, scapre_jax.models, jax)."""
  script = textwrap.dedent("""
      import contextlib, io, json, sys
      from scapre_jax import cli
      results = []
      for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
          try:
            rc = cli.main(argv)
          except SystemExit as exit:
            rc = exit.code
        results.append([rc, err.getvalue()])
      heavy = [m for m in ("diffusers", "transformers", "scapre_jax.models", "jax")
               if m in sys.modules]
      print(json.dumps({"results": results, "heavy": heavy}))
      """)
  env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf-cache")}
  done = subprocess.run([sys.executable, "-c", script, json.dumps(argvs)],
                        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
  assert done.returncode == 0, done.stderr
  got = json.loads(done.stdout)
  return got["results"], got["heavy"]


def test_argument_errors_come_first_in_cli_words(tmp_path, sets_file):
  """Bad arguments: one line, exit 2, in CLI words, before the model code
  (diffusers, scapre_jax.models) is even imported. One subprocess, so
  sys.modules shows what a fresh run imported."""
  (tmp_path / "done").mkdir()
  (tmp_path / "done" / "edit.safetensors").write_text("x")
  (tmp_path / "afile").write_text("x")
  inside = tmp_path / "in"
  inside.mkdir()
  (inside / "a.json").write_text('{"name": "a", "concepts": ["x"]}\n')
  cases = [
      (["--concepts", "imagenette10"], "did you mean imagenette-10\\?"),
      (["--concepts", "parachute, art-50"], "'art-50' is a built-in list: give it alone"),
      (["--sets", str(sets_file), "--full"],
       "--full writes one model folder, so it needs one set \\(--concepts\\), not --sets"),
      (["--concepts", "a", "--set", "lamb=1e20"], "lamb must be at most 10000"),
      (["--concepts", "a", "--set", "erase_scale=1e3"], "erase_scale must be at most 100"),
      (["--concepts", "a", "--set", "bures_iters=2000"], "bures_iters must be an int in"),
      (["--concepts", "a", "--set", "noise_sigma=inf"], "noise_sigma must be finite"),
      (["--concepts", "a", "--set", "p=inf"], "p must be finite"),
      (["--concepts", "a", "--sets-per-call", "-1"], "--sets-per-call: must be at least 1"),
      (["--concepts", "a", "--seed", str(2 ** 64)], "--seed: must be in \\[0, 2\\*\\*32 - 1\\]"),
      (["--concepts", "a", "--model", "./models/sd15"], "--model ./models/sd15: no such model"),
      # Shaped like a Hugging Face id (no ./models here) but not in the cache:
      # refused from the cache lookup, still before the model code loads.
      (["--concepts", "a", "--model", "models/sd15"],
       "--model models/sd15 is neither a local folder nor in the Hugging Face cache"),
      (["--concepts", "a", "--out", tmp_path / "done"], "exists; pass --overwrite"),
      (["--concepts", "a", "--out", tmp_path / "afile" / "o"], "afile is a file, not a folder"),
      (["--sets", inside / "a.json", "--out", inside], "would overwrite the input"),
  ]
  argvs = [["erase", "--out", str(tmp_path / "o"), *map(str, args)]
           if "--out" not in args else ["erase", *map(str, args)] for args, _ in cases]
  results, heavy = run_fresh(argvs, tmp_path)
  assert heavy == []
  for (args, message), (rc, err) in zip(cases, results):
    assert rc == 2, (args, err)
    assert re.search(message, err), (args, err)
    assert "Traceback" not in err and "overwrite=True" not in err.replace("(overwrite=True)", "")
  assert not (tmp_path / "o").exists()
  assert (inside / "a.json").read_text() == '{"name": "a", "concepts": ["x"]}\n'


def test_quiet_summary_warnings_once_and_stale_files(tiny_dir, tmp_path, capsys):
  out = tmp_path / "o"
  out.mkdir()
  (out / ".edit.safetensors.x1.tmp").write_text("left by a killed run")
  (out / ".model.x2.tmp").mkdir()
  long = " ".join(["parachute"] * 80)
  assert run("erase", "--model", tiny_dir, "--concepts", f"tench, tench, {long}",
             "--out", out, "--quiet", "--preset", "uce") == 0
  shown = capsys.readouterr()
  assert "erased_moved" in shown.out and "ratio:" in shown.out  # --quiet keeps the table
  assert shown.err.count("given more than once") == 1
  assert shown.err.count("were truncated") == 1
  assert sorted(p.name for p in out.iterdir()) == [
      ".scapre-jax.lock", "edit.safetensors", "report.json"]
  _, meta = io.read_edit_file(out / "edit.safetensors")
  assert meta["concepts"][0] == "tench" and meta["concepts"].count("tench") == 1


def test_output_conflicts_are_refused_before_any_work(tiny_dir, tmp_path, capsys):
  out = tmp_path / "o"
  (out / "model").mkdir(parents=True)
  assert run("erase", "--model", tiny_dir, "--concepts", "tench", "--out", out, "--full") == 2
  assert "model exists; pass --overwrite" in capsys.readouterr().err
  # OUT/model a link to the input model: refused even with --overwrite.
  (out / "model").rmdir()
  (out / "model").symlink_to(tiny_dir)
  assert run("erase", "--model", tiny_dir, "--concepts", "tench", "--out", out, "--full",
             "--overwrite") == 2
  assert "would overwrite the input" in capsys.readouterr().err
  assert sorted(p.name for p in out.iterdir()) == ["model"]


def test_full_disk_leaves_no_half_run(tiny_dir, tmp_path, capsys, monkeypatch):
  """--full on a disk that fills while the model folder is copied: one line,
  and neither the edit nor the report nor model/ is left (the rerun needs
  no --overwrite)."""
  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(io.shutil, "copytree", full_disk)
  out = tmp_path / "o"
  assert run("erase", "--model", tiny_dir, "--concepts", "tench", "--out", out, "--full",
             "--quiet", "--preset", "uce") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no space left on the device" in err[0], err
  assert sorted(p.name for p in out.iterdir()) == [".scapre-jax.lock"]


def test_lamb_collapse_is_refused_before_writing(tiny_dir, tmp_path, capsys, monkeypatch):
  """A solve that returns zeros (what lamb=1e20 did) is refused, nothing
  written; in range, the bounds keep lamb from getting there."""
  real = erase.edit_sets
  monkeypatch.setattr(erase, "edit_sets", lambda kernels, *a, **k: [
      {n: np.zeros_like(w) for n, w in r.items()} for r in real(kernels, *a, **k)])
  out = tmp_path / "o"
  assert run("erase", "--model", tiny_dir, "--concepts", "tench", "--out", out,
             "--preset", "uce") == 2
  assert "the edit collapsed" in capsys.readouterr().err
  assert sorted(p.name for p in out.iterdir()) == [".scapre-jax.lock"]


def test_interrupted_overwrite_is_redone(tiny_dir, sets_file, tmp_path, monkeypatch,
                                         capsys):
  """An --overwrite sets run stopped between a set's edit and its report
  leaves files of two runs; the rerun sees their run ids differ and redoes
  that set instead of skipping it."""
  out = tmp_path / "o"
  assert run("erase", "--model", tiny_dir, "--sets", sets_file, "--out", out, "--quiet") == 0
  real = erase.outputs.place

  def stop_before_report(source, target, overwrite):
    if target.name == "b.json":
      raise KeyboardInterrupt
    return real(source, target, overwrite)

  monkeypatch.setattr(erase.outputs, "place", stop_before_report)
  assert run("erase", "--model", tiny_dir, "--sets", sets_file, "--out", out, "--quiet",
             "--overwrite") == 130
  monkeypatch.setattr(erase.outputs, "place", real)
  _, meta = io.read_edit_file(out / "b.safetensors")
  assert meta["run_id"] != json.loads((out / "b.json").read_text())["run_id"]
  capsys.readouterr()
  assert run("erase", "--model", tiny_dir, "--sets", sets_file, "--out", out, "--json") == 0
  summary = json.loads(capsys.readouterr().out)
  assert [s["name"] for s in summary["sets"]] == ["b"] and summary["skipped"] == ["a", "c"]
  _, meta = io.read_edit_file(out / "b.safetensors")
  assert meta["run_id"] == json.loads((out / "b.json").read_text())["run_id"]


def test_sigint_stops_with_one_line(tiny_dir, tmp_path):
  """Ctrl-C during a sets run: exit 130, one line, no traceback; the set
  written before it is kept and counts as done."""
  sets = tmp_path / "sets.jsonl"
  sets.write_text("\n".join(json.dumps(x) for x in [
      {"name": "a", "concepts": ["tench"], "preset": "uce"},
      {"name": "b", "concepts": ["church"], "preset": "scapre-small"},
      {"name": "c", "concepts": ["golf ball"], "preset": "scapre"}]) + "\n")
  out = tmp_path / "o"
  proc = subprocess.Popen(
      [sys.executable, "-m", "scapre_jax.cli", "erase", "--model", str(tiny_dir),
       "--sets", str(sets), "--out", str(out)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if line.startswith("write:"):
      # Set b's preset compiles a new program (seconds): the signal lands
      # before b is written.
      proc.send_signal(signal.SIGINT)
      break
  rest = proc.stderr.read()
  assert proc.wait(timeout=300) == 130, "".join(lines) + rest
  assert "Traceback" not in rest
  assert rest.strip().splitlines() == [
      "scapre-jax erase: interrupted; nothing half-written was left "
      "(finished sets are kept; a rerun skips them)"]
  assert sorted(p.name for p in out.iterdir()) == [".scapre-jax.lock", "a.json",
                                                     "a.safetensors"]


def test_tiny_command_writes_the_library_model(tiny_dir, tmp_path, capsys):
  """`scapre-jax tiny DIR` runs tiny.run(TinyConfig): the files of
  write_tiny_model (tiny_dir: the sd1 variant, seed 0), byte for byte."""
  out = tmp_path / "t"
  assert run("tiny", out, "--variant", "sd1", "--seed", "0") == 0
  assert capsys.readouterr().out.strip() == str(out)
  files = sorted(p.relative_to(tiny_dir) for p in tiny_dir.rglob("*") if p.is_file())
  assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
  for name in files:
    assert (out / name).read_bytes() == (tiny_dir / name).read_bytes(), name
  assert run("tiny", out) == 2
  assert "exists and is not an empty directory" in capsys.readouterr().err


def test_tiny_variants_listed_in_the_parser():
  from scapre_jax import tiny
  assert cli.TINY_VARIANTS == tuple(tiny.TINY_CONFIGS)


def test_inspect_crafted_metadata_is_one_line(tmp_path, capsys):
  path = tmp_path / "edit.safetensors"
  io.write_edit_file(path, {"mid_block/attentions_0/transformer_blocks_0/attn2/to_k/kernel":
                            np.ones((4, 2), np.float32)},
                     metadata={"base_fingerprint": "x", "concepts": 5, "layers": {"a": 3}})
  assert run("inspect", path) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "metadata of an unexpected shape" in err[0]


def test_list_lookalikes_are_the_sets_others(tiny_dir, tmp_path, capsys):
  """imagenet-confuse-15 erases 10 of the 15 classes of the paper's
  imagenet-15 evaluation: the other five are its default `others`, and a
  sets file's "others" replaces the shipped captions. others_moved is the
  selectivity over exactly those prompts."""
  sets = tmp_path / "sets.jsonl"
  sets.write_text(
      '{"name": "lookalikes", "concepts": "imagenet-confuse-15"}\n'
      '{"name": "own", "concepts": ["tench"], "others": ["church", "parachute"]}\n'
      '{"name": "captions", "concepts": ["tench"]}\n')
  out = tmp_path / "o"
  assert run("erase", "--model", tiny_dir, "--sets", sets, "--out", out, "--quiet") == 0
  shown = capsys.readouterr().out
  assert ("set lookalikes: instead, the 5 look-alikes its list keeps: german shepherd, "
          "persian cat, pomegranate, yawl, tennis ball") in shown
  assert set(requests.LIST_LOOKALIKES["imagenet-confuse-15"]).isdisjoint(
      requests.builtin_lists()["imagenet-confuse-15"])
  model = models.load_model(tiny_dir)
  kernels = models.cross_attention_kernels(model.unet_params)
  moved = {}
  for name, others in [("lookalikes", requests.LIST_LOOKALIKES["imagenet-confuse-15"]),
                       ("own", ("church", "parachute")), ("captions", None)]:
    report = json.loads((out / f"{name}.json").read_text())
    assert report["others"] == (None if others is None else list(others))
    edited, _ = io.read_edit_file(out / f"{name}.safetensors")
    edited = {models.flax_path(n): v for n, v in edited.items()}
    concept_set = requests.ConceptSet(name, tuple(report["concepts"]))
    request = erase.encode_set(model, concept_set, sj.EditConfig.preset("scapre"))
    seqs, lengths = text.encode_prompts(model, list(others or erase.unrelated_prompts()))
    want = sj.metrics.selectivity(kernels, edited, request.inputs, seqs, lengths)
    # Same weights, same prompts; the run encoded them in other batches, which
    # moves the float32 encodings by a few ulps (~1e-7 relative) on any CPU,
    # and a ratio of norms passes that on unamplified: 1e-4 is ample.
    np.testing.assert_allclose(report["others_moved"], want["others_moved"], rtol=1e-4)
    moved[name] = report["others_moved"]
  # The same erase of "tench" against its own two prompts and against the
  # captions measures different things.
  assert abs(moved["own"] - moved["captions"]) > 1e-3 * moved["captions"]
