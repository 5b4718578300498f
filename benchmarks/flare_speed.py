"""FLARE training speed (both stages) on a synthetic subject, and held-out PSNR of the result.

    python benchmarks/flare_speed.py [--resolution 512] [--frames 60] [--iterations 2500] [--stage2 1000]
                                     [--batch-size 4] [--device cuda] [--subject DIR] [--set KEY=VALUE ...] [--relight] [--out results.json]

Defaults are the reference setting (flare.md §8: 1500 + 1000 iterations,
batch 4, 512², perceptual loss on).  Prints the time of the subject
generation, of stage 1 (remeshing included and reported apart), of stage 2,
iterations per second and the held-out PSNR (two ways: the IMavatar
protocol's masked sum over all pixels, and the plain mean over the matte),
and writes them as JSON with --out.  The perceptual loss needs the VGG16
weights (headavatar.metrics.lpips); pass --set w_perceptual=0 without them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--frames", type=int, default=60, help="synthetic frames (the last 15%% are held out)")
    ap.add_argument("--iterations", type=int, default=2500)
    ap.add_argument("--stage2", type=int, default=1000, help="stage-2 iterations (part of --iterations)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--subject", default=None, help="use this subject folder (created there if missing)")
    ap.add_argument("--keep", default=None, help="keep the run in this folder")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more FLARE config overrides")
    ap.add_argument("--relight", action="store_true", help="also score relighting of the held-out frames under the built-in sky (env 256, 2x supersampled GT)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from headavatar.config import parse_set
    from headavatar.methods import load_avatar, train_method
    from headavatar.subjects.dataset import FrameDataset, collate
    from headavatar.subjects.format import Subject
    from headavatar.subjects.synthetic import make_synthetic_subject
    from headavatar.utils.device import resolve_device, sync

    device = resolve_device(args.device)
    tmp = tempfile.TemporaryDirectory()
    subj_dir = Path(args.subject or Path(tmp.name) / "subject")
    run_dir = Path(args.keep or Path(tmp.name) / "run")
    t = time.perf_counter()
    if (subj_dir / "subject.json").is_file():
        subject = Subject.open(subj_dir)
    else:
        subject = make_synthetic_subject(subj_dir, num_frames=args.frames, resolution=args.resolution, seed=0, progress=False)
    t_synth = time.perf_counter() - t

    overrides = {"iterations": args.iterations, "stage2_iterations": args.stage2, "batch_size": args.batch_size, "device": str(device),
                 "checkpoint_every": args.iterations, "preview_every": 0, "log_every": 50}
    overrides.update(parse_set(args.set))
    sync(device)
    t = time.perf_counter()
    train_method("flare", subj_dir, run_dir, overrides, progress=False)
    sync(device)
    t_train = time.perf_counter() - t

    rows = [json.loads(x) for x in (run_dir / "curves.jsonl").read_text().splitlines() if x.strip()]
    info = json.loads((run_dir / "run.json").read_text())
    n1 = info["stage1_iterations"]
    t1 = max((r["time"] for r in rows if r["step"] <= n1), default=0.0)
    t_end = rows[-1]["time"]
    remesh = json.loads((run_dir / "remesh.json").read_text()) if (run_dir / "remesh.json").is_file() else []

    # held-out PSNR of the trained avatar, under its learnt light
    avatar = load_avatar(run_dir, device)
    tr = subject.tracking
    test = subject.split["test"]
    data = FrameDataset(subject, test, avatar.size)
    imav, masked = [], []
    t = time.perf_counter()
    for k in range(0, len(test), 4):
        b = collate([data[j] for j in range(k, min(k + 4, len(test)))])
        idx = b["index"].numpy()
        cams = tr.cameras(idx, subject.height, subject.width, device).resized(*avatar.size)
        pred = avatar.render(tr.params(idx, device), cams)["rgb"]
        gt = b["image"].to(device).float() / 255
        m = b["alpha"].to(device).float()[..., None] / 255
        white = torch.ones_like(gt)
        p, g = pred * m + white * (1 - m), gt * m + white * (1 - m)
        err = (p - g).square() * m
        imav += (-10 * torch.log10(err.flatten(1).sum(1) / err[0].numel())).tolist()
        masked += (-10 * torch.log10(err.flatten(1).sum(1) / (3 * m.flatten(1).sum(1)).clamp_min(1))).tolist()
    sync(device)
    t_eval = time.perf_counter() - t

    res = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "resolution": args.resolution, "frames": subject.num_frames, "batch_size": args.batch_size,
        "iterations": args.iterations, "stage1_iterations": n1, "stage2_iterations": args.iterations - n1,
        "overrides": overrides,
        "seconds": {"synthetic_subject": t_synth, "stage1": t1, "stage2": t_end - t1, "train_total": t_train,
                    "remesh": sum(r.get("seconds", 0.0) for r in remesh), "eval_render": t_eval},
        "iterations_per_second": {"stage1": n1 / max(t1, 1e-9), "stage2": (args.iterations - n1) / max(t_end - t1, 1e-9)},
        "remesh": remesh,
        "vertices_final": rows[-1].get("vertices"),
        "train_psnr_last": rows[-1].get("train_psnr"),
        "heldout_psnr_imavatar": float(np.mean(imav)), "heldout_psnr_masked": float(np.mean(masked)),
        "heldout_frames": len(test),
        "loadavg": os.getloadavg(),
    }
    if args.out:  # the training figures are kept even if the relighting step below fails
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    if args.relight:
        from headavatar.methods.flare.relight import evaluate_relighting

        t = time.perf_counter()
        ev = evaluate_relighting(run_dir, "sky", device=device, frames="test", env_size=256, supersample=2)
        res["relight"] = {"mean": ev["mean"], "albedo_scale": ev["albedo_scale"], "exposure_scale": ev["exposure_scale"],
                          "seconds": time.perf_counter() - t}
        print("relit PSNR under the sky (dB): " + ", ".join(f"{k} {v:.2f}" for k, v in ev["mean"].items()))
    s = res["seconds"]
    print(f"device {res['device']}, {args.resolution}², batch {args.batch_size}, {subject.num_frames} frames")
    print(f"synthetic subject {s['synthetic_subject']:.1f} s | stage 1 ({n1} it) {s['stage1']:.1f} s (remesh {s['remesh']:.1f} s) | "
          f"stage 2 ({args.iterations - n1} it) {s['stage2']:.1f} s | training total {s['train_total']:.1f} s")
    print(f"held-out PSNR: {res['heldout_psnr_imavatar']:.2f} dB (IMavatar protocol), {res['heldout_psnr_masked']:.2f} dB (mean over the matte)")
    print(json.dumps(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
