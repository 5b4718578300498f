"""Import IMavatar-format data (read by IMavatar, FLARE, PointAvatar): one or more sequences of

    <seq>/image/<k>.png  mask/<k>.png  semantic/<k>.png  flame_params.json     (k from 1)

``flame_params.json``: ``intrinsics`` [-fx/S, fy/S, cx/S, cy/S] (fx negated, normalised by
the image size), ``shape_params`` (100), and per frame ``file_path`` ("./image/<k>"),
``world_mat`` (3x4 world->camera [R|t], t about (0, 0, -4)), ``expression`` (50), ``pose``
(15 axis-angle: global, neck, jaw, left eye, right eye) and ``flame_keypoints`` (68 or 70
points in [-1, 1]).  The FLAME of these files is scaled by 4.

The camera chain (IMavatar preprocess/optimize.py): x_c = R X + t with X the x4 FLAME
points, the camera looking down -z, and keypoint = 2*i0*x_c/z_c + 2*i2 - 1 (likewise y).
As an OpenCV camera in metres: R' = F R, t' = F t / 4, fx = W|i0|, fy = H|i1|, cx = W i2,
cy = H i3, with F = diag(1, -1, -1) for IMavatar's signs (in general F is chosen from the
signs of i0, i1 and the depth, and a mirrored combination is refused).  The keypoints map
the image edges to -1 and 1, so cx, cy are already in headavatar's pixel-centre-at-+0.5
convention.  The chain is checked by projecting FLAME's landmarks onto ``flame_keypoints``.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from headavatar.constants import DEFAULT_FPS
from headavatar.errors import UserError
from headavatar.headmodels.base import HeadModel
from headavatar.log import get_logger
from headavatar.subjects.format import Subject, SubjectWriter, Tracking
from headavatar.subjects.importers.common import CELEBAMASK_TO_LABELS, gray, load_flame, put_frame, split_last
from headavatar.utils.io import read_image

FRAME_KEYS = ("file_path", "world_mat", "expression", "pose")

_log = get_logger(__name__)


# ----------------------------------------------------------------- reading
def find_sequences(root: Path) -> dict[str, Path]:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{root} does not exist or is not a folder; pass the subject folder that holds the sequences")
    if (root / "flame_params.json").is_file():
        return {root.name: root}
    seqs = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and (p / "flame_params.json").is_file()}
    if not seqs:
        raise UserError(f"no sequence with a flame_params.json under {root} (expected <root>/<sequence>/flame_params.json)")
    return seqs


def read_params(seq: Path) -> dict:
    path = seq / "flame_params.json"
    try:
        js = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(js, dict):
        raise UserError(f"{path} is not an IMavatar flame_params.json (expected an object)")
    for key in ("intrinsics", "frames", "shape_params"):
        if key not in js:
            raise UserError(f"{path} lacks '{key}'; it is not an IMavatar flame_params.json")
    intr = np.asarray(js["intrinsics"], dtype=np.float64).reshape(-1)
    if intr.shape != (4,) or not np.isfinite(intr).all() or intr[0] == 0 or intr[1] == 0:
        raise UserError(f"{path}: 'intrinsics' must be 4 numbers [-fx/S, fy/S, cx/S, cy/S], got {js['intrinsics']}")
    if not isinstance(js["frames"], list) or not js["frames"]:
        raise UserError(f"{path}: 'frames' is empty")
    for n, fr in enumerate(js["frames"]):
        miss = [k for k in FRAME_KEYS if k not in fr]
        if miss:
            raise UserError(f"{path}: frame {n} ({fr.get('file_path', '?')}) lacks {', '.join(miss)}")
    return js


def _frame_number(fp: str, path: Path) -> int:
    m = re.fullmatch(r"(?:\./)?image/(\d+)(?:\.\w+)?", str(fp).strip())
    if not m:
        raise UserError(f"{path}: file_path '{fp}' is not of the form ./image/<k>")
    return int(m.group(1))


def _find(folder: Path, k: int) -> Path | None:
    for ext in (".png", ".jpg", ".jpeg"):
        p = folder / f"{k}{ext}"
        if p.is_file():
            return p
    return None


def opencv_camera(intr: np.ndarray, world_mat: np.ndarray, H: int, W: int, source_scale: float,
                  head_point: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IMavatar (intrinsics, world_mat) -> headavatar (K, R, t) in metres; see the module docstring."""
    M = np.asarray(world_mat, dtype=np.float64)
    R, t = M[:3, :3], M[:3, 3]
    z = (R @ head_point + t)[2]
    if abs(z) < 1e-9:
        raise UserError("world_mat puts the camera at the head's depth; it cannot see the head")
    sz = np.sign(z)
    sx, sy = np.sign(intr[0]) * sz, np.sign(intr[1]) * sz
    if sx * sy * sz < 0:
        raise UserError(
            "the intrinsics' signs and world_mat give a mirrored image (no rotation reproduces it); IMavatar files store "
            "fx negated with the camera looking down -z: check the sign of intrinsics[0]"
        )
    F = np.diag([sx, sy, sz])
    K = np.array([[W * abs(intr[0]), 0, W * intr[2]], [0, H * abs(intr[1]), H * intr[3]], [0, 0, 1]])
    return K, F @ R, F @ t / source_scale


