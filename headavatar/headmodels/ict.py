"""The ICT-FaceKit Light head model (MIT) behind the common HeadModel interface.

Source data: one npz (``ict_facekit_light.npz``; layout in
``ict_import.py`` and docs/HEAD_MODELS.md) holding the neutral mesh, 100
identity PCA modes and 53 ARKit-named expression shapes of ICT-FaceKit's
FaceXModel folder.  ``build_ict_head`` turns it into a ``HeadModel``:

* a subset of the 17 parts (``parts="avatar"``: face, head and neck, mouth
  socket, teeth and the front of both eyeballs), re-indexed, quads split
  along their a-c diagonal;
* centimetres -> metres; identity deltas (float16 on disk) -> float32;
* the 53 expressions as ``expr_basis`` (weights in [0, 1],
  ``meta["expression_range"]``) and the condition vector; no condition joints;
* one joint, ``root``: a rigid head pose about a pivot between the ears;
* a repacked UV atlas in [0, 1]^2 (ICT's own UVs are UDIM tiles in which the
  eyeballs overlap the face, which would lose Gaussians in FlashAvatar);
* named regions, per-face parsing labels and the 68 Multi-PIE landmarks.

Nothing is cached: each call reads the npz again (about half a second).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from headavatar.constants import LABEL_IDS
from headavatar.errors import UserError
from headavatar.headmodels import register_head_model
from headavatar.headmodels.base import HeadModel
from headavatar.headmodels.obj import triangulate

ENV_VAR = "HEADAVATAR_ICT_NPZ"
NPZ_NAME = "ict_facekit_light.npz"
NUM_VERTICES = 26719
NUM_POLYGONS = 26384
NPZ_KEYS = ("vertices", "uvs", "faces", "face_uvs", "expression_names", "expression_deltas", "identity_deltas")
CM_TO_M = 0.01

# Parts of the ICT topology: (first vertex, last vertex, first polygon, last polygon),
# inclusive, from the ICT-FaceKit README.  The README's "sclera" range is the outer
# eyeball shell and "iris" an inner shell under it; only the outer one is offered.
PARTS: dict[str, tuple[int, int, int, int]] = {
    "face": (0, 9408, 0, 9229),
    "head_neck": (9409, 11247, 9230, 11143),
    "mouth_socket": (11248, 13293, 11144, 13225),
    "eye_socket_left": (13294, 13677, 13226, 13629),
    "eye_socket_right": (13678, 14061, 13630, 14033),
    "gums_tongue": (14062, 17038, 14034, 17005),
    "teeth": (17039, 21450, 17006, 21495),
    "eyeball_left": (21451, 22220, 21496, 22295),
    "eyeball_right": (23021, 23790, 23094, 23893),
}
# Dropped for good: lacrimal fluid, eye blend and eye occlusion meshes are
# shading helpers of a game-engine eye (transparent, coincident with the lids)
# and eyelash strips are thin alpha cards; Gaussians on them would float.
PRESETS = {
    "avatar": ("face", "head_neck", "mouth_socket", "teeth", "eyeball_left", "eyeball_right"),
    "all": tuple(PARTS),
}
NARROW_FACE_LAST_VERTEX = 6705  # "narrow face area" of the README: the face without ears and throat
EYEBALLS = ("eyeball_left", "eyeball_right")
# Keep the part of an eyeball whose direction from its centre is within ~75 deg of +z:
# the rest sits inside the head behind the lids (ICT Light has no eye rotation).
EYEBALL_CAP_COS = 0.25

# Multi-PIE 68 landmark vertices (0-based), from the ICT-FaceKit README.
LANDMARK_VERTICES = (
    1225, 1888, 1052, 367, 1719, 1722, 2199, 1447, 966, 3661, 4390, 3927, 3924, 2608, 3272, 4088, 3443,
    268, 493, 1914, 2044, 1401, 3615, 4240, 4114, 2734, 2509, 978, 4527, 4942, 4857, 1140, 2075, 1147,
    4269, 3360, 1507, 1542, 1537, 1528, 1518, 1511, 3742, 3751, 3756, 3721, 3725, 3732, 5708, 5695, 2081,
    0, 4275, 6200, 6213, 6346, 6461, 5518, 5957, 5841, 5702, 5711, 5533, 6216, 6207, 6470, 5517, 5966,
)

# Atlas share per chart, relative to its 3D area: the face gets full density, the
# scalp/neck less (smoother appearance), mostly hidden insides least.
CHART_DENSITY = {
    "face": 1.0, "head_neck": 0.6, "mouth_socket": 0.3, "eye_socket_left": 0.2, "eye_socket_right": 0.2,
    "gums_tongue": 0.25, "teeth": 0.35, "eyeball_left": 1.0, "eyeball_right": 1.0,
}
ATLAS_GAP = 1.0 / 256  # empty margin between charts (one texel at 256^2)

# Parsing labels (subjects.format.LABELS)
SKIN, BROWS, EYES, LIPS, MOUTH, HAIR, NECK = (LABEL_IDS[k] for k in ("skin", "brows", "eyes", "lips", "mouth_interior", "hair", "neck"))


# --------------------------------------------------------------------------- files
def packaged_npz() -> Path:
    """The copy shipped inside the package (headavatar/assets/ict-facekit/, MIT, with its LICENSE)."""
    return Path(__file__).resolve().parents[1] / "assets" / "ict-facekit" / NPZ_NAME


def default_npz_candidates() -> list[Path]:
    """Where the model is looked for when neither a path nor $HEADAVATAR_ICT_NPZ is given."""
    return [packaged_npz()]


# One form of the advice, in every error about a missing model file (docs/HEAD_MODELS.md says the same).
MISSING_HINT = ("make one from an ICT-FaceKit checkout with 'headavatar head-model import-ict ICT-FaceKit -o ict_facekit_light.npz', "
                "or track with '--head-model procedural'")


def find_ict_npz(path: str | os.PathLike | None = None) -> Path:
    """The npz to use: ``path`` (--ict-path), else $HEADAVATAR_ICT_NPZ, else the copy in the package."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"ICT-FaceKit model file {p} does not exist; {MISSING_HINT}")
        return p
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise UserError(f"${ENV_VAR} points to {p}, which does not exist; {MISSING_HINT}")
        return p
    p = packaged_npz()
    if p.is_file():
        return p
    raise UserError(f"no ICT-FaceKit model file found (the package's copy {p} is missing: reinstall headavatar); {MISSING_HINT}")


