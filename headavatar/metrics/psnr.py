"""Pixel metrics: MSE, MAE and PSNR, optionally restricted to a mask.

All functions take images as float tensors ``[B, C, H, W]`` (or ``[C, H, W]``) with
values in ``[0, max_val]`` and return one value per image, shape ``[B]``.

Masks weight pixels (soft masks allowed). Two denominators exist because the two
protocols we reproduce disagree:

* ``denominator="mask"``: mean over the masked pixels only (sum of mask x C).
* ``denominator="full"``: masked sum divided by all C*H*W values, as IMavatar's
  ``calculate_metrics.py`` does; the PSNR then reads higher than a masked mean would.

PSNR of identical images is ``+inf`` (no epsilon, so it never hides a real error);
an all-zero mask with ``denominator="mask"`` gives NaN for that image.
"""

from __future__ import annotations

import torch

from headavatar.errors import UserError

_DENOMINATORS = ("mask", "full")


def as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``x`` as a float ``[B, C, H, W]`` tensor or raise a UserError."""
    if not isinstance(x, torch.Tensor):
        raise UserError(f"{name} must be a torch.Tensor, got {type(x).__name__}; convert it with torch.as_tensor")
    if not x.is_floating_point():
        raise UserError(
            f"{name} has dtype {x.dtype}; metrics need float images in [0, 1] (e.g. img.float() / 255)"
        )
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise UserError(f"{name} has shape {tuple(x.shape)}; expected [B, C, H, W] or [C, H, W]")
    return x


def as_image_pair(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pred = as_batch(pred, "pred")
    gt = as_batch(gt, "gt")
    if pred.shape != gt.shape:
        raise UserError(
            f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ in shape; resize one to match the other"
        )
    if pred.device != gt.device:
        raise UserError(f"pred is on {pred.device} but gt is on {gt.device}; move both to one device")
    return pred, gt


def as_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``mask`` as a ``[B, 1, H, W]`` tensor of ``like``'s dtype.

    Accepts ``[H, W]``, ``[B, H, W]``, ``[1|B, 1, H, W]``; a bool or integer 0/1 mask is
    converted to float weights.
    """
    if not isinstance(mask, torch.Tensor):
        raise UserError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    b, _, h, w = like.shape
    m = mask
    if m.dim() == 2:
        m = m[None, None]
    elif m.dim() == 3:
        m = m[:, None]
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[-2:] != (h, w) or m.shape[0] not in (1, b):
        raise UserError(
            f"mask has shape {tuple(mask.shape)}; expected [H, W], [B, H, W] or [B, 1, H, W] "
            f"matching images of shape {tuple(like.shape)}"
        )
    return m.to(device=like.device, dtype=like.dtype).expand(b, 1, h, w)


def _reduce(err: torch.Tensor, mask: torch.Tensor | None, denominator: str) -> torch.Tensor:
    if denominator not in _DENOMINATORS:
        raise UserError(f"denominator must be one of {_DENOMINATORS}, got {denominator!r}")
    b, c = err.shape[:2]
    if mask is None:
        return err.reshape(b, -1).mean(1)
    m = as_mask(mask, err)
    total = (err * m).reshape(b, -1).sum(1)
    if denominator == "full":
        return total / err[0].numel()
    # Sum of weights times channels: the mean over the masked pixel values.
    return total / (m.reshape(b, -1).sum(1) * c)


def mse(
    pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None, *, denominator: str = "mask"
) -> torch.Tensor:
    """Mean squared error per image, ``[B]``."""
    pred, gt = as_image_pair(pred, gt)
    return _reduce((pred - gt).square(), mask, denominator)


def mae(
    pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None, *, denominator: str = "mask"
) -> torch.Tensor:
    """Mean absolute error per image, ``[B]``."""
    pred, gt = as_image_pair(pred, gt)
    return _reduce((pred - gt).abs(), mask, denominator)


def psnr_from_mse(err: torch.Tensor, max_val: float = 1.0) -> torch.Tensor:
    """``10 log10(max^2 / mse)``; ``+inf`` where ``mse == 0``."""
    return 10.0 * torch.log10(max_val**2 / err)


def psnr(
    pred: torch.Tensor,
    gt: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    max_val: float = 1.0,
    denominator: str = "mask",
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, ``[B]`` (``+inf`` for identical images)."""
    if not max_val > 0:
        raise UserError(f"max_val must be positive, got {max_val}")
    return psnr_from_mse(mse(pred, gt, mask, denominator=denominator), max_val)
