"""Reading and writing HDR images: Radiance ``.hdr`` (RGBE) and OpenEXR ``.exr``.

``.hdr`` is read and written by the small codec below (pure numpy): imageio
has no float Radiance reader without the FreeImage binary, which it would
download at run time.  ``.exr`` goes through the ``OpenEXR`` package
(BSD-3-Clause, PyPI wheels), an optional dependency: without it, ``.exr``
files raise a UserError that says how to install it.

Images are float32 ``[H, W, 3]`` linear radiance, row 0 at the top.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from headavatar.errors import UserError

EXR_HINT = "pip install OpenEXR"


# ------------------------------------------------------------------ Radiance
def _parse_header(data: bytes, path: Path) -> tuple[int, int, bool, bool, int]:
    """-> (height, width, flip_rows, flip_cols, offset of the pixel data)."""
    if not (data.startswith(b"#?RADIANCE") or data.startswith(b"#?RGBE") or data.startswith(b"#?")):
        raise UserError(f"{path} is not a Radiance HDR file (no '#?' signature); pass a .hdr or .exr environment map")
    pos = 0
    fmt = None
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            raise UserError(f"{path}: truncated Radiance header")
        line = data[pos:end].strip()
        pos = end + 1
        if not line:
            break
        if line.startswith(b"FORMAT="):
            fmt = line[7:].decode("ascii", "replace")
    if fmt is not None and fmt != "32-bit_rle_rgbe":
        raise UserError(f"{path}: Radiance format '{fmt}' is not supported (only 32-bit_rle_rgbe)")
    end = data.find(b"\n", pos)
    if end < 0:
        raise UserError(f"{path}: missing resolution line")
    parts = data[pos:end].split()
    pos = end + 1
    if len(parts) != 4 or parts[0][1:] != b"Y" or parts[2][1:] != b"X":
        raise UserError(f"{path}: unsupported resolution line {data[pos:end]!r} (only row-major -Y/+Y H ±X W)")
    try:
        H, W = int(parts[1]), int(parts[3])
    except ValueError:
        raise UserError(f"{path}: bad resolution line") from None
    if H <= 0 or W <= 0:
        raise UserError(f"{path}: empty image ({W}x{H})")
    return H, W, parts[0][:1] == b"+", parts[2][:1] == b"-", pos


def _decode_scanlines(buf: np.ndarray, H: int, W: int, path: Path) -> np.ndarray:
    out = np.empty((H, W, 4), np.uint8)
    p = 0
    n = len(buf)
    for y in range(H):
        if p + 4 > n:
            raise UserError(f"{path}: pixel data ends at row {y} of {H} (truncated file)")
        if 8 <= W < 32768 and buf[p] == 2 and buf[p + 1] == 2 and (int(buf[p + 2]) << 8 | int(buf[p + 3])) == W:
            # "new" run-length encoding: the 4 components one after another
            p += 4
            for c in range(4):
                x = 0
                row = out[y, :, c]
                while x < W:
                    if p >= n:
                        raise UserError(f"{path}: run-length data ends at row {y} (truncated file)")
                    count = int(buf[p])
                    p += 1
                    if count > 128:
                        count -= 128
                        if x + count > W or p >= n:
                            raise UserError(f"{path}: corrupt run-length data at row {y}")
                        row[x : x + count] = buf[p]
                        p += 1
                    else:
                        if count == 0 or x + count > W or p + count > n:
                            raise UserError(f"{path}: corrupt run-length data at row {y}")
                        row[x : x + count] = buf[p : p + count]
                        p += count
                    x += count
        else:
            # flat RGBE, possibly with the old (1,1,1,n) repeat markers
            x, shift = 0, 0
            while x < W:
                if p + 4 > n:
                    raise UserError(f"{path}: pixel data ends at row {y} of {H} (truncated file)")
                px = buf[p : p + 4]
                p += 4
                if px[0] == 1 and px[1] == 1 and px[2] == 1:
                    if x == 0:
                        raise UserError(f"{path}: corrupt old-style run at row {y}")
                    count = int(px[3]) << shift
                    if x + count > W:
                        raise UserError(f"{path}: corrupt old-style run at row {y}")
                    out[y, x : x + count] = out[y, x - 1]
                    x += count
                    shift += 8
                else:
                    out[y, x] = px
                    x += 1
                    shift = 0
    return out


def rgbe_to_float(rgbe: np.ndarray) -> np.ndarray:
    e = rgbe[..., 3].astype(np.int32)
    # Radiance's colr_color: (mantissa + 0.5) * 2^(e - 136), zero when e == 0
    f = np.where(e > 0, np.ldexp(1.0, e - 136), 0.0).astype(np.float32)
    return (rgbe[..., :3].astype(np.float32) + 0.5) * f[..., None]


def float_to_rgbe(img: np.ndarray) -> np.ndarray:
    img = np.maximum(np.asarray(img, np.float64), 0.0)
    m = img.max(-1)
    mant, e = np.frexp(m)
    ok = m > 1e-32
    scale = np.where(ok, mant * 256.0 / np.where(ok, m, 1.0), 0.0)
    out = np.zeros(img.shape[:-1] + (4,), np.uint8)
    out[..., :3] = np.clip(np.floor(img * scale[..., None]), 0, 255).astype(np.uint8)
    out[..., 3] = np.where(ok, np.clip(e + 128, 0, 255), 0).astype(np.uint8)
    return out


def read_hdr(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e})") from None
    H, W, flip_rows, flip_cols, off = _parse_header(data, path)
    rgbe = _decode_scanlines(np.frombuffer(data, np.uint8, offset=off), H, W, path)
    img = rgbe_to_float(rgbe)
    if flip_rows:
        img = img[::-1]
    if flip_cols:
        img = img[:, ::-1]
    return np.ascontiguousarray(img)


def write_hdr(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write a float [H,W,3] image as run-length-encoded Radiance RGBE (atomically)."""
    from headavatar.utils.io import atomic_path

    img = np.asarray(img, np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"write_hdr expects [H,W,3], got {img.shape}")
    H, W = img.shape[:2]
    rgbe = float_to_rgbe(img)
    head = f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y {H} +X {W}\n".encode("ascii")
    if not 8 <= W < 32768:  # outside the range run-length encoding can describe: flat pixels
        body = rgbe.tobytes()
    else:
        # "New" RLE with literal chunks only (<= 128 bytes, each after its length):
        # valid for every reader, vectorised, and unambiguous unlike flat
        # scanlines (a flat pixel (2,2,x<128,e) would read as an RLE marker).
        comp = rgbe.transpose(0, 2, 1).reshape(H * 4, W)
        pieces = []
        for j in range(0, W, 128):
            n = min(128, W - j)
            pieces += [np.full((H * 4, 1), n, np.uint8), comp[:, j : j + n]]
        rows = np.concatenate(pieces, 1).reshape(H, -1)
        marker = np.tile(np.array([2, 2, W >> 8, W & 255], np.uint8), (H, 1))
        body = np.concatenate([marker, rows], 1).tobytes()
    with atomic_path(path) as tmp:
        tmp.write_bytes(head + body)


