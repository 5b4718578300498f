"""Building a FlashAvatar model for a subject: shared by training and loading (inference never imports train.py)."""

from __future__ import annotations

import torch

from headavatar.methods.flashavatar.config import FlashAvatarConfig
from headavatar.methods.flashavatar.model import FlashAvatarModel
from headavatar.subjects.format import Subject


def build_model(subject: Subject, cfg: FlashAvatarConfig, device: torch.device, head_overrides: dict | None = None) -> FlashAvatarModel:
    head = subject.head_model(**(head_overrides or {})).to(device)
    shape = torch.as_tensor(subject.tracking.shape, dtype=torch.float32, device=device)
    return FlashAvatarModel(head, cfg, shape).to(device)
