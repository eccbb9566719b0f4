"""evaluation.nudity: our call returns what `nudenet.NudeDetector().detect`
returns for the same pixels, read the released way (a PNG path, which
NudeNet opens as BGR)."""

import numpy as np
import pytest
from PIL import Image

from scapre_jax.evaluation import nudity


def _box_blur(img, r=4, times=3):
  for _ in range(times):
    for axis in (0, 1):
      pad = [(r + 1, r) if a == axis else (0, 0) for a in range(3)]
      c = np.cumsum(np.pad(img, pad, mode="edge"), axis=axis)
      n = c.shape[axis]
      img = (np.take(c, np.arange(2 * r + 1, n), axis=axis)
             - np.take(c, np.arange(0, n - 2 * r - 1), axis=axis)) / (2 * r + 1)
  return img


def synthetic(seed, h=256, w=256):
  """Skin-toned blobs on a smooth background, numpy only (no OpenCV
  drawing, so the pixels do not depend on its version). Seeds 68 and 73
  give NudeNet detections (scores near 0.27, a BUTTOCKS_EXPOSED and a
  FEMALE_GENITALIA_EXPOSED box), so the comparison is not of empty lists."""
  r = np.random.default_rng(seed)
  skin = np.array([224, 172, 140]) / 255
  img = 0.6 * skin + 0.4 * np.kron(r.random((4, 4, 3)), np.ones((h // 4, w // 4, 1)))
  y, x = np.mgrid[0:h, 0:w]
  for _ in range(r.integers(1, 5)):
    cy, cx = r.integers(40, min(h, w) - 40, 2)
    ay, ax = r.integers(10, 60, 2)
    inside = ((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2 <= 1
    img = np.where(inside[..., None], skin * r.uniform(0.5, 1.1), img)
  return np.round(np.clip(_box_blur(img), 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def detector():
  return nudity.NudityDetector()


def test_detect_equals_nudenet_on_saved_images(tmp_path, detector):
  import nudenet
  images = np.stack([synthetic(68), synthetic(73), synthetic(1)])
  ours = detector.detect(images)
  theirs = []
  for i, image in enumerate(images):
    path = tmp_path / f"{i}.png"
    Image.fromarray(image).save(path)
    theirs.append(nudenet.NudeDetector().detect(str(path)))
  assert ours == theirs
  assert sum(len(d) for d in theirs) >= 1
  # A non-square image (NudeNet letterboxes it): boxes scale back the same.
  wide = synthetic(68, h=192, w=320)
  Image.fromarray(wide).save(tmp_path / "wide.png")
  assert detector.detect(wide[None]) == [nudenet.NudeDetector().detect(str(tmp_path / "wide.png"))]


def test_channel_order_matters(detector):
  # Guards the RGB -> BGR step: the flipped image scores differently.
  image = synthetic(68)
  assert detector.detect(image[None]) != detector.detect(image[None, ..., ::-1])


def test_bad_images_refused(detector):
  with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
    detector.detect(np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
    detector.detect(np.zeros((8, 8, 3), np.uint8))


def test_describe(detector):
  info = detector.describe()
  assert info["threshold"] == 0.5 and len(info["labels"]) == 9
  assert info["nudenet_version"] == nudity.RELEASED_VERSION
