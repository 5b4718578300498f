"""Fixture builders in the exact on-disk formats of FLAME, metrical-tracker/FlashAvatar and IMavatar.

Every number here is made up (seeded random or simple geometry): nothing of the real,
licence-restricted FLAME model is used or reproduced.  The FLAME-format files only have
FLAME's *array shapes* (5023 vertices, 9976 faces, 400 blendshapes, 5 joints) so the
loader's checks run as on the real files.

The fake head: a closed ellipsoidal grid (63 columns x 77 rings + 2 poles) with a
32-vertex mouth opening, two closed eyeball spheres and 14 unreferenced vertices,
which is exactly 5023 vertices and 9976 faces.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import sys
import types
from pathlib import Path

import numpy as np

V_FLAME, F_FLAME = 5023, 9976
C_COLS, R_RINGS = 63, 77
EYE_RINGS, EYE_COLS = 4, 19
MOUTH_RING = 46  # the opening lies between rings 46 and 47
MOUTH_HALF = 7  # quads at columns -7..7 are removed: 15 quads, a 32-vertex loop
CENTRE = np.array([0.0, 0.02, 0.0])
RADII = np.array([0.08, 0.11, 0.09])
EYE_CENTRES = np.array([[0.032, 0.045, 0.072], [-0.032, 0.045, 0.072]])  # FLAME's left eye (+x) first
EYE_RADIUS = 0.012


# ------------------------------------------------------------------ geometry
def _grid_index(i, j):
    return 1 + i * C_COLS + (j % C_COLS)


def make_fake_flame(seed: int = 0) -> dict:
    """All arrays of a FLAME-shaped model plus what the tests need to know about it."""
    rng = np.random.default_rng(seed)
    V = []
    # top pole, rings, bottom pole
    theta = np.linspace(0.25, 2.75, R_RINGS)
    phi = 2 * np.pi * np.arange(C_COLS) / C_COLS  # phi=0 looks along +z (the face)
    V.append(CENTRE + [0, RADII[1], 0])
    for th in theta:
        for ph in phi:
            V.append(CENTRE + RADII * [np.sin(th) * np.sin(ph), np.cos(th), np.sin(th) * np.cos(ph)])
    bottom = len(V)
    V.append(CENTRE - [0, RADII[1], 0])
    faces = []
    uv = []
    uvf = []

    def uvid(u, v):
        uv.append([u, v])
        return len(uv) - 1

    grid_uv = {}
    for i in range(R_RINGS):
        for j in range(C_COLS + 1):
            grid_uv[i, j] = uvid(0.02 + 0.66 * j / C_COLS, 0.97 - 0.94 * i / (R_RINGS - 1))
    top_uv, bot_uv = uvid(0.35, 0.995), uvid(0.35, 0.005)
    for j in range(C_COLS):
        faces.append([0, _grid_index(0, j + 1), _grid_index(0, j)])
        uvf.append([top_uv, grid_uv[0, j + 1], grid_uv[0, j]])
        i = R_RINGS - 1
        faces.append([bottom, _grid_index(i, j), _grid_index(i, j + 1)])
        uvf.append([bot_uv, grid_uv[i, j], grid_uv[i, j + 1]])
    mouth_cols = {c % C_COLS for c in range(-MOUTH_HALF, MOUTH_HALF + 1)}
    for i in range(R_RINGS - 1):
        for j in range(C_COLS):
            if i == MOUTH_RING and j in mouth_cols:
                continue
            a, b, c, d = _grid_index(i, j), _grid_index(i, j + 1), _grid_index(i + 1, j + 1), _grid_index(i + 1, j)
            ta, tb, tc, td = grid_uv[i, j], grid_uv[i, j + 1], grid_uv[i + 1, j + 1], grid_uv[i + 1, j]
            faces += [[a, c, b], [a, d, c]]
            uvf += [[ta, tc, tb], [ta, td, tc]]
    eye_verts = []
    for e, (c0, u0) in enumerate(zip(EYE_CENTRES, (0.72, 0.72))):
        start = len(V)
        v0 = 0.05 + 0.25 * e
        V.append(c0 + [0, EYE_RADIUS, 0])
        th_e = np.linspace(0.6, np.pi - 0.6, EYE_RINGS)
        ph_e = 2 * np.pi * np.arange(EYE_COLS) / EYE_COLS
        for th in th_e:
            for ph in ph_e:
                V.append(c0 + EYE_RADIUS * np.array([np.sin(th) * np.sin(ph), np.cos(th), np.sin(th) * np.cos(ph)]))
        V.append(c0 - [0, EYE_RADIUS, 0])
        end = len(V)
        eye_verts.append(np.arange(start, end))
        gi = lambda i, j: start + 1 + i * EYE_COLS + (j % EYE_COLS)  # noqa: E731
        guv = {(i, j): uvid(u0 + 0.14 * j / EYE_COLS, v0 + 0.2 - 0.2 * i / (EYE_RINGS - 1)) for i in range(EYE_RINGS) for j in range(EYE_COLS + 1)}
        tp, bp = uvid(u0 + 0.07, v0 + 0.21), uvid(u0 + 0.07, v0 - 0.01)
        for j in range(EYE_COLS):
            faces.append([start, gi(0, j + 1), gi(0, j)])
            uvf.append([tp, guv[0, j + 1], guv[0, j]])
            faces.append([end - 1, gi(EYE_RINGS - 1, j), gi(EYE_RINGS - 1, j + 1)])
            uvf.append([bp, guv[EYE_RINGS - 1, j], guv[EYE_RINGS - 1, j + 1]])
            for i in range(EYE_RINGS - 1):
                a, b, c, d = gi(i, j), gi(i, j + 1), gi(i + 1, j + 1), gi(i + 1, j)
                faces += [[a, c, b], [a, d, c]]
                uvf += [[guv[i, j], guv[i + 1, j + 1], guv[i, j + 1]], [guv[i, j], guv[i + 1, j], guv[i + 1, j + 1]]]
    isolated = np.arange(len(V), V_FLAME)
    for k in isolated:  # unreferenced points inside the mouth
        V.append(CENTRE + [0.01 * ((k % 5) - 2), -0.03, 0.05])
    V = np.asarray(V, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    uvf = np.asarray(uvf, dtype=np.int64)
    uv = np.asarray(uv, dtype=np.float64)
    assert V.shape == (V_FLAME, 3) and faces.shape == (F_FLAME, 3), (V.shape, faces.shape)
    # outward winding (normals point away from the part's centre)
    cen = np.where(np.isin(faces[:, :1], np.concatenate(eye_verts)), 0, 1)
    centres = np.where(cen, CENTRE[None], np.where(np.isin(faces[:, :1], eye_verts[0]), EYE_CENTRES[0], EYE_CENTRES[1]))
    p = V[faces]
    n = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    flip = (n * (p.mean(1) - centres)).sum(1) < 0
    faces[flip] = faces[flip][:, [0, 2, 1]]
    uvf[flip] = uvf[flip][:, [0, 2, 1]]

    # the mouth loop, in the boundary direction of its faces, and its closing faces (as FlameMesh.obj)
    loop = [_grid_index(MOUTH_RING, j) for j in range(-MOUTH_HALF, MOUTH_HALF + 2)] + [
        _grid_index(MOUTH_RING + 1, j) for j in range(MOUTH_HALF + 1, -MOUTH_HALF - 1, -1)
    ]
    loop = np.asarray(loop)
    e = set(map(tuple, np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).tolist()))
    if (loop[0], loop[1]) not in e:
        loop = loop[::-1].copy()
        loop = np.roll(loop, 1)
    assert all((loop[k], loop[(k + 1) % len(loop)]) in e for k in range(len(loop)))
    mouth_faces = np.stack([np.full(30, loop[0]), loop[2:], loop[1:-1]], 1)
    ang = 2 * np.pi * np.arange(32) / 32
    mouth_uv = np.stack([0.85 + 0.05 * np.cos(ang), 0.8 + 0.05 * np.sin(ang)], 1)
    mouth_uvf = len(uv) + np.stack([np.zeros(30, int), np.arange(2, 32), np.arange(1, 31)], 1)

    # regions (FLAME_masks.pkl keys)
    ring = np.full(V_FLAME, -1)
    col = np.full(V_FLAME, -1)
    for i in range(R_RINGS):
        for j in range(C_COLS):
            ring[_grid_index(i, j)] = i
            col[_grid_index(i, j)] = j
    head = ring >= 0
    dcol = np.minimum(col, C_COLS - col)  # distance from the front column
    front = head & (dcol <= C_COLS // 5)
    masks = {
        "face": np.nonzero(front & (ring > 12) & (ring < 62))[0],
        "lips": np.nonzero(head & (np.abs(ring - MOUTH_RING - 0.5) <= 2.5) & (dcol <= MOUTH_HALF + 2))[0],
        "left_eyeball": eye_verts[0],
        "right_eyeball": eye_verts[1],
        "scalp": np.concatenate([[0], np.nonzero(head & (ring < 14))[0]]),
        "neck": np.concatenate([np.nonzero(head & (ring > 62))[0], [bottom]]),
        "boundary": np.concatenate([np.nonzero(head & (ring >= R_RINGS - 2))[0], [bottom]]),
        "forehead": np.nonzero(front & (ring > 12) & (ring < 24))[0],
        "nose": np.nonzero(head & (dcol <= 2) & (ring > 34) & (ring < 42))[0],
        "eye_region": np.nonzero(front & (ring > 26) & (ring < 34))[0],
        "left_ear": np.nonzero(head & (np.abs(col - C_COLS // 4) <= 2) & (ring > 30) & (ring < 40))[0],
        "right_ear": np.nonzero(head & (np.abs(col - 3 * C_COLS // 4) <= 2) & (ring > 30) & (ring < 40))[0],
    }

    # joints: global and neck at the bottom, jaw inside the head behind the mouth, eyes at the eyeball centres
    Jreg = np.zeros((5, V_FLAME))
    Jreg[0, np.nonzero(head & (ring == R_RINGS - 1))[0]] = 1
    Jreg[1, np.nonzero(head & (ring == 60))[0]] = 1
    jaw_src = np.nonzero(head & (ring == MOUTH_RING - 6) & ((col == C_COLS // 4) | (col == 3 * C_COLS // 4)))[0]
    Jreg[2, jaw_src] = 1
    Jreg[3, eye_verts[0]] = 1
    Jreg[4, eye_verts[1]] = 1
    Jreg /= Jreg.sum(1, keepdims=True)

    W = np.zeros((V_FLAME, 5))
    jaw_w = np.clip((ring - MOUTH_RING) / 4.0, 0, 1) * np.clip(1 - (dcol - 10) / 6.0, 0, 1) * (ring < 62)
    neck_w = np.clip((ring - 58) / 10.0, 0, 1)
    W[:, 2] = np.where(head, jaw_w, 0)
    W[:, 0] = np.where(head, neck_w * 0.5, 0)
    W[:, 1] = np.where(head, 1 - W[:, 2] - W[:, 0], 0)
    W[eye_verts[0], 3] = 1
    W[eye_verts[1], 4] = 1
    W[bottom] = [0.5, 0.5, 0, 0, 0]
    W[0] = [0, 1, 0, 0, 0]
    W[isolated, 2] = 1
    assert np.allclose(W.sum(1), 1)

    shapedirs = rng.normal(0, 1e-3, (V_FLAME, 3, 400))
    posedirs = rng.normal(0, 2e-4, (V_FLAME, 3, 36))
    kintree = np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)

    # 68 landmarks on front faces, deterministic
    fc = V[faces].mean(1)
    frontal = np.nonzero((fc[:, 2] > 0.05) & (np.abs(fc[:, 0]) < 0.05) & np.isin(faces[:, 0], np.nonzero(head)[0]))[0]
    lmk_faces = rng.choice(frontal, 68, replace=False)
    b = rng.uniform(0.1, 1.0, (68, 3))
    lmk_bary = b / b.sum(1, keepdims=True)

    eyelid_l = np.zeros((V_FLAME, 3))
    eyelid_r = np.zeros((V_FLAME, 3))
    near_l = np.linalg.norm(V - EYE_CENTRES[0], axis=1) < 0.03
    near_r = np.linalg.norm(V - EYE_CENTRES[1], axis=1) < 0.03
    eyelid_l[near_l & head, 1] = -0.004
    eyelid_r[near_r & head, 1] = -0.004
    return {
        "v_template": V, "f": faces, "uvs": uv, "uv_faces": uvf, "shapedirs": shapedirs, "posedirs": posedirs,
        "J_regressor": Jreg, "weights": W, "kintree_table": kintree, "masks": masks,
        "mouth_loop": loop, "mouth_faces": mouth_faces, "mouth_uvs": mouth_uv, "mouth_uv_faces": mouth_uvf,
        "lmk_faces": lmk_faces, "lmk_bary": lmk_bary, "l_eyelid": eyelid_l, "r_eyelid": eyelid_r,
        "eye_verts": eye_verts, "isolated": isolated,
    }


# ------------------------------------------------------------------ writers
@contextlib.contextmanager
def fake_chumpy():
    """A stand-in ``chumpy.ch.Ch`` so that pickles reference chumpy as FLAME's do; removed afterwards."""
    pkg = types.ModuleType("chumpy")
    mod = types.ModuleType("chumpy.ch")

    class Ch:
        # chumpy pickles __dict__ minus its weak references: the value lives in 'x'
        def __init__(self, x):
            self.x = np.asarray(x)
            self._dirty_vars = set()
            self._itr = None
            self._depends_on_deps = {}
            self._make_dense = False
            self._make_sparse = False

        def __getstate__(self):
            return dict(self.__dict__)

    Ch.__module__ = "chumpy.ch"
    Ch.__qualname__ = "Ch"
    mod.Ch = Ch
    pkg.ch = mod
    saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch")}
    sys.modules["chumpy"] = pkg
    sys.modules["chumpy.ch"] = mod
    try:
        yield Ch
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 str records (BINSTRING), as FLAME's Python 2 pickles hold array data."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_bytes_py2(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + n.to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_bytes_py2


