"""PyTorch <-> Flax mapping: name table, bit-exact round trips, clear errors.

Runs on numpy only: neither torch nor a real checkpoint is needed.
"""

import json

import numpy as np
import pytest
import safetensors.numpy

import convert
from scapre_jax import models
from scapre_jax import tiny

WEIGHTS = {"unet": "unet/diffusion_pytorch_model.safetensors",
           "vae": "vae/diffusion_pytorch_model.safetensors",
           "text_encoder": "text_encoder/model.safetensors"}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def tiny_dir(request, tmp_path_factory):
  return tiny.write_tiny_model(tmp_path_factory.mktemp(request.param) / "model",
                               variant=request.param)


def _part(tiny_dir, part):
  config = json.loads((tiny_dir / part / "config.json").read_text())
  state = safetensors.numpy.load_file(tiny_dir / WEIGHTS[part])
  return models.PARTS[part].layout, state, models.abstract_params(part, config)


@pytest.mark.parametrize("part", list(WEIGHTS))
def test_round_trip_is_bit_identical(tiny_dir, part):
  layout, state, expected = _part(tiny_dir, part)
  params = layout.to_flax(state, expected)
  flat, want = convert.flatten(params), convert.flatten(expected)
  assert list(flat) == list(want)
  assert all(flat[p].shape == want[p].shape for p in want)
  back = layout.to_torch(params, expected)
  assert sorted(back) == sorted(state)
  for name, array in state.items():
    assert back[name].dtype == array.dtype, name
    assert back[name].shape == array.shape, name
    assert back[name].tobytes() == array.tobytes(), name


def test_round_trip_keeps_float16(tiny_dir):
  layout, state, expected = _part(tiny_dir, "unet")
  half = {k: v.astype(np.float16) for k, v in state.items()}
  params = layout.to_flax(half, expected)
  assert {a.dtype for a in convert.flatten(params).values()} == {np.dtype(np.float16)}
  back = layout.to_torch(params, expected)
  assert all(back[k].tobytes() == half[k].tobytes() for k in half)


def test_transposes(tiny_dir):
  layout, state, expected = _part(tiny_dir, "unet")
  params = convert.flatten(layout.to_flax(state, expected))
  conv = state["conv_in.weight"]  # (O, I, H, W)
  np.testing.assert_array_equal(params["conv_in/kernel"], conv.transpose(2, 3, 1, 0))
  name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  np.testing.assert_array_equal(params[layout.flax_path(name)], state[name].T)
  np.testing.assert_array_equal(params["conv_norm_out/scale"], state["conv_norm_out.weight"])


NAMES = [
    (convert.UNET, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
     "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel"),
    (convert.UNET, "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0.bias",
     "up_blocks_1/attentions_2/transformer_blocks_0/attn1/to_out_0/bias"),
    (convert.UNET, "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
     "mid_block/attentions_0/transformer_blocks_0/ff/net_0/proj/kernel"),
    (convert.UNET, "mid_block.attentions.0.transformer_blocks.0.norm3.weight",
     "mid_block/attentions_0/transformer_blocks_0/norm3/scale"),
    # linear_1 is an attribute name, not list member 1
    (convert.UNET, "time_embedding.linear_1.weight", "time_embedding/linear_1/kernel"),
    (convert.UNET, "down_blocks.0.downsamplers.0.conv.weight",
     "down_blocks_0/downsamplers_0/conv/kernel"),
    (convert.UNET, "conv_norm_out.bias", "conv_norm_out/bias"),
    (convert.VAE, "encoder.mid_block.attentions.0.to_out.0.weight",
     "encoder/mid_block/attentions_0/proj_attn/kernel"),
    (convert.VAE, "decoder.mid_block.attentions.0.to_q.bias",
     "decoder/mid_block/attentions_0/query/bias"),
    (convert.VAE, "decoder.mid_block.attentions.0.group_norm.weight",
     "decoder/mid_block/attentions_0/group_norm/scale"),
    (convert.VAE, "decoder.up_blocks.1.upsamplers.0.conv.weight",
     "decoder/up_blocks_1/upsamplers_0/conv/kernel"),
    (convert.CLIP_TEXT, "text_model.encoder.layers.11.self_attn.k_proj.weight",
     "text_model/encoder/layers/11/self_attn/k_proj/kernel"),
    (convert.CLIP_TEXT, "text_model.embeddings.token_embedding.weight",
     "text_model/embeddings/token_embedding/embedding"),
    (convert.CLIP_TEXT, "text_model.encoder.layers.0.layer_norm1.weight",
     "text_model/encoder/layers/0/layer_norm1/scale"),
    (convert.CLIP_TEXT, "text_model.final_layer_norm.bias", "text_model/final_layer_norm/bias"),
]


@pytest.mark.parametrize("layout,torch_name,flax_path", NAMES)
def test_name_table_both_ways(layout, torch_name, flax_path):
  assert layout.flax_path(torch_name) == flax_path
  assert layout.torch_name(flax_path) == torch_name


def test_legacy_names_are_read(tiny_dir):
  # Older VAE files name attention query/key/value/proj_attn, older CLIP
  # files store the position_ids buffer; both still load.
  layout, state, expected = _part(tiny_dir, "vae")
  old = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v
         for k, v in state.items()}
  assert old != state
  back = layout.to_torch(layout.to_flax(old, expected), expected)
  assert all(back[k].tobytes() == v.tobytes() for k, v in state.items())
  layout, state, expected = _part(tiny_dir, "text_encoder")
  state["text_model.embeddings.position_ids"] = np.arange(77)[None]
  layout.to_flax(state, expected)


@pytest.mark.parametrize("name", [
    "conv_in.weight",  # conv
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight",  # linear
    "mid_block.resnets.0.norm1.weight",  # norm
])
def test_wrong_shape_names_tensor_and_shapes(tiny_dir, name):
  layout, state, expected = _part(tiny_dir, "unet")
  good = state[name].shape
  state[name] = np.zeros((good[0] + 1,) + good[1:], np.float32)
  with pytest.raises(ValueError) as err:
    layout.to_flax(state, expected)
  message = str(err.value)
  assert name in message
  assert f"expected {good}" in message
  assert f"found {state[name].shape}" in message


def test_missing_and_unexpected_tensors(tiny_dir):
  layout, state, expected = _part(tiny_dir, "unet")
  name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  missing = dict(state)
  del missing[name]
  with pytest.raises(ValueError, match=r"missing 1 tensors: .*attn2\.to_k\.weight"):
    layout.to_flax(missing, expected)
  extra = {**state, "mid_block.attentions.0.extra.weight": np.zeros((2, 2), np.float32)}
  with pytest.raises(ValueError,
                     match=r"unexpected 1 tensors: mid_block\.attentions\.0\.extra\.weight"):
    layout.to_flax(extra, expected)


def test_to_torch_checks_params(tiny_dir):
  layout, state, expected = _part(tiny_dir, "unet")
  params = convert.flatten(layout.to_flax(state, expected))
  params["conv_out/kernel"] = params["conv_out/kernel"][..., :2]
  with pytest.raises(ValueError,
                     match=r"conv_out/kernel: expected \(3, 3, 32, 4\), found \(3, 3, 32, 2\)"):
    layout.to_torch(convert.unflatten(params), expected)
