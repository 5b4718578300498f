"""Named values that several wings share (no imports: any module may use them).

Parsing labels are the uint8 values of a subject's ``parsing/*.png`` (docs/SUBJECT_FORMAT.md) and
the per-face ``face_labels`` of every head model; ``subjects.format`` re-exports them.
"""

from __future__ import annotations

LABELS = {
    0: "background",
    1: "skin",
    2: "brows",
    3: "eyes",
    4: "lips",
    5: "mouth_interior",
    6: "hair",
    7: "neck",
    8: "clothing",
    9: "accessory",
}
LABEL_IDS = {v: k for k, v in LABELS.items()}
# What FlashAvatar calls "neckhead": everything of the head, hair and neck kept; clothes dropped.
HEAD_LABELS = tuple(LABEL_IDS[k] for k in ("skin", "brows", "eyes", "lips", "mouth_interior", "hair", "neck"))
MOUTH_LABELS = (LABEL_IDS["lips"], LABEL_IDS["mouth_interior"])

# the held-out share of a clip (its last frames) when a subject is made
TEST_FRACTION = 0.15

# frame rate assumed where a video or a dataset does not say (and the default of written videos)
DEFAULT_FPS = 25.0

# an 8-bit alpha matte's foreground: above half of 255
ALPHA_FOREGROUND_U8 = 127