def load_ict_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read and check an ICT npz (any topology); arrays as stored."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # zip / npy errors come in many types
        raise UserError(f"{path} is not a readable npz ({type(e).__name__}: {e}); {MISSING_HINT}") from None
    missing = [k for k in NPZ_KEYS if k not in data]
    if missing:
        raise UserError(f"{path} lacks {missing}: it is not an ICT-FaceKit npz; {MISSING_HINT}")
    V = data["vertices"].shape[0]
    E = len(data["expression_names"])
    if (
        data["vertices"].shape != (V, 3)
        or data["faces"].ndim != 2
        or data["face_uvs"].shape != data["faces"].shape
        or data["expression_deltas"].shape != (E, V, 3)
        or data["identity_deltas"].ndim != 3
        or data["identity_deltas"].shape[1:] != (V, 3)
    ):
        raise UserError(f"{path}: ICT arrays have inconsistent shapes; {MISSING_HINT}")
    return data


# --------------------------------------------------------------------------- geometry helpers
def _tri_areas(p: np.ndarray) -> np.ndarray:
    """[T,3,D] (D = 2 or 3) -> [T] unsigned areas."""
    a, b = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    if p.shape[-1] == 2:
        return 0.5 * np.abs(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0])
    return 0.5 * np.linalg.norm(np.cross(a, b), axis=-1)


