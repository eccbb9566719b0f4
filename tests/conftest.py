"""Test setup: float64 on, so reference comparisons can run in double."""

import os

# Eight host devices for the sharding tests; LLVM -O0 cuts XLA compile time
# about 3x, which dominates this suite (the heavy ops are library calls).
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")

# The CLI's persistent compilation cache stays off in tests (no writes to ~).
os.environ.setdefault("SCAPRE_JAX_COMPILE_CACHE", "off")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
  """Drops every compiled program after each test module.

  Each XLA:CPU executable holds its own memory mappings; the whole suite
  compiles thousands, and past the kernel's vm.max_map_count (65530 by
  default) mmap fails and the XLA compiler segfaults (seen at 95% of the
  suite). Programs are rarely shared across modules, so little is recompiled.
  """
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
  """The built-in tiny SD (sd1 variant), written once per session. Tests
  must not write into it."""
  from scapre_jax import tiny
  return tiny.write_tiny_model(tmp_path_factory.mktemp("tiny") / "sd1")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
  """`models.load_model` of `tiny_dir`."""
  from scapre_jax import models
  return models.load_model(tiny_dir)


@pytest.fixture
def shared_time_embedding(monkeypatch):
  """`run(model, params, torch_unet, sample, steps, context, added=None)`: the
  Flax UNet's output, with `torch_unet` patched to use the Flax time
  embedding. `added` ({"text_embeds", "time_ids"}, SDXL) is passed on as
  `added_cond_kwargs`, and the embedding of the time ids is handed over too.

  Both libraries form the sinusoidal time embeddings in float32 whatever the
  model dtype, each with its own sin/exp; handing PyTorch the Flax values
  removes the one float32 step, so float64 UNets agree to ~1e-14.
  """
  import jax.numpy as jnp
  import numpy as np

  def run(model, params, torch_unet, sample, steps, context, added=None):
    import torch
    names = ("time_proj",) if added is None else ("time_proj", "add_time_proj")
    added = None if added is None else {k: jnp.asarray(v) for k, v in added.items()}
    out, state = model.unet.apply(
        {"params": params}, jnp.asarray(sample), jnp.asarray(steps), jnp.asarray(context),
        added, capture_intermediates=lambda m, _: m.name in names,
        mutable=["intermediates"])
    for name in names:
      [embedding] = state["intermediates"][name]["__call__"]
      embedding = torch.from_numpy(np.array(embedding, np.float64))
      monkeypatch.setattr(getattr(torch_unet, name), "forward",
                          lambda t, embedding=embedding: embedding)
    return np.asarray(out.sample)

  return run


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
  """A tiny random-weight transformers CLIP folder (evaluation.tiny_scorers),
  written once per session. Tests must not write into it."""
  from scapre_jax.evaluation import tiny_scorers
  return tiny_scorers.write_tiny_clip(tmp_path_factory.mktemp("scorers") / "clip")


@pytest.fixture(scope="session")
def tiny_resnet_file(tmp_path_factory):
  """A tiny random-weight torchvision-layout ResNet `.safetensors` file
  (evaluation.tiny_scorers), written once per session."""
  from scapre_jax.evaluation import tiny_scorers
  return tiny_scorers.write_tiny_resnet(tmp_path_factory.mktemp("scorers") / "resnet50.safetensors")
