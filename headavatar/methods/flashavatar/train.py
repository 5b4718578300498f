"""FlashAvatar training recipe (reference: train.py of FlashAvatar-code; deviations in docs/FLASHAVATAR.md)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from headavatar.errors import TrainingDiverged, UserError
from headavatar.methods.flashavatar.build import build_model
from headavatar.methods.flashavatar.config import FlashAvatarConfig
from headavatar.methods.flashavatar.model import FlashAvatarModel
from headavatar.methods.flashavatar.refine import REFINED_TRACKING, JointRefiner
from headavatar.methods.run import RunDir
from headavatar.subjects.dataset import heldout_sample, training_size, training_stream, FrameDataset, InfiniteSampler, collate, prepare_targets
from headavatar.subjects.format import Subject
from headavatar.utils.cudagraph import CudaGraphed
from headavatar.utils.device import resolve_device
from headavatar.utils.io import write_image
from headavatar.utils.video import to_uint8


def huber(pred: torch.Tensor, gt: torch.Tensor, delta: float) -> torch.Tensor:
    return F.huber_loss(pred, gt, delta=delta, reduction="mean")


def make_optimizer(model: FlashAvatarModel, cfg: FlashAvatarConfig) -> torch.optim.Optimizer:
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
    return torch.optim.Adam(groups, fused=model.sh_dc.device.type == "cuda")


def psnr(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    return -10 * torch.log10(((pred - gt) ** 2).mean().clamp_min(1e-12))


def train_flashavatar(subject_dir: Path, run: RunDir, cfg: FlashAvatarConfig, resume: bool = False, progress: bool = True) -> None:
    device = resolve_device(cfg.device)
    subject = Subject.open(subject_dir)
    if cfg.iterations < 1:
        raise UserError("--iterations must be at least 1")
    if cfg.batch_size < 1:
        raise UserError("batch_size must be at least 1")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    H, W = training_size(subject, cfg.resolution)
    model = build_model(subject, cfg, device, run.head_overrides)
    opt = make_optimizer(model, cfg)
    bg = torch.tensor(cfg.background, dtype=torch.float32, device=device)
    tr = subject.tracking
    dtr = tr.on_device(device)
    train_idx = subject.split["train"]
    test_idx = subject.split.get("test", [])
    # per-training-frame tracking corrections, trained with the avatar (refine.py)
    refiner = JointRefiner(subject, model.head, cfg, train_idx, device) if cfg.refine_tracking else None

    start, elapsed = 0, 0.0
    if resume:
        resumed = run.resume(cfg.iterations, device, progress)
        if resumed is None:
            return
        start, state, elapsed = resumed
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if refiner is not None and "refine" in state:
            refiner.load_state_dict(state["refine"])
        for group in opt.param_groups:  # a run may resume on another device than it was saved on
            group["fused"] = device.type == "cuda"
    else:
        extra = {"num_gaussians": model.num_gaussians, "train_size": [H, W]}
        if model.cond_masks is not None:
            per = model.cond_masks[model.cond_group].sum(1)
            extra["condition_regions"] = {"distinct_masks": int(model.cond_masks.shape[0]), "mean_entries_per_gaussian": float(per.mean()),
                                          "unconditioned_fraction": float((per == 0).float().mean())}
        if refiner is not None:
            extra["refined_tracking"] = REFINED_TRACKING
        run.write_info("flashavatar", subject_dir, cfg, extra)

    data, batches = training_stream(subject, train_idx, (H, W), cfg.batch_size, cfg.seed, cfg.frames_per_pass, cfg.num_workers, cfg.cache_mb, start, device,
                                     cfg.device_cache_mb if device.type == "cuda" else 0)
    if not resume:
        first = next(iter(torch.utils.data.DataLoader(data, batch_size=1, sampler=InfiniteSampler(len(data), seed=cfg.seed), collate_fn=collate)))
        model.initialize_from_frame(tr.params(first["index"].numpy(), device))

    lpips_net = None
    if cfg.lpips_weight > 0 and cfg.lpips_start <= cfg.iterations:
        from headavatar.metrics.lpips import LPIPS

        lpips_net = LPIPS(net="vgg").to(device)

    eval_set = heldout_sample(subject, test_idx, cfg.eval_frames if cfg.eval_every > 0 else 0, (H, W))

    # the head model's forward (no gradient) replayed from a CUDA graph: hundreds of small launches
    frame_inputs = CudaGraphed(model.frame_inputs) if device.type == "cuda" else model.frame_inputs

    pbar = tqdm(total=cfg.iterations, initial=start, disable=not progress, desc="train flashavatar", unit="it", dynamic_ncols=True)
    t0 = time.perf_counter() - elapsed
    loss_sum = torch.zeros((), device=device)
    psnr_sum = torch.zeros((), device=device)
    n_sum = 0
    it = start
    try:
        for it in range(start + 1, cfg.iterations + 1):
            batch = next(batches)
            tgt = prepare_targets(batch, bg, device)
            idx = batch["index"]
            params = dtr.params(idx)
            cams = dtr.cameras(idx, subject.height, subject.width).resized(H, W)
            refining = refiner is not None and refiner.active(it)
            if refining:  # gradients flow to the corrections (no CUDA graph on this path)
                cond, verts = model.frame_inputs(refiner.params(params, idx), grad=True)
            else:
                with torch.no_grad():
                    cond, verts = frame_inputs(params)
            g = model.gaussians(cond, verts)
            sh_deg = min(cfg.sh_degree, (it - 1) // max(1, cfg.sh_increase_every))
            pred = model.render(g, cams, bg, sh_deg, cfg.backend).rgb
            gt = tgt["gt"]
            m = tgt["mouth_mask"]
            loss = huber(pred, gt, cfg.huber_delta) + cfg.mouth_weight * huber(pred * m, gt * m, cfg.huber_delta)
            if lpips_net is not None and it >= cfg.lpips_start:
                hm = tgt["head_mask"]
                loss = loss + cfg.lpips_weight * lpips_net((pred * hm).permute(0, 3, 1, 2), (gt * hm).permute(0, 3, 1, 2)).mean()
            if refining:
                loss = loss + refiner.prior(idx)
                refiner.zero_grad()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if refining:
                refiner.step()
            with torch.no_grad():
                loss_sum += loss.detach()
                psnr_sum += psnr(pred.detach(), gt)
                n_sum += 1
            pbar.update(1)

            out_of_time = cfg.max_seconds > 0 and it % 10 == 0 and time.perf_counter() - t0 >= cfg.max_seconds
            last = it == cfg.iterations or out_of_time
            if it % cfg.log_every == 0 or last:
                mean_loss = (loss_sum / n_sum).item()  # the one host sync per log interval
                if not np.isfinite(mean_loss):
                    raise TrainingDiverged(
                        f"training diverged at iteration {it} (loss {mean_loss}); resume from the last checkpoint with "
                        f"lower learning rates: headavatar train ... --resume --set lr_mlp=5e-5"
                    )
                row = {"step": it, "loss": mean_loss, "train_psnr": (psnr_sum / n_sum).item(), "time": time.perf_counter() - t0, "sh_degree": sh_deg}
                if eval_set is not None and (it % cfg.eval_every == 0 or last):
                    row["test_psnr"] = evaluate_psnr(model, eval_set, tr, subject, bg, (H, W), device, cfg)
                run.append_curve(row)
                pbar.set_postfix(loss=f"{mean_loss:.4f}", psnr=f"{row['train_psnr']:.2f}")
                loss_sum.zero_(), psnr_sum.zero_()
                n_sum = 0
            if cfg.preview_every and (it % cfg.preview_every == 0 or last):
                write_image(run.root / "previews" / f"{it:07d}.jpg", to_uint8(torch.cat([gt[0], pred[0].detach()], 1)))
            if it % cfg.checkpoint_every == 0 or last:
                if n_sum and not torch.isfinite(loss_sum).item():  # never checkpoint a diverged model
                    raise TrainingDiverged(f"training diverged before iteration {it} (non-finite loss); resume from the last checkpoint "
                                           f"with lower learning rates: headavatar train ... --resume --set lr_mlp=5e-5")
                _save(run, it, model, opt, time.perf_counter() - t0, refiner)
            if out_of_time:
                break
    except KeyboardInterrupt:
        # keep what was learned; the run resumes from here with --resume
        if it > start:
            _save(run, it, model, opt, time.perf_counter() - t0, refiner)
        raise
    finally:
        pbar.close()


def _save(run: RunDir, it: int, model, opt, elapsed: float, refiner: JointRefiner | None = None) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "step": it, "elapsed": elapsed}
    if refiner is not None:
        state["refine"] = refiner.state_dict()
        refiner.save(run.root)  # before the checkpoint: a checkpoint never exists without its refined tracking
    run.save_checkpoint(it, state)


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
        pred = model.render(model.gaussians(cond, verts), cams, bg, cfg.sh_degree, cfg.backend).rgb
        vals.append(psnr(pred, tgt["gt"]).item())
    return float(np.mean(vals))
