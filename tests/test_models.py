"""Model loading: tiny folders, dtypes, offline cache ids, errors, selection
of the cross-attention matrices, and parity with the PyTorch models."""

import hashlib
import json
import os
import shutil
import socket

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import convert
from scapre_jax import console
from scapre_jax import models
from scapre_jax import tiny

# SD 1.5 and SD 2.1 UNet configs as published (the keys that set shapes).
SD15_UNET = {
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768, "layers_per_block": 2, "sample_size": 64,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
SD21_UNET = {**SD15_UNET, "attention_head_dim": [5, 10, 20, 20],
             "cross_attention_dim": 1024, "use_linear_projection": True,
             "upcast_attention": True, "sample_size": 96}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny")
  return {v: tiny.write_tiny_model(root / v, variant=v) for v in ("sd1", "sd2")}


@pytest.fixture(scope="module")
def loaded(tiny_dirs):
  return {v: models.load_model(d) for v, d in tiny_dirs.items()}


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


# -- tiny model files -----------------------------------------------------------


def test_tiny_model_layout_and_determinism(tiny_dirs, tmp_path):
  first = tiny_dirs["sd1"]
  files = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
  assert files == [
      "model_index.json", "scheduler/scheduler_config.json",
      "text_encoder/config.json", "text_encoder/model.safetensors",
      "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
      "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
      "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
      "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
  index = json.loads((first / "model_index.json").read_text())
  assert index["_class_name"] == "StableDiffusionPipeline"
  assert index["safety_checker"] == [None, None] and not index["requires_safety_checker"]
  second = tiny.write_tiny_model(tmp_path / "again")
  for name in files:
    assert (first / name).read_bytes() == (second / name).read_bytes(), name
  other = tiny.write_tiny_model(tmp_path / "seed1", seed=1)
  assert ((first / "unet/diffusion_pytorch_model.safetensors").read_bytes()
          != (other / "unet/diffusion_pytorch_model.safetensors").read_bytes())


def test_tiny_model_refuses_non_empty_directory(tmp_path):
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "keep.txt").write_text("x")
  with pytest.raises(ValueError, match="not an empty directory"):
    tiny.write_tiny_model(tmp_path / "busy")
  assert os.listdir(tmp_path / "busy") == ["keep.txt"]
  assert sorted(os.listdir(tmp_path)) == ["busy"]  # no temporary left behind
  (tmp_path / "empty").mkdir()
  tiny.write_tiny_model(tmp_path / "empty")
  assert (tmp_path / "empty" / "model_index.json").is_file()
  with pytest.raises(ValueError, match="unknown variant"):
    tiny.write_tiny_model(tmp_path / "x", variant="sd3")


# -- loading --------------------------------------------------------------------


@pytest.mark.parametrize("variant,width,pad", [("sd1", 32, "<|endoftext|>"), ("sd2", 64, "!")])
def test_load_tiny(loaded, tiny_dirs, variant, width, pad):
  model = loaded[variant]
  unet_file = tiny_dirs[variant] / "unet" / "diffusion_pytorch_model.safetensors"
  assert model.path == tiny_dirs[variant]
  assert model.weights_format == "safetensors"
  assert model.unet_files == (unet_file,)
  assert model.fingerprint == hashlib.sha256(unet_file.read_bytes()).hexdigest()
  assert model.unet_config["cross_attention_dim"] == width
  assert model.text_encoder.config.hidden_size == width
  assert (jax.tree.structure(model.unet_params)
          == jax.tree.structure(models.abstract_params("unet", model.unet_config)))
  tok = model.tokenizer
  assert type(tok).__name__ == "CLIPTokenizer"
  assert tok.model_max_length == 77 and tok.pad_token == pad
  ids = tok("a photo of a tench", padding="max_length").input_ids
  assert len(ids) == 77 and ids[0] == tok.bos_token_id
  assert ids[ids.index(tok.eos_token_id) + 1] == tok.pad_token_id
  assert len(tok) == model.text_encoder.config.vocab_size


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_dtype(tiny_dirs, dtype):
  model = models.load_model(tiny_dirs["sd1"], dtype=dtype)
  for params in (model.unet_params, model.text_params):
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(dtype)}
  assert model.unet.dtype == jnp.dtype(dtype)
  assert model.text_encoder.dtype == jnp.dtype(dtype)
  assert model.dtype == dtype


