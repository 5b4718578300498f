"""Compact subject storage: size, fidelity and decode speed against the per-file layout.

    python benchmarks/subject_storage.py SUBJECT_DIR [--out DIR] [--crf 16] [--json results.json]

Converts SUBJECT_DIR (per-file layout) to the compact chunk layout in --out
(default: a temporary folder), then reports both sizes, the PSNR of the
stored images against the source subject's (every frame), whether alpha and
parsing came back bit-exact, and frames per second reading frame by frame in
order and at random (one process, one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def folder_mb(root: Path, only: tuple[str, ...] | None = None) -> float:
    files = [f for f in root.rglob("*") if f.is_file() and (only is None or f.relative_to(root).parts[0] in only)]
    return sum(f.stat().st_size for f in files) / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("subject")
    ap.add_argument("--out")
    ap.add_argument("--crf", type=int, default=16)
    ap.add_argument("--json")
    ap.add_argument("--random-reads", type=int, default=200)
    args = ap.parse_args(argv)
    from headavatar.subjects.convert import convert_subject
    from headavatar.subjects.format import Subject

    src = Subject.open(args.subject)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="compact_"))
    t = time.perf_counter()
    dst = convert_subject(src.root, out, crf=args.crf, overwrite=True, progress=False)
    t_convert = time.perf_counter() - t
    src = Subject.open(args.subject)  # fresh readers, no warm caches
    dst = Subject.open(out)
    se, n = 0.0, src.num_frames
    psnr = []
    exact = True
    t_src = t_dst = 0.0
    for i in range(n):
        t = time.perf_counter()
        a = src.load_frame(i)
        t_src += time.perf_counter() - t
        t = time.perf_counter()
        b = dst.load_frame(i)
        t_dst += time.perf_counter() - t
        mse = float(np.mean((a["image"].astype(np.float64) - b["image"]) ** 2))
        se += mse
        psnr.append(10 * np.log10(255**2 / max(mse, 1e-12)))
        exact &= bool((a["alpha"] == b["alpha"]).all() and (a["parsing"] == b["parsing"]).all())
    rng = np.random.default_rng(0)
    idx = rng.integers(0, n, args.random_reads)
    dst = Subject.open(out)
    t = time.perf_counter()
    for i in idx:
        dst.load_frame(int(i))
    t_rand = time.perf_counter() - t
    src = Subject.open(args.subject)
    t = time.perf_counter()
    for i in idx:
        src.load_frame(int(i))
    t_rand_src = time.perf_counter() - t
    res = {
        "subject": str(src.root), "frames": n, "size": [src.height, src.width], "crf": args.crf,
        "source_mb": round(folder_mb(src.root), 1), "source_images_mb": round(folder_mb(src.root, ("frames", "alpha", "parsing")), 1),
        "compact_mb": round(folder_mb(out), 1), "compact_images_mb": round(folder_mb(out, ("chunks",)), 1),
        "psnr_db_mean_of_clip": round(float(10 * np.log10(255**2 / (se / n))), 2), "psnr_db_min_frame": round(float(min(psnr)), 2),
        "masks_bit_exact": exact, "convert_s": round(t_convert, 1),
        "read_fps_in_order": {"source": round(n / t_src, 1), "compact": round(n / t_dst, 1)},
        "read_fps_random": {"source": round(len(idx) / t_rand_src, 1), "compact": round(len(idx) / t_rand, 1)},
        "load_average": os.getloadavg(),
    }
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