def rasterize_uv(uvs: np.ndarray, uv_faces: np.ndarray, res: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Texel centres covered by UV triangles: (column, row-from-bottom, triangle), one row per hit.

    Texel (i, j) of a res x res map has its centre at ((i+.5)/res, (j+.5)/res).
    A centre on a shared edge counts for both triangles, as a rasteriser's
    tie rule would pick one; overlaps are found with ``uv_coverage``.
    """
    p = np.asarray(uvs, np.float64)[np.asarray(uv_faces)] * res - 0.5  # texel-centre grid units
    lo = np.clip(np.ceil(p.min(1)).astype(np.int64), 0, res)
    hi = np.clip(np.floor(p.max(1)).astype(np.int64), -1, res - 1)
    nx = np.maximum(hi[:, 0] - lo[:, 0] + 1, 0)
    ny = np.maximum(hi[:, 1] - lo[:, 1] + 1, 0)
    n = nx * ny
    t = np.repeat(np.arange(len(p)), n)
    k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    ix = lo[t, 0] + k % nx[t]
    iy = lo[t, 1] + k // nx[t]
    a, b, c = p[t, 0], p[t, 1], p[t, 2]

    def edge(o, u, qx, qy):
        return (u[:, 0] - o[:, 0]) * (qy - o[:, 1]) - (u[:, 1] - o[:, 1]) * (qx - o[:, 0])

    area = edge(a, b, c[:, 0], c[:, 1])
    s = np.sign(area)
    w0, w1, w2 = edge(b, c, ix, iy) * s, edge(c, a, ix, iy) * s, edge(a, b, ix, iy) * s
    inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0) & (s != 0)
    return ix[inside], iy[inside], t[inside]


def uv_coverage(uvs: np.ndarray, uv_faces: np.ndarray, res: int) -> dict[str, int]:
    """How many texels of a res^2 UV map the triangles cover, and how many of them twice.

    FlashAvatar puts one Gaussian on each covered texel; where two charts overlap
    only one triangle wins the texel, so ``overlapping`` counts texels whose centre
    lies strictly inside two triangles (shared edges do not count).  Texels
    outside [0,1]^2 are ``outside``.
    """
    uvs = np.asarray(uvs, np.float64)
    uv_faces = np.asarray(uv_faces)
    ix, iy, t = rasterize_uv(uvs, uv_faces, res)
    key = iy * res + ix
    covered = np.unique(key)
    # Overlap test on strict interiors: shrink every triangle slightly towards its centroid.
    q = uvs[uv_faces]
    cen = q.mean(1, keepdims=True)
    shrunk = cen + (q - cen) * (1 - 1e-6)
    ix2, iy2, t2 = rasterize_uv(shrunk.reshape(-1, 2), np.arange(len(q) * 3).reshape(-1, 3), res)
    _, counts = np.unique(iy2 * res + ix2, return_counts=True)
    flat = uvs[uv_faces].reshape(-1, 2)
    outside = int(((flat < 0) | (flat > 1)).any(1).reshape(-1, 3).any(1).sum())
    return {"covered": int(len(covered)), "overlapping": int((counts > 1).sum()), "faces_outside_unit_square": outside}


def _components(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected-component label per node (0..n-1) of an undirected graph, by min-label propagation."""
    lab = np.arange(n)
    edges = np.asarray(edges, np.int64).reshape(-1, 2)
    while True:
        m = np.minimum(lab[edges[:, 0]], lab[edges[:, 1]])
        new = lab.copy()
        np.minimum.at(new, edges[:, 0], m)
        np.minimum.at(new, edges[:, 1], m)
        new = new[new]  # pointer jumping: converges in O(log diameter) rounds
        if np.array_equal(new, lab):
            break
        lab = new
    return np.unique(lab, return_inverse=True)[1]


def _pack_rects(sizes: np.ndarray, gap: float) -> tuple[np.ndarray, np.ndarray] | None:
    """MaxRects packing (best short side fit, 90-degree turns allowed) of rectangles
    [n,2] into the unit square.

    Returns (lower-left corners [n,2], turned [n] bool) or None when they do not
    fit with any of a few insertion orders.  ``gap`` is added to every rectangle
    so that charts never touch.
    """
    for order in (np.argsort(-sizes.max(1), kind="stable"), np.argsort(-sizes.prod(1), kind="stable"), np.argsort(-sizes[:, 1], kind="stable")):
        free = [(0.0, 0.0, 1.0, 1.0)]
        pos = np.zeros((len(sizes), 2))
        turned = np.zeros(len(sizes), bool)
        for i in order:
            best = None
            for rot in (False, True):
                w, h = (sizes[i][::-1] if rot else sizes[i]) + gap
                for fx, fy, fw, fh in free:
                    if fw >= w and fh >= h:
                        score = (min(fw - w, fh - h), max(fw - w, fh - h))
                        if best is None or score < best[0]:
                            best = (score, fx, fy, w, h, rot)
            if best is None:
                break
            _, x, y, w, h, rot = best
            pos[i], turned[i] = (x, y), rot
            # split every free rectangle the new one intersects into up to four maximal pieces
            out = []
            for fx, fy, fw, fh in free:
                if x >= fx + fw or x + w <= fx or y >= fy + fh or y + h <= fy:
                    out.append((fx, fy, fw, fh))
                    continue
                if x > fx:
                    out.append((fx, fy, x - fx, fh))
                if x + w < fx + fw:
                    out.append((x + w, fy, fx + fw - x - w, fh))
                if y > fy:
                    out.append((fx, fy, fw, y - fy))
                if y + h < fy + fh:
                    out.append((fx, y + h, fw, fy + fh - y - h))
            # drop free rectangles contained in another (keep one of equal duplicates)
            free = [a for k, a in enumerate(out) if not any(
                (j < k or a != b) and b[0] <= a[0] and b[1] <= a[1] and a[0] + a[2] <= b[0] + b[2] and a[1] + a[3] <= b[1] + b[3]
                for j, b in enumerate(out) if j != k)]
        else:
            return pos, turned
    return None


def pack_charts(charts: list[dict], gap: float = ATLAS_GAP) -> list[tuple[float, float, float]]:
    """Scale (uniformly per chart) and place charts in [0,1]^2.

    Each chart dict has ``lo``/``hi`` (its UV bounding box), ``uv_area``,
    ``area3d`` and ``density``; charts get UV area proportional to
    density * 3D area, all with one common factor, the largest that packs.
    Returns (scale, offset_u, offset_v, turned) per chart:
    new_uv = R(uv - lo) * scale + offset, R a quarter turn where ``turned``.
    """
    base = np.array([np.sqrt(c["density"] * c["area3d"] / max(c["uv_area"], 1e-12)) for c in charts])
    ext = np.array([np.asarray(c["hi"]) - np.asarray(c["lo"]) for c in charts])
    lo_k, hi_k = 0.0, 1.0 / float((base[:, None] * ext).max())
    placed = _pack_rects(ext * base[:, None] * lo_k, gap)
    for _ in range(24):  # bisection on the common factor
        k = 0.5 * (lo_k + hi_k)
        pos = _pack_rects(ext * base[:, None] * k, gap)
        if pos is None:
            hi_k = k
        else:
            lo_k, placed = k, pos
    pos, turned = placed
    return [(float(base[i] * lo_k), float(pos[i][0] + gap / 2), float(pos[i][1] + gap / 2), bool(turned[i])) for i in range(len(charts))]


def _uv_islands(uv_tris: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Island id per UV triangle; islands whose boxes mostly overlap (nested rings) are merged."""
    ids, inv = np.unique(uv_tris, return_inverse=True)
    inv = inv.reshape(-1, 3)
    comp = _components(len(ids), np.concatenate([inv[:, [0, 1]], inv[:, [1, 2]]]))[inv[:, 0]]
    while True:
        n = comp.max() + 1
        q = uv[uv_tris]
        lo = np.full((n, 2), np.inf)
        hi = np.full((n, 2), -np.inf)
        np.minimum.at(lo, comp, q.min(1))
        np.maximum.at(hi, comp, q.max(1))
        inter = np.clip(np.minimum(hi[:, None], hi[None]) - np.maximum(lo[:, None], lo[None]), 0, None).prod(-1)
        area = (hi - lo).prod(-1)
        np.fill_diagonal(inter, 0)
        a, b = np.nonzero(inter > 0.5 * np.minimum(area[:, None], area[None]))
        if len(a) == 0:
            return comp
        comp = _components(n, np.stack([a, b], 1))[comp]


# --------------------------------------------------------------------------- builder
def resolve_parts(parts) -> tuple[str, ...]:
    if parts is None:
        parts = "avatar"
    if isinstance(parts, str):
        parts = PRESETS[parts] if parts in PRESETS else tuple(p.strip() for p in parts.split(",") if p.strip())
    parts = tuple(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise UserError(f"unknown ICT part(s) {bad or parts}; use a preset ({', '.join(PRESETS)}) or parts from: {', '.join(PARTS)}")
    if "face" not in parts:
        raise UserError("the ICT part list must include 'face' (it carries the landmarks)")
    return tuple(p for p in PARTS if p in parts)  # canonical order


def _eyeball_cap(vertices: np.ndarray, polys: np.ndarray, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Polygons of the front cap of an eyeball shell and new per-vertex disc UVs [V,2] (NaN elsewhere)."""
    v0, v1, _, _ = PARTS[part]
    pv = vertices[v0 : v1 + 1]
    centre = 0.5 * (pv.min(0) + pv.max(0))
    radius = 0.5 * (pv.max(0) - pv.min(0)).max()
    d = (vertices - centre) / radius
    front = d[:, 2] > EYEBALL_CAP_COS
    keep = np.all(np.where(polys >= 0, front[np.maximum(polys, 0)], True), axis=1)
    # Orthographic projection along +z is one-to-one on the cap.
    uv = np.full((len(vertices), 2), np.nan)
    uv[v0 : v1 + 1] = 0.5 + 0.5 * d[v0 : v1 + 1, :2]
    return keep, uv


def _boundary_loops(faces: np.ndarray) -> list[np.ndarray]:
    """Vertex sets of the connected components of the mesh boundary (edges with one face)."""
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), 1)
    ue, cnt = np.unique(e, axis=0, return_counts=True)
    be = ue[cnt == 1]
    if len(be) == 0:
        return []
    verts, inv = np.unique(be, return_inverse=True)
    lab = _components(len(verts), inv.reshape(-1, 2))
    return [verts[lab == i] for i in range(lab.max() + 1)]


