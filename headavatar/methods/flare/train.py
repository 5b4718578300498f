"""FLARE training: two stages with the reference's losses, weights and learning rates (flare.md §8).

Stage 1 (``iterations - stage2_iterations`` steps): canonical-mesh offsets,
deformation network, positional-encoding materials and the neural light, with
the head-model prior; one isotropic remesh at each ``remesh_at`` iteration.
Stage 2: a new shader with hash-grid materials (and light), the deformer
frozen, offsets at a tiny learning rate.  Steps are counted, not epochs.

The loop is methods/trainer.py's; this module gives it ``FlareRecipe``.
Divergence (NaN, or a light that collapsed to black, flare#2/#4) follows the
trainer's policy: back to the last checkpoint (or the start) with halved
learning rates, at most ``max_recoveries`` times, then a TrainingDiverged error.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from headavatar.errors import UserError
from headavatar.lighting.color import linear_to_srgb, srgb_to_linear
from headavatar.methods.flare.build import build_model, resolve_light_frame, restore_model
from headavatar.methods.flare.config import FlareConfig
from headavatar.methods.flare.losses import (
    MeshRegularizer,
    VGGPerceptual,
    head_prior_loss,
    hinge_prior,
    mask_loss,
    shading_loss,
    white_light_loss,
)
from headavatar.methods.flare.model import FlareModel, nearest_with_distance
from headavatar.methods.run import RunDir
from headavatar.methods.trainer import StepOutput, Trainer
from headavatar.subjects.dataset import FrameDataset, collate, heldout_sample, training_size, training_stream
from headavatar.subjects.format import LABEL_IDS, Subject
from headavatar.utils.device import resolve_device
from headavatar.utils.io import write_json

SKIN_PRIOR_LABELS = (LABEL_IDS["skin"], LABEL_IDS["lips"], LABEL_IDS["neck"])  # FLARE's channel 0
MOUTH_INTERIOR = LABEL_IDS["mouth_interior"]
CLOTH = LABEL_IDS["clothing"]


# ------------------------------------------------------------------ set-up
def check_config(cfg: FlareConfig) -> None:
    if cfg.iterations < 1:
        raise UserError("--iterations must be at least 1")
    if not 0 <= cfg.stage2_iterations <= cfg.iterations:
        raise UserError(f"stage2_iterations ({cfg.stage2_iterations}) must lie between 0 and iterations ({cfg.iterations})")
    if cfg.batch_size < 1:
        raise UserError("batch_size must be at least 1")
    if cfg.schedule not in ("scaled", "absolute"):
        raise UserError(f"schedule must be scaled or absolute (got {cfg.schedule!r})")
    if cfg.light_activation not in ("softplus", "none"):
        raise UserError(f"light_activation must be softplus or none (got {cfg.light_activation!r})")
    if cfg.ide_attenuation not in ("refnerf", "flare"):
        raise UserError(f"ide_attenuation must be refnerf or flare (got {cfg.ide_attenuation!r})")
    if cfg.world_scale <= 0:
        raise UserError("world_scale must be positive")
    if cfg.remesh_backend not in ("auto", "gpytoolbox", "builtin"):
        raise UserError(f"remesh_backend must be auto, gpytoolbox or builtin (got {cfg.remesh_backend!r})")
    if cfg.mesh_backend not in ("auto", "torch", "nvdiffrast"):
        raise UserError(f"mesh_backend must be auto, torch or nvdiffrast (got {cfg.mesh_backend!r})")
    if cfg.backend not in ("auto", "torch", "nvdiffrast"):
        raise UserError(f"FLARE renders meshes: --backend must be auto, torch or nvdiffrast (got {cfg.backend!r})")


@dataclass
class Schedule:
    """Iteration numbers of the reference (stage-local), stretched to this run's stage lengths."""

    n1: int
    n2: int
    s1: float
    s2: float
    remesh: list[int] = field(default_factory=list)

    @classmethod
    def make(cls, cfg: FlareConfig) -> "Schedule":
        n2 = cfg.stage2_iterations
        n1 = cfg.iterations - n2
        scaled = cfg.schedule == "scaled"
        s1 = n1 / 1500 if scaled else 1.0
        s2 = n2 / 1000 if scaled else 1.0
        remesh = sorted({max(1, round(r * s1)) for r in cfg.remesh_at if 1 <= round(r * s1) <= n1}) if n1 > 0 else []
        return cls(n1, n2, s1, s2, remesh)

    def stage(self, it: int) -> tuple[int, int, float]:
        """(stage, stage-local iteration, scale) of global iteration ``it`` (1-based)."""
        if it <= self.n1:
            return 1, it, self.s1
        return 2, it - self.n1, self.s2


