"""Rotation conversions (torch, batched, differentiable).

Conventions: axis-angle vectors (radians), 3x3 matrices acting on column
vectors, quaternions as (w, x, y, z), and the continuous 6D representation of
Zhou et al. (the first two *columns* of the matrix, as used by FLAME trackers
such as metrical-tracker / PyTorch3D ``matrix_to_rotation_6d`` which takes the
first two *rows*; see ``matrix_to_6d``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def axis_angle_to_matrix(aa: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula; stable near zero angle. aa: [...,3] -> [...,3,3].

    R = I + a K + b K^2 with K^2 = v v^T - t^2 I, i.e. (1 - b t^2) I + a K + b v v^T, where
    a = sin(t)/t = sinc(t/pi) and b = (1 - cos t)/t^2 = sinc(t/2pi)^2 / 2: sinc is exact at zero (no
    Taylor branch) and the whole conversion is 18 operations, which a replayed frame pays per call."""
    theta2 = (aa * aa).sum(-1, keepdim=True)[..., None]  # [...,1,1]
    theta = torch.sqrt(theta2.clamp_min(1e-12))
    a = torch.sinc(theta * (1 / math.pi))
    b = torch.sinc(theta * (0.5 / math.pi)).square() * 0.5
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device)
    mat = aa.shape[:-1] + (3, 3)
    # row i of cross(v, e_i) is v x e_i = column i of K: the transpose of K
    K = torch.linalg.cross(aa[..., None, :].expand(mat), eye.expand(mat), dim=-1).transpose(-1, -2)
    return torch.addcmul(torch.addcmul((1 - b * theta2) * eye, a, K), b, aa[..., :, None] * aa[..., None, :])


def matrix_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """Inverse of axis_angle_to_matrix (via quaternions, robust near pi)."""
    return quaternion_to_axis_angle(matrix_to_quaternion(R))


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """[...,3,3] -> [...,4] (w,x,y,z), w >= 0."""
    m = R
    trace = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    cands = torch.stack(
        [
            torch.stack([1 + trace, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
            torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2], m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2,
                                                                                                                                                    0]], -1),
            torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], m[..., 1, 2] + m[..., 2,
                                                                                                                                                    1]], -1),
            torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1], 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2,
                                                                                                                                                    2]], -1),
        ],
        -2,
    )  # [...,4,4]; row i is 4*q*q_i (unnormalised), best conditioned where q_i is largest
    diag = torch.stack([1 + trace, 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2], 1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], 1 - m[..., 0,
                                                                                                                                         0] - m[..., 1,
                                                                                                                                                1] + m[...,
                                                                                                                                                       2,
                                                                                                                                                       2]], -1)
    idx = diag.argmax(-1)
    q = torch.gather(cands, -2, idx[..., None, None].expand(idx.shape + (1, 4))).squeeze(-2)
    q = F.normalize(q, dim=-1)
    return torch.where(q[..., :1] < 0, -q, q)


def quaternion_to_axis_angle(q: torch.Tensor) -> torch.Tensor:
    q = F.normalize(q, dim=-1)
    q = torch.where(q[..., :1] < 0, -q, q)
    v = q[..., 1:]
    s = v.norm(dim=-1, keepdim=True)
    angle = 2 * torch.atan2(s, q[..., :1])
    scale = torch.where(s < 1e-8, 2.0 / q[..., :1].clamp_min(1e-8), angle / s.clamp_min(1e-12))
    return v * scale


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """[...,4] (w,x,y,z), any norm -> [...,3,3]."""
    q = F.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        -1,
    ).reshape(q.shape[:-1] + (3, 3))


def quaternion_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product a*b, (w,x,y,z): w = aw bw - av.bv, v = aw bv + bw av + av x bv.

    In vector form (7 operations, not the 29 of the scalar formula): it runs per Gaussian in every frame."""
    a, b = torch.broadcast_tensors(a, b)
    aw, av = a[..., :1], a[..., 1:]
    bw, bv = b[..., :1], b[..., 1:]
    w = aw * bw - (av * bv).sum(-1, keepdim=True)
    v = torch.addcmul(torch.addcmul(torch.linalg.cross(av, bv, dim=-1), aw, bv), bw, av)
    return torch.cat([w, v], -1)


def matrix_to_6d(R: torch.Tensor) -> torch.Tensor:
    """First two rows, flattened (PyTorch3D / metrical-tracker layout). [...,3,3] -> [...,6]."""
    return R[..., :2, :].reshape(R.shape[:-2] + (6,))


def rotation_6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt; inverse of matrix_to_6d for rotation matrices."""
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack((b1, b2, b3), dim=-2)


def axis_angle_to_6d(aa: torch.Tensor) -> torch.Tensor:
    return matrix_to_6d(axis_angle_to_matrix(aa))
