"""`headavatar render`: render a run's sequence, or another subject's tracking (reenactment)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from headavatar.errors import UserError
from headavatar.subjects.format import Subject, Tracking
from headavatar.utils.video import to_uint8, write_video


def reenactment_tracking(avatar, driver: Subject):
    """Driver's expressions/poses with the avatar's identity, seen through the avatar's own camera.

    Head motion may live in the driver's joints or in its cameras (metrical-tracker
    puts it in the camera); both are carried over: the driver's camera motion
    relative to its first frame is applied to the avatar's first camera.
    """
    tgt_name = avatar.head.name
    src = driver.head_model_spec
    if src.get("name") != tgt_name or (src.get("fingerprint") and src.get("fingerprint") != avatar.subject.head_model_spec.get("fingerprint")):
        raise UserError(
            f"reenactment needs a driver tracked with the same head model as the avatar "
            f"(avatar: {tgt_name} {avatar.subject.head_model_spec.get('fingerprint')}, driver: {src.get('name')} {src.get('fingerprint')})"
        )
    dtr = driver.tracking
    atr = avatar.subject.tracking
    n = dtr.num_frames
    R0, t0 = dtr.R[0], dtr.t[0]
    A_R, A_t = atr.R[0], atr.t[0]
    Rs, ts = [], []
    for i in range(n):
        # E_i' = A_0 * E_0^{-1} * E_i   (E = [R|t], world->camera)
        Rrel = R0.T @ dtr.R[i]
        trel = R0.T @ (dtr.t[i] - t0)
        Rs.append(A_R @ Rrel)
        ts.append(A_R @ trel + A_t)
    # the avatar's identity with the driver's motion, seen from the avatar's first camera moved as the driver's
    return Tracking(shape=atr.shape, expression=dtr.expression, joint_rotations=dtr.joint_rotations, translation=dtr.translation,
                    K=np.repeat(atr.K[:1], n, 0), R=np.stack(Rs).astype(np.float32), t=np.stack(ts).astype(np.float32), extras=dict(dtr.extras),
                    valid=dtr.valid, timestamps=dtr.timestamps)


def render_run(run_dir, out_path, driver_dir=None, device="cpu", frames: str = "all", batch_size: int = 4, side_by_side: bool = False, progress: bool = True,
               head_overrides: dict | None = None) -> int:
    from headavatar.methods import load_avatar
    from headavatar.subjects.dataset import FrameDataset, collate, prepare_targets

    out_path = Path(out_path)
    if out_path.suffix.lower() not in (".mp4", ".mov", ".mkv"):
        raise UserError(f"output {out_path} must be a video file (.mp4)")
    avatar = load_avatar(run_dir, device, head_overrides)
    subj = avatar.subject
    H, W = avatar.size
    dev = avatar.device
    if driver_dir is not None:
        driver = Subject.open(driver_dir)
        seq = reenactment_tracking(avatar, driver)
        idx = [i for i in range(driver.num_frames) if seq.valid[i]]
        fps = driver.fps
        ref_size = (subj.height, subj.width)
        side_by_side = False
    else:
        idx = {"all": list(range(subj.num_frames)), "test": subj.split.get("test", []), "train": subj.split["train"]}.get(frames)
        if idx is None:
            raise UserError(f"--frames must be all, train or test (got {frames})")
        seq = subj.tracking
        fps = subj.fps
        ref_size = (subj.height, subj.width)
    if not idx:
        raise UserError("no frames to render")
    gt_data = FrameDataset(subj, idx, (H, W)) if side_by_side else None

    def frames_iter():
        bar = tqdm(total=len(idx), disable=not progress, desc="render", unit="frame")
        for s in range(0, len(idx), batch_size):
            ii = np.array(idx[s : s + batch_size])
            cams = seq.cameras(ii, *ref_size, dev).resized(H, W)
            rgb = avatar.render(seq.params(ii, dev), cams)["rgb"]
            for j in range(len(ii)):
                img = to_uint8(rgb[j])
                if gt_data is not None:
                    gt = prepare_targets(collate([gt_data[s + j]]), avatar.background, dev)["gt"][0]
                    img = np.concatenate([to_uint8(gt), img], 1)
                yield img
            bar.update(len(ii))
        bar.close()

    return write_video(out_path, frames_iter(), fps=fps)