# -------------------------------------------------------------- the check
@torch.no_grad()
def landmark_reprojection(model: HeadModel, tracking: Tracking, keypoints: np.ndarray, H: int, W: int, chunk: int = 128) -> np.ndarray:
    """Pixel distance between FLAME's projected 68 landmarks and the keypoints ([N,68,2], pixels) -> [N,68]."""
    errs = []
    for s in range(0, tracking.num_frames, chunk):
        idx = np.arange(s, min(s + chunk, tracking.num_frames))
        p = tracking.params(idx)
        v = model(shape=p["shape"][:, : model.num_shape], expression=p["expression"], joint_rotations=p["joint_rotations"],
                  translation=p["translation"], extras=p["extras"])
        uv = tracking.cameras(idx, H, W).project(model.landmarks(v)).numpy()
        errs.append(np.linalg.norm(uv - keypoints[idx], axis=-1))
    return np.concatenate(errs)


# ------------------------------------------------------------------ import
def import_imavatar(
    subject_root,
    flame_dir,
    out_dir,
    *,
    train: list[str] | str | None = None,
    test: list[str] | str | None = None,
    source_scale: float = 4.0,
    fps: float = DEFAULT_FPS,
    overwrite: bool = False,
    max_landmark_error: float | None = None,
    model_path=None,
    masks_path=None,
    template_obj=None,
    landmarks_path=None,
    log: Callable[[str], None] | None = _log.info,
) -> Subject:
    """IMavatar/FLARE sequences -> one native subject; split = the named train/test sequences.

    Sequences are the folders under ``subject_root`` with a ``flame_params.json`` (or the
    root itself).  Unnamed: with several sequences the last (by name) is the test set;
    with one, its last 15% of frames.  FLAME is used in metres (``source_scale`` = 4 is
    divided out of the cameras), so the subject shares the FLAME of FlashAvatar data.
    ``max_landmark_error`` (pixels): refuse the import when the landmark check's mean
    error exceeds it.
    """
    say = log or (lambda s: None)
    seqs = find_sequences(Path(subject_root))
    notes: list[str] = []
    train_l, test_l = _choose_sequences(seqs, train, test, subject_root, notes)
    if not (float(source_scale) > 0):
        raise UserError(f"source_scale must be positive, got {source_scale}")

    order = [(n, "train") for n in train_l] + [(n, "test") for n in test_l]
    params = {n: read_params(seqs[n]) for n, _ in order}
    shape = _common_shape(seqs, params, order, train_l[0], notes)
    E = len(params[train_l[0]]["frames"][0]["expression"])
    if shape.size > 300 or E > 100:
        raise UserError(f"{shape.size} shape / {E} expression parameters; FLAME 2020 has at most 300 / 100")

    model, spec = load_flame(flame_dir, n_shape=shape.size, n_expr=E, eyelids=False, model_path=model_path,
                             masks_path=masks_path, template_obj=template_obj, landmarks_path=landmarks_path)
    head_point = model.template.double().mean(0).numpy() * source_scale

    items = _gather_frames(seqs, params, order)
    first = read_image(items[0].image, "RGB")
    H, W = first.shape[:2]
    if H != W:
        msg = f"images are {W}x{H}: IMavatar's normalised intrinsics assume square images; using W for x and H for y"
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)

    tracking, keypoints = _read_tracking(seqs, params, items, shape, E, H, W, source_scale, head_point, fps)
    check = _landmark_check(model, tracking, keypoints, items, order, H, W, max_landmark_error, notes, say)

    N = len(items)
    roles = np.array([it.role for it in items])
    if test_l:
        split = {"train": [int(i) for i in np.nonzero(roles == "train")[0]], "test": [int(i) for i in np.nonzero(roles == "test")[0]]}
    else:
        split, sn = split_last(N, None)
        notes += sn

    writer = SubjectWriter(out_dir, image_ext=".png", overwrite=overwrite)
    _write_frames(writer, seqs, items, first)

    meta = {
        "source": {
            "format": "imavatar",
            "sequences": {"train": train_l, "test": test_l},
            "frames": [[it.sequence, int(it.number)] for it in items],
            "frames_columns": ["sequence", "image_number"],
            "source_scale": float(source_scale),
            "camera": "OpenCV from IMavatar's chain: R' = F R, t' = F t / source_scale, fx = W|i0|, fy = H|i1|, cx = W i2, cy = H i3",
            "landmark_check": check,
            "notes": notes,
        }
    }
    subj = writer.finalize(tracking, spec, (H, W), split=split, fps=fps, extra_meta=meta)
    say(f"imported {N} frames ({W}x{H}) from {len(order)} sequence(s): train {', '.join(train_l)}"
        + (f"; test {', '.join(test_l)}" if test_l else "; test = last 15% of the frames"))
    return subj


