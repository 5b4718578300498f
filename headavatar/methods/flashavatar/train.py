"""FlashAvatar training recipe (reference: train.py of FlashAvatar-code; deviations in docs/FLASHAVATAR.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from headavatar.errors import UserError
from headavatar.methods.flashavatar.build import build_model
from headavatar.methods.flashavatar.config import FlashAvatarConfig
from headavatar.methods.flashavatar.model import FlashAvatarModel
from headavatar.methods.flashavatar.refine import REFINED_TRACKING, JointRefiner
from headavatar.methods.run import RunDir
from headavatar.methods.trainer import StepOutput, Trainer
from headavatar.subjects.dataset import FrameDataset, InfiniteSampler, collate, heldout_sample, prepare_targets, training_size, training_stream
from headavatar.subjects.format import Subject
from headavatar.utils.cudagraph import CudaGraphed, GraphedStep
from headavatar.utils.device import resolve_device


def huber(pred: torch.Tensor, gt: torch.Tensor, delta: float) -> torch.Tensor:
    return F.huber_loss(pred, gt, delta=delta, reduction="mean")


def make_optimizer(model: FlashAvatarModel, cfg: FlashAvatarConfig, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam over the model's groups; ``capturable``: its step may be recorded in a CUDA graph."""
    groups = [
        {"params": list(model.mlp.parameters()), "lr": cfg.lr_mlp, "name": "mlp"},
        {"params": [model.sh_dc], "lr": cfg.lr_sh_dc, "eps": 1e-15, "name": "sh_dc"},
        {"params": [model.sh_rest], "lr": cfg.lr_sh_rest, "eps": 1e-15, "name": "sh_rest"},
        {"params": [model.opacity_logit], "lr": cfg.lr_opacity, "eps": 1e-15, "name": "opacity"},
        {"params": [model.log_scale], "lr": cfg.lr_scale, "eps": 1e-15, "name": "scale"},
        {"params": [model.rotation], "lr": cfg.lr_rotation, "eps": 1e-15, "name": "rotation"},
    ]
    if model.normal_offset is not None:
        groups.append({"params": [model.normal_offset], "lr": cfg.lr_normal_offset, "eps": 1e-15, "name": "normal_offset"})
    # fused: one kernel for all parameters on CUDA instead of a few per tensor
    cuda = model.sh_dc.device.type == "cuda"
    return torch.optim.Adam(groups, fused=cuda, capturable=capturable and cuda)


def use_graph_step(cfg: FlashAvatarConfig, device: torch.device) -> bool:
    """Whether training steps are replayed from CUDA graphs (config cuda_graph_step)."""
    if cfg.cuda_graph_step == "off" or device.type != "cuda":
        return False
    from headavatar.render.gaussians import select_backend

    return select_backend(cfg.backend, device) == "triton"


