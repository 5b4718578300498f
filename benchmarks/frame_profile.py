"""Where a FlashAvatar frame and a training step spend their GPU time: torch.profiler's kernel table.

The avatar of ``avatar_frame.py`` (synthetic subject at 512^2, the default FlashAvatarConfig, random
weights).  For each ``fuse_frame`` mode it profiles replays of the whole frame (one CUDA graph, as
``FlashAvatarAvatar.render`` runs it) at each batch size, then replays of the graphed training step
(head model, MLP, assembly, Triton rasteriser, Huber loss, backward, Adam) at ``--train-batch``.  For
each it reports the kernels by total GPU time (name, calls per replay, µs per replay), their sum
against the wall time per replay (the difference is launch gaps and idle GPU), and the kernel count.

    python benchmarks/frame_profile.py --out profile.json [--batches 1,16] [--modes off,triton] [--train-batch 16]
    python benchmarks/frame_profile.py --smoke    # end to end on the CPU (torch backend, no graphs; not a measurement)

Exit status 0, or 2 when the machine cannot run it (no CUDA or no Triton, without --smoke).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))


def kernel_table(fn, reps: int, device: torch.device, top: int) -> dict:
    """Profile ``reps`` calls of ``fn`` (after one unprofiled call): per-replay kernel times and counts."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / reps
    rows = []
    for ev in prof.key_averages():
        us = (ev.self_device_time_total if cuda else ev.self_cpu_time_total) / reps
        if cuda and ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if us <= 0:
            continue
        rows.append({"name": ev.key[:120], "calls": ev.count / reps, "us": us})
    rows.sort(key=lambda r: -r["us"])
    total = sum(r["us"] for r in rows)
    return {"wall_us": wall * 1e6, "kernel_us": total, "kernels_per_replay": sum(r["calls"] for r in rows),
            "top": rows[:top]}


def print_table(title: str, t: dict) -> None:
    print(f"\n== {title}: wall {t['wall_us']:.1f} us/replay, kernels {t['kernel_us']:.1f} us "
          f"({t['kernels_per_replay']:.0f} launches)")
    for r in t["top"]:
        print(f"{r['us']:9.1f} us  {r['calls']:5.1f}x  {r['name']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--batches", default="1,16", help="frame batch sizes")
    p.add_argument("--modes", default="off,triton", help="fuse_frame modes")
    p.add_argument("--train-batch", type=int, default=16, help="batch of the profiled training step (0: none)")
    p.add_argument("--reps", type=int, default=20, help="profiled replays per case")
    p.add_argument("--top", type=int, default=25, help="kernels listed per case")
    p.add_argument("--smoke", action="store_true", help="end to end on the CPU at tiny sizes (not a measurement)")
    args = p.parse_args(argv)
    from headavatar.render.gaussians import triton_available

    if args.smoke:
        dev, backend, res, cfg = torch.device("cpu"), "torch", 32, {"uv_resolution": 16, "mlp_width": 64}
        args.modes, args.reps = "off", 1
    else:
        ok, why = triton_available()
        if not torch.cuda.is_available() or not ok:
            print(f"cannot run: {'no CUDA device' if not torch.cuda.is_available() else why}", file=sys.stderr)
            return 2
        dev, backend, res, cfg = torch.device("cuda"), "triton", 512, {}
    import types

    import avatar_frame
    from gaussian_parity import graphed

    av = avatar_frame.build_avatar(types.SimpleNamespace(res=res, backend=backend, avatar_cfg=cfg), dev)
    report = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "num_gaussians": av.model.num_gaussians,
              "frames": {}, "train": {}}
    tr = av.subject.tracking.on_device(dev)
    for B in [int(b) for b in args.batches.split(",")]:
        idx = torch.arange(B, device=dev) % av.subject.num_frames
        params, cams = tr.params(idx), tr.cameras(idx, av.subject.height, av.subject.width).resized(*av.size)
        for mode in args.modes.split(","):
            av.fuse_frame = mode
            with torch.no_grad():
                t = kernel_table(lambda: av.render(params, cams), args.reps, dev, args.top)
            report["frames"][f"{mode}_b{B}"] = t
            print_table(f"frame, fuse_frame={mode}, batch {B}", t)
    av.fuse_frame = "off"

    if args.train_batch:
        from headavatar.methods.flashavatar.train import huber, make_optimizer
        from headavatar.render.gaussians import render_gaussians

        model, B = av.model, args.train_batch
        idx = torch.arange(B, device=dev) % av.subject.num_frames
        params, cams = tr.params(idx), tr.cameras(idx, av.subject.height, av.subject.width).resized(*av.size)
        gt = torch.rand(B, cams.height, cams.width, 3, device=dev, generator=torch.Generator(dev).manual_seed(0))
        bg = av.background.view(1, 3).expand(B, 3)
        opt = make_optimizer(model, av.cfg, capturable=dev.type == "cuda")
        model.train()

        def step():
            g = model.gaussians(*model.frame_inputs(params))
            pred = render_gaussians(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"], cams.viewmats, cams.K,
                                    cams.width, cams.height, sh_degree=av.cfg.sh_degree, backgrounds=bg, backend=backend).rgb
            loss = huber(pred, gt, 0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fn = graphed(step) if dev.type == "cuda" else step
        t = kernel_table(fn, max(1, args.reps // 2), dev, args.top)
        report["train"][f"b{B}"] = t
        print_table(f"training step ({'one CUDA graph' if dev.type == 'cuda' else 'eager, CPU ops'}), batch {B}", t)
        model.eval()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
