"""FLARE's losses (flare.md §4, §8): image, mask, geometry regularisers, material/light priors, head-model prior."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from headavatar.lighting.color import linear_to_srgb


# ------------------------------------------------------------------ image terms
def tonemap(x: torch.Tensor) -> torch.Tensor:
    """The reference's training tone map: sRGB(log(clamp(x, 0, 65535) + 1))."""
    return linear_to_srgb(torch.log(x.clamp(0, 65535) + 1))


def shading_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """L1 between tone-mapped linear images ("logl1")."""
    return (tonemap(pred) - tonemap(gt)).abs().mean()


def mask_loss(pred_alpha: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    return (pred_alpha - gt_mask).square().mean()


class VGGPerceptual(nn.Module):
    """L1 between VGG16 activations after relu1_2, relu2_2, relu3_3, relu4_3 (features [:4], [4:9], [9:16], [16:23]).

    ImageNet normalisation, inputs resized to ``size``.  The VGG16 weights
    are LPIPS's backbone (the torchvision ImageNet weights), read without
    network access by headavatar.metrics.lpips.
    """

    # convolutions per slice, in order (VGG16 conv1_1 .. conv4_3)
    _SLICES = (2, 2, 3, 3)

    def __init__(self, size: int = 224):
        super().__init__()
        from headavatar.metrics.lpips import load_state

        state = load_state("vgg")
        for i in range(sum(self._SLICES)):
            self.register_buffer(f"w{i}", state[f"conv{i}.weight"].float(), persistent=False)
            self.register_buffer(f"b{i}", state[f"conv{i}.bias"].float(), persistent=False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.size = size

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        out, i = [], 0
        for s, n in enumerate(self._SLICES):
            if s > 0:
                x = F.max_pool2d(x, 2)
            for _ in range(n):
                x = F.relu(F.conv2d(x, getattr(self, f"w{i}"), getattr(self, f"b{i}"), padding=1))
                i += 1
            out.append(x)
        return out

    def forward(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """[B,H,W,3] images -> scalar."""
        fp = self.features(pred.permute(0, 3, 1, 2))
        with torch.no_grad():
            fg = self.features(gt.permute(0, 3, 1, 2))
        return sum((a - b).abs().mean() for a, b in zip(fp, fg))


# ------------------------------------------------------------------ geometry
class MeshRegularizer:
    """Uniform Laplacian and normal consistency of one topology (rebuild after a remesh)."""

    def __init__(self, faces: torch.Tensor, num_vertices: int):
        dev = faces.device
        f = faces.long()
        e = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
        e = torch.cat([e, e.flip(1)])
        key = torch.unique(e[:, 0] * num_vertices + e[:, 1])  # 1-D keys: far faster than unique(dim=0)
        src, dst = torch.div(key, num_vertices, rounding_mode="floor"), key % num_vertices
        deg = torch.zeros(num_vertices, device=dev).index_add(0, src, torch.ones(src.shape[0], device=dev))
        self.src, self.dst = src, dst
        self.deg = deg.clamp_min(1)[:, None]
        # adjacent face pairs: faces sharing an (undirected) edge
        F_ = f.shape[0]
        he = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
        key = he.min(1).values * num_vertices + he.max(1).values
        fid = torch.arange(F_, device=dev).repeat(3)
        order = torch.argsort(key, stable=True)
        k, fo = key[order], fid[order]
        same = (k[1:] == k[:-1]).nonzero().squeeze(1)
        self.pairs = torch.stack([fo[same], fo[same + 1]], 1)

    def laplacian(self, v: torch.Tensor) -> torch.Tensor:
        """mean |L v|² with L the uniform (umbrella) Laplacian."""
        nb = torch.zeros_like(v).index_add(0, self.src, v[self.dst]) / self.deg
        return (v - nb).square().sum(-1).mean()

    def normal_consistency(self, v: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """mean over adjacent face pairs of (1 - cos)²."""
        if self.pairs.numel() == 0:
            return v.sum() * 0
        f = faces.long()
        n = F.normalize(torch.linalg.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]], dim=-1), dim=-1, eps=1e-12)
        cos = (n[self.pairs[:, 0]] * n[self.pairs[:, 1]]).sum(-1)
        return (1 - cos).square().mean()


# ------------------------------------------------------------------ materials / light
def _barron_rho(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Barron's general robust loss rho(x, alpha, c=1) for alpha in (0, 2)."""
    b = (alpha - 2).abs()
    return b / alpha * ((x * x / b + 1) ** (alpha / 2) - 1)


class AdaptiveRobustLoss(nn.Module):
    """Barron's adaptive robust loss (CVPR 2019) as a negative log-likelihood with learnt shape and scale per channel.

    NLL = rho(x / c, alpha) + log c + log Z(alpha).  The partition function
    Z(alpha) = integral of exp(-rho(x, alpha)) over the real line is integrated
    numerically (x = tan t, midpoint rule) each call, so it is differentiable
    in alpha without Barron's precomputed spline.
    """

    def __init__(self, channels: int, alpha_lo: float = 0.001, alpha_hi: float = 1.999, alpha_init: float = 1.0, scale_lo: float = 1e-5,
                 scale_init: float = 1.0, nodes: int = 512):
        super().__init__()
        self.alpha_lo, self.alpha_hi, self.scale_lo = alpha_lo, alpha_hi, scale_lo
        t = (alpha_init - alpha_lo) / (alpha_hi - alpha_lo)
        self.alpha_latent = nn.Parameter(torch.full((channels,), math.log(t / (1 - t))))
        self.scale_latent = nn.Parameter(torch.full((channels,), math.log(math.expm1(scale_init - scale_lo))))
        tt = (torch.arange(nodes, dtype=torch.float64) + 0.5) / nodes * math.pi - math.pi / 2
        self.register_buffer("nodes", tt, persistent=False)

    def alpha(self) -> torch.Tensor:
        return self.alpha_lo + (self.alpha_hi - self.alpha_lo) * torch.sigmoid(self.alpha_latent)

    def scale(self) -> torch.Tensor:
        return self.scale_lo + F.softplus(self.scale_latent)

    def log_partition(self, alpha: torch.Tensor) -> torch.Tensor:
        a = alpha.double()[:, None]
        x = torch.tan(self.nodes)[None]
        integrand = torch.exp(-_barron_rho(x, a)) / torch.cos(self.nodes)[None] ** 2
        return torch.log(integrand.sum(1) * (math.pi / self.nodes.numel())).to(alpha.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., channels] residuals -> mean NLL."""
        a, c = self.alpha(), self.scale()
        nll = _barron_rho(x / c, a) + torch.log(c) + self.log_partition(a)
        return nll.mean()


def hinge_prior(x: torch.Tensor, mean: float, std: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean max(0, |(x - mean) / std| - 2): free within two standard deviations.

    ``mask`` [N] bool: average over the selected rows of x [N,C] only (0 when none), without the
    host sync that boolean indexing costs on a GPU.
    """
    h = ((x - mean) / std).abs().sub(2).clamp_min(0)
    if mask is None:
        return h.mean() if x.numel() else x.sum() * 0
    m = mask.to(h.dtype).reshape(-1, *([1] * (h.dim() - 1)))
    return (h * m).sum() / (m.sum() * (h[0].numel() if h.dim() > 1 else 1)).clamp_min(1)


def white_light_loss(diffuse: torch.Tensor) -> torch.Tensor:
    if diffuse.numel() == 0:
        return diffuse.sum() * 0
    return (diffuse - diffuse.mean(-1, keepdim=True)).abs().mean()


# ------------------------------------------------------------------ head-model prior
def head_prior_loss(E, P, W, target_idx, valid, prior, zero_blend=None, ghost=None, w_skin: float = 5.0, w_blend: float = 1e4) -> torch.Tensor:
    """FLARE's FLAME prior: match skinning weights and blendshapes of the nearest head-model vertex.

    target_idx [V]: nearest head-model vertex; valid [V] bool (close enough).
    zero_blend [V] bool: vertices whose blendshape targets are 0 (mouth interior, cloth).
    ghost [V] bool: vertices fully skinned to the ghost bone (cloth).
    """
    tw = prior.skin_weights[target_idx]
    te = prior.expr_basis[target_idx]
    tp = prior.pose_basis[target_idx]
    if zero_blend is not None:
        keep = (~zero_blend).to(te.dtype)
        te = te * keep[:, None, None]
        tp = tp * keep[:, None, None]
    if ghost is not None:
        g = torch.zeros_like(tw)
        g[:, 0] = 1
        tw = torch.where(ghost[:, None], g, tw)
    # means over the valid vertices as masked sums: boolean indexing would sync with the GPU three times
    m = valid.to(E.dtype)
    n = m.sum().clamp_min(1)

    def msq(a, b):
        d = (a - b).square().reshape(a.shape[0], -1)
        if d.shape[1] == 0:  # nothing to match: no pose correctives for a head model with only a root joint (ICT-FaceKit)
            return d.sum()
        return (d * m[:, None]).sum() / (n * d.shape[1])

    return w_skin * msq(W, tw) + w_blend * msq(E, te) + w_blend * msq(P, tp)
