"""Lighting: HDR environment maps (.hdr, .exr), cube maps, GGX prefiltering and the split-sum BSDF table.

Used by FLARE's relighting and by the synthetic subject's ground-truth
renders under new light (see docs/RELIGHTING.md).
"""

from headavatar.lighting.brdf import lut_lookup, split_sum_lut
from headavatar.lighting.color import linear_to_srgb, srgb_to_linear
from headavatar.lighting.cubemap import CubeMap, latlong_to_cubemap
from headavatar.lighting.envmap import EnvironmentLight, load_envmap, load_light, procedural_sky
from headavatar.lighting.hdr_io import read_hdr_image, write_hdr_image

__all__ = [
    "EnvironmentLight", "load_envmap", "load_light", "procedural_sky", "linear_to_srgb", "srgb_to_linear", "CubeMap", "latlong_to_cubemap",
    "split_sum_lut", "lut_lookup", "read_hdr_image", "write_hdr_image",
]
