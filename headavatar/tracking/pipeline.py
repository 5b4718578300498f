"""``headavatar track``: a monocular head video -> a native subject folder.

Stages (each with a progress bar):

1. **detect**: decode the clip downscaled, BlazeFace boxes on every few
   frames -> one square crop for the whole clip (crop.py);
2. **track**: decode again, crop and resize to ``size``; MediaPipe face mesh
   in tracking mode (478 points -> the 68 iBUG points), the matte, parsing
   labels; frames/alpha/parsing are encoded and written on worker threads;
3. frames whose face was lost (or whose mesh is clearly wrong) are marked
   invalid; they stay in the subject (frame indices follow the video) but
   are left out of both the training and the held-out split;
4. **fit**: the head model's 68-point embedding fitted to the detections
   (headavatar.tracking.fit);
5. **overlay**: SUBJECT_DIR/tracking_overlay.mp4, detected vs fitted;
6. tracking.npz and subject.json, written last (SubjectWriter).

A failure leaves no subject.json, so nothing half-written looks complete;
a folder the run created itself is removed again.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from headavatar.constants import DEFAULT_FPS
from headavatar.errors import UserError
from headavatar.subjects.format import Subject, SubjectWriter
from headavatar.utils.io import atomic_path, save_npz

OVERLAY_NAME = "tracking_overlay.mp4"
DENSE_NAME = "landmarks_mediapipe.npz"
_FRAME_FILE = re.compile(r"^\d{6}\.(png|jpg)$")
_CHUNK_FILE = re.compile(r"^\d{6}_(rgb|masks)\.mkv$")


def _bar(total, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=not progress, dynamic_ncols=True, leave=True)


class _AsyncSubjectWriter(SubjectWriter):
    """SubjectWriter whose images are encoded and written on worker threads.

    PNG encoding of a 512x512 photo costs 20-110 ms on a small CPU, more than
    all the face models together, so frames are JPEG (quality 95, no chroma
    subsampling) by default, alpha and labels PNG; the encoders release the
    GIL, so they overlap the face models on the main thread.
    """

    def __init__(self, root, image_ext: str = ".jpg", overwrite: bool = False, workers: int = 2, jpeg_quality: int = 95,
                 layout: str = "frames", crf: int | None = None):
        super().__init__(root, image_ext=image_ext, overwrite=overwrite, layout=layout, crf=crf)
        self.jpeg_quality = jpeg_quality
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="headavatar-write")
        self._pending: deque[Future] = deque()
        self._max_pending = 4 * max(1, workers)

    def write_frame(self, i: int, image: np.ndarray, alpha: np.ndarray | None = None, parsing: np.ndarray | None = None) -> None:
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()  # back-pressure, and errors surface here
        self.count = max(self.count, i + 1)
        if self.layout == "chunks":  # whole chunks are encoded on the workers
            chunk = self._chunk_frame(i, image, alpha, parsing)
            if chunk is not None:
                self._pending.append(self._pool.submit(self._encode_chunk, chunk))
            return
        self._pending.append(self._pool.submit(self._write, i, image, alpha, parsing))

    def _write(self, i, image, alpha, parsing) -> None:
        _write_image(self.root / "frames" / f"{i:06d}{self.image_ext}", image, self.jpeg_quality)
        if alpha is not None:
            _write_image(self.root / "alpha" / f"{i:06d}.png", alpha)
        if parsing is not None:
            _write_image(self.root / "parsing" / f"{i:06d}.png", parsing)

    def flush(self) -> None:
        if self._buffer is not None:
            for chunk in self._buffer.remaining():
                self._pending.append(self._pool.submit(self._encode_chunk, chunk))
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)


def _write_image(path: Path, img: np.ndarray, jpeg_quality: int = 95) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        im = Image.fromarray(np.ascontiguousarray(img))
        if path.suffix.lower() in (".jpg", ".jpeg"):
            im.save(tmp, format="JPEG", quality=jpeg_quality, subsampling=0)
        else:
            im.save(tmp, format="PNG", compress_level=3)


def head_model_spec(head_model: str | dict, flame_dir=None, head_model_path=None) -> dict:
    spec = dict(head_model) if isinstance(head_model, dict) else {"name": str(head_model)}
    if flame_dir is not None:
        spec["dir"] = str(flame_dir)
    if head_model_path is not None:
        spec["path"] = str(head_model_path)
    return spec


def track_video(
    video: str | os.PathLike,
    out_dir: str | os.PathLike,
    head_model: str | dict = "ict",
    size: int = 512,
    matte: str = "auto",
    max_frames: int | None = None,
    start: float = 0.0,
    duration: float | None = None,
    flame_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    *,
    head_model_path: str | os.PathLike | None = None,
    crop_scale: float = 2.0,
    image_format: str = "jpg",
    storage: str = "frames",
    overlay: bool = True,
    min_seconds: float = 1.0,
    strict: bool = False,
    **fit_opts,
) -> Subject:
    """Track ``video`` into a subject folder ``out_dir``; returns the opened Subject.

    ``fit_opts`` go to the fitter's ``FitConfig``.  Figures of the run
    (timings, valid frames, reprojection errors) are in
    ``subject.meta["tracking"]``.
    """
    from headavatar.headmodels import load_head_model
    from headavatar.tracking.video import probe_video

    if size < 64 or size > 4096 or size % 2:
        raise UserError(f"--size {size} is not usable; pass an even size between 64 and 4096 (512 is typical)")
    if image_format not in ("jpg", "png"):
        raise UserError(f"image format '{image_format}' is not supported; use jpg or png")
    if storage not in ("frames", "compact"):
        raise UserError(f"storage '{storage}' is not supported; use frames (an image file per frame) or compact (video chunks)")
    if start < 0 or (duration is not None and duration <= 0) or (max_frames is not None and max_frames < 2):
        raise UserError("--start must be >= 0, --duration > 0 and --max-frames >= 2")
    video = Path(video)
    out_dir = Path(out_dir)
    info = probe_video(video)
    if info.duration is not None and start >= info.duration:
        raise UserError(f"--start {start:g} s is past the end of {video} ({info.duration:.2f} s long)")
    spec = head_model_spec(head_model, flame_dir, head_model_path)
    from headavatar.tracking.matting import resolve_matte

    matte = resolve_matte(matte)  # fail on a bad choice before any work
    model = load_head_model(spec)  # unknown model / missing FLAME files fail here, before minutes of work
    if (out_dir / "subject.json").exists() and not overwrite:
        raise UserError(f"{out_dir} already holds a subject; choose another output folder or pass --overwrite")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder; choose another output folder")

    created = not out_dir.exists() or not any(out_dir.iterdir())
    try:
        return _run(video, out_dir, info, model, spec, size, matte, max_frames, start, duration, overwrite, progress,
                    crop_scale, image_format, overlay, min_seconds, fit_opts, strict, storage)
    except BaseException:
        if created and out_dir.is_dir():
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def find_crop(video, info, start: float = 0.0, duration: float | None = None, max_frames: int | None = None,
              crop_scale: float = 2.0, min_seconds: float = 1.0, progress: bool = True):
    """Stage 1: face boxes over the clip -> (CropBox, frame times [N], fps).  UserError if no face or too short."""
    from headavatar.tracking.crop import choose_crop
    from headavatar.tracking.landmarks import FaceDetector
    from headavatar.tracking.video import clip_fps, read_frames

    total = info.estimated_frames(start, duration, max_frames)
    fps_guess = info.fps if info.fps > 0 else DEFAULT_FPS
    every = max(1, int(round(fps_guess / 10)))  # ~10 detections per second of video are plenty for a union box
    boxes, times = [], []
    far: list = []  # the full-range detector, made only if the short-range one misses a frame

    def detect(img):
        r = det.detect(img)
        if r is None:
            if not far:
                far.append(FaceDetector(full_range=True))
            r = far[0].detect(img)
        return r

    with FaceDetector() as det, _bar(total, "detect faces", progress) as bar:
        # BlazeFace looks at 128x128: decoding at 360 px saves most of the colour conversion
        for fr in read_frames(video, start, duration, max_frames, max_side=360, every=every):
            if fr.image is not None:
                scale_back = max(info.width, info.height) / max(fr.image.shape[:2])
                r = detect(fr.image)
                boxes.append(r[0] * scale_back if r else np.full(4, np.nan))
            times.append(fr.time)
            bar.update(1)
    for d in far:
        d.close()
    n = len(times)
    if n == 0:
        raise UserError(f"no frames in {video} between {start:g} s and {'the end' if duration is None else f'{start + duration:g} s'}")
    times = np.asarray(times, np.float64)
    fps = clip_fps(times, info.fps)
    span = float(times[-1] - times[0]) + 1.0 / fps
    if span < min_seconds - 1e-6 or n < 2:
        raise UserError(f"the clip of {video} is only {span:.2f} s ({n} frames); tracking needs at least {min_seconds:g} s of video")
    boxes = np.asarray(boxes)
    if not np.isfinite(boxes).all(1).any():
        raise UserError(f"no face found in {video}; film the face from the front, well lit, filling a good part of the frame")
    return choose_crop(boxes, (info.height, info.width), scale=crop_scale), times, fps


def track_frames(video, crop, size: int, n: int, matte: str = "selfie", writer: SubjectWriter | None = None,
                 start: float = 0.0, duration: float | None = None, max_frames: int | None = None, progress: bool = True):
    """Stage 2: crop every frame, track MediaPipe's 478 points, matte and parse it, hand it to ``writer``.

    Returns (points [N,478,3] with NaN where no face was found, times [N]).
    The matte runs on its own thread (MediaPipe and onnxruntime release the
    GIL), one frame ahead of nothing: frames stay in order, which the
    recurrent RVM needs.
    """
    from headavatar.tracking.landmarks import FaceMeshTracker
    from headavatar.tracking.matting import make_matter
    from headavatar.tracking.parsing import FrameParser, face_mask
    from headavatar.tracking.video import read_frames

    dense = np.full((n, 478, 3), np.nan, np.float32)
    times = np.zeros(n, np.float64)
    count = 0
    parse = FrameParser()  # colour models and labels below the chin carried over the clip, against flicker
    matter = make_matter(matte)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headavatar-matte")
    try:
        with FaceMeshTracker() as tracker, _bar(n, "track", progress) as bar:
            for fr in read_frames(video, start, duration, max_frames, transform=lambda im: crop.apply(im, size)):
                i = fr.index
                if i >= n:  # a second decode should agree with the first; never index past it
                    break
                img = fr.image
                times[i] = fr.time
                alpha_job = pool.submit(matter, img)
                pts = tracker.track(img)
                alpha = alpha_job.result()
                if pts is not None:
                    dense[i] = pts
                    # the face itself is foreground whatever the matte says (mattes leave holes in faces)
                    alpha = np.maximum(alpha, face_mask(pts, alpha.shape).astype(np.float32))
                if writer is not None:
                    writer.write_frame(i, img, np.round(alpha * 255).astype(np.uint8), parse(pts, alpha, img))
                count += 1
                bar.update(1)
    finally:
        pool.shutdown(wait=True)
        matter.close()
    if count != n:
        raise UserError(f"{video} gave {n} frames on the first read but {count} on the second; re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4)")
    return dense, times


def validate_frames(dense: np.ndarray, size: int):
    """Stage 3: (landmarks68 [N,68,2], found [N], valid [N], reasons) from the dense points."""
    from headavatar.tracking.landmarks import check_landmarks, to_ibug68

    lm68 = to_ibug68(dense[..., :2]).astype(np.float32)
    found = np.isfinite(dense[:, 0, 0])
    valid, reasons = check_landmarks(np.nan_to_num(lm68), found, (size, size))
    return lm68, found, valid, reasons


def _run(video, out_dir, info, model, spec, size, matte, max_frames, start, duration, overwrite, progress,
         crop_scale, image_format, overlay, min_seconds, fit_opts, strict=False, storage="frames") -> Subject:
    from headavatar.tracking.video import check_read_length

    timer = _StageTimer()

    with timer("detect"):
        crop, times, fps = find_crop(video, info, start, duration, max_frames, crop_scale, min_seconds, progress)
    n = len(times)
    read_record = check_read_length(info, times, start, duration, max_frames, strict)  # warns (or refuses) before the long part

    timer.start("track")
    _clear_previous(out_dir)  # an overwritten subject or an interrupted run: no stale frame may outlive them
    writer = _AsyncSubjectWriter(out_dir, image_ext="." + image_format, overwrite=overwrite,
                                 layout="chunks" if storage == "compact" else "frames")
    try:
        dense, times = track_frames(video, crop, size, n, matte, writer, start, duration, max_frames, progress)
        writer.flush()
    finally:
        writer.close()
    timer.stop()

    lm68, mp_found, valid, reasons = validate_frames(dense, size)
    if valid.sum() < 2:
        raise UserError(
            f"the face was tracked in only {int(valid.sum())} of {n} frames of {video}; "
            "use a clip where the face stays in view (trim it with --start/--duration)"
        )

    with timer("fit"):
        tracking, fit_report = _fit(model, lm68, valid, size, fit_opts, progress)

    from headavatar.tracking.overlay import mesh_point_subset, project_fit, reprojection_errors

    timer.start("overlay")
    mesh_idx = mesh_point_subset(model) if overlay else None
    fitted, mesh2d = project_fit(model, tracking, (size, size), mesh_points=mesh_idx)
    err = np.linalg.norm(fitted - lm68, axis=-1)  # [N,68]
    per_frame = np.full(n, np.nan)
    per_frame[valid] = np.median(err[valid], axis=1)
    # A frame the model cannot explain (a wrong mesh that passed the checks, or a failed fit) is not kept either.
    med = float(np.median(per_frame[valid]))
    outlier = valid & (np.nan_to_num(per_frame) > max(4.0 * med, 8.0 * size / 512))
    if outlier.any() and (valid & ~outlier).sum() >= 2:
        valid = valid & ~outlier
        reasons["fit"] = int(outlier.sum())
    if (~valid).any():
        warnings.warn(f"face lost in {int((~valid).sum())} of {n} frames ({_reason_text(reasons)}); "
                      "they are marked invalid and left out of training and evaluation", stacklevel=3)
    errors = reprojection_errors(lm68, fitted, valid)

    stored = lm68.copy()
    stored[~valid] = np.nan  # no detection is kept for a frame we do not trust
    tracking.valid = valid
    gaze_stats = _gaze(model, tracking, dense)
    tracking.timestamps = times
    tracking.landmarks2d = stored

    if overlay:
        _write_overlay(out_dir / OVERLAY_NAME, writer, n, lm68, mp_found, fitted, mesh2d, valid, fps, progress)
    timer.stop()

    save_npz(out_dir / DENSE_NAME, points=dense, found=mp_found, valid=valid, timestamps=times)
    stats = {
        "source": video.name,
        "start": float(start),
        "crop": {**crop.to_dict(), "source_size": [info.height, info.width], "rotation": info.rotation},
        "matte": matte,
        "frames": n,
        "video_read": read_record,  # what the header promised and what was decoded
        "valid_frames": int(valid.sum()),
        "invalid_reasons": reasons,
        "reprojection_px_median": float(np.median(errors)) if errors.size else None,
        "reprojection_px_before_fit": _before(fit_report),
        "timings_s": {k: round(v, 3) for k, v in timer.wall.items()},
        "cpu_s": {k: round(v, 3) for k, v in timer.cpu.items()},  # all threads; on a busy machine wall >> cpu / cores
        "fps_end_to_end": round(n / max(1e-9, sum(timer.wall.values())), 2),
        **gaze_stats,
        "landmarks": "mediapipe-facemesh-478 -> ibug68 (headavatar.tracking.landmarks)",
    }
    stored_spec = {k: v for k, v in spec.items() if k not in ("dir", "path")}
    stored_spec["fingerprint"] = model.fingerprint()
    return writer.finalize(tracking, stored_spec, (size, size), fps=fps, extra_meta={"tracking": stats})


def _gaze(model, tracking, dense: np.ndarray) -> dict:
    """Stage 4b: per-frame eye gaze from the iris landmarks into ``tracking.extras["gaze"]``
    (head models with eyeballs only, headmodels/gaze.py; the others ignore gaze)."""
    from headavatar.headmodels.gaze import supports_gaze
    from headavatar.tracking.gaze import estimate_gaze, iris_observations

    if not supports_gaze(model):
        return {}
    t = time.perf_counter()
    iris, usable = iris_observations(dense)
    gaze, seen = estimate_gaze(model, tracking, iris, usable)
    tracking.extras["gaze"] = gaze
    v = np.asarray(tracking.valid, bool)
    return {"gaze": {"seconds": round(time.perf_counter() - t, 3),"eyes_observed": round(float(seen[v].mean()), 3) if v.any() else 0.0,
                     "abs_deg_median": round(float(np.degrees(np.median(np.abs(gaze[v])))), 2) if v.any() else None}}


class _StageTimer:
    """Wall-clock and process CPU seconds per stage (CPU time tells a slow stage from a busy machine)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._cur = None

    def start(self, name: str) -> None:
        self._cur = (name, time.perf_counter(), time.process_time())

    def stop(self) -> None:
        name, w, c = self._cur
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
        self._cur = None

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                timer.start(name)

            def __exit__(self, *exc):
                timer.stop()

        return _Ctx()


