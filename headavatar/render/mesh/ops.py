"""Small differentiable helpers around mesh rendering: normals and 2D texture sampling.

Texture convention: ``tex`` is an image array [B|1, Ht, Wt, C] whose row 0 is
the *top* of the image; ``uv`` in [0, 1] with v = 0 at the *bottom* row (OBJ
convention), texel (i, j) centred at ``u = (i + 0.5) / Wt``,
``v = 1 - (j + 0.5) / Ht``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _batched(verts: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if verts.dim() == 2:
        return verts[None], True
    return verts, False


def face_normals(verts: torch.Tensor, faces: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """verts [B,V,3] or [V,3] -> [B,F,3] (or [F,3]) right-handed normals (v1-v0) x (v2-v0).

    Unnormalised, the length is twice the face area.
    """
    v, single = _batched(verts)
    faces = faces.long()
    p0, p1, p2 = v[:, faces[:, 0]], v[:, faces[:, 1]], v[:, faces[:, 2]]
    n = torch.linalg.cross(p1 - p0, p2 - p0, dim=-1)
    if normalize:
        n = F.normalize(n, dim=-1, eps=1e-20)
    return n[0] if single else n


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """verts [B,V,3] or [V,3] -> unit area-weighted vertex normals of the same shape."""
    v, single = _batched(verts)
    faces = faces.long()
    fn = face_normals(v, faces, normalize=False)  # length = 2 * area: area weighting for free
    B, V = v.shape[:2]
    idx = faces.reshape(-1)
    n = torch.zeros_like(v).index_add(1, idx, fn.repeat_interleave(3, dim=1))
    n = F.normalize(n, dim=-1, eps=1e-20)
    return n[0] if single else n


# ------------------------------------------------------------------ textures
def _wrap_index(i: torch.Tensor, size: int, boundary: str) -> torch.Tensor:
    if boundary == "wrap":
        return torch.remainder(i, size)
    return i.clamp(0, size - 1)


def _gather_texels(tex: torch.Tensor, ix: torch.Tensor, iy: torch.Tensor) -> torch.Tensor:
    """tex [Bt,Ht,Wt,C], ix/iy [B,N] int -> [B,N,C]."""
    Bt, Ht, Wt, C = tex.shape
    B = ix.shape[0]
    flat = tex.reshape(Bt, Ht * Wt, C).expand(B, -1, -1)
    idx = (iy * Wt + ix)[..., None].expand(-1, -1, C)
    return torch.gather(flat, 1, idx)


def _sample_level(tex: torch.Tensor, uv: torch.Tensor, filter: str, boundary: str) -> torch.Tensor:
    """tex [Bt,Ht,Wt,C]; uv [B,N,2] -> [B,N,C]."""
    _, Ht, Wt, _ = tex.shape
    x = uv[..., 0] * Wt
    y = (1 - uv[..., 1]) * Ht  # v = 0 is the bottom row of the image
    if filter == "nearest":
        ix = _wrap_index(torch.floor(x).long(), Wt, boundary)
        iy = _wrap_index(torch.floor(y).long(), Ht, boundary)
        return _gather_texels(tex, ix, iy)
    x, y = x - 0.5, y - 0.5  # texel centres at integer positions
    x0, y0 = torch.floor(x.detach()), torch.floor(y.detach())
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    x0, y0 = x0.long(), y0.long()
    ix0, ix1 = _wrap_index(x0, Wt, boundary), _wrap_index(x0 + 1, Wt, boundary)
    iy0, iy1 = _wrap_index(y0, Ht, boundary), _wrap_index(y0 + 1, Ht, boundary)
    top = _gather_texels(tex, ix0, iy0) * (1 - fx) + _gather_texels(tex, ix1, iy0) * fx
    bottom = _gather_texels(tex, ix0, iy1) * (1 - fx) + _gather_texels(tex, ix1, iy1) * fx
    return top * (1 - fy) + bottom * fy


def mip_pyramid(tex: torch.Tensor, max_levels: int | None = None) -> list[torch.Tensor]:
    """[B,Ht,Wt,C] -> levels 0..L-1, each half the size (box filter) down to 1x1."""
    levels = [tex]
    while max(levels[-1].shape[1:3]) > 1 and (max_levels is None or len(levels) < max_levels):
        t = levels[-1].permute(0, 3, 1, 2)
        size = (max(1, t.shape[2] // 2), max(1, t.shape[3] // 2))
        levels.append(F.interpolate(t, size=size, mode="area").permute(0, 2, 3, 1))
    return levels


def uv_lod(uv: torch.Tensor, tex_size: tuple[int, int]) -> torch.Tensor:
    """Mip level [B,H,W] from screen-space finite differences of uv [B,H,W,2] (no gradient).

    Differences across depth/silhouette discontinuities overestimate the
    footprint there; pass an explicit ``lod`` to ``texture2d`` if that matters.
    """
    Ht, Wt = tex_size
    scale = uv.new_tensor([Wt, Ht])
    t = uv.detach() * scale
    dx = torch.zeros_like(t)
    dy = torch.zeros_like(t)
    dx[:, :, :-1] = t[:, :, 1:] - t[:, :, :-1]
    dx[:, :, -1] = dx[:, :, -2] if t.shape[2] > 1 else 0
    dy[:, :-1] = t[:, 1:] - t[:, :-1]
    dy[:, -1] = dy[:, -2] if t.shape[1] > 1 else 0
    rho2 = torch.maximum((dx * dx).sum(-1), (dy * dy).sum(-1))
    return 0.5 * torch.log2(rho2.clamp_min(1e-12))


def texture2d(
    tex: torch.Tensor,
    uv: torch.Tensor,
    filter: str = "bilinear",
    boundary: str = "clamp",
    lod: torch.Tensor | None = None,
    mip: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sample tex [B|1,Ht,Wt,C] at uv [B,...,2] -> [B,...,C]; differentiable in tex and uv.

    filter: "nearest" (no uv gradient), "bilinear", or "trilinear" (bilinear
    in the two nearest mip levels; ``lod`` [B,...] defaults to ``uv_lod`` for
    image-shaped uv [B,H,W,2]; ``mip`` may pass a precomputed ``mip_pyramid``).
    boundary: "clamp" (edge texels repeat) or "wrap" (periodic).
    """
    if filter not in ("nearest", "bilinear", "trilinear"):
        raise ValueError(f"unknown filter '{filter}'")
    if boundary not in ("clamp", "wrap"):
        raise ValueError(f"unknown boundary '{boundary}'")
    if tex.dim() == 3:
        tex = tex[None]
    B = uv.shape[0]
    if tex.shape[0] not in (1, B):
        raise ValueError(f"tex batch {tex.shape[0]} must be 1 or match uv batch {B}")
    lead = uv.shape[:-1]
    flat = uv.reshape(B, -1, 2)
    if filter != "trilinear":
        return _sample_level(tex, flat, filter, boundary).reshape(*lead, tex.shape[-1])

    levels = mip if mip is not None else mip_pyramid(tex)
    if lod is None:
        if uv.dim() != 4:
            raise ValueError("trilinear filtering needs lod= unless uv is [B,H,W,2]")
        lod = uv_lod(uv, tex.shape[1:3])
    lod = lod.detach().reshape(B, -1).clamp(0, len(levels) - 1)
    lo = torch.floor(lod).long()
    frac = (lod - lo)[..., None]
    out = torch.zeros(B, flat.shape[1], tex.shape[-1], dtype=tex.dtype, device=tex.device)
    # Each pixel touches only levels lo and lo+1: loop over the (few) levels present.
    for level in range(len(levels)):
        w = torch.where(lo[..., None] == level, 1 - frac, torch.zeros_like(frac))
        if level > 0:
            w = w + torch.where(lo[..., None] == level - 1, frac, torch.zeros_like(frac))
        if bool((w > 0).any()):
            out = out + w * _sample_level(levels[level], flat, "bilinear", boundary)
    return out.reshape(*lead, tex.shape[-1])


__all__ = ["face_normals", "vertex_normals", "texture2d", "mip_pyramid", "uv_lod"]
