"""CPU checks of the parts of the GPU path that have a CPU meaning: the device-resident frame
stream, the CUDA-graph wrapper's fallbacks, SH colours evaluated before rasterising, and the
avatar's render path against the training-time one. The GPU timings and gsplat parity live in
benchmarks/ (flashavatar_gpu.py, gaussian_parity.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from headavatar.methods import load_avatar
from headavatar.render.gaussians import render_gaussians
from headavatar.render.gaussians.sh import sh_to_rgb
from headavatar.subjects.dataset import frame_bytes, training_stream
from headavatar.subjects.format import Subject
from headavatar.utils.cudagraph import CudaGraphed
from tests.avatar_runs import synthetic_subject, tiny_flashavatar_run


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory):
    return synthetic_subject(tmp_path_factory.mktemp("gpu_path") / "subject")


def _take(batches, n):
    return [{k: v.clone() for k, v in b.items()} for b in itertools.islice(batches, n)]


def test_resident_stream_matches_the_loader(subject_dir):
    s = Subject.open(subject_dir)
    idx = s.split["train"]
    size = (32, 32)
    dev = torch.device("cpu")
    _, streamed = training_stream(s, idx, size, 3, 7, 2000, 0, 64, 2, dev, device_cache_mb=0)
    _, resident = training_stream(s, idx, size, 3, 7, 2000, 0, 64, 2, dev, device_cache_mb=64)
    a, b = _take(streamed, 6), _take(resident, 6)  # 18 frames: more than one pass over 6-7 frames
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_resident_stream_only_when_it_fits(subject_dir):
    s = Subject.open(subject_dir)
    idx = s.split["train"]
    assert len(idx) * frame_bytes((512, 512)) > 1 << 20
    _, it = training_stream(s, idx, (512, 512), 2, 0, 2000, 0, 64, 0, torch.device("cpu"), device_cache_mb=1)
    # 512² frames of this subject do not fit in 1 MiB: the loader path (a DataLoader iterator)
    assert isinstance(it, torch.utils.data.dataloader._BaseDataLoaderIter)


def test_cudagraphed_runs_eagerly_off_cuda():
    calls = []

    def fn(x, d):
        calls.append(1)
        return {"y": x * 2 + d["z"]}

    g = CudaGraphed(fn)
    x, z = torch.arange(4.0), torch.ones(4)
    with torch.no_grad():
        out = g(x, {"z": z})
    assert torch.equal(out["y"], x * 2 + 1) and len(calls) == 1
    out = g(x, {"z": z})  # with grad enabled too
    assert torch.equal(out["y"], x * 2 + 1) and len(calls) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture)")
def test_cudagraphed_replays_on_cuda():
    fn = lambda x: (x.sin() * 3).cumsum(0)  # noqa: E731
    g = CudaGraphed(fn)
    with torch.no_grad():
        for n in (5, 5, 7):
            x = torch.randn(n, device="cuda")
            assert torch.allclose(g(x), fn(x))


def test_sh_colours_before_rasterising_match_sh_inputs():
    torch.manual_seed(0)
    B, N, deg = 2, 40, 3
    means = torch.randn(B, N, 3) * 0.05
    quats = torch.randn(B, N, 4)
    scales = torch.full((B, N, 3), 0.01)
    opac = torch.rand(B, N) * 0.8
    coeffs = torch.randn(B, N, 16, 3) * 0.3
    view = torch.eye(4).repeat(B, 1, 1)
    view[:, 2, 3] = 0.6
    view[1, 0, 3] = 0.05
    K = torch.tensor([[60.0, 0, 32], [0, 60.0, 32], [0, 0, 1]]).repeat(B, 1, 1)
    bg = torch.rand(B, 3)
    a = render_gaussians(means, quats, scales, opac, coeffs, view, K, 64, 64, sh_degree=deg, backgrounds=bg, backend="torch")
    rgb = sh_to_rgb(deg, coeffs, means, view)
    b = render_gaussians(means, quats, scales, opac, rgb, view, K, 64, 64, sh_degree=None, backgrounds=bg, backend="torch",
                         render_depth=False)
    assert (a.alpha > 0.05).any()
    assert torch.allclose(a.rgb, b.rgb, atol=1e-6)


def test_avatar_render_matches_the_training_render(subject_dir, tmp_path):
    run = tiny_flashavatar_run(subject_dir, tmp_path / "run")
    av = load_avatar(run, "cpu")
    tr = av.subject.tracking.on_device("cpu")
    idx = torch.tensor([0, 5])
    params, cams = tr.params(idx), tr.cameras(idx, av.subject.height, av.subject.width).resized(*av.size)
    out = av.render(params, cams)["rgb"]
    with torch.no_grad():
        g = av.model.gaussians(*av.model.frame_inputs(params))
        ref = av.model.render(g, cams, av.background, av.cfg.sh_degree, "torch").rgb
    assert torch.allclose(out, ref, atol=1e-5)
