"""FlashAvatar's opt-in fused frame (``fuse_frame="compile"``): inductor's code gives the eager path's
Gaussians and pixels (CPU, tiny model); a bad mode is a one-line UserError."""

import functools

import pytest
import torch

from headavatar.errors import UserError
from headavatar.methods import load_avatar, train_method


@functools.lru_cache(maxsize=1)
def _inductor_cpu_unavailable() -> str | None:
    """Why inductor cannot compile on this CPU (no C++ compiler, ...), or None when it can."""
    try:
        f = torch.compile(lambda x: torch.sin(x) * 2 + 1, dynamic=False)
        x = torch.linspace(0, 1, 8)
        if not torch.allclose(f(x), torch.sin(x) * 2 + 1):
            return "inductor's CPU code gives wrong numbers on a probe"
    except Exception as e:  # no compiler, unsupported platform
        return f"inductor's CPU compile is unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


@pytest.fixture(scope="module")
def avatar(tmp_path_factory):
    from headavatar.subjects.synthetic import make_synthetic_subject

    root = tmp_path_factory.mktemp("fuse")
    make_synthetic_subject(root / "subject", num_frames=4, resolution=32, seed=0, progress=False)
    train_method("flashavatar", root / "subject", root / "run",
                 {"iterations": 2, "resolution": 32, "uv_resolution": 16, "mlp_width": 32, "lpips_weight": 0.0,
                  "preview_every": 0, "num_workers": 0, "eval_every": 0, "checkpoint_every": 2}, progress=False)
    return load_avatar(root / "run")


def test_bad_mode_is_a_user_error(avatar):
    with pytest.raises(UserError, match="fuse_frame"):
        avatar.fuse_frame = "fast"
    assert avatar.fuse_frame == "off"  # unchanged


def test_compiled_frame_matches_eager(avatar):
    why = _inductor_cpu_unavailable()
    if why:
        pytest.skip(why)
    tr = avatar.subject.tracking
    idx = torch.tensor([0, 3])
    params = tr.params(idx)
    cams = tr.cameras(idx, avatar.subject.height, avatar.subject.width).resized(*avatar.size)
    with torch.no_grad():
        g_ref = avatar._gaussians_rgb(params, cams.viewmats)  # what the compiled part computes, eagerly
    ref = avatar.render(params, cams)
    from torch._dynamo.utils import counters

    graphs0, breaks0 = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    try:
        avatar.fuse_frame = "compile"
        with torch.no_grad():
            g = avatar._pre_raster(params, cams.viewmats)  # compiles here (one signature)
        got = avatar.render(params, cams)
    finally:
        avatar.fuse_frame = "off"
    # really compiled (not a silent eager fallback), and as one graph: the whole pre-rasterisation part fuses
    assert counters["stats"]["unique_graphs"] > graphs0
    assert sum(counters["graph_break"].values()) == breaks0
    assert set(g) == set(g_ref)
    for k in g_ref:
        assert g[k].shape == g_ref[k].shape, k
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-5, atol=1e-5, msg=k)
    for k in ("rgb", "alpha"):
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5)
    # the rendered frame is not trivially empty (the comparison means something)
    assert (ref["alpha"] > 0.01).any()


def test_compiled_frame_inside_the_cuda_graph(avatar):
    """On CUDA with the triton rasteriser: the fused frame is captured as one graph and matches eager."""
    from headavatar.render.gaussians import triton_available

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ok, why = triton_available()
    if not ok:
        pytest.skip(why)
    av = load_avatar(avatar.run.root, "cuda")
    av.backend = "triton"
    av.model.cfg.mlp_precision = "fp32"  # bf16 rounds differently once inductor fuses it: compare in fp32
    tr = av.subject.tracking.on_device("cuda")
    idx = torch.tensor([0, 3], device="cuda")
    params = tr.params(idx)
    cams = tr.cameras(idx, av.subject.height, av.subject.width).resized(*av.size)
    av.cuda_graphs = False
    ref = av.render(params, cams)
    av.cuda_graphs, av.fuse_frame = True, "compile"
    got = av.render(params, cams)
    assert av._graphed_frame._graphs, "the fused frame was not captured (CudaGraphed fell back to eager)"
    again = av.render(params, cams)  # a replay
    for k in ("rgb", "alpha"):
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(again[k], got[k])


def test_unfused_frame_stays_few_operations(avatar):
    """The shipped GPU frame replays every operation as a CUDA-graph node: their number is its cost at
    batch 1.  benchmarks/frame_ops.py counts them (views excluded); 298 before 2026-12-07's rewrites of
    the SH basis, the rotations and the condition joints, 156 after, 131 since the condition reuses the
joints' matrices of the head model's forward and the kinematic chain is built from whole tensors (this
small avatar: 125), 114 since the SH colours are left to the rasteriser (Triton's fused kernel) instead
of 17 torch operations (this avatar: 108), 109 since a rendering frame's hidden MLP layers add bias and
ReLU in the matmul's epilogue (this avatar: 103).  A change that needs more must say so here."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("frame_ops", Path(__file__).resolve().parents[1] / "benchmarks" / "frame_ops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.frame_ops(avatar)
    assert res["total"] == sum(res["by_function"].values()) == sum(res["by_op"].values())
    assert "(outside headavatar)" not in res["by_function"]
    assert not any(k.startswith("render/gaussians/sh.py") for k in res["by_function"])  # the rasteriser's job
    assert res["total"] <= 115, res["by_function"]
