"""Gaussians embedded on a head model's UV map: one per covered texel, bound by barycentrics."""

from __future__ import annotations

import torch

from headavatar.errors import UserError
from headavatar.headmodels.base import HeadModel


def sample_uv_texels(model: HeadModel, resolution: int, exclude_boundary: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rasterise the UV layout at ``resolution``² texel centres.

    Returns (face index [N], barycentric weights [N,3]) of every covered texel,
    in row-major texel order (deterministic).  Overlapping charts keep the
    front-most face per texel, as a one-face-per-pixel rasteriser does.
    """
    from headavatar.render.mesh import get_mesh_backend

    uv = model.uvs.to(torch.float32)
    # x = 2u-1; v=0 is the bottom of the texture and NDC y=-1 the top row, so y = 1-2v.
    clip = torch.stack([2 * uv[:, 0] - 1, 1 - 2 * uv[:, 1], torch.full_like(uv[:, 0], 0.5), torch.ones_like(uv[:, 0])], -1)
    rast = get_mesh_backend("torch").rasterize(clip[None], model.uv_faces.to(torch.int64), (resolution, resolution))[0]
    tri = rast[..., 3].reshape(-1).long() - 1
    covered = tri >= 0
    if exclude_boundary and len(model.regions.get("boundary", [])):
        bad_face = model.region_face_mask("boundary", mode="any").to(tri.device)
        covered &= ~bad_face[tri.clamp_min(0)]
    u = rast[..., 0].reshape(-1)[covered]
    v = rast[..., 1].reshape(-1)[covered]
    bary = torch.stack([1 - u - v, u, v], -1).detach()
    face = tri[covered]
    if face.numel() == 0:
        raise UserError(f"the UV map of head model '{model.name}' covers no texel at resolution {resolution}; raise uv_resolution")
    return face, bary.clamp_min(0) / bary.clamp_min(0).sum(-1, keepdim=True)


def barycentric_points(vertices: torch.Tensor, faces: torch.Tensor, face_idx: torch.Tensor, bary: torch.Tensor) -> torch.Tensor:
    """vertices [B,V,3] -> [B,N,3] points at the given faces/barycentrics."""
    tri = faces[face_idx]  # [N,3]
    return (vertices[:, tri] * bary[None, :, :, None]).sum(-2)


def positional_encoding(x: torch.Tensor, frequencies: int) -> torch.Tensor:
    """x ⊕ sin(2^k x) ⊕ cos(2^k x), k = 0..frequencies-1 (NeRF style, as the reference)."""
    out = [x]
    for k in range(frequencies):
        out += [torch.sin(x * (2.0**k)), torch.cos(x * (2.0**k))]
    return torch.cat(out, -1)
