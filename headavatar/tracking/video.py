"""Video decoding (frames with their timestamps) and H.264 writing, through PyAV.

PyAV rather than a piped ffmpeg process because it hands us each frame's
presentation time (phone videos often have a variable frame rate, so
``index / fps`` is not the frame's time), the display rotation of portrait
phone clips, and decoding errors as exceptions we can turn into one clear
line.  Decoding runs on a background thread (FFmpeg releases the GIL), so the
face models on the main thread never wait for it.
"""

from __future__ import annotations

import math
import queue
import threading
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from headavatar.constants import DEFAULT_FPS
from headavatar.errors import UserError


def _import_av():
    try:
        import av
    except ImportError:  # pragma: no cover - depends on the environment
        raise UserError("reading videos needs PyAV: pip install av") from None
    return av


@dataclass
class VideoInfo:
    """What the container says about the first video stream (sizes after display rotation)."""

    path: Path
    width: int
    height: int
    fps: float  # average frame rate (nominal; timestamps are the truth)
    num_frames: int | None  # from the container; None when it does not say
    duration: float | None  # seconds
    rotation: int  # degrees counter-clockwise that the frames are turned to display upright
    codec: str

    def estimated_frames(self, start: float = 0.0, duration: float | None = None, max_frames: int | None = None) -> int | None:
        """Frame count of a clip, for progress bars only."""
        n = None
        if self.duration is not None and self.fps > 0:
            end = self.duration if duration is None else min(self.duration, start + duration)
            n = max(0, int(round((end - start) * self.fps)))
        elif self.num_frames:
            n = self.num_frames
        if max_frames is not None:
            n = max_frames if n is None else min(n, max_frames)
        return n


@dataclass
class Frame:
    index: int  # 0-based index within the clip that was read
    time: float  # seconds since the start of the video
    image: np.ndarray | None  # HxWx3 uint8 RGB (or what the transform returned); None for skipped frames


def probe_video(path: str | Path) -> VideoInfo:
    """Open ``path`` and describe its video stream; UserError if it is missing or not a video."""
    av = _import_av()
    path = Path(path)
    if not path.exists():
        raise UserError(f"video {path} does not exist; check the path")
    if not path.is_file():
        raise UserError(f"{path} is not a file; pass a video file (mp4, mov, mkv, webm...)")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not a readable video ({_short(e)}); pass an mp4/mov/mkv/webm file") from None
    try:
        if not container.streams.video:
            raise UserError(f"{path} is not a readable video (it has no video stream); pass an mp4/mov/mkv/webm file")
        s = container.streams.video[0]
        cc = s.codec_context
        w, h = int(cc.width or 0), int(cc.height or 0)
        if w <= 0 or h <= 0:
            raise UserError(f"{path} is not a readable video (its video stream has no frame size); the file is damaged")
        rate = s.average_rate or s.guessed_rate or s.base_rate
        fps = float(rate) if rate else 0.0
        dur = None
        if s.duration is not None and s.time_base is not None:
            dur = float(s.duration * s.time_base)
        elif container.duration is not None:
            dur = container.duration / 1_000_000
        # Decode one frame: it proves the stream is decodable and carries the display rotation.
        first = _first_frame(container, s)
        if first is None:
            raise UserError(f"{path} is not a readable video (no frame could be decoded); the file is damaged")
        rotation = int(getattr(first, "rotation", 0) or 0)
        if rotation % 180:
            w, h = h, w
        return VideoInfo(path, w, h, fps, int(s.frames) or None, dur, rotation, cc.name)
    except av.error.FFmpegError as e:
        raise UserError(f"{path} is not a readable video ({_short(e)}); pass an mp4/mov/mkv/webm file") from None
    finally:
        container.close()


def _first_frame(container, stream):
    av = _import_av()
    for i, packet in enumerate(container.demux(stream)):
        try:
            for f in packet.decode():
                return f
        except av.error.InvalidDataError:
            pass
        if i > 300:  # a stream that yields nothing after this many packets is not usable
            break
    return None


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:160]


