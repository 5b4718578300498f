"""Real spherical harmonics up to degree 3, in the 3DGS (Inria / gsplat) layout.

Coefficient k of a Gaussian multiplies basis function k below; the order and
signs are those of 3D Gaussian Splatting, so coefficients are exchangeable with
gsplat and with the standard .ply layout (``f_dc_*`` = coefficient 0,
``f_rest_*`` = coefficients 1..15, stored channel-major there).

The basis is orthonormal on the unit sphere.  The rendered colour of 3DGS is
``max(eval_sh(...) + 0.5, 0)``; ``RGB2SH``/``SH2RGB`` convert the DC term.
"""

from __future__ import annotations

import itertools

import torch

C0 = 0.28209479177387814
C1 = 0.4886025119029199
C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)

MAX_DEGREE = 3


def num_sh_bases(degree: int) -> int:
    """Number of coefficients K = (degree+1)^2."""
    return (degree + 1) ** 2


# Each basis function as a polynomial in (x, y, z): {(power of x, of y, of z): coefficient}; the
# functions of 3D Gaussian Splatting, in its order and with its signs.
_POLYNOMIALS = (
    {(0, 0, 0): C0},
    {(0, 1, 0): -C1}, {(0, 0, 1): C1}, {(1, 0, 0): -C1},
    {(1, 1, 0): C2[0]}, {(0, 1, 1): C2[1]}, {(0, 0, 2): 2.0 * C2[2], (2, 0, 0): -C2[2], (0, 2, 0): -C2[2]},
    {(1, 0, 1): C2[3]}, {(2, 0, 0): C2[4], (0, 2, 0): -C2[4]},
    {(2, 1, 0): 3.0 * C3[0], (0, 3, 0): -C3[0]},
    {(1, 1, 1): C3[1]},
    {(0, 1, 2): 4.0 * C3[2], (2, 1, 0): -C3[2], (0, 3, 0): -C3[2]},
    {(0, 0, 3): 2.0 * C3[3], (2, 0, 1): -3.0 * C3[3], (0, 2, 1): -3.0 * C3[3]},
    {(1, 0, 2): 4.0 * C3[4], (3, 0, 0): -C3[4], (1, 2, 0): -C3[4]},
    {(2, 0, 1): C3[5], (0, 2, 1): -C3[5]},
    {(3, 0, 0): C3[6], (1, 2, 0): -3.0 * C3[6]},
)
_TABLES: dict = {}  # (degree, dtype, device) -> [4**degree, (degree+1)**2]


def _table(degree: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The basis as a matrix on the products of ``degree`` factors from (1, x, y, z): factor index
    tuple (i1..id) -> column entry at the first tuple of each monomial.  Built once per device (before
    any CUDA-graph capture: a frame is run eagerly first), so a frame reads it instead of copying it."""
    key = (degree, dtype, device)
    t = _TABLES.get(key)
    if t is None:
        k = num_sh_bases(degree)
        table = torch.zeros(4 ** degree, k, dtype=torch.float64)
        seen = set()
        for row, idx in enumerate(itertools.product(range(4), repeat=degree)):
            power = tuple(idx.count(axis) for axis in (1, 2, 3))
            if power in seen:
                continue
            seen.add(power)
            for col, poly in enumerate(_POLYNOMIALS[:k]):
                table[row, col] = poly.get(power, 0.0)
        t = _TABLES[key] = table.to(device=device, dtype=dtype)
    return t


def sh_basis(degree: int, dirs: torch.Tensor) -> torch.Tensor:
    """Basis values [..., (degree+1)^2] at directions ``dirs`` [..., 3] (normalised here).

    Computed as (products of ``degree`` factors from (1, x, y, z)) @ a constant table: 9 operations
    for degree 3 instead of one or more per term, which is what a replayed frame pays for."""
    if not 0 <= degree <= MAX_DEGREE:
        raise ValueError(f"SH degree must be in 0..{MAX_DEGREE}, got {degree}")
    if degree == 0:
        return torch.full_like(dirs[..., :1], C0)
    # normalise like gsplat does, so callers may pass unnormalised view vectors
    d = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    m1 = torch.cat([torch.ones_like(d[..., :1]), d], -1)  # [..., 4]
    m = m1
    for _ in range(degree - 1):  # [..., 4**n]: every product of n factors
        m = (m[..., :, None] * m1[..., None, :]).flatten(-2)
    return m @ _table(degree, dirs.dtype, dirs.device)


def eval_sh(degree: int, coeffs: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """SH value [..., 3] of coefficients ``coeffs`` [..., K, 3] in directions ``dirs`` [..., 3].

    Only the first (degree+1)^2 coefficients are used (K may be larger, as when the
    degree is raised progressively during training).  No +0.5 offset or clamp here.
    """
    k = num_sh_bases(degree)
    if coeffs.shape[-2] < k:
        raise ValueError(f"SH degree {degree} needs {k} coefficients, got {coeffs.shape[-2]}")
    basis = sh_basis(degree, dirs)  # [..., k]
    # a batched [1,k] x [k,3] product: faster than broadcast-and-sum, backward included
    return torch.matmul(basis.unsqueeze(-2), coeffs[..., :k, :]).squeeze(-2)


def RGB2SH(rgb: torch.Tensor) -> torch.Tensor:
    """DC coefficient whose rendered colour (C0*c + 0.5) is ``rgb``."""
    return (rgb - 0.5) / C0


def SH2RGB(sh: torch.Tensor) -> torch.Tensor:
    """Rendered colour of a DC coefficient (before the clamp at 0)."""
    return sh * C0 + 0.5


def camera_centres(viewmats: torch.Tensor) -> torch.Tensor:
    """[B,3] world positions of the cameras of world-to-camera matrices [B,4,4]."""
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    return -(R.transpose(1, 2) @ t[:, :, None])[..., 0]


def sh_to_rgb(degree: int, coeffs: torch.Tensor, means: torch.Tensor, viewmats: torch.Tensor) -> torch.Tensor:
    """3DGS colour ``max(SH(view dir) + 0.5, 0)`` [B,N,3] of coefficients [B,N,K,3] at means [B,N,3]
    seen from the cameras ``viewmats`` [B,4,4] (what a rasteriser computes from SH inputs)."""
    dirs = means - camera_centres(viewmats)[:, None, :]
    return torch.clamp_min(eval_sh(degree, coeffs, dirs) + 0.5, 0.0)
