"""The FLAME head model, built from the user's own (licence-restricted) FLAME 2020 files.

Nothing of FLAME is bundled.  A FLAME folder holds:

    generic_model.pkl        FLAME 2020 (template 5023x3, 9976 faces, shapedirs 5023x3x400 =
                             300 shape + 100 expression, posedirs 5023x3x36, J_regressor 5x5023
                             (scipy sparse), weights 5023x5, kintree_table 2x5)      required
    FLAME_masks.pkl          vertex regions (face, lips, eyeballs, scalp, neck, boundary, ...) required
    FlameMesh.obj or head_template_mesh.obj
                             FLAME topology + UVs (FlashAvatar's FlameMesh.obj adds 30 faces
                             closing the mouth cavity)                                  required
    landmark_embedding.npy   DECA-style 68-landmark embedding                           optional
    l_eyelid.npy, r_eyelid.npy  metrical-tracker's eyelid blendshapes (also looked for in
                             blendshapes/)                                              optional

Conventions: metres (``scale`` multiplies every length, e.g. 4 for IMavatar/FLARE's
x4 FLAME), joints global, neck, jaw, eye_left, eye_right (FLAME's order: joint 3 is the
subject's left eye), eyelids added after skinning as ``l_eyelid*e[0] + r_eyelid*e[1]``
(metrical-tracker / FlashAvatar).  The condition vector is exp(100) + jaw 6D + eyes 2x6D
+ eyelids(2) = 120 with the default sizes, as FlashAvatar.

The mouth cavity: FLAME's mesh is open at the lips.  FlashAvatar samples Gaussians on
30 extra faces that close it (its FlameMesh.obj).  With ``mouth_faces="auto"`` those
faces are taken from the template OBJ when it has them, and otherwise built here by
fan-triangulating FLAME's inner-lip boundary loop, with UVs on a small disc placed in
an empty part of the UV atlas (about the texel area FlameMesh gives the mouth).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from headavatar.constants import LABEL_IDS
from headavatar.errors import UserError
from headavatar.headmodels import register_head_model
from headavatar.headmodels.base import HeadModel
from headavatar.headmodels.flame_pickle import ForeignPickleError, load_npy_object, load_pickle
from headavatar.headmodels.obj import read_obj, triangulate

# what a truncated or non-pickle file raises while being unpickled
_BAD_PICKLE = (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, pickle.UnpicklingError)

FLAME_NUM_VERTICES = 5023
FLAME_NUM_FACES = 9976
FLAME_NUM_SHAPE = 300
FLAME_NUM_EXPR = 100
JOINT_NAMES = ["global", "neck", "jaw", "eye_left", "eye_right"]
FLAME_PARENTS = [-1, 0, 1, 1, 1]
CONDITION_JOINTS = ["jaw", "eye_left", "eye_right"]

# Where $HEADAVATAR_FLAME_DIR is read: only when neither a dir nor a path was given.
FLAME_DIR_ENV = "HEADAVATAR_FLAME_DIR"
MODEL_NAMES = ("generic_model.pkl",)
MASKS_NAMES = ("FLAME_masks.pkl",)
# FlameMesh.obj first: it is the reference's exact UV layout including the mouth faces.
TEMPLATE_NAMES = ("FlameMesh.obj", "head_template_mesh.obj", "head_template.obj")
LANDMARK_NAMES = ("landmark_embedding.npy", "landmark_embedding_with_eyes.npy")
EYELID_NAMES = ("l_eyelid.npy", "r_eyelid.npy")
EYELID_SUBDIRS = (".", "blendshapes")
# Texel area the reference's mouth faces cover at UV 128 (140 texels): a disc of this radius.
MOUTH_UV_RADIUS = float(np.sqrt(140 / np.pi) / 128)

_SETUP_HINT = (
    "FLAME is licence-restricted and not bundled: register at flame.is.tue.mpg.de, download FLAME 2020, "
    "and pass its folder with --flame-dir (or set " + FLAME_DIR_ENV + ")"
)


# ---------------------------------------------------------------------------- files
def _resolve(base: Path | None, given, defaults: tuple[str, ...], what: str, required: bool) -> Path | None:
    """A file from an explicit path (absolute, or relative to ``base``) or the first default name in ``base``."""
    if given is not None and str(given) != "":
        p = Path(given).expanduser()
        if not p.is_absolute() and base is not None:
            p = base / p
        if not p.is_file():
            raise UserError(f"{what} {p} does not exist" + ("" if base is not None or p.is_absolute() else f"; {_SETUP_HINT}"))
        return p
    if base is None:
        if required:
            raise UserError(f"no FLAME folder given to find the {what} in; {_SETUP_HINT}")
        return None
    for name in defaults:
        if (base / name).is_file():
            return base / name
    if required:
        raise UserError(f"{what} not found in {base} (looked for {', '.join(defaults)}); {_SETUP_HINT}")
    return None


def _flame_dir(dir) -> Path | None:
    if dir is None:
        dir = os.environ.get(FLAME_DIR_ENV) or None
    if dir is None:
        return None
    d = Path(dir).expanduser()
    if not d.is_dir():
        raise UserError(f"FLAME folder {d} does not exist or is not a folder; {_SETUP_HINT}")
    return d


def _relname(path: Path | None, base: Path | None) -> str | None:
    """What a subject stores: the path relative to the FLAME folder, never an absolute path."""
    if path is None:
        return None
    if base is not None:
        try:
            return path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            pass
    return path.name


# ------------------------------------------------------------------------ the model
def read_flame_model(path: Path, expect_version: str = "2020") -> tuple[dict[str, np.ndarray], dict]:
    """Read and check ``generic_model.pkl``; returns (arrays, info)."""
    path = Path(path)
    # Every FLAME release (2017, 2019, 2020, 2023) has the same array sizes, so the release is
    # judged from the file name, the one dependable difference we can check without the files.
    # only "flame2023", "FLAME_2019", ... count, so unrelated numbers in folder names do not
    m = re.search(r"flame[ _-]?(2017|2019|2020|2023)", f"{path.parent.name}/{path.name}", re.IGNORECASE)
    named = m.group(1) if m else None
    if expect_version not in ("any", None) and named is not None and named != expect_version:
        raise UserError(
            f"{path} looks like FLAME {named} (from its name), but FLAME {expect_version} is expected: FlashAvatar's tracker "
            f"and FLARE's data use FLAME {expect_version}; pass its generic_model.pkl (or flame_version='any' to use this file regardless)"
        )
    try:
        data = load_pickle(path)
    except ForeignPickleError as e:
        raise UserError(f"{path} is not a FLAME model file: it is a pickle of other objects (it references {e.module}.{e.name}); "
                        "pass FLAME 2020's generic_model.pkl") from None
    except _BAD_PICKLE as e:
        raise UserError(f"{path} is damaged or not a pickle ({type(e).__name__}: {e}); download FLAME 2020 again") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a FLAME model file (it holds a {type(data).__name__}, not a dict of arrays); pass FLAME 2020's generic_model.pkl")
    need = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")
    missing = [k for k in need if k not in data]
    if missing:
        raise UserError(f"{path} is not a FLAME model file (missing {', '.join(missing)}); pass FLAME 2020's generic_model.pkl")
    try:
        arr = {k: np.asarray(data[k]) for k in need}
    except ValueError as e:
        raise UserError(f"{path}: {e}; pass FLAME 2020's generic_model.pkl") from None
    V = arr["v_template"].shape[0] if arr["v_template"].ndim == 2 else -1
    known = {6890: "an SMPL body model", 10475: "an SMPL-X body model", 778: "a MANO hand model"}
    if V != FLAME_NUM_VERTICES:
        what = known.get(V, f"a model with {V} vertices")
        raise UserError(f"{path} is {what}, not FLAME (FLAME has {FLAME_NUM_VERTICES} vertices); pass FLAME 2020's generic_model.pkl")
    shapes = {
        "f": (FLAME_NUM_FACES, 3),
        "posedirs": (V, 3, 36),
        "J_regressor": (5, V),
        "weights": (V, 5),
        "kintree_table": (2, 5),
    }
    for k, want in shapes.items():
        if arr[k].shape != want:
            raise UserError(f"{path}: '{k}' has shape {arr[k].shape}, FLAME 2020 has {want}; this is not a FLAME 2020 generic_model.pkl")
    sd = arr["shapedirs"]
    if sd.ndim != 3 or sd.shape[:2] != (V, 3) or sd.shape[2] < FLAME_NUM_SHAPE + FLAME_NUM_EXPR:
        raise UserError(
            f"{path}: 'shapedirs' has shape {sd.shape}, FLAME 2020 has ({V}, 3, 400) = 300 shape + 100 expression components; "
            "this is a different FLAME release or a cut-down file"
        )
    parents = arr["kintree_table"][0].astype(np.int64)
    if list(parents[1:]) != FLAME_PARENTS[1:]:
        raise UserError(f"{path}: the joint hierarchy {parents.tolist()} is not FLAME's (root, neck, jaw, two eyes)")
    f = arr["f"].astype(np.int64)
    if f.min() < 0 or f.max() >= V:
        raise UserError(f"{path}: faces index past the {V} vertices; the file is damaged")
    for k in ("v_template", "shapedirs", "posedirs", "weights", "J_regressor"):
        if not np.isfinite(arr[k]).all():
            raise UserError(f"{path}: '{k}' contains NaN or Inf; the file is damaged")

    info = {"version": named or expect_version, "version_from": "file name" if named else "assumed (FLAME releases share array sizes)"}
    # FLAME 2017/2019 expressions leave the back of the head still; FLAME 2020's move every vertex.
    expr = sd[:, :, FLAME_NUM_SHAPE : FLAME_NUM_SHAPE + FLAME_NUM_EXPR]
    moving = float((np.abs(expr).max(axis=(1, 2)) > 0).mean())
    info["expression_coverage"] = moving
    if expect_version == "2020" and named is None and moving < 0.6:
        warnings.warn(
            f"{path}: the expression basis moves only {moving:.0%} of the vertices, as FLAME 2017/2019 do (FLAME 2020 moves all); "
            "check that this is FLAME 2020's generic_model.pkl",
            stacklevel=3,
        )
    arr["f"] = f
    arr["parents"] = np.asarray(FLAME_PARENTS, dtype=np.int64)
    return arr, info


def read_flame_masks(path: Path, num_vertices: int = FLAME_NUM_VERTICES) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        data = load_pickle(path)
    except ForeignPickleError as e:
        raise UserError(f"{path} is not FLAME_masks.pkl: it references {e.module}.{e.name}") from None
    except _BAD_PICKLE as e:
        raise UserError(f"{path} is damaged or not a pickle ({type(e).__name__}: {e}); download FLAME_masks.pkl again") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path} is not FLAME_masks.pkl (expected a dict of region name -> vertex indices)")
    out = {}
    for k, v in data.items():
        try:
            idx = np.unique(np.asarray(v).astype(np.int64).reshape(-1))
        except (TypeError, ValueError):
            raise UserError(f"{path}: region '{k}' is not a list of vertex indices") from None
        if len(idx) and (idx.min() < 0 or idx.max() >= num_vertices):
            raise UserError(f"{path}: region '{k}' names vertices outside FLAME's {num_vertices}; it belongs to another model")
        out[str(k)] = idx
    need = ("face", "lips", "left_eyeball", "right_eyeball", "scalp", "neck", "boundary")
    missing = [k for k in need if k not in out]
    if missing:
        raise UserError(f"{path} lacks the region(s) {', '.join(missing)}; it is not FLAME 2020's FLAME_masks.pkl")
    return out


def read_landmark_embedding(path: Path, num_faces: int = FLAME_NUM_FACES) -> tuple[np.ndarray, np.ndarray, str]:
    """68 landmarks as (face index [68], barycentrics [68,3], description of the source keys).

    Accepts DECA/metrical-tracker ``landmark_embedding.npy`` (``full_lmk_faces_idx`` /
    ``full_lmk_bary_coords``, or the 51 static + the frontal 17 of the dynamic contour,
    in that order as the trackers concatenate them), and dicts with 68
    ``lmk_face_idx`` / ``lmk_b_coords``.  GaussianAvatars' 70-point file keeps its first 68.
    """
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        elif path.suffix == ".npy":
            data = load_npy_object(path)
        else:
            data = load_pickle(path, allow_torch=True)
    except ForeignPickleError as e:
        raise UserError(f"{path} is not a FLAME landmark embedding: it references {e.module}.{e.name}") from None
    except (OSError, *_BAD_PICKLE) as e:
        raise UserError(f"{path} is damaged or not a landmark embedding ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a FLAME landmark embedding (expected a dict of arrays)")

    def get(k):
        v = data.get(k)
        return None if v is None else np.asarray(v)

    if get("full_lmk_faces_idx") is not None and get("full_lmk_bary_coords") is not None:
        fi, bc, src = get("full_lmk_faces_idx").reshape(-1), get("full_lmk_bary_coords").reshape(-1, 3), "full_lmk"
    elif get("static_lmk_faces_idx") is not None and get("dynamic_lmk_faces_idx") is not None and get("dynamic_lmk_bary_coords") is not None:
        dyn_f, dyn_b = get("dynamic_lmk_faces_idx"), get("dynamic_lmk_bary_coords")
        # row 0 of the dynamic table is the contour of a frontal head (yaw 0)
        fi = np.concatenate([dyn_f.reshape(dyn_f.shape[0], -1)[0], get("static_lmk_faces_idx").reshape(-1)])
        bc = np.concatenate([dyn_b.reshape(dyn_b.shape[0], -1, 3)[0], get("static_lmk_bary_coords").reshape(-1, 3)])
        src = "static+dynamic[0]"
    elif get("lmk_face_idx") is not None and get("lmk_b_coords") is not None:
        fi, bc, src = get("lmk_face_idx").reshape(-1), get("lmk_b_coords").reshape(-1, 3), "lmk_face_idx"
    else:
        raise UserError(f"{path} has none of the known landmark keys (full_lmk_faces_idx, static_/dynamic_lmk_*, lmk_face_idx); "
                        "it is not a FLAME landmark embedding")
    if len(fi) < 68 or len(bc) != len(fi):
        raise UserError(f"{path} has {len(fi)} landmarks, 68 are needed "
                        "(RingNet's 51-point static embedding lacks the jaw line; use DECA's landmark_embedding.npy)")
    fi, bc = fi[:68].astype(np.int64), bc[:68].astype(np.float64)
    if fi.min() < 0 or fi.max() >= num_faces:
        raise UserError(f"{path}: landmark faces outside FLAME's {num_faces} faces; it belongs to another model")
    if not np.isfinite(bc).all() or np.abs(bc.sum(1) - 1).max() > 1e-3:
        raise UserError(f"{path}: landmark barycentric weights do not sum to 1; the file is damaged")
    return fi, bc, src


def read_eyelids(l_path: Path, r_path: Path, num_vertices: int = FLAME_NUM_VERTICES) -> np.ndarray:
    """[V,3,2] basis: column 0 = left eyelid (e[0]), column 1 = right eyelid (e[1])."""
    cols = []
    for p in (l_path, r_path):
        try:
            a = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"eyelid blendshape {p} is unreadable ({e}); copy metrical-tracker's flame/blendshapes/{p.name} again") from None
        if a.shape != (num_vertices, 3) or not np.isfinite(a).all():
            raise UserError(f"eyelid blendshape {p} has shape {a.shape}, expected ({num_vertices}, 3) finite values")
        cols.append(a.astype(np.float64))
    return np.stack(cols, -1)


# ---------------------------------------------------------------------- topology
def _face_codes(faces: np.ndarray, V: int) -> np.ndarray:
    s = np.sort(faces, axis=1).astype(np.int64)
    return (s[:, 0] * V + s[:, 1]) * V + s[:, 2]


def match_template(flame_faces: np.ndarray, obj_path: Path, V: int = FLAME_NUM_VERTICES):
    """UVs for FLAME's faces from a template OBJ, plus the OBJ's faces that FLAME lacks.

    Returns (uvs [T,2], uv_faces [F,3], extra_faces [M,3], extra_uv_faces [M,3]).
    Faces are matched by their vertex sets, so the OBJ's face order and corner
    rotation do not matter; FLAME's winding is kept.
    """
    verts, uvs, polys, puvs = read_obj(obj_path)
    if len(verts) != V:
        raise UserError(f"template OBJ {obj_path} has {len(verts)} vertices, FLAME has {V}: "
                        "it is not a FLAME template (use head_template_mesh.obj or FlameMesh.obj)")
    if len(uvs) == 0 or (puvs[polys >= 0] < 0).any():
        raise UserError(f"template OBJ {obj_path} has no texture coordinates on every face; FLAME's UV template is needed (head_template_mesh.obj)")
    tris, _ = triangulate(polys)
    tuv, _ = triangulate(puvs)
    F = len(flame_faces)
    fcodes = _face_codes(flame_faces, V)
    order = np.argsort(fcodes)
    tcodes = _face_codes(tris, V)
    pos = np.searchsorted(fcodes[order], tcodes)
    pos = np.clip(pos, 0, F - 1)
    hit = fcodes[order][pos] == tcodes
    flame_idx = order[pos]
    uv_faces = np.full((F, 3), -1, dtype=np.int64)
    # the first occurrence wins if the OBJ repeats a face
    hit_idx = np.nonzero(hit)[0]
    _, first = np.unique(flame_idx[hit_idx], return_index=True)
    sel = hit_idx[first]
    k = flame_idx[sel]
    T, U = tris[sel], tuv[sel]
    rows = np.arange(len(sel))
    for j in range(3):
        # where the OBJ triangle has FLAME's corner j
        uv_faces[k, j] = U[rows, (T == flame_faces[k, j][:, None]).argmax(1)]
    seen = np.zeros(F, bool)
    seen[k] = True
    missing = int((~seen).sum())
    if missing:
        raise UserError(f"template OBJ {obj_path} lacks {missing} of FLAME's {F} faces: it does not have FLAME's topology")
    extra = ~hit
    return uvs.astype(np.float64), uv_faces, tris[extra], tuv[extra]


def boundary_loops(faces: np.ndarray) -> list[np.ndarray]:
    """Closed boundary loops, each ordered along its faces' edge direction."""
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    V = int(faces.max()) + 1
    codes = e[:, 0] * V + e[:, 1]
    rev = e[:, 1] * V + e[:, 0]
    border = e[~np.isin(rev, codes)]
    nxt: dict[int, int] = {}
    for a, b in border:
        nxt.setdefault(int(a), int(b))
    loops, done = [], set()
    for start in list(nxt):
        if start in done:
            continue
        loop, v = [], start
        while v not in done and v in nxt:
            done.add(v)
            loop.append(v)
            v = nxt[v]
        if v == start and len(loop) >= 3:
            loops.append(np.asarray(loop, dtype=np.int64))
    return loops


