"""The native subject format (version 1). docs/SUBJECT_FORMAT.md is the spec.

    SUBJECT_DIR/
      subject.json        format, version, image size, head-model spec, split, fps, frame count
      tracking.npz        per-frame tracking (see ``Tracking``)
      frames/000000.png   RGB uint8 (png or jpg; ``image_ext`` in subject.json)
      alpha/000000.png    foreground matte, uint8 grey
      parsing/000000.png  parsing labels, uint8 (``LABELS``)

or, in the compact layout (``"storage": {"layout": "chunks"}``, format
version 2), ``chunks/000000_rgb.mkv`` + ``chunks/000000_masks.mkv`` per 16
frames instead of the three image folders (subjects/chunks.py).  Readers
handle both; ``load_frame`` hides the difference.

Frames are decoded lazily, one at a time, and stay uint8 until the training
step moves a batch to the accelerator.  subject.json is written last, so a
folder without it is an unfinished subject.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from headavatar.camera import Cameras
from headavatar.constants import (  # noqa: F401 (the label names are re-exported)
    ALPHA_FOREGROUND_U8,
    DEFAULT_FPS,
    HEAD_LABELS,
    LABEL_IDS,
    LABELS,
    MOUTH_LABELS,
    TEST_FRACTION,
)
from headavatar.errors import UserError
from headavatar.headmodels.params import FrameParams
from headavatar.utils.io import read_image, read_json, save_npz, write_image, write_json

FORMAT_NAME = "headavatar-subject"
FORMAT_VERSION = 2  # the newest this code reads and writes; version 1 = the per-image-file layout only
FRAME_LAYOUT = "frames"  # one image file per frame and map (version 1)

# Parsing labels (uint8 values in parsing/*.png): defined in headavatar.constants, re-exported here.


@dataclass
class Tracking:
    """Per-frame tracking of one subject; N frames, arrays are numpy.

    Cameras follow the project convention (headavatar.camera): OpenCV
    world-to-camera R, t and pixel K at the stored image size.
    """

    shape: np.ndarray  # [S] identity coefficients
    expression: np.ndarray  # [N,E]
    joint_rotations: np.ndarray  # [N,J,3] axis-angle per joint (root first)
    translation: np.ndarray  # [N,3]
    K: np.ndarray  # [N,3,3]
    R: np.ndarray  # [N,3,3]
    t: np.ndarray  # [N,3]
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [N,K] (e.g. FLAME eyelids)
    valid: np.ndarray | None = None  # [N] bool: tracking succeeded on this frame
    timestamps: np.ndarray | None = None  # [N] seconds
    landmarks2d: np.ndarray | None = None  # [N,68,2] detected landmarks in pixels (optional)

    def __post_init__(self) -> None:
        n = self.num_frames
        if self.valid is None:
            self.valid = np.ones(n, dtype=bool)
        if self.timestamps is None:
            self.timestamps = np.arange(n, dtype=np.float64) / 25.0

    @property
    def num_frames(self) -> int:
        return int(self.expression.shape[0])

    _ARRAYS = ("shape", "expression", "joint_rotations", "translation", "K", "R", "t", "valid", "timestamps")

    def save(self, path: str | os.PathLike) -> None:
        arrays = {k: np.asarray(getattr(self, k)) for k in self._ARRAYS}
        for k, v in self.extras.items():
            arrays[f"extra__{k}"] = np.asarray(v, dtype=np.float32)
        if self.landmarks2d is not None:
            arrays["landmarks2d"] = np.asarray(self.landmarks2d, dtype=np.float32)
        save_npz(path, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tracking":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path} does not exist: the subject has no tracking; re-create or re-import it")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as e:  # zip/npy errors come in many types
            raise UserError(f"{path} is unreadable ({type(e).__name__}: {e}); re-create or re-import the subject") from None
        missing = [k for k in cls._ARRAYS if k not in data and k not in ("valid", "timestamps")]
        if missing:
            raise UserError(f"{path} lacks the arrays {missing}; it was not written by headavatar or is damaged")
        extras = {k[len("extra__"):]: data.pop(k) for k in list(data) if k.startswith("extra__")}
        tr = cls(
            shape=data["shape"].astype(np.float32),
            expression=data["expression"].astype(np.float32),
            joint_rotations=data["joint_rotations"].astype(np.float32),
            translation=data["translation"].astype(np.float32),
            K=data["K"].astype(np.float32),
            R=data["R"].astype(np.float32),
            t=data["t"].astype(np.float32),
            extras={k: v.astype(np.float32) for k, v in extras.items()},
            valid=data["valid"].astype(bool) if "valid" in data else None,
            timestamps=data["timestamps"].astype(np.float64) if "timestamps" in data else None,
            landmarks2d=data.get("landmarks2d"),
        )
        return tr

    def check(self, where: str = "tracking", num_joints: int | None = None, num_expression: int | None = None, extras: dict[str, int] | None = None) -> None:
        """Raise UserError if shapes disagree with each other or with the head model."""
        n = self.num_frames
        shapes = {
            "expression": (self.expression, (n, None)),
            "joint_rotations": (self.joint_rotations, (n, num_joints, 3)),
            "translation": (self.translation, (n, 3)),
            "K": (self.K, (n, 3, 3)),
            "R": (self.R, (n, 3, 3)),
            "t": (self.t, (n, 3)),
            "valid": (self.valid, (n,)),
            "timestamps": (self.timestamps, (n,)),
        }
        if num_expression is not None:
            shapes["expression"] = (self.expression, (n, num_expression))
        for name, (arr, want) in shapes.items():
            got = tuple(np.shape(arr))
            if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
                want_s = "x".join("?" if w is None else str(w) for w in want)
                raise UserError(f"{where}: '{name}' has shape {'x'.join(map(str, got))}, expected {want_s}; "
                                "the tracking does not match this subject or head model")
        if "gaze" in self.extras and self.extras["gaze"].shape != (n, 4):
            raise UserError(f"{where}: extra 'gaze' has shape {self.extras['gaze'].shape}, expected ({n}, 4): yaw and pitch of each eye")
        for name, k in (extras or {}).items():
            if name in self.extras and self.extras[name].shape != (n, k):
                raise UserError(f"{where}: extra '{name}' has shape {self.extras[name].shape}, expected ({n}, {k})")
        for name in ("expression", "joint_rotations", "translation", "K", "R", "t"):
            if not np.isfinite(getattr(self, name)).all():
                raise UserError(f"{where}: '{name}' contains NaN or Inf; re-run tracking")

    def cameras(self, idx, height: int, width: int, device=None) -> Cameras:
        idx = np.atleast_1d(np.asarray(idx))
        f = lambda a: torch.as_tensor(a[idx], dtype=torch.float32, device=device)  # noqa: E731
        return Cameras(f(self.K), f(self.R), f(self.t), height, width)

    def params(self, idx, device=None) -> FrameParams:
        """Head-model inputs for frames ``idx`` as torch tensors."""
        idx = np.atleast_1d(np.asarray(idx))
        f = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
        return FrameParams(
            shape=f(np.broadcast_to(self.shape, (len(idx),) + self.shape.shape).copy()),
            expression=f(self.expression[idx]),
            joint_rotations=f(self.joint_rotations[idx]),
            translation=f(self.translation[idx]),
            extras={k: f(v[idx]) for k, v in self.extras.items()},
        )

    def neutral(self, batch: int = 1, device=None) -> FrameParams:
        """The canonical pose of this subject: its identity, zero expression and extras, every joint at rest,
        no translation (sizes as this tracking's)."""
        f = lambda *s: torch.zeros(*s, device=device)  # noqa: E731
        shape = torch.as_tensor(self.shape, dtype=torch.float32, device=device)
        return FrameParams(shape[None].expand(batch, -1).clone(), f(batch, self.expression.shape[1]), f(batch, self.joint_rotations.shape[1], 3),
                           f(batch, 3), {k: f(batch, v.shape[1]) for k, v in self.extras.items()})

    def on_device(self, device) -> "DeviceTracking":
        """All per-frame arrays uploaded once (they are small), indexed on the device without host syncs."""
        return DeviceTracking(self, device)

    def subset(self, idx) -> "Tracking":
        idx = np.asarray(idx)
        return Tracking(
            shape=self.shape, expression=self.expression[idx], joint_rotations=self.joint_rotations[idx],
            translation=self.translation[idx], K=self.K[idx], R=self.R[idx], t=self.t[idx],
            extras={k: v[idx] for k, v in self.extras.items()}, valid=self.valid[idx], timestamps=self.timestamps[idx],
            landmarks2d=None if self.landmarks2d is None else self.landmarks2d[idx],
        )


class DeviceTracking:
    """Tracking arrays as device tensors; ``params``/``cameras`` take a LongTensor of frame indices."""

    def __init__(self, tr: Tracking, device):
        f = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device)  # noqa: E731
        self.device = torch.device(device)
        self.shape = f(tr.shape)
        self.expression, self.joint_rotations, self.translation = f(tr.expression), f(tr.joint_rotations), f(tr.translation)
        self.K, self.R, self.t = f(tr.K), f(tr.R), f(tr.t)
        self.extras = {k: f(v) for k, v in tr.extras.items()}

    def params(self, idx) -> FrameParams:
        """Frames ``idx`` (a LongTensor, or anything torch.as_tensor takes) as ``Tracking.params`` gives them."""
        idx = torch.as_tensor(idx).to(self.device, non_blocking=True)
        return FrameParams(
            shape=self.shape[None].expand(idx.shape[0], -1),
            expression=self.expression[idx],
            joint_rotations=self.joint_rotations[idx],
            translation=self.translation[idx],
            extras={k: v[idx] for k, v in self.extras.items()},
        )

    def cameras(self, idx, height: int, width: int) -> Cameras:
        idx = torch.as_tensor(idx).to(self.device, non_blocking=True)
        return Cameras(self.K[idx], self.R[idx], self.t[idx], height, width)


