"""A small Wavefront OBJ reader for head-model assets (positions, UVs, polygons).

Only what head models need: ``v``, ``vt`` and ``f`` records; normals,
groups, materials and smoothing groups are ignored.  Polygons of any degree
are kept as rows padded with -1 so quads and triangles share one array.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from headavatar.errors import UserError


def _read_lines(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"OBJ file {path} does not exist")
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise UserError(f"cannot read OBJ file {path} ({e})") from None


def _floats(rows: list[str], width: int, path, what: str) -> np.ndarray:
    if not rows:
        return np.zeros((0, width), np.float64)
    try:
        # Records may carry extra components (vertex colours, vt w); keep the first ``width``.
        return np.array([r.split()[:width] for r in rows], dtype=np.float64).reshape(-1, width)
    except ValueError:
        raise UserError(f"{path}: malformed '{what}' record in OBJ file") from None


def read_obj_vertices(path: str | os.PathLike) -> np.ndarray:
    """Only the ``v`` positions [V,3] float64 (fast path for blendshape targets)."""
    rows = [ln[2:] for ln in _read_lines(path) if ln.startswith("v ")]
    v = _floats(rows, 3, path, "v")
    if len(v) == 0:
        raise UserError(f"{path} has no vertices: it is not a mesh OBJ file")
    return v


def read_obj(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read an OBJ file.

    Returns ``vertices`` [V,3] float64, ``uvs`` [T,2] float64 (empty if the file
    has none), ``polygons`` [F,D] int64 0-based vertex indices padded with -1,
    and ``polygon_uvs`` [F,D] int64 matching ``vt`` indices (-1 where absent).
    """
    v_rows: list[str] = []
    vt_rows: list[str] = []
    f_rows: list[list[str]] = []
    for ln in _read_lines(path):
        if ln.startswith("v "):
            v_rows.append(ln[2:])
        elif ln.startswith("vt "):
            vt_rows.append(ln[3:])
        elif ln.startswith("f "):
            f_rows.append(ln[2:].split())
    vertices = _floats(v_rows, 3, path, "v")
    uvs = _floats(vt_rows, 2, path, "vt")
    if len(vertices) == 0:
        raise UserError(f"{path} has no vertices: it is not a mesh OBJ file")
    D = max((len(f) for f in f_rows), default=3)
    polys = np.full((len(f_rows), D), -1, np.int64)
    puvs = np.full((len(f_rows), D), -1, np.int64)
    nv, nt = len(vertices), len(uvs)
    try:
        for i, toks in enumerate(f_rows):
            if len(toks) < 3:
                raise UserError(f"{path}: face {i + 1} has fewer than 3 vertices")
            for k, tok in enumerate(toks):
                parts = tok.split("/")
                vi = int(parts[0])
                # OBJ indices are 1-based; negative ones count back from the latest record.
                polys[i, k] = vi - 1 if vi > 0 else nv + vi
                if len(parts) > 1 and parts[1]:
                    ti = int(parts[1])
                    puvs[i, k] = ti - 1 if ti > 0 else nt + ti
    except ValueError:
        raise UserError(f"{path}: malformed 'f' record in OBJ file") from None
    if len(polys) and (polys.max() >= nv or polys[polys != -1].min() < 0):
        raise UserError(f"{path}: a face refers to a vertex that does not exist")
    if len(puvs) and (puvs.max() >= max(nt, 1) or (puvs < -1).any()):
        raise UserError(f"{path}: a face refers to a texture coordinate that does not exist")
    return vertices, uvs, polys, puvs


def triangulate(polygons: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fan-triangulate -1 padded polygons [F,D] -> (triangles [T,3], source polygon [T]).

    Quads (a,b,c,d) always split along the a-c diagonal, so applying this to
    the vertex and UV index arrays gives matching triangles.
    """
    polygons = np.asarray(polygons)
    deg = (polygons >= 0).sum(1)
    tris, src = [], []
    for k in range(1, polygons.shape[1] - 1):
        sel = deg > k + 1
        tris.append(np.stack([polygons[sel, 0], polygons[sel, k], polygons[sel, k + 1]], 1))
        src.append(np.nonzero(sel)[0])
    if not tris:
        return np.zeros((0, 3), np.int64), np.zeros(0, np.int64)
    tris_a, src_a = np.concatenate(tris), np.concatenate(src)
    # Keep triangles of one polygon next to each other (stable order by source polygon).
    order = np.argsort(src_a, kind="stable")
    return tris_a[order].astype(np.int64), src_a[order].astype(np.int64)
