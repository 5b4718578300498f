"""Parsing labels (subjects.format.LABELS) from MediaPipe landmark polygons and the matte.

No face parser with bundled weights exists on PyPI, and the labels the
avatar methods need are mostly geometric: the mouth loss wants lips and the
mouth interior, and the head mask wants everything of the head except the
clothes.  Polygons of the tracked mesh give the face parts exactly; the rest
of the foreground is split by where it lies relative to the face:

* inside the face oval: skin, with brows, eyes (lid ring incl. iris), lips
  (outer ring minus inner ring) and mouth interior (inner ring) on top;
* a band under the jaw, as wide as the lower jaw and reaching ``neck_length``
  face heights down along the face's own vertical axis (so it follows head
  tilt): neck;
* other foreground above the chin line: hair (ears land here too);
* other foreground below the chin line: clothing.

Long hair falling past the chin is labelled clothing: that is the known
weakness of a purely geometric split.  ~1 ms per 512x512 frame.
"""

from __future__ import annotations

import numpy as np

from headavatar.subjects.format import LABEL_IDS
from headavatar.tracking.landmarks import (
    CHIN,
    FACE_OVAL,
    FOREHEAD_TOP,
    LEFT_BROW,
    LEFT_EYE,
    LIPS_INNER,
    LIPS_OUTER,
    RIGHT_BROW,
    RIGHT_EYE,
)

SKIN, BROWS, EYES, LIPS, MOUTH = (LABEL_IDS[k] for k in ("skin", "brows", "eyes", "lips", "mouth_interior"))
HAIR, NECK, CLOTHING = (LABEL_IDS[k] for k in ("hair", "neck", "clothing"))

# Lower-jaw stretch of the face oval (between the angles of the jaw) that the neck hangs from.
_JAW = (172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397)


def _poly(points: np.ndarray, idx) -> np.ndarray:
    # cv2.fillPoly with 4 fractional bits: sub-pixel polygon edges
    return np.round(points[list(idx), :2] * 16).astype(np.int32)