def default_split(num_frames: int, test_fraction: float = TEST_FRACTION, min_test: int = 1, valid: np.ndarray | None = None) -> dict[str, list[int]]:
    """The last ``test_fraction`` of the clip is held out (as the references do with their last frames)."""
    if num_frames < 2:
        raise UserError(f"a subject needs at least 2 frames to hold some out (it has {num_frames})")
    n_test = max(min_test, int(round(num_frames * test_fraction)))
    n_test = min(n_test, num_frames - 1)
    idx = np.arange(num_frames)
    ok = np.ones(num_frames, bool) if valid is None else np.asarray(valid, bool)
    train = [int(i) for i in idx[: num_frames - n_test] if ok[i]]
    test = [int(i) for i in idx[num_frames - n_test :] if ok[i]]
    return {"train": train, "test": test}


class Subject:
    """A subject folder opened for reading.  ``Subject.open`` validates it."""

    def __init__(self, root: Path, meta: dict, tracking: Tracking):
        self.root = root
        self.meta = meta
        self.tracking = tracking

    # -------------------------------------------------------------- opening
    @classmethod
    def open(cls, root: str | os.PathLike) -> "Subject":
        root = Path(root)
        if not root.exists():
            raise UserError(f"subject folder {root} does not exist; create one with 'headavatar demo', 'headavatar track' or 'headavatar import'")
        if not root.is_dir():
            raise UserError(f"{root} is not a folder; pass a subject folder")
        meta_path = root / "subject.json"
        if not meta_path.is_file():
            if not any(root.iterdir()):
                raise UserError(f"subject folder {root} is empty; create a subject there first")
            raise UserError(f"{root} has no subject.json: it is not a headavatar subject (or its creation was interrupted; re-run it)")
        meta = read_json(meta_path)
        if meta.get("format") != FORMAT_NAME:
            raise UserError(f"{meta_path} is not a headavatar subject (format={meta.get('format')!r})")
        if int(meta.get("version", -1)) > FORMAT_VERSION:
            raise UserError(f"{root} uses subject format v{meta.get('version')}, newer than this headavatar (v{FORMAT_VERSION}); upgrade headavatar")
        tracking = Tracking.load(root / "tracking.npz")
        n = int(meta.get("num_frames", -1))
        tracking.check(where=str(root / "tracking.npz"))
        if tracking.num_frames != n:
            raise UserError(f"{root}: subject.json says {n} frames but tracking.npz has {tracking.num_frames}; the two are out of step, re-create the subject")
        subj = cls(root, meta, tracking)
        if subj.layout not in (FRAME_LAYOUT, "chunks"):
            raise UserError(f"{root} stores its frames in the layout {subj.layout!r}, unknown to this headavatar; upgrade headavatar")
        if subj.chunked:
            lost = subj._chunks().missing()
            if lost:
                raise UserError(f"{root}: {len(lost)} frame chunk files are missing (first: {lost[0].name}); restore them or re-create the subject")
        else:
            missing = [i for i in range(n) if not subj.frame_path(i).is_file()]
            if missing:
                raise UserError(f"{root}: {len(missing)} of {n} frame images are missing (first: {subj.frame_path(missing[0]).name}); "
                                "restore them or re-create the subject")
        for name in ("train", "test"):
            bad = [i for i in subj.split.get(name, []) if not 0 <= i < n]
            if bad:
                raise UserError(f"{root}: split '{name}' names frames outside 0..{n - 1} (e.g. {bad[0]})")
        if not subj.split.get("train"):
            raise UserError(f"{root}: the split has no training frames")
        return subj

    # ------------------------------------------------------------ properties
    @property
    def num_frames(self) -> int:
        return int(self.meta["num_frames"])

    @property
    def height(self) -> int:
        return int(self.meta["image_size"][0])

    @property
    def width(self) -> int:
        return int(self.meta["image_size"][1])

    @property
    def split(self) -> dict[str, list[int]]:
        return self.meta.get("split", {})

    @property
    def layout(self) -> str:
        """"frames" (one image file per frame) or "chunks" (compact: video chunks, subjects/chunks.py)."""
        return str((self.meta.get("storage") or {}).get("layout", FRAME_LAYOUT))

    @property
    def chunked(self) -> bool:
        return self.layout == "chunks"

    def _chunks(self):
        reader = getattr(self, "_chunk_reader", None)
        if reader is None:
            from headavatar.subjects.chunks import ChunkReader

            reader = self._chunk_reader = ChunkReader(self.root, int(self.meta["storage"]["chunk_frames"]), self.num_frames)
        return reader

    @property
    def fps(self) -> float:
        return float(self.meta.get("fps", DEFAULT_FPS))

    @property
    def head_model_spec(self) -> dict:
        return dict(self.meta["head_model"])

    def head_model(self, **overrides):
        """Build the subject's head model and check it is the one the tracking was made with."""
        from headavatar.headmodels import load_head_model

        spec = self.head_model_spec
        model = load_head_model(spec, **overrides)
        fp = spec.get("fingerprint")
        if fp and fp != model.fingerprint():
            raise UserError(
                f"the head model '{model.name}' loaded for {self.root} differs from the one it was tracked with "
                f"(fingerprint {model.fingerprint()} != {fp}); pass the same model files as when it was made"
            )
        self.tracking.check(where=str(self.root / "tracking.npz"), num_joints=model.num_joints, num_expression=model.num_expression,
                            extras=model.extras_sizes())
        return model

    def frame_path(self, i: int) -> Path:
        return self.root / "frames" / f"{i:06d}{self.meta.get('image_ext', '.png')}"

    def alpha_path(self, i: int) -> Path:
        return self.root / "alpha" / f"{i:06d}.png"

    def parsing_path(self, i: int) -> Path:
        return self.root / "parsing" / f"{i:06d}.png"

    def load_frame(self, i: int) -> dict[str, np.ndarray]:
        """One frame as uint8 arrays: image HxWx3, alpha HxW, parsing HxW (zeros/255 where absent)."""
        if self.chunked:
            if not 0 <= int(i) < self.num_frames:
                raise UserError(f"frame {i} is outside 0..{self.num_frames - 1} of {self.root}")
            img, alpha, parsing = self._chunks().read(int(i))
            if img.shape[:2] != (self.height, self.width):
                raise UserError(f"the frame chunks of {self.root} are {img.shape[1]}x{img.shape[0]}, but the subject is {self.width}x{self.height}")
            return {"image": img, "alpha": alpha, "parsing": parsing}
        img = read_image(self.frame_path(i), "RGB")
        H, W = img.shape[:2]
        if (H, W) != (self.height, self.width):
            raise UserError(f"{self.frame_path(i)} is {W}x{H}, but the subject is {self.width}x{self.height}; all frames must have one size")
        ap = self.alpha_path(i)
        alpha = read_image(ap, "L") if ap.is_file() else np.full((H, W), 255, np.uint8)
        pp = self.parsing_path(i)
        parsing = read_image(pp, "L") if pp.is_file() else np.where(alpha > ALPHA_FOREGROUND_U8, LABEL_IDS["skin"], 0).astype(np.uint8)
        for name, a in (("alpha", alpha), ("parsing", parsing)):
            if a.shape != (H, W):
                raise UserError(f"{name} map of frame {i} in {self.root} is {a.shape[1]}x{a.shape[0]}, expected {W}x{H}")
        return {"image": img, "alpha": alpha, "parsing": parsing}