def _dumps_py2(obj) -> bytes:
    import io

    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _py2_style(blob: bytes) -> bytes:
    """Rename numpy 2 / new scipy globals to the names a Python 2 pickle of FLAME carries."""
    return (
        blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        .replace(b"cscipy.sparse._csc\n", b"cscipy.sparse.csc\n")
    )


def write_generic_model(path: Path, fake: dict, chumpy: bool = True, protocol: int = 2, **override) -> None:
    import scipy.sparse as sp

    d = {
        "v_template": fake["v_template"], "f": fake["f"].astype(np.uint32), "shapedirs": fake["shapedirs"],
        "posedirs": fake["posedirs"], "J_regressor": sp.csc_matrix(fake["J_regressor"]), "weights": fake["weights"],
        "kintree_table": fake["kintree_table"], "J": fake["J_regressor"] @ fake["v_template"], "bs_style": "lbs", "bs_type": "lrotmin",
    }
    d.update(override)
    if chumpy:
        with fake_chumpy() as Ch:
            d["shapedirs"] = Ch(d["shapedirs"])
            d["v_template"] = Ch(d["v_template"])
            blob = _dumps_py2(d) if protocol == 2 else pickle.dumps(d, protocol=protocol)
    else:
        blob = _dumps_py2(d) if protocol == 2 else pickle.dumps(d, protocol=protocol)
    Path(path).write_bytes(_py2_style(blob) if protocol <= 2 else blob)


