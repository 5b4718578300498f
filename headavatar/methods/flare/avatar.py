"""A trained FLARE avatar behind the Avatar protocol (headavatar.methods.avatar): render, relight, mesh export."""

from __future__ import annotations

from pathlib import Path

import torch

from headavatar.headmodels.params import FrameParams
from headavatar.methods.avatar import MESH, RELIGHT, open_run
from headavatar.methods.flare.config import FlareConfig
from headavatar.methods.flare.shading import composite
from headavatar.methods.run import RunDir


class FlareAvatar:
    """A trained FLARE avatar: ``render`` (neural light, for eval/render) and ``relight`` (environment map)."""

    method = "flare"
    eval_protocol = "imavatar"
    covers = "person"  # trained on the whole matte (mask loss against the person's alpha)
    capabilities = frozenset({MESH, RELIGHT})

    def __init__(self, run: RunDir, device, subject_dir: Path | None = None, head_overrides: dict | None = None):
        from headavatar.methods.flare.build import build_model, resolve_light_frame, restore_model

        self.run = run
        info, self.cfg, self.device, self.subject, self.size = open_run(run, self.method, FlareConfig, device, subject_dir)
        self.light_frame = info.get("light_frame") or resolve_light_frame(self.cfg, self.subject)
        self.model = build_model(self.subject, self.cfg, self.device, head_overrides or run.head_overrides)
        self.step, state = run.load_checkpoint(map_location=self.device)
        restore_model(self.model, state)
        self.model.eval()
        self.background = torch.tensor(self.cfg.background, dtype=torch.float32, device=self.device)

    @property
    def head(self):
        return self.model.head

    @torch.no_grad()
    def render(self, params: FrameParams, cameras, background: torch.Tensor | None = None) -> dict:
        """sRGB frames under the learnt light: {"rgb": [B,H,W,3] in [0,1], "alpha": [B,H,W,1]}."""
        out = self.model.render(params, cameras, light_frame=self.light_frame)
        bg = self.background if background is None else background
        return {"rgb": composite(out["rgb"], out["alpha"], bg), "alpha": out["alpha"]}

    @torch.no_grad()
    def relight(self, params: FrameParams, cameras, light, background=None, intrinsics: bool = False, light_frame: str = "world") -> dict:
        """Render under an EnvironmentLight; see headavatar.methods.flare.relight for the outputs."""
        from headavatar.methods.flare.relight import relight_frames

        return relight_frames(self, params, cameras, light, background, intrinsics, light_frame)

    # ------------------------------------------------------------ MESH
    def textured_mesh(self, params: FrameParams | None = None, texture_size: int = 1024, uv: str = "auto", morph_targets: bool = True,
                      textures: bool = True):
        """The mesh with baked albedo/roughness/specular maps and, canonical only, expression morph targets."""
        from headavatar.methods.flare.export_mesh import textured_mesh

        return textured_mesh(self, params, texture_size, uv, morph_targets, textures)

    def posed_mesh(self, base, params: FrameParams):
        from headavatar.methods.flare.export_mesh import posed_mesh

        return posed_mesh(self, base, params)