class SubjectWriter:
    """Writes a subject folder: frames first, then tracking and subject.json (last, atomically)."""

    def __init__(self, root: str | os.PathLike, image_ext: str = ".png", overwrite: bool = False, layout: str = FRAME_LAYOUT, crf: int | None = None,
                 chunk_frames: int | None = None):
        """``layout``: "frames" (an image file per frame and map) or "chunks" (compact video chunks;
        ``crf`` sets their image quality, default chunks.DEFAULT_CRF; ``chunk_frames`` their length,
        default chunks.CHUNK_FRAMES: longer chunks are smaller, a random read decodes more).  Chunks take the frames in
        any order, but every frame of a chunk must come before it is written."""
        if layout not in (FRAME_LAYOUT, "chunks"):
            raise UserError(f"unknown subject storage layout {layout!r}; use 'frames' or 'chunks'")
        self.root = Path(root)
        self.layout = layout
        if (self.root / "subject.json").exists() and not overwrite:
            raise UserError(f"{self.root} already holds a subject; choose another output folder or pass --overwrite")
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{self.root} exists and is not a folder")
        for sub in (("frames", "alpha", "parsing") if layout == FRAME_LAYOUT else ("chunks",)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if overwrite and (self.root / "subject.json").exists():
            (self.root / "subject.json").unlink()  # the folder is unfinished until finalize()
        self.image_ext = image_ext
        self.count = 0
        self.crf = crf
        self._buffer = None
        if layout == "chunks":
            from headavatar.subjects.chunks import CHUNK_FRAMES, DEFAULT_CRF, ChunkBuffer

            self.crf = DEFAULT_CRF if crf is None else int(crf)
            self.chunk_frames = CHUNK_FRAMES if chunk_frames is None else int(chunk_frames)
            if not 1 <= self.chunk_frames <= 1024:
                raise UserError(f"chunk length {self.chunk_frames} is outside 1..1024 frames (16 is the default)")
            self._buffer = ChunkBuffer(self.chunk_frames)

    def storage_meta(self) -> dict:
        if self.layout == FRAME_LAYOUT:
            return {}
        return {"storage": {"layout": "chunks", "chunk_frames": self.chunk_frames, "codec": "h264-yuv444p", "crf": self.crf, "masks": "h264-yuv444p-lossless"}}

    def _chunk_frame(self, i: int, image, alpha, parsing, num_frames: int | None = None):
        """Buffer one frame of the compact layout; returns a complete chunk to encode, or None."""
        H, W = image.shape[:2]
        if alpha is None:
            alpha = np.full((H, W), 255, np.uint8)
        if parsing is None:
            parsing = np.where(alpha > ALPHA_FOREGROUND_U8, LABEL_IDS["skin"], 0).astype(np.uint8)
        return self._buffer.add(i, np.asarray(image, np.uint8), np.asarray(alpha, np.uint8), np.asarray(parsing, np.uint8), num_frames)

    def _encode_chunk(self, chunk) -> None:
        from headavatar.subjects.chunks import write_chunk

        start, images, alphas, parsings = chunk
        write_chunk(self.root, start, images, alphas, parsings, crf=self.crf)

    def flush_chunks(self) -> None:
        """Write the last, shorter chunk (called by finalize)."""
        if self._buffer is not None:
            for chunk in self._buffer.remaining():
                self._encode_chunk(chunk)

    def write_frame(self, i: int, image: np.ndarray, alpha: np.ndarray | None = None, parsing: np.ndarray | None = None) -> None:
        self.count = max(self.count, i + 1)
        if self.layout == "chunks":
            chunk = self._chunk_frame(i, image, alpha, parsing)
            if chunk is not None:
                self._encode_chunk(chunk)
            return
        write_image(self.root / "frames" / f"{i:06d}{self.image_ext}", image)
        if alpha is not None:
            write_image(self.root / "alpha" / f"{i:06d}.png", alpha)
        if parsing is not None:
            write_image(self.root / "parsing" / f"{i:06d}.png", parsing)
        self.count = max(self.count, i + 1)

    def finalize(self, tracking: Tracking, head_model_spec: dict, image_size: tuple[int, int], split: dict | None = None, fps: float = DEFAULT_FPS,
                 extra_meta: dict | None = None) -> Subject:
        n = tracking.num_frames
        self.flush_chunks()
        if n != self.count:
            raise UserError(f"{n} tracked frames but {self.count} images were written to {self.root}")
        tracking.check(where="tracking being written")
        tracking.save(self.root / "tracking.npz")
        meta = {
            "format": FORMAT_NAME,
            # version 1 readers can read the per-file layout; the compact one needs version 2
            "version": 1 if self.layout == FRAME_LAYOUT else 2,
            "num_frames": n,
            "image_size": [int(image_size[0]), int(image_size[1])],
            "image_ext": self.image_ext,
            "fps": float(fps),
            "head_model": head_model_spec,
            "split": split or default_split(n, valid=tracking.valid),
            "labels": {str(k): v for k, v in LABELS.items()},
            **self.storage_meta(),
            **(extra_meta or {}),
        }
        write_json(self.root / "subject.json", meta)
        return Subject.open(self.root)
