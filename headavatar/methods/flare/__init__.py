"""FLARE (SIGGRAPH Asia 2023): relightable mesh avatars with neural materials and split-sum shading.

A canonical mesh (the head model's, remeshed once) deformed by a learnt
blendshape/skinning network; materials (albedo, roughness, specular
intensity) from an MLP on canonical positions; a neural light in training and
any HDR environment map for relighting (``headavatar relight``).

This module stays light (no torch import) so that the command line can read
``headavatar.methods.flare.cli`` without loading the models.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from headavatar.methods import register_method
from headavatar.methods.flare.config import FlareConfig

if TYPE_CHECKING:
    from headavatar.methods.flare.avatar import FlareAvatar
    from headavatar.methods.run import RunDir


def __getattr__(name: str):
    # FlareAvatar lives in avatar.py (imports torch); loaded on first use
    if name == "FlareAvatar":
        from headavatar.methods.flare import avatar

        return avatar.FlareAvatar
    raise AttributeError(name)


@register_method
class FlareMethod:
    name = "flare"
    config_cls = FlareConfig

    def train(self, subject_dir: Path, run: "RunDir", cfg: FlareConfig, resume: bool = False, progress: bool = True) -> None:
        from headavatar.methods.flare.train import train_flare

        train_flare(subject_dir, run, cfg, resume=resume, progress=progress)

    def load(self, run: "RunDir", device="cpu", subject_dir=None) -> "FlareAvatar":
        from headavatar.methods.flare.avatar import FlareAvatar

        return FlareAvatar(run, device, subject_dir)
