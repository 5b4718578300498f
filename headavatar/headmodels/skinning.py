"""Linear blend skinning, written once: blendshapes, pose features, the kinematic chain, LBS.

Used by the head models (``HeadModel.forward``), the tracker's fitting
(headavatar.tracking.fit) and FLARE's deformer (headavatar.methods.flare.model),
so that the three agree to the last bit on the same inputs.

Shapes: B frames, V vertices, J joints, K basis vectors.  Transforms are
rest -> posed: a rest-pose point x goes to ``R x + t`` with ``[R | t]`` the
first three rows of a joint's (or a vertex's blended) 4x4 transform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def blend_shapes(basis: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Offsets [B,V,3] of a linear basis [V,3,K] with coefficients [B,K]."""
    return torch.einsum("vck,bk->bvc", basis, coeffs)


def pose_features(rots: torch.Tensor) -> torch.Tensor:
    """[B,J,3,3] -> [B, 9(J-1)]: (R_j - I) of every non-root joint, FLAME's pose-corrective input."""
    eye = torch.eye(3, dtype=rots.dtype, device=rots.device)
    return (rots[:, 1:] - eye).reshape(rots.shape[0], -1)


def pose_correctives(rots: torch.Tensor, pose_basis: torch.Tensor) -> torch.Tensor:
    """Offsets [B,V,3] of FLAME-style pose correctives: ``pose_basis`` [9(J-1), V*3] on the pose features."""
    return (pose_features(rots) @ pose_basis).reshape(rots.shape[0], -1, 3)


def global_transforms(parents: list[int], rots: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
    """Per-joint transforms [B,J,4,4] mapping rest-pose points to posed points (the kinematic chain).

    rots: local rotations [B,J,3,3] (relative to the parent); joints: rest joint positions [B|1,J,3];
    parents[j] < j, parents[0] == -1 (the root).
    """
    B, J = rots.shape[:2]
    joints = joints.expand(B, -1, -1)
    # written as a few whole-tensor operations (no per-joint writes): in a CUDA graph each one is a node
    rel = joints
    if J > 1:
        parent_pos = torch.stack([joints[:, parents[j]] for j in range(1, J)], 1)
        rel = torch.cat([joints[:, :1], joints[:, 1:] - parent_pos], 1)
    local = F.pad(torch.cat([rots, rel[..., None]], -1), (0, 0, 0, 1))  # [B,J,4,4], last row zero
    local[..., 3, 3] = 1
    chain = [local[:, 0]]
    for j in range(1, J):
        chain.append(chain[parents[j]] @ local[:, j])
    G = torch.stack(chain, 1)
    # remove the rest-pose joint location: G' x = G (x - j_rest)
    offset = (G[..., :3, :3] @ joints[..., None])[..., 0]
    G = G.clone()
    G[..., :3, 3] = G[..., :3, 3] - offset
    return G


def blend_transforms(weights: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """Per-vertex linear blend of the joints' transforms: weights [V,J], transforms [...,J,3|4,4] -> [...,V,3,4]."""
    return torch.einsum("vj,...jxy->...vxy", weights, transforms[..., :3, :])


def transform_points(T: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply affine transforms T [...,3|4,4] to points x [...,3] (one transform per point)."""
    return (T[..., :3, :3] @ x[..., None])[..., 0] + T[..., :3, 3]


def skin(v: torch.Tensor, weights: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """Linear blend skinning: rest vertices [B,V,3], weights [V,J], joint transforms [B,J,3|4,4] -> posed [B,V,3]."""
    return transform_points(blend_transforms(weights, transforms), v)


__all__ = ["blend_shapes", "pose_features", "pose_correctives", "global_transforms", "blend_transforms", "transform_points", "skin"]
