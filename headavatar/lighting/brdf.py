"""GGX microfacet pieces and the split-sum lookup table (Karis 2013), computed here.

Conventions (shared by the FLARE shader, the environment prefilter and the
synthetic ground-truth renderer):

* ``roughness`` r in [0, 1] is the perceptual roughness; the GGX width is
  alpha = r**2.
* Masking-shadowing is Smith's height-correlated form for GGX.
* The split-sum table holds, for (n.v, r), the scale A and bias B of the
  specular reflectance: integral of f_spec * (n.l) = F0 * A + B (with
  Schlick's Fresnel), which multiplies the prefiltered radiance.

The table is integrated by GGX importance sampling on a Hammersley set,
deterministically; 128x128 at 512 samples takes a few seconds on a CPU
(milliseconds on a GPU) and is cached in the
user's cache folder (``$HEADAVATAR_CACHE_DIR``, else ``$XDG_CACHE_HOME/headavatar``,
else ``~/.cache/headavatar``) when that folder is writable.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

LUT_VERSION = 1


def hammersley(n: int, device=None, dtype=torch.float64) -> torch.Tensor:
    """[n,2] Hammersley points: (i + 0.5)/n and the base-2 radical inverse of i."""
    i = torch.arange(n, dtype=torch.int64)
    rev = torch.zeros(n, dtype=torch.float64)
    bit = 0.5
    k = i.clone()
    while bool((k > 0).any()):
        rev += (k & 1).double() * bit
        k >>= 1
        bit *= 0.5
    return torch.stack([(i.double() + 0.5) / n, rev], -1).to(device=device, dtype=dtype)


def ggx_ndf(n_dot_h: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    a2 = alpha * alpha
    d = n_dot_h * n_dot_h * (a2 - 1) + 1
    return a2 / (math.pi * d * d)


def smith_lambda(cos: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    c2 = (cos * cos).clamp_min(1e-12)
    tan2 = (1 - c2).clamp_min(0) / c2
    return 0.5 * (torch.sqrt(1 + alpha * alpha * tan2) - 1)


def smith_g2(n_dot_v: torch.Tensor, n_dot_l: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Height-correlated masking-shadowing."""
    return 1 / (1 + smith_lambda(n_dot_v, alpha) + smith_lambda(n_dot_l, alpha))


def ggx_half_vector_cos(xi: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """cos(theta_h) of GGX-distributed half vectors (pdf D(h) (n.h)) for uniform xi."""
    a2 = alpha * alpha
    return torch.sqrt((1 - xi) / (1 + (a2 - 1) * xi))


def split_sum_terms(n_dot_v: torch.Tensor, roughness: torch.Tensor, samples: int = 512) -> torch.Tensor:
    """[...] n.v, [...] roughness -> [..., 2] (A, B) by GGX importance sampling (Karis 2013)."""
    dtype = torch.promote_types(n_dot_v.dtype, torch.float32)
    nv = n_dot_v.to(dtype).clamp(1e-4, 1.0)[..., None]
    alpha = (roughness.to(dtype).clamp(0, 1) ** 2).clamp_min(1e-4)[..., None]
    a2 = alpha * alpha
    xi = hammersley(samples, device=nv.device, dtype=dtype)
    ch = torch.sqrt((1 - xi[:, 1]) / (1 + (a2 - 1) * xi[:, 1]))  # GGX half vectors, pdf D(h) (n.h)
    sh = torch.sqrt((1 - ch * ch).clamp_min(0))
    cphi = torch.cos(2 * math.pi * xi[:, 0])
    # view in the x-z plane; h = (sh cos phi, sh sin phi, ch)
    vx = torch.sqrt((1 - nv * nv).clamp_min(0))
    v_dot_h = (vx * cphi) * sh + nv * ch
    n_dot_l = 2 * v_dot_h * ch - nv
    lam_v = smith_lambda(nv, alpha)
    lam_l = smith_lambda(n_dot_l, alpha)
    # f (n.l) / pdf(l) with pdf(l) = D (n.h) / (4 v.h): D cancels, leaving G v.h / (n.h n.v)
    g_vis = v_dot_h / ((1 + lam_v + lam_l) * ch * nv)
    g_vis = torch.where((n_dot_l > 0) & (v_dot_h > 0), g_vis, torch.zeros_like(g_vis))
    gf = g_vis * (1 - v_dot_h.clamp(0, 1)) ** 5
    return torch.stack([(g_vis - gf).mean(-1), gf.mean(-1)], -1)


def compute_split_sum_lut(size: int = 128, samples: int = 512, device=None) -> torch.Tensor:
    """[size (roughness, rows), size (n.v, columns), 2] float32 on the CPU; texel centres at (i + 0.5)/size."""
    c = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) / size
    rough, nv = torch.meshgrid(c, c, indexing="ij")
    step = max(1, (1 << 20) // (size * samples))  # rows per chunk: bounded memory
    rows = [split_sum_terms(nv[i : i + step], rough[i : i + step], samples) for i in range(0, size, step)]
    return torch.cat(rows, 0).float().cpu()


def cache_dir() -> Path:
    base = os.environ.get("HEADAVATAR_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "headavatar"


def split_sum_lut(size: int = 128, samples: int = 512, cache: bool = True, device=None) -> torch.Tensor:
    """The split-sum table (see ``compute_split_sum_lut``), read from / written to the cache when possible.

    ``device`` only says where to integrate it (a GPU does it in milliseconds); the result is on the CPU.
    """
    path = cache_dir() / f"ggx_split_sum_v{LUT_VERSION}_{size}x{size}_{samples}.npy"
    if cache and path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape == (size, size, 2) and np.isfinite(arr).all():
                return torch.from_numpy(arr.astype(np.float32))
        except (OSError, ValueError):
            pass  # damaged cache entry: recompute and overwrite
    lut = compute_split_sum_lut(size, samples, device)
    if cache:
        try:
            from headavatar.utils.io import atomic_path

            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, lut.numpy())
        except OSError:
            pass  # read-only home: the table is cheap enough to recompute next time
    return lut


def lut_lookup(lut: torch.Tensor, n_dot_v: torch.Tensor, roughness: torch.Tensor) -> torch.Tensor:
    """Bilinear, clamped lookup: lut [R,N,2]; n_dot_v, roughness [...] -> [..., 2]."""
    shape = n_dot_v.shape
    grid = torch.stack([n_dot_v.reshape(-1) * 2 - 1, roughness.reshape(-1) * 2 - 1], -1).to(lut.dtype)
    tex = lut.permute(2, 0, 1)[None]  # [1,2,R,N]: x = n.v (columns), y = roughness (rows)
    out = F.grid_sample(tex, grid[None, None], mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0].t().reshape(*shape, 2)


__all__ = [
    "hammersley", "ggx_ndf", "smith_g2", "split_sum_terms", "compute_split_sum_lut", "split_sum_lut",
    "lut_lookup", "cache_dir", "ggx_half_vector_cos",
]
