"""Evaluation protocols: how a rendered frame and its ground truth are compared.

Two protocols, each a fixed recipe so numbers are comparable across runs:

``"flashavatar"``
    GT composited on the training background with the head mask,
    ``gt' = gt * mask + bg * (1 - mask)`` (FlashAvatar's data loader; with ``mask =
    alpha * head_mask`` this equals its two-step matte-then-head compositing). The
    prediction is used as rendered, on the same background. Full-image PSNR (max 1),
    SSIM (Gaussian 11x11, sigma 1.5, valid), LPIPS-VGG and LPIPS-AlexNet. FlashAvatar
    released no metric code; this is our stated choice.

``"imavatar"``
    IMavatar's ``calculate_metrics.py`` as used by FLARE: prediction and GT both
    composited on white with the GT mask; the metric mask is the GT mask minus the
    ``exclude`` pixels (cloth, labels 15/16). MAE and PSNR use the masked error sum over
    all 3*H*W values (so they read better than a masked mean); SSIM is computed with
    everything outside the metric mask set to 0; LPIPS-AlexNet on images multiplied by
    the metric mask. Frames whose masked prediction sums to 0 are skipped, as there.
    IMavatar/FLARE evaluate at 512x512; resize before calling.

Predictions are clamped to [0, 1] first, as writing an 8-bit frame would.
"""

from __future__ import annotations

import math
import statistics
from contextlib import contextmanager
from typing import Any, ClassVar, Iterable, Iterator, Protocol, Sequence

import torch

from headavatar.errors import UserError
from headavatar.metrics.lpips import LPIPSCache
from headavatar.metrics.psnr import as_mask, psnr_from_mse
from headavatar.metrics.ssim import ssim
from headavatar.registry import Registry

_FLASHAVATAR_DEFAULT_BG = (0.0, 1.0, 0.0)  # FlashAvatar trains on green unless run with -w (white)


class MetricProtocol(Protocol):
    """One evaluation recipe, registered by name in ``METRIC_PROTOCOLS``.

    ``evaluate_frames`` validates and chunks the frames and calls ``compute`` per chunk on
    float frames clamped to [0, 1]; a protocol says only how a chunk is compared.
    """

    name: ClassVar[str]
    lpips_nets: ClassVar[tuple[str, ...]]  # the LPIPS networks it reports (lpips_<net> columns)

    def describe(self, background: Sequence[float] | torch.Tensor | None) -> str:
        """One line stored with every result: what was compared, how."""
        ...

    def check(self, background: Sequence[float] | torch.Tensor | None, exclude: torch.Tensor | None) -> None:
        """Raise UserError for arguments the protocol does not take (before any work)."""
        ...

    def compute(self, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, exclude: torch.Tensor | None,
                background: Sequence[float] | torch.Tensor | None, models: dict) -> dict[str, torch.Tensor]:
        """Per-frame metrics of one chunk ``[n, 3, H, W]`` (mask ``m`` and ``exclude`` ``[n, 1, H, W]``):
        name -> ``[n]``; an optional boolean ``skipped`` entry marks frames without a result."""
        ...


METRIC_PROTOCOLS: Registry[type[MetricProtocol]] = Registry("evaluation protocol", hint="eval --protocol")


def describe(protocol: str, background: Sequence[float] | None = None, lpips: bool = True) -> str:
    """One-line description of a protocol, stored with every result (``lpips=False``: as run without LPIPS)."""
    text = _describe(protocol, background)
    if not lpips:
        # name only what was computed: the LPIPS clause goes, and the omission is said
        text = text.replace(", LPIPS v0.1 vgg+alex", "").replace(", LPIPS v0.1 alex on mask-multiplied images", "")
        text += "; LPIPS not computed"
    return text


def _describe(protocol: str, background: Sequence[float] | None = None) -> str:
    return _protocol(protocol).describe(background)


def _protocol(name: str) -> MetricProtocol:
    if name not in METRIC_PROTOCOLS:
        raise UserError(f"unknown evaluation protocol {name!r}; use one of {', '.join(METRIC_PROTOCOLS.available())}")
    return METRIC_PROTOCOLS.get(name)()


def _as_frames(x: torch.Tensor, name: str) -> torch.Tensor:
    """Validate ``[N,3,H,W]`` frames, float in [0,1] or uint8 (scaled per chunk, not here,
    so a long uint8 sequence is never expanded to float all at once)."""
    if not isinstance(x, torch.Tensor):
        raise UserError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise UserError(f"{name} has dtype {x.dtype}; pass float images in [0, 1] or uint8")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != 3:
        raise UserError(f"{name} has shape {tuple(x.shape)}; expected RGB frames [N, 3, H, W]")
    return x


