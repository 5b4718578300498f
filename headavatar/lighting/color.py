"""sRGB encoding, the one copy for the whole package (IEC 61966-2-1 transfer function).

Images on disk and on screen are sRGB-encoded; shading, light and albedo
maps are linear.  Values outside [0, 1] are the caller's to clamp.
"""

from __future__ import annotations

import torch


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    """sRGB-encoded values -> linear."""
    return torch.where(x <= 0.04045, x / 12.92, ((x.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    """Linear values -> sRGB-encoded."""
    return torch.where(x <= 0.0031308, x * 12.92, 1.055 * x.clamp_min(0.0031308) ** (1 / 2.4) - 0.055)


__all__ = ["srgb_to_linear", "linear_to_srgb"]
