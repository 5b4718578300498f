"""FLARE's material network: canonical position -> albedo kd (3), roughness kr (1), specular intensity ko (1).

Stage 1 encodes positions with NeRF's positional encoding, stage 2 with a
multiresolution hash encoding (Mueller et al. 2022), written here in plain
PyTorch instead of tiny-cuda-nn (whose licence is non-commercial and which
needs a CUDA build).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def positional_encoding(x: torch.Tensor, frequencies: int) -> torch.Tensor:
    """x ⊕ sin(2^k x) ⊕ cos(2^k x), k < frequencies (3 + 6 F values for 3D input)."""
    out = [x]
    for k in range(frequencies):
        out += [torch.sin(x * (2.0**k)), torch.cos(x * (2.0**k))]
    return torch.cat(out, -1)


# Spatial-hash primes of Teschner et al. 2003, as Instant-NGP (the first is 1 so x stays coherent).
_PRIMES = (1, 2654435761, 805459861)
_CORNERS = torch.tensor([[(c >> 0) & 1, (c >> 1) & 1, (c >> 2) & 1] for c in range(8)], dtype=torch.int64)


class HashGrid(nn.Module):
    """Multiresolution hash encoding of points in [0,1]³ -> [N, levels * features].

    Level l has resolution floor(base * scale**l); a level whose (res+1)³
    grid vertices fit in the table is indexed densely, the others through the
    XOR-of-primes spatial hash.  Features are interpolated trilinearly, so the
    encoding is continuous and differentiable in both the table and the input.
    All levels are evaluated together (one gather), in chunks of points.
    """

    def __init__(self, levels: int = 16, features: int = 2, log2_size: int = 19, base_resolution: int = 16, scale: float = 1.4473,
                 init_range: float = 1e-4, chunk: int = 1 << 17):
        super().__init__()
        if levels < 1 or features < 1 or not 4 <= log2_size <= 26:
            raise ValueError("hash grid: levels >= 1, features >= 1, 4 <= log2_size <= 26")
        self.levels, self.features, self.size, self.chunk = levels, features, 1 << log2_size, chunk
        res = [int(math.floor(base_resolution * scale**lv)) for lv in range(levels)]
        self.resolutions = res
        dense = [(r + 1) ** 3 <= self.size for r in res]
        sizes = [(r + 1) ** 3 if d else self.size for r, d in zip(res, dense)]
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        self.table = nn.Parameter(torch.empty(offsets[-1], features).uniform_(-init_range, init_range))
        self.register_buffer("res", torch.tensor(res, dtype=torch.float32), persistent=False)
        self.register_buffer("res_i", torch.tensor(res, dtype=torch.int64), persistent=False)
        self.register_buffer("dense", torch.tensor(dense), persistent=False)
        self.register_buffer("offset", torch.tensor(offsets[:-1], dtype=torch.int64), persistent=False)
        self.register_buffer("corners", _CORNERS.clone(), persistent=False)  # [8,3]

    @property
    def output_dim(self) -> int:
        return self.levels * self.features

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        N, L = x.shape[0], self.levels
        p = x[:, None, :] * self.res[None, :, None]  # [N,L,3]
        p0 = torch.minimum(p.detach().floor(), (self.res - 1)[None, :, None])
        f = p - p0
        c = p0.long()[:, :, None, :] + self.corners[None, None]  # [N,L,8,3]
        c0, c1, c2 = c.unbind(-1)
        r1 = (self.res_i + 1)[None, :, None]
        dense_idx = (c0 * r1 + c1) * r1 + c2
        hash_idx = ((c0 * _PRIMES[0]) ^ (c1 * _PRIMES[1]) ^ (c2 * _PRIMES[2])) & (self.size - 1)
        idx = torch.where(self.dense[None, :, None], dense_idx, hash_idx) + self.offset[None, :, None]
        if x.is_cuda:
            # embedding's CUDA backward sorts the indices and reduces segments; index_select's atomic
            # adds serialise on the coarse levels, where every point hits the same few entries (its
            # backward took 0.38 s per 512² batch-4 step on an H100).  On the CPU index_select is faster.
            feat = torch.nn.functional.embedding(idx.reshape(-1), self.table)
        else:
            feat = self.table.index_select(0, idx.reshape(-1))
        feat = feat.reshape(N, L, 8, self.features)
        # trilinear weights as an outer product of per-axis (1-f, f); corner c = (c0 + 2 c1 + 4 c2) matches _CORNERS
        wx = torch.stack([1 - f[..., 0], f[..., 0]], -1)  # [N,L,2]
        wy = torch.stack([1 - f[..., 1], f[..., 1]], -1)
        wz = torch.stack([1 - f[..., 2], f[..., 2]], -1)
        w = (wz[..., :, None, None] * wy[..., None, :, None] * wx[..., None, None, :]).reshape(N, L, 8)
        # a broadcast multiply-sum: einsum lowers this to millions of 8-long batched GEMVs (19 ms a step on an H100)
        return (feat * w[..., None]).sum(2).reshape(N, L * self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, 3).clamp(0, 1)
        if x.shape[0] <= self.chunk:
            out = self._encode(x)
        else:
            out = torch.cat([self._encode(x[s : s + self.chunk]) for s in range(0, x.shape[0], self.chunk)])
        return out.reshape(*lead, -1)


def _mlp(din: int, width: int, hidden: int, dout: int, kaiming: bool) -> nn.Sequential:
    layers = [nn.Linear(din, width), nn.ReLU()]
    for _ in range(hidden):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, dout))
    if kaiming:
        for m in layers:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


class MaterialMLP(nn.Module):
    """Canonical positions in [0,1]³ -> (kd [...,3], kr [...,1], ko [...,1]), all through a sigmoid."""

    def __init__(self, encoding: str, cfg):
        super().__init__()
        self.encoding = encoding
        if encoding == "pe":
            self.freqs = cfg.pe_frequencies
            self.grid = None
            din = 3 + 6 * self.freqs
            self.mlp = _mlp(din, cfg.material_width, cfg.material_layers, 5, kaiming=True)
        elif encoding == "hash":
            self.freqs = 0
            self.grid = HashGrid(cfg.hash_levels, cfg.hash_features, cfg.hash_log2_size, cfg.hash_base_resolution, cfg.hash_scale)
            self.mlp = _mlp(self.grid.output_dim, cfg.hash_mlp_width, cfg.hash_mlp_layers, 5, kaiming=True)
        else:
            raise ValueError(f"unknown material encoding {encoding!r}")

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """[...,3] -> [...,5] in (0,1): kd, kr, ko."""
        h = positional_encoding(x, self.freqs) if self.grid is None else self.grid(x)
        return torch.sigmoid(self.mlp(h))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.raw(x)
        return m[..., :3], m[..., 3:4], m[..., 4:5]
