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

Below the chin (and beside the lower jaw) colour models of skin, hair and
clothing refine that split (``_colour_split``: collars and ties are
clothing, long hair over the shoulders hair); ``FrameParser`` carries them
over a clip against flicker.  3-4 ms of CPU per 512x512 frame.
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
                neck_length: float = 0.6, neck_width: float = 0.85, skin_width: float = 1.15, fg_threshold: float = 0.5,
                state: "ParsingState | None" = None) -> np.ndarray:
    """Label map (uint8 HxW) for one frame.

    landmarks: [478, >=2] MediaPipe points in pixels, or None when the face
    was lost (then the foreground is only split at the image middle into
    hair and clothing; such frames are marked invalid anyway).
    alpha: HxW matte, float in [0, 1] or uint8.  image: the RGB frame; when
    given, colour decides the ambiguous pixels below the chin line (see
    ``_colour_split``).  neck_width scales the lower jaw's width for the neck band; skin_width
    for the wider zone where skin-coloured pixels below the chin still count as neck (the sides
    of the neck, which the band leaves out when the face is frontal).
    state: a ``ParsingState`` carried from frame to frame of one clip (``FrameParser``): colour
    models averaged over time and the labels below the chin smoothed, against flicker.
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

    jaw0 = p[list(_JAW)]
    centre = jaw0.mean(0)

    def band(width: float) -> np.ndarray:
        jaw = centre + (jaw0 - centre) * width  # the neck is narrower than the jaw
        hang = jaw + down * (neck_length * face_h)
        m = np.zeros((H, W), np.uint8)
        cv2.fillPoly(m, [np.round(np.concatenate([jaw, hang[::-1]]) * 16).astype(np.int32)], 1, shift=4)
        return m.astype(bool)

    neck = band(neck_width)

    face = face_mask(p, (H, W)).astype(bool)
    lab[fg & ~under] = HAIR
    lab[fg & under] = CLOTHING
    lab[fg & neck] = NECK
    if image is not None:
        # beside the lower jaw, above the chin line: a high collar is there as often as hair
        beside = ~under & _half_plane(chin - down * (0.3 * face_h), down, (H, W))
        _colour_split(lab, image, fg & ~face, face, neck, under, _half_plane(chin - down * 6.0, down, (H, W)), top, face_h, down,
                      half_jaw=0.5 * neck_width * float(np.linalg.norm(p[_JAW[0]] - p[_JAW[-1]])), chin=chin, state=state, beside=beside,
                      skin_zone=band(skin_width) | neck)

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


class ParsingState:
    """What ``parse_frame`` carries between consecutive frames of a clip."""

    def __init__(self, model_momentum: float = 0.9, label_momentum: float = 0.6):
        self.model_momentum = model_momentum  # weight of the past in the colour models (mean and covariance)
        self.label_momentum = label_momentum  # weight of the past in the soft labels below the chin
        self.models: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (mean, covariance), Lab
        self.soft: np.ndarray | None = None  # [h,w,3] hair / neck / clothing votes on the grid
        self.chin: np.ndarray | None = None  # where the chin was (pixels) when ``soft`` was made


class FrameParser:
    """``parse_frame`` over the frames of one clip, in order, with a ``ParsingState``."""

    def __init__(self, **state_opts):
        self.state = ParsingState(**state_opts)

    def __call__(self, landmarks, alpha, image=None, **opts) -> np.ndarray:
        if landmarks is None:
            self.state.soft = None  # a lost face: start the label memory again
        return parse_frame(landmarks, alpha, image, state=self.state, **opts)


def _colour_split(lab, image, fg_out, face, neck, under, under_loose, top, face_h, down, half_jaw: float, step: int = 4, min_samples: int = 40,
                  chin=None, state: ParsingState | None = None, skin_d2: float = 30.0, beside=None, collar_margin: float = 2.0,
                  skin_zone: np.ndarray | None = None) -> None:
    """Relabel, in place, the foreground below the chin line by colour.

    Three Gaussian colour models (Lab space, on a 1/``step`` grid): skin from
    the face polygon, hair from the foreground above the forehead and beside the
    upper face (the lengths of long hair), clothing
    from the lowest third of the foreground under the chin outside the neck
    band; with a ``state`` they are running averages over the clip, so one
    frame's odd samples do not flip its labels.  Below the chin:

    * neck: inside the neck band (or the wider ``skin_zone``), where the skin
      model explains the pixel best *and* well (squared Mahalanobis distance <
      ``skin_d2``): a white collar or a tie inside the band is clothing, not neck;
    * hair: where the hair model beats clothing, never within the neck band's
      width (hair hangs beside the neck, not in front of it), and only in
      regions connected to the hair above the chin line (a collar beside the
      neck that happens to match the hair's colour is not connected to it);
    * clothing: the rest, except clothing inside the neck band that does not connect to clothing
      outside it (a shadow under the chin), which is neck.

    ``beside`` (the foreground beside the lower jaw, above the chin line) turns
    to clothing where the clothing model beats both hair and skin (a high
    collar); the rest of it stays hair (and ears) and, with the hair above
    it, roots the hair below the chin.

    With a ``state`` the labels are then averaged with the previous frame's
    (moved with the chin), and a 3x3 majority vote removes specks.  The
    neck/clothing border is then decided pixel by pixel
    (``_refine_neck_edge``): on the grid it is ``step`` pixels coarse, and a
    white collar's edge inside a neck cell is a bright error the avatar pays for.  A model
    with too few samples (bald head) is left out; without a clothing model
    the geometric labels stay.
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
    stats = {}
    # hair samples: above the forehead, and beside the face well away from the jaw down to 0.7 face
    # heights (the lengths of long hair, often lighter than the roots; ears of short hair stay few)
    side = np.array([down[1], -down[0]])
    lateral = np.abs((xs * step - top[0]) * side[0] + (ys * step - top[1]) * side[1]).reshape(-1)  # distance from the face's axis
    hair_samples = f_out & ((along < -0.05 * face_h) | ((along < 0.7 * face_h) & (lateral > 1.6 * half_jaw)))
    for name, sel in (("skin", f_face), ("hair", hair_samples), ("cloth", cloth)):
        x = lab_img[sel]
        if name == "cloth" and "hair" in stats and len(x) >= min_samples:
            # long hair over the shoulders falls into the clothing samples: drop the samples the
            # hair model explains better than a first clothing model, then fit it again
            x = x[_maha(x, *stats["hair"]) > _maha(x, x.mean(0), np.cov(x, rowvar=False))]
        if len(x) >= min_samples:
            mu, cov = x.mean(0).astype(np.float64), np.cov(x, rowvar=False)
            if state is not None and name in state.models:
                m = state.model_momentum
                mu0, cov0 = state.models[name]
                mu, cov = m * mu0 + (1 - m) * mu, m * cov0 + (1 - m) * cov
            stats[name] = (mu, cov)
        # a model without samples in this frame is not used (nor forgotten): no clothes in view here
    if state is not None:
        state.models.update(stats)
    models = {}
    for name, (mu, cov) in stats.items():
        cov = cov + np.eye(3) * 25.0  # floor: flat regions
        models[name] = (mu.astype(np.float32), np.linalg.inv(cov).astype(np.float32), float(np.linalg.slogdet(cov)[1]))
    if "cloth" not in models:
        return  # without a clothing model, colour cannot tell hair from clothes: keep the geometric labels
    # grid cells that straddle the chin line belong to both sides; each side writes only its own pixels
    f_beside = ds(beside) & f_out if beside is not None else np.zeros_like(f_out)
    if f_beside.any() and "hair" in models:
        xb = lab_img[f_beside]
        cb = {k: _nll(xb, m)[0] for k, m in models.items()}
        # only a clear win: hair and clothes of similar colours (dark hair on a dark top) keep the hair
        collar = cb["cloth"] + collar_margin < np.minimum(cb["hair"], cb.get("skin", np.inf))
        bgrid = np.zeros(h * w, np.uint8)
        bgrid[f_beside] = np.where(collar, CLOTHING, HAIR)
        full_b = cv2.resize(bgrid.reshape(h, w), (lab.shape[1], lab.shape[0]), interpolation=cv2.INTER_NEAREST)
        reg = fg_out & beside & (full_b > 0)
        lab[reg] = full_b[reg]
    amb = f_out & f_under
    x = lab_img[amb]
    if not len(x):
        return

    names = list(models)
    nll = {k: _nll(x, models[k]) for k in names}
    d2 = {k: v[1] for k, v in nll.items()}
    cost = np.stack([nll[k][0] for k in names], 1)
    if "hair" in names:
        cost[:, names.index("hair")] += 0.25  # ties (one colour everywhere) keep the geometric answer: clothing
        # long hair hangs beside the neck, not in front of it: no hair within the jaw's width under the chin
        cost[lateral[amb] < half_jaw, names.index("hair")] = np.inf
    skin_zone = neck if skin_zone is None else skin_zone
    in_neck = ds(skin_zone)[amb]
    if "skin" in models:
        # skin colour counts as neck only inside the skin zone, and only if it is really skin-like;
        # elsewhere (a low neckline) it is clothing
        cost[~in_neck | (d2["skin"] > skin_d2), names.index("skin")] = np.inf
    value = np.array([{"hair": HAIR, "skin": NECK}.get(k, CLOTHING) for k in names], np.uint8)[np.argmin(cost, 1)]
    grid = np.zeros(h * w, np.uint8)
    grid[amb] = value
    grid = grid.reshape(h, w)
    if "hair" in names:
        grid = _connected_hair(grid, lab, step, amb.reshape(h, w))  # beside-band hair (relabelled above) roots it too
    grid = _rooted_clothing(grid, lab, step, amb.reshape(h, w), f_neck.reshape(h, w))
    classes = np.array([HAIR, NECK, CLOTHING], np.uint8)
    votes = np.stack([(grid == c).astype(np.float32) for c in classes], -1)
    if state is not None and chin is not None:
        if state.soft is not None and state.soft.shape == votes.shape:
            shift = (np.asarray(chin) - state.chin) / step  # the labels below the chin move with it
            M = np.float32([[1, 0, shift[0]], [0, 1, shift[1]]])
            prev = cv2.warpAffine(state.soft, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            votes = state.label_momentum * prev + (1 - state.label_momentum) * votes
        state.soft, state.chin = votes.copy(), np.asarray(chin, np.float64).copy()
    # 3x3 majority vote on the grid: removes single-cell specks (dark strands of hair vs a dark jacket)
    votes = np.stack([cv2.blur(np.ascontiguousarray(votes[..., k]), (3, 3)) for k in range(3)])
    grid = np.where(grid > 0, classes[np.argmax(votes, 0)], 0).astype(np.uint8)
    full = cv2.resize(grid, (lab.shape[1], lab.shape[0]), interpolation=cv2.INTER_NEAREST)
    if "skin" in models:
        _refine_neck_edge(full, grid, image, skin_zone, models, skin_d2)
    region = fg_out & under & (full > 0)
    lab[region] = full[region]


def _nll(x: np.ndarray, model: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Negative log-likelihood (up to a constant) of Lab colours [N,3] under a fitted (mean, inverse
    covariance, log-determinant) model, and their squared Mahalanobis distance."""
    mu, icov, logdet = model
    d = x - mu
    d2 = ((d @ icov) * d).sum(1)
    return 0.5 * d2 + 0.5 * logdet, d2


def _maha(x: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    d = x - mu
    return ((d @ np.linalg.inv(cov + np.eye(3) * 25.0)) * d).sum(1)


def _connected_hair(grid: np.ndarray, lab: np.ndarray, step: int, amb: np.ndarray) -> np.ndarray:
    """Hair cells below the chin keep their label only where they connect to the hair above it."""
    import cv2

    above = (lab[::step, ::step][: grid.shape[0], : grid.shape[1]] == HAIR) & ~amb
    hair = (grid == HAIR) | above
    n, comp = cv2.connectedComponents(hair.astype(np.uint8), connectivity=8)
    if n <= 1:
        return grid
    rooted = np.zeros(n, bool)
    rooted[np.unique(comp[above])] = True
    rooted[0] = False
    orphan = (grid == HAIR) & ~rooted[comp]
    return np.where(orphan, CLOTHING, grid).astype(np.uint8)


def _rooted_clothing(grid: np.ndarray, lab: np.ndarray, step: int, amb: np.ndarray, band: np.ndarray) -> np.ndarray:
    """Clothing cells inside the neck band keep their label only where they connect to clothing outside it.

    A collar or a tie runs on into the shirt below or beside the neck; a dark patch the neck encloses
    (the shadow under the chin, which the skin model does not explain) is neck, not a hole in the head."""
    import cv2

    outside = (lab[::step, ::step][: grid.shape[0], : grid.shape[1]] == CLOTHING) & ~amb  # high collars beside the jaw
    cloth = (grid == CLOTHING) | outside
    n, comp = cv2.connectedComponents(cloth.astype(np.uint8), connectivity=8)
    if n <= 1:
        return grid
    rooted = np.zeros(n, bool)
    rooted[np.unique(comp[cloth & ~band])] = True
    rooted[0] = False
    enclosed = (grid == CLOTHING) & band & ~rooted[comp]
    return np.where(enclosed, NECK, grid).astype(np.uint8)


def _refine_neck_edge(full: np.ndarray, grid: np.ndarray, image: np.ndarray, zone: np.ndarray, models: dict, skin_d2: float) -> None:
    """Relabel, in place, the full-size pixels of grid cells on the neck/clothing border by colour.

    Only cells that have both labels in their 3x3 neighbourhood are touched, and only between those two
    labels, with the same rule as on the grid (neck: inside the skin zone, skin-like, and explained by skin
    better than by clothing), so the temporal smoothing of the grid still decides everywhere else."""
    import cv2

    k = np.ones((3, 3), np.uint8)
    near_neck = cv2.dilate((grid == NECK).astype(np.uint8), k)
    near_cloth = cv2.dilate((grid == CLOTHING).astype(np.uint8), k)
    edge = (near_neck & near_cloth).astype(bool) & ((grid == NECK) | (grid == CLOTHING))
    if not edge.any():
        return
    edge_full = cv2.resize(edge.astype(np.uint8), (full.shape[1], full.shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
    ys, xs = np.nonzero(edge_full & ((full == NECK) | (full == CLOTHING)))
    if not len(ys):
        return
    px = cv2.cvtColor(np.ascontiguousarray(image[ys, xs][None]), cv2.COLOR_RGB2LAB)[0].astype(np.float32)

    c_skin, d2_skin = _nll(px, models["skin"])
    c_cloth, _ = _nll(px, models["cloth"])
    is_neck = zone[ys, xs] & (d2_skin <= skin_d2) & (c_skin < c_cloth)
    full[ys, xs] = np.where(is_neck, NECK, CLOTHING)
