"""evaluation.clip against transformers' PyTorch CLIPModel and
CLIPImageProcessor on the same images, called the way the released
`artist_erasure.py` calls them; and the folder checks."""

import json
import shutil

import numpy as np
import pytest
import safetensors.numpy
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from scapre_jax.evaluation import clip, pixels

TEXTS = ["a photo of a church", "parachute in the sky by Vincent van Gogh", "golf ball",
         "a painting of a tench in the style of Claude Monet on a sunny day"]
CLASSES = ["church", "parachute", "golf ball", "tench", "gas pump"]


def images(shapes, seed=0):
  rng = np.random.default_rng(seed)
  # Smooth images (a coarse grid upsampled), so resizing matters.
  out = []
  for h, w in shapes:
    coarse = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.float64)
    out.append(np.kron(coarse, np.ones((8, 8, 1)))[:h, :w].astype(np.uint8))
  return out


@pytest.mark.parametrize("shape", [(300, 200), (200, 301), (224, 224), (61, 47), (512, 512)])
def test_clip_pixels_equal_clip_image_processor(shape):
  # openai/clip-vit-base-patch32's settings are CLIPImageProcessor's
  # defaults. Both sides are PIL's resize then the same numpy float ops,
  # each correctly rounded, so the result is bit-equal on any CPU.
  [image] = images([shape])
  theirs = CLIPImageProcessor()(images=image, return_tensors="np")["pixel_values"]
  ours = pixels.clip_pixels(image[None])
  assert ours.shape == (1, 3, 224, 224) and ours.dtype == np.float32
  np.testing.assert_array_equal(ours, theirs)


@pytest.fixture(scope="module")
def scorer64(tiny_clip_dir):
  return clip.ClipScorer.load(tiny_clip_dir, dtype="float64", batch_size=3)


@pytest.fixture(scope="module")
def torch_clip(tiny_clip_dir):
  return CLIPModel.from_pretrained(tiny_clip_dir).double().eval()


def released_cosines(model, folder, imgs, texts):
  """artist_erasure.py's loop: one prompt and one image per call, cosine of
  get_text_features and get_image_features; here in float64."""
  proc = CLIPProcessor.from_pretrained(folder)
  out = []
  # transformers fills its causal mask with finfo(model dtype).min in a
  # tensor of torch's default dtype: float64 for the call, or it overflows.
  default = torch.get_default_dtype()
  torch.set_default_dtype(torch.float64)
  try:
    with torch.no_grad():
      for image, text in zip(imgs, texts):
        txt = model.get_text_features(**proc(text=text, return_tensors="pt", padding=True))
        px = proc(images=image, return_tensors="pt")["pixel_values"].double()
        out.append(torch.nn.functional.cosine_similarity(
            txt, model.get_image_features(pixel_values=px)).item())
  finally:
    torch.set_default_dtype(default)
  return np.array(out)


def test_weights_are_the_real_layout(tiny_clip_dir):
  # PyTorch's CLIPModel takes the file with no key missing or left over.
  config = CLIPConfig.from_pretrained(tiny_clip_dir)
  state = {k: torch.from_numpy(v) for k, v in
           safetensors.numpy.load_file(tiny_clip_dir / "model.safetensors").items()}
  CLIPModel(config).load_state_dict(state, strict=True)


def test_cosine_equals_pytorch_clip_in_float64(scorer64, torch_clip, tiny_clip_dir):
  # Four pairs in batches of 3: two batches, the second padded.
  imgs = images([(48, 64), (64, 48), (32, 32), (100, 70)])
  ours = scorer64.cosine(np.stack([np.resize(i, (64, 64, 3)) for i in imgs]), TEXTS)
  theirs = released_cosines(torch_clip, tiny_clip_dir,
                            [np.resize(i, (64, 64, 3)) for i in imgs], TEXTS)
  assert ours.dtype == np.float64 and ours.shape == (4,)
  # float64 on both sides: the same equations agree to ~1e-15.
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
  assert np.ptp(theirs) > 0.05  # the pairs differ: not a constant