def psnr(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    return -10 * torch.log10(((pred - gt) ** 2).mean().clamp_min(1e-12))


def train_flashavatar(subject_dir: Path, run: RunDir, cfg: FlashAvatarConfig, resume: bool = False, progress: bool = True) -> None:
    Trainer(FlashAvatarRecipe(subject_dir, run, cfg), run, progress).fit(resume)


class FlashAvatarRecipe:
    """FlashAvatar's part of the training loop (methods/trainer.py runs it): the model, its optimiser,
    the joint tracking refinement, and one step of the reference's losses."""

    name = "flashavatar"
    max_recoveries = 0  # no automatic restart: the message tells how to resume with lower rates

    def __init__(self, subject_dir: Path, run: RunDir, cfg: FlashAvatarConfig):
        if cfg.iterations < 1:
            raise UserError("--iterations must be at least 1")
        if cfg.batch_size < 1:
            raise UserError("batch_size must be at least 1")
        self.subject_dir, self.run, self.cfg = subject_dir, run, cfg
        self.device = resolve_device(cfg.device)
        self.subject = Subject.open(subject_dir)
        self.size = training_size(self.subject, cfg.resolution)

    # ------------------------------------------------------------------ state
    def build(self) -> None:
        cfg, device, subject = self.cfg, self.device, self.subject
        self.model = build_model(subject, cfg, device, self.run.head_overrides)
        self.graph_step = use_graph_step(cfg, device)
        self.opt = make_optimizer(self.model, cfg, capturable=self.graph_step)
        # the whole step replayed from a CUDA graph (cuda_graph_step; frames with refinement stay eager)
        self._graphed = GraphedStep(self._plain_step) if self.graph_step else None
        self.bg = torch.tensor(cfg.background, dtype=torch.float32, device=device)
        self.tr = subject.tracking
        self.dtr = self.tr.on_device(device)
        self.train_idx = subject.split["train"]
        self.test_idx = subject.split.get("test", [])
        # per-training-frame tracking corrections, trained with the avatar (refine.py)
        self.refiner = JointRefiner(subject, self.model.head, cfg, self.train_idx, device) if cfg.refine_tracking else None

    def reset(self, lr_scale: float) -> None:
        self.build()
        self._initialize()
        self._graph_frame_inputs()
        _scale_lr(self.opt, lr_scale)

    def run_info(self) -> dict:
        model = self.model
        extra = {"num_gaussians": model.num_gaussians, "train_size": list(self.size)}
        if model.cond_masks is not None:
            per = model.cond_masks[model.cond_group].sum(1)
            extra["condition_regions"] = {"distinct_masks": int(model.cond_masks.shape[0]), "mean_entries_per_gaussian": float(per.mean()),
                                          "unconditioned_fraction": float((per == 0).float().mean())}
        if self.refiner is not None:
            extra["refined_tracking"] = REFINED_TRACKING
        return extra

    def load_state_dict(self, state: dict, lr_scale: float) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.refiner is not None and "refine" in state:
            self.refiner.load_state_dict(state["refine"])
        for group in self.opt.param_groups:  # a run may resume on another device than it was saved on
            group["fused"] = self.device.type == "cuda"
            group["capturable"] = self.graph_step
            if group["fused"]:  # the fused (and capturable) Adam keeps its step counts on the parameters' device
                for p in group["params"]:
                    st = self.opt.state.get(p)
                    if st and torch.is_tensor(st.get("step")):
                        st["step"] = st["step"].to(p.device, torch.float32)
        if self._graphed is not None:  # graphs recorded before refer to the replaced optimiser state
            self._graphed.clear()
        ratio = lr_scale / float(state.get("lr_scale", 1.0))  # loaded groups carry the saved rates
        if ratio != 1.0:
            _scale_lr(self.opt, ratio)

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}
        if self.refiner is not None:
            state["refine"] = self.refiner.state_dict()
            self.refiner.save(self.run.root)  # before the checkpoint: a checkpoint never exists without its refined tracking
        return state

    def finite(self) -> bool:
        return True  # the loss sums are checked by the trainer; the parameters follow the loss here

    # ------------------------------------------------------------------ data
    def prepare(self, start: int, resumed: bool) -> None:
        cfg, device, subject = self.cfg, self.device, self.subject
        self.restart_data(start)
        if not resumed:
            self._initialize()
        self.lpips_net = None
        if cfg.lpips_weight > 0 and cfg.lpips_start <= cfg.iterations:
            from headavatar.metrics.lpips import LPIPS

            self.lpips_net = LPIPS(net="vgg").to(device)
        self.eval_set = heldout_sample(subject, self.test_idx, cfg.eval_frames if cfg.eval_every > 0 else 0, self.size)
        self._graph_frame_inputs()

    def _initialize(self) -> None:
        """The reference's initialisation from the first training frame the sampler gives."""
        sampler = InfiniteSampler(len(self.data), seed=self.cfg.seed)
        first = next(iter(torch.utils.data.DataLoader(self.data, batch_size=1, sampler=sampler, collate_fn=collate)))
        self.model.initialize_from_frame(self.tr.params(first["index"].numpy(), self.device))
        train = self.tr.params(self.train_idx, self.device)
        self.model.set_condition_range(train)
        self.model.set_pose_anchor(train)

    def _graph_frame_inputs(self) -> None:
        # the head model's forward (no gradient) replayed from a CUDA graph: hundreds of small launches
        self.frame_inputs = CudaGraphed(self.model.frame_inputs) if self.device.type == "cuda" else self.model.frame_inputs

    def restart_data(self, start: int) -> None:
        cfg, device = self.cfg, self.device
        self.data, self.batches = training_stream(self.subject, self.train_idx, self.size, cfg.batch_size, cfg.seed, cfg.frames_per_pass, cfg.num_workers,
                                                  cfg.cache_mb, start, device, cfg.device_cache_mb if device.type == "cuda" else 0)

    # ------------------------------------------------------------------ one step
    def step(self, it: int) -> StepOutput:
        cfg, model, refiner, subject = self.cfg, self.model, self.refiner, self.subject
        H, W = self.size
        batch = next(self.batches)
        tgt = prepare_targets(batch, self.bg, self.device)
        idx = batch["index"]
        params = self.dtr.params(idx)
        cams = self.dtr.cameras(idx, subject.height, subject.width).resized(H, W)
        refining = refiner is not None and refiner.active(it)
        self.sh_deg = min(cfg.sh_degree, (it - 1) // max(1, cfg.sh_increase_every))
        use_lpips = self.lpips_net is not None and it >= cfg.lpips_start
        if not refining:
            step = self._graphed or self._plain_step
            # plain values in the signature: a new one gets its own graph (the fused Adam bakes the rates in)
            key = (self.sh_deg, use_lpips, tuple(g["lr"] for g in self.opt.param_groups), self._buffer_generation())
            loss, ps, pred = step(tgt["gt"], tgt["mouth_mask"], tgt["head_mask"], params, cams, key)
            self._last = (tgt["gt"], pred)
            return StepOutput(loss, ps)
        # gradients flow to the tracking corrections (no CUDA graph on this path; refinement, once on,
        # stays on, so the graphs of the warm-up iterations give their memory back)
        if self._graphed is not None:
            self._graphed.clear()
        cond, verts = model.frame_inputs(refiner.params(params, idx), grad=True)
        pred, loss = self._loss(cond, verts, tgt["gt"], tgt["mouth_mask"], tgt["head_mask"], cams, self.sh_deg, use_lpips)
        loss = loss + refiner.prior(idx)
        refiner.zero_grad()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        refiner.step()
        self._last = (tgt["gt"], pred.detach())
        with torch.no_grad():
            return StepOutput(loss.detach(), psnr(pred.detach(), tgt["gt"]))

    def _loss(self, cond, verts, gt, m, hm, cams, sh_deg: int, use_lpips: bool):
        """The reference's losses of one batch: (prediction, loss)."""
        cfg, model = self.cfg, self.model
        if cfg.condition_noise > 0:
            cond = model.noisy_condition(cond, cfg.condition_noise)
        pred = model.render(model.gaussians(cond, verts), cams, self.bg, sh_deg, cfg.backend, render_depth=False).rgb
        loss = huber(pred, gt, cfg.huber_delta) + cfg.mouth_weight * huber(pred * m, gt * m, cfg.huber_delta)
        if use_lpips:
            loss = loss + cfg.lpips_weight * self.lpips_net((pred * hm).permute(0, 3, 1, 2), (gt * hm).permute(0, 3, 1, 2)).mean()
        return pred, loss

    def _plain_step(self, gt, m, hm, params, cams, key):
        """One step without tracking refinement: forward, loss, backward, Adam (what GraphedStep records)."""
        sh_deg, use_lpips = key[0], key[1]
        with torch.no_grad():
            # inside a capture the head model is recorded with the rest (no graph inside the graph)
            fi = self.model.frame_inputs if self._graphed is not None else self.frame_inputs
            cond, verts = fi(params)
        pred, loss = self._loss(cond, verts, gt, m, hm, cams, sh_deg, use_lpips)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            pred = pred.detach()
            return loss.detach(), psnr(pred, gt), pred

    def _buffer_generation(self) -> int:
        """Changes when the Triton rasteriser grew a pair buffer (its graphs are then stale); 0 otherwise."""
        if self._graphed is None:
            return 0
        from headavatar.render.gaussians import triton_backend as tb

        return tb.watch_overflow()

    # ------------------------------------------------------------------ reporting
    def curve_row(self, it: int, means: dict, elapsed: float) -> dict:
        row = {"step": it, "loss": means["loss"], "train_psnr": means["train_psnr"], "time": elapsed, "sh_degree": self.sh_deg}
        if self._graphed is not None:
            row["cuda_graphs"] = self._graphed.captures  # recorded so far (0: every step ran eagerly)
        return row

    def health(self, row: dict) -> str | None:
        return None

    def log_now(self, it: int) -> bool:
        return False

    def evaluate_heldout(self) -> float | None:
        if self.eval_set is None:
            return None
        return evaluate_psnr(self.model, self.eval_set, self.tr, self.subject, self.bg, self.size, self.device, self.cfg)

    def preview(self) -> torch.Tensor:
        gt, pred = self._last
        return torch.cat([gt[0], pred[0]], 1)

    def diverged_message(self, it: int, problem: str) -> str:
        return (f"training diverged at iteration {it} ({problem}); resume from the last checkpoint with "
                f"lower learning rates: headavatar train ... --resume --set lr_mlp=5e-5")


def _scale_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for group in opt.param_groups:
        group["lr"] *= factor


@torch.no_grad()
def evaluate_psnr(model: FlashAvatarModel, data: FrameDataset, tr, subject: Subject, bg, size, device, cfg) -> float:
    """Mean PSNR over a few held-out frames (for time-to-quality curves)."""
    vals = []
    for k in range(len(data)):
        b = collate([data[k]])
        tgt = prepare_targets(b, bg, device)
        idx = b["index"].numpy()
        cams = tr.cameras(idx, subject.height, subject.width, device).resized(*size)
        cond, verts = model.frame_inputs(tr.params(idx, device))
        pred = model.render(model.gaussians(cond, verts), cams, bg, cfg.sh_degree, cfg.backend, render_depth=False).rgb
        vals.append(psnr(pred, tgt["gt"]).item())
    return float(np.mean(vals))
