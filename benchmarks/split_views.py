"""Views of tracked subjects with another held-out split, to tell apart two reasons for a low held-out figure.

    python benchmarks/split_views.py SUBJECT... -o DIR --split blocks:4|every:7|tail

The protocol (docs/METRICS.md) holds out the last 15 % of a clip.  When the avatar scores far lower there
than on its training frames, either it generalises poorly to any unseen frame, or the tail shows what the
first 85 % never does (expressions, hair positions).  The same clip with the same number of held-out frames
spread over its length separates the two:

- ``blocks:K``: K contiguous blocks, evenly spaced, together as many frames as the tail (unseen frames whose
  content the rest of the clip covers: in-distribution generalisation);
- ``every:N``: every N-th frame (each held-out frame has trained neighbours 1/fps away: interpolation);
- ``tail``: the protocol's own split (a control: the same view machinery, the same figures as the subject).

Each view is DIR/STEM: symbolic links to the subject's files, and its own subject.json with the new split
(invalid frames stay out of both parts).  Diagnostic only: the protocol's figures are the tail's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def split_for(n: int, n_test: int, kind: str, valid: np.ndarray) -> dict[str, list[int]]:
    name, _, arg = kind.partition(":")
    if name == "tail":
        test = np.arange(n - n_test, n)
    elif name == "blocks":
        k = int(arg or 4)
        sizes = np.full(k, n_test // k) + (np.arange(k) < n_test % k)
        # block j is centred at (j + 0.5) / k of the clip: evenly spaced, none at the very start or end
        starts = [int(round((j + 0.5) * n / k - s / 2)) for j, s in enumerate(sizes)]
        test = np.concatenate([np.arange(a, a + s) for a, s in zip(starts, sizes)])
    elif name == "every":
        step = int(arg or 7)
        test = np.arange(step // 2, n, step)
    else:
        raise SystemExit(f"--split {kind}: use tail, blocks:K or every:N")
    is_test = np.zeros(n, bool)
    is_test[test] = True
    idx = np.arange(n)
    return {"train": [int(i) for i in idx[~is_test & valid]], "test": [int(i) for i in idx[is_test & valid]]}


def make_view(src: Path, dst: Path, kind: str) -> dict:
    from headavatar.subjects.format import Subject
    from headavatar.utils.io import write_json

    subj = Subject.open(src)
    meta = dict(subj.meta)
    n = subj.num_frames
    n_test = len(subj.split.get("test", []))
    valid = np.asarray(subj.tracking.valid, bool)
    split = split_for(n, n_test, kind, valid)
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name == "subject.json":
            continue
        link = dst / p.name
        if not link.exists():
            os.symlink(p.resolve(), link)
    meta["split"] = split
    meta["notes"] = {**meta.get("notes", {}), "split_view": {"source": str(src.resolve()), "split": kind}}
    write_json(dst / "subject.json", meta)
    Subject.open(dst)
    return {"subject": src.name, "frames": n, "train": len(split["train"]), "test": len(split["test"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("subjects", nargs="+")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--split", required=True, help="blocks:K, every:N or tail")
    a = ap.parse_args()
    for s in map(Path, a.subjects):
        print(make_view(s, Path(a.out) / s.name, a.split))


if __name__ == "__main__":
    main()
