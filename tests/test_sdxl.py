"""SDXL end to end on the tiny SDXL (`scapre-jax tiny DIR --variant sdxl`):
layout, family detection, the concatenated context against PyTorch
diffusers' StableDiffusionXLPipeline, the UNet against PyTorch before and
after an erase, and the written files in PyTorch diffusers.

Framework comparisons run both sides in float64: two frameworks are two
float32 programs whose roundings differ by CPU, while in float64 the same
equations agree to ~1e-14, so 1e-10 of the largest value is far below any
real mismatch (a wrong weight or layer moves outputs by O(1e-2) here).
"""

import hashlib
import json
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

from scapre_jax import cli, io, models, text, tiny

CONCEPTS = "parachute, golf ball"
PROMPTS = ["a photo of a parachute", "", "golf ball", "painting by Claude Monet in the style of art"]
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
  return tiny.write_tiny_model(tmp_path_factory.mktemp("sdxl") / "model", variant="sdxl")


@pytest.fixture(scope="module")
def erased(sdxl_dir, tmp_path_factory):
  """OUT of one `scapre-jax erase --full --orbax` on the tiny SDXL."""
  out = tmp_path_factory.mktemp("sdxl-erase") / "out"
  assert cli.main(["erase", "--model", str(sdxl_dir), "--concepts", CONCEPTS,
                   "--preset", "uce", "--out", str(out), "--full", "--orbax",
                   "--quiet"]) == 0
  return out


def files_of(root):
  return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _copy(src, dst, *, drop=()):
  shutil.copytree(src, dst, ignore=lambda folder, names: [n for n in names if n in drop])
  return dst


# -- the tiny SDXL ------------------------------------------------------------------


def test_tiny_sdxl_layout(sdxl_dir, tmp_path):
  index = json.loads((sdxl_dir / "model_index.json").read_text())
  assert index["_class_name"] == "StableDiffusionXLPipeline"
  assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
  assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
  assert index["tokenizer"] == index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
  unet = json.loads((sdxl_dir / "unet" / "config.json").read_text())
  widths = [json.loads((sdxl_dir / p / "config.json").read_text())["hidden_size"]
            for p in ("text_encoder", "text_encoder_2")]
  assert unet["addition_embed_type"] == "text_time"
  assert unet["cross_attention_dim"] == sum(widths) and widths[0] != widths[1]
  assert len(set(unet["transformer_layers_per_block"])) == 2
  pooled = json.loads((sdxl_dir / "text_encoder_2" / "config.json").read_text())["projection_dim"]
  assert unet["projection_class_embeddings_input_dim"] == pooled + 6 * unet["addition_time_embed_dim"]
  model = models.load_model(sdxl_dir)
  assert [t.tokenizer.pad_token for t in model.text_encoders] == ["<|endoftext|>", "!"]
  # Same seed, same bytes.
  again = tiny.write_tiny_model(tmp_path / "again", variant="sdxl")
  assert files_of(again) == files_of(sdxl_dir)
  for name in files_of(sdxl_dir):
    assert (again / name).read_bytes() == (sdxl_dir / name).read_bytes(), name


def test_family_from_the_folder(sdxl_dir, tiny_dir, tmp_path):
  model = models.load_model(sdxl_dir, weights="edit")
  assert model.family == "sdxl" and model.context_layer == "penultimate"
  assert [t.part for t in model.text_encoders] == ["text_encoder", "text_encoder_2"]
  assert type(model.text_encoders[1].module).__name__ == "FlaxCLIPTextModelWithProjection"
  # 22 matrices: 11 transformer blocks (depths 1 and 2), each to_k and to_v.
  kernels = models.cross_attention_kernels(model.unet_params)
  assert len(kernels) == 22 and {k.shape[0] for k in kernels.values()} == {96}
  assert models.load_model(tiny_dir, weights="edit").family == "sd1"

  # The refiner: text_encoder_2 alone, a UNet as wide as it, five micro-conditions.
  refiner = _copy(sdxl_dir, tmp_path / "refiner", drop=("text_encoder", "tokenizer"))
  config = json.loads((sdxl_dir / "unet" / "config.json").read_text())
  config.update(cross_attention_dim=64, projection_class_embeddings_input_dim=32 + 5 * 8)
  (refiner / "unet" / "config.json").write_text(json.dumps(config))
  params = tiny.random_params("unet", config, np.random.default_rng(0))
  safetensors.numpy.save_file(
      models.PARTS["unet"].layout.to_torch(params, models.abstract_params("unet", config)),
      refiner / UNET_FILE)
  refined = models.load_model(refiner, weights="edit")
  assert refined.family == "sdxl-refiner"
  assert [t.part for t in refined.text_encoders] == ["text_encoder_2"]
  # Its context is the second encoder's half of the SDXL context.
  full, lengths = text.encode_prompts(model, PROMPTS)
  half, same = text.encode_prompts(refined, PROMPTS)
  np.testing.assert_array_equal(half, full[..., 32:])
  np.testing.assert_array_equal(same, lengths)

  broken = _copy(sdxl_dir, tmp_path / "broken", drop=("text_encoder_2",))
  with pytest.raises(ValueError, match=r"unknown model layout: UNet cross_attention_dim=96, "
                     r"addition_embed_type='text_time', text_encoder \(32 wide\)"):
    models.load_model(broken)


