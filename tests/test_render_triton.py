"""The Triton rasteriser against the torch reference, forward and backward.

On a machine without CUDA the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set here before the backend is imported), on tiny scenes:
a few seconds each.  With CUDA they run compiled, on the same scenes.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
from triton_setup import triton_device  # before anything imports Triton (the interpreter switch)

DEV, _SKIP = triton_device()
pytestmark = pytest.mark.skipif(bool(_SKIP), reason=_SKIP)

from headavatar.errors import UserError  # noqa: E402
from headavatar.render.gaussians import select_backend  # noqa: E402
from headavatar.render.gaussians.torch_ref import render_torch  # noqa: E402
from tests.test_render_gaussians import _scene  # noqa: E402

PARAMS = ("means", "quats", "scales", "opacities", "colors")
# options of the triton backend alone (speed only), not passed to the reference
_TRITON_ONLY = ("chunk", "num_warps", "chunk_bwd", "num_warps_bwd", "fused_projection", "split_channels", "one_reduce",
                "last_index", "packed_grads", "skip_empty", "tile_cull", "key16", "prefetch", "seq_chunk", "prefetch_bwd")
# the backward's selectable variants (benchmarks/gaussian_parity.py --sweep times them)
# the default backward is one_reduce + last_index + packed_grads; each other combination, the
# plain one (all three off) included, must give the same gradients
BWD_VARIANTS = [dict(one_reduce=False, last_index=False, packed_grads=False), dict(last_index=False), dict(packed_grads=False, one_reduce=False),
                dict(one_reduce=False),
                dict(skip_empty=True), dict(last_index=True, packed_grads=True, chunk_bwd=4, skip_empty=True),
                dict(prefetch_bwd=True), dict(prefetch_bwd=True, last_index=False, packed_grads=False, skip_empty=True)]


@pytest.fixture(scope="module")
def tb():
    """The backend module (its kernels interpreted when there is no GPU)."""
    return importlib.import_module("headavatar.render.gaussians.triton_backend")


def _f32(sc):
    return {k: (v.to(DEV, torch.float32) if torch.is_tensor(v) else v) for k, v in sc.items()}


def _render_with_grads(fn, sc, bg, weights, **kw):
    leaves = {k: (v.clone().requires_grad_(k in PARAMS) if torch.is_tensor(v) else v) for k, v in sc.items()}
    out = fn(**leaves, backgrounds=bg, **kw)
    loss = (out.rgb * weights[..., :3]).sum() + (out.alpha * weights[..., 3:4]).sum() + (out.depth * weights[..., 4:5]).sum()
    loss.backward()
    return out, {k: leaves[k].grad for k in PARAMS}


def _parity(tb, sc, **kw):
    """Both backends on one scene; asserts the issue's tolerances and returns the reference output."""
    sc = _f32(sc)
    B, H, W = sc["means"].shape[0], sc["height"], sc["width"]
    g = torch.Generator().manual_seed(5)
    bg = torch.rand(B, 3, generator=g).to(DEV)
    weights = torch.randn(B, H, W, 5, generator=g).to(DEV)
    ref, gr = _render_with_grads(render_torch, sc, bg, weights, **{k: v for k, v in kw.items() if k not in _TRITON_ONLY})
    out, go = _render_with_grads(tb.render_triton, sc, bg, weights, **kw)
    assert (out.rgb - ref.rgb).abs().mean() <= 1e-6 and (out.rgb - ref.rgb).abs().max() <= 1e-4
    assert (out.alpha - ref.alpha).abs().max() <= 1e-4
    hit = ref.alpha > 0.5
    assert ((out.depth - ref.depth).abs() / ref.depth.abs().clamp_min(1e-6))[hit].max() <= 1e-4
    assert torch.equal(out.radii, ref.radii)
    for k in PARAMS:
        x, y = go[k].flatten().double(), gr[k].flatten().double()
        assert torch.isfinite(x).all(), k
        if y.norm() > 0:
            cos = torch.nn.functional.cosine_similarity(x, y, dim=0).item()
            assert cos >= 0.9999 and (x - y).norm() / y.norm() <= 1e-3, (k, cos)
    return ref, go


