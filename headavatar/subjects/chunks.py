"""Compact subject storage: frames and masks packed in short video chunks (layout "chunks").

A 1,510-frame subject at 512² takes about 130 MB as one JPEG (quality 95)
and two PNGs per frame; most of that is the matte, whose soft edge PNG
compresses poorly frame by frame.  Consecutive frames of a head video are
nearly the same picture, which only a video codec exploits, so this layout
stores every ``chunk_frames`` frames (16) as two small files:

* ``chunks/000016_rgb.mkv``: the images, H.264 4:4:4 (no chroma
  subsampling: colour edges of lips and eyes stay sharp), constant quality
  ``crf`` (16: ~45 dB PSNR against the stored source frames);
* ``chunks/000016_masks.mkv``: alpha in the Y plane and parsing labels in U,
  H.264 4:4:4 *lossless* (qp 0): bit-exact.

Each chunk starts with a key frame and is its own file, so reading frame i
decodes at most one chunk (cached: reading on in order costs one decode per
16 frames), writes are atomic per chunk and no seeking is needed.  PyAV
(FFmpeg, on PyPI, already a dependency for decoding videos) reads and
writes them; figures in docs/SUBJECT_FORMAT.md.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from headavatar.errors import UserError
from headavatar.utils.io import atomic_path

LAYOUT = "chunks"
CHUNK_FRAMES = 16
DEFAULT_CRF = 16
DIR = "chunks"


def chunk_start(i: int, chunk_frames: int) -> int:
    return (int(i) // chunk_frames) * chunk_frames


def rgb_path(root: Path, start: int) -> Path:
    return Path(root) / DIR / f"{start:06d}_rgb.mkv"


def masks_path(root: Path, start: int) -> Path:
    return Path(root) / DIR / f"{start:06d}_masks.mkv"


def _import_av():
    try:
        import av
    except ImportError:
        raise UserError("compact subjects need PyAV: pip install av") from None
    return av


def _encode(frames: list[np.ndarray], path: Path, fmt: str, options: dict) -> None:
    """Encode [H,W,3] rgb24 frames or [3,H,W] yuv444p planes into one matroska file, atomically."""
    av = _import_av()
    H, W = (frames[0].shape[:2] if fmt == "rgb24" else frames[0].shape[1:])
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = W, H, "yuv444p"
        # one thread per encoder: the tracker runs several encoders beside the face models
        s.options = {"preset": "veryfast", "threads": "1", **options}
        for a in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format=fmt)):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buf.getvalue())


def _decode(path: Path, fmt: str) -> list[np.ndarray]:
    av = _import_av()
    try:
        with av.open(str(path)) as c:
            return [f.to_ndarray(format=fmt) for f in c.decode(video=0)]
    except (av.error.FFmpegError, OSError) as e:
        raise UserError(f"{path} is unreadable ({e}); restore it or re-create the subject") from None


def write_chunk(root: Path, start: int, images: list[np.ndarray], alphas: list[np.ndarray], parsings: list[np.ndarray], crf: int = DEFAULT_CRF) -> None:
    """Frames start..start+len-1 of a subject: images [H,W,3] u8, alpha and parsing [H,W] u8."""
    if any(a.shape[:2] != images[0].shape[:2] for a in images + alphas + parsings):
        raise UserError("all frames of a subject must have one size")
    if images[0].shape[0] % 2 or images[0].shape[1] % 2:
        raise UserError(f"compact storage needs even image sides (got {images[0].shape[1]}x{images[0].shape[0]}); use the frame layout")
    _encode(images, rgb_path(root, start), "rgb24", {"crf": str(int(crf))})
    planes = [np.stack([a, p, np.zeros_like(a)]) for a, p in zip(alphas, parsings)]
    _encode(planes, masks_path(root, start), "yuv444p", {"qp": "0"})


def read_chunk(root: Path, start: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(images, alphas, parsings) of the chunk that begins at frame ``start``."""
    images = _decode(rgb_path(root, start), "rgb24")
    planes = _decode(masks_path(root, start), "yuv444p")
    if len(images) != len(planes):
        raise UserError(f"{rgb_path(root, start)} holds {len(images)} frames but its masks {len(planes)}; re-create the subject")
    return images, [p[0] for p in planes], [p[1] for p in planes]


class ChunkReader:
    """Random access to the frames of a chunked subject; keeps the last few decoded chunks.

    Thread-safe (the tracker's overlay reads on two threads); DataLoader
    worker processes each get their own copy of the (empty or small) cache.
    """

    def __init__(self, root: Path, chunk_frames: int, num_frames: int, keep: int = 2):
        self.root, self.chunk_frames, self.num_frames, self.keep = Path(root), int(chunk_frames), int(num_frames), keep
        self._cache: OrderedDict[int, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def starts(self) -> range:
        return range(0, self.num_frames, self.chunk_frames)

    def missing(self) -> list[Path]:
        return [p for s in self.starts() for p in (rgb_path(self.root, s), masks_path(self.root, s)) if not p.is_file()]

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = chunk_start(i, self.chunk_frames)
        # decoding under the lock: two threads reading neighbouring frames decode their chunk once
        with self._lock:
            data = self._cache.get(s)
            if data is not None:
                self._cache.move_to_end(s)
            else:
                data = read_chunk(self.root, s)
                want = min(self.chunk_frames, self.num_frames - s)
                if len(data[0]) != want:
                    raise UserError(f"{rgb_path(self.root, s)} holds {len(data[0])} frames, expected {want}; re-create the subject")
                self._cache[s] = data
                while len(self._cache) > self.keep:
                    self._cache.popitem(last=False)
        k = i - s
        return data[0][k], data[1][k], data[2][k]

    def __getstate__(self):  # pickled into DataLoader workers: no cache, no lock
        return {"root": self.root, "chunk_frames": self.chunk_frames, "num_frames": self.num_frames, "keep": self.keep}

    def __setstate__(self, st):
        self.__init__(st["root"], st["chunk_frames"], st["num_frames"], st["keep"])


class ChunkBuffer:
    """Collects frames (in any order) and writes each chunk once all its frames are in.

    ``submit`` is called with a chunk's lists when it is complete, so the
    caller decides where the encoding runs (a worker thread in the tracker).
    """

    def __init__(self, chunk_frames: int = CHUNK_FRAMES):
        self.chunk_frames = chunk_frames
        self._pending: dict[int, dict[int, tuple]] = {}

    def add(self, i: int, image, alpha, parsing, num_frames: int | None = None):
        """Store frame i; returns (start, images, alphas, parsings) when its chunk is complete, else None."""
        s = chunk_start(i, self.chunk_frames)
        part = self._pending.setdefault(s, {})
        part[int(i)] = (image, alpha, parsing)
        want = self.chunk_frames if num_frames is None else min(self.chunk_frames, num_frames - s)
        if len(part) == want and sorted(part) == list(range(s, s + want)):
            return self._pop(s)
        return None

    def _pop(self, s: int):
        part = self._pending.pop(s)
        items = [part[k] for k in sorted(part)]
        if sorted(part) != list(range(s, s + len(part))):
            raise UserError(f"frames {sorted(part)} of the chunk at {s} are not consecutive; every frame must be written")
        return s, [t[0] for t in items], [t[1] for t in items], [t[2] for t in items]

    def remaining(self):
        """The incomplete chunks (the last one of a clip), in order."""
        return [self._pop(s) for s in sorted(self._pending)]
