"""evaluation.classifier against a PyTorch ResNet with torchvision's exact
module layout and forward pass (torchvision itself does not install beside
torch 2.13.0), and against transformers' PyTorch ResNet; torchvision's
preprocessing on hand-worked sizes and offsets; the file checks."""

import json

import numpy as np
import pytest
import safetensors.numpy
import torch
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

from convert import resnet
from scapre_jax.evaluation import classifier, pixels, tiny_scorers


class Bottleneck(nn.Module):
  """torchvision.models.resnet.Bottleneck (ResNet v1.5: stride on the 3x3)."""

  def __init__(self, inplanes, width, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(width * 4)
    self.relu = nn.ReLU()
    self.downsample = None
    if stride != 1 or inplanes != width * 4:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, width * 4, 1, stride, bias=False),
                                      nn.BatchNorm2d(width * 4))

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchvisionResNet(nn.Module):
  """torchvision.models.resnet.ResNet with Bottleneck blocks."""

  def __init__(self, embedding, widths, depths, classes=1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, embedding, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(embedding)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = embedding
    for s, (width, depth) in enumerate(zip(widths, depths)):
      blocks = []
      for j in range(depth):
        blocks.append(Bottleneck(inplanes, width // 4, 2 if s and not j else 1))
        inplanes = width
      setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(inplanes, classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for s in range(1, 5):
      x = getattr(self, f"layer{s}")(x)
    return self.fc(torch.flatten(self.avgpool(x), 1))


def torch_state(file):
  return {k: torch.from_numpy(v) for k, v in safetensors.numpy.load_file(file).items()}


def smooth_images(n, h, w, seed=0):
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (n, h // 16 + 1, w // 16 + 1, 3)).astype(np.float64)
  return np.kron(coarse, np.ones((1, 16, 16, 1)))[:, :h, :w].astype(np.uint8)


@pytest.fixture(scope="module")
def clf64(tiny_resnet_file):
  return classifier.ImageClassifier.load(tiny_resnet_file, dtype="float64", batch_size=2)


def test_logits_equal_torchvision_layout_in_float64(tiny_resnet_file, clf64):
  cfg = tiny_scorers.TINY_RESNET
  net = TorchvisionResNet(cfg["embedding_size"], cfg["hidden_sizes"], cfg["depths"])
  # strict: every torchvision key, buffers and num_batches_tracked included.
  net.load_state_dict(torch_state(tiny_resnet_file), strict=True)
  net = net.double().eval()
  images = smooth_images(3, 240, 300)  # batches of 2: the second padded
  with torch.no_grad():
    theirs = net(torch.from_numpy(pixels.torchvision_pixels(images)).double()).numpy()
  ours = clf64.logits(images)
  assert ours.dtype == np.float64 and ours.shape == (3, 1000)
  # float64 on both sides: the same equations agree to ~1e-14 relative.
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-10 * np.abs(theirs).max())
  names = classifier.imagenet_categories()
  assert clf64.top1(images) == [names[i] for i in theirs.argmax(-1)]
  assert np.ptp(theirs, axis=-1).min() > 0.1  # logits that differ: a real argmax


def test_float32_within_1e4(tiny_resnet_file, clf64):
  # float32 against our float64: the logits are O(1) after 5 blocks of
  # width <= 128; float32 rounding (eps 6e-8) grows to ~1e-6 on any CPU,
  # so 1e-4 bounds it while a wrong weight or step moves them by ~1e-1.
  clf32 = classifier.ImageClassifier.load(tiny_resnet_file)
  images = smooth_images(2, 232, 232, seed=1)
  np.testing.assert_allclose(clf32.logits(images), clf64.logits(images), rtol=0, atol=1e-4)
  json.dumps(clf32.describe())


def test_transformers_folder_matches_torchvision_file(tmp_path, tiny_resnet_file, clf64):
  # transformers' PyTorch ResNet takes our renamed tensors strictly; saved
  # as a folder, it loads to the same network.
  model = ResNetForImageClassification(ResNetConfig(**tiny_scorers.TINY_RESNET))
  state = resnet.from_torchvision(safetensors.numpy.load_file(tiny_resnet_file))
  missing, unexpected = model.load_state_dict(
      {k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
  assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  folder = classifier.ImageClassifier.load(tmp_path / "hf", dtype="float64")
  images = smooth_images(2, 256, 256, seed=2)
  ref = clf64.logits(images)
  np.testing.assert_allclose(folder.logits(images), ref, rtol=0, atol=1e-10 * np.abs(ref).max())
  with torch.no_grad():
    theirs = model.double().eval()(
        torch.from_numpy(pixels.torchvision_pixels(images)).double()).logits.numpy()
  np.testing.assert_allclose(theirs, ref, rtol=0, atol=1e-10 * np.abs(ref).max())
  assert folder.describe()["layout"] == "transformers"


def test_name_mapping_round_trips():
  names = ["conv1.weight", "bn1.running_var", "layer1.0.conv3.weight",
           "layer2.1.bn2.bias", "layer4.0.downsample.0.weight",
           "layer3.0.downsample.1.running_mean", "fc.bias"]
  for name in names:
    assert resnet.transformers_to_torchvision(resnet.torchvision_to_transformers(name)) == name
  assert (resnet.torchvision_to_transformers("layer2.1.bn2.bias")
          == "resnet.encoder.stages.1.layers.1.layer.1.normalization.bias")
  assert resnet.torchvision_to_transformers("layer1.0.bn1.num_batches_tracked") is None
  with pytest.raises(ValueError, match="unknown tensors"):
    resnet.from_torchvision({"layer1.0.se.fc1.weight": np.zeros(1)})


def test_torchvision_pixels_by_hand():
  # Shorter side already 232: no resize. Width 235 - 224 = 11, and
  # torchvision's int(round(5.5)) = 6 (half to even), not 11 // 2 = 5.
  image = smooth_images(1, 232, 235)[0]
  ours = pixels.torchvision_pixels(image[None])[0]
  crop = image[4:228, 6:230].astype(np.float32) / np.float32(255)
  expected = (crop - np.float32(pixels.IMAGENET_MEAN)) / np.float32(pixels.IMAGENET_STD)
  np.testing.assert_array_equal(ours, expected.transpose(2, 0, 1))
  # 464 x 701: shorter side to 232, longer to int(232 * 701 / 464) = 350.
  assert pixels.resized_size(464, 701, 232) == (232, 350)
  assert pixels.resized_size(701, 464, 232) == (350, 232)
  assert pixels.torchvision_pixels(smooth_images(1, 464, 701))[0].shape == (3, 224, 224)


def test_check_classifier_refuses_other_files(tmp_path, tiny_resnet_file, tiny_clip_dir):
  classifier.check_classifier(tiny_resnet_file)
  with pytest.raises(ValueError, match="does not exist"):
    classifier.check_classifier(tmp_path / "nowhere.safetensors")
  pickled = tmp_path / "resnet50.pth"
  pickled.write_bytes(b"\x80\x02")
  with pytest.raises(ValueError, match="must be a .safetensors file"):
    classifier.check_classifier(pickled)
  with pytest.raises(ValueError, match="no conv1.weight"):
    classifier.check_classifier(tiny_clip_dir / "model.safetensors")
  with pytest.raises(ValueError, match="model_type='clip', expected 'resnet'"):
    classifier.check_classifier(tiny_clip_dir)
  state = safetensors.numpy.load_file(tiny_resnet_file)
  state["fc.weight"], state["fc.bias"] = state["fc.weight"][:10], state["fc.bias"][:10]
  safetensors.numpy.save_file(state, tmp_path / "ten.safetensors")
  with pytest.raises(ValueError, match="over 10 classes"):
    classifier.check_classifier(tmp_path / "ten.safetensors")
  (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="corrupt or truncated"):
    classifier.check_classifier(tmp_path / "broken.safetensors")