# -- the text side ------------------------------------------------------------------


def test_context_matches_pytorch_pipeline(sdxl_dir):
  torch = pytest.importorskip("torch")
  from diffusers import StableDiffusionXLPipeline

  model = models.load_model(sdxl_dir, text_dtype="float64", weights="edit")
  ours, lengths = text.encode_prompts(model, PROMPTS)
  assert ours.dtype == np.float64 and ours.shape == (len(PROMPTS), 77, 96)
  pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
  pipe.text_encoder.double()
  pipe.text_encoder_2.double()
  # transformers builds CLIP's causal mask in the default dtype: float64
  # activations need a float64 default, or the mask's minimum overflows.
  previous = torch.get_default_dtype()
  torch.set_default_dtype(torch.float64)
  try:
    with torch.no_grad():
      want, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
  finally:
    torch.set_default_dtype(previous)
  want = want.numpy()
  assert want.dtype == np.float64 and pooled.shape == (len(PROMPTS), 32)
  np.testing.assert_allclose(ours, want, rtol=0, atol=1e-10 * np.abs(want).max())
  # Both tokenizers give one n(p): the attention-mask sums of either.
  for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
    mask = tokenizer(PROMPTS, padding="max_length", max_length=77).attention_mask
    np.testing.assert_array_equal(lengths, np.sum(mask, axis=1))

  # The algorithm's positions on that context: c_j = E(o_j)[n - 2], e0 = E("")[1].
  request = text.build_concept_inputs(model, ["parachute", "golf ball"], preserve=["a city"])
  got = {p: i for i, p in enumerate(PROMPTS)}
  n = lengths[got["golf ball"]]
  np.testing.assert_allclose(request.inputs.concept_vecs[1], want[got["golf ball"], n - 2],
                             rtol=0, atol=1e-10 * np.abs(want).max())
  np.testing.assert_allclose(request.inputs.empty_vec, want[got[""], 1],
                             rtol=0, atol=1e-10 * np.abs(want).max())
  # aligned rows: X_j from the last concept token to the end of the 77.
  assert request.inputs.old_seqs.shape[2] == 96
  assert int(request.inputs.seq_mask[1].sum()) == 77 - (n - 2)


# -- the erase and its files ------------------------------------------------------------


def _matched(torch_unet, monkeypatch):
  """diffusers' Flax UNet uses tanh-GELU in GEGLU and GroupNorm eps 1e-5 in
  Transformer2DModel (PyTorch: erf, 1e-6): match them so the weights and the
  SDXL conditioning are what is compared (tests/test_models.py does the same)."""
  import torch
  import torch.nn.functional as F
  from diffusers.models import activations
  monkeypatch.setattr(activations.GEGLU, "gelu",
                      lambda self, gate: F.gelu(gate, approximate="tanh"))
  for name, module in torch_unet.named_modules():
    if name.endswith(".norm") and isinstance(module, torch.nn.GroupNorm):
      module.eps = 1e-5
  return torch_unet


def test_unet_parity_before_and_after_the_edit(sdxl_dir, erased, monkeypatch,
                                               shared_time_embedding):
  torch = pytest.importorskip("torch")
  from diffusers import UNet2DConditionModel

  rng = np.random.default_rng(0)
  sample = rng.standard_normal((2, 4, 8, 8))
  steps = np.array([10, 999])
  context = rng.standard_normal((2, 77, 96))
  added = {"text_embeds": rng.standard_normal((2, 32)),
           "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024], [512, 768, 8, 16, 512, 768]],
                                np.float64)}
  outputs = []
  for folder in (sdxl_dir, erased / "model"):
    model = models.load_model(folder, dtype="float64")
    torch_unet = _matched(UNet2DConditionModel.from_pretrained(
        folder / "unet", low_cpu_mem_usage=False).double(), monkeypatch)
    ours = shared_time_embedding(model, model.unet_params, torch_unet, sample, steps,
                                 context, added)
    with torch.no_grad():
      want = torch_unet(torch.from_numpy(sample), torch.from_numpy(steps),
                        torch.from_numpy(context), added_cond_kwargs={
                            k: torch.from_numpy(v) for k, v in added.items()}).sample.numpy()
    assert ours.dtype == want.dtype == np.float64
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-10 * np.abs(want).max())
    outputs.append(ours)
  # The edit changed what the UNet computes from this context.
  assert np.abs(outputs[1] - outputs[0]).max() > 1e-3 * np.abs(outputs[0]).max()


