"""SSIM with a Gaussian window (Wang et al. 2004), our own separable-conv version.

Defaults follow the IMavatar protocol and ``pytorch-msssim``: 11x11 Gaussian window,
sigma 1.5, K1 = 0.01, K2 = 0.03, "valid" windows only (no padding, so the map is
``(H-10) x (W-10)``), computed per channel and averaged over channels and positions.
``padding="same"`` zero-pads instead (the 3DGS training-code convention), for
comparisons with papers that use it.

The result matches ``pytorch_msssim.ssim(..., data_range=1, size_average=False)`` and
a naive float64 sliding-window implementation (see tests/test_metrics.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headavatar.errors import UserError
from headavatar.metrics.psnr import as_image_pair


def gaussian_window(size: int = 11, sigma: float = 1.5, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps centred on the middle tap."""
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return (g / g.sum()).to(dtype)


def _blur(x: torch.Tensor, g: torch.Tensor, pad: int) -> torch.Tensor:
    """Depthwise separable Gaussian blur; ``pad`` zero pixels on each side."""
    c = x.shape[1]
    k = g.numel()
    # Two 1-D passes cost 2k instead of k^2 multiplies per pixel and give the same sums.
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), padding=(0, pad), groups=c)
    return F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), padding=(pad, 0), groups=c)


def ssim_map(
    pred: torch.Tensor,
    gt: torch.Tensor,
    *,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    padding: str = "valid",
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-pixel, per-channel SSIM map ``[B, C, H', W']``."""
    pred, gt = as_image_pair(pred, gt)
    if padding not in ("valid", "same"):
        raise UserError(f"padding must be 'valid' or 'same', got {padding!r}")
    if window_size < 1 or window_size % 2 == 0:
        raise UserError(f"window_size must be a positive odd number, got {window_size}")
    if not data_range > 0:
        raise UserError(f"data_range must be positive, got {data_range}")
    h, w = pred.shape[-2:]
    if padding == "valid" and (h < window_size or w < window_size):
        raise UserError(
            f"images of {h}x{w} are smaller than the {window_size}x{window_size} SSIM window; "
            "use larger images or padding='same'"
        )
    pad = window_size // 2 if padding == "same" else 0
    g = gaussian_window(window_size, sigma, dtype=pred.dtype, device=pred.device)

    # One batched blur of the five moments instead of five separate conv calls.
    b, c = pred.shape[:2]
    stacked = torch.cat([pred, gt, pred * pred, gt * gt, pred * gt], dim=1)
    mu_x, mu_y, e_xx, e_yy, e_xy = _blur(stacked, g, pad).split(c, dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x, var_y, cov = e_xx - mu_xx, e_yy - mu_yy, e_xy - mu_xy

    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    return ((2 * mu_xy + c1) * (2 * cov + c2)) / ((mu_xx + mu_yy + c1) * (var_x + var_y + c2))


def ssim(pred: torch.Tensor, gt: torch.Tensor, **options) -> torch.Tensor:
    """Mean SSIM per image, ``[B]`` (1 for identical images).

    ``options``: the keywords of :func:`ssim_map` (``data_range``, ``window_size``, ``sigma``,
    ``padding``, ``k1``, ``k2``), whose defaults are the only ones.
    """
    return ssim_map(pred, gt, **options).flatten(1).mean(1)
