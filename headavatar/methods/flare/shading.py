"""Split-sum shading (Karis 2013, as nvdiffrec / FLARE):  c = kd * D + ko * S * (F0 * A + B).

D and S are the diffuse and specular light (from the light MLP in training,
from a prefiltered environment when relighting); (A, B) come from the GGX
split-sum table that headavatar.lighting.brdf integrates (no downloaded
asset).  Everything here is linear radiance, up to ``composite``, which
encodes the shaded frame to sRGB over a background.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headavatar.lighting.brdf import lut_lookup, split_sum_lut
from headavatar.lighting.color import linear_to_srgb

NORMAL_BEND = 0.1  # below this n.v the shading normal bends towards the geometric one (nvdiffrec)


def prepare_shading_normal(smooth_n: torch.Tensor, geom_n: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """Two-sided shading normal: both normals flipped to face the viewer, then the
    interpolated normal blended towards the face normal where it grazes the view."""
    smooth_n = F.normalize(smooth_n, dim=-1)
    geom_n = F.normalize(geom_n, dim=-1)
    flip = ((geom_n * view).sum(-1, keepdim=True) < 0).to(smooth_n.dtype)
    smooth_n = smooth_n * (1 - 2 * flip)
    geom_n = geom_n * (1 - 2 * flip)
    t = ((smooth_n * view).sum(-1, keepdim=True) / NORMAL_BEND).clamp(0, 1)
    return F.normalize(geom_n + t * (smooth_n - geom_n), dim=-1)


def reflect(view: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Mirror direction of the view vector (surface -> eye) about n."""
    return 2 * (view * n).sum(-1, keepdim=True) * n - view


class SplitSum:
    """Holds the BSDF table on a device; ``shade`` combines materials and light."""

    def __init__(self, device, size: int = 128, samples: int = 512):
        self.lut = split_sum_lut(size, samples, device=device).to(device)

    def terms(self, n_dot_v: torch.Tensor, roughness: torch.Tensor) -> torch.Tensor:
        return lut_lookup(self.lut, n_dot_v.clamp(1e-4, 1.0), roughness)

    def shade(self, kd, kr, ko, f0, diffuse, specular, n_dot_v) -> dict[str, torch.Tensor]:
        """All [...,C]; returns rgb and its parts (diffuse_shading, specular_shading = S (F0 A + B))."""
        ab = self.terms(n_dot_v[..., 0], kr[..., 0])
        spec_refl = f0 * ab[..., 0:1] + ab[..., 1:2]
        spec = specular * spec_refl
        rgb = kd * diffuse + ko * spec
        return {"rgb": rgb, "diffuse_shading": diffuse, "specular_shading": spec}


def composite(rgb_lin_premult: torch.Tensor, alpha: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Premultiplied linear radiance -> sRGB over an sRGB background (blend in sRGB, as the GT mattes are)."""
    a = alpha.clamp(0, 1)
    fg = linear_to_srgb((rgb_lin_premult / a.clamp_min(1e-6)).clamp(0, 1))
    bg = background.to(fg)
    if bg.dim() == 1:
        bg = bg.view(1, 1, 1, -1)
    return (fg * a + bg * (1 - a)).clamp(0, 1)
