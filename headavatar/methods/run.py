"""Run folders: config, checkpoints (atomic, resumable), curves, previews.

    RUN_DIR/
      run.json              method, subject, headavatar version, resolved config
      checkpoints/ckpt_XXXXXXX.pt   (the last ``keep`` are kept)
      curves.jsonl          one JSON object per logged step
      previews/XXXXXXX.jpg  GT | render side-by-side
      eval/                 metrics.json, per-frame metrics, videos (headavatar eval)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from headavatar import __version__
from headavatar.config import from_dict, to_dict
from headavatar.errors import UserError
from headavatar.log import get_logger
from headavatar.utils.io import atomic_path, read_json, write_json

_log = get_logger(__name__)

_CKPT = re.compile(r"ckpt_(\d+)\.pt$")


class RunDir:
    def __init__(self, root, head_overrides: dict | None = None):
        self.root = Path(root)
        # options for loading the subject's head model on this machine (e.g. {"dir": FLAME folder});
        # saved in run.json so eval/render/export find the model again
        self._head_overrides = head_overrides
        # what load_checkpoint did: {"used": name, "step": N, "skipped": [{"checkpoint", "error"}]} (eval records it)
        self.checkpoint_load: dict | None = None
        # merged into run.json by write_info (e.g. why a loss term was switched off)
        self.notes: dict = {}

    @property
    def head_overrides(self) -> dict:
        if self._head_overrides is not None:
            return dict(self._head_overrides)
        if self.exists():
            return dict(self.read_info().get("head_model_overrides") or {})
        return {}

    # ----------------------------------------------------------- run.json
    @property
    def info_path(self) -> Path:
        return self.root / "run.json"

    def exists(self) -> bool:
        return self.info_path.is_file()

    def ensure_fresh(self) -> None:
        """Refuse to train over an existing run (nothing already written is destroyed)."""
        if self.exists() or (self.root / "checkpoints").is_dir():
            raise UserError(f"{self.root} already holds a training run; pass --resume to continue it or choose another -o folder")
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{self.root} exists and is not a folder")

    def write_info(self, method: str, subject_dir: Path, cfg, extra: dict | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.info_path, {
            "method": method,
            "subject": self._subject_ref(subject_dir),
            # where it was when trained: found again when the run is copied without its subject
            "subject_at_training": str(Path(subject_dir).resolve()),
            "headavatar_version": __version__,
            "config": to_dict(cfg),
            "head_model_overrides": self.head_overrides,
            **self.notes,
            **(extra or {}),
        })

    def _subject_ref(self, subject_dir) -> str:
        """The subject as a path relative to the run folder: a run and its subject then move together
        (another machine, a shared filesystem mounted elsewhere); read_info makes it absolute again."""
        subject = Path(subject_dir).resolve()
        try:
            return os.path.relpath(subject, self.root.resolve())
        except ValueError:  # another drive (Windows): no relative path exists
            return str(subject)

    def read_info(self) -> dict:
        if not self.root.exists():
            raise UserError(f"run folder {self.root} does not exist")
        if not self.exists():
            raise UserError(f"{self.root} is not a training run (no run.json); train one with 'headavatar train'")
        info = read_json(self.info_path)
        subject = info.get("subject")
        if subject and not Path(subject).is_absolute():  # relative to the run folder (runs before this: absolute)
            info["subject"] = os.path.normpath(self.root.resolve() / subject)
            earlier = info.get("subject_at_training")
            if not Path(info["subject"]).exists() and earlier and Path(earlier).is_dir():
                info["subject"] = earlier  # the run moved without its subject; the subject did not move
        return info

    def require_method(self, method: str) -> dict:
        info = self.read_info()
        if info.get("method") != method:
            raise UserError(f"{self.root} is a '{info.get('method')}' run, not '{method}'")
        return info

    def load_config(self, method_cls):
        info = self.require_method(method_cls.name)
        return from_dict(method_cls.config_cls, info["config"], where=str(self.info_path))

    @property
    def subject_dir(self) -> Path:
        return Path(self.read_info()["subject"])

    # -------------------------------------------------------- checkpoints
    @property
    def ckpt_dir(self) -> Path:
        return self.root / "checkpoints"

    def checkpoints(self) -> list[tuple[int, Path]]:
        if not self.ckpt_dir.is_dir():
            return []
        out = []
        for p in self.ckpt_dir.iterdir():
            m = _CKPT.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def save_checkpoint(self, step: int, state: dict, keep: int = 2) -> Path:
        path = self.ckpt_dir / f"ckpt_{step:07d}.pt"
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        for _, old in self.checkpoints()[:-keep]:
            old.unlink(missing_ok=True)
        return path

    def load_checkpoint(self, map_location="cpu") -> tuple[int, dict]:
        ckpts = self.checkpoints()
        if not ckpts:
            raise UserError(f"{self.root} has no checkpoint; train first (or the run was killed before its first checkpoint: "
                            "start it again without --resume in a new folder)")
        skipped = []
        for step, path in reversed(ckpts):  # fall back to an older one if the newest is damaged
            try:
                state = torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # corrupt zip, truncated file...
                skipped.append({"checkpoint": str(path), "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"})
                continue
            self.checkpoint_load = {"used": str(path), "step": step, "skipped": skipped}
            if skipped:
                # loud: an older checkpoint gives an older (worse) avatar, and the user should know which
                names = ", ".join(f"{Path(k['checkpoint']).name} ({k['error'].split(':')[0]})" for k in skipped)
                print(f"headavatar: warning: skipped unreadable checkpoint(s) {names} in {self.ckpt_dir}; "
                      f"using the older {path.name} (step {step})", file=sys.stderr, flush=True)
            return step, state
        errors = "; ".join(f"{Path(k['checkpoint']).name}: {k['error'].split(':')[0]}" for k in skipped)
        raise UserError(f"every checkpoint in {self.ckpt_dir} is unreadable ({errors}); retrain")

    def discard_unstarted(self, before: set[str] | None) -> None:
        """Undo a training start that failed before its first checkpoint, so the folder does not
        block a retry: remove what this run created (the whole folder if it made it; ``before``
        holds the names that were there already, or None if the folder did not exist)."""
        if self.checkpoints() or not self.root.is_dir():
            return
        if before is None:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for p in self.root.iterdir():
            if p.name not in before:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    # ------------------------------------------------------------- curves
    def append_curve(self, row: dict) -> None:
        with open(self.root / "curves.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def read_curves(self) -> list[dict]:
        p = self.root / "curves.jsonl"
        if not p.is_file():
            return []
        rows = []
        for line in p.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill
        return rows

    def resume(self, iterations: int, map_location="cpu", progress: bool = True) -> tuple[int, dict, float] | None:
        """Start of a resumed training: the newest readable checkpoint, with the RNG restored and the
        curve rows logged past it dropped.  Returns (step, state, elapsed seconds), or None when the run
        already has ``iterations`` steps (nothing to do; said once).  The method restores its own
        model and optimisers from ``state``."""
        start, state = self.load_checkpoint(map_location=map_location)
        # the CPU generator's state must be a CPU ByteTensor: a checkpoint loaded with map_location=cuda
        # brings it back on the GPU (TypeError: RNG state must be a torch.ByteTensor)
        torch.set_rng_state(state["rng"].cpu())
        self.truncate_curves(start)
        if start >= iterations:
            if progress:
                _log.info(f"run already trained to {start} iterations (asked: {iterations}); nothing to do")
            return None
        return start, state, float(state.get("elapsed", 0.0))

    def truncate_curves(self, step: int) -> None:
        """After a resume, drop rows logged past the checkpoint we resumed from."""
        rows = [r for r in self.read_curves() if r.get("step", 0) <= step]
        with atomic_path(self.root / "curves.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
