"""Cube maps in PyTorch: lat-long conversion, seamless bilinear sampling, GGX prefiltering, irradiance.

Directions are in the world frame of headavatar.camera (+y up, the face
looking towards +z).  Lat-long maps put direction -z (behind the head, what a
camera in front of the face sees) at the image centre, +y at the top row:
``u = 0.5 + atan2(x, -z) / (2 pi)``, ``v = acos(y) / pi``.

Faces follow the OpenGL order and orientation (+x, -x, +y, -y, +z, -z); texel
(col i, row j) of a face of size S has face coordinates
``a = 2 (i + 0.5) / S - 1``, ``b = 2 (j + 0.5) / S - 1`` and direction

    +x: ( 1, -b, -a)   -x: (-1, -b,  a)   +y: ( a,  1,  b)
    -y: ( a, -1, -b)   +z: ( a, -b,  1)   -z: (-a, -b, -1)

Every face is stored with a one-texel border holding the neighbouring faces'
values (``CubeMap``), so bilinear sampling never needs to cross a face edge
and is seamless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from headavatar.lighting.brdf import hammersley


# ------------------------------------------------------------------ geometry
def face_directions(face: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    one = torch.ones_like(a)
    return {
        0: (one, -b, -a),
        1: (-one, -b, a),
        2: (a, one, b),
        3: (a, -one, -b),
        4: (a, -b, one),
        5: (-a, -b, -one),
    }[face]


def cube_directions(size: int, pad: int = 0, device=None, dtype=torch.float32, normalize: bool = True) -> torch.Tensor:
    """[6, S+2p, S+2p, 3] directions of texel centres (border texels lie past the face edge)."""
    i = torch.arange(-pad, size + pad, device=device, dtype=dtype)
    c = 2 * (i + 0.5) / size - 1
    b, a = torch.meshgrid(c, c, indexing="ij")  # rows = b, columns = a
    d = torch.stack([torch.stack(face_directions(f, a, b), -1) for f in range(6)])
    return F.normalize(d, dim=-1) if normalize else d


def direction_to_face(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[...,3] -> (face [...] long, a [...], b [...]) with a, b in [-1, 1]."""
    x, y, z = d.unbind(-1)
    ax, ay, az = x.abs(), y.abs(), z.abs()
    use_x = (ax >= ay) & (ax >= az)
    use_y = ~use_x & (ay >= az)
    face = torch.where(use_x, torch.where(x >= 0, 0, 1), torch.where(use_y, torch.where(y >= 0, 2, 3), torch.where(z >= 0, 4, 5)))
    m = torch.where(use_x, ax, torch.where(use_y, ay, az)).clamp_min(1e-20)
    # (a, b) for each face, from the table in the module docstring
    a = torch.where(use_x, torch.where(x >= 0, -z, z), torch.where(use_y, x, torch.where(z >= 0, x, -x))) / m
    b = torch.where(use_x, -y, torch.where(use_y, torch.where(y >= 0, z, -z), -y)) / m
    return face, a, b