# ------------------------------------------------------------- import: parts
class _Frame(NamedTuple):
    """One frame to import: its sequence, role (train/test), image number, image file and JSON entry."""

    sequence: str
    role: str
    number: int
    image: Path
    params: dict


def _choose_sequences(seqs: dict[str, Path], train, test, subject_root, notes: list[str]) -> tuple[list[str], list[str]]:
    """The train and test sequences: as named, the complement of the named ones, or by default
    the last sequence (by name) for testing when there are several."""
    names = list(seqs)

    def as_list(x, what):
        if x is None:
            return None
        lst = [s.strip() for s in (x.split(",") if isinstance(x, str) else x) if s.strip()]
        bad = [s for s in lst if s not in seqs]
        if bad:
            raise UserError(f"{what} sequence(s) {', '.join(bad)} not found under {subject_root}; it has: {', '.join(names)}")
        return lst

    train_l, test_l = as_list(train, "train"), as_list(test, "test")
    if train_l is None and test_l is None:
        if len(names) > 1:
            train_l, test_l = names[:-1], names[-1:]
            notes.append(f"no train/test sequences named: training on {', '.join(train_l)}, testing on {test_l[0]}")
        else:
            train_l, test_l = names, []
    elif train_l is None:
        train_l = [n for n in names if n not in test_l]
    elif test_l is None:
        test_l = [n for n in names if n not in train_l]
    overlap = set(train_l) & set(test_l)
    if overlap:
        raise UserError(f"sequence(s) {', '.join(sorted(overlap))} are named for both training and testing")
    if not train_l:
        raise UserError("no training sequence left; name them with --train")
    return train_l, test_l


def _common_shape(seqs: dict[str, Path], params: dict[str, dict], order: list[tuple[str, str]], ref: str, notes: list[str]) -> np.ndarray:
    """The identity (shape_params) of sequence ``ref``; other sequences with another identity are warned about."""
    shape = np.asarray(params[ref]["shape_params"], dtype=np.float64).reshape(-1)
    for n, _ in order:
        other = np.asarray(params[n]["shape_params"], dtype=np.float64).reshape(-1)
        if other.shape != shape.shape:
            raise UserError(f"{seqs[n] / 'flame_params.json'}: {other.size} shape parameters, {ref} has {shape.size}")
        d = float(np.abs(other - shape).max())
        if d > 1e-4:
            msg = f"sequence {n} has other shape_params than {ref} (max difference {d:.3g}); using {ref}'s"
            warnings.warn(msg, stacklevel=3)  # attributed to import_imavatar's caller
            notes.append(msg)
    return shape