def test_float64_text_encoder_of_a_float32_model(tiny_dirs):
  # --precision float64: the UNet stays in the model's dtype.
  model = models.load_model(tiny_dirs["sd1"], text_dtype="float64")
  assert {a.dtype for a in jax.tree.leaves(model.unet_params)} == {jnp.dtype("float32")}
  assert {a.dtype for a in jax.tree.leaves(model.text_params)} == {jnp.dtype("float64")}
  assert model.text_encoder.dtype == jnp.float64 and model.dtype == "float32"


def test_unknown_dtype(tiny_dirs):
  with pytest.raises(ValueError, match="unknown dtype 'float8'"):
    models.load_model(tiny_dirs["sd1"], dtype="float8")


def test_cache_id_resolves_offline(tiny_dirs, tmp_path, monkeypatch):
  # The layout huggingface_hub writes: blobs, a snapshot of symlinks to
  # them, and refs/main naming the snapshot.
  repo = tmp_path / "hf" / "hub" / "models--org--tiny-sd"
  commit = "0123456789abcdef0123456789abcdef01234567"
  snapshot = repo / "snapshots" / commit
  for src in sorted(tiny_dirs["sd1"].rglob("*")):
    if src.is_file():
      data = src.read_bytes()
      blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
      blob.parent.mkdir(parents=True, exist_ok=True)
      blob.write_bytes(data)
      link = snapshot / src.relative_to(tiny_dirs["sd1"])
      link.parent.mkdir(parents=True, exist_ok=True)
      link.symlink_to(os.path.relpath(blob, link.parent))
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")

  def no_network(*args, **kwargs):
    raise AssertionError("load_model tried to open a network connection")

  monkeypatch.setattr(socket.socket, "connect", no_network)
  model = models.load_model("org/tiny-sd")
  assert model.path == snapshot
  assert model.fingerprint == models.load_model(tiny_dirs["sd1"]).fingerprint
  with pytest.raises(FileNotFoundError, match="'org/absent'.*Hugging Face cache"):
    models.load_model("org/absent")


def test_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    models.load_model(tmp_path / "nowhere")


def test_not_a_diffusers_folder(tiny_dirs, tmp_path):
  (tmp_path / "plain").mkdir()
  (tmp_path / "plain" / "weights.safetensors").write_bytes(b"")
  with pytest.raises(ValueError, match="not a diffusers.*model_index.json, unet"):
    models.load_model(tmp_path / "plain")
  folder = _copy(tiny_dirs["sd1"], tmp_path / "no_unet")
  shutil.rmtree(folder / "unet")
  with pytest.raises(ValueError, match="missing unet"):
    models.load_model(folder)


def test_truncated_safetensors(tiny_dirs, tmp_path):
  folder = _copy(tiny_dirs["sd1"], tmp_path / "cut")
  file = folder / "unet" / "diffusion_pytorch_model.safetensors"
  file.write_bytes(file.read_bytes()[:100_000])
  with pytest.raises(ValueError, match=r"cannot read .*unet.*diffusion_pytorch_model\.safetensors"):
    models.load_model(folder)


def test_shapes_that_do_not_match_the_config(tiny_dirs, tmp_path):
  folder = _copy(tiny_dirs["sd1"], tmp_path / "wide")
  config = json.loads((folder / "unet" / "config.json").read_text())
  (folder / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 48}))
  name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  with pytest.raises(ValueError, match=rf"{name}: expected \(32, 48\), found \(32, 32\)"):
    models.load_model(folder)


def test_unsupported_config_and_pickle_only(tiny_dirs, tmp_path):
  folder = _copy(tiny_dirs["sd1"], tmp_path / "gelu")
  config = json.loads((folder / "unet" / "config.json").read_text())
  (folder / "unet" / "config.json").write_text(json.dumps({**config, "act_fn": "gelu"}))
  with pytest.raises(ValueError, match="act_fn='gelu'"):
    models.load_model(folder)
  folder = _copy(tiny_dirs["sd1"], tmp_path / "pickle")
  weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
  weights.rename(weights.with_suffix(".bin"))
  with pytest.raises(ValueError, match=r"only pickled PyTorch weights \(\.bin\)"):
    models.load_model(folder)


