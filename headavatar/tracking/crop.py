"""One square crop around the head for a whole clip.

A per-frame crop would move the camera with the head and hide head motion
inside the crop; avatars want a fixed camera.  So the crop is chosen once,
from the face boxes of a first pass over the clip: every frame's head box
(the face box scaled up and shifted towards the hair) must fit, false
detections far from the others are ignored, and the square is kept inside the
frame when it can be and padded when it cannot.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CropBox:
    """A square in source-image pixels: columns [x0, x0+side), rows [y0, y0+side)."""

    x0: int
    y0: int
    side: int

    def to_dict(self) -> dict:
        return {"x0": int(self.x0), "y0": int(self.y0), "side": int(self.side)}

    def scale(self, size: int) -> float:
        """Crop pixels per source pixel once resized to ``size``."""
        return size / self.side

    def source_to_crop(self, pts: np.ndarray, size: int) -> np.ndarray:
        """Continuous pixel coordinates (pixel i covers [i, i+1)) source -> resized crop."""
        pts = np.asarray(pts, np.float64)
        return (pts - np.array([self.x0, self.y0])) * self.scale(size)

    def crop_to_source(self, pts: np.ndarray, size: int) -> np.ndarray:
        pts = np.asarray(pts, np.float64)
        return pts / self.scale(size) + np.array([self.x0, self.y0])

    def apply(self, image: np.ndarray, size: int) -> np.ndarray:
        """Cut the square out of ``image`` (black where it leaves the frame) and resize to size x size."""
        import cv2

        H, W = image.shape[:2]
        x0, y0, s = self.x0, self.y0, self.side
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + s, W), min(y0 + s, H)
        if xa >= xb or ya >= yb:
            return np.zeros((size, size) + image.shape[2:], image.dtype)
        patch = image[ya:yb, xa:xb]
        if (xa, ya, xb, yb) != (x0, y0, x0 + s, y0 + s):
            patch = cv2.copyMakeBorder(patch, ya - y0, y0 + s - yb, xa - x0, x0 + s - xb, cv2.BORDER_CONSTANT, value=0)
        if s == size:
            return np.ascontiguousarray(patch)
        # area averaging when shrinking avoids aliasing; bicubic when enlarging a small face
        interp = cv2.INTER_AREA if s > size else cv2.INTER_CUBIC
        return cv2.resize(patch, (size, size), interpolation=interp)


def choose_crop(
    boxes: np.ndarray,
    frame_size: tuple[int, int],
    scale: float = 2.0,
    shift_up: float = 0.15,
    outlier_dist: float = 1.5,
    max_growth: float = 1.6,
    min_scale: float = 1.4,
) -> CropBox:
    """Square crop covering every frame's head, from face boxes [N,4] (x0, y0, x1, y1) in pixels.

    Rows of NaN are frames without a detection.  ``scale`` is the head box
    side in face-box sides; ``shift_up`` moves the head box up (in face-box
    sides) because the hair lies above the face box and the neck below is
    short.  Detections whose centre is more than ``outlier_dist`` face sizes
    from the clip's median centre are treated as false and ignored.  When the
    head moves so much that the crop would exceed ``max_growth`` times a
    single head box, a warning says the face will be small in the crop.
    A crop larger than the frame would need black padding; it is shrunk to
    the frame's short side instead as long as every head box still covers
    ``min_scale`` face sides (face-filling clips need no padding).  Raises ValueError when no box is finite.
    """
    H, W = int(frame_size[0]), int(frame_size[1])
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    ok = np.isfinite(b).all(1) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    if not ok.any():
        raise ValueError("no face box to choose a crop from")
    b = b[ok]
    centre = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1)
    side = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    s_med = float(np.median(side))
    c_med = np.median(centre, 0)
    keep = np.linalg.norm(centre - c_med, axis=1) <= outlier_dist * s_med
    if keep.sum() == 0:  # cannot happen with a median, but keep the function total
        keep[:] = True
    centre, side = centre[keep], side[keep]
    half = 0.5 * scale * s_med
    cy = centre[:, 1] - shift_up * s_med
    lo = np.array([np.min(centre[:, 0]) - half, np.min(cy) - half])
    hi = np.array([np.max(centre[:, 0]) + half, np.max(cy) + half])
    s = float(np.max(hi - lo))
    if s > max_growth * 2 * half:
        warnings.warn(
            f"the head moves a lot in this clip: the crop is {s / (2 * half):.1f}x a head's size, so the face will be small; "
            "trim the clip (--start/--duration) to a steadier part for more detail",
            stacklevel=2,
        )
    short = min(H, W)
    if s > short:
        s_min = s - (scale - min_scale) * s_med
        s = max(float(short), s_min)
    mid = (lo + hi) / 2
    side_px = int(np.ceil(s))
    x0 = int(np.floor(mid[0] - side_px / 2))
    y0 = int(np.floor(mid[1] - side_px / 2))
    x0 = _clamp_into(x0, side_px, W)
    y0 = _clamp_into(y0, side_px, H)
    return CropBox(x0, y0, side_px)


def _clamp_into(a: int, side: int, length: int) -> int:
    """Shift a 1-D interval [a, a+side) inside [0, length) when it fits; centre it (padding both ends) when not."""
    if side >= length:
        return -((side - length) // 2)
    return int(min(max(a, 0), length - side))