def _gather_frames(seqs: dict[str, Path], params: dict[str, dict], order: list[tuple[str, str]]) -> list[_Frame]:
    """Every frame of the chosen sequences, in order, with its image file (which must exist)."""
    items = []
    for n, role in order:
        seq = seqs[n]
        path = seq / "flame_params.json"
        for fr in params[n]["frames"]:
            k = _frame_number(fr["file_path"], path)
            ip = _find(seq / "image", k)
            if ip is None:
                raise UserError(f"{seq / 'image'} has no image {k}.png for frame '{fr['file_path']}' of {path}")
            items.append(_Frame(n, role, k, ip, fr))
    return items


def _read_tracking(seqs: dict[str, Path], params: dict[str, dict], items: list[_Frame], shape: np.ndarray, E: int, H: int, W: int,
                   source_scale: float, head_point: np.ndarray, fps: float) -> tuple[Tracking, np.ndarray | None]:
    """Check each frame's parameters and convert its camera; returns the tracking and the
    keypoints in pixels ([N,68,2]; None unless every frame has ``flame_keypoints``)."""
    N = len(items)
    exprs, poses, Ks, Rs, ts, kps = [], [], [], [], [], []
    have_kp = True
    for n_, _, k, _, fr in items:
        where = f"{seqs[n_] / 'flame_params.json'} frame {k}"
        e = np.asarray(fr["expression"], dtype=np.float64).reshape(-1)
        p = np.asarray(fr["pose"], dtype=np.float64).reshape(-1)
        wm = np.asarray(fr["world_mat"], dtype=np.float64)
        if e.shape != (E,):
            raise UserError(f"{where}: {e.size} expression values, the first frame has {E}")
        if p.shape != (15,):
            raise UserError(f"{where}: 'pose' has {p.size} values, expected 15 (global, neck, jaw, eyes axis-angle)")
        if wm.shape not in ((3, 4), (4, 4)):
            raise UserError(f"{where}: 'world_mat' has shape {wm.shape}, expected 3x4")
        for name, a in (("expression", e), ("pose", p), ("world_mat", wm)):
            if not np.isfinite(a).all():
                raise UserError(f"{where}: '{name}' contains NaN or Inf")
        if abs(np.linalg.det(wm[:3, :3]) - 1) > 1e-3:
            raise UserError(f"{where}: the rotation of 'world_mat' is not a rotation (det {np.linalg.det(wm[:3, :3]):.3g})")
        intr = np.asarray(params[n_]["intrinsics"], dtype=np.float64).reshape(-1)
        K, R, t = opencv_camera(intr, wm, H, W, source_scale, head_point)
        exprs.append(e)
        poses.append(p.reshape(5, 3))
        Ks.append(K)
        Rs.append(R)
        ts.append(t)
        kp = fr.get("flame_keypoints")
        if kp is None:
            have_kp = False
        elif have_kp:
            kp = np.asarray(kp, dtype=np.float64)
            if kp.ndim != 2 or kp.shape[1] != 2 or kp.shape[0] < 68:
                raise UserError(f"{where}: 'flame_keypoints' has shape {kp.shape}, expected 68 (or 70) x 2")
            kps.append(np.stack([(kp[:68, 0] + 1) * W / 2, (kp[:68, 1] + 1) * H / 2], -1))

    tracking = Tracking(
        shape=shape.astype(np.float32), expression=np.stack(exprs).astype(np.float32),
        joint_rotations=np.stack(poses).astype(np.float32), translation=np.zeros((N, 3), np.float32),
        K=np.stack(Ks).astype(np.float32), R=np.stack(Rs).astype(np.float32), t=np.stack(ts).astype(np.float32),
        timestamps=np.array([(it.number - 1) / fps for it in items], dtype=np.float64),
    )
    return tracking, (np.stack(kps) if have_kp else None)


