#!/usr/bin/env python
"""Images per second of `scapre-jax eval`'s generation, beside PyTorch
diffusers' StableDiffusionPipeline on the same model folder, shapes, steps
and batch, and of the scorers.

Random weights: `--shapes tiny` is the built-in tiny model (16 px);
`--shapes sd15` writes an SD-1.5-shaped folder (UNet 860M, CLIP ViT-L/14
text encoder, VAE; 512 px) with diffusers' PyTorch classes' own random
initialisation, once, into --cache. Both pipelines read that same folder.

Ours: `evaluation.images.Renderer` (the eval's own renderer: batched,
sharded over local devices, compiled once), timed after one warm-up call
that compiles. PyTorch: `StableDiffusionPipeline(..., output_type="np")`,
float32, the same scheduler config, timed after one warm-up call. Each side
runs in its own subprocess, so their thread pools and memory do not meet.

Scoring (`--sides score`): the eval's scorers on random uint8 images of
the shapes' size (16 or 512 px; each scorer resizes to its own input):
CLIP ViT-B/32 (transformers' default CLIPConfig), ResNet-50 (transformers'
default ResNetConfig, 1000 classes), both random weights, and NudeNet as
shipped; what is not installed is skipped and said so.

  python scripts/bench_eval.py --shapes tiny --images 16 --steps 2 --json benchmarks/cpu/eval_tiny.json
  python scripts/bench_eval.py --shapes sd15 --images 2 --batch 1 --steps 1 --json benchmarks/cpu/eval_sd15.json
  python scripts/bench_eval.py --shapes sd15 --sides score --images 32 --json benchmarks/cpu/eval_score_512.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.append(str(ROOT))

PROMPT = "an image of a church"

# SD-1.5's configs (runwayml/stable-diffusion-v1-5), the shapes that matter.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
    attention_head_dim=8, norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), sample_size=512,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 projection_dim=768)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
                      steps_offset=1)


def write_sd15(folder: pathlib.Path) -> pathlib.Path:
  """An SD-1.5-shaped diffusers folder with random weights (PyTorch default
  init, seed 0) and the tiny model's tokenizer (its ids fit any vocab)."""
  if (folder / "model_index.json").is_file():
    return folder
  import torch
  from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
  from scapre_jax import tiny
  torch.manual_seed(0)
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = CLIPTokenizer.from_pretrained(tiny.write_tiny_model(pathlib.Path(tmp) / "t")
                                              / "tokenizer")
  pipe = StableDiffusionPipeline(
      unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL(**SD15_VAE),
      text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=49408, **SD15_TEXT)),
      tokenizer=tokenizer, scheduler=PNDMScheduler(**SD15_SCHEDULER),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(folder, safe_serialization=True)
  return folder


def model_folder(shapes: str, cache: pathlib.Path) -> pathlib.Path:
  if shapes == "sd15":
    return write_sd15(cache / "random-sd15")
  from scapre_jax import tiny
  folder = cache / "tiny-sd1"
  return folder if folder.is_dir() else tiny.write_tiny_model(folder)


# -- one side per subprocess ------------------------------------------------------------


def ours(model: str, images: int, steps: int, batch: int) -> dict:
  import jax
  from scapre_jax.evaluation import images as images_lib
  t0 = time.perf_counter()
  renderer = images_lib.Renderer(model, steps=steps, guidance=7.5, size=None, batch=batch)
  load_s = time.perf_counter() - t0
  prompts, seeds = [PROMPT] * images, list(range(images))
  t0 = time.perf_counter()
  renderer.render(renderer.base_params, prompts[:batch], seeds[:batch])
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = renderer.render(renderer.base_params, prompts, seeds)
  run_s = time.perf_counter() - t0
  return {"side": "ours (JAX, Flax pipeline)", "devices": len(jax.local_devices()),
          "backend": jax.default_backend(), "size": int(out.shape[1]), "load_s": load_s,
          "first_call_s": first_s, "run_s": run_s, "images_per_s": images / run_s}


def torch_side(model: str, images: int, steps: int, batch: int, threads: int) -> dict:
  import torch
  from diffusers import StableDiffusionPipeline
  if threads:
    torch.set_num_threads(threads)
  t0 = time.perf_counter()
  pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None,
                                                 requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  load_s = time.perf_counter() - t0

  def render(n):
    done = []
    for i in range(0, n, batch):
      k = min(batch, n - i)
      done.append(pipe([PROMPT] * k, num_inference_steps=steps, guidance_scale=7.5,
                       generator=torch.Generator().manual_seed(i), output_type="np").images)
    return done
  with torch.inference_mode():
    t0 = time.perf_counter()
    render(batch)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = render(images)
    run_s = time.perf_counter() - t0
  return {"side": "PyTorch diffusers StableDiffusionPipeline", "threads": torch.get_num_threads(),
          "size": int(out[0].shape[1]), "load_s": load_s, "first_call_s": first_s,
          "run_s": run_s, "images_per_s": images / run_s}