@pytest.mark.parametrize("sh_degree", [None, 3])
def test_matches_reference(tb, sh_degree):
    sc = _scene(B=2, N=30, W=20, H=13, sh_degree=sh_degree, seed=1)  # not a multiple of the tile
    ref, _ = _parity(tb, sc)
    assert (ref.radii > 0).sum() >= 20 and ref.alpha.max() > 0.9


@pytest.mark.parametrize("degree", [0, 1, 2])
def test_sh_degrees_and_shared_coefficients(tb, degree):
    # 16 coefficients, a lower degree evaluated; one coefficient tensor expanded over the batch
    sc = _scene(B=2, N=25, W=16, H=16, sh_degree=3, seed=10)
    sc["colors"] = sc["colors"][:1].expand(2, -1, -1, -1)
    sc["sh_degree"] = degree
    _parity(tb, sc)


def test_torch_projection_path_and_off_screen_clamp(tb):
    # Gaussians spread past the image edges: the Jacobian's field-of-view clamp is active for some
    sc = _scene(B=2, N=40, W=16, H=16, seed=8, spread=0.6)
    _parity(tb, sc)
    _parity(tb, sc, fused_projection=False, split_channels=False)
    _parity(tb, sc, one_reduce=True)


def test_camera_gradients_use_the_torch_projection(tb):
    sc = _f32(_scene(B=1, N=20, W=16, H=16, seed=9))
    grads = []
    for fn in (render_torch, tb.render_triton):
        vm = sc["viewmats"].clone().requires_grad_(True)
        out = fn(**{**sc, "viewmats": vm})
        (out.rgb * torch.linspace(0, 1, 3, device=DEV)).sum().backward()
        grads.append(vm.grad.flatten().double())
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.9999


def test_early_stop_and_chunk_boundaries(tb):
    # many opaque layers: pixels reach T <= 1e-4 and stop, in the middle of a chunk of 4
    sc = _scene(B=1, N=40, W=16, H=16, seed=2, opacity=(0.85, 0.98), scale=(0.1, 0.2), spread=0.08)
    ref, _ = _parity(tb, sc, chunk=4)
    assert ref.alpha.max() > 0.9998


