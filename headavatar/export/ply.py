"""Gaussians in the standard 3D Gaussian Splatting .ply layout.

One binary little-endian ``vertex`` element, float32 properties in this order
(the order of the Inria reference's ``save_ply``, which splat viewers and
engine plug-ins read):

    x y z  nx ny nz  f_dc_0..2  f_rest_0..44  opacity  scale_0..2  rot_0..3

* ``f_dc`` is SH coefficient 0 per channel; ``f_rest`` are coefficients 1..15,
  stored channel-major (the 15 of R, then the 15 of G, then of B).  A model of
  lower SH degree is padded with zeros: the standard file is always degree 3.
* ``opacity`` is the logit of the opacity, ``scale_*`` the log of the standard
  deviations, ``rot_*`` a unit quaternion (w, x, y, z); normals are zero.
* Coordinates are headavatar's world space (metres, +y up, the face looking
  towards +z; docs/CONVENTIONS.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from headavatar.errors import UserError
from headavatar.export.files import write_file, write_json_file

SH_COEFFS = 16  # degree 3
PROPERTIES = (
    ["x", "y", "z", "nx", "ny", "nz"]
    + [f"f_dc_{i}" for i in range(3)]
    + [f"f_rest_{i}" for i in range(3 * (SH_COEFFS - 1))]
    + ["opacity"]
    + [f"scale_{i}" for i in range(3)]
    + [f"rot_{i}" for i in range(4)]
)
_EPS = 1e-7


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def gaussians_to_table(means, quats, scales, opacities, sh) -> np.ndarray:
    """Activated Gaussians (as the renderer takes them, one frame) -> [N, 62] float32 rows in PROPERTIES order.

    means [N,3]; quats [N,4] wxyz, any norm; scales [N,3] linear; opacities [N] in [0,1];
    sh [N,K,3] with K <= 16 (coefficient 0 first).
    """
    means, quats, scales, opac, sh = _np(means), _np(quats), _np(scales), _np(opacities).reshape(-1), _np(sh)
    n = means.shape[0]
    if sh.ndim != 3 or sh.shape[2] != 3 or sh.shape[1] > SH_COEFFS:
        raise ValueError(f"SH coefficients must be [N,K<=16,3], got {sh.shape}")
    for name, a, shp in (("quats", quats, (n, 4)), ("scales", scales, (n, 3)), ("opacities", opac, (n,))):
        if a.shape != shp:
            raise ValueError(f"{name} has shape {a.shape}, expected {shp}")
    full = np.zeros((n, SH_COEFFS, 3), np.float32)
    full[:, : sh.shape[1]] = sh
    norm = np.linalg.norm(quats, axis=1, keepdims=True)
    q = quats / np.maximum(norm, 1e-12)
    o = np.clip(opac.astype(np.float64), _EPS, 1 - _EPS)
    cols = [
        means,
        np.zeros((n, 3), np.float32),
        full[:, 0, :],
        full[:, 1:, :].transpose(0, 2, 1).reshape(n, -1),  # channel-major, as 3DGS stores f_rest
        np.log(o / (1 - o)).astype(np.float32)[:, None],
        np.log(np.maximum(scales, 1e-30)),
        q,
    ]
    table = np.concatenate(cols, 1).astype(np.float32)
    if not np.isfinite(table).all():
        raise UserError("the Gaussians contain NaN or Inf values; the checkpoint is damaged or training diverged")
    return table


def table_to_gaussians(table: np.ndarray) -> dict[str, np.ndarray]:
    """The inverse of ``gaussians_to_table``: activated means/quats/scales/opacities/sh [N,16,3]."""
    n = table.shape[0]
    col = {name: i for i, name in enumerate(PROPERTIES)}
    dc = table[:, col["f_dc_0"] : col["f_dc_0"] + 3]
    rest = table[:, col["f_rest_0"] : col["f_rest_0"] + 45].reshape(n, 3, 15).transpose(0, 2, 1)
    return {
        "means": table[:, 0:3],
        "quats": table[:, col["rot_0"] : col["rot_0"] + 4],
        "scales": np.exp(table[:, col["scale_0"] : col["scale_0"] + 3]),
        "opacities": 1 / (1 + np.exp(-table[:, col["opacity"]])),
        "sh": np.concatenate([dc[:, None, :], rest], 1),
    }


def write_gaussian_ply(path: str | os.PathLike, means, quats, scales, opacities, sh) -> Path:
    """Write one frame of Gaussians as a standard 3DGS .ply (atomically)."""
    table = gaussians_to_table(means, quats, scales, opacities, sh)
    header = "ply\nformat binary_little_endian 1.0\n" f"element vertex {table.shape[0]}\n"
    header += "".join(f"property float {p}\n" for p in PROPERTIES) + "end_header\n"
    return write_file(path, header.encode("ascii") + np.ascontiguousarray(table, dtype="<f4").tobytes())


def read_gaussian_ply(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a 3DGS .ply with exactly the standard float properties (what ``write_gaussian_ply`` writes)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    data = path.read_bytes()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise UserError(f"{path} is not a PLY file")
    lines = data[:end].decode("ascii", "replace").splitlines()
    if "format binary_little_endian 1.0" not in lines:
        raise UserError(f"{path}: only binary little-endian PLY files are read")
    props = [ln.split()[-1] for ln in lines if ln.startswith("property float")]
    count = [int(ln.split()[-1]) for ln in lines if ln.startswith("element vertex")]
    if props != PROPERTIES or len(count) != 1:
        raise UserError(f"{path} does not hold the standard 3D Gaussian Splatting properties")
    body = np.frombuffer(data, dtype="<f4", offset=end + len(b"end_header\n"), count=count[0] * len(PROPERTIES))
    return table_to_gaussians(body.reshape(count[0], len(PROPERTIES)).astype(np.float32))


# ------------------------------------------------------------------ avatars with Gaussians
def export_ply(avatar, out, frames: None | int | list[int]) -> list[Path]:
    """Write an avatar's (GAUSSIANS capability) canonical Gaussians (frames None), one tracked frame (an int) or a sequence (a list: a folder).

    A sequence goes to ``out/frame_XXXXXX.ply`` (X = tracked frame index) plus
    ``out/frames.json`` listing the files with their timestamps.
    """
    from headavatar.export.frames import frame_params, neutral_params
    from headavatar.methods.avatar import GAUSSIANS

    if GAUSSIANS not in avatar.capabilities:
        raise UserError(f"--format ply holds 3D Gaussians: {avatar.run.root} is a '{avatar.method}' run without them; use --format glb or obj")
    out = Path(out)
    if frames is None or isinstance(frames, int):
        params = neutral_params(avatar) if frames is None else frame_params(avatar, frames)
        _check_file_target(out, ".ply")
        g = avatar.gaussians(params)
        return [write_gaussian_ply(out, g["means"][0], g["quats"][0], g["scales"][0], g["opacities"][0], g["colors"][0])]
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder: a sequence is written as a folder of .ply files")
    out.mkdir(parents=True, exist_ok=True)
    tr = avatar.subject.tracking
    written, index = [], []
    for i in frames:
        g = avatar.gaussians(frame_params(avatar, i))
        p = write_gaussian_ply(out / f"frame_{i:06d}.ply", g["means"][0], g["quats"][0], g["scales"][0], g["opacities"][0], g["colors"][0])
        written.append(p)
        index.append({"frame": i, "file": p.name, "time": float(tr.timestamps[i])})
    written.append(write_json_file(out / "frames.json", {"format": "3dgs-ply", "fps": avatar.subject.fps, "frames": index}))
    return written


def _check_file_target(out: Path, suffix: str) -> None:
    if out.is_dir():
        raise UserError(f"{out} is a folder: pass a {suffix} file name for a single frame (a folder is for a sequence)")
    if out.suffix.lower() != suffix:
        raise UserError(f"output {out} must end in {suffix}")
