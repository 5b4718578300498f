"""FLARE training: two stages with the reference's losses, weights and learning rates (flare.md §8).

Stage 1 (``iterations - stage2_iterations`` steps): canonical-mesh offsets,
deformation network, positional-encoding materials and the neural light, with
the head-model prior; one isotropic remesh at each ``remesh_at`` iteration.
Stage 2: a new shader with hash-grid materials (and light), the deformer
frozen, offsets at a tiny learning rate.  Steps are counted, not epochs.

Divergence (NaN, or a light that collapsed to black, flare#2/#4) is checked at
every log step; training then goes back to the last checkpoint (or the start)
with halved learning rates, at most ``max_recoveries`` times, and otherwise
stops with a TrainingDiverged error instead of looping.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from headavatar.errors import TrainingDiverged, UserError
from headavatar.log import get_logger
from headavatar.methods.flare.build import build_model, resolve_light_frame, restore_model
from headavatar.methods.flare.config import FlareConfig
from headavatar.methods.flare.losses import (
    MeshRegularizer, VGGPerceptual, head_prior_loss, hinge_prior, mask_loss, shading_loss, white_light_loss,
)
from headavatar.methods.flare.model import FlareModel, nearest_with_distance
from headavatar.lighting.color import linear_to_srgb, srgb_to_linear
from headavatar.methods.run import RunDir
from headavatar.subjects.dataset import heldout_sample, training_size, training_stream, FrameDataset, collate
from headavatar.subjects.format import LABEL_IDS, Subject
from headavatar.utils.device import resolve_device
from headavatar.utils.io import write_image, write_json
from headavatar.utils.video import to_uint8

_log = get_logger(__name__)

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


# ------------------------------------------------------------------ checkpoints
def checkpoint_state(model: FlareModel, opts, it: int, elapsed: float, extra: dict) -> dict:
    return {
        "step": it, "stage": model.stage, "mesh": {"verts": model.base_verts.detach().cpu(), "faces": model.faces.cpu()},
        "model": model.state_dict(), "opt_vert": opts[0].state_dict(), "opt_net": opts[1].state_dict(),
        "rng": torch.get_rng_state(), "elapsed": elapsed, **extra,
    }


# ------------------------------------------------------------------ training
def train_flare(subject_dir: Path, run: RunDir, cfg: FlareConfig, resume: bool = False, progress: bool = True) -> None:
    check_config(cfg)
    device = resolve_device(cfg.device)
    subject = Subject.open(subject_dir)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    H, W = training_size(subject, cfg.resolution)
    light_frame = resolve_light_frame(cfg, subject)
    sched = Schedule.make(cfg)
    tr = subject.tracking
    train_idx = subject.split["train"]
    test_idx = subject.split.get("test", [])

    def fresh():
        m = build_model(subject, cfg, device, run.head_overrides)
        if sched.n1 == 0:
            m.enter_stage2()
        return m

    model = fresh()
    info = {"stage": 1, "remeshes": 0, "lr_scale": 1.0, "recoveries": 0, "remesh_log": []}
    start, elapsed = 0, 0.0
    if resume:
        resumed = run.resume(cfg.iterations, device, progress)
        if resumed is None:
            return
        start, state, elapsed = resumed
        restore_model(model, state)
        info.update({k: state[k] for k in ("remeshes", "lr_scale", "recoveries", "remesh_log") if k in state})
        opts = make_optimizers(model, cfg, model.stage, info["lr_scale"], info["remeshes"])
        opts[0].load_state_dict(state["opt_vert"])
        opts[1].load_state_dict(state["opt_net"])
    else:
        run.write_info("flare", subject_dir, cfg, {"train_size": [H, W], "light_frame": light_frame, "head_model": subject.head_model_spec.get("name"),
                                                   "stage1_iterations": sched.n1, "stage2_iterations": sched.n2, "remesh_iterations": sched.remesh})
        opts = make_optimizers(model, cfg, model.stage, 1.0, 0)

    data, batches = _stream(subject, train_idx, (H, W), cfg, start, device)
    perceptual = VGGPerceptual(cfg.perceptual_size).to(device) if cfg.w_perceptual > 0 else None
    reg = MeshRegularizer(model.faces, model.num_vertices)
    eval_set = heldout_sample(subject, test_idx, cfg.eval_frames if cfg.eval_every > 0 else 0, (H, W))

    pbar = tqdm(total=cfg.iterations, initial=start, disable=not progress, desc="train flare", unit="it", dynamic_ncols=True)
    t0 = time.perf_counter() - elapsed
    sums = _Sums(device)
    it = start
    try:
        while it < cfg.iterations:
            it += 1
            stage, local, scale = sched.stage(it)
            if stage == 2 and model.stage == 1:
                model.enter_stage2()
                opts = make_optimizers(model, cfg, 2, info["lr_scale"], info["remeshes"])
            if stage == 1 and local in sched.remesh and info["remeshes"] < sched.remesh.index(local) + 1:
                _remesh(model, cfg, info, it)
                write_json(run.root / "remesh.json", info["remesh_log"])
                reg = MeshRegularizer(model.faces, model.num_vertices)
                opts = (make_optimizers(model, cfg, 1, info["lr_scale"], info["remeshes"])[0], opts[1])
            reg_factor = cfg.remesh_reg_factor ** info["remeshes"]

            batch = next(batches)
            tgt = flare_targets(batch, device)
            idx = batch["index"].numpy()
            params = tr.params(idx, device)
            cams = tr.cameras(idx, subject.height, subject.width, device).resized(H, W)
            out = model.render(params, cams, light_frame=light_frame)
            loss, terms = compute_losses(model, out, tgt, cfg, reg, stage, local, scale, reg_factor, perceptual, light_frame)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            sums.add(loss, _psnr(out["rgb"].detach(), tgt["gt"]), out["diffuse"].detach(), terms)
            pbar.update(1)

            if it % cfg.log_every == 0 or it == cfg.iterations or it == sched.n1:
                row = sums.row(it, stage, time.perf_counter() - t0, model.num_vertices)
                problem = _health(row, cfg)
                if problem:
                    it, model, opts = _recover(run, model, cfg, info, problem, it, fresh)
                    reg = MeshRegularizer(model.faces, model.num_vertices)
                    data, batches = _stream(subject, train_idx, (H, W), cfg, it, device)
                    pbar.n = it
                    pbar.refresh()
                    sums = _Sums(device)
                    continue
                if eval_set is not None and (it % cfg.eval_every == 0 or it == cfg.iterations):
                    row["test_psnr"] = evaluate_psnr(model, eval_set, tr, subject, (H, W), device, light_frame)
                run.append_curve(row)
                pbar.set_postfix(loss=f"{row['loss']:.4f}", psnr=f"{row['train_psnr']:.2f}", V=model.num_vertices)
                sums = _Sums(device)
            if cfg.preview_every and (it % cfg.preview_every == 0 or it == cfg.iterations):
                _preview(run, it, out, tgt)
            if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
                if _finite(loss, model):  # never checkpoint a diverged model: recovery goes back to checkpoints
                    run.save_checkpoint(it, checkpoint_state(model, opts, it, time.perf_counter() - t0, _extra(info)))
                else:
                    _log.warning(f"not checkpointing iteration {it}: the model holds NaN/Inf")
    except KeyboardInterrupt:
        if it > start:
            run.save_checkpoint(it, checkpoint_state(model, opts, it, time.perf_counter() - t0, _extra(info)))
        raise
    finally:
        pbar.close()


def _stream(subject: Subject, indices, size, cfg: FlareConfig, start: int, device: torch.device):
    """Training batches from step ``start``; frames stay on the GPU when they fit in ``device_cache_mb``."""
    return training_stream(subject, indices, size, cfg.batch_size, cfg.seed, cfg.frames_per_pass, cfg.num_workers, cfg.cache_mb, start, device,
                           cfg.device_cache_mb if device.type == "cuda" else 0)


def _finite(loss: torch.Tensor, model: FlareModel) -> bool:
    if not bool(torch.isfinite(loss.detach())):
        return False
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _extra(info: dict) -> dict:
    return {k: info[k] for k in ("remeshes", "lr_scale", "recoveries", "remesh_log")}


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


class _Sums:
    """Per-log-interval accumulators kept on the device (one host sync per log step)."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)
        self.psnr = torch.zeros((), device=device)
        self.light = torch.zeros((), device=device)
        self.terms: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, loss, psnr, diffuse, terms):
        self.loss += loss.detach()
        self.psnr += psnr
        self.light += diffuse.mean() if diffuse.numel() else 0.0
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v.detach()
        self.n += 1

    def row(self, it, stage, t, nv) -> dict:
        n = max(self.n, 1)
        row = {"step": it, "stage": stage, "loss": (self.loss / n).item(), "train_psnr": (self.psnr / n).item(),
               "diffuse_light": (self.light / n).item(), "time": t, "vertices": nv}
        row.update({f"loss_{k}": float(v / n) for k, v in self.terms.items()})
        return row


