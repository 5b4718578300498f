"""Environment lighting: HDR maps -> cube map -> GGX-prefiltered mips + diffuse irradiance.

``EnvironmentLight`` is the split-sum light of FLARE's relighting (and of
nvdiffrec): the radiance is box-filtered into a mip chain, each level
prefiltered with the GGX lobe of one roughness (linear from ``rough_min`` to
``rough_max`` over all levels but the last, which gets roughness 1), and the
diffuse light is the cosine convolution of a small level.  Shading then reads

    diffuse  D = irradiance(n) / pi    (a white map of radiance 1 gives D = 1)
    specular S = prefiltered(reflect(-v, n), roughness)

so a surface of albedo kd, specular intensity ko and Fresnel F0 shows
``kd * D + ko * S * (F0 * A + B)`` with (A, B) from the split-sum table
(headavatar.lighting.brdf).

Lookups are plain functions of world directions; the map can be turned about
the vertical axis (``rotated``) without refiltering.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from headavatar.errors import UserError
from headavatar.lighting.cubemap import CubeMap, irradiance, latlong_directions, latlong_to_cubemap, prefilter_ggx, sample_mips
from headavatar.lighting.hdr_io import read_hdr_image

TONEMAPS = ("reinhard", "none")


def preprocess_radiance(img: torch.Tensor, tonemap: str = "reinhard", scale: float = 2.0, exposure: float = 0.0) -> torch.Tensor:
    """The reference's map preparation: Reinhard x/(1+x) then x``scale`` (2.0); ``exposure`` in stops first.

    ``tonemap="none"`` keeps the HDR values (times ``scale``): physically
    consistent, but a strong sun then dominates everything.
    """
    if tonemap not in TONEMAPS:
        raise UserError(f"unknown environment tone map '{tonemap}'; choose {' or '.join(TONEMAPS)}")
    x = img * (2.0**exposure)
    if tonemap == "reinhard":
        x = x / (1 + x)
    return x * scale


def load_envmap(path: str | os.PathLike, tonemap: str = "reinhard", scale: float = 2.0, exposure: float = 0.0) -> torch.Tensor:
    """Read a lat-long (equirectangular) .hdr/.exr map -> float32 [H,W,3] linear radiance, prepared."""
    img = read_hdr_image(path)
    H, W = img.shape[:2]
    if abs(W - 2 * H) > 2:
        raise UserError(f"{path}: {W}x{H} is not a lat-long (equirectangular) map; its width must be twice its height")
    return preprocess_radiance(torch.from_numpy(img), tonemap, scale, exposure)


def rotation_y(degrees: float, dtype=torch.float32, device=None) -> torch.Tensor:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=dtype, device=device)


def level_roughness(levels: int, rough_min: float = 0.08, rough_max: float = 0.5) -> list[float]:
    """Roughness of each specular mip: linear rough_min..rough_max over levels 0..L-2, 1.0 for the last."""
    if levels < 2:
        return [rough_max]
    inner = [rough_min + (rough_max - rough_min) * k / max(1, levels - 2) for k in range(levels - 1)]
    return inner + [1.0]


@dataclass
class EnvironmentLight:
    """Prefiltered environment light.  Build with ``from_latlong`` or ``from_file``."""

    specular_mips: list[CubeMap]
    roughness: list[float]
    diffuse_map: CubeMap
    radiance: CubeMap  # level 0, unfiltered: the visible background
    rough_min: float = 0.08
    rough_max: float = 0.5
    rotation: torch.Tensor = field(default_factory=lambda: torch.eye(3))  # world -> map directions

    # ------------------------------------------------------------ building
    @classmethod
    def from_latlong(
        cls,
        img: torch.Tensor,
        size: int = 256,
        min_size: int = 16,
        diffuse_size: int = 16,
        samples: int = 64,
        rough_min: float = 0.08,
        rough_max: float = 0.5,
        device=None,
    ) -> "EnvironmentLight":
        """img [H,W,3] lat-long radiance -> prefiltered light with faces of ``size`` down to ``min_size``."""
        if size < 4 or size & (size - 1):
            raise UserError(f"environment cube size must be a power of two >= 4 (got {size})")
        if min_size > size or min_size < 1 or min_size & (min_size - 1):
            raise UserError(f"environment min_size must be a power of two <= size (got {min_size})")
        img = torch.as_tensor(img, dtype=torch.float32, device=device)
        base = latlong_to_cubemap(img, size)
        chain = [base]
        while chain[-1].size > 1:
            chain.append(chain[-1].downsample())
        n_spec = int(round(math.log2(size // min_size))) + 1
        rough = level_roughness(n_spec, rough_min, rough_max)
        spec = []
        for k, r in enumerate(rough):
            # sharp lobes cover few texels: fewer samples suffice (cost is dominated by the big levels)
            n = max(8, int(round(samples * min(1.0, 2 * r))))
            spec.append(prefilter_ggx(chain, size >> k, r, samples=n))
        src = next(c for c in chain if c.size <= max(diffuse_size, 1))
        diffuse = irradiance(src, diffuse_size)
        return cls(spec, rough, diffuse, base, rough_min, rough_max, torch.eye(3, device=img.device))

    @classmethod
    def from_file(cls, path, tonemap: str = "reinhard", scale: float = 2.0, exposure: float = 0.0, **kw) -> "EnvironmentLight":
        return cls.from_latlong(load_envmap(path, tonemap, scale, exposure), **kw)

    @classmethod
    def constant(cls, value=(1.0, 1.0, 1.0), size: int = 8, device=None) -> "EnvironmentLight":
        """A uniform environment (every lookup returns ``value``): e.g. for albedo-only renders."""
        v = torch.as_tensor(value, dtype=torch.float32, device=device).view(1, 1, 3)
        img = v.expand(max(2, size), 2 * max(2, size), 3).contiguous()
        return cls.from_latlong(img, size=size, min_size=min(4, size), diffuse_size=4, samples=8, device=device)

    # ------------------------------------------------------------ lookups
    @property
    def device(self) -> torch.device:
        return self.radiance.data.device

    def to(self, device) -> "EnvironmentLight":
        return EnvironmentLight([m.to(device) for m in self.specular_mips], list(self.roughness), self.diffuse_map.to(device),
                                self.radiance.to(device), self.rough_min, self.rough_max, self.rotation.to(device))

    def rotated(self, degrees: float) -> "EnvironmentLight":
        """The same light turned by ``degrees`` about +y (world up)."""
        R = rotation_y(-degrees, device=self.device) @ self.rotation
        return EnvironmentLight(self.specular_mips, self.roughness, self.diffuse_map, self.radiance, self.rough_min, self.rough_max, R)

    def _map_dirs(self, d: torch.Tensor) -> torch.Tensor:
        return d @ self.rotation.to(d).t()

    def diffuse(self, n: torch.Tensor) -> torch.Tensor:
        """Cosine-weighted mean radiance about normals n [...,3] (irradiance / pi)."""
        return self.diffuse_map.sample(self._map_dirs(n))

    def mip_level(self, roughness: torch.Tensor) -> torch.Tensor:
        """Fractional specular mip for a roughness (the reference's piecewise-linear map)."""
        L = len(self.specular_mips)
        if L == 1:
            return torch.zeros_like(roughness)
        lo = (roughness.clamp(self.rough_min, self.rough_max) - self.rough_min) / (self.rough_max - self.rough_min) * (L - 2)
        hi = (roughness.clamp(self.rough_max, 1.0) - self.rough_max) / (1.0 - self.rough_max) + (L - 2)
        return torch.where(roughness < self.rough_max, lo, hi)

    def specular(self, r: torch.Tensor, roughness: torch.Tensor) -> torch.Tensor:
        """Prefiltered radiance along reflection directions r [...,3] for roughness [...] (or [...,1])."""
        if roughness.dim() == r.dim():
            roughness = roughness[..., 0]
        return sample_mips(self.specular_mips, self._map_dirs(r), self.mip_level(roughness))

    def background(self, d: torch.Tensor) -> torch.Tensor:
        """Unfiltered radiance seen along view rays d [...,3]."""
        return self.radiance.sample(self._map_dirs(d))


# ------------------------------------------------------------------ for other renderers
class EnvMapLighting:
    """An ``EnvironmentLight`` behind the lighting interface of headavatar.subjects.synthetic
    (``frame``, ``diffuse(n)``, ``specular(n, v, roughness)``), with split-sum specular.

    This is how the synthetic subject is rendered under a new environment
    map with its known albedo, roughness and specular maps, as the ground
    truth of relighting: outgoing radiance = albedo * D(n) + ko * S(r) (F0 A + B).
    """

    def __init__(self, light: EnvironmentLight, frame: str = "world", f0: float = 0.04, lut: torch.Tensor | None = None):
        from headavatar.lighting.brdf import split_sum_lut

        if frame not in ("world", "head"):
            raise UserError(f"lighting frame must be 'head' or 'world', not {frame!r}")
        self.light, self.frame, self.f0 = light, frame, float(f0)
        self.lut = split_sum_lut() if lut is None else lut

    def diffuse(self, n: torch.Tensor) -> torch.Tensor:
        return self.light.to(n.device).diffuse(n) if self.light.device != n.device else self.light.diffuse(n)

    def specular(self, n: torch.Tensor, v: torch.Tensor, roughness: torch.Tensor) -> torch.Tensor:
        from headavatar.lighting.brdf import lut_lookup

        light = self.light if self.light.device == n.device else self.light.to(n.device)
        nv = (n * v).sum(-1, keepdim=True)
        r = 2 * nv * n - v
        ab = lut_lookup(self.lut.to(n.device), nv[..., 0].clamp(1e-4, 1), roughness[..., 0])
        return light.specular(r, roughness) * (self.f0 * ab[..., 0:1] + ab[..., 1:2])


# ------------------------------------------------------------------ procedural sky
def procedural_sky(
    height: int = 128,
    sun_elevation: float = 35.0,
    sun_azimuth: float = 40.0,
    sun_radiance: float = 2000.0,
    sun_radius: float = 3.0,
    zenith=(0.22, 0.42, 0.95),
    horizon=(0.85, 0.88, 0.95),
    ground=(0.32, 0.28, 0.23),
    sky_intensity: float = 1.0,
) -> np.ndarray:
    """A built-in HDR sky (lat-long float32 [height, 2*height, 3]): sun disc + glow, sky gradient, ground.

    Angles in degrees; azimuth 0 is +z (in front of the face), positive
    towards +x (the subject's left).  The sun's default angular radius (3
    degrees, about six times the real one) keeps it a few texels wide on small
    maps, so box filtering cannot miss it.  Its default radiance puts about
    three quarters of the horizontal irradiance in the sun.
    """
    d = latlong_directions(height, 2 * height, dtype=torch.float64)
    el, az = math.radians(sun_elevation), math.radians(sun_azimuth)
    sun = torch.tensor([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)], dtype=torch.float64)
    y = d[..., 1]
    t = y.clamp(0, 1) ** 0.5
    zen, hor, gnd = (torch.tensor(c, dtype=torch.float64) for c in (zenith, horizon, ground))
    sky = hor * (1 - t[..., None]) + zen * t[..., None]
    # the ground seen from above: dimmer towards the nadir, blended over one degree at the horizon
    g = gnd * (0.6 + 0.4 * (1 + y.clamp(-1, 0))[..., None])
    w = torch.sigmoid(y / math.radians(1.0))[..., None]
    rad = (sky * w + g * (1 - w)) * sky_intensity
    cosang = (d @ sun).clamp(-1, 1)
    ang = torch.acos(cosang)
    r = math.radians(sun_radius)
    disc = torch.sigmoid((r - ang) / (0.15 * r))  # soft edge: no aliasing when resampled
    glow = 0.5 * torch.exp(-ang / math.radians(12.0)) + 0.15 * torch.exp(-ang / math.radians(40.0))
    above = torch.sigmoid(y / math.radians(1.0))
    rad = rad + (sun_radiance * disc + glow * sky_intensity * 4.0)[..., None] * torch.tensor([1.0, 0.95, 0.85], dtype=torch.float64) * above[..., None]
    return rad.float().numpy()


def load_light(envmap, size: int = 256, tonemap: str = "reinhard", scale: float = 2.0, exposure: float = 0.0, rotation: float = 0.0,
               device="cpu") -> EnvironmentLight:
    """EnvironmentLight from a .hdr/.exr path, or "sky" for the built-in procedural sky; ``rotation`` in degrees about +y."""
    if str(envmap) == "sky":
        img = preprocess_radiance(torch.from_numpy(procedural_sky(max(64, size))), tonemap, scale, exposure)
        light = EnvironmentLight.from_latlong(img, size=size, min_size=min(16, size), device=device)
    else:
        light = EnvironmentLight.from_file(envmap, tonemap=tonemap, scale=scale, exposure=exposure, size=size, min_size=min(16, size), device=device)
    return light.rotated(rotation) if rotation else light


__all__ = ["EnvironmentLight", "EnvMapLighting", "load_envmap", "load_light", "preprocess_radiance", "procedural_sky", "rotation_y", "level_roughness",
           "TONEMAPS"]

