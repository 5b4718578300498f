"""The folder `headavatar make` fills (OUT) and its stage markers.

    OUT/
      make.json            what was asked: input name, method, head model, budget, options (a re-run must ask the same)
      subject/             the tracked subject (track stage; a subject given as input is hard-linked or copied here)
      run/                 the training run; run.json names the subject by a relative path (../subject)
        eval/              held-out metrics.json, side-by-side video, worst frames (eval stage)
        export/            the exported avatar: canonical.ply (FlashAvatar) or canonical.glb (FLARE)
        report.html        the run's report, with the pipeline's stage times (report stage)
      thumbnail.jpg        a held-out frame, ground truth | render (report stage)
      stages/NAME.json     one marker per finished stage, written atomically when it completes
      stages/train.started.json   which subject a (possibly interrupted) training belongs to
      make.log, error.json (batch only) what the pipeline printed; the last failure

Every path stored in these files is relative to OUT, so the folder can move between machines
(track on a laptop, train on a GPU server, read the results anywhere).

A stage is complete when its marker is there, names the marker of the stage before it (``upstream``:
each marker has a fresh ``id``, so re-doing a stage invalidates everything after it), and its
outputs check out (the stage's own validator).  Otherwise it runs again.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from headavatar.utils.io import write_json

STAGES = ("track", "train", "eval", "export", "report")
SUBJECT, RUN, STAGE_DIR = "subject", "run", "stages"
PLAN, LOG, ERROR, THUMBNAIL = "make.json", "make.log", "error.json", "thumbnail.jpg"
REPORT = "report.html"


def _under(name: str, folder: str = "root") -> property:
    """A read-only path attribute: ``name`` inside the layout's attribute ``folder``."""
    return property(lambda self: getattr(self, folder) / name, doc=f"{folder}/{name}")


class Layout:
    def __init__(self, root):
        self.root = Path(root)

    subject = _under(SUBJECT)
    run = _under(RUN)
    plan = _under(PLAN)
    log = _under(LOG)
    error = _under(ERROR)
    thumbnail = _under(THUMBNAIL)
    report = _under(REPORT, folder="run")

    def marker_path(self, stage: str) -> Path:
        return self.root / STAGE_DIR / f"{stage}.json"

    def started_path(self, stage: str) -> Path:
        return self.root / STAGE_DIR / f"{stage}.started.json"

    def rel(self, path) -> str:
        """``path`` relative to OUT, with forward slashes (what the files store)."""
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    # ------------------------------------------------------------------ markers
    def read_marker(self, stage: str) -> dict | None:
        return _read(self.marker_path(stage))

    def write_marker(self, stage: str, upstream: str | None, seconds: float, outputs: dict, **extra) -> dict:
        marker = {"stage": stage, "id": uuid.uuid4().hex, "upstream": upstream, "seconds": round(seconds, 3),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "outputs": outputs, **extra}
        write_json(self.marker_path(stage), marker)
        return marker

    def drop_marker(self, stage: str) -> None:
        self.marker_path(stage).unlink(missing_ok=True)

    def read_started(self, stage: str) -> dict | None:
        return _read(self.started_path(stage))

    def write_started(self, stage: str, record: dict) -> None:
        write_json(self.started_path(stage), {"stage": stage, **record})


def _read(path: Path) -> dict | None:
    """A marker, or None when absent or unreadable (a damaged marker means: do the stage again)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None
