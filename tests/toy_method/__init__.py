"""A toy third method, for tests only: it plugs in through the public registry and the Avatar protocol alone.

"Vertex splats": one small Gaussian on every posed head-model vertex, all of one
colour, the mean colour of the head in the training frames (its whole
"training": a closed-form least-squares fit).  Crude, but a real avatar that
the exporter, the viewer and the demo handle without knowing it exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from headavatar.methods import register_method
from headavatar.methods.avatar import GAUSSIANS, DemoSettings

NAME = "toy_splats"


@dataclass
class ToyConfig:
    resolution: int = 32  # long side of the training/rendering images
    splat_size: float = 0.004  # standard deviation of each splat, metres
    opacity: float = 0.9
    background: tuple[float, float, float] = (0.0, 1.0, 0.0)
    device: str = "cpu"  # `--device` arrives as this option (the toy always runs on the CPU)


@register_method
class ToyMethod:
    name = NAME
    config_cls = ToyConfig
    capabilities = frozenset({GAUSSIANS})
    describe = "toy run (3D Gaussians)"

    def train(self, subject_dir: Path, run, cfg: ToyConfig, resume: bool = False, progress: bool = True) -> None:
        from toy_method.avatar import fit_colour

        fit_colour(Path(subject_dir), run, cfg)

    def load(self, run, device="cpu", subject_dir=None):
        from toy_method.avatar import ToyAvatar

        return ToyAvatar(run, device, subject_dir)

    def demo_settings(self, quick: bool) -> DemoSettings:
        return DemoSettings(frames=8, image_size=32, overrides={})

    def demo_extras(self, run_dir: Path, device, quick: bool, log=print) -> list[tuple[str, str]]:
        log("      toy: nothing more to show")
        return [("Toy method", "<p>one colour on every head-model vertex</p>")]
