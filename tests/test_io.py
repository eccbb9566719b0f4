"""Writing results: edit files, edited diffusers folders and orbax checkpoints,
read back with our readers and with PyTorch diffusers; the safety rules."""

import json
import os
import shutil

import flax.serialization
import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import scapre_jax
from scapre_jax import io
from scapre_jax import models
from scapre_jax import text

from scapre_jax.config import ApplyConfig, EditConfig
from scapre_jax.errors import NonFiniteWeightsError
from scapre_jax.edit import edit_projections

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
CONFIG = EditConfig.preset("scapre")


@pytest.fixture(scope="module")
def model(tiny_model):
  return tiny_model


@pytest.fixture(scope="module")
def request_(model):
  return text.build_concept_inputs(model, ["tench", "van gogh"], preserve=["church"])


@pytest.fixture(scope="module")
def edited(model, request_):
  """A real ScaPre edit of every to_k/to_v kernel: {flax path: kernel}."""
  kernels = models.cross_attention_kernels(model.unet_params)
  out = edit_projections(kernels, request_.inputs, CONFIG, key=jax.random.key(0))
  return {p: np.asarray(k) for p, k in out.items()}


@pytest.fixture(scope="module")
def metadata(model, request_):
  return io.edit_metadata(concepts=request_.concepts, guides=request_.guides,
                          preserve=request_.preserve, config=CONFIG,
                          base_fingerprint=model.fingerprint)


@pytest.fixture(scope="module")
def folder(tiny_dir, edited, tmp_path_factory):
  return io.write_model_folder(tiny_dir, tmp_path_factory.mktemp("out") / "edited", edited)


def files_of(root):
  return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def no_leftovers(directory):
  """No temporary file or folder (leading dot) left in `directory`."""
  return not [n for n in os.listdir(directory) if n.startswith(".")]


def test_the_edit_changed_something(model, edited):
  original = models.cross_attention_kernels(model.unet_params)
  assert sorted(edited) == sorted(original) and len(edited) == 8  # down, mid, up x to_k, to_v
  for path, kernel in edited.items():
    assert kernel.shape == original[path].shape and kernel.dtype == np.float32
    assert not np.allclose(kernel, original[path])


# -- edit files ------------------------------------------------------------------


