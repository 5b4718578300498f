"""The deformation MLP as one Triton kernel (mlp_triton.py) against the torch MLP, and the avatar's
``fuse_frame="triton"`` (that kernel with the Gaussians' assembly, and the head model's skinning kernels)
against its unfused frame.

On a machine without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set here
before Triton is imported), on small MLPs.  The interpreter multiplies bf16 as raw integers
(Triton 3.9), so there the low-precision path is checked in fp16, which the kernel treats the same
way; with CUDA the bf16 path is checked against the torch MLP's bf16 autocast.
"""

from __future__ import annotations

import pytest
import torch
from triton_setup import triton_device  # before anything imports Triton (the interpreter switch)

DEV, _SKIP = triton_device()
pytestmark = pytest.mark.skipif(bool(_SKIP), reason=_SKIP)

from headavatar.errors import UserError  # noqa: E402
from headavatar.methods.flashavatar.model import DeformMLP  # noqa: E402


def _mlp_and_inputs(width, layers, regions, n=150, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mlp = DeformMLP(51, 20, width, layers).to(DEV)
    with torch.no_grad():  # a non-zero output layer (the model zero-initialises it) and spread biases
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p.shape[-1] ** 0.5))
    pe = torch.randn(n, 51, generator=g).to(DEV)
    cond = torch.randn(batch, 20, generator=g).to(DEV)
    masks = group = None
    if regions:
        masks = (torch.rand(regions, 20, generator=g) > 0.4).float().to(DEV)
        group = torch.randint(0, regions, (n,), generator=g).to(DEV)
    return mlp, pe, cond, masks, group


@pytest.mark.parametrize("width,layers,regions,block_m", [(64, 3, None, 32), (128, 5, 3, 64)])
def test_fused_mlp_equals_the_torch_mlp(width, layers, regions, block_m):
    from headavatar.methods.flashavatar.mlp_triton import deform_mlp_triton

    mlp, pe, cond, masks, group = _mlp_and_inputs(width, layers, regions)
    with torch.no_grad():
        ref = mlp(pe, cond, masks, group)
        low = deform_mlp_triton(mlp, pe, cond, masks, group, torch.float16, block_m=block_m)
    assert low.shape == ref.shape == (2, 150, 10) and low.dtype == torch.float32
    assert ref.abs().max() > 0.3 and ref.std() > 0.05  # outputs spread over tanh's range: the comparison means something
    torch.testing.assert_close(low, ref, rtol=0, atol=5e-3)  # fp16 products, fp32 accumulation
    if DEV == "cpu":  # fp32 weights: the interpreter only (on a GPU their tiles do not fit shared memory)
        with torch.no_grad():
            got = deform_mlp_triton(mlp, pe, cond, masks, group, torch.float32, block_m=block_m)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)  # the same products, up to summation order
    if DEV == "cuda":
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            ref_bf = mlp(pe, cond, masks, group, dtype=torch.bfloat16).float()
        with torch.no_grad():
            got_bf = deform_mlp_triton(mlp, pe, cond, masks, group, torch.bfloat16, block_m=block_m)
        # the torch path rounds each layer's sum to bf16 after the bias, the kernel before the bias and
        # relu: both within bf16's rounding of the fp32 values
        assert (got_bf - ref).abs().max() <= 3e-2 and (ref_bf - ref).abs().max() <= 3e-2
        torch.testing.assert_close(got_bf, ref_bf, rtol=0, atol=3e-2)


