"""Where a FLARE training step spends its time: synchronised phase timings and a torch.profiler table.

    python benchmarks/flare_profile.py [--subject DIR] [--resolution 512] [--steps 20] [--device cuda]
                                       [--set KEY=VALUE ...] [--no-profiler] [--out profile.json]

Profiles three states of the reference recipe: stage 1 on the initial mesh,
stage 1 after the remesh (the longest part of a run) and stage 2 (hash-grid
materials).  For each, it prints per-step milliseconds of the phases (data,
forward render, losses, backward, optimiser) measured with a device sync after
each phase, then the operators with the most device time (self time) from
torch.profiler over a few further steps; on CUDA also the peak memory of each state.  The perceptual term needs the VGG16
weights (headavatar.metrics.lpips); pass --set w_perceptual=0 without them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subject", default=None, help="subject folder (a 60-frame synthetic one is made there if missing)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per state")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no-profiler", action="store_true", help="phase timings and peak memory only (no torch.profiler table)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from headavatar.config import apply_overrides
    from headavatar.methods.flare.build import build_model, resolve_light_frame
    from headavatar.methods.flare.config import FlareConfig
    from headavatar.methods.flare.losses import VGGPerceptual
    from headavatar.methods.flare.train import MeshRegularizer, _remesh, _stream, compute_losses, flare_targets, make_optimizers
    from headavatar.subjects.format import Subject
    from headavatar.subjects.synthetic import make_synthetic_subject
    from headavatar.utils.device import resolve_device, sync

    dev = resolve_device(args.device)
    tmp = tempfile.TemporaryDirectory()
    sdir = Path(args.subject or Path(tmp.name) / "subject")
    subj = Subject.open(sdir) if (sdir / "subject.json").is_file() else make_synthetic_subject(sdir, num_frames=60, resolution=args.resolution, seed=0,
                                                                                               progress=False)
    cfg = FlareConfig(device=str(dev))
    cfg = apply_overrides(cfg, list(args.set))
    H = W = args.resolution
    torch.manual_seed(0)
    model = build_model(subj, cfg, dev)
    tr = subj.tracking
    light_frame = resolve_light_frame(cfg, subj)
    _, batches = _stream(subj, subj.split["train"], (H, W), cfg, 0, dev)
    perc = VGGPerceptual(cfg.perceptual_size).to(dev) if cfg.w_perceptual > 0 else None
    results = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__, "states": {}}

    def step(opts, reg, stage, T=None):
        def tick(name, t0):
            if T is not None:
                sync(dev)
                T[name] = T.get(name, 0.0) + time.perf_counter() - t0
            return time.perf_counter()

        t = time.perf_counter()
        with record_function("data"):
            b = next(batches)
            tgt = flare_targets(b, dev)
            idx = b["index"].numpy()
            params = tr.params(idx, dev)
            cams = tr.cameras(idx, subj.height, subj.width, dev).resized(H, W)
        t = tick("data", t)
        with record_function("render"):
            out = model.render(params, cams, light_frame=light_frame)
        t = tick("render", t)
        with record_function("losses"):
            loss, _ = compute_losses(model, out, tgt, cfg, reg, stage, 400, 1.0, 1.0, perc, light_frame)
        t = tick("losses", t)
        with record_function("backward"):
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
        t = tick("backward", t)
        with record_function("optim"):
            for o in opts:
                o.step()
        tick("optim", t)

    info = {"remeshes": 0, "remesh_log": []}
    for state in ("stage1", "stage1_remeshed", "stage2"):
        if state == "stage1_remeshed":
            _remesh(model, cfg, info, 500)
        if state == "stage2":
            model.enter_stage2()
        stage = 2 if state == "stage2" else 1
        opts = make_optimizers(model, cfg, stage, 1.0, info["remeshes"])
        reg = MeshRegularizer(model.faces, model.num_vertices)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(3):
            step(opts, reg, stage)
        T: dict = {}
        for _ in range(args.steps):
            step(opts, reg, stage, T)
        phases = {k: v / args.steps * 1e3 for k, v in T.items()}
        sync(dev)
        t = time.perf_counter()
        for _ in range(args.steps):
            step(opts, reg, stage)
        sync(dev)
        free_ms = (time.perf_counter() - t) / args.steps * 1e3
        mem = {}
        if dev.type == "cuda":  # the allocator's high-water mark over this state's steps, and what it holds from the driver
            mem = {"peak_allocated_gb": torch.cuda.max_memory_allocated(dev) / 2**30, "peak_reserved_gb": torch.cuda.max_memory_reserved(dev) / 2**30}
        results["states"][state] = {"vertices": model.num_vertices, "step_ms": free_ms, "phases_ms": phases, **mem}
        print(f"=== {state}: V={model.num_vertices} F={model.faces.shape[0]}  step {free_ms:.1f} ms unsynced; synced phases (ms): "
              + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()) + "".join(f"; {k} {v:.2f}" for k, v in mem.items()), flush=True)
        if args.no_profiler:
            continue
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(args.profile_steps):
                step(opts, reg, stage)
            sync(dev)
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=args.top)
        print(table, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
