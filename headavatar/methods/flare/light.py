"""FLARE's neural light: one MLP on Ref-NeRF's integrated directional encoding (IDE).

diffuse  D = MLP(IDE(n, r=1)),  specular S = MLP(IDE(reflect(-v, n), kr)).

The IDE of a direction with roughness r is the spherical harmonics Y_l^m,
l in {1, 2, 4, 8}, m = 0..l (19 complex values, 38 reals), each attenuated by
exp(-l(l+1)/2 * r): the expected value of Y_l^m under a von Mises-Fisher lobe
of concentration 1/r (Verbin et al. 2022, eq. 7).  The FLARE code divides by
r instead (flare.md §5); ``attenuation="flare"`` keeps that, the default
follows Ref-NeRF so that rougher surfaces see smoother light.

The output goes through Softplus(beta=100): the reference had no output
activation, so negative light was clamped away by the tone map, its gradient
died and training restarted forever on some GPUs (flare#2, flare#4).
"""

from __future__ import annotations

import math

import torch
from torch import nn

IDE_DEGREES = (1, 2, 4, 8)


def _legendre_q(l_max: int, z: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """Q_l^m(z) = P_l^m(z) / (1 - z²)^(m/2): polynomials, so no square root of 1 - z² is needed."""
    q: dict[tuple[int, int], torch.Tensor] = {}
    for m in range(l_max + 1):
        # Q_m^m = (-1)^m (2m-1)!!  (Condon-Shortley phase)
        dfact = 1.0
        for k in range(1, 2 * m, 2):
            dfact *= k
        q[(m, m)] = torch.full_like(z, (-1.0) ** m * dfact)
        if m + 1 <= l_max:
            q[(m + 1, m)] = z * (2 * m + 1) * q[(m, m)]
        for l in range(m + 2, l_max + 1):
            q[(l, m)] = ((2 * l - 1) * z * q[(l - 1, m)] - (l + m - 1) * q[(l - 2, m)]) / (l - m)
    return q


def spherical_harmonics_complex(d: torch.Tensor, degrees=IDE_DEGREES) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Orthonormal complex Y_l^m(d), m = 0..l for each l in ``degrees``.

    d [...,3] unit vectors (z is the polar axis).  Returns (real [...,K],
    imag [...,K], l of each of the K columns).
    """
    x, y, z = d.unbind(-1)
    lmax = max(degrees)
    q = _legendre_q(lmax, z)
    # (x + i y)^m = sin^m(theta) e^{i m phi}
    pr, pi = [torch.ones_like(x)], [torch.zeros_like(x)]
    for _ in range(lmax):
        a, b = pr[-1], pi[-1]
        pr.append(a * x - b * y)
        pi.append(a * y + b * x)
    re, im, ls = [], [], []
    for l in degrees:
        for m in range(l + 1):
            norm = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - m) / math.factorial(l + m))
            re.append(norm * q[(l, m)] * pr[m])
            im.append(norm * q[(l, m)] * pi[m])
            ls.append(l)
    return torch.stack(re, -1), torch.stack(im, -1), ls


def integrated_directional_encoding(d: torch.Tensor, roughness: torch.Tensor | float, attenuation: str = "refnerf", degrees=IDE_DEGREES) -> torch.Tensor:
    """[...,3] directions, roughness [...,1] or scalar -> [..., 2K] (38 for the default degrees)."""
    re, im, ls = spherical_harmonics_complex(d, degrees)
    sigma = torch.tensor([l * (l + 1) / 2 for l in ls], dtype=d.dtype, device=d.device)
    r = torch.as_tensor(roughness, dtype=d.dtype, device=d.device)
    if r.dim() == 0:
        r = r.reshape(1)
    if attenuation == "refnerf":
        att = torch.exp(-sigma * r)
    elif attenuation == "flare":
        att = torch.exp(-sigma / r.clamp_min(1e-4))
    else:
        raise ValueError(f"unknown IDE attenuation {attenuation!r} (refnerf or flare)")
    return torch.cat([re * att, im * att], -1)


def ide_dim(degrees=IDE_DEGREES) -> int:
    return 2 * sum(l + 1 for l in degrees)


class LightMLP(nn.Module):
    """IDE -> RGB radiance: Linear(38, W), ReLU, ``layers`` x (Linear(W, W), ReLU), Linear(W, 3), output activation."""

    def __init__(self, width: int = 64, layers: int = 2, activation: str = "softplus", attenuation: str = "refnerf", init_bias: float = 0.5):
        super().__init__()
        if activation not in ("softplus", "none"):
            raise ValueError(f"light activation must be softplus or none, not {activation!r}")
        self.activation = activation
        self.attenuation = attenuation
        mods = [nn.Linear(ide_dim(), width), nn.ReLU()]
        for _ in range(layers):
            mods += [nn.Linear(width, width), nn.ReLU()]
        out = nn.Linear(width, 3)
        nn.init.constant_(out.bias, init_bias)
        mods.append(out)
        self.mlp = nn.Sequential(*mods)

    def forward(self, d: torch.Tensor, roughness: torch.Tensor | float) -> torch.Tensor:
        h = self.mlp(integrated_directional_encoding(d, roughness, self.attenuation))
        return nn.functional.softplus(h, beta=100.0) if self.activation == "softplus" else h

    def diffuse(self, n: torch.Tensor) -> torch.Tensor:
        return self(n, 1.0)

    def specular(self, r: torch.Tensor, roughness: torch.Tensor) -> torch.Tensor:
        return self(r, roughness)