def _to_unit(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _as_weights(m: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(m, torch.Tensor):
        raise UserError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
    if m.dtype == torch.uint8 and int(m.max()) > 1:
        m = m.float() / 255.0  # 0/255 mask images
    m = as_mask(m, like)
    lo, hi = float(m.min()), float(m.max())
    if lo < 0 or hi > 1:
        raise UserError(f"{name} values lie in [{lo:.3g}, {hi:.3g}]; masks must be in [0, 1]")
    return m


@contextmanager
def _ieee_fp32() -> Iterator[None]:
    """Turn TF32 off for the duration (restored after).

    PyTorch lets cuDNN convolutions use TF32 by default; on an H100 that moves LPIPS by
    up to ~4e-5, visible at the 4 decimals papers report. Only evaluation does this; the
    LPIPS training loss runs under whatever the caller chose.
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.allow_tf32, matmul.allow_tf32 = False, False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def _frames_of(m: torch.Tensor, sl: slice, n: int) -> torch.Tensor:
    """The chunk ``sl`` of a per-frame mask; a single ``[H, W]`` mask serves every frame."""
    if isinstance(m, torch.Tensor) and m.dim() >= 3 and m.shape[0] == n:
        return m[sl]
    return m


def _check_range(x: torch.Tensor, name: str) -> None:
    # For images from outside (ground truth, a user's files): a range like [-1, 1] or [0, 255]
    # means the wrong scale.  headavatar's own renders are clamped to [0, 1] before they get
    # here (methods/evaluate.py), as writing an 8-bit frame would, so they never trip it.
    lo, hi = float(x.min()), float(x.max())
    if hi > 2.0 or lo < -0.05:
        raise UserError(
            f"{name} values lie in [{lo:.3g}, {hi:.3g}]; metrics expect images in [0, 1] "
            "(divide 8-bit images by 255; map [-1, 1] images with (x + 1) / 2; clamp a renderer's output to [0, 1] first)"
        )


def _background(background: Sequence[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    bg = torch.as_tensor(background, dtype=like.dtype, device=like.device)
    if bg.numel() == 3:
        return bg.view(1, 3, 1, 1)
    if bg.shape[-3:] == like.shape[-3:]:
        return bg.expand_as(like)
    raise UserError(f"background must be an RGB triple or a [3, H, W] image, got shape {tuple(bg.shape)}")


def evaluate_frames(
    pred: torch.Tensor,
    gt: torch.Tensor,
    mask: torch.Tensor,
    protocol: str,
    *,
    background: Sequence[float] | torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
    lpips_cache: LPIPSCache | None = None,
    frame_ids: Iterable[Any] | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    lpips: bool = True,
) -> list[dict[str, Any]]:
    """Per-frame metrics under ``protocol`` ("flashavatar" or "imavatar").

    pred, gt: ``[N, 3, H, W]`` (float in [0, 1] or uint8); mask: ``[N, H, W]`` or
    ``[N, 1, H, W]`` foreground weights (float/bool, or uint8 0/255). ``background``
    (flashavatar only, default green as FlashAvatar): RGB triple or ``[3, H, W]``.
    ``exclude`` (imavatar only): pixels removed from the metric mask, e.g. cloth.
    Pass an ``LPIPSCache`` to reuse loaded networks across calls. Work runs in chunks of
    ``batch_size`` frames on ``device`` (default: pred's device).

    ``lpips=False`` leaves the LPIPS columns out (no weights needed).

    Returns one dict per frame: ``frame``, ``protocol``, ``skipped`` and the metrics
    (flashavatar: psnr, ssim, lpips_vgg, lpips_alex; imavatar: mae, psnr, ssim,
    lpips_alex; all ``None`` for a skipped frame).
    """
    desc = describe(protocol, background, lpips=lpips)
    proto = _protocol(protocol)
    pred = _as_frames(pred, "pred")
    gt = _as_frames(gt, "gt")
    if pred.shape != gt.shape:
        raise UserError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ in shape; render at GT size")
    n = pred.shape[0]
    ids = list(range(n)) if frame_ids is None else list(frame_ids)
    if len(ids) != n:
        raise UserError(f"{len(ids)} frame ids given for {n} frames")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    proto.check(background, exclude)
    device = torch.device(device) if device is not None else pred.device
    cache = lpips_cache if lpips_cache is not None else LPIPSCache()
    nets = proto.lpips_nets if lpips else ()
    models = {net: cache.get(net, device) for net in nets}

    results: list[dict[str, Any]] = []
    with torch.no_grad(), _ieee_fp32():
        for start in range(0, n, batch_size):
            sl = slice(start, min(start + batch_size, n))
            p = _to_unit(pred[sl], device)
            g = _to_unit(gt[sl], device)
            _check_range(p, "pred")
            _check_range(g, "gt")
            p = p.clamp(0.0, 1.0)
            g = g.clamp(0.0, 1.0)
            m = _as_weights(_frames_of(mask, sl, n), g, "mask")
            ex = _as_weights(_frames_of(exclude, sl, n), g, "exclude") if exclude is not None else None
            metrics = proto.compute(p, g, m, ex, background, models)
            # One device->host copy per metric and chunk.
            host = {k: v.tolist() for k, v in metrics.items()}
            for j, frame in enumerate(ids[sl]):
                row: dict[str, Any] = {"frame": frame, "protocol": desc, "skipped": False}
                for key, values in host.items():
                    if key == "skipped":
                        row["skipped"] = bool(values[j])
                    else:
                        row[key] = float(values[j])
                if row["skipped"]:
                    row.update({k: None for k in metrics if k != "skipped"})
                results.append(row)
    return results


@METRIC_PROTOCOLS.register()
class FlashAvatarProtocol:
    name = "flashavatar"
    lpips_nets = ("vgg", "alex")

    def describe(self, background=None) -> str:
        bg_t = torch.as_tensor(background if background is not None else _FLASHAVATAR_DEFAULT_BG)
        bg = tuple(round(float(v), 6) for v in bg_t.flatten()) if bg_t.numel() == 3 else "per-pixel image"
        return (
            f"flashavatar: gt*mask + bg*(1-mask) with bg={bg}, prediction as rendered on bg; "
            "full-image PSNR(max 1), SSIM(gauss 11/1.5, valid), LPIPS v0.1 vgg+alex"
        )

    def check(self, background, exclude) -> None:
        if exclude is not None:
            raise UserError("exclude applies to the imavatar protocol only; fold it into mask for flashavatar")

    def compute(self, p, g, m, exclude, background, models) -> dict[str, torch.Tensor]:
        bg = _background(background if background is not None else _FLASHAVATAR_DEFAULT_BG, g)
        g = g * m + bg * (1.0 - m)
        err = (p - g).square().flatten(1).mean(1)
        return {
            "psnr": psnr_from_mse(err),
            "ssim": ssim(p, g),
            **{f"lpips_{net}": model(p, g) for net, model in models.items()},
        }


@METRIC_PROTOCOLS.register()
class IMavatarProtocol:
    name = "imavatar"
    lpips_nets = ("alex",)

    def describe(self, background=None) -> str:
        return (
            "imavatar: pred and gt on white with the GT mask, metric mask = mask minus excluded (cloth); "
            "MAE/PSNR over all 3HW values, SSIM(gauss 11/1.5, valid) outside-mask zeroed, "
            "LPIPS v0.1 alex on mask-multiplied images; frames with empty masked prediction skipped"
        )

    def check(self, background, exclude) -> None:
        if background is not None:
            bg_t = torch.as_tensor(background, dtype=torch.float64).flatten()
            if not bool((bg_t == 1).all()):
                raise UserError("the imavatar protocol always uses a white background; drop the background argument")

    def compute(self, p, g, m, exclude, background, models) -> dict[str, torch.Tensor]:
        # Composite with the full GT mask; the cloth-free mask only weights the metrics.
        p = p * m + (1.0 - m)
        g = g * m + (1.0 - m)
        mm = m if exclude is None else m * (1.0 - exclude)
        numel = p[0].numel()
        diff = p - g
        mae = (diff.abs() * mm).flatten(1).sum(1) / numel
        mse = (diff.square() * mm).flatten(1).sum(1) / numel
        inside = mm > 0
        ssim_v = ssim(p * inside, g * inside)
        skipped = (p * mm).flatten(1).sum(1) == 0
        out = {"mae": mae, "psnr": psnr_from_mse(mse), "ssim": ssim_v, "skipped": skipped}
        if "alex" in models:
            out["lpips_alex"] = models["alex"](p * mm, g * mm)
        return out


# the built-in names, in the order the docs list them (kept for callers that iterate them)
PROTOCOLS = ("flashavatar", "imavatar")


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and median of every metric over the non-skipped frames of one protocol.

    Returns ``{"protocol", "frames", "skipped", "mean": {...}, "median": {...}}``. A
    frame with PSNR ``inf`` (pixel-identical) makes the mean ``inf``; the median is
    robust to it.
    """
    if not results:
        raise UserError("no per-frame results to aggregate; evaluate at least one frame")
    protocols = {r.get("protocol") for r in results}
    if len(protocols) != 1:
        raise UserError(f"results mix {len(protocols)} protocols; aggregate each protocol separately")
    used = [r for r in results if not r.get("skipped")]
    keys = [k for k in results[0] if k not in ("frame", "protocol", "skipped")]
    mean: dict[str, float] = {}
    median: dict[str, float] = {}
    for k in keys:
        vals = [float(r[k]) for r in used]
        mean[k] = math.fsum(vals) / len(vals) if vals else float("nan")
        median[k] = statistics.median(vals) if vals else float("nan")
    return {
        "protocol": protocols.pop(),
        "frames": len(used),
        "skipped": len(results) - len(used),
        "mean": mean,
        "median": median,
    }