# ------------------------------------------------------------------ OpenEXR
def read_exr(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    try:
        import OpenEXR
    except ImportError:
        raise UserError(f"reading {path.name} needs the optional OpenEXR package ({EXR_HINT}); or convert the map to .hdr") from None
    if not path.is_file():
        raise UserError(f"environment map {path} does not exist")
    try:
        with OpenEXR.File(str(path), separate_channels=True) as f:
            ch = {k: np.asarray(v.pixels) for k, v in f.channels().items()}
    except Exception as e:  # the binding raises RuntimeError for anything unreadable
        raise UserError(f"{path} is not a readable OpenEXR file ({e})") from None
    names = {k.split(".")[-1].upper(): k for k in ch}  # layered files: "layer.R"
    if all(c in names for c in "RGB"):
        img = np.stack([ch[names[c]] for c in "RGB"], -1)
    elif "Y" in names:
        img = np.repeat(ch[names["Y"]][..., None], 3, -1)
    else:
        raise UserError(f"{path} has no R, G, B (or Y) channels (found: {', '.join(sorted(ch))})")
    return np.ascontiguousarray(img.astype(np.float32))


def write_exr(path: str | os.PathLike, img: np.ndarray) -> None:
    try:
        import OpenEXR
    except ImportError:
        raise UserError(f"writing .exr needs the optional OpenEXR package ({EXR_HINT})") from None
    from headavatar.utils.io import atomic_path

    img = np.ascontiguousarray(np.asarray(img, np.float32))
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    with atomic_path(path) as tmp:
        with OpenEXR.File(header, {"RGB": img}) as f:
            f.write(str(tmp))


# ------------------------------------------------------------------ any
def read_hdr_image(path: str | os.PathLike) -> np.ndarray:
    """Read a .hdr or .exr file -> float32 [H,W,3], checked for NaN/Inf and negatives."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"environment map {path} does not exist")
    if not path.is_file():
        raise UserError(f"environment map {path} is not a file")
    ext = path.suffix.lower()
    if ext in (".hdr", ".rgbe", ".pic"):
        img = read_hdr(path)
    elif ext == ".exr":
        img = read_exr(path)
    else:
        raise UserError(f"{path.name}: environment maps must be HDR images (.hdr or .exr), not '{ext or 'no extension'}'")
    bad = ~np.isfinite(img)
    if bad.any():
        raise UserError(f"{path} holds {int(bad.sum())} NaN/Inf values; fix or re-export the environment map")
    if float(img.max(initial=0.0)) <= 0.0:
        raise UserError(f"{path} is entirely black: it would light nothing")
    return np.maximum(img, 0.0)


def write_hdr_image(path: str | os.PathLike, img: np.ndarray) -> None:
    ext = Path(path).suffix.lower()
    if ext == ".hdr":
        write_hdr(path, img)
    elif ext == ".exr":
        write_exr(path, img)
    else:
        raise UserError(f"{path}: write .hdr or .exr")


def exr_available() -> bool:
    try:
        import OpenEXR  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["read_hdr", "write_hdr", "read_exr", "write_exr", "read_hdr_image", "write_hdr_image", "exr_available", "float_to_rgbe", "rgbe_to_float"]