def test_packed_weights_follow_the_parameters():
    """The packed copy is reused frame after frame, and rebuilt when a parameter changes in place
    (a checkpoint loaded, an optimiser step) or another dtype is asked for."""
    from headavatar.methods.flashavatar.mlp_triton import deform_mlp_triton, packed_for

    mlp, pe, cond, masks, group = _mlp_and_inputs(64, 2, None, n=40, batch=1, seed=1)
    dt = torch.float16
    with torch.no_grad():
        first = packed_for(mlp, dt)
        assert packed_for(mlp, dt) is first
        before = deform_mlp_triton(mlp, pe, cond, dtype=dt)
        mlp.out.bias.copy_(mlp.out.bias + 0.5)
        after = deform_mlp_triton(mlp, pe, cond, dtype=dt)
        assert packed_for(mlp, dt) is not first
        torch.testing.assert_close(after, mlp(pe, cond), rtol=0, atol=5e-3)
        assert (after - before).abs().max() > 0.1
        assert packed_for(mlp, torch.float32).pe_w.dtype == torch.float32


def test_unsupported_shapes_are_refused():
    from headavatar.methods.flashavatar.mlp_triton import pack, supported

    for width, why in ((48, "power-of-two"), (32, "at least 64")):
        mlp = DeformMLP(51, 20, width, 3)
        ok, msg = supported(mlp)
        assert not ok and why in msg
        with pytest.raises(ValueError, match=why):
            pack(mlp, torch.float32)


@pytest.fixture(scope="module")
def avatar(tmp_path_factory):
    from headavatar.methods import load_avatar, train_method
    from headavatar.subjects.synthetic import make_synthetic_subject

    root = tmp_path_factory.mktemp("mlp_triton")
    make_synthetic_subject(root / "subject", num_frames=4, resolution=32, seed=0, progress=False)
    train_method("flashavatar", root / "subject", root / "run",
                 {"iterations": 3, "resolution": 32, "uv_resolution": 16, "mlp_width": 64, "mlp_layers": 3,
                  "lpips_weight": 0.0, "preview_every": 0, "num_workers": 0, "eval_every": 0, "checkpoint_every": 3,
                  "backend": "torch", "condition_regions": "basis"}, progress=False)
    return load_avatar(root / "run", DEV)


