"""Parsing quality and stability on tracked subjects: the stored labels against a re-parse with today's parser.

    python benchmarks/parsing_stability.py SUBJECT_DIR [SUBJECT_DIR ...] [--png figure.png] [--json out.json]

Each subject must have been tracked by ``headavatar track`` (it keeps the
MediaPipe points in landmarks_mediapipe.npz; frames and the matte are read
from the subject).  For the labels hair, neck, clothing and the head mask
(labels 1-7, what training keeps), the *flicker* is the mean over consecutive
valid frames of 1 - IoU(label at t, label at t+1): real motion contributes to
both columns alike, label noise only where it happens.  ``--png``: five frames
per subject, image / stored labels / re-parsed labels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

PALETTE = np.array([[0, 0, 0], [255, 200, 150], [120, 60, 0], [0, 0, 255], [255, 0, 0], [120, 0, 120], [255, 255, 0], [0, 255, 0],
                    [0, 150, 255], [255, 0, 255]], np.uint8)
LABELS = {"hair": (6,), "neck": (7,), "clothing": (8,), "head_mask": (1, 2, 3, 4, 5, 6, 7)}


def flicker(maps: list[np.ndarray], valid: np.ndarray) -> dict[str, float]:
    out = {}
    for name, labs in LABELS.items():
        vals = []
        for t in range(len(maps) - 1):
            if not (valid[t] and valid[t + 1]):
                continue
            a, b = np.isin(maps[t], labs), np.isin(maps[t + 1], labs)
            union = (a | b).sum()
            if union:
                vals.append(1.0 - (a & b).sum() / union)
        out[name] = round(float(np.mean(vals)), 4) if vals else None
    return out


def reparse(subject_dir: Path):
    from headavatar.subjects.format import Subject
    from headavatar.tracking.parsing import FrameParser

    s = Subject.open(subject_dir)
    pts = np.load(subject_dir / "landmarks_mediapipe.npz")["points"]
    parser = FrameParser()
    stored, new, images = [], [], []
    t = time.perf_counter()
    cost = 0.0
    for i in range(s.num_frames):
        f = s.load_frame(i)
        p = pts[i] if np.isfinite(pts[i, 0, 0]) else None
        c = time.perf_counter()
        new.append(parser(p, f["alpha"], f["image"]))
        cost += time.perf_counter() - c
        stored.append(f["parsing"])
        images.append(f["image"][::4, ::4])
    return s, stored, new, images, cost / s.num_frames, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("subjects", nargs="+")
    ap.add_argument("--png")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    results, rows = [], []
    for d in args.subjects:
        s, stored, new, images, ms, _ = reparse(Path(d))
        valid = np.asarray(s.tracking.valid, bool)
        r = {"subject": Path(d).name, "frames": s.num_frames, "stored": flicker(stored, valid), "reparsed": flicker(new, valid),
             "parse_ms_per_frame": round(1000 * ms, 2)}
        results.append(r)
        print(json.dumps(r))
        if args.png:
            idx = np.linspace(0, s.num_frames - 1, 5).astype(int)
            tint = lambda img, lab: (0.5 * img + 0.5 * PALETTE[lab[::4, ::4]]).astype(np.uint8)  # noqa: E731
            rows.append(np.concatenate([np.concatenate([images[i], tint(images[i], stored[i]), tint(images[i], new[i])], 0) for i in idx], 1))
    if args.png:
        from PIL import Image

        w = max(r.shape[1] for r in rows)
        Image.fromarray(np.concatenate([np.pad(r, ((0, 0), (0, w - r.shape[1]), (0, 0))) for r in rows], 0)).save(args.png)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