def _uv_occupancy(uvs: np.ndarray, uv_faces: np.ndarray, res: int) -> np.ndarray:
    """[res,res] bool: texel centres covered by a UV triangle (row 0 = v near 0)."""
    occ = np.zeros((res, res), bool)
    P = uvs[uv_faces] * res - 0.5  # texel-centre coordinates
    lo = np.clip(np.floor(P.min(1)).astype(np.int64), 0, res - 1)
    hi = np.clip(np.ceil(P.max(1)).astype(np.int64), 0, res - 1)
    ext = hi - lo + 1
    # triangles grouped by bounding-box size, each group tested at once against its candidate texels
    keys = ext[:, 0] * (res + 1) + ext[:, 1]
    for key in np.unique(keys):
        sel = np.nonzero(keys == key)[0]
        wx, wy = int(ext[sel[0], 0]), int(ext[sel[0], 1])
        for start in range(0, len(sel), max(1, 200_000 // (wx * wy))):
            s_ = sel[start : start + max(1, 200_000 // (wx * wy))]
            oy, ox = np.mgrid[0:wy, 0:wx]
            px = lo[s_, 0, None] + ox.reshape(1, -1)
            py = lo[s_, 1, None] + oy.reshape(1, -1)
            a, b, c = P[s_, 0], P[s_, 1], P[s_, 2]
            d = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
            ok = np.abs(d) > 1e-12
            d = np.where(ok, d, 1.0)[:, None]
            w0 = ((b[:, 1, None] - c[:, 1, None]) * (px - c[:, 0, None]) + (c[:, 0, None] - b[:, 0, None]) * (py - c[:, 1, None])) / d
            w1 = ((c[:, 1, None] - a[:, 1, None]) * (px - c[:, 0, None]) + (a[:, 0, None] - c[:, 0, None]) * (py - c[:, 1, None])) / d
            inside = ok[:, None] & (w0 >= -1e-9) & (w1 >= -1e-9) & (1 - w0 - w1 >= -1e-9)
            occ[py[inside], px[inside]] = True
    return occ


def close_mouth(faces: np.ndarray, uvs: np.ndarray, uv_faces: np.ndarray, lips: np.ndarray):
    """Faces closing FLAME's mouth opening, as FlashAvatar's FlameMesh.obj does.

    The opening is the boundary loop made mostly of 'lips' vertices; it is
    fan-triangulated (a 32-vertex loop gives 30 faces) with the winding that
    continues the lip faces, and gets UVs on a disc in the emptiest part of the
    atlas.  Returns (new faces [M,3], new uvs [T',2], new uv faces [M,3]) or None.
    """
    lips_set = np.zeros(faces.max() + 1, bool)
    lips_set[lips] = True
    best, best_frac = None, 0.5
    for loop in boundary_loops(faces):
        frac = lips_set[loop].mean()
        if frac > best_frac or (best is not None and frac == best_frac and len(loop) < len(best)):
            best, best_frac = loop, frac
    if best is None:
        return None
    n = len(best)
    # a boundary edge a->b is used by a face; the closing face must run b->a
    new_faces = np.stack([np.full(n - 2, best[0]), best[2:], best[1:-1]], 1)
    # the disc goes where the atlas is emptiest (distance transform of free texels)
    from scipy.ndimage import distance_transform_edt

    res = 128
    free = ~_uv_occupancy(uvs, uv_faces, res)
    free[0, :] = free[-1, :] = free[:, 0] = free[:, -1] = False
    dist = distance_transform_edt(free)
    iy, ix = np.unravel_index(np.argmax(dist), dist.shape)
    centre = (np.array([ix, iy], np.float64) + 0.5) / res
    radius = min(MOUTH_UV_RADIUS, max(dist[iy, ix] - 1.0, 0.5) / res)
    ang = 2 * np.pi * np.arange(n) / n
    ring = centre[None] + radius * np.stack([np.cos(ang), np.sin(ang)], 1)
    t0 = len(uvs)
    loop_uv = t0 + np.arange(n)
    new_uv_faces = np.stack([np.full(n - 2, loop_uv[0]), loop_uv[2:], loop_uv[1:-1]], 1)
    # match the atlas's dominant winding so a culling rasteriser would treat them alike
    def signed(tuv, uvarr):
        p = uvarr[tuv]
        return (p[:, 1, 0] - p[:, 0, 0]) * (p[:, 2, 1] - p[:, 0, 1]) - (p[:, 2, 0] - p[:, 0, 0]) * (p[:, 1, 1] - p[:, 0, 1])

    all_uvs = np.concatenate([uvs, ring])
    if np.sign(np.median(signed(uv_faces, uvs))) != np.sign(np.median(signed(new_uv_faces, all_uvs))):
        ring = ring[[0] + list(range(n - 1, 0, -1))]
        all_uvs = np.concatenate([uvs, ring])
    return new_faces, all_uvs, new_uv_faces


# ------------------------------------------------------------------------- builder
@register_head_model("flame")
def build_flame_head(
    dir=None,
    model_path=None,
    masks_path=None,
    template_obj=None,
    landmarks_path=None,
    eyelids_dir=None,
    eyelids: bool | None = None,
    n_shape: int | None = None,
    n_expr: int | None = None,
    scale: float = 1.0,
    mouth_faces: str = "auto",
    flame_version: str = "2020",
) -> HeadModel:
    """Build FLAME from the user's files (see the module docstring).

    ``dir`` is the FLAME folder (default: $HEADAVATAR_FLAME_DIR); relative paths are
    resolved against it.  ``eyelids``: None = use the eyelid blendshapes if present,
    True = require them, False = leave them out.  ``mouth_faces``: "auto" (the template's
    extra faces, else built), "template" (only the template's) or "none".
    """
    base = _flame_dir(dir)
    n_shape = FLAME_NUM_SHAPE if n_shape is None else int(n_shape)
    n_expr = FLAME_NUM_EXPR if n_expr is None else int(n_expr)
    if not 0 <= n_shape <= FLAME_NUM_SHAPE:
        raise UserError(f"FLAME n_shape must be in 0..{FLAME_NUM_SHAPE}, got {n_shape}")
    if not 0 <= n_expr <= FLAME_NUM_EXPR:
        raise UserError(f"FLAME n_expr must be in 0..{FLAME_NUM_EXPR}, got {n_expr}")
    if not (float(scale) > 0 and np.isfinite(float(scale))):
        raise UserError(f"FLAME scale must be a positive number, got {scale}")
    if mouth_faces not in ("auto", "template", "none"):
        raise UserError(f"FLAME mouth_faces must be auto, template or none, got '{mouth_faces}'")
    scale = float(scale)

    model_p = _resolve(base, model_path, MODEL_NAMES, "FLAME model file", True)
    masks_p = _resolve(base, masks_path, MASKS_NAMES, "FLAME region masks (FLAME_masks.pkl)", True)
    obj_p = _resolve(base, template_obj, TEMPLATE_NAMES, "FLAME UV template OBJ", True)
    lmk_p = _resolve(base, landmarks_path, LANDMARK_NAMES, "FLAME landmark embedding", False)
    eyelid_paths = None
    if eyelids is not False:
        if eyelids_dir is not None:
            ed = Path(eyelids_dir).expanduser()
            cands = [base / ed if (base is not None and not ed.is_absolute()) else ed]
        else:
            cands = [base / sub for sub in EYELID_SUBDIRS] if base is not None else []
        for c in cands:
            if all((c / n).is_file() for n in EYELID_NAMES):
                eyelid_paths = [c / n for n in EYELID_NAMES]
                break
        if eyelids and eyelid_paths is None:
            where = " or ".join(str(c) for c in cands) or "(no FLAME folder given)"
            raise UserError(
                f"eyelid blendshapes {' and '.join(EYELID_NAMES)} not found in {where}; "
                "copy them from metrical-tracker's flame/blendshapes/ into the FLAME folder"
            )

    arr, info = read_flame_model(model_p, flame_version)
    V = FLAME_NUM_VERTICES
    masks = read_flame_masks(masks_p, V)
    flame_f = arr["f"]
    uvs, uv_faces, extra_f, extra_uvf = match_template(flame_f, obj_p, V)

    mouth_src = "none"
    faces, all_uv_faces = flame_f, uv_faces
    if mouth_faces != "none" and len(extra_f):
        faces = np.concatenate([flame_f, extra_f])
        all_uv_faces = np.concatenate([uv_faces, extra_uvf])
        mouth_src = "template"
    elif mouth_faces == "auto":
        closed = close_mouth(flame_f, uvs, uv_faces, masks["lips"])
        if closed is None:
            warnings.warn(f"{model_p}: no mouth opening found next to the 'lips' region; the mouth cavity stays open", stacklevel=2)
        else:
            new_f, uvs, new_uvf = closed
            faces = np.concatenate([flame_f, new_f])
            all_uv_faces = np.concatenate([uv_faces, new_uvf])
            mouth_src = "built"
    n_mouth = len(faces) - len(flame_f)

    # regions
    eyes = np.union1d(masks["left_eyeball"], masks["right_eyeball"])
    if n_mouth:
        mouth_int = np.unique(faces[len(flame_f):])
    else:
        loops = boundary_loops(flame_f)
        lips_set = np.zeros(V, bool)
        lips_set[masks["lips"]] = True
        cand = [lp for lp in loops if lips_set[lp].mean() > 0.5]
        mouth_int = np.unique(np.concatenate(cand)) if cand else masks["lips"]
    regions = {k: v for k, v in masks.items()}
    regions.update(
        face=masks["face"], lips=masks["lips"], eyes=eyes, hair=masks["scalp"], neck=masks["neck"],
        boundary=masks["boundary"], mouth_interior=mouth_int,
    )

    # one parsing label per face (headavatar.subjects.format.LABELS)
    def all_in(idx):
        m = np.zeros(V, bool)
        m[idx] = True
        return m[faces].all(1)

    labels = np.full(len(faces), LABEL_IDS["skin"], dtype=np.int64)
    labels[all_in(masks["neck"]) & ~all_in(masks["face"])] = LABEL_IDS["neck"]
    labels[all_in(masks["scalp"])] = LABEL_IDS["hair"]
    labels[all_in(eyes)] = LABEL_IDS["eyes"]
    labels[all_in(masks["lips"])] = LABEL_IDS["lips"]
    labels[len(flame_f):] = LABEL_IDS["mouth_interior"]

    if lmk_p is not None:
        lmk_f, lmk_b, lmk_src = read_landmark_embedding(lmk_p, FLAME_NUM_FACES)
        has_lmk = True
    else:
        lmk_f, lmk_b, lmk_src = np.zeros(68, np.int64), np.tile([1.0, 0.0, 0.0], (68, 1)), None
        has_lmk = False

    post = {}
    if eyelid_paths is not None:
        post["eyelids"] = torch.as_tensor(read_eyelids(*eyelid_paths, V) * scale, dtype=torch.float32)

    f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    sd = arr["shapedirs"]
    posedirs = arr["posedirs"].reshape(-1, 36).T  # [36, V*3]: FLAME's (R_j - I) feature order
    model = HeadModel(
        name="flame",
        template=f32(arr["v_template"] * scale),
        faces=torch.as_tensor(faces, dtype=torch.int64),
        uvs=f32(uvs),
        uv_faces=torch.as_tensor(all_uv_faces, dtype=torch.int64),
        shape_basis=f32(sd[:, :, :n_shape] * scale),
        expr_basis=f32(sd[:, :, FLAME_NUM_SHAPE : FLAME_NUM_SHAPE + n_expr] * scale),
        expression_names=[f"exp{i:03d}" for i in range(n_expr)],
        joint_names=list(JOINT_NAMES),
        parents=list(FLAME_PARENTS),
        joint_regressor=f32(arr["J_regressor"]),
        skin_weights=f32(arr["weights"]),
        regions=regions,
        landmark_faces=torch.as_tensor(lmk_f, dtype=torch.int64),
        landmark_bary=f32(lmk_b),
        condition_joints=list(CONDITION_JOINTS),
        pose_basis=f32(posedirs * scale),
        post_basis=post,
        face_labels=torch.as_tensor(labels, dtype=torch.int64),
        meta={
            "flame_version": info["version"],
            "flame_version_from": info["version_from"],
            "has_landmarks": has_lmk,
            "landmark_source": lmk_src,
            "scale": scale,
            "num_flame_faces": int(len(flame_f)),
            "mouth_faces": {"count": int(n_mouth), "source": mouth_src},
            "eyelids": eyelid_paths is not None,
            "files": {
                "model_path": _relname(model_p, base),
                "masks_path": _relname(masks_p, base),
                "template_obj": _relname(obj_p, base),
                "landmarks_path": _relname(lmk_p, base),
                "eyelids_dir": _eyelid_dirname(eyelid_paths, base),
            },
        },
    )
    return model


def _eyelid_dirname(paths, base: Path | None) -> str | None:
    if not paths:
        return None
    name = _relname(paths[0].parent, base)
    return None if name in (".", "") else name


def flame_spec(model: HeadModel, **extra) -> dict:
    """The head-model spec a subject stores for ``model``: file names relative to the FLAME
    folder, sizes and options, the fingerprint -- never an absolute path.  At train time the
    FLAME folder comes again from --flame-dir / $HEADAVATAR_FLAME_DIR (``dir`` override)."""
    files = {k: v for k, v in model.meta.get("files", {}).items() if v is not None}
    spec = {
        "name": "flame",
        **files,
        "n_shape": model.num_shape,
        "n_expr": model.num_expression,
        "eyelids": bool(model.meta.get("eyelids")),
        "scale": float(model.meta.get("scale", 1.0)),
        "mouth_faces": "auto" if model.meta.get("mouth_faces", {}).get("count") else "none",
        **extra,
        "fingerprint": model.fingerprint(),
    }
    return spec


def require_landmarks(model: HeadModel, purpose: str) -> None:
    """Refuse landmark-based work (fitting, the landmark check) on a FLAME without its embedding."""
    if not model.meta.get("has_landmarks", True):
        raise UserError(
            f"{purpose} needs FLAME's 68-landmark embedding, which was not found; put DECA's landmark_embedding.npy "
            "into the FLAME folder (or pass its path)"
        )