def test_edit_file_round_trip(edited, metadata, model, tmp_path):
  path = io.write_edit_file(tmp_path / "edit.safetensors", edited, metadata=metadata)
  assert no_leftovers(tmp_path)
  raw = safetensors.numpy.load_file(path)
  assert sorted(raw) == sorted(models.torch_name(p) for p in edited)
  assert all(n.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")) for n in raw)
  for flax_path, kernel in edited.items():
    tensor = raw[models.torch_name(flax_path)]
    assert tensor.shape == kernel.shape[::-1]  # (d_out, d_in)
    np.testing.assert_array_equal(tensor, kernel.T)

  kernels, meta = io.read_edit_file(path)
  assert sorted(kernels) == sorted(edited)
  for flax_path, kernel in kernels.items():
    np.testing.assert_array_equal(kernel, edited[flax_path])
  assert meta["concepts"] == ["tench", "van gogh"]
  assert meta["guides"] == [" ", " "] and meta["preserve"] == ["church"]
  assert EditConfig.from_dict(meta["config"]) == CONFIG
  assert meta["base_fingerprint"] == model.fingerprint
  assert meta["scapre_jax_version"] == scapre_jax.__version__
  assert meta["dtype"] == "float32" and meta["format"] == "pt"
  with safetensors.safe_open(path, framework="np") as f:
    stored = f.metadata()
  assert all(isinstance(v, str) for v in stored.values())
  assert json.loads(stored["config"]) == CONFIG.to_dict()


def test_edit_file_loads_into_pytorch_unet(edited, metadata, tiny_dir, tmp_path):
  torch = pytest.importorskip("torch")
  from diffusers import UNet2DConditionModel

  path = io.write_edit_file(tmp_path / "edit.safetensors", edited, metadata=metadata)
  unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet", low_cpu_mem_usage=False)
  state = {k: torch.from_numpy(v) for k, v in safetensors.numpy.load_file(path).items()}
  result = unet.load_state_dict(state, strict=False)
  assert result.unexpected_keys == []
  assert set(result.missing_keys) == set(unet.state_dict()) - set(state)
  loaded = unet.state_dict()
  for name, tensor in state.items():
    assert torch.equal(loaded[name], tensor), name


def test_edit_file_refusals(edited, metadata, tmp_path):
  target = tmp_path / "edit.safetensors"
  with pytest.raises(ValueError, match="base_fingerprint"):
    io.write_edit_file(target, edited, metadata={"concepts": ["x"]})
  with pytest.raises(ValueError, match="not a cross-attention"):
    io.write_edit_file(target, {"conv_in/kernel": np.ones((3, 3))}, metadata=metadata)
  assert not target.exists()
  io.write_edit_file(target, edited, metadata=metadata)
  with pytest.raises(io.OutputExistsError, match="overwrite=True"):
    io.write_edit_file(target, edited, metadata=metadata)
  halved = {p: k / 2 for p, k in edited.items()}
  io.write_edit_file(target, halved, metadata=metadata, overwrite=True)
  kernels, _ = io.read_edit_file(target)
  np.testing.assert_array_equal(kernels[next(iter(edited))], halved[next(iter(edited))])
  assert no_leftovers(tmp_path)


def test_corrupt_edit_files(edited, metadata, tmp_path):
  good = io.write_edit_file(tmp_path / "good.safetensors", edited, metadata=metadata)
  data = good.read_bytes()
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"cannot read edit file .*truncated\.safetensors"):
    io.read_edit_file(truncated)
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"not a safetensors file at all")
  with pytest.raises(ValueError, match="garbage.safetensors"):
    io.read_edit_file(garbage)
  with pytest.raises(FileNotFoundError, match="missing.safetensors"):
    io.read_edit_file(tmp_path / "missing.safetensors")
  foreign = tmp_path / "foreign.safetensors"
  safetensors.numpy.save_file({"conv_in.weight": np.ones((4, 4, 3, 3), np.float32)}, foreign)
  with pytest.raises(ValueError, match="not a cross-attention"):
    io.read_edit_file(foreign)


# -- edited diffusers folders --------------------------------------------------------


def test_model_folder_contents(folder, tiny_dir, edited):
  assert files_of(folder) == files_of(tiny_dir)
  assert no_leftovers(folder.parent)
  for name in files_of(tiny_dir):
    if name != UNET_FILE:
      assert (folder / name).read_bytes() == (tiny_dir / name).read_bytes(), name
  source = safetensors.numpy.load_file(tiny_dir / UNET_FILE)
  written = safetensors.numpy.load_file(folder / UNET_FILE)
  assert sorted(written) == sorted(source)
  names = {models.torch_name(p): p for p in edited}
  for name, tensor in source.items():
    assert written[name].dtype == tensor.dtype
    if name in names:
      np.testing.assert_array_equal(written[name], edited[names[name]].T)
    else:
      assert written[name].tobytes() == tensor.tobytes(), name
  with safetensors.safe_open(folder / UNET_FILE, framework="np") as f:
    assert f.metadata() == {"format": "pt"}
  # Our loader reads the edit back.
  reloaded = models.load_model(folder)
  for path, kernel in models.cross_attention_kernels(reloaded.unet_params).items():
    np.testing.assert_array_equal(np.asarray(kernel), edited[path])


