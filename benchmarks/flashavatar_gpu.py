"""FlashAvatar speed, time-to-quality and memory on one GPU (issue 4), in one call.

    python benchmarks/flashavatar_gpu.py --out results.json [--smoke]

Steps (each printed as a table row and written to the JSON):
  1. a synthetic subject at 512² (rendered on the GPU)
  2. time-to-quality: training at 512² with the paper's model (UV 128, MLP 6x256, SH 3),
     held-out PSNR logged against wall-clock time
  3. render FPS of the trained avatar at 512², MLP + rasterisation, batch 1 and batched
  4. training throughput (frames/s, iterations/s) per batch size through the full training step
     (data loading, MLP, rasterisation, loss, backward, Adam)
  5. peak GPU memory against the number of frames in the subject
--smoke runs everything tiny on the CPU (to check the script, not to measure).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from headavatar.methods import load_avatar, train_method  # noqa: E402
from headavatar.methods.run import RunDir  # noqa: E402
from headavatar.subjects.format import Subject  # noqa: E402
from headavatar.subjects.synthetic import make_synthetic_subject  # noqa: E402
from headavatar.utils.cudagraph import CudaGraphed  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn, n: int, warmup: int = 5) -> float:
    """Median-free mean wall ms per call over n calls after warm-up, synchronised at both ends."""
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) / n * 1e3


def avatar_parity(av, idx, smoke: bool, fast: str = "gsplat") -> dict:
    """The trained avatar's frames through the fast backend and the torch reference: image and gradient agreement."""
    from headavatar.render.gaussians import render_gaussians

    tr = av.subject.tracking.on_device(av.device)
    H, W = av.size
    params, cams = tr.params(idx), tr.cameras(idx, av.subject.height, av.subject.width).resized(H, W)
    with torch.no_grad():
        g = av.model.gaussians(*av.model.frame_inputs(params))
    deg = av.cfg.sh_degree
    res = {}
    grads = {}
    for key, be in (("ref", "torch"), ("fast", fast if not smoke else "torch")):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in g.items()}
        bg = av.background.view(1, 3).expand(len(idx), 3)
        out = render_gaussians(leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"], leaves["colors"][:, :, : (deg + 1) ** 2],
                               cams.viewmats, cams.K, W, H, sh_degree=deg, backgrounds=bg, backend=be, **({"max_pairs": 1 << 24} if be == "torch" else {}))
        w = torch.linspace(0.5, 1.5, 3, device=av.device)
        (out.rgb * w).sum().backward()
        res[key] = out.rgb.detach()
        grads[key] = {k: v.grad.detach().flatten() for k, v in leaves.items()}
    a, b = res.values()
    ga, gb = grads.values()
    d = (a - b).abs()
    r = {"frames": [int(i) for i in idx], "rgb_mean_abs_diff": d.mean().item(),
         "rgb_p999_abs_diff": d.flatten().float().quantile(0.999).item() if d.numel() < 2**24 else None,
         "rgb_max_abs_diff": d.max().item(), "psnr_between_backends": (-10 * torch.log10((d ** 2).mean())).item()}
    for k in ga:
        cos = torch.nn.functional.cosine_similarity(ga[k].double(), gb[k].double(), dim=0).item()
        r[f"grad_cos_{k}"] = cos
    r["ok"] = r["rgb_mean_abs_diff"] < 1e-3 and all(r[f"grad_cos_{k}"] > 0.99 for k in ga if k != "opacities") and r["grad_cos_opacities"] > 0.95
    return r


def _bf16(fn):
    with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16):
        return fn()