def test_flax_msgpack_and_fp16_variant(loaded, tiny_dirs, tmp_path):
  reference = loaded["sd1"]
  folder = _copy(tiny_dirs["sd1"], tmp_path / "flax")
  (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
  (folder / "text_encoder" / "model.safetensors").unlink()
  to_np = lambda tree: jax.tree.map(np.asarray, tree)
  (folder / "unet" / "diffusion_flax_model.msgpack").write_bytes(
      flax.serialization.to_bytes(to_np(reference.unet_params)))
  (folder / "text_encoder" / "flax_model.msgpack").write_bytes(
      flax.serialization.to_bytes(to_np(reference.text_params)))
  model = models.load_model(folder)
  assert model.weights_format == "flax"
  assert model.unet_files == (folder / "unet" / "diffusion_flax_model.msgpack",)
  for got, want in ((model.unet_params, reference.unet_params),
                    (model.text_params, reference.text_params)):
    jax.tree.map(np.testing.assert_array_equal, got, want)

  folder = _copy(tiny_dirs["sd1"], tmp_path / "fp16")
  full = folder / "unet" / "diffusion_pytorch_model.safetensors"
  state = safetensors.numpy.load_file(full)
  full.unlink()
  safetensors.numpy.save_file({k: v.astype(np.float16) for k, v in state.items()},
                              folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
  model = models.load_model(folder)
  assert model.weights_format == "safetensors"
  assert model.unet_files[0].name == "diffusion_pytorch_model.fp16.safetensors"
  assert {a.dtype for a in jax.tree.leaves(model.unet_params)} == {jnp.dtype("float32")}


# -- selecting the edited matrices ------------------------------------------------


def _attn2_layers(params):
  return {p.split("/attn2/")[0] for p in convert.flatten(params) if "/attn2/" in p}


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_cross_attention_kernels(loaded, tiny_dirs, variant):
  model = loaded[variant]
  kernels = models.cross_attention_kernels(model.unet_params)
  assert len(_attn2_layers(model.unet_params)) == 4
  assert len(kernels) == 2 * 4
  state = safetensors.numpy.load_file(
      tiny_dirs[variant] / "unet" / "diffusion_pytorch_model.safetensors")
  d_in = model.unet_config["cross_attention_dim"]
  for path, kernel in kernels.items():
    assert path.endswith(("attn2/to_k/kernel", "attn2/to_v/kernel"))
    d_out = 64 if path.startswith("mid_block") else 32
    assert kernel.shape == (d_in, d_out)
    name = models.torch_name(path)
    assert models.flax_path(name) == path
    np.testing.assert_array_equal(kernel, state[name].T)
  only_v = models.cross_attention_kernels(model.unet_params, targets=("to_v",))
  assert len(only_v) == 4 and all(p.endswith("to_v/kernel") for p in only_v)
  with pytest.raises(ValueError, match="no parameter path matches.*paths include: conv_in"):
    models.cross_attention_kernels(model.unet_params, targets=("to_z",))


@pytest.mark.parametrize("config,d_in", [(SD15_UNET, 768), (SD21_UNET, 1024)])
def test_sd_expectations(config, d_in):
  abstract = models.abstract_params("unet", config)
  kernels = models.cross_attention_kernels(abstract)
  assert len(_attn2_layers(abstract)) == 16
  assert len(kernels) == 32
  widths = sorted(k.shape[1] for k in kernels.values())
  assert widths == [320] * 10 + [640] * 10 + [1280] * 12  # mid block: 1280 too
  assert {k.shape[0] for k in kernels.values()} == {d_in}
  path = "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel"
  assert path in kernels
  name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  assert models.torch_name(path) == name
  last = "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v.weight"
  assert models.flax_path(last) in kernels


def test_replace_kernels(loaded):
  params = models.load_model(loaded["sd1"].path, dtype="bfloat16").unet_params
  kernels = models.cross_attention_kernels(params)
  path = next(iter(kernels))
  new = models.replace_kernels(params, {path: jnp.ones(kernels[path].shape, jnp.float32)})
  flat_new, flat_old = convert.flatten(new), convert.flatten(params)
  assert flat_new[path].dtype == jnp.bfloat16
  assert bool((flat_new[path] == 1).all())
  assert not bool((flat_old[path] == 1).all())  # the input is not modified
  assert all(flat_new[p] is flat_old[p] for p in flat_old if p != path)
  with pytest.raises(ValueError, match="unknown parameter paths: nowhere/kernel"):
    models.replace_kernels(params, {"nowhere/kernel": jnp.ones((2, 2))})
  with pytest.raises(ValueError, match=r"wrong shape: .*expected \(32, 32\), found \(32, 31\)"):
    models.replace_kernels(params, {path: jnp.ones((32, 31))})


# -- parity with the PyTorch models -------------------------------------------------


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_parity_with_pytorch(tiny_dirs, variant, monkeypatch, capfd, shared_time_embedding):
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F
  console.quiet_library_logs()  # what the CLI does: no deprecation lines below
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from diffusers.models import activations
  from transformers import CLIPTextModel

  # Both sides in float64: two frameworks are two programs, whose float32
  # roundings differ by CPU; in float64 the same equations agree to ~1e-14.
  folder = tiny_dirs[variant]
  model = models.load_model(folder, dtype="float64")
  capfd.readouterr()  # importing diffusers' torch side logs Flax deprecations
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((2, 4, 8, 8))  # NCHW in both APIs
  steps = np.array([10, 999])
  context = rng.standard_normal((2, 77, model.unet_config["cross_attention_dim"]))
  torch_unet = UNet2DConditionModel.from_pretrained(
      folder / "unet", low_cpu_mem_usage=False).double()
  ours = shared_time_embedding(model, model.unet_params, torch_unet, sample, steps, context)
  assert ours.dtype == np.float64
  run = lambda: torch_unet(torch.from_numpy(sample), torch.from_numpy(steps),
                           torch.from_numpy(context)).sample.numpy()
  with torch.no_grad():
    plain = run()
    # diffusers' Flax UNet differs from its PyTorch twin in two places:
    # GEGLU uses tanh-GELU (PyTorch: erf) and Transformer2DModel's GroupNorm
    # eps is 1e-5 (PyTorch: 1e-6). Match them so the weight mapping is what
    # is compared.
    monkeypatch.setattr(activations.GEGLU, "gelu",
                        lambda self, gate: F.gelu(gate, approximate="tanh"))
    for name, module in torch_unet.named_modules():
      if name.endswith(".norm") and isinstance(module, torch.nn.GroupNorm):
        module.eps = 1e-5
    matched = run()
  assert matched.dtype == np.float64
  np.testing.assert_allclose(ours, matched, rtol=0, atol=1e-10 * np.abs(matched).max())
  # Unmatched, the two activations and epsilons differ by up to ~1e-3.
  np.testing.assert_allclose(ours, plain, atol=5e-3)

  tok = model.tokenizer(["a photo of a tench", "Vincent van Gogh", ""],
                        padding="max_length", return_tensors="np")
  ours = np.asarray(model.text_encoder(tok.input_ids, tok.attention_mask,
                                       params=model.text_params).last_hidden_state)
  torch_clip = CLIPTextModel.from_pretrained(folder / "text_encoder").double()
  # transformers fills its causal mask with finfo(model dtype).min in a tensor
  # of torch's default dtype: float64 for the call, or it overflows.
  default = torch.get_default_dtype()
  torch.set_default_dtype(torch.float64)
  try:
    with torch.no_grad():
      theirs = torch_clip(torch.from_numpy(tok.input_ids),
                          attention_mask=torch.from_numpy(tok.attention_mask)).last_hidden_state
  finally:
    torch.set_default_dtype(default)
  assert ours.dtype == np.float64 and theirs.dtype == torch.float64
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=0,
                             atol=1e-10 * np.abs(theirs.numpy()).max())
  assert "deprecated" not in capfd.readouterr().err

  # The VAE is not loaded by load_model; check that diffusers reads exactly
  # our tensors, none missing or left over.
  vae = AutoencoderKL.from_pretrained(folder / "vae", low_cpu_mem_usage=False)
  state = safetensors.numpy.load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
  theirs = vae.state_dict()
  assert sorted(theirs) == sorted(state)
  assert all(np.array_equal(theirs[k].numpy(), v) for k, v in state.items())


def test_sharded_safetensors(loaded, tiny_dirs, tmp_path):
  folder = _copy(tiny_dirs["sd1"], tmp_path / "sharded")
  full = folder / "unet" / "diffusion_pytorch_model.safetensors"
  state = safetensors.numpy.load_file(full)
  full.unlink()
  names = sorted(state)
  shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
            "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2]}
  for shard, keys in shards.items():
    safetensors.numpy.save_file({k: state[k] for k in keys}, folder / "unet" / shard)
  (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}))
  model = models.load_model(folder)
  assert [f.name for f in model.unet_files] == sorted(shards)
  digest = hashlib.sha256(b"".join(f.read_bytes() for f in model.unet_files)).hexdigest()
  assert model.fingerprint == digest
  jax.tree.map(np.testing.assert_array_equal, model.unet_params, loaded["sd1"].unet_params)