def make_optimizers(model: FlareModel, cfg: FlareConfig, stage: int, lr_scale: float, remeshes: int):
    if stage == 1:
        lr_v = cfg.lr_vertices * (cfg.remesh_lr_factor**remeshes)
        nets = [
            {"params": list(model.deformer.parameters()), "lr": cfg.lr_deformer * lr_scale},
            {"params": list(model.shader.parameters()), "lr": cfg.lr_shader * lr_scale},
            {"params": list(model.robust.parameters()), "lr": cfg.lr_robust * lr_scale},
        ]
    else:
        lr_v = cfg.lr_vertices_stage2
        nets = [
            {"params": list(model.shader.parameters()), "lr": cfg.lr_shader * lr_scale},
            {"params": list(model.robust.parameters()), "lr": cfg.lr_robust * lr_scale},
        ]
    for p in model.deformer.parameters():
        p.requires_grad_(stage == 1)
    return torch.optim.Adam([model.offsets], lr=lr_v * lr_scale), torch.optim.Adam(nets)


def flare_targets(batch: dict, device) -> dict:
    """Linear GT x matte on black (the reference's target); matte values < 0.5 count as 0 (flare#5's fix)."""
    img = batch["image"].to(device, non_blocking=True).float() / 255.0
    a = batch["alpha"].to(device, non_blocking=True).float()[..., None] / 255.0
    a = torch.where(a < 0.5, torch.zeros_like(a), a)
    return {"gt": srgb_to_linear(img) * a, "mask": a, "parsing": batch["parsing"].to(device, non_blocking=True), "index": batch["index"]}


def _label_mask(parsing: torch.Tensor, labels) -> torch.Tensor:
    m = torch.zeros_like(parsing, dtype=torch.bool)
    for lab in labels:
        m |= parsing == lab
    return m


def _vertices_of(pixels: torch.Tensor, face: torch.Tensor, faces: torch.Tensor, num_vertices: int) -> torch.Tensor:
    """[V] bool: vertices of the faces seen at the selected covered pixels."""
    hits = torch.zeros(num_vertices, device=faces.device).index_add_(0, faces[face].reshape(-1), pixels.float().repeat_interleave(3))
    return hits > 0  # a scatter rather than boolean indexing: no host sync


