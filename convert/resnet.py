"""torchvision / timm ResNet and transformers' ResNet names, to Flax, without torch.

torchvision's `resnet50` state dict (timm's `resnet50` uses the same names)
is renamed to transformers' PyTorch `ResNetForImageClassification` names,
which `RESNET` maps to `FlaxResNetForImageClassification`'s variables:

  conv1, bn1                      resnet.embedder.embedder.{convolution, normalization}
  layer{s}.{j}.conv{k}, bn{k}     resnet.encoder.stages.{s-1}.layers.{j}.layer.{k-1}.*
  layer{s}.{j}.downsample.{0, 1}  ....layers.{j}.shortcut.{convolution, normalization}
  fc                              classifier.1

Batch norms carry two collections in Flax: `weight`/`bias` go to `params`
(`scale`/`bias`), `running_mean`/`running_var` to `batch_stats`
(`mean`/`var`); `num_batches_tracked` is dropped. Conv kernels go
(O, I, H, W) -> (H, W, I, O), the classifier's (out, in) -> (in, out).
`torchvision_config` reads a transformers `ResNetConfig` dict off a state
dict's shapes, so narrow test networks with the real names load too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from convert.mapping import Layout

RESNET = Layout(name="resnet")

_STEM = "resnet.embedder.embedder."
_PREFIXES = (  # top-level modules: (torchvision, transformers)
    ("conv1.", _STEM + "convolution."),
    ("bn1.", _STEM + "normalization."),
    ("fc.", "classifier.1."),
)
_BLOCK = re.compile(r"layer(\d+)\.(\d+)\.(conv(\d)|bn(\d)|downsample\.([01]))\.(.+)")
_STATS = {"running_mean": "mean", "running_var": "var"}


def torchvision_to_transformers(name: str) -> str | None:
  """transformers' PyTorch name of a torchvision/timm ResNet tensor; None for
  `num_batches_tracked`. KeyError for a name outside the layout."""
  if name.endswith("num_batches_tracked"):
    return None
  for tv, hf in _PREFIXES:
    if name.startswith(tv):
      return hf + name[len(tv):]
  m = _BLOCK.fullmatch(name)
  if not m:
    raise KeyError(name)
  stage, layer, _, conv, bn, down, leaf = m.groups()
  prefix = f"resnet.encoder.stages.{int(stage) - 1}.layers.{layer}."
  if down is not None:
    module = "shortcut." + ("convolution" if down == "0" else "normalization")
  else:
    module = f"layer.{int(conv or bn) - 1}." + ("convolution" if conv else "normalization")
  return prefix + module + "." + leaf


def to_flax(state: Mapping[str, np.ndarray], expected: Mapping[str, Any]) -> dict[str, Any]:
  """transformers-named PyTorch ResNet state dict -> Flax variables
  {"params", "batch_stats"} (numpy), checked against `expected` (the
  abstract variables); ValueError naming missing, unexpected or mis-shaped
  tensors."""
  params, stats = {}, {}
  for name, array in state.items():
    module, _, leaf = name.rpartition(".")
    if leaf == "num_batches_tracked":
      continue
    if leaf in _STATS:
      stats[f"{module}.{_STATS[leaf]}"] = array
    else:
      params[name] = array
  return {"params": RESNET.to_flax(params, expected["params"]),
          "batch_stats": RESNET.to_flax(stats, expected["batch_stats"])}


def transformers_to_torchvision(name: str) -> str:
  """Inverse of `torchvision_to_transformers`."""
  for tv, hf in _PREFIXES:
    if name.startswith(hf):
      return tv + name[len(hf):]
  m = re.fullmatch(r"resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\."
                   r"(?:layer\.(\d+)|(shortcut))\.(convolution|normalization)\.(.+)", name)
  if not m:
    raise KeyError(name)
  stage, layer, k, shortcut, kind, leaf = m.groups()
  if shortcut:
    module = "downsample." + ("0" if kind == "convolution" else "1")
  else:
    module = ("conv" if kind == "convolution" else "bn") + str(int(k) + 1)
  return f"layer{int(stage) + 1}.{layer}.{module}.{leaf}"


def to_torch(variables: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Inverse of `to_flax`: Flax variables -> transformers-named PyTorch
  state dict (without `num_batches_tracked`)."""
  state = RESNET.to_torch(variables["params"], expected["params"])
  back = {v: k for k, v in _STATS.items()}
  for name, array in RESNET.to_torch(variables["batch_stats"], expected["batch_stats"]).items():
    module, _, leaf = name.rpartition(".")
    state[f"{module}.{back[leaf]}"] = array
  return state


def from_torchvision(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """torchvision/timm names -> transformers' names (ValueError listing the
  tensors that are not a ResNet's)."""
  out, unknown = {}, []
  for name, array in state.items():
    try:
      new = torchvision_to_transformers(name)
    except KeyError:
      unknown.append(name)
      continue
    if new is not None:
      out[new] = array
  if unknown:
    shown = ", ".join(sorted(unknown)[:10])
    raise ValueError(f"not a torchvision/timm ResNet state dict: {len(unknown)} "
                     f"unknown tensors ({shown})")
  return out


def torchvision_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
  """transformers `ResNetConfig` fields read off a torchvision/timm state
  dict's {name: shape}: depths, widths, block type, number of classes."""
  state = shapes
  for key in ("conv1.weight", "fc.weight"):
    if key not in state:
      raise ValueError(f"not a torchvision/timm ResNet state dict: no {key}")
  blocks: dict[int, set[int]] = {}
  for name in state:
    m = re.fullmatch(r"layer(\d+)\.(\d+)\..+", name)
    if m:
      blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  if sorted(blocks) != [1, 2, 3, 4]:
    raise ValueError("not a torchvision/timm ResNet state dict: expected layer1 to "
                     f"layer4, found {['layer%d' % s for s in sorted(blocks)]}")
  bottleneck = "layer1.0.conv3.weight" in state
  last = "conv3" if bottleneck else "conv2"
  return {
      "model_type": "resnet",
      "embedding_size": int(state["conv1.weight"][0]),
      "hidden_sizes": [int(state[f"layer{s}.0.{last}.weight"][0]) for s in range(1, 5)],
      "depths": [len(blocks[s]) for s in range(1, 5)],
      "layer_type": "bottleneck" if bottleneck else "basic",
      "hidden_act": "relu",
      "downsample_in_first_stage": False,
      "num_labels": int(state["fc.weight"][0]),
  }