@pytest.mark.parametrize("variant", BWD_VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_backward_variants(tb, variant):
    # pixels stop in the middle of a forward chunk of 4 and some alphas hit the clamp: each
    # variant matches the reference and, closer, the default backward
    sc = _scene(B=1, N=40, W=16, H=16, seed=2, opacity=(0.85, 0.98), scale=(0.1, 0.2), spread=0.08)
    _, g_def = _parity(tb, sc, chunk=4, alpha_max=0.97)
    _, g_var = _parity(tb, sc, chunk=4, alpha_max=0.97, **variant)
    for k in PARAMS:  # a different chunking sums in another order: equal up to rounding
        assert (g_var[k] - g_def[k]).norm() <= 1e-5 * g_def[k].norm(), k
    # two images, a size that is not a multiple of the tile, SH colours
    _parity(tb, _scene(B=2, N=30, W=20, H=13, sh_degree=3, seed=1), **variant)
    # six tiles, thin rotated Gaussians: boxes that meet tiles their footprints miss, so
    # chunks of 2 with no kept pair at any pixel of a tile (what skip_empty skips)
    sc = _scene(B=1, N=40, W=48, H=32, seed=12, spread=0.35, scale=(0.01, 0.03))
    sc["scales"][..., 0] *= 5.0
    _parity(tb, sc, **{"chunk_bwd": 2, **variant})


# the default forward is tile_cull + key16 + prefetch; each alone, none, and the one-pair-at-a-time forward
FWD_VARIANTS = [dict(tile_cull=False), dict(key16=False), dict(prefetch=False), dict(tile_cull=False, key16=False, prefetch=False),
                dict(seq_chunk=4), dict(seq_chunk=8, tile_cull=True, num_warps=8), dict(seq_chunk=8, tile_cull=False, key16=False)]


@pytest.mark.parametrize("variant", FWD_VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_forward_variants(tb, variant):
    # thin rotated Gaussians over six tiles: boxes meet tiles their ellipses miss (what tile_cull
    # drops); pixels stop mid-chunk; each variant matches the reference and the others' output
    sc = _scene(B=1, N=40, W=48, H=32, seed=12, spread=0.35, scale=(0.01, 0.03))
    sc["scales"][..., 0] *= 5.0
    ref, _ = _parity(tb, sc, chunk=2, **variant)
    _parity(tb, _scene(B=1, N=40, W=16, H=16, seed=2, opacity=(0.85, 0.98), scale=(0.1, 0.2), spread=0.08), chunk=4,
            alpha_max=0.97, **variant)
    _parity(tb, _scene(B=2, N=30, W=20, H=13, sh_degree=3, seed=1), **variant)


def test_tile_cull_drops_pairs_and_no_pixel(tb):
    # the culled pairs are real (fewer listed per tile) and none of them held a kept pixel: the
    # images with and without culling agree to rounding
    sc = _f32(_scene(B=1, N=60, W=64, H=48, seed=12, spread=0.35, scale=(0.01, 0.03)))
    sc["scales"][..., 0] *= 6.0
    outs, listed = [], []
    for cull in (False, True):
        proj = tb._project_fused(sc["means"], sc["quats"], sc["scales"], sc["opacities"], sc["viewmats"], sc["Ks"], 64, 48,
                                 0.01, 1e10, 0.3)
        bins = tb._bin(proj, 1, 60, 64, 48, None, sc["means"].device, params=proj["params"], cull=cull)
        listed.append(int(bins["ranges"][-1] - bins["ranges"][0]))
        outs.append(tb.render_triton(**sc, tile_cull=cull))
    assert listed[1] < 0.9 * listed[0], listed
    assert (outs[0].rgb - outs[1].rgb).abs().max() <= 1e-6 and (outs[0].alpha - outs[1].alpha).abs().max() <= 1e-6


def test_alpha_clamp(tb):
    sc = _scene(B=1, N=16, W=16, H=16, seed=3, opacity=(0.97, 1.0), scale=(0.08, 0.2), spread=0.1)
    _parity(tb, sc, alpha_max=0.95)


@pytest.mark.parametrize("kw", [{}, dict(one_reduce=False, last_index=False, packed_grads=False, skip_empty=True),
                                dict(seq_chunk=8, tile_cull=False, key16=False, prefetch=False, prefetch_bwd=True)],
                         ids=["default", "plain", "seq"])
def test_overflow_falls_back_and_grows(tb, monkeypatch, kw):
    sc = _f32(_scene(B=2, N=25, W=16, H=16, seed=4))
    sc.update(kw)
    key = tb._key(2, 25, 16, 16, sc["means"].device)  # the tensors' own device: "cuda:0", not "cuda"
    tb._CAPS.pop(key, None)
    base = tb.render_triton(**sc)
    state = tb._CAPS[key]
    need = int(state.need)
    assert need > 8 and state.cap >= need
    # on CUDA the call above posted an asynchronous copy of its need: let it land and be read now,
    # so that the next call's poll does not grow the buffer back before it overflows
    if state.need.device.type == "cuda":
        torch.cuda.synchronize()
    state.poll()
    state.cap = 8  # far too small: the binning overflows, tiles walk all Gaussians instead
    gen = tb.generation()
    small = tb.render_triton(**sc)
    assert torch.allclose(small.rgb, base.rgb, atol=1e-6) and torch.allclose(small.alpha, base.alpha, atol=1e-6)
    sc_g = {k: (v.clone().requires_grad_(k == "means") if torch.is_tensor(v) else v) for k, v in sc.items()}
    tb.render_triton(**sc_g).rgb.sum().backward()
    g_small = sc_g["means"].grad
    # grown off the hot path: by this check, or on CUDA already by a later call's asynchronous poll
    grew = tb.check_overflow()
    assert state.cap >= need and tb.generation() > gen and (grew or state.need.device.type == "cuda")
    sc_g["means"].grad = None
    tb.render_triton(**sc_g).rgb.sum().backward()
    assert torch.allclose(g_small, sc_g["means"].grad, rtol=1e-4, atol=1e-6)
    assert not tb.check_overflow()


def test_culled_gaussians_have_zero_finite_gradients(tb):
    sc = _f32(_scene(B=1, N=6, W=16, H=16, seed=6))
    cam = -(sc["viewmats"][0, :3, :3].T @ sc["viewmats"][0, :3, 3])
    fwd = sc["viewmats"][0, 2, :3]
    sc["means"][0, 0] = cam - 0.5 * fwd  # behind the camera
    sc["means"][0, 1] = cam  # at the camera centre: depth 0
    sc["opacities"][0, 2] = 0.5 / 255  # below the alpha cut
    _parity(tb, sc)
    leaves = {k: (v.clone().requires_grad_(k in PARAMS) if torch.is_tensor(v) else v) for k, v in sc.items()}
    out = tb.render_triton(**leaves)
    assert torch.equal(out.radii[0, :3], torch.zeros(3, dtype=torch.int32, device=DEV))
    out.rgb.sum().backward()
    assert torch.isfinite(leaves["means"].grad).all() and leaves["means"].grad[0, :3].abs().max() == 0


def test_without_depth_and_reused_constants(tb):
    """render_depth=False: no depth (as gsplat's backend), the same colour and alpha; the binning's per-shape
    constants (image offsets, tile ids) are built once and reused by later frames."""
    sc = _f32(_scene(B=2, N=20, W=24, H=20, sh_degree=2, seed=3))
    bg = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], device=DEV)
    full = tb.render_triton(**sc, backgrounds=bg)
    n = len(tb._CONSTANTS)
    lean = tb.render_triton(**sc, backgrounds=bg, render_depth=False)
    assert lean.depth is None and full.depth is not None
    assert torch.equal(lean.rgb, full.rgb) and torch.equal(lean.alpha, full.alpha)
    assert len(tb._CONSTANTS) == n and n >= 2  # the second frame added none
    assert (full.alpha > 0.05).any()


def test_empty_scene(tb):
    sc = _f32(_scene(B=1, N=0, W=7, H=5))
    bg = torch.tensor([[0.1, 0.2, 0.3]], device=DEV)
    out = tb.render_triton(**sc, backgrounds=bg)
    assert torch.allclose(out.rgb, bg[:, None, None, :].expand(1, 5, 7, 3))


def test_selection_needs_cuda_or_the_interpreter(tb, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="triton"):
        select_backend("triton", "cpu")
    assert select_backend("auto", "cpu") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("triton", "cpu") == "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture)")
def test_forward_and_backward_capture_in_one_cuda_graph(tb):
    sc = _f32(_scene(B=2, N=200, W=64, H=48, seed=11, sh_degree=3))
    leaves = {k: (v.clone().requires_grad_(k in PARAMS) if torch.is_tensor(v) else v) for k, v in sc.items()}

    def step():
        out = tb.render_triton(**leaves)
        return (out.rgb.detach(),) + torch.autograd.grad(out.rgb.square().sum() + out.alpha.sum(), [leaves[k] for k in PARAMS])

    eager = step()  # sizes the pair buffer (the one host read, outside the graph)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # raises on any host synchronisation
        static = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, static):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