# ------------------------------------------------------------------ one step
def compute_losses(model: FlareModel, out: dict, tgt: dict, cfg: FlareConfig, reg: MeshRegularizer, stage: int, local_it: int, scale: float,
                   reg_factor: float, perceptual: VGGPerceptual | None, light_frame: str) -> tuple[torch.Tensor, dict]:
    pred, alpha = out["rgb"], out["alpha"]
    gt, mask = tgt["gt"], tgt["mask"]
    parsing = tgt["parsing"].reshape(-1).index_select(0, out["pix"])
    terms = {}
    terms["shading"] = cfg.w_shading * shading_loss(pred, gt)
    if perceptual is not None:
        wp = cfg.w_perceptual * min(1.0, cfg.perceptual_decay * scale / (local_it + 1))
        from headavatar.methods.flare.losses import tonemap

        terms["perceptual"] = wp * perceptual(tonemap(pred), tonemap(gt))
    terms["mask"] = cfg.w_mask * mask_loss(alpha, mask)
    v = model.canonical_vertices()
    terms["laplacian"] = cfg.w_laplacian * reg_factor * reg.laplacian(v)
    terms["normal"] = cfg.w_normal * reg_factor * reg.normal_consistency(v, model.faces)
    if cfg.w_albedo > 0:
        ramp = min(1.0, local_it / max(1.0, cfg.albedo_ramp * scale))
        x = model.prior.normalize(v.detach())
        if 0 < cfg.albedo_samples < x.shape[0]:
            x = x[torch.randint(0, x.shape[0], (cfg.albedo_samples,), device=x.device)]
        m0 = model.shader.material.raw(x)[:, :4]
        m1 = model.shader.material.raw(x + cfg.albedo_jitter * torch.randn_like(x))[:, :4]
        terms["albedo"] = cfg.w_albedo * ramp * model.robust(m0 - m1)
    terms["white_light"] = cfg.w_white_light * white_light_loss(out["diffuse"])
    skin = _label_mask(parsing, SKIN_PRIOR_LABELS)
    terms["roughness"] = cfg.w_roughness * hinge_prior(out["kr"], *cfg.roughness_prior, mask=skin)
    terms["specular"] = cfg.w_specular * hinge_prior(out["ko"], *cfg.specular_prior, mask=skin)
    if stage == 1 and cfg.w_flame > 0:
        wf = cfg.w_flame * (0.5 if local_it >= cfg.flame_halve_at * scale else 1.0)
        idx, d2 = nearest_with_distance(out["x_c"], model.prior.verts, tree=model.prior.kdtree() if out["x_c"].device.type == "cpu" else None)
        valid = d2 < cfg.flame_max_dist2
        zero_blend = ghost = None
        if local_it >= cfg.flame_semantic_from * scale:
            mouth = _vertices_of(parsing == MOUTH_INTERIOR, out["face"], model.faces, model.num_vertices)
            cloth = _vertices_of(parsing == CLOTH, out["face"], model.faces, model.num_vertices)
            zero_blend, ghost = mouth | cloth, cloth
        terms["head_prior"] = wf * head_prior_loss(out["E"], out["P"], out["W"], idx, valid, model.prior, zero_blend, ghost,
                                                   cfg.flame_weight_skinning, cfg.flame_weight_blendshape)
    total = sum(terms.values())
    return total, terms


def _psnr(pred_lin: torch.Tensor, gt_lin: torch.Tensor) -> torch.Tensor:
    a, b = linear_to_srgb(pred_lin.clamp(0, 1)), linear_to_srgb(gt_lin.clamp(0, 1))
    return -10 * torch.log10((a - b).square().mean().clamp_min(1e-12))


# ------------------------------------------------------------------ training
def train_flare(subject_dir: Path, run: RunDir, cfg: FlareConfig, resume: bool = False, progress: bool = True) -> None:
    Trainer(FlareRecipe(subject_dir, run, cfg), run, progress).fit(resume)


