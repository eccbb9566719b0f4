"""`scapre-jax verify` on the tiny models: `erase --precision float64` edits of
every preset (SD 1.x and SD 2.x layouts) pass
against the PyTorch reference at 1e-10, a float32 erase passes at its
conditioning-derived tolerance, a tampered file fails with exit status 1, and
a missing torch is one clear line."""

import sys

import numpy as np
import pytest

from scapre_jax import cli, io, tiny, verify

CONCEPTS = ["parachute", "golf ball", "tench"]
PRESERVE = ["kite"]


@pytest.fixture(scope="module")
def tiny_dirs(tiny_dir, tmp_path_factory):
  return {"sd1": tiny_dir,
          "sd2": tiny.write_tiny_model(tmp_path_factory.mktemp("verify") / "sd2", variant="sd2")}


def float64_edit(model_dir, out, preset, seed=0):
  """`scapre-jax erase --precision float64`: the text side and the edit in
  float64, the weights rounded once to the model's float32."""
  assert cli.main(["erase", "--model", str(model_dir), "--concepts", ", ".join(CONCEPTS),
                   "--preserve", ", ".join(PRESERVE), "--preset", preset, "--seed", str(seed),
                   "--precision", "float64", "--out", str(out), "--quiet"]) == 0
  return out / "edit.safetensors"


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
@pytest.mark.parametrize("preset", ["scapre", "scapre-nsfw", "scapre-small", "uce"])
def test_float64_edit_of_every_preset_passes(tiny_dirs, tmp_path, variant, preset):
  path = float64_edit(tiny_dirs[variant], tmp_path / "out", preset)
  result = verify.verify_edit(tiny_dirs[variant], path, unet=False)
  assert result.precision == "float64" and len(result.matrices) == 8
  assert all(m.tolerance == verify.FLOAT64_TOL for m in result.matrices)
  assert result.ok, verify.format_result(result, path)


def test_cli_passes_a_float32_erase_and_fails_a_tampered_file(tiny_dir, tmp_path, capsys):
  out = tmp_path / "out"
  assert cli.main(["erase", "--model", str(tiny_dir), "--concepts", "parachute, golf ball",
                   "--out", str(out), "--quiet"]) == 0
  edit_file = out / "edit.safetensors"
  assert cli.main(["verify", "--model", str(tiny_dir), "--edit", str(edit_file),
                   "--quiet"]) == 0
  printed = capsys.readouterr().out
  assert "recomputed with the PyTorch reference in float32" in printed
  assert "cond(G)" in printed and "UNet (diffusers PyTorch vs Flax" in printed
  assert printed.strip().splitlines()[-1].startswith("PASS: all 8 matrices")

  # The same file with one matrix moved by 5% after writing.
  kernels, meta = io.read_edit_file(edit_file)
  name = sorted(kernels)[0]
  kernels[name] = kernels[name] * 1.05
  meta = {k: v for k, v in meta.items() if k not in ("format", "scapre_jax_version", "dtype")}
  tampered = io.write_edit_file(tmp_path / "tampered.safetensors", kernels, metadata=meta)
  assert cli.main(["verify", "--model", str(tiny_dir), "--edit", str(tampered), "--quiet",
                   "--no-unet"]) == 1
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[-1] == "FAIL: 1 of 8 matrices differ beyond the tolerance"
  assert sum(line.endswith("FAIL") for line in lines[:-1]) == 1


def test_float64_file_changed_by_one_part_in_a_million_fails(tiny_dirs, tmp_path, capsys):
  path = float64_edit(tiny_dirs["sd1"], tmp_path / "out", "scapre")
  kernels, meta = io.read_edit_file(path)
  name = sorted(kernels)[-1]
  kernels[name] = (kernels[name] * (1 + 1e-6)).astype(np.float32)
  meta = {k: v for k, v in meta.items() if k not in ("format", "scapre_jax_version", "dtype")}
  tampered = io.write_edit_file(tmp_path / "tampered.safetensors", kernels, metadata=meta)
  assert cli.main(["verify", "--model", str(tiny_dirs["sd1"]), "--edit", str(tampered),
                   "--quiet", "--no-unet"]) == 1
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith("FAIL: 1 of 8")


def test_edit_for_another_model_is_refused(tiny_dirs, tmp_path, capsys):
  path = float64_edit(tiny_dirs["sd1"], tmp_path / "out", "uce")
  assert cli.main(["verify", "--model", str(tiny_dirs["sd2"]), "--edit", str(path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "was made for the base model with fingerprint" in err[0]


def test_missing_torch_is_one_clear_line(tiny_dir, tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
  assert cli.main(["verify", "--model", str(tiny_dir), "--edit",
                   str(tmp_path / "none.safetensors")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["scapre-jax verify: error: PyTorch is not installed, and verify runs the "
                 "PyTorch reference: pip install 'scapre-jax[torch]'"]
