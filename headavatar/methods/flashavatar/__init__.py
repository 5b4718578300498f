"""FlashAvatar (CVPR 2024): Gaussians on the head model's UV map, moved by an expression MLP.

This module stays light (no torch import): the command line reads the method's
capabilities and demo settings without loading the model code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from headavatar.methods import register_method
from headavatar.methods.avatar import GAUSSIANS, DemoSettings
from headavatar.methods.flashavatar.config import FlashAvatarConfig

if TYPE_CHECKING:
    from headavatar.methods.flashavatar.avatar import FlashAvatarAvatar
    from headavatar.methods.run import RunDir


@register_method
class FlashAvatarMethod:
    name = "flashavatar"
    config_cls = FlashAvatarConfig
    capabilities = frozenset({GAUSSIANS})
    describe = "FlashAvatar run (3D Gaussians)"

    def train(self, subject_dir: Path, run: "RunDir", cfg: FlashAvatarConfig, resume: bool = False, progress: bool = True) -> None:
        from headavatar.methods.flashavatar.train import train_flashavatar

        train_flashavatar(subject_dir, run, cfg, resume=resume, progress=progress)

    def load(self, run: "RunDir", device="cpu", subject_dir=None) -> "FlashAvatarAvatar":
        from headavatar.methods.flashavatar.avatar import FlashAvatarAvatar

        return FlashAvatarAvatar(run, device, subject_dir)

    def demo_settings(self, quick: bool) -> DemoSettings:
        from headavatar.methods.flashavatar.demo import DEMO_SETTINGS

        s = DEMO_SETTINGS["quick" if quick else "full"]
        return DemoSettings(s.frames, s.image_size, dict(s.overrides))

    def demo_extras(self, run_dir: Path, device, quick: bool, log=print) -> list[tuple[str, str]]:
        return []

    def evaluate_refined(self, run_dir, **kw) -> dict:
        """The test-time-refinement protocol: held-out tracking optimised with the avatar frozen (methods/flashavatar/refine.py)."""
        from headavatar.methods.flashavatar.refine import evaluate_refined

        return evaluate_refined(run_dir, **kw)