class FlareRecipe:
    """FLARE's part of the training loop (methods/trainer.py runs it): the two stages, the remesh,
    and one step of the reference's losses."""

    name = "flare"

    def __init__(self, subject_dir: Path, run: RunDir, cfg: FlareConfig):
        check_config(cfg)
        self.subject_dir, self.run, self.cfg = subject_dir, run, cfg
        self.max_recoveries = cfg.max_recoveries
        self.device = resolve_device(cfg.device)
        self.subject = Subject.open(subject_dir)
        self.size = training_size(self.subject, cfg.resolution)
        self.light_frame = resolve_light_frame(cfg, self.subject)
        self.sched = Schedule.make(cfg)
        self.tr = self.subject.tracking
        self.dtr = self.tr.on_device(self.device)  # indexed on the device: no host-to-device copy per step
        self.train_idx = self.subject.split["train"]
        self.test_idx = self.subject.split.get("test", [])

    # ------------------------------------------------------------------ state
    def _new_model(self) -> FlareModel:
        m = build_model(self.subject, self.cfg, self.device, self.run.head_overrides)
        if self.sched.n1 == 0:
            m.enter_stage2()
        return m

    def build(self) -> None:
        self.model = self._new_model()
        self._untouched = True  # a fresh model: a resume restores into it without building another
        self.remeshes, self.remesh_log = 0, []
        self.lr_scale = 1.0
        self.opts = make_optimizers(self.model, self.cfg, self.model.stage, 1.0, 0)

    def reset(self, lr_scale: float) -> None:
        self.model = self._new_model()
        self.remeshes, self.remesh_log = 0, []
        self.lr_scale = lr_scale
        self.opts = make_optimizers(self.model, self.cfg, self.model.stage, lr_scale, 0)
        self.reg = MeshRegularizer(self.model.faces, self.model.num_vertices)

    def run_info(self) -> dict:
        sched = self.sched
        return {"train_size": list(self.size), "light_frame": self.light_frame, "head_model": self.subject.head_model_spec.get("name"),
                "stage1_iterations": sched.n1, "stage2_iterations": sched.n2, "remesh_iterations": sched.remesh}

    def load_state_dict(self, state: dict, lr_scale: float) -> None:
        if not self._untouched:
            self.model = self._new_model()
        self._untouched = False
        restore_model(self.model, state)
        self.remeshes = int(state.get("remeshes", 0))
        self.remesh_log = list(state.get("remesh_log", []))
        self.lr_scale = lr_scale
        self.opts = make_optimizers(self.model, self.cfg, self.model.stage, lr_scale, self.remeshes)
        self.opts[0].load_state_dict(state["opt_vert"])
        self.opts[1].load_state_dict(state["opt_net"])
        ratio = lr_scale / float(state.get("lr_scale", 1.0))  # loaded groups carry the saved rates
        if ratio != 1.0:
            for o in self.opts:
                for g in o.param_groups:
                    g["lr"] *= ratio
        self.reg = MeshRegularizer(self.model.faces, self.model.num_vertices)

    def state_dict(self) -> dict:
        model = self.model
        return {"stage": model.stage, "mesh": {"verts": model.base_verts.detach().cpu(), "faces": model.faces.cpu()},
                "model": model.state_dict(), "opt_vert": self.opts[0].state_dict(), "opt_net": self.opts[1].state_dict(),
                "remeshes": self.remeshes, "remesh_log": self.remesh_log}

    def finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    # ------------------------------------------------------------------ data
    def prepare(self, start: int, resumed: bool) -> None:
        cfg = self.cfg
        self.restart_data(start)
        self.perceptual = VGGPerceptual(cfg.perceptual_size).to(self.device) if cfg.w_perceptual > 0 else None
        self.reg = MeshRegularizer(self.model.faces, self.model.num_vertices)
        self.eval_set = heldout_sample(self.subject, self.test_idx, cfg.eval_frames if cfg.eval_every > 0 else 0, self.size)

    def restart_data(self, start: int) -> None:
        self.data, self.batches = _stream(self.subject, self.train_idx, self.size, self.cfg, start, self.device)

    # ------------------------------------------------------------------ one step
    def step(self, it: int) -> StepOutput:
        cfg, sched, model = self.cfg, self.sched, self.model
        self._untouched = False
        stage, local, scale = sched.stage(it)
        if stage == 2 and model.stage == 1:
            model.enter_stage2()
            self.opts = make_optimizers(model, cfg, 2, self.lr_scale, self.remeshes)
        if stage == 1 and local in sched.remesh and self.remeshes < sched.remesh.index(local) + 1:
            self._remesh(it)
        reg_factor = cfg.remesh_reg_factor ** self.remeshes
        self.stage = stage

        batch = next(self.batches)
        tgt = flare_targets(batch, self.device)
        idx = batch["index"]
        params = self.dtr.params(idx)
        cams = self.dtr.cameras(idx, self.subject.height, self.subject.width).resized(*self.size)
        out = model.render(params, cams, light_frame=self.light_frame)
        loss, terms = compute_losses(model, out, tgt, cfg, self.reg, stage, local, scale, reg_factor, self.perceptual, self.light_frame)
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in self.opts:
            o.step()
        self._last = (out, tgt)
        diffuse = out["diffuse"].detach()
        extras = {"diffuse_light": diffuse.mean() if diffuse.numel() else 0.0, **{f"loss_{k}": v.detach() for k, v in terms.items()}}
        return StepOutput(loss.detach(), _psnr(out["rgb"].detach(), tgt["gt"]), extras)

    def _remesh(self, it: int) -> None:
        info = {"remeshes": self.remeshes, "remesh_log": self.remesh_log}
        _remesh(self.model, self.cfg, info, it)
        self.remeshes = info["remeshes"]
        write_json(self.run.root / "remesh.json", self.remesh_log)
        self.reg = MeshRegularizer(self.model.faces, self.model.num_vertices)
        self.opts = (make_optimizers(self.model, self.cfg, 1, self.lr_scale, self.remeshes)[0], self.opts[1])

    # ------------------------------------------------------------------ reporting
    def curve_row(self, it: int, means: dict, elapsed: float) -> dict:
        row = {"step": it, "stage": self.stage, "loss": means.pop("loss"), "train_psnr": means.pop("train_psnr"),
               "diffuse_light": means.pop("diffuse_light"), "time": elapsed, "vertices": self.model.num_vertices}
        row.update(means)
        return row

    def health(self, row: dict) -> str | None:
        return _health(row, self.cfg)

    def log_now(self, it: int) -> bool:
        return it == self.sched.n1  # the end of stage 1

    def evaluate_heldout(self) -> float | None:
        if self.eval_set is None:
            return None
        return evaluate_psnr(self.model, self.eval_set, self.tr, self.subject, self.size, self.device, self.light_frame)

    def preview(self) -> torch.Tensor:
        out, tgt = self._last
        a = out["alpha"][0].detach()
        pred = linear_to_srgb((out["rgb"][0].detach() / a.clamp_min(1e-4)).clamp(0, 1)) * a + (1 - a)
        m = tgt["mask"][0]
        gt = linear_to_srgb((tgt["gt"][0] / m.clamp_min(1e-4)).clamp(0, 1)) * m + (1 - m)
        return torch.cat([gt, pred], 1)

    def diverged_message(self, it: int, problem: str) -> str:
        return (f"FLARE training failed at iteration {it}: {problem}, again after {self.cfg.max_recoveries} restarts with halved learning rates; "
                f"try --set light_activation=softplus, lower learning rates (--set lr_shader=5e-4) or check the subject's masks")