def random_clip(cache: pathlib.Path):
  """The eval's CLIP scorer on a CLIP ViT-B/32 folder with random weights."""
  from transformers import CLIPConfig, CLIPModel
  from scapre_jax.evaluation import clip
  folder = cache / "random-clip-vit-b32"
  if not folder.is_dir():
    import torch
    torch.manual_seed(0)
    CLIPModel(CLIPConfig()).save_pretrained(folder, safe_serialization=True)
    # The tokenizer files from the tiny scorer (its ids fit CLIP's vocab);
    # no preprocessor_config.json, so CLIP's defaults (224 px) apply.
    from scapre_jax.evaluation import tiny_scorers
    with tempfile.TemporaryDirectory() as tmp:
      tiny = tiny_scorers.write_tiny_clip(pathlib.Path(tmp) / "clip")
      for f in pathlib.Path(tiny).iterdir():
        if f.suffix in (".txt", ".json") and f.name not in (
            "config.json", "preprocessor_config.json"):
          (folder / f.name).write_bytes(f.read_bytes())
  return clip.ClipScorer.load(str(folder))


def random_resnet50(cache: pathlib.Path):
  """The eval's classifier on a transformers ResNet-50 with random weights."""
  from transformers import ResNetConfig, ResNetForImageClassification
  from scapre_jax.evaluation import classifier
  folder = cache / "random-resnet50"
  if not folder.is_dir():
    import torch
    torch.manual_seed(0)
    ResNetForImageClassification(ResNetConfig(num_labels=1000)).save_pretrained(
        folder, safe_serialization=True)
  return classifier.ImageClassifier.load(str(folder))


def nudenet(cache: pathlib.Path):
  from scapre_jax.evaluation import nudity
  return nudity.NudityDetector()


def scoring(size: int, images: int, cache: pathlib.Path) -> list[dict]:
  import numpy as np
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8)
  texts = [PROMPT] * images
  results = []
  for name, load, call in (
      ("CLIP ViT-B/32 (Flax, random weights) cosine", random_clip,
       lambda s, x: s.cosine(x, texts[:len(x)])),
      ("ResNet-50 (Flax, random weights) top-1", random_resnet50, lambda s, x: s.top1(x)),
      ("NudeNet 3.4.2 (onnxruntime)", nudenet, lambda s, x: s.detect(x))):
    try:
      scorer = load(cache)
    except ImportError as err:
      results.append({"scorer": name, "skipped": f"not installed: {err}"})
      continue
    call(scorer, imgs[:2])  # compiles
    t0 = time.perf_counter()
    call(scorer, imgs)
    run_s = time.perf_counter() - t0
    results.append({"scorer": name, "images": images, "run_s": run_s,
                    "images_per_s": images / run_s})
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", choices=("tiny", "sd15"), default="tiny")
  parser.add_argument("--images", type=int, default=8, help="images timed per side")
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--sides", nargs="+", default=["ours", "torch"],
                      choices=("ours", "torch", "score"))
  parser.add_argument("--torch-threads", type=int, default=1,
                      help="torch.set_num_threads (0: torch's default). On a loaded "
                           "machine torch's spinning thread pool loses most of its time "
                           "to waiting: 1 thread measured 13x faster on a 2-core box at "
                           "load 15")
  parser.add_argument("--cache", default=str(pathlib.Path(tempfile.gettempdir()) / "scapre-bench"),
                      help="where the random-weight models are written once")
  parser.add_argument("--json", help="write the results here")
  parser.add_argument("--_side", help=argparse.SUPPRESS)
  parser.add_argument("--_model", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  cache = pathlib.Path(args.cache)
  if args._side:  # a child: one side, result as JSON on the last line
    if args._side == "score":
      size = 512 if args.shapes == "sd15" else 16
      result = scoring(size, args.images, cache)
    else:
      if args._side == "ours":
        result = ours(args._model, args.images, args.steps, args.batch)
      else:
        result = torch_side(args._model, args.images, args.steps, args.batch,
                            args.torch_threads)
    print(json.dumps(result))
    return 0
  model = model_folder(args.shapes, cache)
  results = []
  for side in args.sides:
    cmd = [sys.executable, __file__, "--_side", side, "--_model", str(model), "--shapes",
           args.shapes, "--images", str(args.images), "--steps", str(args.steps), "--batch",
           str(args.batch), "--cache", str(cache), "--torch-threads", str(args.torch_threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
      print(done.stderr[-3000:], file=sys.stderr)
      return done.returncode
    result = json.loads(done.stdout.strip().splitlines()[-1])
    results.extend(result if isinstance(result, list) else [result])
    print(json.dumps(result), flush=True)
  record = {"command": " ".join(["python", "scripts/bench_eval.py", *(argv or sys.argv[1:])]),
            "shapes": args.shapes, "images": args.images, "steps": args.steps,
            "batch": args.batch, "torch_threads": args.torch_threads,
            "load_average": os.getloadavg(), "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs", "results": results}
  if args.json:
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
