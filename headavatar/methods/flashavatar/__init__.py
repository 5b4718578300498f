"""FlashAvatar (CVPR 2024): Gaussians on the head model's UV map, moved by an expression MLP."""

from __future__ import annotations

from pathlib import Path

import torch

from headavatar.methods import register_method
from headavatar.methods.flashavatar.config import FlashAvatarConfig
from headavatar.methods.run import RunDir
from headavatar.render.gaussians.sh import sh_to_rgb
from headavatar.utils.cudagraph import CudaGraphed


class FlashAvatarAvatar:
    """A trained FlashAvatar, ready to render frames (eval, render, export, viewer)."""

    method = "flashavatar"
    eval_protocol = "flashavatar"

    def __init__(self, run: RunDir, device, subject_dir: Path | None = None, head_overrides: dict | None = None,
                 cuda_graphs: bool = True):
        from headavatar.config import from_dict
        from headavatar.methods.flashavatar.train import build_model, training_size
        from headavatar.subjects.format import Subject
        from headavatar.utils.device import resolve_device

        info = run.require_method("flashavatar")
        self.run = run
        self.cfg = from_dict(FlashAvatarConfig, info["config"], where=str(run.info_path))
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.subject = Subject.open(subject_dir or info["subject"])
        self.size = training_size(self.subject, self.cfg.resolution)
        self.model = build_model(self.subject, self.cfg, self.device, head_overrides or run.head_overrides)
        self.step, state = run.load_checkpoint(map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.model.eval()
        self.background = torch.tensor(self.cfg.background, dtype=torch.float32, device=self.device)
        self.backend = self.cfg.backend
        # head model + MLP + Gaussian assembly replayed from CUDA graphs (one per batch size):
        # at batch 1 their kernel launches cost more than the work
        self.cuda_graphs = cuda_graphs
        self._graphed = CudaGraphed(self._gaussians)
        # with the triton rasteriser (no host sync) the whole frame, rasterisation included, is one graph
        self._graphed_frame = CudaGraphed(self._frame)
        self._frame_generation = None

    def _gaussians(self, params: dict, viewmats: torch.Tensor) -> dict:
        cond, verts = self.model.frame_inputs(params)
        g = self.model.gaussians(cond, verts)
        # view-dependent colour evaluated here (inside the graph), so the rasteriser takes plain RGB
        g["colors"] = sh_to_rgb(self.cfg.sh_degree, g["colors"], g["means"], viewmats)
        return g

    def _frame(self, params: dict, K, R, t, background, hw: tuple) -> dict:
        from headavatar.camera import Cameras

        cams = Cameras(K, R, t, *hw)
        g = self._gaussians(params, cams.viewmats)
        out = self.model.render(g, cams, background, backend="triton", render_depth=False)
        return {"rgb": out.rgb, "alpha": out.alpha}

    def _render_graphed_frame(self, params: dict, cameras, bg) -> dict:
        from headavatar.render.gaussians import triton_backend as tb

        gen = tb.watch_overflow()  # a grown pair buffer (never dropped, only slower) -> capture again
        if gen != self._frame_generation:
            self._graphed_frame, self._frame_generation = CudaGraphed(self._frame), gen
        out = self._graphed_frame(params, cameras.K, cameras.R, cameras.t, bg, (cameras.height, cameras.width))
        return {k: v.clone() for k, v in out.items()}  # the graph's outputs are overwritten by the next replay

    @property
    def head(self):
        return self.model.head

    @torch.no_grad()
    def render(self, params: dict, cameras, background: torch.Tensor | None = None) -> dict:
        bg = self.background if background is None else background
        if self.cuda_graphs and self.device.type == "cuda":
            from headavatar.render.gaussians import select_backend

            if select_backend(self.backend, self.device) == "triton":
                return self._render_graphed_frame(params, cameras, bg)
        g = (self._graphed if self.cuda_graphs else self._gaussians)(params, cameras.viewmats)
        out = self.model.render(g, cameras, bg, backend=self.backend, render_depth=False)
        return {"rgb": out.rgb, "alpha": out.alpha}


@register_method
class FlashAvatarMethod:
    name = "flashavatar"
    config_cls = FlashAvatarConfig

    def train(self, subject_dir: Path, run: RunDir, cfg: FlashAvatarConfig, resume: bool = False, progress: bool = True) -> None:
        from headavatar.methods.flashavatar.train import train_flashavatar

        train_flashavatar(subject_dir, run, cfg, resume=resume, progress=progress)

    def load(self, run: RunDir, device="cpu", subject_dir=None) -> FlashAvatarAvatar:
        return FlashAvatarAvatar(run, device, subject_dir)