def _landmark_check(model: HeadModel, tracking: Tracking, keypoints: np.ndarray | None, items: list[_Frame],
                    order: list[tuple[str, str]], H: int, W: int, max_landmark_error: float | None, notes: list[str],
                    say: Callable[[str], None]) -> dict:
    """The camera-chain check: FLAME's landmarks projected onto ``flame_keypoints``; refuses the
    import above ``max_landmark_error`` and warns above 2% of the image size."""
    if keypoints is None:
        check = {"skipped": "flame_keypoints missing in some frame"}
    elif not model.meta.get("has_landmarks"):
        check = {"skipped": "no FLAME landmark embedding (landmark_embedding.npy) in the FLAME folder"}
    else:
        err = landmark_reprojection(model, tracking, keypoints, H, W)
        check = {
            "mean_px": float(err.mean()), "inner_mean_px": float(err[:, 17:].mean()),
            "median_px": float(np.median(err)), "max_px": float(err.max()),
            "per_sequence_mean_px": {n: float(err[[i for i, it in enumerate(items) if it.sequence == n]].mean()) for n, _ in order},
            "image_size": [H, W],
            "note": "FLAME's static 68 landmarks vs IMavatar's flame_keypoints; the 17 jaw-line points of the keypoints slide "
                    "with head yaw (DECA's dynamic contour), so inner_mean_px (points 18-68) is the cleaner figure",
        }
    if check.get("skipped"):
        say(f"landmark check skipped: {check['skipped']}")
        warnings.warn(f"landmark reprojection check skipped: {check['skipped']}", stacklevel=3)
        return check
    say(f"landmark reprojection: mean {check['mean_px']:.3f} px, inner face {check['inner_mean_px']:.3f} px, max {check['max_px']:.3f} px ({W}x{H})")
    if max_landmark_error is not None and check["mean_px"] > max_landmark_error:
        raise UserError(
            f"FLAME's landmarks land {check['mean_px']:.2f} px (mean) from flame_keypoints, more than the allowed {max_landmark_error} px: "
            "the camera chain or the FLAME files do not match this data (check source_scale and that FLAME 2020 is used)"
        )
    if check["inner_mean_px"] > 0.02 * max(H, W):
        msg = (f"FLAME's landmarks land {check['inner_mean_px']:.1f} px (mean, inner face) from flame_keypoints: the cameras or "
               "FLAME files may not match this data")
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
    return check


def _write_frames(writer: SubjectWriter, seqs: dict[str, Path], items: list[_Frame], first: np.ndarray) -> None:
    """Store every frame with its mask (or the image's alpha channel) and its semantic map as labels."""
    H, W = first.shape[:2]
    for i, (n_, _, k, ip, _) in enumerate(items):
        seq = seqs[n_]
        img = first if i == 0 else read_image(ip, "RGB")
        if img.shape[:2] != (H, W):
            raise UserError(f"{ip} is {img.shape[1]}x{img.shape[0]}, the first image {W}x{H}; all frames must have one size")
        alpha = None
        mp = _find(seq / "mask", k)
        if mp is not None:
            # read as uint8 and kept as a matte (flare#5's all-zero masks came from a float read)
            alpha = gray(read_image(mp), "mask", mp)
        else:
            raw = read_image(ip)
            if raw.ndim == 3 and raw.shape[2] == 4:
                alpha = raw[..., 3]
            elif (seq / "mask").is_dir():
                raise UserError(f"mask {seq / 'mask'}/{k}.png is missing")
        parsing = None
        sp = _find(seq / "semantic", k)
        if sp is not None:
            parsing = semantic_to_labels(read_image(sp), sp)
        elif (seq / "semantic").is_dir():
            raise UserError(f"semantic map {seq / 'semantic'}/{k}.png is missing")
        for name, a in (("mask", alpha), ("semantic map", parsing)):
            if a is not None and a.shape != (H, W):
                raise UserError(f"{name} of {ip} is {a.shape[1]}x{a.shape[0]}, the image {W}x{H}")
        put_frame(writer, i, ip, img, alpha, parsing)


def semantic_to_labels(a: np.ndarray, path: Path) -> np.ndarray:
    """CelebAMask-HQ class map (grey or palette PNG) -> headavatar labels."""
    if a.ndim == 3:
        if a.shape[2] >= 3 and not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
            raise UserError(f"{path} is a colour picture, not a class map (0..18 per pixel); use the face-parsing label output")
        a = a[..., 0]
    if a.max() >= len(CELEBAMASK_TO_LABELS):
        raise UserError(f"{path} has class {int(a.max())}; CelebAMask-HQ face parsing has classes 0..18")
    return CELEBAMASK_TO_LABELS[a]
