"""Training steps replayed from CUDA graphs (``GraphedStep``, FlashAvatar's ``cuda_graph_step``).

On the CPU the wrapper is a plain call (checked here); the graph itself needs CUDA (the tests skip
with the reason elsewhere) and is checked against the eager step it replaces."""

import pytest
import torch

from headavatar.utils.cudagraph import GraphedStep


def _problem(device, capturable):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, capturable=capturable)

    def step(x, y, scale):
        opt.zero_grad(set_to_none=True)
        loss = ((net(x) * scale - y) ** 2).mean()
        loss.backward()
        opt.step()
        return loss.detach()

    return net, step


def _data(device, n=12):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 8, generator=g).to(device), torch.randn(4, 3, generator=g).to(device)) for _ in range(n)]


def test_cpu_tensors_run_the_step_itself():
    net, step = _problem("cpu", capturable=False)
    ref_net, ref_step = _problem("cpu", capturable=False)
    wrapped = GraphedStep(step)
    for x, y in _data("cpu", 4):
        a, b = wrapped(x, y, 1.0), ref_step(x, y, 1.0)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert wrapped.captures == 0
    for p, q in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def test_graphed_steps_equal_eager_steps():
    """Every call is a real step (warm-up, capture, replays) and the parameters follow the eager run."""
    _cuda()
    net, step = _problem("cuda", capturable=True)
    ref_net, ref_step = _problem("cuda", capturable=True)
    wrapped = GraphedStep(step, warmup=2)
    for k, (x, y) in enumerate(_data("cuda")):
        scale = 1.0 if k < 8 else 0.5  # a plain value in the signature: a second graph
        got, ref = wrapped(x, y, scale).clone(), ref_step(x, y, scale)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert wrapped.captures == 2
    for p, q in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_graphs_on_a_second_gpu():
    """Tensors on cuda:1 while cuda:0 is the current device: capture and replay happen on cuda:1's stream
    (else the capture records nothing and the replays skip the steps)."""
    _cuda()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from headavatar.utils.cudagraph import CudaGraphed

    net, step = _problem("cuda:1", capturable=True)
    ref_net, ref_step = _problem("cuda:1", capturable=True)
    wrapped = GraphedStep(step, warmup=1)
    assert torch.cuda.current_device() == 0
    for x, y in _data("cuda:1", 6):
        torch.testing.assert_close(wrapped(x, y, 1.0).clone(), ref_step(x, y, 1.0), rtol=1e-5, atol=1e-6)
    assert wrapped.captures == 1
    for p, q in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        f = CudaGraphed(lambda a: net(a) * 2)
        x = _data("cuda:1", 1)[0][0]
        f(x)
        assert f._graphs
        torch.testing.assert_close(f(x + 1).clone(), net(x + 1) * 2)


def test_least_recently_used_graph_is_dropped():
    _cuda()
    _, step = _problem("cuda", capturable=True)
    wrapped = GraphedStep(step, warmup=0, max_graphs=2)
    x, y = _data("cuda", 1)[0]
    for scale in (1.0, 2.0, 1.0, 3.0):
        wrapped(x, y, scale)
    assert wrapped.captures == 3 and len(wrapped._graphs) == 2
    assert [s[-1][1] for s in (k[1] for k in wrapped._graphs)] == [1.0, 3.0]  # 2.0 was the least recent


def test_a_step_that_syncs_with_the_host_stays_eager_and_correct():
    _cuda()
    net, step = _problem("cuda", capturable=True)
    ref_net, ref_step = _problem("cuda", capturable=True)

    def syncing(x, y, scale):
        loss = step(x, y, scale)
        float(loss)  # a host read: not capturable
        return loss

    wrapped = GraphedStep(syncing, warmup=1)
    for x, y in _data("cuda", 4):
        torch.testing.assert_close(wrapped(x, y, 1.0), ref_step(x, y, 1.0), rtol=1e-5, atol=1e-6)
    assert wrapped.captures == 0 and wrapped._eager
    for p, q in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_flashavatar_training_with_graphed_steps(tmp_path):
    """A short FlashAvatar training with cuda_graph_step=on records its steps as graphs and fits as well
    as the eager one (Triton's backward adds with atomics: not bit-equal, compared by PSNR)."""
    _cuda()
    from headavatar.render.gaussians import triton_available

    ok, why = triton_available()
    if not ok:
        pytest.skip(why)
    import json

    from headavatar.methods import train_method
    from headavatar.subjects.synthetic import make_synthetic_subject

    make_synthetic_subject(tmp_path / "s", num_frames=8, resolution=64, seed=0, progress=False)
    psnr = {}
    for mode in ("off", "on"):
        train_method("flashavatar", tmp_path / "s", tmp_path / mode,
                     {"iterations": 300, "resolution": 64, "uv_resolution": 32, "mlp_width": 64, "lpips_weight": 0.0,
                      "preview_every": 0, "num_workers": 0, "eval_every": 0, "device": "cuda", "backend": "triton",
                      "batch_size": 2, "sh_increase_every": 100, "log_every": 50, "cuda_graph_step": mode}, progress=False)
        rows = [json.loads(x) for x in (tmp_path / mode / "curves.jsonl").read_text().splitlines()]
        psnr[mode] = rows[-1]["train_psnr"]
        if mode == "on":  # SH degrees 0, 1, 2 each got a graph (at most two kept at a time)
            assert rows[-1]["cuda_graphs"] >= 3, rows[-1]
    assert abs(psnr["on"] - psnr["off"]) < 0.5, psnr


def test_a_cpu_run_resumes_on_the_gpu_with_graphed_steps(tmp_path):
    """A checkpoint written on the CPU (Adam's step counts on the CPU) continues on CUDA, where the fused,
    capturable Adam keeps them on the device."""
    _cuda()
    from headavatar.render.gaussians import triton_available

    ok, why = triton_available()
    if not ok:
        pytest.skip(why)
    import json

    from headavatar.methods import train_method
    from headavatar.subjects.synthetic import make_synthetic_subject

    make_synthetic_subject(tmp_path / "s", num_frames=6, resolution=32, seed=0, progress=False)
    cfg = {"resolution": 32, "uv_resolution": 16, "mlp_width": 32, "lpips_weight": 0.0, "preview_every": 0, "num_workers": 0,
           "eval_every": 0, "log_every": 5, "checkpoint_every": 10, "backend": "triton"}
    train_method("flashavatar", tmp_path / "s", tmp_path / "r", {**cfg, "iterations": 10, "device": "cpu", "backend": "torch"}, progress=False)
    train_method("flashavatar", tmp_path / "s", tmp_path / "r", {**cfg, "iterations": 30, "device": "cuda"}, resume=True, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "r" / "curves.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 30 and rows[-1]["cuda_graphs"] >= 1, rows[-1]
