"""Building and restoring a FLARE model for a subject: shared by training and loading (inference never imports train.py)."""

from __future__ import annotations

import numpy as np
import torch

from headavatar.errors import UserError
from headavatar.methods.flare.config import FlareConfig
from headavatar.methods.flare.model import FlareModel
from headavatar.subjects.format import Subject


def resolve_light_frame(cfg: FlareConfig, subject: Subject) -> str:
    if cfg.light_frame in ("world", "head"):
        return cfg.light_frame
    if cfg.light_frame != "auto":
        raise UserError(f"light_frame must be auto, world or head (got {cfg.light_frame!r})")
    synth = subject.meta.get("synthetic") or {}
    return "head" if synth.get("lighting") == "head" else "world"


def build_model(subject: Subject, cfg: FlareConfig, device: torch.device, head_overrides: dict | None = None) -> FlareModel:
    head = subject.head_model(**(head_overrides or {})).to(device)
    tr = subject.tracking
    train = np.asarray(subject.split["train"])
    shape = torch.as_tensor(tr.shape, dtype=torch.float32, device=device)
    # the canonical expression is the mean over the training frames (flare#10's fix)
    expr = torch.as_tensor(tr.expression[train].mean(0), dtype=torch.float32, device=device)
    extras = {k: torch.as_tensor(v[train].mean(0), dtype=torch.float32, device=device) for k, v in tr.extras.items()}
    return FlareModel(head, cfg, shape, expr, extras).to(device)


def restore_model(model: FlareModel, state: dict) -> None:
    """Bring a freshly built model to a checkpoint's stage and mesh, then load its weights."""
    if int(state.get("stage", 1)) == 2 and model.stage != 2:
        model.enter_stage2()
    mesh = state["mesh"]
    model.set_mesh(mesh["verts"], mesh["faces"])
    # the head-model prior is rebuilt from the subject; checkpoints of earlier versions stored it
    model.load_state_dict({k: v for k, v in state["model"].items() if not k.startswith("prior.")})
