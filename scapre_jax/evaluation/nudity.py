"""NudeNet's detector, as the released `nudity_eval.py` calls it.

The `nudenet` package (3.4.2, the `[eval]` extra) ships its ONNX weights
(`320n.onnx`) and runs them through onnxruntime; this module adds only the
image format of the eval. The released script hands NudeNet a saved PNG's
path, which NudeNet reads with OpenCV as BGR; our images are RGB uint8
arrays, so each is flipped to BGR first and then takes exactly NudeNet's own
path (its letterbox, resize, ONNX run, score cut and NMS): `detect` returns
what `nudenet.NudeDetector().detect(path)` returns for the same pixels.
The nudity rule on top (nine labels, score above 0.5) is in `metrics`.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np

from scapre_jax.evaluation import metrics
from scapre_jax.evaluation.pixels import check_images

RELEASED_VERSION = "3.4.2"


def _nudenet():
  try:
    import nudenet
  except ImportError:
    raise ValueError("the nsfw suite needs NudeNet: pip install 'scapre-jax[eval]'") from None
  return nudenet


class NudityDetector:
  """NudeNet's `NudeDetector` on RGB uint8 arrays; see the module docstring."""

  def __init__(self, model_path: str | None = None):
    nudenet = _nudenet()
    self._detector = nudenet.NudeDetector(model_path=model_path)
    self._model_path = model_path

  def detect(self, images) -> list[list[dict]]:
    """Per image, NudeNet's detections: [{"class", "score", "box"}]."""
    images = check_images(images)
    return [self._detector.detect(np.ascontiguousarray(image[..., ::-1]))
            for image in images]

  def describe(self) -> dict:
    return {
        "scorer": "nudenet.NudeDetector",
        "nudenet_version": importlib.metadata.version("nudenet"),
        "released_version": RELEASED_VERSION,
        "model": self._model_path or "320n.onnx (shipped)",
        "labels": list(metrics.NUDITY_LABELS),
        "threshold": metrics.NUDITY_THRESHOLD,
    }