def test_pipeline_loads_and_matches_flax(folder, model, edited, monkeypatch, capfd,
                                        shared_time_embedding):
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F
  from diffusers import StableDiffusionPipeline
  from diffusers.models import activations

  pipe = StableDiffusionPipeline.from_pretrained(folder)
  capfd.readouterr()
  # Both UNets in float64 (float32 roundings of two frameworks differ by CPU);
  # the edited float32 weights are exact in float64 on both sides.
  unet = pipe.unet.double()
  model64 = models.load_model(model.path, dtype="float64")
  rng = np.random.default_rng(1)
  sample = rng.standard_normal((2, 4, 8, 8))
  steps = np.array([3, 500])
  context = rng.standard_normal((2, 77, 32))
  # diffusers' Flax UNet uses tanh-GELU in GEGLU and GroupNorm eps 1e-5 in
  # Transformer2DModel (PyTorch: erf, 1e-6): match them, as test_models does.
  monkeypatch.setattr(activations.GEGLU, "gelu",
                      lambda self, gate: F.gelu(gate, approximate="tanh"))
  for name, module in unet.named_modules():
    if name.endswith(".norm") and isinstance(module, torch.nn.GroupNorm):
      module.eps = 1e-5
  before = shared_time_embedding(model64, model64.unet_params, unet, sample, steps, context)
  ours = shared_time_embedding(model64, models.replace_kernels(model64.unet_params, edited),
                               unet, sample, steps, context)
  with torch.no_grad():
    theirs = unet(torch.from_numpy(sample), torch.from_numpy(steps),
                  torch.from_numpy(context)).sample.numpy()
  assert ours.dtype == theirs.dtype == np.float64
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-10 * np.abs(theirs).max())
  assert np.abs(ours - before).max() > 1e-2  # the edit shows in the output


def test_apply_edit(folder, tiny_dir, edited, metadata, tmp_path):
  edit_file = io.write_edit_file(tmp_path / "edit.safetensors", edited, metadata=metadata)
  out = io.apply_edit(tiny_dir, edit_file, tmp_path / "applied")
  for name in files_of(folder):
    assert (out / name).read_bytes() == (folder / name).read_bytes(), name
  wrong = io.write_edit_file(tmp_path / "wrong.safetensors", edited,
                             metadata={**metadata, "base_fingerprint": "0" * 64})
  with pytest.raises(ValueError, match=rf"fingerprint {'0' * 64}.*fingerprint "
                                       rf"{metadata['base_fingerprint']}"):
    io.apply_edit(tiny_dir, wrong, tmp_path / "never")
  assert not (tmp_path / "never").exists()
  with pytest.raises(ValueError, match="overwrite the input"):
    io.apply_edit(tiny_dir, edit_file, tmp_path)  # would contain the edit file


def test_apply_runs_its_config(folder, tiny_dir, edited, metadata, tmp_path):
  """`scapre-jax apply` (io.apply of an ApplyConfig) writes what apply_edit
  writes; --config, which only a single file needs, is refused for a folder."""
  edit_file = io.write_edit_file(tmp_path / "edit.safetensors", edited, metadata=metadata)
  out = io.apply(ApplyConfig(model=str(tiny_dir), edit=str(edit_file),
                             out=tmp_path / "applied"))
  for name in files_of(folder):
    assert (out / name).read_bytes() == (folder / name).read_bytes(), name
  with pytest.raises(ValueError, match="--config applies to a single-file --model"):
    io.apply(ApplyConfig(model=str(tiny_dir), edit=str(edit_file), out=tmp_path / "never",
                         config=str(tiny_dir)))
  assert not (tmp_path / "never").exists()


def test_output_must_not_touch_the_source(tiny_dir, edited, metadata):
  for out in (tiny_dir, tiny_dir / "edited", tiny_dir / "unet", tiny_dir.parent):
    with pytest.raises(ValueError, match="overwrite the input"):
      io.write_model_folder(tiny_dir, out, edited, overwrite=True)
  with pytest.raises(ValueError, match="overwrite the input"):
    io.write_edit_file(tiny_dir / "edit.safetensors", edited, metadata=metadata,
                       model_root=tiny_dir)
  assert not (tiny_dir / "edited").exists() and not (tiny_dir / "edit.safetensors").exists()
  assert no_leftovers(tiny_dir) and no_leftovers(tiny_dir.parent)


