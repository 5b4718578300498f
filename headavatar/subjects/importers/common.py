"""Helpers shared by the importers of other tools' data formats."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from headavatar.errors import UserError
from headavatar.headmodels.base import HeadModel
from headavatar.subjects.format import LABEL_IDS, SubjectWriter
from headavatar.utils.io import atomic_path, write_image


def load_flame(flame_dir, *, n_shape: int | None = None, n_expr: int | None = None, eyelids: bool | None = None,
               model_path=None, masks_path=None, template_obj=None, landmarks_path=None, eyelids_dir=None) -> tuple[HeadModel, dict]:
    """The user's FLAME and the spec a subject stores for it (file names, no absolute paths)."""
    from headavatar.headmodels.flame import build_flame_head, flame_spec

    model = build_flame_head(
        dir=flame_dir, model_path=model_path, masks_path=masks_path, template_obj=template_obj,
        landmarks_path=landmarks_path, eyelids_dir=eyelids_dir, eyelids=eyelids, n_shape=n_shape, n_expr=n_expr,
    )
    model.validate()
    return model, flame_spec(model)


def put_frame(writer: SubjectWriter, i: int, src: Path, image: np.ndarray, alpha: np.ndarray | None, parsing: np.ndarray | None) -> None:
    """Store frame ``i``: the source image file is copied byte for byte when its format is the
    subject's (no JPEG re-encoding loss), otherwise written from the decoded pixels."""
    same = {".jpeg": ".jpg"}.get(Path(src).suffix.lower(), Path(src).suffix.lower()) == writer.image_ext.lower()
    if same:
        dst = writer.root / "frames" / f"{i:06d}{writer.image_ext}"
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        if alpha is not None:
            write_image(writer.root / "alpha" / f"{i:06d}.png", alpha)
        if parsing is not None:
            write_image(writer.root / "parsing" / f"{i:06d}.png", parsing)
        writer.count = max(writer.count, i + 1)
    else:
        writer.write_frame(i, image, alpha, parsing)


def gray(a: np.ndarray, what: str, path) -> np.ndarray:
    """A single-channel uint8 map from an image read as stored (L, RGB, RGBA, ...)."""
    if a.ndim == 2:
        return a
    if a.ndim == 3 and a.shape[2] == 4:
        # an RGBA matte carries it in alpha, unless alpha is all opaque
        return a[..., 3] if a[..., 3].min() < 255 else a[..., 0]
    if a.ndim == 3 and a.shape[2] in (2, 3):
        return a[..., 0]
    raise UserError(f"{what} {path} has an unexpected layout {a.shape}")


def split_last(n: int, test: int | float | None, max_train: int | None = None, where: str = "") -> tuple[dict, list[str]]:
    """Hold out the last ``test`` frames (int) or fraction (float) of a clip, the references' protocol.

    Fewer frames than asked for never leave the training set empty (the FlashAvatar
    reference crashes at N <= 500): the last 15% are held out instead, with a warning.
    """
    notes = []
    if n < 2:
        raise UserError(f"{where}{n} frame(s): at least 2 are needed to train and hold some out")
    if test is None:
        k = max(1, int(round(0.15 * n)))
    elif isinstance(test, float) and 0 <= test < 1:
        k = int(round(test * n))
    else:
        k = int(test)
        if k < 0:
            raise UserError(f"the number of test frames must be >= 0, got {k}")
        if k >= n:
            k2 = max(1, int(round(0.15 * n)))
            notes.append(f"{where}only {n} frames, not more than the {k} test frames asked for: holding out the last {k2} (15%) instead")
            k = k2
    train = list(range(0, n - k))
    if max_train is not None and len(train) > max_train:
        notes.append(f"{where}training on the first {max_train} of {len(train)} frames (max_train, as the reference's cap)")
        train = train[:max_train]
    return {"train": train, "test": list(range(n - k, n))}, notes


# CelebAMask-HQ / BiSeNet face-parsing classes (19) -> headavatar parsing labels.
# Eyeglasses count as skin and earrings as hair, as FLARE's semantic channels group them
# (and FlashAvatar's neck-head mask keeps both); necklace and cloth are clothing; hat is an accessory.
CELEBAMASK_TO_LABELS = np.array(
    [
        LABEL_IDS["background"],  # 0 background
        LABEL_IDS["skin"],  # 1 skin
        LABEL_IDS["brows"], LABEL_IDS["brows"],  # 2 l_brow, 3 r_brow
        LABEL_IDS["eyes"], LABEL_IDS["eyes"],  # 4 l_eye, 5 r_eye
        LABEL_IDS["skin"],  # 6 eyeglasses
        LABEL_IDS["skin"], LABEL_IDS["skin"],  # 7 l_ear, 8 r_ear
        LABEL_IDS["hair"],  # 9 earring
        LABEL_IDS["skin"],  # 10 nose
        LABEL_IDS["mouth_interior"],  # 11 inner mouth
        LABEL_IDS["lips"], LABEL_IDS["lips"],  # 12 u_lip, 13 l_lip
        LABEL_IDS["neck"],  # 14 neck
        LABEL_IDS["clothing"], LABEL_IDS["clothing"],  # 15 necklace, 16 cloth
        LABEL_IDS["hair"],  # 17 hair
        LABEL_IDS["accessory"],  # 18 hat
    ],
    dtype=np.uint8,
)
