"""The toy method's training (a colour fit) and its avatar (Avatar protocol + Gaussians)."""

from __future__ import annotations

from pathlib import Path

import torch

from headavatar.methods.avatar import GAUSSIANS, open_run
from headavatar.render.gaussians import render_gaussians
from headavatar.render.gaussians.sh import RGB2SH
from headavatar.subjects.dataset import FrameDataset, collate, prepare_targets, training_size
from headavatar.subjects.format import Subject
from toy_method import NAME, ToyConfig


def fit_colour(subject_dir: Path, run, cfg: ToyConfig) -> None:
    """The mean head colour over the training frames' head masks; one checkpoint."""
    subj = Subject.open(subject_dir)
    bg = torch.tensor(cfg.background)
    data = FrameDataset(subj, subj.split["train"], training_size(subj, cfg.resolution))
    tgt = prepare_targets(collate([data[i] for i in range(len(data))]), bg, "cpu")
    w = tgt["alpha"]
    colour = (tgt["gt"] * w).sum((0, 1, 2)) / w.sum().clamp_min(1e-6)
    run.write_info(NAME, subject_dir, cfg)
    run.append_curve({"step": 1, "loss": float(((tgt["gt"] - colour) ** 2 * w).mean())})
    run.save_checkpoint(1, {"colour": colour})


class ToyAvatar:
    method = NAME
    eval_protocol = "flashavatar"
    capabilities = frozenset({GAUSSIANS})

    def __init__(self, run, device, subject_dir=None):
        self.run = run
        _, self.cfg, self.device, self.subject, self.size = open_run(run, NAME, ToyConfig, device, subject_dir)
        self.head = self.subject.head_model(**run.head_overrides).to(self.device)
        self.step, state = run.load_checkpoint(map_location=self.device)
        self.colour = state["colour"]
        self.background = torch.tensor(self.cfg.background, device=self.device)
        self.shape = torch.as_tensor(self.subject.tracking.shape, dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def gaussians(self, params) -> dict:
        B = params.batch_size
        means = self.head(params.replace(shape=self.shape[None].expand(B, -1)))
        N = means.shape[1]
        one = means.new_ones(B, N)
        return {"means": means, "quats": torch.tensor([1.0, 0, 0, 0], device=self.device).expand(B, N, 4),
                "scales": one[..., None].expand(B, N, 3) * self.cfg.splat_size, "opacities": one * self.cfg.opacity,
                "colors": RGB2SH(self.colour).view(1, 1, 1, 3).expand(B, N, 1, 3)}

    @torch.no_grad()
    def render_gaussians(self, g: dict, cameras, background=None) -> dict:
        bg = (self.background if background is None else background).view(1, 3).expand(g["means"].shape[0], 3)
        out = render_gaussians(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"], cameras.viewmats, cameras.K,
                               cameras.width, cameras.height, sh_degree=0, backgrounds=bg, backend="torch", render_depth=False)
        return {"rgb": out.rgb, "alpha": out.alpha}

    def render(self, params: dict, cameras, background=None) -> dict:
        return self.render_gaussians(self.gaussians(params), cameras, background)
