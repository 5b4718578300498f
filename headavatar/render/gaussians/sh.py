"""Real spherical harmonics up to degree 3, in the 3DGS (Inria / gsplat) layout.

Coefficient k of a Gaussian multiplies basis function k below; the order and
signs are those of 3D Gaussian Splatting, so coefficients are exchangeable with
gsplat and with the standard .ply layout (``f_dc_*`` = coefficient 0,
``f_rest_*`` = coefficients 1..15, stored channel-major there).

The basis is orthonormal on the unit sphere.  The rendered colour of 3DGS is
``max(eval_sh(...) + 0.5, 0)``; ``RGB2SH``/``SH2RGB`` convert the DC term.
"""

from __future__ import annotations

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


def sh_basis(degree: int, dirs: torch.Tensor) -> torch.Tensor:
    """Basis values [..., (degree+1)^2] at directions ``dirs`` [..., 3] (normalised here)."""
    if not 0 <= degree <= MAX_DEGREE:
        raise ValueError(f"SH degree must be in 0..{MAX_DEGREE}, got {degree}")
    # normalise like gsplat does, so callers may pass unnormalised view vectors
    d = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    x, y, z = d.unbind(-1)
    out = [torch.full_like(x, C0)]
    if degree >= 1:
        out += [-C1 * y, C1 * z, -C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        xy, yz, xz = x * y, y * z, x * z
        out += [
            C2[0] * xy,
            C2[1] * yz,
            C2[2] * (2.0 * zz - xx - yy),
            C2[3] * xz,
            C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            C3[0] * y * (3.0 * xx - yy),
            C3[1] * xy * z,
            C3[2] * y * (4.0 * zz - xx - yy),
            C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy),
            C3[4] * x * (4.0 * zz - xx - yy),
            C3[5] * z * (xx - yy),
            C3[6] * x * (xx - 3.0 * yy),
        ]
    return torch.stack(out, -1)


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
