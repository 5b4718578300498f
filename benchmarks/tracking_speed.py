"""Tracking speed and landmark accuracy of `headavatar track` on the development videos.

    python benchmarks/tracking_speed.py [--videos DIR] [--size 512] [--matte selfie] [--head-model ict] [--out results.json]

For each video: end-to-end frames per second (wall clock of track_video,
model loading included), the process CPU time per frame (all threads: on
an idle machine with C cores the wall time cannot beat cpu / C, and on a
shared one the wall time mostly measures the other users), the wall and
CPU time of each stage (columns: wall seconds), valid frames, and the
median landmark reprojection error before fitting (rigid pose, neutral
face) and after.  Prints a table and writes JSON with --out.  The machine's
load average is recorded because a shared machine slows every figure.
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
    ap.add_argument("--videos", default=str(REPO.parent / "shared" / "videos"), help="folder of .mp4 files (default ../shared/videos)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--matte", default="selfie", help="auto|selfie|rvm (the issue's speed target uses the default selfie matte)")
    ap.add_argument("--head-model", default="ict")
    ap.add_argument("--max-frames", type=int, default=None)
    ap.add_argument("--keep", default=None, help="keep the subjects in this folder instead of a temporary one")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--storage", default="frames", choices=["frames", "compact"], help="subject storage (track --storage)")
    ap.add_argument("--only", action="append", default=[], help="only videos whose name contains this (repeatable)")
    args = ap.parse_args(argv)

    import torch

    from headavatar.tracking import track_video

    only = [o for arg in args.only for o in arg.split(",") if o]  # --only a --only b, or --only a,b
    videos = sorted(v for v in Path(args.videos).glob("*.mp4") if not only or any(o in v.name for o in only))
    if not videos:
        print(f"no .mp4 in {args.videos}" + (f" whose name contains {' or '.join(only)}" if only else ""), file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        for v in videos:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            subj = track_video(v, base / v.stem, head_model=args.head_model, size=args.size, matte=args.matte,
                               max_frames=args.max_frames, overwrite=True, progress=False, storage=args.storage)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            st = subj.meta["tracking"]
            rows.append({
                "video": v.name,
                "storage": args.storage,
                "frames": st["frames"],
                "valid_frames": st["valid_frames"],
                "wall_s": round(wall, 2),
                "fps": round(st["frames"] / wall, 2),
                "cpu_s": round(cpu, 2),
                "cpu_ms_per_frame": round(1000 * cpu / st["frames"], 1),
                "stages_s": st["timings_s"],
                "stages_cpu_s": st.get("cpu_s"),
                "reproj_px_before": None if st["reprojection_px_before_fit"] is None else round(st["reprojection_px_before_fit"], 3),
                "reproj_px_after": None if st["reprojection_px_median"] is None else round(st["reprojection_px_median"], 3),
                "crop": st["crop"],
                "load_avg_at_start": load,
            })
    env = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "size": args.size,
        "matte": args.matte,
        "head_model": args.head_model,
    }
    hdr = (f"{'video':<26} {'frames':>6} {'valid':>5} {'wall s':>7} {'fps':>6} {'cpu ms/f':>8} {'detect':>7} {'track':>7} {'fit':>7} "
           f"{'overlay':>7} {'px before':>9} {'px after':>8} {'load':>5}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        s = r["stages_s"]
        print(f"{r['video']:<26} {r['frames']:>6} {r['valid_frames']:>5} {r['wall_s']:>7.1f} {r['fps']:>6.1f} {r['cpu_ms_per_frame']:>8.1f} "
              f"{s.get('detect', 0):>7.1f} {s.get('track', 0):>7.1f} {s.get('fit', 0):>7.1f} {s.get('overlay', 0):>7.1f} "
              f"{r['reproj_px_before'] or float('nan'):>9.2f} {r['reproj_px_after'] or float('nan'):>8.2f} {r['load_avg_at_start'] or 0:>5.1f}")
    result = {"environment": env, "videos": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
