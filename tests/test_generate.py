"""Before/after image grids on the tiny model: shapes, determinism, what an
edit changes, the base-model check, the CLI and its refusals.

Every render uses 2 prompts, 2 steps and the default size, so the whole file
compiles the sampler once.
"""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from scapre_jax import cli, generate, io, models, outputs
from scapre_jax.config import EditConfig

PROMPTS = ["a cat", "a dog"]
SIZE = 16  # tiny: unet sample_size 8 * VAE scale factor 2


@pytest.fixture(scope="module")
def model(tiny_model):
  return tiny_model


@pytest.fixture(scope="module")
def before(tiny_dir):
  return generate.generate_grid(tiny_dir, PROMPTS, steps=2, seed=0)


def _edit(path, model, scale, *, fingerprint=None):
  """An edit file holding every cross-attention kernel times `scale`."""
  kernels = {p: np.asarray(k) * scale
             for p, k in models.cross_attention_kernels(model.unet_params).items()}
  meta = io.edit_metadata(concepts=["cat"], guides=[" "], preserve=[], config=EditConfig(),
                          base_fingerprint=fingerprint or model.fingerprint)
  return io.write_edit_file(path, kernels, metadata=meta)


def test_grid_shape_and_determinism(tiny_dir, before):
  assert before.dtype == np.uint8
  assert before.shape == (len(PROMPTS) * SIZE, SIZE, 3)
  assert before.std() > 0  # not a blank image
  again = generate.generate_grid(tiny_dir, PROMPTS, steps=2, seed=0)
  np.testing.assert_array_equal(again, before)
  other = generate.generate_grid(tiny_dir, PROMPTS, steps=2, seed=1)
  assert not np.array_equal(other, before)


def test_zeroed_kernels_change_the_after_column(tiny_dir, model, before, tmp_path):
  grid = generate.generate_grid(tiny_dir, PROMPTS, steps=2, seed=0,
                                edit_file=_edit(tmp_path / "zero.safetensors", model, 0.0))
  assert grid.shape == (len(PROMPTS) * SIZE, 2 * SIZE, 3)
  np.testing.assert_array_equal(grid[:, :SIZE], before)  # same noise, same UNet
  for row in range(len(PROMPTS)):
    cell = slice(row * SIZE, (row + 1) * SIZE)
    assert not np.array_equal(grid[cell, SIZE:], grid[cell, :SIZE])


def test_unchanged_kernels_give_identical_columns_without_recompiling(
    tiny_dir, model, before, tmp_path):
  compiled = generate._render._cache_size()
  grid = generate.generate_grid(tiny_dir, PROMPTS, steps=2, seed=0,
                                edit_file=_edit(tmp_path / "same.safetensors", model, 1.0))
  np.testing.assert_array_equal(grid[:, :SIZE], grid[:, SIZE:])
  np.testing.assert_array_equal(grid[:, :SIZE], before)
  # A fresh load of the same model reuses the compiled sampler, for both columns.
  assert generate._render._cache_size() == compiled


def test_fingerprint_mismatch_is_refused(tiny_dir, model, tmp_path):
  other = "0" * 64
  edit = _edit(tmp_path / "other.safetensors", model, 1.0, fingerprint=other)
  with pytest.raises(ValueError, match=f"{other}.*{model.fingerprint}"):
    generate.generate_grid(tiny_dir, PROMPTS, steps=2, edit_file=edit)


def test_bad_arguments_fail_before_sampling(tiny_dir):
  with pytest.raises(ValueError, match="multiple of 8"):
    generate.generate_grid(tiny_dir, PROMPTS, steps=2, size=12)
  with pytest.raises(ValueError, match="one string"):
    generate.generate_grid(tiny_dir, "a cat", steps=2)
  with pytest.raises(ValueError, match="no prompts"):
    generate.generate_grid(tiny_dir, [], steps=2)


def test_scheduler_by_class_name():
  config = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "steps_offset": 1}
  assert isinstance(generate.make_scheduler(config), diffusers.FlaxPNDMScheduler)
  with pytest.warns(UserWarning, match="EulerDiscreteScheduler"):
    fallback = generate.make_scheduler(
        {"_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
         "prediction_type": "v_prediction"})
  assert isinstance(fallback, diffusers.FlaxDDIMScheduler)
  assert fallback.config.prediction_type == "v_prediction"


