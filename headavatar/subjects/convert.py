"""Convert a subject between storage layouts ("frames": an image file per frame; "chunks": compact video chunks)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tqdm.auto import tqdm

from headavatar.errors import UserError
from headavatar.subjects.chunks import DEFAULT_CRF, LAYOUT
from headavatar.subjects.format import Subject, SubjectWriter
from headavatar.utils.io import atomic_path


def convert_subject(src, dst, layout: str = LAYOUT, crf: int | None = None, image_ext: str = ".jpg", overwrite: bool = False, progress: bool = True,
                    extras: bool = True, chunk_frames: int | None = None):
    """Write subject ``src`` again at ``dst`` in ``layout`` ("chunks": compact, or "frames").

    Tracking, split, head-model spec and provenance are kept; files beside the
    subject (tracking overlay, dense landmarks) are copied unless ``extras`` is False (training reads neither).  Returns the opened
    new Subject.  ``src`` is never modified, and ``dst`` must be another folder.
    ``crf`` and ``chunk_frames`` left as None keep a compact source's own (else the defaults); when the
    result would be stored as the source is, its chunk files are copied, not encoded again, so
    ``compact --lean`` of a compact subject loses nothing and takes seconds.
    """
    subj = Subject.open(src)
    dst = Path(dst)
    if dst.resolve() == Path(src).resolve():
        raise UserError("the converted subject needs its own folder: pass another -o than the input")
    keep = {k: v for k, v in subj.meta.items() if k not in ("format", "version", "num_frames", "image_size", "image_ext", "fps", "head_model", "split",
                                                            "labels", "storage")}
    src_storage = (subj.meta.get("storage") or {}) if subj.chunked else {}
    if layout == LAYOUT:
        crf = int(src_storage.get("crf", DEFAULT_CRF)) if crf is None else int(crf)
        chunk_frames = src_storage.get("chunk_frames") if chunk_frames is None else int(chunk_frames)
    writer = SubjectWriter(dst, image_ext=image_ext, overwrite=overwrite, layout=layout, crf=crf if layout == LAYOUT else None,
                           chunk_frames=chunk_frames if layout == LAYOUT else None)
    if src_storage and src_storage == writer.storage_meta().get("storage"):
        # same codec, quality and chunk length: a re-encode would only add a generation of H.264 loss
        files = sorted((subj.root / "chunks").glob("*.mkv"))
        for f in tqdm(files, desc="copy chunks", unit="file", disable=not progress, dynamic_ncols=True):
            with atomic_path(writer.root / "chunks" / f.name) as tmp:
                shutil.copyfile(f, tmp)
        writer.count = subj.num_frames
    else:
        for i in tqdm(range(subj.num_frames), desc="convert", unit="frame", disable=not progress, dynamic_ncols=True):
            f = subj.load_frame(i)
            writer.write_frame(i, f["image"], f["alpha"], f["parsing"])
    for name in ("tracking_overlay.mp4", "landmarks_mediapipe.npz") if extras else ():
        if (subj.root / name).is_file():
            with atomic_path(dst / name) as tmp:
                shutil.copyfile(subj.root / name, tmp)
    return writer.finalize(subj.tracking, subj.head_model_spec, (subj.height, subj.width), split=subj.split, fps=subj.fps, extra_meta=keep)