def _stream(subject: Subject, indices, size, cfg: FlareConfig, start: int, device: torch.device):
    """Training batches from step ``start``; frames stay on the GPU when they fit in ``device_cache_mb``."""
    return training_stream(subject, indices, size, cfg.batch_size, cfg.seed, cfg.frames_per_pass, cfg.num_workers, cfg.cache_mb, start, device,
                           cfg.device_cache_mb if device.type == "cuda" else 0)


def _remesh(model: FlareModel, cfg: FlareConfig, info: dict, it: int) -> None:
    from headavatar.methods.flare.remesh import mean_edge_length, remesh

    t = time.perf_counter()
    V = model.canonical_vertices().detach().cpu().double().numpy()
    Fc = model.faces.cpu().numpy()
    h = mean_edge_length(V, Fc) / cfg.remesh_edge_factor
    U, G, how = remesh(V, Fc, h, cfg.remesh_backend)
    model.set_mesh(torch.as_tensor(U, dtype=torch.float32), torch.as_tensor(G))
    info["remeshes"] += 1
    info["remesh_log"].append({"step": it, "method": how, "vertices": int(len(U)), "faces": int(len(G)), "target_edge": float(h),
                               "seconds": time.perf_counter() - t})


def _health(row: dict, cfg: FlareConfig) -> str | None:
    if not math.isfinite(row["loss"]) or not math.isfinite(row["diffuse_light"]):
        return f"the loss became {row['loss']}"
    if row["diffuse_light"] < cfg.collapse_threshold:
        return f"the light collapsed to black (mean diffuse light {row['diffuse_light']:.2e})"
    return None


@torch.no_grad()
def evaluate_psnr(model: FlareModel, data: FrameDataset, tr, subject: Subject, size, device, light_frame: str) -> float:
    """Mean PSNR over a few held-out frames (linear GT x matte vs the render, both sRGB on black)."""
    vals = []
    for k in range(len(data)):
        b = collate([data[k]])
        tgt = flare_targets(b, device)
        idx = b["index"].numpy()
        cams = tr.cameras(idx, subject.height, subject.width, device).resized(*size)
        out = model.render(tr.params(idx, device), cams, light_frame=light_frame)
        vals.append(_psnr(out["rgb"], tgt["gt"]).item())
    return float(np.mean(vals))