def _rotate(img: np.ndarray, rotation: int) -> np.ndarray:
    # np.rot90 turns counter-clockwise, as the display matrix angle is defined.
    k = int(round(rotation / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(img, k)) if k else img


def read_frames(
    path: str | Path,
    start: float = 0.0,
    duration: float | None = None,
    max_frames: int | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    max_side: int | None = None,
    prefetch: int = 8,
    every: int = 1,
) -> Iterator[Frame]:
    """Yield the frames of ``path`` from ``start`` seconds, RGB uint8, upright.

    ``max_side`` lets FFmpeg downscale while converting (much cheaper than a
    full-size conversion followed by a resize); ``transform`` runs on the
    decoding thread.  Undecodable packets are skipped with a warning rather
    than ending the clip.  With ``every`` > 1 only every so many frames are
    converted; the others come with ``image=None`` (their times still count).
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    _DONE = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker() -> None:
        try:
            for fr in _decode(path, start, duration, max_frames, max_side, every):
                if transform is not None and fr.image is not None:
                    fr.image = transform(fr.image)
                if not put(fr):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)

    th = threading.Thread(target=worker, name="headavatar-decode", daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        th.join(timeout=5)


def _decode(path, start: float, duration: float | None, max_frames: int | None, max_side: int | None, every: int = 1) -> Iterator[Frame]:
    av = _import_av()
    path = Path(path)
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise UserError(f"{path} is not a readable video ({_short(e)})") from None
    bad_packets = 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame + slice threads inside FFmpeg
        tb = stream.time_base
        t0 = float(stream.start_time * tb) if stream.start_time is not None and tb is not None else 0.0
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else DEFAULT_FPS
        end = None if duration is None else start + duration
        if start > 1.0 and tb is not None:
            # seek lands on the keyframe before ``start``; the frames before it are skipped below
            container.seek(int((start + t0) / tb), stream=stream, backward=True)
        index = 0
        decoded = 0
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                bad_packets += 1
                continue
            for f in frames:
                t = float(f.pts * tb) - t0 if f.pts is not None and tb is not None else decoded / fps
                decoded += 1
                if t < start - 1e-6:
                    continue
                if end is not None and t >= end - 1e-6:
                    return
                rotation = int(getattr(f, "rotation", 0) or 0)
                img = _to_rgb(f, max_side, rotation) if index % every == 0 else None
                yield Frame(index, t, img)
                index += 1
                if max_frames is not None and index >= max_frames:
                    return
        if decoded == 0:
            raise UserError(f"{path} is not a readable video (no frame could be decoded); the file is damaged")
    except av.error.FFmpegError as e:
        raise UserError(f"decoding {path} failed ({_short(e)}); re-encode it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4") from None
    finally:
        container.close()
        if bad_packets:
            warnings.warn(f"{path}: skipped {bad_packets} undecodable packet(s); the file is partly damaged", stacklevel=2)


def _to_rgb(f, max_side: int | None, rotation: int) -> np.ndarray:
    w, h = f.width, f.height
    if max_side is not None and max(w, h) > max_side:
        s = max_side / max(w, h)
        # even sizes keep the chroma planes aligned
        w2, h2 = max(2, int(round(w * s / 2)) * 2), max(2, int(round(h * s / 2)) * 2)
        img = f.reformat(width=w2, height=h2, format="rgb24", interpolation="AREA").to_ndarray()
    else:
        img = f.to_ndarray(format="rgb24")
    return _rotate(img, rotation)


class VideoWriter:
    """H.264 mp4 writer (yuv420p, so every player shows it).  Use as a context manager."""

    def __init__(self, path: str | Path, fps: float, crf: int = 23, preset: str = "ultrafast"):
        self.path = Path(path)
        self.fps = fps
        self.crf = crf
        self.preset = preset
        self._container = None
        self._stream = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, img: np.ndarray) -> None:
        av = _import_av()
        h, w = img.shape[:2]
        if h % 2 or w % 2:  # yuv420p needs even sizes
            img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            h, w = img.shape[:2]
        if self._container is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(str(self.path), mode="w")
            rate = Fraction(self.fps).limit_denominator(1001) if self.fps > 0 else Fraction(DEFAULT_FPS)
            self._stream = self._container.add_stream("libx264", rate=rate)
            self._stream.width, self._stream.height = w, h
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self.crf), "preset": self.preset}
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img[..., :3]), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        if self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None


def clip_fps(times: np.ndarray, fallback: float) -> float:
    """Frame rate of a clip from its timestamps (median spacing), robust to a few gaps."""
    if len(times) >= 2:
        dt = np.diff(np.asarray(times, np.float64))
        dt = dt[dt > 0]
        if len(dt):
            f = 1.0 / float(np.median(dt))
            if math.isfinite(f) and f > 0:
                return f
    return float(fallback) if fallback and fallback > 0 else 25.0


def check_read_length(info: VideoInfo, times, start: float = 0.0, duration: float | None = None,
                      max_frames: int | None = None, strict: bool = False) -> dict:
    """Compare what was decoded (frame ``times``) with what the container's header promises.

    A file cut short with its index at the start (an interrupted copy or recording) says
    "250 frames, 10 s" but decodes fewer; that is a warning with the numbers, or with
    ``strict`` a UserError.  Returns the record a subject keeps of what was read.
    """
    times = np.asarray(times, np.float64)
    n = int(len(times))
    fps = clip_fps(times, info.fps) if n else (info.fps or DEFAULT_FPS)
    read_end = float(times[-1]) + 1.0 / fps if n else float(start)
    rec = {"header_frames": info.num_frames, "header_duration_s": None if info.duration is None else round(float(info.duration), 3),
           "decoded_frames": n, "decoded_start_s": round(float(times[0]), 3) if n else None, "decoded_end_s": round(read_end, 3),
           "ended_early": False}
    if max_frames is not None and n >= max_frames:
        return rec  # stopped by --max-frames: the rest of the file was never asked for
    # the part of the header's length this read was meant to cover
    want_end = info.duration
    if want_end is not None and duration is not None:
        want_end = min(want_end, start + duration)
    want_frames = None
    if info.num_frames and start <= 1e-6 and duration is None:
        want_frames = int(info.num_frames)
    tol = 2.0 / fps  # a frame or two of rounding between containers is normal
    short_time = want_end is not None and read_end < want_end - tol
    short_count = want_frames is not None and n < want_frames - 2
    if not (short_time or short_count):
        return rec
    rec["ended_early"] = True
    what = []
    if want_frames is not None:
        what.append(f"{n} of the {want_frames} frames its header lists")
    else:
        what.append(f"{n} frames")
    if want_end is not None:
        what.append(f"up to {read_end:.2f} s of {want_end:.2f} s")
    msg = (f"{info.path}: decoded {' ('.join(what)}{')' if len(what) > 1 else ''}; "
           "the file ends early or its header is wrong (a cut-off copy or recording?)")
    if strict:
        raise UserError(msg + "; re-encode or re-copy it, or drop --strict to track what can be read")
    warnings.warn(msg + "; tracking what could be read (--strict refuses such files)", stacklevel=2)
    return rec
