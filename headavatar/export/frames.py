"""Which frame to export or view: the canonical (neutral) pose, one tracked frame, or a set of them.

Shared by the exporters and the viewer so that "canonical" means the same
thing everywhere: the subject's identity (tracked shape), zero expression,
zero extras, every joint at rest and no translation -- the head sits at the
head model's origin, facing +z.
"""

from __future__ import annotations

from headavatar.errors import UserError
from headavatar.headmodels.params import FrameParams

CANONICAL = "canonical"


def neutral_params(avatar, batch: int = 1) -> FrameParams:
    """Head-model inputs of the canonical pose for ``avatar`` (tensors on its device)."""
    return avatar.subject.tracking.neutral(batch, avatar.device)


def frame_params(avatar, idx: int) -> FrameParams:
    """Tracked head-model inputs of frame ``idx`` (batch of 1)."""
    check_frame(avatar.subject, idx)
    return avatar.subject.tracking.params([idx], avatar.device)


def check_frame(subject, idx: int) -> int:
    n = subject.num_frames
    if not isinstance(idx, (int,)) or isinstance(idx, bool) or not 0 <= idx < n:
        raise UserError(f"unknown frame index {idx!r}: the subject has {n} frames (0-{n - 1})")
    return idx


def parse_frames(spec, subject) -> None | int | list[int]:
    """Frame selection -> None (canonical), one index (one file) or a list (a sequence folder).

    ``spec``: None or "canonical"; an int or a digit string; "all", "train", "test";
    a comma-separated list of indices ("0,5,9") or a list of ints.
    """
    if spec is None or spec == CANONICAL:
        return None
    if isinstance(spec, bool):
        raise UserError(f"unknown frame selection {spec!r}")
    if isinstance(spec, int):
        return check_frame(subject, spec)
    if isinstance(spec, (list, tuple)):
        out = [check_frame(subject, _as_index(i)) for i in spec]
        if not out:
            raise UserError("the frame list is empty")
        return out
    s = str(spec).strip()
    named = {"all": list(range(subject.num_frames)), "train": list(subject.split.get("train", [])), "test": list(subject.split.get("test", []))}
    if s in named:
        if not named[s]:
            raise UserError(f"the subject has no {s} frames")
        return named[s]
    if "," in s:
        return parse_frames([p for p in s.split(",") if p.strip()], subject)
    return check_frame(subject, _as_index(s))


def _as_index(x) -> int:
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    s = str(x).strip()
    if s.lstrip("-").isdigit():
        return int(s)
    raise UserError(f"unknown frame selection {x!r}: use canonical, a frame index, a comma-separated list, all, train or test")