def _polygon_contains(poly: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test in 2D. poly [K,2], pts [P,2] -> [P] bool."""
    inside = np.zeros(len(pts), bool)
    x, y = pts[:, 0], pts[:, 1]
    for i in range(len(poly)):
        (x0, y0), (x1, y1) = poly[i], poly[(i + 1) % len(poly)]
        crosses = (y0 > y) != (y1 > y)
        xi = x0 + (y - y0) * (x1 - x0) / np.where(y1 == y0, 1e-12, y1 - y0)
        inside ^= crosses & (x < xi)
    return inside


def _regions_and_labels(tmpl_cm: np.ndarray, faces: np.ndarray, part_of_vertex: np.ndarray, orig_index: np.ndarray, lm_new: np.ndarray):
    """Named vertex regions and per-face parsing labels, from the template in centimetres.

    The thresholds are anatomical heights on the ICT template (y up, face +z):
    the scalp is the head part above a plane rising from the nape to above the
    ears, the neck everything below a plane under the chin and jaw.
    """
    V = len(tmpl_cm)
    x, y, zc = tmpl_cm[:, 0], tmpl_cm[:, 1], tmpl_cm[:, 2]
    part_names = list(PARTS)
    in_part = lambda *names: np.isin(part_of_vertex, [part_names.index(n) for n in names if n in part_names])  # noqa: E731
    lm = tmpl_cm[lm_new]
    chin_y, chin_z = lm[8, 1], lm[8, 2]
    brow_y = lm[17:27, 1].mean()
    front = zc > lm[0, 2] - 1.0  # in front of the ear-level jaw landmarks

    face = in_part("face") & (orig_index <= NARROW_FACE_LAST_VERTEX)
    mouth = in_part("mouth_socket", "teeth", "gums_tongue")
    eyes = in_part("eyeball_left", "eyeball_right", "eye_socket_left", "eye_socket_right")
    outer_lip = lm[48:60, :2]
    lips = in_part("face") & front & (zc > lm[48:60, 2].min() - 2.0) & _polygon_contains(outer_lip, tmpl_cm[:, :2])
    # Scalp: the plane through (y=4, z=2) above the ear and (y=-5, z=-9) at the nape.
    hair = in_part("head_neck") & (y > 4.0 + (zc - 2.0) * (9.0 / 11.0)) & (y > brow_y - 3.0)
    # Neck: below the plane through a point 1 cm under the chin and (y=-6, z=-8) at the back.
    neck_plane = (chin_y - 1.0) + (zc - chin_z) * ((chin_y - 1.0 + 6.0) / (chin_z + 8.0))
    neck = in_part("face", "head_neck") & (y < neck_plane) & ~hair
    brows = np.zeros(V, bool)
    for a, b in ((17, 22), (22, 27)):
        pl = lm[a:b]
        xs = np.clip(x, pl[:, 0].min(), pl[:, 0].max())
        yb = np.interp(xs, pl[:, 0], pl[:, 1]) if pl[0, 0] < pl[-1, 0] else np.interp(xs, pl[::-1, 0], pl[::-1, 1])
        within_x = (x >= pl[:, 0].min() - 0.3) & (x <= pl[:, 0].max() + 0.3)
        brows |= in_part("face") & front & within_x & (np.abs(y - yb) < 0.7)

    loops = _boundary_loops(faces)
    rim = min(loops, key=lambda s: tmpl_cm[s, 1].mean()) if loops else np.zeros(0, np.int64)
    boundary = np.zeros(V, bool)
    boundary[rim] = True
    ring = np.isin(faces, rim).any(1)
    boundary[np.unique(faces[ring])] = True  # the rim and its one-ring

    # Per-face labels: by the majority of the face's vertices, in priority order.
    labels = np.full(len(faces), SKIN, np.int64)
    for lab, mask in ((NECK, neck), (HAIR, hair), (BROWS, brows), (LIPS, lips), (EYES, eyes), (MOUTH, mouth)):
        labels[mask[faces].sum(1) >= 2] = lab
    regions = {
        "face": face, "mouth_interior": mouth, "lips": lips, "eyes": eyes, "hair": hair, "neck": neck,
        "boundary": boundary, "brows": brows, "teeth": in_part("teeth"),
        "eyeball_left": in_part("eyeball_left"), "eyeball_right": in_part("eyeball_right"),
        "skin": in_part("face", "head_neck") & ~(hair | lips | brows),
    }
    return {k: np.nonzero(v)[0].astype(np.int64) for k, v in regions.items()}, labels


def _eyeball_meta(verts_cm: np.ndarray, used: np.ndarray, regions: dict, parts) -> dict:
    """meta["eyeballs"] (headmodels/gaze.py) when both eyeballs are kept: gaze turns them about
    the centre of their full shell (the cap alone would put it too far forward)."""
    from headavatar.headmodels.gaze import eyeball_spec

    if not all(p in parts for p in EYEBALLS):
        return {}
    template_m = verts_cm[used] * CM_TO_M
    out = {}
    for eye, part in (("right", "eyeball_right"), ("left", "eyeball_left")):
        v0, v1, _, _ = PARTS[part]
        shell = verts_cm[v0 : v1 + 1]
        centre = 0.5 * (shell.min(0) + shell.max(0)) * CM_TO_M
        radius = 0.5 * float((shell.max(0) - shell.min(0)).max()) * CM_TO_M
        out[eye] = eyeball_spec(template_m, regions[part], centre, radius)
    return {"eyeballs": out}


@register_head_model("ict")
def build_ict_head(path: str | os.PathLike | None = None, parts="avatar", n_identity: int = 100) -> HeadModel:
    """The ICT-FaceKit head model (see the module docstring and docs/HEAD_MODELS.md).

    path: the npz (else $HEADAVATAR_ICT_NPZ, else the copy shipped in headavatar/assets/ict-facekit/);
    parts: "avatar" (default), "all", or a list / comma-separated string of PARTS names;
    n_identity: how many identity modes (of 100) become the shape basis.
    """
    npz = find_ict_npz(path)
    data = load_ict_npz(npz)
    if data["vertices"].shape[0] != NUM_VERTICES or data["faces"].shape[0] != NUM_POLYGONS:
        raise UserError(
            f"{npz} has {data['vertices'].shape[0]} vertices / {data['faces'].shape[0]} polygons, not the ICT-FaceKit Light "
            f"topology ({NUM_VERTICES} / {NUM_POLYGONS}); convert an unmodified ICT-FaceKit FaceXModel folder"
        )
    n_available = data["identity_deltas"].shape[0]
    if not 0 <= int(n_identity) <= n_available:
        raise UserError(f"n_identity must be within 0..{n_available} for {npz} (got {n_identity})")
    n_identity = int(n_identity)
    parts = resolve_parts(parts)

    verts_cm = data["vertices"].astype(np.float64)
    polys_all = data["faces"].astype(np.int64)
    puvs_all = data["face_uvs"].astype(np.int64)
    uvs_all = data["uvs"].astype(np.float64)

    # ---- polygon selection (eyeballs: front cap only)
    sel_polys, sel_puvs, poly_part, eye_uv = [], [], [], {}
    for name in parts:
        _, _, p0, p1 = PARTS[name]
        P, U = polys_all[p0 : p1 + 1], puvs_all[p0 : p1 + 1]
        if name in EYEBALLS:
            keep, eye_uv[name] = _eyeball_cap(verts_cm, P, name)
            P, U = P[keep], U[keep]
        sel_polys.append(P)
        sel_puvs.append(U)
        poly_part.append(np.full(len(P), list(PARTS).index(name)))
    polys = np.concatenate(sel_polys)
    puvs = np.concatenate(sel_puvs)
    ppart = np.concatenate(poly_part)
    tris, src = triangulate(polys)
    tri_uv_orig, _ = triangulate(puvs)
    tri_part = ppart[src]

    # ---- vertex re-indexing (parts share vertices along their seams)
    used = np.unique(tris)
    remap = np.full(NUM_VERTICES, -1, np.int64)
    remap[used] = np.arange(len(used))
    faces = remap[tris]
    # a vertex belongs to the first selected part (in PARTS order) whose polygons use it
    part_of_vertex = np.full(NUM_VERTICES, -1, np.int64)
    for k in np.unique(tri_part)[::-1]:
        part_of_vertex[np.unique(tris[tri_part == k])] = k
    part_of_vertex = part_of_vertex[used]

    # ---- UV atlas.  ICT's UVs are UDIM tiles (u in [0,7)) and the eyeballs share tile 0
    # with the face; re-pack every UV island (the face tile's nested islands stay one
    # chart) and a new orthographic disc per eyeball cap into [0,1]^2.
    names = list(PARTS)
    charts = []
    for k in np.unique(tri_part):
        m_part = tri_part == k
        if names[k] in EYEBALLS:
            island_sets = [(np.nonzero(m_part)[0], tris[m_part], eye_uv[names[k]])]
        else:
            isl = _uv_islands(tri_uv_orig[m_part], uvs_all)
            idx = np.nonzero(m_part)[0]
            island_sets = [(idx[isl == i], tri_uv_orig[idx[isl == i]], uvs_all) for i in range(isl.max() + 1)]
        for tri_idx, local_idx, src_uv in island_sets:
            ids, inv = np.unique(local_idx, return_inverse=True)
            uv_c, tri_c = src_uv[ids], inv.reshape(-1, 3)
            charts.append({
                "part": names[k], "uv": uv_c, "tris": tri_c, "tri_idx": tri_idx,
                "lo": uv_c.min(0), "hi": uv_c.max(0),
                "uv_area": float(_tri_areas(uv_c[tri_c]).sum()),
                "area3d": float(_tri_areas(verts_cm[tris[tri_idx]]).sum()),
                "density": CHART_DENSITY[names[k]],
            })
    placement = pack_charts(charts)
    new_uvs, uv_faces, offset = [], np.zeros_like(faces), 0
    for ch, (s, ou, ov, turned) in zip(charts, placement):
        local = ch["uv"] - ch["lo"]
        if turned:  # quarter turn, counter-clockwise, kept in the first quadrant
            local = np.stack([ch["hi"][1] - ch["lo"][1] - local[:, 1], local[:, 0]], 1)
        new_uvs.append(local * s + np.array([ou, ov]))
        uv_faces[ch["tri_idx"]] = ch["tris"] + offset
        offset += len(ch["uv"])
    uvs = np.clip(np.concatenate(new_uvs), 0.0, 1.0)

    # ---- bases (cm -> m; float16 deltas -> float32), laid out [V,3,K]
    template = verts_cm[used] * CM_TO_M
    expr = np.ascontiguousarray(np.moveaxis(data["expression_deltas"][:, used].astype(np.float32), 0, -1)) * CM_TO_M
    ident = np.ascontiguousarray(np.moveaxis(data["identity_deltas"][:n_identity, used].astype(np.float32), 0, -1)) * CM_TO_M

    # ---- landmarks: a triangle at each landmark vertex, weight 1 on that corner
    lm_new = remap[np.asarray(LANDMARK_VERTICES)]
    lm_faces = np.zeros(68, np.int64)
    lm_bary = np.zeros((68, 3), np.float32)
    for i, vi in enumerate(lm_new):
        f_idx, corner = np.nonzero(faces == vi)
        lm_faces[i] = f_idx[0]
        lm_bary[i, corner[0]] = 1.0

    regions, labels = _regions_and_labels(verts_cm[used], faces, part_of_vertex, used, lm_new)

    # ---- root joint: the centroid of the skull (face + scalp above the chin), between the ears
    # (area-weighted: the face is meshed far more densely than the back of the head), over
    # vertices expressions hardly move: joints are regressed from the mesh with its expression
    # (HeadModel.forward), and a rigid head's pivot should not follow the jaw.
    still = np.abs(data["expression_deltas"][:, used]).max(axis=(0, 2)) < 0.1  # moved by no expression more than 1 mm
    skull = np.isin(part_of_vertex, [names.index("face"), names.index("head_neck")]) & (verts_cm[used, 1] > verts_cm[LANDMARK_VERTICES[8], 1]) & still
    vertex_area = np.zeros(len(used))
    np.add.at(vertex_area, faces.reshape(-1), np.repeat(_tri_areas(verts_cm[tris]) / 3.0, 3))
    w = np.where(skull, vertex_area, 0.0)
    regressor = (w / w.sum())[None].astype(np.float32)

    meta_eyes = _eyeball_meta(verts_cm, used, regions, parts)
    expression_names = [str(s) for s in data["expression_names"]]
    return HeadModel(
        name="ict",
        template=torch.from_numpy(template.astype(np.float32)),
        faces=torch.from_numpy(faces),
        uvs=torch.from_numpy(uvs.astype(np.float32)),
        uv_faces=torch.from_numpy(uv_faces.astype(np.int64)),
        shape_basis=torch.from_numpy(ident),
        expr_basis=torch.from_numpy(expr),
        expression_names=expression_names,
        joint_names=["root"],
        parents=[-1],
        joint_regressor=torch.from_numpy(regressor),
        skin_weights=torch.ones(len(used), 1),
        regions=regions,
        landmark_faces=torch.from_numpy(lm_faces),
        landmark_bary=torch.from_numpy(lm_bary),
        condition_joints=[],
        face_labels=torch.from_numpy(labels),
        meta={
            "parts": list(parts),
            "n_identity": n_identity,
            "expression_range": (0.0, 1.0),
            "shape_prior_std": 1.0,  # identity modes are scaled PCA modes: coefficients ~ N(0, 1)
            "source_vertex_index": used,  # ICT vertex index of every model vertex
            "uv_charts": len(charts),
            "source": str(npz.name),
            **meta_eyes,
        },
    )