def test_only_cross_attention_kv_change(sdxl_dir, erased, tmp_path):
  kernels, meta = io.read_edit_file(erased / "edit.safetensors")
  assert meta["family"] == "sdxl"
  assert json.loads((erased / "report.json").read_text())["family"] == "sdxl"
  original = models.load_model(sdxl_dir)
  assert set(kernels) == set(models.cross_attention_kernels(original.unet_params))
  assert files_of(erased / "model") == files_of(sdxl_dir)
  for name in files_of(sdxl_dir):
    if name != UNET_FILE:
      assert (erased / "model" / name).read_bytes() == (sdxl_dir / name).read_bytes(), name
  source = safetensors.numpy.load_file(sdxl_dir / UNET_FILE)
  written = safetensors.numpy.load_file(erased / "model" / UNET_FILE)
  names = {models.torch_name(p): p for p in kernels}
  assert sorted(written) == sorted(source)
  for name, tensor in source.items():
    if name in names:
      assert name.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))
      np.testing.assert_array_equal(written[name], kernels[names[name]].T)
      assert not np.array_equal(written[name], tensor), name
    else:
      assert written[name].tobytes() == tensor.tobytes(), name
  # apply on the base gives the --full folder, bit for bit; orbax holds the same.
  applied = io.apply_edit(sdxl_dir, erased / "edit.safetensors", tmp_path / "applied")
  assert (applied / UNET_FILE).read_bytes() == (erased / "model" / UNET_FILE).read_bytes()
  restored = io.read_orbax(erased / "orbax")
  reloaded = models.load_model(erased / "model")
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(reloaded.unet_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert models.load_model(applied).fingerprint == hashlib.sha256(
      (erased / "model" / UNET_FILE).read_bytes()).hexdigest()


def test_edit_file_loads_into_pytorch_unet(sdxl_dir, erased):
  torch = pytest.importorskip("torch")
  from diffusers import UNet2DConditionModel

  unet = UNet2DConditionModel.from_pretrained(sdxl_dir / "unet", low_cpu_mem_usage=False)
  state = {k: torch.from_numpy(v)
           for k, v in safetensors.numpy.load_file(erased / "edit.safetensors").items()}
  result = unet.load_state_dict(state, strict=False)
  assert result.unexpected_keys == []
  every_kv = {n for n in unet.state_dict() if n.endswith((".attn2.to_k.weight",
                                                           ".attn2.to_v.weight"))}
  assert set(state) == every_kv and len(every_kv) == 22
  loaded = unet.state_dict()
  for name, tensor in state.items():
    assert torch.equal(loaded[name], tensor), name


def test_full_folder_generates_in_pytorch_pipeline(erased):
  torch = pytest.importorskip("torch")
  from diffusers import StableDiffusionXLPipeline

  pipe = StableDiffusionXLPipeline.from_pretrained(erased / "model")
  images = pipe("a photo of a parachute", num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
  assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


# -- generate -------------------------------------------------------------------------


def test_generate_before_and_after_grid(sdxl_dir, erased, tmp_path):
  from scapre_jax import generate

  prompts = ["a photo of a parachute", "a city street"]
  with pytest.warns(UserWarning, match="FlaxDDIMScheduler"):  # SDXL's Euler has no Flax loop
    grid = generate.generate_grid(sdxl_dir, prompts, steps=2, seed=0,
                                  edit_file=erased / "edit.safetensors")
  size = 16  # sample_size 8 * VAE scale factor 2
  assert grid.dtype == np.uint8 and grid.shape == (2 * size, 2 * size, 3)
  assert grid.std() > 0
  # Zero unconditional context (force_zeros_for_empty_prompt) and the same noise:
  # the edited UNet changes the parachute image.
  assert not np.array_equal(grid[:size, :size], grid[:size, size:])
  out = tmp_path / "grid.png"
  # The CLI renders the same grid (the cached pipeline: no second warning).
  assert cli.main(["generate", "--model", str(sdxl_dir), "--edit",
                   str(erased / "edit.safetensors"), "--prompts", ";".join(prompts),
                   "--steps", "2", "--out", str(out)]) == 0
  from PIL import Image
  with Image.open(out) as image:  # the grid, with its labels around it
    x, y = json.loads(image.text["scapre-jax"])["grid_origin"]
    np.testing.assert_array_equal(np.asarray(image)[y:, x:x + grid.shape[1]], grid)
