"""Building a FlashAvatar model for a subject: shared by training and loading (inference never imports train.py)."""

from __future__ import annotations

from dataclasses import replace

import torch

from headavatar.methods.flashavatar.config import FlashAvatarConfig
from headavatar.methods.flashavatar.model import FlashAvatarModel
from headavatar.subjects.format import Subject


def resolved_config(subject: Subject, cfg: FlashAvatarConfig) -> FlashAvatarConfig:
    """``cfg`` with its subject-dependent choices made: ``neck_anchor=auto`` anchors the neck for
    subjects from video and not for synthetic ones, whose generator turns head and neck as one."""
    if cfg.neck_anchor == "auto":
        cfg = replace(cfg, neck_anchor="off" if "synthetic" in subject.meta else "train_mean")
    return cfg


def build_model(subject: Subject, cfg: FlashAvatarConfig, device: torch.device, head_overrides: dict | None = None) -> FlashAvatarModel:
    cfg = resolved_config(subject, cfg)
    head = subject.head_model(**(head_overrides or {})).to(device)
    shape = torch.as_tensor(subject.tracking.shape, dtype=torch.float32, device=device)
    return FlashAvatarModel(head, cfg, shape).to(device)
