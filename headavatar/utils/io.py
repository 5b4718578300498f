"""File I/O helpers: atomic writes and image reading with clear errors.

Every write of a user's output goes through ``atomic_path`` (directly or via write_json,
write_image, save_npz, write_video...), which turns a destination that cannot take the file
into one ``WriteError`` naming the user's path (exit code 2) and leaves no temporary behind;
``ensure_writable`` checks a destination before long work; ``removed_on_failure`` removes a
folder a command was making when it fails.  The CLI turns any other OSError of that kind
(e.g. from a mkdir) into the same one line.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from headavatar.errors import UserError

_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp")  # atomic_path's ".NAME.XXXXXXXX.tmp.ext"


class WriteError(UserError, OSError):
    """A destination the user chose cannot be written (read-only, no permission, full).

    Also an OSError, so code that already tolerates a failed optional write (a cache file)
    with ``except OSError`` keeps doing so."""

    exit_code = 2


def _reason(err: BaseException | None, where: Path | None) -> str | None:
    """Why writing to ``where`` failed, from the error's errno (read-only mount, no permission,
    disk or quota full, file too large) or, failing that, from the filesystem itself; None
    when the failure is not about the destination (a bug, to keep its traceback)."""
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "the disk is full" if code != errno.EFBIG else "the file is too large for this filesystem"
    if code == errno.EROFS:
        return "it is on a read-only filesystem"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    # torch.save, ffmpeg and others report a full disk in their own words (RuntimeError,
    # BrokenPipeError...): ask the filesystem whether it is full or read-only now.
    if where is not None:
        try:
            st = os.statvfs(_existing_ancestor(where))
        except OSError:
            return None
        if st.f_flag & os.ST_RDONLY:
            return "it is on a read-only filesystem"
        if st.f_bavail * st.f_frsize < 64 * 1024:
            return "the disk is full"
    return None


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path("/")


def user_path(path: str | os.PathLike) -> Path:
    """The path a user asked for, from one of atomic_path's hidden temporary names (``.NAME.XXXXXXXX.tmp.ext``)."""
    path = Path(path)
    m = _TMP_NAME.match(path.name)
    return path.with_name(m.group("name")) if m else path


def write_error(path: str | os.PathLike, err: BaseException | None = None) -> WriteError | None:
    """A one-line WriteError naming ``path`` if ``err`` means the destination cannot be written, else None."""
    path = user_path(path)
    reason = _reason(err, path.parent if not path.exists() or path.is_file() else path)
    if reason is None:
        return None
    return WriteError(f"cannot write {path}: {reason}; choose another output location"
                      + (" or free some space" if "full" in reason else ""))


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write under ``path`` (read-only, no permission, disk full) into one WriteError naming it."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, RuntimeError) as e:
        err = write_error(path, e)
        if err is None:
            raise
        raise err from None


def ensure_writable(folder: str | os.PathLike, min_free_bytes: int = 1 << 20) -> None:
    """Check before long work that ``folder`` (or, if it does not exist yet, its nearest existing
    parent) takes files and has some free space; creates nothing that stays."""
    folder = Path(folder)
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise UserError(f"{base} exists and is not a folder; choose another output location")
    try:
        with tempfile.TemporaryFile(dir=base, prefix=".headavatar-probe."):
            pass
        st = os.statvfs(base)
    except OSError as e:
        err = write_error(folder / "x", e)
        if err is None:
            raise
        raise WriteError(f"cannot write {folder}: {_reason(e, base)}; choose another output location") from None
    if st.f_bavail * st.f_frsize < min_free_bytes:
        raise WriteError(f"cannot write {folder}: the disk is full ({st.f_bavail * st.f_frsize // 1024} KiB free); "
                         "choose another output location or free some space")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it onto ``path`` on success.

    A kill mid-write leaves the old file intact (rename is atomic on POSIX).  A destination
    that cannot take the file (read-only, no permission, full) raises a WriteError naming
    ``path`` (never the hidden temporary), and the temporary is removed.
    """
    path = Path(path)
    tmp_path = None
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp" + path.suffix, dir=path.parent)
            os.close(fd)
            tmp_path = Path(tmp)
            yield tmp_path
            # mkstemp makes 0600 files; give the result the usual permissions (0666 minus the umask)
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp_path, 0o666 & ~mask)
            os.replace(tmp_path, path)
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore or regenerate it") from None


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def write_image(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write a uint8 image (HxW or HxWx3/4) atomically; format from the suffix."""
    from PIL import Image

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(img)).save(tmp, format=_pil_format(path))


def _pil_format(path: Path) -> str:
    ext = path.suffix.lower()
    return {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".webp": "WEBP"}.get(ext, "PNG")


def read_image(path: str | os.PathLike, mode: str | None = None) -> np.ndarray:
    """Read an image as uint8. ``mode``: None (as stored), "RGB" or "L".

    A missing, truncated or corrupt file raises a UserError naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            if mode is not None and im.mode != mode:
                im = im.convert(mode)
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"image {path} is corrupt or truncated ({e}); re-export or remove this frame") from None
    if arr.dtype != np.uint8:
        if arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)
        elif arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        else:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


@contextmanager
def removed_on_failure(path: str | os.PathLike) -> Iterator[None]:
    """If the block fails, remove ``path`` when it did not exist before (a folder or file this
    command was making), so a failed or interrupted write leaves nothing half-made."""
    import shutil

    path = Path(path)
    existed = path.exists()
    try:
        yield
    except BaseException:
        if not existed:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink(missing_ok=True)
        raise