def _health(row: dict, cfg: FlareConfig) -> str | None:
    if not math.isfinite(row["loss"]) or not math.isfinite(row["diffuse_light"]):
        return f"the loss became {row['loss']}"
    if row["diffuse_light"] < cfg.collapse_threshold:
        return f"the light collapsed to black (mean diffuse light {row['diffuse_light']:.2e})"
    return None


def _recover(run: RunDir, model: FlareModel, cfg: FlareConfig, info: dict, problem: str, it: int, fresh):
    """Go back to the last checkpoint (or the start) with halved learning rates.

    Returns (iteration resumed from, model, optimisers).
    """
    info["recoveries"] += 1
    if info["recoveries"] > cfg.max_recoveries:
        raise TrainingDiverged(
            f"FLARE training failed at iteration {it}: {problem}, again after {cfg.max_recoveries} restarts with halved learning rates; "
            f"try --set light_activation=softplus, lower learning rates (--set lr_shader=5e-4) or check the subject's masks"
        )
    info["lr_scale"] *= 0.5
    _log.warning(f"{problem} at iteration {it}; restarting from the last checkpoint with learning rates x{info['lr_scale']:g}")
    if run.checkpoints():
        step, state = run.load_checkpoint(map_location=model.base_verts.device)
        model = fresh()
        restore_model(model, state)
        info["remeshes"] = int(state.get("remeshes", 0))
        info["remesh_log"] = list(state.get("remesh_log", []))
        opts = make_optimizers(model, cfg, model.stage, info["lr_scale"], info["remeshes"])
        opts[0].load_state_dict(state["opt_vert"])
        opts[1].load_state_dict(state["opt_net"])
        ratio = info["lr_scale"] / float(state.get("lr_scale", 1.0))  # loaded groups carry the old rates
        for o in opts:
            for g in o.param_groups:
                g["lr"] *= ratio
        return step, model, opts
    torch.manual_seed(cfg.seed + info["recoveries"])  # a different initialisation
    model = fresh()
    info["remeshes"] = 0
    info["remesh_log"] = []
    return 0, model, make_optimizers(model, cfg, model.stage, info["lr_scale"], 0)


def _preview(run: RunDir, it: int, out: dict, tgt: dict) -> None:
    a = out["alpha"][0].detach()
    pred = linear_to_srgb((out["rgb"][0].detach() / a.clamp_min(1e-4)).clamp(0, 1)) * a + (1 - a)
    m = tgt["mask"][0]
    gt = linear_to_srgb((tgt["gt"][0] / m.clamp_min(1e-4)).clamp(0, 1)) * m + (1 - m)
    write_image(run.root / "previews" / f"{it:07d}.jpg", to_uint8(torch.cat([gt, pred], 1)))


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