def _cli(tiny_dir, out, *extra):
  return cli.main(["generate", "--model", str(tiny_dir), "--prompts", "a cat;a dog",
                   "--steps", "2", "--out", str(out), *extra])


def test_cli_writes_png(tiny_dir, before, tmp_path, capsys):
  out = tmp_path / "grid.png"
  assert _cli(tiny_dir, out) == 0
  assert capsys.readouterr().out.strip() == str(out)
  with Image.open(out) as image:
    assert image.format == "PNG" and image.mode == "RGB"
    pixels = np.asarray(image)
    info = json.loads(image.text["scapre-jax"])
  assert info["prompts"] == PROMPTS and info["columns"] == ["before"]
  x, y = info["grid_origin"]
  np.testing.assert_array_equal(pixels[y:, x:x + SIZE], before)  # the grid, untouched
  assert (pixels[y:, x + SIZE:] == 255).all()  # white room for a wide column name
  assert (out.stat().st_mode & 0o777) == 0o666 & ~outputs.umask()  # not mkstemp's 0600
  assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temp file left


def test_cli_refuses_existing_output(tiny_dir, tmp_path, capsys):
  out = tmp_path / "grid.png"
  out.write_bytes(b"keep")
  assert _cli(tiny_dir, out) == 2
  assert "exists" in capsys.readouterr().err
  assert out.read_bytes() == b"keep"
  assert _cli(tiny_dir, out, "--overwrite") == 0
  with Image.open(out) as image:
    x, y = json.loads(image.text["scapre-jax"])["grid_origin"]
    assert image.size[1] == y + len(PROMPTS) * SIZE


def test_cli_refuses_nan_images(tiny_dir, model, tmp_path, capsys, monkeypatch):
  def nan_params(params, kernels):
    return jax.tree.map(lambda a: a * jnp.nan, params)
  monkeypatch.setattr(models, "replace_kernels", nan_params)
  edit = _edit(tmp_path / "edit.safetensors", model, 1.0)
  out = tmp_path / "grid.png"
  assert _cli(tiny_dir, out, "--edit", str(edit)) == 2
  assert "after image of 2 prompt(s) is not finite" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["edit.safetensors"]


def test_labels_name_rows_and_columns(before):
  grid = np.concatenate([before, before], axis=1)
  image, (x, y) = generate.label_grid(grid, ["a cat", "a dog with a very long name " * 9],
                                      ["before", "after"])
  assert image.dtype == np.uint8 and image.shape[0] == y + grid.shape[0]
  np.testing.assert_array_equal(image[y:, x:x + grid.shape[1]], grid)
  assert 0 < x <= 4 * SIZE + 8 and y > 0  # a long prompt is cut, not the image

  def inked(area):  # black text on the white label background
    return (area.min(axis=-1) < 128).any()

  for row in range(2):
    assert inked(image[y + row * SIZE:y + (row + 1) * SIZE, :x])
  for col in range(2):
    assert inked(image[:y, x + col * SIZE:x + (col + 1) * SIZE])
  assert not inked(image[:y, :x])  # the corner stays blank
  with pytest.raises(ValueError, match="uint8 grid"):
    generate.label_grid(grid[:-1], ["a", "b"], ["before", "after"])


def test_render_takes_one_seed_per_prompt(model, before):
  sampling = generate.sampler(model)
  images = generate.render(sampling, model.unet_params, PROMPTS, seeds=[7, 9], steps=2)
  assert images.shape == (len(PROMPTS), SIZE, SIZE, 3) and images.dtype == np.uint8
  # Prompt 1 with seed 9 alone: the same image whatever else is in the call.
  # One call renders a batch of 2, the other of 1: two float32 programs, so
  # the documented bound, one uint8 level, is the tolerance.
  alone = generate.render(sampling, model.unet_params, PROMPTS[1:], seeds=[9], steps=2)
  np.testing.assert_allclose(images[1:].astype(int), alone.astype(int), rtol=0, atol=1)
  # An int seed is split over the prompts: generate_grid's before column.
  np.testing.assert_array_equal(
      generate.render(sampling, model.unet_params, PROMPTS, seeds=0, steps=2)
      .reshape(-1, SIZE, 3), before)
  assert np.abs(images.astype(int) - before.reshape(images.shape).astype(int)).max() > 8
  with pytest.raises(ValueError, match="seeds must be"):
    generate.render(sampling, model.unet_params, PROMPTS, seeds=[1], steps=2)