def texel_solid_angles(size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[S,S] exact solid angle of each texel of one face (the same for all six)."""
    e = torch.linspace(-1, 1, size + 1, device=device, dtype=torch.float64)

    def area(x, y):
        return torch.atan2(x * y, torch.sqrt(x * x + y * y + 1))

    y0, x0 = torch.meshgrid(e[:-1], e[:-1], indexing="ij")
    y1, x1 = torch.meshgrid(e[1:], e[1:], indexing="ij")
    return (area(x0, y0) - area(x0, y1) - area(x1, y0) + area(x1, y1)).to(dtype)


# ------------------------------------------------------------------ sampling
def _bilinear(tex: torch.Tensor, face: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """tex [6,Hp,Wp,C]; continuous texel coordinates (centres at integers), clamped -> [...,C]."""
    _, Hp, Wp, C = tex.shape
    px = px.clamp(0, Wp - 1)
    py = py.clamp(0, Hp - 1)
    x0 = px.detach().floor().clamp(max=Wp - 2).long() if Wp > 1 else torch.zeros_like(px, dtype=torch.long)
    y0 = py.detach().floor().clamp(max=Hp - 2).long() if Hp > 1 else torch.zeros_like(py, dtype=torch.long)
    fx = (px - x0.to(px.dtype))[..., None]
    fy = (py - y0.to(py.dtype))[..., None]
    flat = tex.reshape(-1, C)
    base = face * (Hp * Wp)
    x1 = (x0 + 1).clamp(max=Wp - 1)
    y1 = (y0 + 1).clamp(max=Hp - 1)

    def g(yy, xx):
        return flat.index_select(0, (base + yy * Wp + xx).reshape(-1)).reshape(*px.shape, C)

    top = g(y0, x0) * (1 - fx) + g(y0, x1) * fx
    bot = g(y1, x0) * (1 - fx) + g(y1, x1) * fx
    return top * (1 - fy) + bot * fy


@dataclass
class CubeMap:
    """A cube map with a one-texel border per face: ``data`` [6, S+2, S+2, C]."""

    data: torch.Tensor

    @property
    def size(self) -> int:
        return self.data.shape[1] - 2

    @property
    def channels(self) -> int:
        return self.data.shape[-1]

    def to(self, device=None, dtype=None) -> "CubeMap":
        return CubeMap(self.data.to(device=device, dtype=dtype))

    def interior(self) -> torch.Tensor:
        """[6,S,S,C] without the border."""
        return self.data[:, 1:-1, 1:-1]

    def sample(self, d: torch.Tensor) -> torch.Tensor:
        """Bilinear lookup along directions d [...,3] (need not be unit) -> [...,C]."""
        return self.sample_face(*direction_to_face(d.to(self.data.dtype)))

    def sample_face(self, face: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Bilinear lookup at face coordinates (see ``direction_to_face``)."""
        S = self.size
        return _bilinear(self.data, face, (a + 1) * (S / 2) + 0.5, (b + 1) * (S / 2) + 0.5)

    @classmethod
    def from_faces(cls, faces: torch.Tensor) -> "CubeMap":
        """[6,S,S,C] -> padded, the border taken from the neighbouring faces."""
        S = faces.shape[1]
        d = cube_directions(S, pad=1, device=faces.device, dtype=faces.dtype)
        face, a, b = direction_to_face(d)
        # border directions fall inside a neighbouring face, at most half a texel from its edge
        vals = _bilinear(faces, face, (a + 1) * (S / 2) - 0.5, (b + 1) * (S / 2) - 0.5)
        vals[:, 1:-1, 1:-1] = faces
        return cls(vals)

    @classmethod
    def from_function(cls, fn, size: int, device=None, dtype=torch.float32) -> "CubeMap":
        """Evaluate fn(directions [N,3]) -> [N,C] at every texel centre, border included."""
        d = cube_directions(size, pad=1, device=device, dtype=dtype)
        return cls(fn(d.reshape(-1, 3)).reshape(6, size + 2, size + 2, -1))

    def downsample(self) -> "CubeMap":
        """2x2 box filter (energy-preserving mip step)."""
        x = self.interior().permute(0, 3, 1, 2)
        x = F.avg_pool2d(x, 2) if self.size >= 2 else x
        return CubeMap.from_faces(x.permute(0, 2, 3, 1).contiguous())


def sample_mips(levels: list[CubeMap], d: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Trilinear lookup: bilinear in the two mip levels around ``level`` [...] (clamped)."""
    face, a, b = direction_to_face(d.to(levels[0].data.dtype))
    lv = level.to(a.dtype).clamp(0, len(levels) - 1).expand_as(a)
    lo = lv.detach().floor()
    lo_min, lo_max = int(lo.min()), int(lo.max())
    out = None
    for k in range(lo_min, min(lo_max + 1, len(levels) - 1) + 1):
        w = (1 - (lv - k).abs()).clamp_min(0)[..., None]
        v = w * levels[k].sample_face(face, a, b)
        out = v if out is None else out + v
    return out


# ------------------------------------------------------------------ lat-long
def latlong_directions(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[H,W,3] directions of the pixel centres of a lat-long map."""
    v = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
    u = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
    theta = v * math.pi
    phi = (u - 0.5) * 2 * math.pi
    th, ph = torch.meshgrid(theta, phi, indexing="ij")
    return torch.stack([th.sin() * ph.sin(), th.cos(), -th.sin() * ph.cos()], -1)


def direction_to_latlong(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = F.normalize(d, dim=-1)
    u = 0.5 + torch.atan2(d[..., 0], -d[..., 2]) / (2 * math.pi)
    v = torch.acos(d[..., 1].clamp(-1, 1)) / math.pi
    return u, v


def sample_latlong(img: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """img [H,W,C] lat-long; bilinear, wrapping in longitude -> [...,C]."""
    H, W, C = img.shape
    u, v = direction_to_latlong(d.to(img.dtype))
    x = u * W - 0.5
    y = (v * H - 0.5).clamp(0, H - 1)
    x0 = x.floor()
    y0 = y.floor().clamp(max=max(H - 2, 0))
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    x0, y0 = x0.long(), y0.long()
    x1, y1 = x0 + 1, (y0 + 1).clamp(max=H - 1)
    x0, x1 = x0 % W, x1 % W
    flat = img.reshape(-1, C)

    def g(yy, xx):
        return flat.index_select(0, (yy * W + xx).reshape(-1)).reshape(*u.shape, C)

    return (g(y0, x0) * (1 - fx) + g(y0, x1) * fx) * (1 - fy) + (g(y1, x0) * (1 - fx) + g(y1, x1) * fx) * fy


def latlong_to_cubemap(img: torch.Tensor, size: int, supersample: int | None = None) -> CubeMap:
    """Resample a lat-long map [H,W,C] to a cube map with faces of ``size``.

    Each texel averages ``supersample``² bilinear taps (by default enough to
    cover the lat-long pixels it spans), so shrinking a large map does not alias
    away small bright sources such as the sun.
    """
    H, W, C = img.shape
    k = supersample or max(1, min(8, math.ceil(W / (4 * size))))
    i = torch.arange(-1, size + 1, device=img.device, dtype=img.dtype)
    sub = (torch.arange(k, device=img.device, dtype=img.dtype) + 0.5) / k
    c = (2 * (i[:, None] + sub[None]) / size - 1).reshape(-1)  # (S+2)*k sub-texel coordinates
    bb, aa = torch.meshgrid(c, c, indexing="ij")
    out = []
    for f in range(6):
        d = torch.stack(face_directions(f, aa, bb), -1)
        vals = sample_latlong(img, d)  # [(S+2)k, (S+2)k, C]
        vals = vals.reshape(size + 2, k, size + 2, k, C).mean((1, 3))
        out.append(vals)
    return CubeMap(torch.stack(out))


def cubemap_to_latlong(cube: CubeMap, height: int, width: int) -> torch.Tensor:
    return cube.sample(latlong_directions(height, width, cube.data.device, cube.data.dtype))


# ------------------------------------------------------------------ filtering
def _tangent_frames(n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    up = torch.where((n[..., 1:2].abs() < 0.999), torch.tensor([0.0, 1.0, 0.0], dtype=n.dtype, device=n.device), torch.tensor([1.0, 0.0, 0.0],
                                                                                                                              dtype=n.dtype, device=n.device))
    t = F.normalize(torch.linalg.cross(up, n, dim=-1), dim=-1)
    b = torch.linalg.cross(n, t, dim=-1)
    return t, b


def prefilter_ggx(chain: list[CubeMap], size: int, roughness: float, samples: int = 128, chunk: int = 1 << 16) -> CubeMap:
    """GGX-prefiltered radiance for n = v = r (split-sum assumption) at ``roughness`` (alpha = r²).

    Filtered importance sampling (Krivanek & Colbert 2008): ``samples``
    Hammersley half-vectors per texel, each read from the mip of the
    energy-preserving box chain ``chain`` whose texel solid angle matches the
    sample's, weighted by n.l as in Karis 2013.  A constant map stays exactly
    constant (the weights are normalised).
    """
    dev, dt = chain[0].data.device, chain[0].data.dtype
    alpha = max(float(roughness) ** 2, 1e-4)
    d = cube_directions(size, pad=1, device=dev, dtype=dt).reshape(-1, 3)
    if roughness <= 0:
        return CubeMap(sample_mips(chain, d, torch.zeros(d.shape[0], device=dev, dtype=dt)).reshape(6, size + 2, size + 2, -1))
    xi = hammersley(samples, dtype=torch.float64)
    a2 = alpha * alpha
    ch = torch.sqrt((1 - xi[:, 1]) / (1 + (a2 - 1) * xi[:, 1]))
    sh = torch.sqrt((1 - ch * ch).clamp_min(0))
    phi = 2 * math.pi * xi[:, 0]
    h = torch.stack([sh * phi.cos(), sh * phi.sin(), ch], -1)  # tangent frame, n = z
    # with v = n: l = 2 (n.h) h - n, n.l = 2 ch² - 1
    l_t = 2 * ch[:, None] * h - torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    nl = l_t[:, 2]
    keep = nl > 0
    l_t, nl, ch = l_t[keep], nl[keep], ch[keep]
    pdf = (a2 / (math.pi * (ch * ch * (a2 - 1) + 1) ** 2)) / 4  # D(h) (n.h) / (4 v.h), v.h = n.h
    omega_s = 1 / (len(xi) * pdf)
    omega_p = 4 * math.pi / (6 * chain[0].size ** 2)
    lod = (0.5 * torch.log2(omega_s / omega_p) + 1).clamp(0, len(chain) - 1)  # +1: Karis' bias for smoother results
    # the sample set is built in float64 on the CPU; the lookups run where the map lives
    w = (nl / nl.sum()).to(dev, dt)
    l_t, lod = l_t.to(dev, dt), lod.to(dev, dt)
    out = []
    for s in range(0, d.shape[0], chunk):
        n = d[s : s + chunk]
        t, b = _tangent_frames(n)
        acc = 0.0
        for k in range(l_t.shape[0]):
            ldir = t * l_t[k, 0] + b * l_t[k, 1] + n * l_t[k, 2]
            acc = acc + w[k] * sample_mips(chain, ldir, lod[k:k + 1])
        out.append(acc)
    return CubeMap(torch.cat(out).reshape(6, size + 2, size + 2, -1))


def irradiance(source: CubeMap, size: int, chunk: int = 4096) -> CubeMap:
    """Cosine-weighted average of the radiance (E / pi), by brute force over ``source``'s texels.

    Normalised by the discrete sum of the cosine weights, so a constant map
    maps to exactly that constant; the lambertian outgoing radiance is then
    albedo * this.
    """
    dev, dt = source.data.device, source.data.dtype
    S = source.size
    src_d = cube_directions(S, device=dev, dtype=dt).reshape(-1, 3)
    src_w = texel_solid_angles(S, device=dev, dtype=dt).expand(6, S, S).reshape(-1)
    src_v = source.interior().reshape(-1, source.channels)
    d = cube_directions(size, pad=1, device=dev, dtype=dt).reshape(-1, 3)
    out = []
    for s in range(0, d.shape[0], chunk):
        cosw = (d[s : s + chunk] @ src_d.t()).clamp_min(0) * src_w  # [n, M]
        out.append((cosw @ src_v) / cosw.sum(1, keepdim=True))
    return CubeMap(torch.cat(out).reshape(6, size + 2, size + 2, -1))


__all__ = [
    "CubeMap", "cube_directions", "direction_to_face", "texel_solid_angles", "sample_mips",
    "latlong_directions", "direction_to_latlong", "sample_latlong", "latlong_to_cubemap", "cubemap_to_latlong",
    "prefilter_ggx", "irradiance",
]
