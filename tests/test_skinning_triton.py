"""The Triton kinematic chain and skinning (headmodels/skinning_triton.py) against skinning.py, and every
built-in head model posed both ways.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before
Triton is imported); with CUDA they run compiled, on the same inputs.
"""

from __future__ import annotations

import pytest
import torch
from triton_setup import triton_device  # before anything imports Triton (the interpreter switch)

DEV, _SKIP = triton_device()
pytestmark = pytest.mark.skipif(bool(_SKIP), reason=_SKIP)

from headavatar.headmodels import load_head_model  # noqa: E402
from headavatar.headmodels.params import FrameParams  # noqa: E402
from headavatar.headmodels.skinning import global_transforms, skin, transform_points  # noqa: E402
from headavatar.utils.rotations import axis_angle_to_matrix  # noqa: E402


@pytest.mark.parametrize("parents,batch", [([-1], 1), ([-1, 0, 1, 1, 0], 3), ([-1, 0, 1, 2, 0, 4, 4, 2], 40)])
def test_chain_equals_the_reference(parents, batch):
    """Rotations, rest -> posed transforms and posed joints of random poses (zero, tiny and large angles),
    a chain, a tree, and more frames than one warp (two programs' worth of lanes)."""
    from headavatar.headmodels.skinning_triton import chain_triton

    g = torch.Generator().manual_seed(len(parents) + batch)
    J = len(parents)
    aa = torch.randn(batch, J, 3, generator=g) * 1.2
    aa[0, 0] = 0.0  # exactly zero: the sinc form's case
    if J > 2:
        aa[-1, 1] = 1e-6
        aa[-1, 2] = torch.tensor([3.1, 0.0, 0.0])  # near pi
    jr = torch.randn(1, J, 3, generator=g) * 0.1
    aa, jr = aa.to(DEV), jr.to(DEV)
    R = axis_angle_to_matrix(aa)
    G = global_transforms(parents, R, jr)
    joints = transform_points(G, jr.expand(batch, -1, -1))
    r2, G2, j2 = chain_triton(parents, aa, jr)
    torch.testing.assert_close(r2, R, rtol=0, atol=2e-6)
    torch.testing.assert_close(G2, G, rtol=0, atol=2e-6)
    torch.testing.assert_close(j2, joints, rtol=0, atol=2e-6)
    # the poses are not trivial: the chain moved the joints
    if J > 1:
        assert (joints - jr).abs().max() > 0.05


def test_chain_refuses_parents_out_of_order():
    from headavatar.headmodels.skinning_triton import chain_triton

    with pytest.raises(ValueError, match="precede"):
        chain_triton([-1, 2, 0], torch.zeros(1, 3, 3, device=DEV), torch.zeros(1, 3, 3, device=DEV))


def test_skin_equals_the_reference():
    from headavatar.headmodels.skinning_triton import skin_triton

    g = torch.Generator().manual_seed(0)
    parents = [-1, 0, 1, 0]
    B, J, V = 3, 4, 300  # V not a multiple of the block
    R = axis_angle_to_matrix(torch.randn(B, J, 3, generator=g))
    G = global_transforms(parents, R, torch.randn(1, J, 3, generator=g) * 0.1)
    w = torch.rand(V, J, generator=g)
    w[:, 2] *= 0  # a joint that moves nothing
    w = w / w.sum(1, keepdim=True)
    v = torch.randn(B, V, 3, generator=g) * 0.1
    G, w, v = G.to(DEV), w.to(DEV), v.to(DEV)
    ref = skin(v, w, G)
    torch.testing.assert_close(skin_triton(v, w, G), ref, rtol=0, atol=1e-6)
    assert (ref - v).abs().max() > 0.01


def _flame_head(tmp_path_factory):
    from fixtures_flame import shared_flame_dir
    from headavatar.headmodels.flame import build_flame_head

    d, _ = shared_flame_dir(tmp_path_factory, template="both")
    return build_flame_head(d)


@pytest.mark.parametrize("name", ["procedural", "ict", "flame"])
def test_head_models_pose_the_same_with_triton(name, tmp_path_factory):
    """HeadModel.forward with pose_kernels="triton" gives the torch path's vertices, joints and rotations
    (FLAME's fixture: five joints and pose correctives; extras and translation included); a forward that
    needs gradients stays on the torch path."""
    head = _flame_head(tmp_path_factory) if name == "flame" else load_head_model(name)
    head = head.to(DEV) if hasattr(head, "to") else head
    g = torch.Generator().manual_seed(1)
    p = FrameParams.neutral(head, batch=2, device="cpu")
    p = FrameParams(torch.randn(p.shape.shape, generator=g) * 0.5 if p.shape is not None else None,
                    torch.randn(p.expression.shape, generator=g) * 0.5,
                    torch.randn(p.joint_rotations.shape, generator=g) * 0.3,
                    torch.randn(2, 3, generator=g) * 0.01,
                    {k: torch.rand(v.shape, generator=g) * 0.3 for k, v in p.extras.items()})
    p = FrameParams(*(x.to(DEV) if torch.is_tensor(x) else x for x in (p.shape, p.expression, p.joint_rotations, p.translation)),
                    {k: v.to(DEV) for k, v in p.extras.items()})
    with torch.no_grad():
        ref = head(p, return_joints=True, return_rotations=True)
        head.pose_kernels = "triton"
        try:
            got = head(p, return_joints=True, return_rotations=True)
            v_only = head(p)
        finally:
            head.pose_kernels = "torch"
    for a, b, what in zip(got, ref, ("vertices", "joints", "rotations")):
        torch.testing.assert_close(a, b, rtol=0, atol=3e-6, msg=what)
    torch.testing.assert_close(v_only, ref[0], rtol=0, atol=3e-6)
    assert (ref[0] - head.template.to(DEV)).abs().max() > 1e-3  # posed away from the template
    head.pose_kernels = "triton"
    try:
        jr = p.joint_rotations.clone().requires_grad_(True)
        v = head(p.replace(joint_rotations=jr))
        assert v.requires_grad  # the torch path: the kernels have no backward
        v.sum().backward()
        assert jr.grad is not None and jr.grad.abs().sum() > 0
    finally:
        head.pose_kernels = "torch"
