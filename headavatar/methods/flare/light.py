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

import numpy as np
import torch
from torch import nn

IDE_DEGREES = (1, 2, 4, 8)


def _legendre_q_coeffs(l_max: int) -> dict[tuple[int, int], np.ndarray]:
    """Polynomial coefficients (in z, lowest first) of Q_l^m(z) = P_l^m(z) / (1 - z²)^(m/2).

    Q is a polynomial, so Y_l^m = N_lm Q_l^m(z) (x + i y)^m needs no square
    root of 1 - z² (smooth everywhere, including the poles).
    """
    q: dict[tuple[int, int], np.ndarray] = {}
    zpoly = np.array([0.0, 1.0])
    for m in range(l_max + 1):
        dfact = float(np.prod(np.arange(1, 2 * m, 2))) if m > 0 else 1.0
        q[(m, m)] = np.array([(-1.0) ** m * dfact])  # Condon-Shortley phase
        if m + 1 <= l_max:
            q[(m + 1, m)] = np.polymul(zpoly[::-1], q[(m, m)][::-1])[::-1] * (2 * m + 1)
        for l in range(m + 2, l_max + 1):
            a = np.polymul(zpoly[::-1], q[(l - 1, m)][::-1])[::-1] * (2 * l - 1)
            b = np.pad(q[(l - 2, m)], (0, len(a) - len(q[(l - 2, m)]))) * (l + m - 1)
            q[(l, m)] = (a - b) / (l - m)
    return q


class SphericalHarmonics(nn.Module):
    """Orthonormal complex Y_l^m for m = 0..l, l in ``degrees``, as one matrix product per call.

    Y_l^m(d) = N_lm Q_l^m(z) (x + i y)^m with z the polar axis; the
    polynomials Q are tabulated once as a matrix over the powers of z.
    """

    def __init__(self, degrees=IDE_DEGREES):
        super().__init__()
        self.degrees = tuple(degrees)
        lmax = max(self.degrees)
        q = _legendre_q_coeffs(lmax)
        cols, ms, ls = [], [], []
        for l in self.degrees:
            for m in range(l + 1):
                norm = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - m) / math.factorial(l + m))
                c = np.zeros(lmax + 1)
                c[: len(q[(l, m)])] = q[(l, m)] * norm
                cols.append(c)
                ms.append(m)
                ls.append(l)
        # non-persistent buffers: they follow .to(device) and stay out of checkpoints
        self.register_buffer("coeffs", torch.tensor(np.stack(cols, 1), dtype=torch.float32), persistent=False)  # [lmax+1, K]
        self.register_buffer("m", torch.tensor(ms), persistent=False)
        self.register_buffer("sigma", torch.tensor([l * (l + 1) / 2 for l in ls], dtype=torch.float32), persistent=False)
        self.l = ls
        self.lmax = lmax

    def forward(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """d [...,3] unit vectors -> (real [...,K], imag [...,K])."""
        x, y, z = d.unbind(-1)
        zp = z[..., None] ** torch.arange(self.lmax + 1, device=d.device, dtype=d.dtype)
        poly = zp @ self.coeffs.to(d)
        # (x + i y)^m for m = 0..lmax by repeated complex multiplication
        pr, pi = [torch.ones_like(x)], [torch.zeros_like(x)]
        for _ in range(self.lmax):
            a, b = pr[-1], pi[-1]
            pr.append(a * x - b * y)
            pi.append(a * y + b * x)
        m = self.m.to(d.device)
        return poly * torch.stack(pr, -1)[..., m], poly * torch.stack(pi, -1)[..., m]


def spherical_harmonics_complex(d: torch.Tensor, degrees=IDE_DEGREES) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(real [...,K], imag [...,K], l of each column) of the orthonormal complex Y_l^m, m = 0..l."""
    sh = SphericalHarmonics(degrees)
    re, im = sh(d)
    return re, im, sh.l


def integrated_directional_encoding(d: torch.Tensor, roughness: torch.Tensor | float, attenuation: str = "refnerf", degrees=IDE_DEGREES,
                                    sh: SphericalHarmonics | None = None) -> torch.Tensor:
    """[...,3] directions, roughness [...,1] or scalar -> [..., 2K] (38 for the default degrees)."""
    sh = sh or SphericalHarmonics(degrees)
    re, im = sh(d)
    sigma = sh.sigma.to(d)
    if isinstance(roughness, torch.Tensor):
        r = roughness.to(d)
    else:
        r = torch.full((1,), float(roughness), dtype=d.dtype, device=d.device)
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
        self.sh = SphericalHarmonics()

    def forward(self, d: torch.Tensor, roughness: torch.Tensor | float) -> torch.Tensor:
        h = self.mlp(integrated_directional_encoding(d, roughness, self.attenuation, sh=self.sh))
        return nn.functional.softplus(h, beta=100.0) if self.activation == "softplus" else h

    def diffuse(self, n: torch.Tensor) -> torch.Tensor:
        return self(n, 1.0)

    def both(self, n: torch.Tensor, r: torch.Tensor, roughness: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(diffuse at normals n, specular along r with roughness) in one MLP pass."""
        N = n.shape[0]
        rough = torch.cat([torch.ones_like(roughness), roughness], 0)
        out = self(torch.cat([n, r], 0), rough)
        return out[:N], out[N:]

    def specular(self, r: torch.Tensor, roughness: torch.Tensor) -> torch.Tensor:
        return self(r, roughness)