def test_existing_output_and_overwrite(tiny_dir, edited, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(io.OutputExistsError, match="overwrite=True"):
    io.write_model_folder(tiny_dir, out, edited)
  assert os.listdir(out) == ["keep.txt"]
  io.write_model_folder(tiny_dir, out, edited, overwrite=True)
  assert files_of(out) == files_of(tiny_dir)
  assert no_leftovers(tmp_path)


def test_non_finite_weights_write_nothing(tiny_dir, model, edited, metadata, tmp_path):
  bad_path = sorted(edited)[1]
  bad = {**edited, bad_path: edited[bad_path].copy()}
  bad[bad_path][0, 0] = np.nan
  with pytest.raises(NonFiniteWeightsError, match=bad_path):
    io.write_edit_file(tmp_path / "edit.safetensors", bad, metadata=metadata)
  with pytest.raises(ValueError, match=bad_path):
    io.write_model_folder(tiny_dir, tmp_path / "folder", bad)
  params = models.replace_kernels(model.unet_params, {bad_path: bad[bad_path]})
  with pytest.raises(ValueError, match=bad_path):
    io.write_orbax(tmp_path / "ckpt", params)
  assert os.listdir(tmp_path) == []
  # Finite in float32 but not once cast to a float16 model's dtype.
  half = tmp_path / "half"
  shutil.copytree(tiny_dir, half / "src")
  state = safetensors.numpy.load_file(half / "src" / UNET_FILE)
  safetensors.numpy.save_file({k: v.astype(np.float16) for k, v in state.items()},
                              half / "src" / UNET_FILE, metadata={"format": "pt"})
  huge = {bad_path: np.full_like(edited[bad_path], 1e6)}
  with pytest.raises(NonFiniteWeightsError, match="float16"):
    io.write_model_folder(half / "src", half / "out", huge)
  assert not (half / "out").exists()


def test_flax_msgpack_source_is_converted(tiny_dir, model, edited, tmp_path):
  src = tmp_path / "flax"
  shutil.copytree(tiny_dir, src)
  (src / UNET_FILE).unlink()
  params = jax.tree.map(np.asarray, model.unet_params)
  (src / "unet" / "diffusion_flax_model.msgpack").write_bytes(flax.serialization.to_bytes(params))
  out = io.write_model_folder(src, tmp_path / "out", edited)
  assert files_of(out) == files_of(tiny_dir)  # msgpack in, safetensors out
  source = safetensors.numpy.load_file(tiny_dir / UNET_FILE)
  written = safetensors.numpy.load_file(out / UNET_FILE)
  assert sorted(written) == sorted(source)
  names = {models.torch_name(p): p for p in edited}
  for name, tensor in source.items():
    expected = edited[names[name]].T if name in names else tensor
    np.testing.assert_array_equal(written[name], expected)


def test_sharded_source_and_stale_variants(tiny_dir, edited, tmp_path):
  src = tmp_path / "sharded"
  shutil.copytree(tiny_dir, src)
  state = safetensors.numpy.load_file(src / UNET_FILE)
  (src / UNET_FILE).unlink()
  edited_names = {models.torch_name(p) for p in edited}
  shards = {"diffusion_pytorch_model-00001-of-00002.safetensors":
                sorted(n for n in state if n not in edited_names),
            "diffusion_pytorch_model-00002-of-00002.safetensors": sorted(edited_names)}
  for shard, keys in shards.items():
    safetensors.numpy.save_file({k: state[k] for k in keys}, src / "unet" / shard,
                                metadata={"format": "pt"})
  (src / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}))
  # An unedited fp16 copy must not survive next to the edited weights.
  safetensors.numpy.save_file({k: v.astype(np.float16) for k, v in state.items()},
                              src / "unet" / "diffusion_pytorch_model.fp16.safetensors")
  with pytest.warns(UserWarning, match=r"left out .*diffusion_pytorch_model\.fp16"):
    out = io.write_model_folder(src, tmp_path / "out", edited)
  assert not (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
  first, second = (f"unet/{s}" for s in shards)
  assert (out / first).read_bytes() == (src / first).read_bytes()
  written = safetensors.numpy.load_file(out / second)
  for path, kernel in edited.items():
    np.testing.assert_array_equal(written[models.torch_name(path)], kernel.T)
  index = "unet/diffusion_pytorch_model.safetensors.index.json"
  assert (out / index).read_bytes() == (src / index).read_bytes()
  models.load_model(out)  # still a loadable folder


# -- orbax -------------------------------------------------------------------------


def test_orbax_round_trip(model, edited, tmp_path):
  params = models.replace_kernels(model.unet_params, edited)
  path = io.write_orbax(tmp_path / "ckpt", params)
  assert no_leftovers(tmp_path)
  restored = io.read_orbax(path)
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored, params)
  with pytest.raises(io.OutputExistsError):
    io.write_orbax(tmp_path / "ckpt", params)
  io.write_orbax(tmp_path / "ckpt", model.unet_params, overwrite=True)
  again = io.read_orbax(path)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               again, model.unet_params)
  assert no_leftovers(tmp_path)
  with pytest.raises(FileNotFoundError):
    io.read_orbax(tmp_path / "missing")


