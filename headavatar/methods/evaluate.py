"""`headavatar eval`: render the held-out frames of a run and score them (protocol stated in the output)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from headavatar.errors import UserError
from headavatar.subjects.dataset import FrameDataset, collate, prepare_targets
from headavatar.utils.device import sync
from headavatar.utils.io import write_image, write_json
from headavatar.utils.video import to_uint8, write_video


def evaluate_run(run_dir, device="cpu", split: str = "test", batch_size: int = 4, video: bool = True, progress: bool = True, lpips: bool = True,
                 head_overrides: dict | None = None, protocol: str | None = None, out_name: str | None = None) -> dict:
    """Score a run; ``protocol``: "flashavatar" or "imavatar" (default: the method's own).

    Writes RUN_DIR/eval/metrics.json (or metrics_<protocol>.json when another protocol is asked for).
    """
    from headavatar.methods import load_avatar
    from headavatar.metrics.lpips import LPIPSCache
    from headavatar.metrics.protocols import aggregate, evaluate_frames

    avatar = load_avatar(run_dir, device, head_overrides)
    protocol = protocol or avatar.eval_protocol
    if protocol not in ("flashavatar", "imavatar"):
        raise UserError(f"unknown protocol '{protocol}'; choose flashavatar or imavatar")
    subj = avatar.subject
    frames = subj.split.get(split, [])
    if not frames:
        raise UserError(f"subject {subj.root} has no '{split}' frames to evaluate")
    H, W = avatar.size
    data = FrameDataset(subj, frames, (H, W))
    tr = subj.tracking
    lpips_cache = LPIPSCache()
    rows = []
    render_time = 0.0
    side_by_side = []
    bar = tqdm(total=len(frames), disable=not progress, desc=f"eval {avatar.method}", unit="frame")
    for s in range(0, len(frames), batch_size):
        b = collate([data[k] for k in range(s, min(s + batch_size, len(frames)))])
        tgt = prepare_targets(b, avatar.background, avatar.device)
        idx = b["index"].numpy()
        cams = tr.cameras(idx, subj.height, subj.width, avatar.device).resized(H, W)
        params = tr.params(idx, avatar.device)
        sync(avatar.device)
        t = time.perf_counter()
        out = avatar.render(params, cams)
        sync(avatar.device)
        render_time += time.perf_counter() - t
        pred = out["rgb"].permute(0, 3, 1, 2)
        if protocol == "imavatar":
            gt_img = b["image"].to(avatar.device).permute(0, 3, 1, 2).float() / 255
            mask = b["alpha"].to(avatar.device).float() / 255
            res = evaluate_frames(pred, gt_img, mask, "imavatar", exclude=(b["parsing"].to(avatar.device) == 8).float(),
                                  lpips_cache=lpips_cache, frame_ids=[int(i) for i in idx], lpips=lpips)
        else:
            # gt = img·(alpha·head) + bg·(1 − alpha·head): the training targets' compositing
            gt_img = b["image"].to(avatar.device).permute(0, 3, 1, 2).float() / 255
            res = evaluate_frames(pred, gt_img, tgt["alpha"][..., 0], "flashavatar", background=avatar.background,
                                  lpips_cache=lpips_cache, frame_ids=[int(i) for i in idx], lpips=lpips)
        rows.extend(res)
        for j in range(len(idx)):
            side_by_side.append(np.concatenate([to_uint8(tgt["gt"][j]), to_uint8(out["rgb"][j])], 1))
        bar.update(len(idx))
    bar.close()
    summary = aggregate(rows)
    out_dir = Path(run_dir) / "eval"
    result = {
        "method": avatar.method,
        "split": split,
        "num_frames": len(rows),
        "resolution": [H, W],
        "checkpoint_step": avatar.step,
        "protocol": summary["protocol"],
        "frames": [int(f) for f in frames],
        "metrics": {"mean": summary["mean"], "median": summary["median"]},
        "skipped_frames": summary["skipped"],
        "render_fps": len(rows) / max(render_time, 1e-9),
        "render_fps_note": f"model evaluation + rasterisation only (no I/O), batch {batch_size}, device {avatar.device}",
        "per_frame": rows,
    }
    write_json(out_dir / (out_name or ("metrics.json" if protocol == avatar.eval_protocol else f"metrics_{protocol}.json")), result)
    if video:
        write_video(out_dir / "side_by_side.mp4", side_by_side, fps=subj.fps)
    worst = sorted((r for r in rows if not r.get("skipped")), key=lambda r: r["psnr"])[:3]
    for r in worst:
        k = frames.index(r["frame"])
        write_image(out_dir / "worst" / f"{r['frame']:06d}.jpg", side_by_side[k])
    return result
