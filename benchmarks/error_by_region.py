"""Where the error of a trained FlashAvatar run sits: squared error summed per parsing region, held-out vs training frames.

    python benchmarks/error_by_region.py RUN [RUN ...] [--device cpu] [--batch-size 4] [--max-frames N]

For each split, the share of the total squared error (over the whole image, as the flashavatar
protocol scores it) that falls on each parsing label of the ground truth (skin, hair, neck, ...,
outside_head = outside the head mask: background and clothing), and the PSNR the image would have if that region were
perfect.  Tells whether held-out error is the face (expression, tracking) or hair/neck/edges.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def region_errors(run, device="cpu", split="test", batch_size=4, max_frames=None) -> dict:
    import torch

    from headavatar.constants import LABELS
    from headavatar.methods import load_avatar
    from headavatar.subjects.dataset import FrameDataset, collate, prepare_targets

    av = load_avatar(run, device)
    subj, tr = av.subject, av.subject.tracking
    frames = list(subj.split[split])[: max_frames or None]
    H, W = av.size
    data = FrameDataset(subj, frames, (H, W))
    # inside the head mask: per label of the ground truth's parsing; outside it (background, clothing): one region
    sse = {"outside_head": 0.0, **{name: 0.0 for k, name in LABELS.items() if k != 0}}
    pixels = 0
    with torch.no_grad():
        for s in range(0, len(frames), batch_size):
            b = collate([data[k] for k in range(s, min(s + batch_size, len(frames)))])
            tgt = prepare_targets(b, av.background, av.device)
            idx = b["index"].numpy()
            cams = tr.cameras(idx, subj.height, subj.width, av.device).resized(H, W)
            pred = av.render(tr.params(idx, av.device), cams)["rgb"].clamp(0, 1)
            err = ((pred - tgt["gt"]) ** 2).sum(-1)  # [B,H,W]
            lab = b["parsing"].to(av.device).long()
            head = tgt["head_mask"][..., 0] > 0.5
            sse["outside_head"] += float(err[~head].sum())
            for k, name in LABELS.items():
                if k != 0:
                    sse[name] += float(err[(lab == k) & head].sum())
            pixels += err.numel()
    total = sum(sse.values())
    mse = total / (pixels * 3)
    out = {"split": split, "frames": len(frames), "psnr": -10 * math.log10(max(mse, 1e-12)), "regions": {}}
    for name, v in sse.items():
        if v > 0:
            rest = (total - v) / (pixels * 3)
            out["regions"][name] = {"share": v / total, "psnr_if_perfect": -10 * math.log10(max(rest, 1e-12))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-frames", type=int, default=None)
    args = ap.parse_args(argv)
    for run in args.runs:
        for split in ("test", "train"):
            r = region_errors(run, args.device, split, args.batch_size, args.max_frames)
            top = sorted(r["regions"].items(), key=lambda kv: -kv[1]["share"])
            print(f"{run} {split} ({r['frames']} frames, {r['psnr']:.2f} dB): "
                  + ", ".join(f"{k} {v['share'] * 100:.0f}% (perfect: {v['psnr_if_perfect']:.2f})" for k, v in top if v["share"] > 0.01))
            print(json.dumps({"run": str(run), **r}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
