"""Video writing (H.264 mp4 through imageio-ffmpeg's bundled ffmpeg), atomic."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from headavatar.constants import DEFAULT_FPS
from headavatar.utils.io import atomic_path


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float = DEFAULT_FPS) -> int:
    """Write uint8 HxWx3 frames; sizes are padded to even numbers (yuv420p needs them). Returns the frame count."""
    import imageio.v2 as imageio

    path = Path(path)
    n = 0
    with atomic_path(path) as tmp:
        writer = imageio.get_writer(str(tmp), format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                                    pixelformat="yuv420p", macro_block_size=1, ffmpeg_log_level="fatal")  # failures come back as exceptions
        try:
            for f in frames:
                f = np.asarray(f)
                h, w = f.shape[:2]
                if h % 2 or w % 2:
                    f = np.pad(f, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
                writer.append_data(np.ascontiguousarray(f))
                n += 1
        finally:
            writer.close()
    return n


def to_uint8(img) -> np.ndarray:
    """float [H,W,3] in [0,1] (torch or numpy) -> uint8."""
    if hasattr(img, "detach"):
        img = img.detach().float().cpu().numpy()
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