def tile_subject(src: Path, dst: Path, n: int) -> Path:
    """A subject of n frames made of src's frames repeated (hard links): for the memory-vs-frames test."""
    s = Subject.open(src)
    if dst.exists():
        shutil.rmtree(dst)
    for sub in ("frames", "alpha", "parsing"):
        (dst / sub).mkdir(parents=True)
    for i in range(n):
        j = i % s.num_frames
        for sub, name in (("frames", f"{j:06d}{s.meta.get('image_ext', '.png')}"), ("alpha", f"{j:06d}.png"), ("parsing", f"{j:06d}.png")):
            p = src / sub / name
            if p.exists():
                os.link(p, dst / sub / name.replace(f"{j:06d}", f"{i:06d}"))
    idx = np.arange(n) % s.num_frames
    s.tracking.subset(idx).save(dst / "tracking.npz")
    meta = dict(s.meta, num_frames=n, split={"train": list(range(int(n * 0.85))), "test": list(range(int(n * 0.85), n))})
    (dst / "subject.json").write_text(json.dumps(meta))
    return dst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="flashavatar_gpu.json")
    ap.add_argument("--work", default="/tmp/ha_bench")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--ttq-seconds", type=float, default=100.0)
    ap.add_argument("--frames", type=int, default=160)
    ap.add_argument("--batch-sizes", default="1,8,16,32")
    ap.add_argument("--memory-frames", default="2000")
    ap.add_argument("--shell-layers", type=int, default=0, help="FlashAvatar shell_layers (0 = the paper's model, as the figures in BENCHMARKS.md)")
    ap.add_argument("--backend", default="auto", help="Gaussian rasteriser: auto (as render_gaussians: gsplat if installed, else triton), triton, gsplat")
    args = ap.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    res = 64 if args.smoke else 512
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "resolution": res}
    # the paper's model (shell_layers=0 unless asked: the issue-14 default adds hair-shell Gaussians)
    paper = {"shell_layers": args.shell_layers, **({} if not args.smoke else {"uv_resolution": 32, "mlp_width": 32})}
    if args.smoke:
        backend = "torch"
    else:
        from headavatar.render.gaussians import select_backend

        backend = select_backend(args.backend, "cuda")
    out["backend"] = backend

    def save():
        Path(args.out).write_text(json.dumps(out, indent=1))

    # 1. subject
    t = time.perf_counter()
    subj_dir = work / "subject"
    make_synthetic_subject(subj_dir, num_frames=12 if args.smoke else args.frames, resolution=res, seed=0, progress=False, device=dev)
    out["synthetic_seconds"] = time.perf_counter() - t
    print(f"synthetic subject: {out['synthetic_seconds']:.1f} s", flush=True)

    # warm-up: compiles gsplat's (or Triton's) kernels on first use
    t = time.perf_counter()
    train_method("flashavatar", subj_dir, work / "warm", {"iterations": 3, "device": dev, "backend": backend, "lpips_weight": 0.0, **paper}, progress=False)
    out["warmup_seconds"] = time.perf_counter() - t
    print(f"warm-up (incl. {backend} JIT): {out['warmup_seconds']:.1f} s", flush=True)
    save()

    # 2. time-to-quality
    bs_ttq = 1 if args.smoke else 8
    t = time.perf_counter()
    train_method("flashavatar", subj_dir, work / "ttq", {
        "iterations": 1_000_000, "lpips_weight": 0.0, "max_seconds": 5 if args.smoke else args.ttq_seconds, "batch_size": bs_ttq, "device": dev,
        "backend": backend,
        "eval_every": 10 if args.smoke else 100, "eval_frames": 24, "log_every": 10 if args.smoke else 50, "preview_every": 0,
        "checkpoint_every": 1_000_000, "num_workers": 0 if args.smoke else 6, **paper}, progress=False)
    curves = [c for c in RunDir(work / "ttq").read_curves() if "test_psnr" in c]
    final = curves[-1]["test_psnr"]
    within = next(c for c in curves if c["test_psnr"] >= final - 0.3)
    out["time_to_quality"] = {"batch_size": bs_ttq, "curve": [(round(c["time"], 2), c["step"], round(c["test_psnr"], 3)) for c in curves],
                              "final_psnr": final, "final_time": curves[-1]["time"], "seconds_to_within_0.3dB": within["time"], "steps": curves[-1]["step"]}
    print(f"time-to-quality: final held-out PSNR {final:.2f} dB after {curves[-1]['time']:.0f} s; within 0.3 dB after {within['time']:.1f} s", flush=True)
    save()

    # 3. render FPS (head model + MLP + rasterisation), CUDA graphs on (the default) and off
    av = load_avatar(work / "ttq", dev)
    av.backend = backend
    out["avatar_parity"] = avatar_parity(av, torch.arange(2, device=av.device) + av.subject.split["test"][0], args.smoke, backend)
    print(f"avatar parity ({backend} vs torch): {out['avatar_parity']}", flush=True)
    save()
    tr = av.subject.tracking.on_device(av.device)
    H, W = av.size
    n = 200 if not args.smoke else 2
    fps = {}
    for graphs in (True, False):
        av.cuda_graphs = graphs
        for B in (1, 16, 64, 128) if not args.smoke else (1, 4):
            idx = torch.arange(B, device=av.device) % av.subject.num_frames
            params, cams = tr.params(idx), tr.cameras(idx, av.subject.height, av.subject.width).resized(H, W)
            dt = timeit(lambda: av.render(params, cams), max(10, n // B)) / 1e3
            fps[f"B{B}_{'graphs' if graphs else 'eager'}"] = {"batch": B, "cuda_graphs": graphs, "ms_per_call": dt * 1e3, "frames_per_s": B / dt}
            print(f"render batch {B} ({'graphs' if graphs else 'eager'}): {dt * 1e3:.3f} ms/call, {B / dt:.0f} frames/s", flush=True)
    av.cuda_graphs = True
    out["render"] = {"per_batch": fps, "num_gaussians": av.model.num_gaussians}
    save()

    # where the time goes, per batch size (each part timed alone, ms per call)
    m = av.model
    parts = {}
    from headavatar.render.gaussians import gsplat_available

    if gsplat_available()[0]:
        import gsplat_probe  # noqa: F401  (benchmarks/gsplat_probe.py: raw gsplat call with no wrapper)
    for B in (1, 16) if not args.smoke else (1,):
        idx = torch.arange(B, device=av.device)
        params, cams = tr.params(idx), tr.cameras(idx, av.subject.height, av.subject.width).resized(H, W)
        with torch.no_grad():
            cond, verts = m.frame_inputs(params)
            g = m.gaussians(cond, verts)
            bg = av.background.view(1, 3).expand(B, 3)
            ref_mlp = torch.nn.Sequential(torch.nn.Linear(51 + cond.shape[1], 256), torch.nn.ReLU(),
                                          *[x for _ in range(5) for x in (torch.nn.Linear(256, 256), torch.nn.ReLU())], torch.nn.Linear(256, 10)).to(av.device)
            x_ref = torch.cat([m.pe[None].expand(B, -1, -1), cond[:, None].expand(-1, m.num_gaussians, -1)], -1)
            p = {
                "head_model": lambda: m.frame_inputs(params),
                "mlp_fp32": lambda: m.mlp(m.pe, cond),
                "mlp_bf16": lambda: _bf16(lambda: m.mlp(m.pe, cond)),
                "reference_mlp_fp32_concat_input": lambda: ref_mlp(x_ref),
                "gaussians_eager(head+mlp+assembly+sh)": lambda: av._gaussians_rgb(params, cams.viewmats),
                "gaussians_graphed": lambda: av._graphed(params, cams.viewmats),
                "raster_gsplat_raw": lambda: gsplat_probe.raw(g, cams, bg, av.cfg.sh_degree),
                "raster_gsplat_raw_rgb_only": lambda: gsplat_probe.raw(g, cams, bg, None),
                "raster_wrapper": lambda: m.render(g, cams, av.background, av.cfg.sh_degree, backend),
                "full_render_graphed": lambda: av.render(params, cams),
            }
            if args.smoke or not gsplat_available()[0]:
                p = {k: v for k, v in p.items() if "gsplat" not in k}
            parts[B] = {k: timeit(fn, 100 if not args.smoke else 2) for k, fn in p.items()}
        print(f"batch {B} breakdown ms: " + ", ".join(f"{k} {v:.3f}" for k, v in parts[B].items()), flush=True)
    out["render_breakdown_ms"] = parts
    # the bare training step (model + rasterise + loss + backward + Adam, no data loading)
    bare = {}
    from headavatar.methods.flashavatar.train import huber, make_optimizer
    for B in (1, 8, 16) if not args.smoke else (1,):
        idx = torch.arange(B, device=av.device)
        params, cams = tr.params(idx), tr.cameras(idx, av.subject.height, av.subject.width).resized(H, W)
        gt = torch.rand(B, H, W, 3, device=av.device)
        opt = make_optimizer(m, av.cfg)
        m.train()

        fin = CudaGraphed(m.frame_inputs) if dev == "cuda" else m.frame_inputs
        phases = {}

        def step(timed=False):
            marks = [time.perf_counter()]

            def mark():
                if timed:
                    sync()
                    marks.append(time.perf_counter())
            with torch.no_grad():
                cond, verts = fin(params)
            mark()
            g = m.gaussians(cond, verts)
            mark()
            pred = m.render(g, cams, av.background, av.cfg.sh_degree, backend).rgb
            mark()
            loss = huber(pred, gt, 0.1)
            opt.zero_grad(set_to_none=True)
            mark()
            loss.backward()
            mark()
            opt.step()
            mark()
            if timed:
                for name, a, b in zip(("head_model", "mlp+assembly", "rasterise", "loss", "backward", "adam"), marks, marks[1:]):
                    phases[name] = phases.get(name, 0.0) + (b - a) * 1e3
        ms = timeit(step, 50 if not args.smoke else 2)
        reps = 20 if not args.smoke else 1
        for _ in range(reps):
            step(True)
        bare[B] = {"ms_per_step": ms, "frames_per_s": B / ms * 1e3, "phases_ms_synced": {k: v / reps for k, v in phases.items()}}
        print(f"bare training step batch {B}: {ms:.2f} ms, {B / ms * 1e3:.0f} frames/s; synced phases ms: "
              + ", ".join(f"{k} {v / reps:.2f}" for k, v in phases.items()), flush=True)
    out["bare_train_step"] = bare
    save()

    # 4. training throughput per batch size
    thr = {}
    for B in [int(b) for b in args.batch_sizes.split(",")] if not args.smoke else [1, 2]:
        steps = 60 if not args.smoke else 6
        rd = work / f"thr{B}"
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train_method("flashavatar", subj_dir, rd, {"iterations": steps, "lpips_weight": 0.0, "batch_size": B, "device": dev, "backend": backend,
                                                   "log_every": steps // 3,
                                                   "preview_every": 0, "checkpoint_every": 1_000_000, "num_workers": 0 if args.smoke else 6,
                                                   **paper}, progress=False)
        c = RunDir(rd).read_curves()
        dt = (c[-1]["time"] - c[0]["time"]) / (c[-1]["step"] - c[0]["step"])
        thr[B] = {"it_per_s": 1 / dt, "frames_per_s": B / dt, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None}
        print(f"train batch {B}: {1 / dt:.1f} it/s, {B / dt:.0f} frames/s", flush=True)
    out["train_throughput"] = thr
    save()

    # 5. memory vs frames
    mem = {}
    for n in [int(x) for x in args.memory_frames.split(",")] if not args.smoke else [30]:
        sd = tile_subject(subj_dir, work / f"subj{n}", n)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train_method("flashavatar", sd, work / f"mem{n}", {"lpips_weight": 0.0, "iterations": 30 if not args.smoke else 3,
                                                           "batch_size": 8 if not args.smoke else 1, "device": dev, "backend": backend,
                                                           "preview_every": 0, "checkpoint_every": 1_000_000, "num_workers": 0 if args.smoke else 6,
                                                           **paper}, progress=False)
        mem[n] = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
        print(f"{n} frames: peak GPU memory {mem[n]} GB", flush=True)
    out["memory_vs_frames_gb"] = mem
    save()
    print(json.dumps({k: v for k, v in out.items() if k != "time_to_quality"}, indent=1))


if __name__ == "__main__":
    main()