def write_obj(path: Path, V, faces, uvs, uv_faces) -> None:
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in V]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in uvs]
    lines += ["f " + " ".join(f"{a + 1}/{t + 1}" for a, t in zip(f, tf)) for f, tf in zip(faces, uv_faces)]
    Path(path).write_text("\n".join(lines) + "\n")


def write_flame_dir(root: Path, fake: dict | None = None, seed: int = 0, template: str = "flamemesh", landmarks: bool = True,
                    eyelids: bool = True, eyelids_subdir: str = "") -> dict:
    """A FLAME folder as users have it. template: flamemesh | head_template | both."""
    fake = fake or make_fake_flame(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_generic_model(root / "generic_model.pkl", fake)
    with open(root / "FLAME_masks.pkl", "wb") as f:
        pickle.dump({k: v.astype(np.int64) for k, v in fake["masks"].items()}, f, protocol=2)
    if template in ("head_template", "both"):
        # FLAME's own template: face order shuffled and corners rotated, to exercise the matching
        rng = np.random.default_rng(1)
        perm = rng.permutation(F_FLAME)
        rot = rng.integers(0, 3, F_FLAME)
        f = np.stack([np.roll(fake["f"][k], r) for k, r in zip(perm, rot[perm])])
        tf = np.stack([np.roll(fake["uv_faces"][k], r) for k, r in zip(perm, rot[perm])])
        write_obj(root / "head_template_mesh.obj", fake["v_template"], f, fake["uvs"], tf)
    if template in ("flamemesh", "both"):
        write_obj(
            root / "FlameMesh.obj", fake["v_template"], np.concatenate([fake["f"], fake["mouth_faces"]]),
            np.concatenate([fake["uvs"], fake["mouth_uvs"]]), np.concatenate([fake["uv_faces"], fake["mouth_uv_faces"]]),
        )
    if landmarks:
        write_landmark_embedding(root / "landmark_embedding.npy", fake)
    if eyelids:
        d = root / eyelids_subdir if eyelids_subdir else root
        d.mkdir(exist_ok=True)
        np.save(d / "l_eyelid.npy", fake["l_eyelid"])
        np.save(d / "r_eyelid.npy", fake["r_eyelid"])
    return fake


def write_landmark_embedding(path: Path, fake: dict, full: bool = True) -> None:
    """DECA's layout: a pickled dict in an .npy, the dynamic contour as torch tensors."""
    import torch

    fi, bc = fake["lmk_faces"], fake["lmk_bary"]
    dyn_f = np.tile(fi[:17], (79, 1))
    dyn_b = np.tile(bc[:17], (79, 1, 1))
    d = {
        "static_lmk_faces_idx": fi[17:].astype(np.int64), "static_lmk_bary_coords": bc[17:],
        "dynamic_lmk_faces_idx": torch.from_numpy(dyn_f).long(), "dynamic_lmk_bary_coords": torch.from_numpy(dyn_b).float(),
    }
    if full:
        d["full_lmk_faces_idx"] = fi[None].astype(np.int64)
        d["full_lmk_bary_coords"] = bc[None]
    np.save(path, np.array(d, dtype=object), allow_pickle=True)


# ------------------------------------------------------------- reference FLAME
def rodrigues(aa: np.ndarray) -> np.ndarray:
    th = np.linalg.norm(aa)
    if th < 1e-12:
        return np.eye(3)
    k = aa / th
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(th) * K + (1 - np.cos(th)) * K @ K


def reference_flame(fake: dict, shape, expr, pose_aa, eyelids=None, scale: float = 1.0) -> np.ndarray:
    """FLAME as published (SMPL-style LBS; joints regressed from the shape+expression mesh), in numpy.

    shape [<=300], expr [<=100], pose_aa [5,3] axis-angle; returns [V,3] (times ``scale``).
    """
    sd = fake["shapedirs"]
    v = fake["v_template"] + sd[:, :, : len(shape)] @ shape + sd[:, :, 300 : 300 + len(expr)] @ expr
    J = fake["J_regressor"] @ v
    Rs = [rodrigues(p) for p in pose_aa]
    feat = np.concatenate([(R - np.eye(3)).ravel() for R in Rs[1:]])
    v = v + (fake["posedirs"].reshape(-1, 36) @ feat).reshape(-1, 3)
    parents = [-1, 0, 1, 1, 1]
    G = []
    for j in range(5):
        T = np.eye(4)
        T[:3, :3] = Rs[j]
        T[:3, 3] = J[j] - (J[parents[j]] if j else 0)
        G.append(T if j == 0 else G[parents[j]] @ T)
    A = []
    for j in range(5):
        T = G[j].copy()
        T[:3, 3] -= T[:3, :3] @ J[j]
        A.append(T)
    A = np.stack(A)
    T = np.einsum("vj,jab->vab", fake["weights"], A)
    out = np.einsum("vab,vb->va", T[:, :3, :3], v) + T[:, :3, 3]
    if eyelids is not None:
        out = out + fake["l_eyelid"] * eyelids[0] + fake["r_eyelid"] * eyelids[1]
    return out * scale


def reference_landmarks(fake: dict, verts: np.ndarray) -> np.ndarray:
    tri = fake["f"][fake["lmk_faces"]]
    return (verts[tri] * fake["lmk_bary"][:, :, None]).sum(1)


# ------------------------------------------------------------------ images
def _blob_images(H, W, k, seed=0):
    """A frame: smooth colours, a head ellipse (alpha), a neck-head mask and a mouth mask."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    cx, cy = W / 2 + 2 * np.sin(k), H / 2
    img = np.stack([128 + 60 * np.sin(xx / 5 + k), 128 + 60 * np.cos(yy / 7), 100 + 0 * xx], -1).astype(np.uint8)
    head = ((xx - cx) / (0.3 * W)) ** 2 + ((yy - cy) / (0.4 * H)) ** 2 < 1
    body = head | (yy > 0.8 * H)
    mouth = ((xx - cx) / (0.08 * W)) ** 2 + ((yy - cy - 0.15 * H) / (0.04 * H)) ** 2 < 1
    return img, (body * 255).astype(np.uint8), (head * 255).astype(np.uint8), (mouth * 255).astype(np.uint8)


def random_rotation(rng, max_angle=0.3):
    aa = rng.normal(size=3)
    aa = aa / np.linalg.norm(aa) * rng.uniform(0, max_angle)
    return rodrigues(aa)


def matrix_to_6d_rows(R):
    return R[:2, :].reshape(6)


def write_flashavatar(root: Path, n_frames: int = 6, size=(48, 40), offset: int = 1, n_images: int | None = None,
                      seed: int = 0, tracker_inputs: bool = False, unnormalised_6d: bool = True) -> dict:
    """dataset/<id>/{imgs,alpha,parsing} + metrical-tracker output/<id>/checkpoint/*.frame.

    ``offset``: image number of .frame 0 (1 for begin_frames: 0).  ``n_images`` defaults to
    n_frames + offset - 1 (every tracked frame has its image).
    """
    import torch
    from PIL import Image

    rng = np.random.default_rng(seed)
    H, W = size
    root = Path(root)
    ds = root / "dataset" / "subj"
    ck = root / "tracker" / "subj" / "checkpoint"
    for d in (ds / "imgs", ds / "alpha", ds / "parsing", ck):
        d.mkdir(parents=True, exist_ok=True)
    n_images = n_frames + offset - 1 if n_images is None else n_images
    for k in range(1, n_images + 1):
        img, alpha, head, mouth = _blob_images(H, W, k)
        Image.fromarray(img).save(ds / "imgs" / f"{k:05d}.jpg", quality=95)
        Image.fromarray(alpha).save(ds / "alpha" / f"{k:05d}.jpg", quality=95)
        Image.fromarray(head).save(ds / "parsing" / f"{k:05d}_neckhead.png")
        Image.fromarray(mouth).save(ds / "parsing" / f"{k:05d}_mouth.png")
    shape = rng.normal(0, 0.5, (1, 300)).astype(np.float32)
    fx, fy = 2.2 * W, 2.25 * W
    cx, cy = W / 2 + 1.3, H / 2 - 0.7  # the tracker's principal point is small but not zero
    K = np.array([[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]], dtype=np.float32)
    frames = []
    for k in range(n_frames):
        Rh = random_rotation(rng, 0.2)
        # camera at about 1 m in front of the head (metrical-tracker's look_at dist=1) times head motion
        R = (np.diag([1.0, -1.0, -1.0]) @ Rh).astype(np.float32)
        t = np.array([rng.normal(0, 0.01), rng.normal(0, 0.01), 1.0 + rng.normal(0, 0.02)], dtype=np.float32)
        jaw = rodrigues(np.array([abs(rng.normal(0, 0.1)), 0, 0]))
        eyes = [rodrigues(rng.normal(0, 0.05, 3)) for _ in range(2)]
        jaw6 = matrix_to_6d_rows(jaw) * (1.05 if unnormalised_6d else 1.0)  # free 6D parameters are not normalised
        eyes6 = np.concatenate([matrix_to_6d_rows(e) for e in eyes])
        fr = {
            "flame": {
                "exp": rng.normal(0, 0.5, (1, 100)).astype(np.float32),
                "shape": shape,
                "tex": rng.normal(0, 1, (1, 50)).astype(np.float32),
                "sh": rng.normal(0, 1, (1, 9, 3)).astype(np.float32),
                "eyes": eyes6[None].astype(np.float32),
                "eyelids": rng.uniform(0, 0.5, (1, 2)).astype(np.float32),
                "jaw": jaw6[None].astype(np.float32),
            },
            "camera": {
                "R": rng.normal(size=(1, 6)).astype(np.float32), "t": t[None],
                "fl": np.array([[fx / (W / 2)]], np.float32), "pp": np.zeros((1, 2), np.float32),
            },
            "opencv": {"R": R[None], "t": t[None], "K": K},
            "img_size": np.array([H, W]),
            "frame_id": f"{k:05d}",
            "global_step": 100 * k,
        }
        torch.save(fr, ck / f"{k:05d}.frame")
        frames.append(fr)
        if tracker_inputs:
            (root / "tracker" / "subj" / "input").mkdir(exist_ok=True)
            img, *_ = _blob_images(H, W, k + offset)
            Image.fromarray(img).save(root / "tracker" / "subj" / "input" / f"{k:05d}.png")
    return {"dataset": ds, "tracker": ck, "frames": frames, "K": K[0], "size": (H, W)}


# ------------------------------------------------------------------ IMavatar
def imavatar_project(X4: np.ndarray, intr, world_mat) -> np.ndarray:
    """IMavatar's projection (preprocess/optimize.py), written out: ×4 world points -> [-1,1] keypoints."""
    i0, i1, i2, i3 = intr
    Pc = X4 @ np.asarray(world_mat)[:3, :3].T + np.asarray(world_mat)[:3, 3]
    x, y = Pc[:, 0] / Pc[:, 2], Pc[:, 1] / Pc[:, 2]
    # the stored intrinsics are normalised by the image size; the fit used 2*(.)/S and 2*c/S - 1
    return np.stack([x * 2 * i0 + (2 * i2 - 1), y * 2 * i1 + (2 * i3 - 1)], 1)


def write_imavatar_sequence(root: Path, name: str, fake: dict, n_frames: int = 4, size: int = 32, seed: int = 0,
                            shape=None, consistent: bool = True, n_keypoints: int = 68, drop_key: str | None = None,
                            rotate_world: bool = False) -> dict:
    """<root>/<name>/{image,mask,semantic}/<k>.png (1-indexed) + flame_params.json, keypoints by IMavatar's chain."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    seq = Path(root) / name
    for d in ("image", "mask", "semantic"):
        (seq / d).mkdir(parents=True, exist_ok=True)
    S = size
    fx, fy, cx, cy = 1500 / 512 * S, 1500 / 512 * S, S / 2 + 0.4, S / 2 - 0.3
    intr = [-fx / S, fy / S, cx / S, cy / S]
    shape = rng.normal(0, 0.5, 100) if shape is None else np.asarray(shape)
    frames = []
    for k in range(1, n_frames + 1):
        img, alpha, head, mouth = _blob_images(S, S, k)
        Image.fromarray(img).save(seq / "image" / f"{k}.png")
        Image.fromarray(alpha).save(seq / "mask" / f"{k}.png")
        sem = np.where(head > 0, 1, np.where(alpha > 0, 16, 0)).astype(np.uint8)
        sem[mouth > 0] = 11
        sem[0, :4] = [17, 12, 4, 14]  # a few other classes
        Image.fromarray(sem).save(seq / "semantic" / f"{k}.png")
        expr = rng.normal(0, 0.5, 50)
        pose = np.zeros(15)
        pose[:3] = rng.normal(0, 0.15, 3)  # global head rotation lives in FLAME's pose here
        pose[3:6] = rng.normal(0, 0.05, 3)
        pose[6] = abs(rng.normal(0, 0.15))
        pose[9:15] = rng.normal(0, 0.05, 6)
        wm = np.concatenate([np.eye(3), np.array([[rng.normal(0, 0.01)], [rng.normal(0, 0.01)], [-4.0]])], 1)
        if rotate_world:
            # a general rotation (IMavatar's own files have R = I): camera orbiting the head
            R = random_rotation(rng, 0.3)
            wm = np.concatenate([R, wm[:, 3:]], 1)
        verts4 = reference_flame(fake, shape, expr, pose.reshape(5, 3), scale=4.0)
        kp = imavatar_project(reference_landmarks(fake, verts4), intr, wm)
        if not consistent:
            kp = kp + rng.normal(0, 0.1, kp.shape)
        if n_keypoints == 70:
            kp = np.concatenate([kp, rng.uniform(-0.2, 0.2, (2, 2))])
        fr = {"file_path": f"./image/{k}", "world_mat": wm.tolist(), "expression": expr.tolist(), "pose": pose.tolist(),
              "bbox": [0, 0, 1, 1], "flame_keypoints": kp.tolist()}
        if drop_key:
            fr.pop(drop_key, None)
        frames.append(fr)
    js = {"frames": frames, "intrinsics": intr, "shape_params": list(map(float, shape))}
    (seq / "flame_params.json").write_text(json.dumps(js))
    return {"path": seq, "json": js, "intrinsics": intr, "shape": shape, "size": S}


# ------------------------------------------------------------------ pytest helpers
def shared_flame_dir(tmp_path_factory, name: str = "flame", **kw) -> tuple[Path, dict]:
    """A FLAME folder built once per test process (the model pickle is ~50 MB): reused across modules."""
    base = tmp_path_factory.getbasetemp() / f"shared_{name}"
    fake = _FAKE_CACHE.get(0)
    if fake is None:
        fake = _FAKE_CACHE[0] = make_fake_flame(0)
    if not (base / ".done").exists():
        write_flame_dir(base, fake, **kw)
        (base / ".done").write_text("ok")
    return base, fake


_FAKE_CACHE: dict = {}