def _reason_text(reasons: dict) -> str:
    names = {"not_found": "no face found", "outside": "face leaving the frame", "size": "implausible face size", "jump": "tracking glitch",
             "fit": "unexplained by the model"}
    return ", ".join(f"{names.get(k, k)}: {v}" for k, v in reasons.items() if v)


def _before(report) -> float | None:
    if not isinstance(report, dict):
        return None
    for k in ("error_px_before", "initial_error_px", "median_px_before", "before_px"):
        if k in report and report[k] is not None:
            return float(report[k])
    return None


def _fit(model, lm68: np.ndarray, valid: np.ndarray, size: int, fit_opts: dict, progress: bool):
    try:
        from headavatar.tracking.fit import FitConfig, fit_tracking
    except ImportError as e:  # pragma: no cover - only while fit.py is being written
        raise RuntimeError(f"headavatar.tracking.fit is not available: {e}") from e
    import dataclasses

    opts = dict(fit_opts)
    if dataclasses.is_dataclass(FitConfig):
        names = {f.name for f in dataclasses.fields(FitConfig)}
        unknown = sorted(set(opts) - names)
        if unknown:
            raise UserError(f"unknown fitting option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        if "progress" in names and "progress" not in opts:
            opts["progress"] = progress
    config = FitConfig(**opts)
    # the fitter gets finite points everywhere; invalid frames are masked by ``valid``
    filled = _fill_invalid(lm68, valid)
    return fit_tracking(model, filled, (size, size), valid, config=config)


def _fill_invalid(lm: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Copy the nearest valid frame's landmarks into invalid frames."""
    out = lm.copy()
    idx = np.flatnonzero(valid)
    if len(idx) == 0:
        return np.nan_to_num(out)
    for i in np.flatnonzero(~valid):
        out[i] = lm[idx[np.argmin(np.abs(idx - i))]]
    return out


def _write_overlay(path: Path, writer: _AsyncSubjectWriter, n: int, detected, found, fitted, mesh2d, valid, fps: float, progress: bool) -> None:
    import cv2

    from headavatar.tracking.overlay import draw_overlay
    from headavatar.tracking.video import VideoWriter

    reader = None
    if writer.layout == "chunks":
        from headavatar.subjects.chunks import ChunkReader

        reader = ChunkReader(writer.root, writer.chunk_frames, n)

    def frame(i: int) -> np.ndarray:
        if reader is not None:
            img, _, parsing = reader.read(i)
            img = img.copy()
        else:
            img = cv2.imread(str(writer.root / "frames" / f"{i:06d}{writer.image_ext}"), cv2.IMREAD_COLOR)
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
            parsing = cv2.imread(str(writer.root / "parsing" / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
        return draw_overlay(img, detected[i] if found[i] else None, fitted[i], None if mesh2d is None else mesh2d[i], bool(valid[i]), parsing)

    # reading and drawing on two threads (OpenCV releases the GIL) while this one encodes, in order
    with atomic_path(path) as tmp, VideoWriter(tmp, fps) as vw, _bar(n, "overlay", progress) as bar, \
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="headavatar-overlay") as pool:
        pending: deque[Future] = deque()
        for i in range(n):
            pending.append(pool.submit(frame, i))
            if len(pending) >= 6:
                vw.write(pending.popleft().result())
                bar.update(1)
        while pending:
            vw.write(pending.popleft().result())
            bar.update(1)
        vw.close()


def _clear_previous(out_dir: Path) -> None:
    """Remove a previous run's outputs so that no stale frame outlives a shorter new clip."""
    (out_dir / "subject.json").unlink(missing_ok=True)  # first: the folder stops looking complete
    for sub in ("frames", "alpha", "parsing", "chunks"):
        d = out_dir / sub
        if d.is_dir():
            for f in d.iterdir():
                if _FRAME_FILE.match(f.name) or _CHUNK_FILE.match(f.name):
                    f.unlink()
    for name in ("tracking.npz", OVERLAY_NAME, DENSE_NAME):
        (out_dir / name).unlink(missing_ok=True)
