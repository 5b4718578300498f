"""FLARE (SIGGRAPH Asia 2023): relightable mesh avatars with neural materials and split-sum shading.

A canonical mesh (the head model's, remeshed once) deformed by a learnt
blendshape/skinning network; materials (albedo, roughness, specular
intensity) from an MLP on canonical positions; a neural light in training and
any HDR environment map for relighting (``headavatar relight``).

This module stays light (no torch import) so that the command line can list
the method without loading the models.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from headavatar.methods import register_method
from headavatar.methods.avatar import MESH, RELIGHT, DemoSettings
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
    capabilities = frozenset({MESH, RELIGHT})
    describe = "FLARE run (a mesh)"

    def train(self, subject_dir: Path, run: "RunDir", cfg: FlareConfig, resume: bool = False, progress: bool = True) -> None:
        from headavatar.methods.flare.train import train_flare

        train_flare(subject_dir, run, cfg, resume=resume, progress=progress)

    def load(self, run: "RunDir", device="cpu", subject_dir=None) -> "FlareAvatar":
        from headavatar.methods.flare.avatar import FlareAvatar

        return FlareAvatar(run, device, subject_dir)

    def demo_settings(self, quick: bool) -> DemoSettings:
        from headavatar.methods.flare.demo import DEMO_SETTINGS

        d = DEMO_SETTINGS["quick" if quick else "full"]
        return DemoSettings(frames=d["frames"], image_size=d["image_size"], overrides=dict(d["overrides"]))

    def demo_extras(self, run_dir: Path, device, quick: bool, log=print) -> list[tuple[str, str]]:
        """Relighting under the built-in sky, scored against the synthetic subject's ground truth."""
        from headavatar.methods.flare.demo import demo_relight_step

        return demo_relight_step(run_dir, device, quick, log)
