"""Convert an ICT-FaceKit checkout (its FaceXModel/ OBJ folder) into one npz.

The npz is what ``headavatar.headmodels.ict`` reads (and what
headavatar/assets/ict-facekit/ict_facekit_light.npz, shipped in the package, holds):

    vertices           [V,3]   float32  neutral mesh, centimetres, as in the OBJ
    uvs                [T,2]   float32  OBJ texture coordinates
    faces              [F,D]   int32    polygon vertex indices, 0-based, -1 padded (D >= 4)
    face_uvs           [F,D]   int32    matching texture-coordinate indices
    expression_names   [E]     str      in vertex_indices.json order
    expression_deltas  [E,V,3] float16  expression OBJ minus neutral, centimetres
    identity_deltas    [S,V,3] float16  identity mode OBJ minus neutral, centimetres
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np

from headavatar.errors import UserError
from headavatar.headmodels.obj import read_obj, read_obj_vertices
from headavatar.utils.io import atomic_path, read_json

NEUTRAL = "generic_neutral_mesh.obj"
INDEX_JSON = "vertex_indices.json"
IDENTITY_RE = re.compile(r"^identity(\d+)\.obj$")
EXPECTED_IDENTITIES = 100


def _model_folder(src: Path) -> Path:
    """Accept the checkout's root or its FaceXModel folder."""
    if not src.exists():
        raise UserError(f"{src} does not exist; pass your ICT-FaceKit checkout (or its FaceXModel folder)")
    if not src.is_dir():
        raise UserError(f"{src} is not a folder; pass your ICT-FaceKit checkout (or its FaceXModel folder)")
    for cand in (src, src / "FaceXModel"):
        if (cand / NEUTRAL).is_file():
            return cand
    raise UserError(f"{src} has no {NEUTRAL} (nor FaceXModel/{NEUTRAL}): it is not an ICT-FaceKit checkout")


def convert_ict_folder(src_dir: str | os.PathLike, out_npz: str | os.PathLike, progress: bool = True) -> dict:
    """Read an ICT-FaceKit FaceXModel folder and write ``out_npz`` (atomically).

    Returns a summary dict (vertices, polygons, expressions, identities, path).
    Fewer than 100 identity files is allowed (with a warning); a missing
    expression file named in vertex_indices.json is an error.
    """
    out = Path(out_npz).expanduser()
    if out.is_dir():
        raise UserError(f"{out} is a folder; give a file name for the npz, e.g. {out / 'ict_facekit_light.npz'}")
    if out.suffix != ".npz":
        raise UserError(f"output {out} must end in .npz")
    folder = _model_folder(Path(src_dir).expanduser())
    index_path = folder / INDEX_JSON
    if not index_path.is_file():
        raise UserError(f"{folder} has no {INDEX_JSON}; it names the expression shapes (FaceXModel/{INDEX_JSON} in ICT-FaceKit)")
    index = read_json(index_path)
    names = index.get("expressions") if isinstance(index, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"{index_path} has no 'expressions' list of names; use the file from ICT-FaceKit's FaceXModel folder")
    missing = [n for n in names if not (folder / f"{n}.obj").is_file()]
    if missing:
        raise UserError(f"{folder} lacks {len(missing)} expression OBJ file(s) named in {INDEX_JSON} (e.g. {missing[0]}.obj); the checkout is incomplete")

    ident = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := IDENTITY_RE.match(p.name)))
    numbers = [k for k, _ in ident]
    if numbers != list(range(len(numbers))):
        raise UserError(f"identity files in {folder} must be numbered from identity000 without gaps (found {numbers[:5]}...)")
    if len(ident) < EXPECTED_IDENTITIES:
        warnings.warn(f"{folder} has {len(ident)} identity files, not {EXPECTED_IDENTITIES}: the model will have {len(ident)} identity modes", stacklevel=2)

    vertices, uvs, polys, puvs = read_obj(folder / NEUTRAL)
    if polys.shape[0] == 0:
        raise UserError(f"{folder / NEUTRAL} has no faces")
    V = len(vertices)
    D = max(polys.shape[1], 4)  # quads with -1 for triangles, as the shared file
    pad = lambda a: np.pad(a, ((0, 0), (0, D - a.shape[1])), constant_values=-1).astype(np.int32)  # noqa: E731

    files = [("expression", folder / f"{n}.obj") for n in names] + [("identity", p) for _, p in ident]
    deltas = {"expression": [], "identity": []}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc="ICT-FaceKit OBJ files", unit="file")
    for kind, path in files:
        v = read_obj_vertices(path)
        if v.shape != (V, 3):
            raise UserError(f"{path} has {len(v)} vertices, but {NEUTRAL} has {V}; all OBJ files must share one topology")
        deltas[kind].append((v - vertices).astype(np.float16))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    empty = np.zeros((0, V, 3), np.float16)
    arrays = {
        "vertices": vertices.astype(np.float32),
        "uvs": uvs.astype(np.float32),
        "faces": pad(polys),
        "face_uvs": pad(puvs),
        "expression_names": np.array(names),
        "expression_deltas": np.stack(deltas["expression"]),
        "identity_deltas": np.stack(deltas["identity"]) if deltas["identity"] else empty,
    }
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return {"path": str(out), "vertices": V, "polygons": int(len(polys)), "expressions": len(names), "identities": len(ident)}
