"""Atomic file writes for exported files, readable by others.

``atomic_path`` creates its temporary file with mode 0600 (mkstemp); exported
files are meant to be shared (served, copied into an engine), so they get the
usual 0644 before the rename.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from headavatar.utils.io import atomic_path

FILE_MODE = 0o644


def write_file(path: str | os.PathLike, data: bytes | str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        os.chmod(tmp, FILE_MODE)
    return path


def write_json_file(path: str | os.PathLike, obj) -> Path:
    return write_file(path, json.dumps(obj, indent=2) + "\n")


def png_bytes(img) -> bytes:
    """uint8 HxW or HxWx3/4 -> PNG bytes."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    return buf.getvalue()
