"""Import FlashAvatar data: ``dataset/<id>/{imgs,alpha,parsing}`` + metrical-tracker ``checkpoint/*.frame``.

What is read (as FlashAvatar-code reads it, see docs/FORMATS.md):

* ``imgs/%05d.jpg`` (1-based), ``alpha/%05d.jpg``, ``parsing/%05d_neckhead.png`` and
  ``%05d_mouth.png`` (binary masks);
* ``checkpoint/%05d.frame`` (0-based), each a ``torch.save`` dict of numpy arrays:
  ``flame.{shape,exp,jaw,eyes,eyelids}`` (jaw/eyes as 6D rotations),
  ``opencv.{R,t,K}`` (world->camera, pixels), ``img_size`` ([H, W]).

Head motion stays in the camera (FLAME's global rotation, neck and translation are
zero), as in the reference.  The reference's defects are fixed, not copied: the
principal point is kept, non-square images work, the pairing of tracker frames and
images is an explicit table (``.frame`` k <-> image k + offset, offset 1 by default
or detected from the tracker's own input images), a tracker one frame short
(metrical-tracker#22) is reported, and clips of 500 frames or fewer still get a
training set.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from headavatar.constants import ALPHA_FOREGROUND_U8, DEFAULT_FPS
from headavatar.errors import UserError
from headavatar.log import get_logger
from headavatar.subjects.format import LABEL_IDS, Subject, SubjectWriter, Tracking
from headavatar.subjects.importers.common import gray, load_flame, put_frame, split_last
from headavatar.utils.io import read_image
from headavatar.utils.rotations import matrix_to_axis_angle, rotation_6d_to_matrix

IMAGE_EXTS = (".jpg", ".png", ".jpeg")

_log = get_logger(__name__)


# -------------------------------------------------------------- .frame files
def _numpy_safe_globals() -> list:
    """numpy's array reconstructors under their numpy 1 and numpy 2 names, for torch's weights-only loader."""
    from numpy._core import multiarray as ma

    out = [ma._reconstruct, (ma._reconstruct, "numpy.core.multiarray._reconstruct"), ma.scalar,
           (ma.scalar, "numpy.core.multiarray.scalar"), np.ndarray, np.dtype]
    out += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return out


def load_tracker_frame(path: Path) -> dict:
    """One metrical-tracker ``.frame`` as a flat dict ``{"flame.exp": array, ...}``.

    Loaded with ``torch.load(weights_only=True)`` and numpy's reconstructors allowed:
    no code from the file runs (torch >= 2.6 refuses these files by default).
    """
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} holds objects other than arrays ({first}); it is not a metrical-tracker checkpoint") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{path} is damaged or not a torch file ({type(e).__name__}: {first}); re-run the tracker on this frame") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a metrical-tracker checkpoint (it holds a {type(data).__name__}, not a dict)")
    flat: dict = {}

    def walk(prefix, d):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + ".", v)
            else:
                flat[key] = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
        return flat

    return walk("", data)


_NEEDED = ("flame.exp", "flame.jaw", "flame.eyes", "opencv.R", "opencv.t", "opencv.K")


def _arr(fr: dict, key: str, shape_tail: tuple, path: Path) -> np.ndarray:
    if key not in fr:
        raise UserError(f"{path} lacks '{key}'; it is not a complete metrical-tracker checkpoint")
    a = np.asarray(fr[key], dtype=np.float64)
    want = int(np.prod(shape_tail))
    if a.size != want and not (len(shape_tail) == 1 and shape_tail[0] == -1):
        raise UserError(f"{path}: '{key}' has shape {a.shape}, expected {shape_tail}")
    if not np.isfinite(a).all():
        raise UserError(f"{path}: '{key}' contains NaN or Inf; re-run the tracker on this frame")
    return a.reshape(shape_tail)


def _rot6d_to_aa(d6: np.ndarray) -> np.ndarray:
    """[...,6] (PyTorch3D row layout, possibly not normalised) -> [...,3] axis-angle."""
    t = torch.as_tensor(d6, dtype=torch.float64)
    return matrix_to_axis_angle(rotation_6d_to_matrix(t)).numpy()


# --------------------------------------------------------------- pairing
def _frame_files(tracker_dir: Path) -> tuple[Path, list[tuple[int, Path]]]:
    if not tracker_dir.exists():
        raise UserError(f"tracker folder {tracker_dir} does not exist; pass metrical-tracker's output/<id>/checkpoint folder")
    ck = tracker_dir / "checkpoint" if (tracker_dir / "checkpoint").is_dir() else tracker_dir
    files = []
    for p in ck.glob("*.frame"):
        if not re.fullmatch(r"\d+", p.stem):
            raise UserError(f"{p}: tracker files are named by frame number (00000.frame ...); rename or remove this one")
        files.append((int(p.stem), p))
    if not files:
        raise UserError(f"no .frame files in {ck}; pass metrical-tracker's output/<id>/checkpoint folder (after tracking finished)")
    files.sort()
    return ck, files


def _image_path(folder: Path, k: int) -> Path | None:
    for ext in IMAGE_EXTS:
        p = folder / f"{k:05d}{ext}"
        if p.is_file():
            return p
    return None


def _image_numbers(folder: Path) -> list[int]:
    return sorted(int(p.stem) for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and re.fullmatch(r"\d+", p.stem))


def detect_frame_offset(ck: Path, frames: list[tuple[int, Path]], imgs: Path, candidates=(1, 0, 2)) -> tuple[int | None, str]:
    """Which image the tracker saw for .frame k: compare the tracker's own ``input/%05d.png``
    copies (metrical-tracker writes them next to ``checkpoint/``) with imgs/ at a few offsets."""
    inp = ck.parent / "input"
    probes = [(k, inp / f"{k:05d}.png") for k, _ in frames[:3]]
    probes = [(k, p) for k, p in probes if p.is_file()]
    if not probes:
        return None, "no tracker input images to compare with"
    scores = {}
    for off in candidates:
        errs = []
        for k, p in probes:
            ip = _image_path(imgs, k + off)
            if ip is None:
                break
            a = read_image(p, "L").astype(np.float32)
            b = read_image(ip, "L").astype(np.float32)
            if a.shape != b.shape:
                break
            errs.append(np.abs(a - b).mean())
        if len(errs) == len(probes):
            scores[off] = float(np.mean(errs))
    if not scores:
        return None, "the tracker's input images do not match imgs/ in size"
    best = min(scores, key=scores.get)
    others = [v for o, v in scores.items() if o != best]
    if others and min(others) < 2 * scores[best] + 1.0:
        return None, f"the tracker's input images do not single out one pairing (mean abs differences {scores})"
    return best, f"matched the tracker's input images (mean abs difference {scores[best]:.2f} at offset {best})"


# ------------------------------------------------------------------ import
def import_flashavatar(
    dataset_dir,
    tracker_dir,
    flame_dir,
    out_dir,
    *,
    test_frames: int | float | None = 500,
    max_train: int | None = 10000,
    frame_offset: int | None = None,
    principal_point: str = "tracker",
    fps: float = DEFAULT_FPS,
    overwrite: bool = False,
    model_path=None,
    masks_path=None,
    template_obj=None,
    landmarks_path=None,
    eyelids_dir=None,
    log: Callable[[str], None] | None = _log.info,
) -> Subject:
    """FlashAvatar's data (``dataset/<id>`` + metrical-tracker's checkpoints) -> a native subject.

    ``test_frames``: the last N frames (int, default 500 as the reference) or a fraction
    (float < 1) are held out; ``max_train`` caps the training frames (reference: 10000).
    ``frame_offset``: image number of ``.frame`` 0 (None: detected from the tracker's
    input images when present, else 1 as FlashAvatar pairs them).  ``principal_point``:
    "tracker" (metrical-tracker's K comes from PyTorch3D's screen convention, whose
    centred camera has cx = W/2: already ours) or "opencv" (integer pixel centres: +0.5).
    """
    say = log or (lambda s: None)
    dataset_dir = Path(dataset_dir).expanduser()
    imgs_dir = dataset_dir / "imgs"
    if not imgs_dir.is_dir():
        raise UserError(f"{dataset_dir} has no imgs/ folder; pass FlashAvatar's dataset/<id> folder (with imgs/, alpha/, parsing/)")
    if principal_point not in ("tracker", "opencv"):
        raise UserError(f"principal_point must be 'tracker' or 'opencv', got '{principal_point}'")
    ck, frames = _frame_files(Path(tracker_dir).expanduser())
    img_numbers = _image_numbers(imgs_dir)
    if not img_numbers:
        raise UserError(f"{imgs_dir} holds no numbered images (00001.jpg ...)")

    notes: list[str] = []
    pairing = _pair_frames(ck, frames, imgs_dir, img_numbers, frame_offset, notes)
    pairs, frame_offset = pairing.pairs, pairing.offset
    tr = _read_tracker_frames(ck, pairs, principal_point)
    first = read_image(pairs[0][2], "RGB")
    H, W = first.shape[:2]
    _match_image_size(tr, H, W, notes)
    _model, spec = _load_flame_for(ck, tr, notes, flame_dir, model_path=model_path, masks_path=masks_path,
                                  template_obj=template_obj, landmarks_path=landmarks_path, eyelids_dir=eyelids_dir)
    N = len(pairs)
    tracking = tr.tracking(timestamps=np.array([(k + frame_offset - 1) / fps for k, _, _ in pairs], dtype=np.float64))
    split, split_notes = split_last(N, test_frames, max_train)
    notes += split_notes
    for s in split_notes:
        warnings.warn(s, stacklevel=2)

    # keep the source's image format: JPEG files are copied as they are (no re-encoding loss)
    ext = ".jpg" if pairs[0][2].suffix.lower() in (".jpg", ".jpeg") else ".png"
    writer = SubjectWriter(out_dir, image_ext=ext, overwrite=overwrite)
    _write_frames(writer, dataset_dir, pairs, frame_offset, first, log and say)

    meta = {
        "source": {
            "format": "flashavatar",
            "dataset": dataset_dir.name,
            "frame_offset": frame_offset,
            "frame_offset_from": pairing.how,
            # the explicit pairing: subject frame n <- tracker .frame, image number
            "frames": [[int(k), int(k + frame_offset)] for k, _, _ in pairs],
            "frames_columns": ["tracker_frame", "image_number"],
            "camera": "head motion in the camera (FLAME global/neck rotation and translation are zero); K, R, t from opencv.{K,R,t}",
            "principal_point": principal_point,
            "notes": notes,
        }
    }
    subj = writer.finalize(tracking, spec, (H, W), split=split, fps=fps, extra_meta=meta)
    say(f"imported {N} frames ({W}x{H}) from {dataset_dir} + {ck}: {len(split['train'])} train, {len(split['test'])} test; "
        f"frame k.frame <-> image k+{frame_offset} ({pairing.how})")
    return subj


# ------------------------------------------------------------- import: parts
@dataclass
class _Pairing:
    """Tracker frames and images paired: ``pairs`` of (frame number, .frame path, image path)."""

    pairs: list[tuple[int, Path, Path]]
    offset: int  # image number of .frame 0
    how: str  # how the offset was decided


def _pair_frames(ck: Path, frames: list[tuple[int, Path]], imgs_dir: Path, img_numbers: list[int],
                 frame_offset: int | None, notes: list[str]) -> _Pairing:
    """The explicit pairing table: the offset given, detected, or FlashAvatar's (1); a tracker
    one frame short (metrical-tracker#22) is noted, and warned about when the offset was a guess."""
    offset_how, confirmed = "given", True
    if frame_offset is None:
        det, why = detect_frame_offset(ck, frames, imgs_dir)
        if det is None:
            frame_offset, offset_how, confirmed = 1, f"FlashAvatar's pairing (.frame k <-> image k+1); {why}", False
        else:
            frame_offset, offset_how = det, why
    frame_offset = int(frame_offset)

    pairs, missing = [], []
    for k, p in frames:
        ip = _image_path(imgs_dir, k + frame_offset)
        (pairs if ip is not None else missing).append((k, p, ip))
    if missing:
        k = missing[0][0]
        raise UserError(
            f"{len(missing)} tracker frame(s) have no image (first: {missing[0][1].name} needs imgs/{k + frame_offset:05d}.jpg "
            f"at offset {frame_offset}); the images and checkpoints do not pair up: check --frame-offset or the folders"
        )
    used = {k + frame_offset for k, _, _ in pairs}
    unused = [n for n in img_numbers if n not in used]
    if len(unused) == 1 and len(pairs) == len(img_numbers) - 1:
        msg = (f"the tracker output is one frame short of the images ({len(pairs)} .frame files, {len(img_numbers)} images; "
               f"metrical-tracker#22): image {unused[0]:05d} is not used")
        if not confirmed and unused[0] == img_numbers[-1]:
            # the guess pairs .frame 0 with image 1; a tracker run with begin_frames: 1 started at image 2
            msg += (f". If the tracker ran with begin_frames: 1, .frame k is image k+{frame_offset + 1}: "
                    f"re-import with --frame-offset {frame_offset + 1}")
            warnings.warn(msg, stacklevel=3)  # attributed to import_flashavatar's caller
        notes.append(msg)
    elif unused:
        notes.append(f"{len(unused)} image(s) without a tracker frame are not used (first: {unused[0]:05d})")
    return _Pairing(pairs, frame_offset, offset_how)


@dataclass
class _TrackerData:
    """What the .frame files hold, stacked over the paired frames (float64 until stored)."""

    shape: np.ndarray  # [S], from the first frame
    expression: np.ndarray  # [N,E]
    joint_rotations: np.ndarray  # [N,5,3] axis-angle: global, neck (zero), jaw, eyes
    K: np.ndarray  # [N,3,3]
    R: np.ndarray  # [N,3,3]
    t: np.ndarray  # [N,3]
    eyelids: np.ndarray  # [N,2]
    img_size: tuple[int, int] | None  # the tracker's [H, W], when stored

    def tracking(self, timestamps: np.ndarray) -> Tracking:
        N = len(self.expression)
        return Tracking(
            shape=self.shape.astype(np.float32),
            expression=self.expression.astype(np.float32),
            joint_rotations=self.joint_rotations.astype(np.float32),
            translation=np.zeros((N, 3), np.float32),
            K=self.K.astype(np.float32), R=self.R.astype(np.float32), t=self.t.astype(np.float32),
            extras={"eyelids": self.eyelids.astype(np.float32)},
            timestamps=timestamps,
        )


def _read_tracker_frames(ck: Path, pairs: list[tuple[int, Path, Path]], principal_point: str) -> _TrackerData:
    """Read and check every paired .frame: the identity from the first, per-frame expression,
    jaw/eye rotations (6D -> axis-angle), camera and eyelids."""
    N = len(pairs)
    exprs, rots, Ks, Rs, ts, lids = [], [], [], [], [], []
    shape = None
    img_size = None
    for n, (_, fpath, _) in enumerate(pairs):
        fr = load_tracker_frame(fpath)
        missing_keys = [key for key in _NEEDED if key not in fr]
        if missing_keys:
            raise UserError(f"{fpath} lacks {', '.join(missing_keys)}; it is not a complete metrical-tracker checkpoint")
        if n == 0:
            if "flame.shape" not in fr:
                raise UserError(f"{fpath} lacks 'flame.shape'; the identity is read from the first frame")
            shape = _arr(fr, "flame.shape", (-1,), fpath)
            if "img_size" in fr:
                img_size = tuple(int(x) for x in np.asarray(fr["img_size"]).reshape(-1)[:2])
        e = _arr(fr, "flame.exp", (-1,), fpath)
        if exprs and e.shape != exprs[0].shape:
            raise UserError(f"{fpath}: {e.size} expression values, the first frame has {exprs[0].size}; the checkpoints come from different runs")
        exprs.append(e)
        jaw = _arr(fr, "flame.jaw", (6,), fpath)
        eyes = _arr(fr, "flame.eyes", (2, 6), fpath)
        rots.append(np.concatenate([np.zeros((2, 6)), jaw[None], eyes]))  # global, neck filled below
        Ks.append(_arr(fr, "opencv.K", (3, 3), fpath))
        Rs.append(_arr(fr, "opencv.R", (3, 3), fpath))
        ts.append(_arr(fr, "opencv.t", (3,), fpath))
        lids.append(_arr(fr, "flame.eyelids", (2,), fpath) if "flame.eyelids" in fr else np.zeros(2))
    rot6 = np.stack(rots)  # [N,5,6]
    aa = _rot6d_to_aa(rot6[:, 2:])  # jaw, eyes
    joint_rot = np.concatenate([np.zeros((N, 2, 3)), aa], 1)
    K = np.stack(Ks)
    R = np.stack(Rs)
    if np.abs(np.linalg.det(R) - 1).max() > 1e-3:
        raise UserError(f"{ck}: 'opencv.R' is not a rotation in every frame; the checkpoints are damaged")
    if principal_point == "opencv":
        K[:, 0, 2] += 0.5
        K[:, 1, 2] += 0.5
    return _TrackerData(shape, np.stack(exprs), joint_rot, K, R, np.stack(ts), np.stack(lids), img_size)


def _match_image_size(tr: _TrackerData, H: int, W: int, notes: list[str]) -> None:
    """Scale the intrinsics when the images are the tracker's at another size (same aspect ratio only)."""
    if tr.img_size is None or tr.img_size == (H, W):
        return
    sy, sx = H / tr.img_size[0], W / tr.img_size[1]
    if abs(sx - sy) > 1e-3 * max(sx, sy):
        raise UserError(
            f"images are {W}x{H} but the tracker ran at {tr.img_size[1]}x{tr.img_size[0]} (img_size [H, W]) with another aspect ratio; "
            "use the tracker's cropped images"
        )
    tr.K[:, :2] *= sx
    notes.append(f"images are {W}x{H}, the tracker's {tr.img_size[1]}x{tr.img_size[0]}: intrinsics scaled by {sx:.4g}")


def _load_flame_for(ck: Path, tr: _TrackerData, notes: list[str], flame_dir, **files) -> tuple:
    """The user's FLAME, cut to the tracked shape/expression sizes; missing eyelid blendshapes are warned about."""
    n_shape, n_expr = tr.shape.size, tr.expression.shape[1]
    model, spec = load_flame(flame_dir, n_shape=int(min(n_shape, 300)), n_expr=int(min(n_expr, 100)), **files)
    if n_shape > 300 or n_expr > 100:
        raise UserError(f"{ck}: {n_shape} shape / {n_expr} expression values, FLAME 2020 has at most 300 / 100")
    if not model.meta.get("eyelids"):
        msg = ("eyelid blendshapes (l_eyelid.npy, r_eyelid.npy) not found in the FLAME folder: the tracked eyelids are stored "
               "but not applied, and the condition vector lacks them (118 instead of 120); copy them from metrical-tracker's flame/blendshapes/")
        warnings.warn(msg, stacklevel=3)  # attributed to import_flashavatar's caller
        notes.append(msg)
    return model, spec


def _write_frames(writer: SubjectWriter, dataset_dir: Path, pairs: list[tuple[int, Path, Path]], frame_offset: int,
                  first: np.ndarray, say: Callable[[str], None] | None) -> None:
    """Copy every paired image with its matte and the labels made from FlashAvatar's two masks."""
    H, W = first.shape[:2]
    N = len(pairs)
    alpha_dir, parsing_dir = dataset_dir / "alpha", dataset_dir / "parsing"
    for n, (k, _, ip) in enumerate(pairs):
        num = k + frame_offset
        img = first if n == 0 else read_image(ip, "RGB")
        if img.shape[:2] != (H, W):
            raise UserError(f"{ip} is {img.shape[1]}x{img.shape[0]}, the first image {W}x{H}; all frames must have one size")
        alpha = _read_mask(alpha_dir, num, ("",), (H, W), "alpha")
        head = _read_mask(parsing_dir, num, ("_neckhead",), (H, W), "neck-head mask")
        mouth = _read_mask(parsing_dir, num, ("_mouth",), (H, W), "mouth mask")
        parsing = parsing_from_masks(alpha, head, mouth)
        put_frame(writer, n, ip, img, alpha, parsing)
        if say and (n + 1) % 500 == 0:
            say(f"  {n + 1}/{N} frames")


def _read_mask(folder: Path, num: int, suffixes: tuple[str, ...], size: tuple[int, int], what: str) -> np.ndarray | None:
    if not folder.is_dir():
        return None
    for suf in suffixes:
        for ext in (".png", ".jpg", ".jpeg"):
            p = folder / f"{num:05d}{suf}{ext}"
            if p.is_file():
                a = gray(read_image(p), what, p)
                if a.shape != size:
                    raise UserError(f"{what} {p} is {a.shape[1]}x{a.shape[0]}, the image {size[1]}x{size[0]}")
                return a
    raise UserError(f"{what} for image {num:05d} is missing from {folder} (looked for {num:05d}{suffixes[0]}.png/.jpg)")


def parsing_from_masks(alpha: np.ndarray | None, neckhead: np.ndarray | None, mouth: np.ndarray | None) -> np.ndarray | None:
    """FlashAvatar's two binary masks -> headavatar labels.

    neck-head minus mouth -> skin (1); mouth (lips + inner mouth, which the masks do not
    tell apart) -> lips (4); outside the neck-head but in the matte -> clothing (8).
    Lips rather than mouth interior: the lips have FLAME geometry, so a method that
    treats the interior as geometry-less (FLARE) is not misled on the larger part.
    """
    if neckhead is None:
        return None
    H, W = neckhead.shape
    lab = np.zeros((H, W), np.uint8)
    if alpha is not None:
        lab[alpha > ALPHA_FOREGROUND_U8] = LABEL_IDS["clothing"]
    head = neckhead > ALPHA_FOREGROUND_U8
    lab[head] = LABEL_IDS["skin"]
    if mouth is not None:
        lab[head & (mouth > ALPHA_FOREGROUND_U8)] = LABEL_IDS["lips"]
    return lab