def test_fp16_only_folder_gives_a_folder_plain_from_pretrained_loads(
    tiny_dir, edited, tmp_path, capfd):
  """A folder holding only fp16 variant weights (as `variant="fp16"`
  downloads keep them) gives a --full folder that `from_pretrained(out)`
  loads without `variant=`: the variant names become the plain ones, and the
  edited kernels are stored in the fp16 they replace."""
  pytest.importorskip("torch")
  from diffusers import StableDiffusionPipeline

  src = tmp_path / "fp16"
  shutil.copytree(tiny_dir, src)
  for path in list(src.rglob("*.safetensors")):
    state = safetensors.numpy.load_file(path)
    path.unlink()
    safetensors.numpy.save_file(
        {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in state.items()},
        path.with_name(path.name.replace(".safetensors", ".fp16.safetensors")),
        metadata={"format": "pt"})
  out = io.write_model_folder(src, tmp_path / "out", edited)
  assert files_of(out) == sorted(p.replace(".fp16", "") for p in files_of(src))
  pipe = StableDiffusionPipeline.from_pretrained(out)
  capfd.readouterr()
  unet = pipe.unet.state_dict()
  for path, kernel in edited.items():
    want = np.asarray(kernel).T.astype(np.float16)
    np.testing.assert_array_equal(unet[models.torch_name(path)].numpy(), want.astype(np.float32))
  text_src = safetensors.numpy.load_file(src / "text_encoder" / "model.fp16.safetensors")
  text_out = pipe.text_encoder.state_dict()
  for name, value in text_src.items():
    if name in text_out:
      np.testing.assert_array_equal(text_out[name].numpy(), value.astype(text_out[name].numpy().dtype))


def test_variant_names_drop_only_where_one_variant_is_alone(tmp_path):
  """Plain names replace variant ones only in a folder whose weights are all
  of one variant: next to plain weights, or with two variants that would take
  the same name, nothing is renamed."""
  def make(*names):
    for name in names:
      (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
      (tmp_path / name).write_bytes(name.encode())
  make("one/model.fp16.safetensors", "two/model.fp16.safetensors",
       "two/model.bf16.safetensors", "plain/model.safetensors", "plain/model.fp16.safetensors",
       "shards/m-00001-of-00002.fp16.safetensors", "shards/m-00002-of-00002.fp16.safetensors")
  (tmp_path / "shards/m.safetensors.index.fp16.json").write_text(json.dumps(
      {"weight_map": {"a": "m-00001-of-00002.fp16.safetensors",
                      "b": "m-00002-of-00002.fp16.safetensors"}}))
  assert sorted(io.drop_variant_names(tmp_path)) == [
      "one/model.safetensors", "shards/m-00001-of-00002.safetensors",
      "shards/m-00002-of-00002.safetensors", "shards/m.safetensors.index.json"]
  assert (tmp_path / "one/model.safetensors").read_bytes() == b"one/model.fp16.safetensors"
  assert json.loads((tmp_path / "shards/m.safetensors.index.json").read_text())["weight_map"] == {
      "a": "m-00001-of-00002.safetensors", "b": "m-00002-of-00002.safetensors"}
  assert files_of(tmp_path / "two") == ["model.bf16.safetensors", "model.fp16.safetensors"]
  assert files_of(tmp_path / "plain") == ["model.fp16.safetensors", "model.safetensors"]
