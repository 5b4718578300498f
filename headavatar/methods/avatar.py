"""The ``Avatar`` protocol: what a method's loaded avatar offers to everything outside the method.

Eval, render, export, the viewer, the report and the demo ask only this; none
of them names a method or reaches into a model.  A method (a folder under
``headavatar/methods/`` or anywhere else, registered with
``headavatar.methods.register_method``) supplies:

* a *method class* (light: importing it loads no model code) with ``name``,
  ``config_cls``, ``capabilities``, ``describe``, ``train``, ``load`` and
  ``demo_settings`` (``MethodProtocol`` below);
* an *avatar* that ``load`` returns (``Avatar`` below): it renders a batch of
  frame parameters (``Tracking.params``) seen by a batch of cameras.

Capabilities are optional abilities, each a protocol of its own; a method
lists the ones its avatars have in ``capabilities``, so that a command can
check before loading anything:

* ``GAUSSIANS`` (``GaussianAvatar``): 3D Gaussians per frame -> ``.ply`` export, and
  the viewer re-rasterises a pose's Gaussians when only the camera moves;
* ``MESH`` (``MeshAvatar``): a textured mesh with material maps -> ``.glb`` / ``.obj``;
* ``RELIGHT`` (``RelightableAvatar``): renders under an environment light
  (headavatar.lighting.EnvironmentLight) -> the viewer's light menu.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from headavatar.camera import Cameras
    from headavatar.export.mesh import TexturedMesh
    from headavatar.headmodels.base import HeadModel
    from headavatar.headmodels.params import FrameParams
    from headavatar.methods.run import RunDir
    from headavatar.subjects.format import Subject

GAUSSIANS = "gaussians"
MESH = "mesh"
RELIGHT = "relight"
CAPABILITIES = (GAUSSIANS, MESH, RELIGHT)


@dataclass
class DemoSettings:
    """What `headavatar demo` uses for a method: the synthetic subject's size and the training overrides."""

    frames: int  # synthetic subject length
    image_size: int  # synthetic subject resolution
    overrides: dict = field(default_factory=dict)  # training config overrides for the demo


@runtime_checkable
class Avatar(Protocol):
    """A trained avatar, loaded on a device."""

    method: str  # the registered method name
    eval_protocol: str  # the metric protocol its paper reports (headavatar.metrics.protocols.PROTOCOLS)
    # optional, so not declared here (a runtime_checkable Protocol would require it): ``covers``, what
    # its training targets cover: "head" (composited with the head matte, as FlashAvatar; the default
    # when absent) or "person" (the whole matte, torso and clothes, as FLARE); scoring under a
    # head-matte protocol composites a "person" avatar's prediction with that matte (evaluate.score_batch)
    capabilities: frozenset[str]
    run: "RunDir"
    subject: "Subject"
    device: "torch.device"
    size: tuple[int, int]  # (H, W) it renders at
    step: int  # checkpoint iteration
    background: "torch.Tensor"  # [3] sRGB, what ``render`` composites over by default
    head: "HeadModel"

    def render(self, params: FrameParams, cameras: "Cameras", background: "torch.Tensor | None" = None) -> dict:
        """{"rgb": [B,H,W,3] sRGB in [0,1], "alpha": [B,H,W,1]} for head-model inputs ``params`` [B,...]."""
        ...


@runtime_checkable
class GaussianAvatar(Protocol):
    def gaussians(self, params: FrameParams) -> dict:
        """Activated Gaussians of a batch of frames as the avatar renders them:
        means [B,N,3], quats [B,N,4] (wxyz), scales [B,N,3], opacities [B,N], colors SH [B,N,K,3] (K = (degree+1)²)."""
        ...

    def render_gaussians(self, gaussians: dict, cameras: "Cameras", background: "torch.Tensor | None" = None) -> dict:
        """Rasterise ``gaussians()`` output for ``cameras``: {"rgb", "alpha"} as ``Avatar.render``."""
        ...


@runtime_checkable
class MeshAvatar(Protocol):
    def textured_mesh(self, params: FrameParams | None, texture_size: int = 1024, uv: str = "auto", morph_targets: bool = True,
                      textures: bool = True) -> "TexturedMesh":
        """The avatar as a mesh (metres, world space) with baked maps; ``params`` one frame's inputs, None = canonical."""
        ...

    def posed_mesh(self, base: "TexturedMesh", params: FrameParams) -> "TexturedMesh":
        """``base`` (from ``textured_mesh``) moved to one frame: same UVs and maps, no morph targets."""
        ...


@runtime_checkable
class RelightableAvatar(Protocol):
    def relight(self, params: FrameParams, cameras: "Cameras", light: Any, background: Any = None, intrinsics: bool = False,
                light_frame: str = "world") -> dict:
        """{"rgb", "alpha", ...} under an EnvironmentLight; background None = the environment behind the head."""
        ...


def open_run(run: "RunDir", method: str, config_cls: type, device: Any, subject_dir: Path | None = None):
    """What every avatar's loading starts with: (run.json's info, the config, the device, the subject, (H, W)).

    ``config_cls`` needs a ``resolution`` field (long side of the rendered images; 0/None = the subject's).
    """
    from headavatar.config import from_dict
    from headavatar.subjects.dataset import training_size
    from headavatar.subjects.format import Subject
    from headavatar.utils.device import resolve_device

    info = run.require_method(method)
    cfg = from_dict(config_cls, info["config"], where=str(run.info_path))
    dev = resolve_device(device) if isinstance(device, str) else device
    subject = Subject.open(subject_dir or info["subject"])
    return info, cfg, dev, subject, training_size(subject, cfg.resolution)


class MethodProtocol(Protocol):
    name: str
    config_cls: type
    capabilities: frozenset[str]
    describe: str  # what a run holds, for messages: "FlashAvatar run (3D Gaussians)"

    def train(self, subject_dir: Path, run: "RunDir", cfg: Any, resume: bool = False, progress: bool = True) -> None: ...

    def load(self, run: "RunDir", device: Any = "cpu", subject_dir: Path | None = None) -> Avatar: ...

    def demo_settings(self, quick: bool) -> DemoSettings: ...

    def demo_extras(self, run_dir: Path, device: Any, quick: bool, log) -> list[tuple[str, str]]:
        """Method-specific demo steps after the common ones; returns report sections (title, HTML)."""
        ...

    # Optional: evaluate_refined(run_dir, steps=None, device=..., split=..., batch_size=..., lpips=...,
    # head_overrides=...) -> dict, the test-time-refinement protocol (`headavatar eval --refine-tracking`);
    # a method without it has no such protocol.


__all__ = ["Avatar", "GaussianAvatar", "open_run", "MeshAvatar", "RelightableAvatar", "MethodProtocol", "DemoSettings", "GAUSSIANS", "MESH", "RELIGHT",
           "CAPABILITIES"]