def test_avatar_frame_with_the_fused_mlp(avatar, monkeypatch):
    """fuse_frame="triton" (the head model's chain and skinning, then the MLP and assembly, as Triton kernels)
    gives the unfused frame's Gaussians and pixels, shell Gaussians and regional conditioning included; a frame
    that needs gradients keeps the torch path."""
    from headavatar.headmodels import skinning_triton
    from headavatar.methods.flashavatar import mlp_triton

    calls, chains = [], []
    kernel, chain = mlp_triton.gaussians_triton, skinning_triton.chain_triton
    monkeypatch.setattr(mlp_triton, "gaussians_triton", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    monkeypatch.setattr(skinning_triton, "chain_triton", lambda *a, **k: chains.append(1) or chain(*a, **k))
    tr = avatar.subject.tracking.on_device(DEV)
    idx = torch.tensor([0, 3], device=DEV)
    params = tr.params(idx)
    cams = tr.cameras(idx, avatar.subject.height, avatar.subject.width).resized(*avatar.size)
    # on the CPU compare exact products (fp32, the interpreter); on CUDA the kernel runs in bf16, as the torch
    # MLP of a rendering frame does
    avatar.model.cfg.mlp_precision = "fp32" if DEV == "cpu" else "bf16"
    tol = dict(rtol=1e-5, atol=1e-5) if DEV == "cpu" else None
    assert avatar.model.cond_masks is not None  # regional conditioning: the kernel's gather is exercised
    assert avatar.model.normal_offset is not None  # shell Gaussians: the kernel's normal offsets are exercised
    with torch.no_grad():  # a deformation well away from zero (three training steps barely move the zero-initialised output)
        avatar.model.mlp.out.weight.copy_(torch.randn(avatar.model.mlp.out.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
        o = avatar.model.mlp(avatar.model.pe, avatar.model.frame_inputs(params)[0], avatar.model.cond_masks, avatar.model.cond_group)
        # and rotations, scales and shell distances away from their initial values, so the assembly's
        # every term matters (a unit rotation would hide a wrong cross product)
        gen = torch.Generator().manual_seed(4)
        m = avatar.model
        m.rotation.copy_(torch.nn.functional.normalize(torch.randn(m.rotation.shape, generator=gen), dim=-1))
        m.log_scale.add_(torch.randn(m.log_scale.shape, generator=gen) * 0.3)
        m.normal_offset.mul_(1 + torch.rand(m.normal_offset.shape, generator=gen))
    assert o.abs().max() > 0.05 and m.normal_offset.abs().max() > 0
    ref_g = avatar.gaussians(params)
    ref = avatar.render(params, cams)
    try:
        avatar.fuse_frame = "triton"
        assert avatar.model.mlp_kernel == "triton"
        g = avatar.gaussians(params)
        got = avatar.render(params, cams)
        assert len(calls) == 2 and len(chains) == 2  # both frames went through the kernels
        with torch.enable_grad():  # a frame that needs gradients keeps the torch MLP
            cond, verts = avatar.model.frame_inputs(params)
            g_grad = avatar.model.gaussians(cond, verts)
            assert g_grad["means"].requires_grad and len(calls) == 2
    finally:
        avatar.fuse_frame = "off"
    assert avatar.model.mlp_kernel == avatar.model.head.pose_kernels == "torch"
    if tol:
        for k in ref_g:
            torch.testing.assert_close(g[k], ref_g[k], **tol, msg=k)
        for k in ("rgb", "alpha"):
            torch.testing.assert_close(got[k], ref[k], **tol)
    else:  # bf16 both ways, rounded at different points: the frames agree to bf16's rounding
        for k in ("rgb", "alpha"):
            assert (got[k] - ref[k]).abs().mean() < 3e-3, k
    assert (ref["alpha"] > 0.01).any()


def test_assembly_without_regions_or_shell(avatar, monkeypatch):
    """The kernel's other compiled variants: no regional masks (every Gaussian sees the whole condition) and no
    shell Gaussians (all on the surface), against the torch path of the same model."""
    from headavatar.methods.flashavatar.mlp_triton import gaussians_triton

    m = avatar.model
    monkeypatch.setattr(m.cfg, "mlp_precision", "fp32" if DEV == "cpu" else "bf16")
    tr = avatar.subject.tracking.on_device(DEV)
    params = tr.params(torch.tensor([1, 2], device=DEV))
    for drop in ("regions", "shell"):
        store = m._buffers if drop == "regions" else m._parameters
        names = ("cond_masks", "cond_group") if drop == "regions" else ("normal_offset",)
        saved = {n: store[n] for n in names}
        try:
            store.update({n: None for n in names})
            with torch.no_grad():
                cond, verts = m.frame_inputs(params)
                ref = m.gaussians(cond, verts)
                got = gaussians_triton(m, cond, verts, torch.float32 if DEV == "cpu" else torch.bfloat16)
        finally:
            store.update(saved)
        if DEV == "cpu":  # fp32 products: the same values
            for k in ("means", "quats", "scales"):
                torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5, msg=f"{drop}: {k}")
        else:  # bf16 both ways, rounded at different points; scales compared as logs (exp(exp(o) log s) amplifies)
            torch.testing.assert_close(got["means"], ref["means"], rtol=0, atol=3e-3, msg=f"{drop}: means")
            torch.testing.assert_close(got["quats"], ref["quats"], rtol=0, atol=3e-2, msg=f"{drop}: quats")
            torch.testing.assert_close(got["scales"].log(), ref["scales"].log(), rtol=0, atol=0.15, msg=f"{drop}: scales")


def test_fused_mlp_mode_refused_where_it_cannot_run(avatar, monkeypatch):
    monkeypatch.setattr(avatar.model.mlp.pe_in, "out_features", 48)
    with pytest.raises(UserError, match="fuse_frame='triton' is unavailable: .*power-of-two"):
        avatar.fuse_frame = "triton"
    assert avatar.fuse_frame == "off" and avatar.model.mlp_kernel == "torch"
