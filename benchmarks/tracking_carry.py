"""Does the test-time correction of the tracking carry from the last training frames to the held-out tail?

    python benchmarks/tracking_carry.py RUN [--last K] [--steps STEPS]

Issue 14's analysis of a FlashAvatar run (CPU): the avatar frozen, the tracking of the last K training
frames is refined against their own images (the test-time-refinement machinery, STEPS Adam steps; no
held-out image is used), and the mean of those corrections is added to every held-out frame's tracking
before scoring (flashavatar protocol, PSNR).  Printed beside it: the fixed-tracking figure, the per-frame
test-time refinement of the held-out frames (the second protocol), and the mean of that refinement's
corrections applied to all held-out frames (what a perfect carry of one constant offset could give).
A diagnostic (docs/BENCHMARKS.md, "Carrying the training tail's tracking correction"), not a protocol.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headavatar.headmodels.params import FrameParams  # noqa: E402
from headavatar.methods import load_avatar  # noqa: E402
from headavatar.methods.evaluate import score_batch  # noqa: E402
from headavatar.methods.flashavatar.refine import refine_frames  # noqa: E402
from headavatar.metrics.lpips import LPIPSCache  # noqa: E402
from headavatar.metrics.protocols import aggregate  # noqa: E402
from headavatar.subjects.dataset import FrameDataset, collate, prepare_targets  # noqa: E402

KEYS = ("expression", "joint_rotations", "translation")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--last", type=int, default=90, help="training frames at the end of the training part to refine")
    ap.add_argument("--steps", type=int, default=30, help="Adam steps of each refinement")
    a = ap.parse_args()

    av = load_avatar(a.run, "cpu")
    cfg, subj, model, bg = av.cfg, av.subject, av.model, av.background
    tr = subj.tracking
    H, W = av.size
    train, test = subj.split["train"], subj.split["test"]

    def batches(frames, bs=8):
        data = FrameDataset(subj, frames, (H, W))
        for s in range(0, len(frames), bs):
            b = collate([data[k] for k in range(s, min(s + bs, len(frames)))])
            idx = [int(i) for i in b["index"]]
            yield b, prepare_targets(b, bg, av.device), idx, tr.cameras(idx, subj.height, subj.width, av.device).resized(H, W)

    def refine_set(frames) -> dict:
        """Per-frame corrections (refined minus tracked) of ``frames``, concatenated."""
        parts = []
        for _b, tgt, idx, cams in batches(frames):
            with torch.enable_grad():
                p, _ = refine_frames(model, cfg, tr, model.head, idx, tgt, cams, bg, a.steps, cfg.test_refine_lr, av.backend)
            base = tr.params(idx)
            d = {k: getattr(p, k) - getattr(base, k) for k in KEYS}
            d["extras"] = {k: p.extras[k] - base.extras[k] for k in base.extras}
            parts.append(d)
        out = {k: torch.cat([d[k] for d in parts]) for k in KEYS}
        out["extras"] = {k: torch.cat([d["extras"][k] for d in parts]) for k in parts[0]["extras"]}
        return out

    def mean_of(d: dict, last: int | None = None, pose_only: bool = False) -> dict:
        sel = slice(-last, None) if last else slice(None)
        m = {k: d[k][sel].mean(0) for k in KEYS}
        m["extras"] = {k: v[sel].mean(0) for k, v in d["extras"].items()}
        if pose_only:  # head pose and position only: expression and extras left as tracked
            m["expression"] = torch.zeros_like(m["expression"])
            m["extras"] = {k: torch.zeros_like(v) for k, v in m["extras"].items()}
        return m

    lpips_cache = LPIPSCache()  # unused (LPIPS off); score_batch takes one

    def score(frames, const: dict | None = None, per_frame: dict | None = None) -> float:
        rows, off = [], 0
        for b, tgt, idx, cams in batches(frames):
            p = tr.params(idx)
            if const is not None or per_frame is not None:
                n = len(idx)
                d = const if const is not None else {k: (v[off:off + n] if k != "extras" else {e: w[off:off + n] for e, w in v.items()})
                                                     for k, v in per_frame.items()}
                p = FrameParams(p.shape, p.expression + d["expression"], p.joint_rotations + d["joint_rotations"],
                                p.translation + d["translation"], {k: p.extras[k] + d["extras"][k] for k in p.extras})
            off += len(idx)
            with torch.no_grad():
                pred = av.render(p, cams)["rgb"].permute(0, 3, 1, 2)
            rows.extend(score_batch("flashavatar", pred, b, tgt, av, lpips_cache, idx, False))
        return aggregate(rows)["mean"]["psnr"]

    def pose_text(m: dict) -> str:
        return f"root rotation {(m['joint_rotations'][0] * 57.2958).numpy().round(3)} deg, translation {(m['translation'] * 1e3).numpy().round(3)} mm"

    t0 = time.time()
    print(f"fixed tracking: {score(test):.3f} dB over {len(test)} held-out frames", flush=True)
    dt = refine_set(train[-a.last:])
    for n in (a.last, max(1, a.last // 3)):
        m = mean_of(dt, n)
        print(f"carried mean correction of the last {n} training frames: {score(test, const=m):.3f} dB ({pose_text(m)})", flush=True)
    print(f"carried, head pose and position only (last {a.last}): {score(test, const=mean_of(dt, a.last, pose_only=True)):.3f} dB", flush=True)
    dh = refine_set(test)
    print(f"test-time refinement per held-out frame (second protocol): {score(test, per_frame=dh):.3f} dB", flush=True)
    mh = mean_of(dh)
    print(f"its mean correction applied to every held-out frame: {score(test, const=mh):.3f} dB ({pose_text(mh)})", flush=True)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