def test_zero_shot_equals_pytorch_argmax(scorer64, torch_clip, tiny_clip_dir):
  imgs = np.stack(images([(40, 40)] * 6, seed=1))
  ours = scorer64.zero_shot(imgs, CLASSES)
  proc = CLIPProcessor.from_pretrained(tiny_clip_dir)
  inputs = proc(text=[f"a photo of a {c}." for c in CLASSES], images=list(imgs),
                return_tensors="pt", padding=True)
  default = torch.get_default_dtype()
  torch.set_default_dtype(torch.float64)
  try:
    with torch.no_grad():
      logits = torch_clip(input_ids=inputs["input_ids"],
                          attention_mask=inputs["attention_mask"],
                          pixel_values=inputs["pixel_values"].double()).logits_per_image
  finally:
    torch.set_default_dtype(default)
  np.testing.assert_array_equal(ours, logits.argmax(-1).numpy())
  # The argmax of random weights may be one class for all images; the
  # similarities behind it are compared in full.
  sims = scorer64.image_features(imgs) @ scorer64.text_features(
      [f"a photo of a {c}." for c in CLASSES]).T
  scale = torch_clip.logit_scale.exp().item()
  np.testing.assert_allclose(sims * scale, logits.numpy(), rtol=0, atol=1e-12 * scale)


def test_float32_scorer_within_1e4(tiny_clip_dir, scorer64):
  # float32 against our own float64: a cosine is a sum of 16 products of
  # unit-vector entries after 2 layers of width 32; float32 rounding
  # (eps 6e-8) grows to ~1e-6 there on any CPU, so 1e-4 is a safe bound
  # that still catches any wrong weight or step (those move it by ~1e-1).
  scorer32 = clip.ClipScorer.load(tiny_clip_dir, dtype="float32")
  imgs = np.stack(images([(64, 64)] * 4, seed=2))
  np.testing.assert_allclose(scorer32.cosine(imgs, TEXTS), scorer64.cosine(imgs, TEXTS),
                             rtol=0, atol=1e-4)
  info = scorer32.describe()
  assert info["dtype"] == "float32" and info["preprocessing"]["size"] == 32
  json.dumps(info)


def test_bad_inputs(scorer64):
  imgs = np.stack(images([(32, 32)] * 2))
  with pytest.raises(ValueError, match="2 images but 1 prompts"):
    scorer64.cosine(imgs, ["one"])
  with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
    scorer64.cosine(imgs.astype(np.float32), ["a", "b"])


def test_check_clip_refuses_other_folders(tmp_path, tiny_clip_dir):
  clip.check_clip(tiny_clip_dir)
  with pytest.raises(ValueError, match="does not exist"):
    clip.check_clip(tmp_path / "nowhere")
  pipeline = tmp_path / "sd"
  pipeline.mkdir()
  (pipeline / "model_index.json").write_text("{}")
  with pytest.raises(ValueError, match="diffusers pipeline"):
    clip.check_clip(pipeline)
  text_only = tmp_path / "text"
  shutil.copytree(tiny_clip_dir, text_only)
  (text_only / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
  with pytest.raises(ValueError, match="model_type='clip_text_model'"):
    clip.check_clip(text_only)
  no_weights = tmp_path / "bin"
  shutil.copytree(tiny_clip_dir, no_weights)
  (no_weights / "model.safetensors").rename(no_weights / "pytorch_model.bin")
  with pytest.raises(ValueError, match="only pickled pytorch_model.bin"):
    clip.check_clip(no_weights)
  no_vocab = tmp_path / "vocab"
  shutil.copytree(tiny_clip_dir, no_vocab)
  (no_vocab / "merges.txt").unlink()
  with pytest.raises(ValueError, match="missing merges.txt"):
    clip.check_clip(no_vocab)
  with pytest.raises(ValueError, match="is a file"):
    clip.check_clip(tiny_clip_dir / "config.json")


def test_cached_id_resolves_offline(tmp_path, tiny_clip_dir, monkeypatch):
  # A Hugging Face cache entry (snapshot + refs/main), read without network.
  repo = tmp_path / "hub" / "models--org--tiny-clip"
  commit = "0123456789abcdef0123456789abcdef01234567"
  shutil.copytree(tiny_clip_dir, repo / "snapshots" / commit)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  clip.check_clip("org/tiny-clip")
  scorer = clip.ClipScorer.load("org/tiny-clip")
  assert scorer.describe()["path"] == str(repo / "snapshots" / commit)
  with pytest.raises(ValueError, match="never downloads"):
    clip.check_clip("org/not-cached")
