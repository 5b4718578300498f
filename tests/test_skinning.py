"""headavatar.headmodels.skinning: the one LBS used by the head models, the tracker and FLARE."""

from __future__ import annotations

import torch

from headavatar.headmodels import load_head_model
from headavatar.headmodels.skinning import blend_transforms, global_transforms, pose_correctives, pose_features, skin, transform_points
from headavatar.utils.rotations import axis_angle_to_matrix


def _chain(parents, R, joints):
    """The kinematic chain written out joint by joint with 3x3 rotations (independent of global_transforms)."""
    out = []
    for j, p in enumerate(parents):
        if p < 0:
            Rg, tg = R[j], joints[j]
        else:
            Rp, tp = out[p]
            Rg, tg = Rp @ R[j], Rp @ (joints[j] - joints[p]) + tp
        out.append((Rg, tg))
    return [(Rg, tg - Rg @ joints[j]) for j, (Rg, tg) in enumerate(out)]


def test_lbs_matches_the_chain_written_out():
    g = torch.Generator().manual_seed(0)
    parents = [-1, 0, 1, 1, 0]
    J, V = len(parents), 50
    R = axis_angle_to_matrix(torch.randn(J, 3, generator=g, dtype=torch.float64) * 0.4)
    joints = torch.randn(J, 3, generator=g, dtype=torch.float64)
    W = torch.softmax(torch.randn(V, J, generator=g, dtype=torch.float64) * 2, -1)
    v = torch.randn(V, 3, generator=g, dtype=torch.float64)
    G = global_transforms(parents, R[None], joints[None])
    assert G.shape == (1, J, 4, 4)
    want = sum(W[:, j, None] * (v @ Rg.T + tg) for j, (Rg, tg) in enumerate(_chain(parents, R, joints)))
    assert torch.allclose(skin(v[None], W, G)[0], want, atol=1e-12)
    assert torch.allclose(transform_points(blend_transforms(W, G[:, :, :3]), v[None])[0], want, atol=1e-12)
    # the rest pose is the identity
    G0 = global_transforms(parents, torch.eye(3, dtype=torch.float64).expand(1, J, 3, 3), joints[None])
    assert torch.allclose(G0, torch.eye(4, dtype=torch.float64).expand(1, J, 4, 4), atol=1e-12)


def test_pose_features_and_correctives():
    g = torch.Generator().manual_seed(1)
    R = axis_angle_to_matrix(torch.randn(2, 3, 3, generator=g) * 0.3)
    f = pose_features(R)
    assert f.shape == (2, 18) and torch.allclose(f[:, :9], (R[:, 1] - torch.eye(3)).reshape(2, 9))
    basis = torch.randn(18, 7 * 3, generator=g)
    assert torch.allclose(pose_correctives(R, basis), (f @ basis).reshape(2, 7, 3))


def test_head_model_jaw_sign_and_public_transforms():
    head = load_head_model("procedural")
    assert head.jaw_open_sign() in (1.0, -1.0)
    rots = torch.eye(3).expand(1, head.num_joints, 3, 3)
    joints = torch.randn(1, head.num_joints, 3)
    assert torch.allclose(head.global_transforms(rots, joints), torch.eye(4).expand(1, head.num_joints, 4, 4), atol=1e-6)