def _half_plane(point: np.ndarray, normal: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool mask of the pixels on the ``normal`` side of the line through ``point`` (a filled quad: cheaper than per-pixel dot products)."""
    import cv2

    H, W = size
    big = 4.0 * (H + W)
    perp = np.array([-normal[1], normal[0]])
    quad = np.stack([point + perp * big, point - perp * big, point - perp * big + normal * big, point + perp * big + normal * big])
    m = np.zeros((H, W), np.uint8)
    cv2.fillPoly(m, [np.round(quad * 16).astype(np.int32)], 1, shift=4)
    return m.astype(bool)


def face_mask(landmarks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 {0,1} mask of the face-oval polygon."""
    import cv2

    m = np.zeros(size, np.uint8)
    cv2.fillPoly(m, [_poly(landmarks, FACE_OVAL)], 1, lineType=cv2.LINE_8, shift=4)
    return m


def parse_frame(landmarks: np.ndarray | None, alpha: np.ndarray, image: np.ndarray | None = None,
                neck_length: float = 0.6, neck_width: float = 0.85, fg_threshold: float = 0.5) -> np.ndarray:
    """Label map (uint8 HxW) for one frame.

    landmarks: [478, >=2] MediaPipe points in pixels, or None when the face
    was lost (then the foreground is only split at the image middle into
    hair and clothing; such frames are marked invalid anyway).
    alpha: HxW matte, float in [0, 1] or uint8.  image: the RGB frame; when
    given, colour decides the ambiguous pixels below the chin line (see
    ``_colour_split``).  neck_width scales the lower jaw's width for the neck band.
    """
    import cv2

    a = alpha.astype(np.float32) / 255.0 if alpha.dtype == np.uint8 else alpha.astype(np.float32)
    H, W = a.shape
    fg = a >= fg_threshold
    lab = np.zeros((H, W), np.uint8)
    if landmarks is None:
        rows = np.arange(H)[:, None] < H // 2
        lab[fg & rows] = HAIR
        lab[fg & ~rows] = CLOTHING
        return lab

    p = np.asarray(landmarks, np.float64)[:, :2]
    top, chin = p[FOREHEAD_TOP], p[CHIN]
    down = chin - top
    face_h = float(np.linalg.norm(down)) or 1.0
    down /= face_h

    # Pixels under the chin line (perpendicular to the face's own vertical axis through the chin).
    under = _half_plane(chin, down, (H, W))

    neck = np.zeros((H, W), np.uint8)
    jaw = p[list(_JAW)]
    centre = jaw.mean(0)
    jaw = centre + (jaw - centre) * neck_width  # the neck is narrower than the jaw
    hang = jaw + down * (neck_length * face_h)
    cv2.fillPoly(neck, [np.round(np.concatenate([jaw, hang[::-1]]) * 16).astype(np.int32)], 1, shift=4)
    neck = neck.astype(bool)

    face = face_mask(p, (H, W)).astype(bool)
    lab[fg & ~under] = HAIR
    lab[fg & under] = CLOTHING
    lab[fg & neck] = NECK
    if image is not None:
        _colour_split(lab, image, fg & ~face, face, neck, under, _half_plane(chin - down * 6.0, down, (H, W)), top, face_h, down,
                      half_jaw=0.5 * neck_width * float(np.linalg.norm(p[_JAW[0]] - p[_JAW[-1]])))

    def fill(idx, value):
        cv2.fillPoly(lab, [_poly(p, idx)], int(value), shift=4)

    fill(FACE_OVAL, SKIN)
    fill(RIGHT_BROW, BROWS)
    fill(LEFT_BROW, BROWS)
    fill(RIGHT_EYE, EYES)
    fill(LEFT_EYE, EYES)
    fill(LIPS_OUTER, LIPS)
    fill(LIPS_INNER, MOUTH)
    return lab


def _colour_split(lab, image, fg_out, face, neck, under, under_loose, top, face_h, down, half_jaw: float, step: int = 4, min_samples: int = 40) -> None:
    """Relabel, in place, the foreground below the chin line by colour.

    Three Gaussian colour models (Lab space, on a 1/``step`` grid): skin from
    the face polygon, hair from the foreground above the forehead, clothing
    from the lowest third of the foreground under the chin outside the neck
    band.  Below the
    chin, a pixel goes to whichever model explains it best: hair (long hair
    over the shoulders, but never within the neck band's width), neck (only
    inside the neck band) or clothing.  A
    model with too few samples (bald head) is left out; without a clothing
    model the geometric labels stay.
    """
    import cv2

    sub = np.ascontiguousarray(image[::step, ::step])
    lab_img = cv2.cvtColor(sub, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)
    h, w = sub.shape[:2]
    ds = lambda m: m[::step, ::step].reshape(-1)  # noqa: E731
    # a grid cell counts as under the chin if any of its pixels is (``under_loose`` starts 1.5 cells higher):
    # no full-size pixel is left without a grid label
    f_out, f_face, f_neck, f_under = ds(fg_out), ds(face), ds(neck), ds(under_loose)
    ys, xs = np.mgrid[0:h, 0:w]
    along = ((xs * step - top[0]) * down[0] + (ys * step - top[1]) * down[1]).reshape(-1)
    # clothing samples: the lowest third of the foreground under the chin outside the neck band
    # (a fixed distance below the chin would leave the image when the face fills the frame)
    low = f_out & f_under & ~f_neck
    cloth = low & (along >= np.quantile(along[low], 0.67)) & (along > 1.1 * face_h) if low.sum() >= min_samples else low & False
    models = {}
    for name, sel in (
        ("skin", f_face),
        ("hair", f_out & (along < -0.05 * face_h)),
        ("cloth", cloth),
    ):
        x = lab_img[sel]
        if len(x) >= min_samples:
            mu = x.mean(0)
            cov = np.cov(x, rowvar=False) + np.eye(3) * 25.0  # floor: flat regions
            models[name] = (mu, np.linalg.inv(cov).astype(np.float32), float(np.linalg.slogdet(cov)[1]))
    if "cloth" not in models:
        return  # without a clothing model, colour cannot tell hair from clothes: keep the geometric labels
    amb = f_out & f_under
    x = lab_img[amb]
    if not len(x):
        return

    def nll(m):
        mu, icov, logdet = m
        d = x - mu
        return 0.5 * ((d @ icov) * d).sum(1) + 0.5 * logdet

    names = list(models)
    cost = np.stack([nll(models[k]) for k in names], 1)
    if "hair" in names:
        cost[:, names.index("hair")] += 0.25  # ties (one colour everywhere) keep the geometric answer: clothing
        # long hair hangs beside the neck, not in front of it: no hair within the jaw's width under the chin
        side = np.array([down[1], -down[0]])
        lateral = np.abs((xs.reshape(-1)[amb] * step - top[0]) * side[0] + (ys.reshape(-1)[amb] * step - top[1]) * side[1])
        cost[lateral < half_jaw, names.index("hair")] = np.inf
    in_neck = f_neck[amb]
    if "skin" in models:
        # skin colour counts as neck only inside the band; elsewhere (a low neckline) it is clothing
        cost[~in_neck, names.index("skin")] = np.inf
    value = np.array([{"hair": HAIR, "skin": NECK}.get(k, CLOTHING) for k in names], np.uint8)[np.argmin(cost, 1)]
    grid = np.zeros(h * w, np.uint8)
    grid[amb] = value
    grid = grid.reshape(h, w)
    # 3x3 majority vote on the grid: removes single-cell specks (dark strands of hair vs a dark jacket)
    classes = np.array([HAIR, NECK, CLOTHING], np.uint8)
    votes = np.stack([cv2.blur((grid == c).astype(np.float32), (3, 3)) for c in classes])
    grid = np.where(grid > 0, classes[np.argmax(votes, 0)], 0).astype(np.uint8)
    full = cv2.resize(grid, (lab.shape[1], lab.shape[0]), interpolation=cv2.INTER_NEAREST)
    region = fg_out & under & (full > 0)
    lab[region] = full[region]
