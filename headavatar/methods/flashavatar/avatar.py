"""A trained FlashAvatar behind the Avatar protocol (headavatar.methods.avatar): render, Gaussians."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import torch

from headavatar.errors import UserError
from headavatar.headmodels.params import FrameParams
from headavatar.log import get_logger
from headavatar.methods.avatar import GAUSSIANS, open_run
from headavatar.methods.flashavatar.config import FlashAvatarConfig
from headavatar.methods.run import RunDir
from headavatar.render.gaussians.sh import sh_to_rgb
from headavatar.utils.cudagraph import CudaGraphed

_log = get_logger(__name__)

FuseFrame = Literal["off", "compile", "triton"]
FUSE_FRAME_MODES = get_args(FuseFrame)


class FlashAvatarAvatar:
    """A trained FlashAvatar, ready to render frames (eval, render, export, viewer).

    ``fuse_frame`` (opt-in, default "off"): "compile" runs the frame's part before the rasteriser
    (head model, MLP, Gaussian assembly, SH colours) through ``torch.compile`` so inductor fuses its
    few hundred small kernels into a few; the whole frame is still captured as one CUDA graph (the
    compiled code is built on the graph's warm-up call, outside capture).  One compile per batch
    size / camera signature: the first frame of each takes seconds.  "triton": the unfused frame with
    its big parts as Triton kernels: the head model's chain and skinning (headmodels/skinning_triton.py)
    and the deformation MLP with the Gaussians' assembly, activations kept on chip (mlp_triton.py); CUDA
    (the MLP in bf16), or Triton's interpreter on the CPU.
    """

    method = "flashavatar"
    eval_protocol = "flashavatar"
    covers = "head"  # trained on targets composited with the head matte
    capabilities = frozenset({GAUSSIANS})
    # torch.compile mode of fuse_frame="compile" ("max-autotune-no-cudagraphs" also tunes the MLP's
    # matmuls: a longer first call); set before fuse_frame
    fuse_compile_mode = "default"

    def __init__(self, run: RunDir, device, subject_dir: Path | None = None, head_overrides: dict | None = None,
                 cuda_graphs: bool = True, fuse_frame: FuseFrame = "off"):
        from headavatar.methods.flashavatar.build import build_model
        from headavatar.methods.flashavatar.refine import REFINED_TRACKING, apply_refined_tracking

        self.run = run
        _, self.cfg, self.device, self.subject, self.size = open_run(run, self.method, FlashAvatarConfig, device, subject_dir)
        # training frames rendered with the tracking refined jointly with the avatar, when the run has it
        # (held-out frames keep the tracker's values: the fixed-tracking protocol)
        self.refined_tracking = apply_refined_tracking(self.subject.tracking, run.root / REFINED_TRACKING)
        self.model = build_model(self.subject, self.cfg, self.device, head_overrides or run.head_overrides)
        self.step, state = run.load_checkpoint(map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.model.eval()
        self.background = torch.tensor(self.cfg.background, dtype=torch.float32, device=self.device)
        self.backend = self.cfg.backend
        # head model + MLP + Gaussian assembly replayed from CUDA graphs (one per batch size):
        # at batch 1 their kernel launches cost more than the work
        self.cuda_graphs = cuda_graphs
        self.fuse_frame = fuse_frame  # builds the (graphed) frame functions

    @property
    def fuse_frame(self) -> FuseFrame:
        return self._fuse_frame

    @fuse_frame.setter
    def fuse_frame(self, mode: FuseFrame) -> None:
        if mode not in FUSE_FRAME_MODES:
            raise UserError(f"fuse_frame must be one of {FUSE_FRAME_MODES}, got {mode!r}")
        if mode == "triton":
            from headavatar.render.gaussians import triton_available

            ok, why = triton_available(self.device)
            if ok:
                from headavatar.methods.flashavatar.mlp_triton import supported

                ok, why = supported(self.model.mlp)
            if not ok:
                raise UserError(f"fuse_frame='triton' is unavailable: {why}; use fuse_frame='off'")
            if self.device.type == "cuda" and not self.model._mlp_bf16(self.device):
                _log.warning("fuse_frame='triton' runs the MLP kernel in bf16; with mlp_precision=fp32 the torch MLP is used")
        self._fuse_frame = mode
        self.model.mlp_kernel = self.model.head.pose_kernels = "triton" if mode == "triton" else "torch"
        # unfused, the SH colours are left to the rasteriser (Triton's is one fused kernel, where torch ops
        # would be 17 graph nodes); inductor fuses them with the rest when compiling
        self._pre_raster = self._gaussians_sh if mode != "compile" else compile_frame_part(self._gaussians_rgb, self.fuse_compile_mode)
        # graphs captured with the other mode are dropped: a new mode captures again
        self._graphed = CudaGraphed(self._pre_raster)
        # with the triton rasteriser (no host sync) the whole frame, rasterisation included, is one graph
        self._graphed_frame = CudaGraphed(self._frame)
        self._frame_generation = None

    def _gaussians_sh(self, params: FrameParams, viewmats: torch.Tensor) -> dict:
        """The frame's Gaussians with their SH coefficients up to the rendered degree (``viewmats``
        unused: the same signature as ``_gaussians_rgb``)."""
        return self.gaussians(params)

    def _gaussians_rgb(self, params: FrameParams, viewmats: torch.Tensor) -> dict:
        cond, verts = self.model.frame_inputs(params)
        g = self.model.gaussians(cond, verts)
        # view-dependent colour evaluated here (inside the graph), so the rasteriser takes plain RGB
        g["colors"] = sh_to_rgb(self.cfg.sh_degree, g["colors"], g["means"], viewmats)
        return g

    def _frame(self, params: FrameParams, K, R, t, background, hw: tuple) -> dict:
        from headavatar.camera import Cameras

        cams = Cameras(K, R, t, *hw)
        vm = cams.viewmats  # once per frame: every operation is a node of the replayed graph
        g = self._pre_raster(params, vm)
        out = self.model.render(g, cams, background, backend="triton", render_depth=False, viewmats=vm)
        return {"rgb": out.rgb, "alpha": out.alpha}

    def _render_graphed_frame(self, params: FrameParams, cameras, bg) -> dict:
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
    def render(self, params: FrameParams, cameras, background: torch.Tensor | None = None) -> dict:
        if self.cuda_graphs and self.device.type == "cuda":
            from headavatar.render.gaussians import select_backend

            if select_backend(self.backend, self.device) == "triton":
                bg = self.background if background is None else background
                return self._render_graphed_frame(params, cameras, bg)
        g = (self._graphed if self.cuda_graphs else self._pre_raster)(params, cameras.viewmats)
        return self.render_gaussians(g, cameras, background)

    # ------------------------------------------------------------ GAUSSIANS
    @torch.no_grad()
    def gaussians(self, params: FrameParams) -> dict[str, torch.Tensor]:
        """The Gaussians of a batch of frames ([B,N,...]), SH colours of the degree the avatar renders with."""
        cond, verts = self.model.frame_inputs(params)
        g = dict(self.model.gaussians(cond, verts))
        deg = self.cfg.sh_degree
        g["colors"] = g["colors"][:, :, : (deg + 1) ** 2]  # the coefficients above the degree are never rendered
        return g

    @torch.no_grad()
    def render_gaussians(self, gaussians: dict, cameras, background: torch.Tensor | None = None) -> dict:
        """Rasterise Gaussians (SH colours [B,N,K,3] or RGB [B,N,3] already evaluated for these cameras)."""
        bg = self.background if background is None else background
        out = self.model.render(gaussians, cameras, bg, self.cfg.sh_degree, backend=self.backend, render_depth=False)
        return {"rgb": out.rgb, "alpha": out.alpha}


def compile_frame_part(fn, mode: str = "default"):
    """``fn`` through inductor, shapes static (one compile per batch size: no dynamic-shape guards that
    could recompile inside a CUDA-graph capture), without inductor's own CUDA graphs (ours wrap the
    whole frame).  Parts dynamo cannot trace run eagerly between the compiled pieces (fullgraph=False)."""
    return torch.compile(fn, mode=mode, fullgraph=False, dynamic=False)
