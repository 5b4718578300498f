"""The ``gsplat`` backend: gsplat's CUDA rasteriser (1.5.x) behind ``render_gaussians``.

Each of our B frames becomes one gsplat batch element with a single camera
(gsplat's ``[..., C, ...]`` layout with ``... = B`` and ``C = 1``), rendered
with ``packed=False``, ``rasterize_mode="classic"`` and ``render_mode="RGB+ED"``
(expected depth = alpha-weighted depth / alpha), which is the contract that
the ``torch`` backend reproduces.  gsplat is imported on first use only, so
the package imports on machines without it.

Two details are adapted to the contract:
  * gsplat clamps a splat's alpha at 0.999, the contract at ``alpha_max``
    (0.99, as Inria's rasteriser).  For ``alpha_max < 0.999`` opacities are
    clamped at ``alpha_max`` on the way in, with a straight-through gradient
    so that saturated opacities keep learning; this is exact wherever the
    opacity is <= alpha_max and differs by at most a factor o/alpha_max in
    alpha near the centre of more opaque splats.  ``alpha_max=0.999`` is gsplat's
    own behaviour, unchanged (larger values act as 0.999).
  * gsplat 1.5 returns per-axis radii [..., 2] of an opacity-aware box; we
    return ceil(3 sqrt(largest eigenvalue)) of the 2D covariance (recovered
    from gsplat's conics) for rendered Gaussians and 0 for culled ones, as the
    torch backend does.
Computation is in float32 (gsplat's kernels); other float inputs are cast and
the outputs cast back.
"""

from __future__ import annotations

import torch

from headavatar.errors import UserError
from headavatar.render.gaussians import RenderOutput, register_backend
from headavatar.render.gaussians.torch_ref import ALPHA_MAX, EPS2D, FAR, NEAR, _check_inputs

# options of the torch backend that this one accepts and ignores
_FOREIGN_OPTIONS = frozenset({"max_pairs"})
# gsplat.rasterization options that may be passed through unchanged
_PASSTHROUGH = frozenset({"tile_size", "absgrad", "sparse_grad", "channel_chunk", "radius_clip"})
_GSPLAT_ALPHA_MAX = 0.999


def _import_gsplat():
    try:
        import gsplat
    except Exception as e:  # ImportError, or a broken CUDA toolchain at import
        raise UserError(f"the gsplat backend needs gsplat ({type(e).__name__}: {e}); "
                        "pip install gsplat, or use --backend torch") from e
    return gsplat


@register_backend("gsplat")
def render_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width: int, height: int,
                  sh_degree: int | None = None, backgrounds=None, near: float = NEAR, far: float = FAR,
                  eps2d: float = EPS2D, alpha_max: float = ALPHA_MAX, render_depth: bool = True, **kw) -> RenderOutput:
    """Render B frames with ``gsplat.rasterization``; same arguments as ``render_torch``."""
    unknown = set(kw) - _FOREIGN_OPTIONS - _PASSTHROUGH
    if unknown:
        raise TypeError(f"render_gsplat got unexpected options {sorted(unknown)}")
    if means.device.type != "cuda":
        raise UserError("the gsplat backend needs CUDA tensors; use --backend torch (or auto) on the CPU")
    width, height = int(width), int(height)
    opacities = _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds,
                              alpha_max)
    gsplat = _import_gsplat()

    out_dtype = means.dtype
    f32 = lambda t: None if t is None else t.to(torch.float32)  # noqa: E731
    opac = f32(opacities)
    if alpha_max < _GSPLAT_ALPHA_MAX:
        # value min(o, alpha_max), gradient 1: see the module docstring
        opac = opac - (opac - alpha_max).clamp_min(0).detach()
    bg = f32(backgrounds)
    render, alphas, meta = gsplat.rasterization(
        f32(means), f32(quats), f32(scales), opac, f32(colors),
        f32(viewmats)[:, None], f32(Ks)[:, None], width, height,
        near_plane=near, far_plane=far, eps2d=eps2d, sh_degree=sh_degree,
        packed=False, backgrounds=None if bg is None else bg[:, None],
        render_mode="RGB+ED" if render_depth else "RGB", rasterize_mode="classic",
        **{k: v for k, v in kw.items() if k in _PASSTHROUGH},
    )
    # [B, 1, H, W, D+1] and [B, 1, H, W, 1]: one camera per batch element
    # without render_depth the depth channel is absent and ``depth`` is None
    rgb, depth = (render[:, 0, ..., :-1], render[:, 0, ..., -1:]) if render_depth else (render[:, 0], None)
    radii_xy, conics = meta["radii"][:, 0], meta["conics"][:, 0]
    return RenderOutput(rgb=rgb.to(out_dtype), alpha=alphas[:, 0].to(out_dtype), depth=None if depth is None else depth.to(out_dtype),
                        radii=lambda: _contract_radii(radii_xy, conics))


def _contract_radii(radii_xy: torch.Tensor, conics: torch.Tensor) -> torch.Tensor:
    """[B,N,2] gsplat radii + [B,N,3] conics -> [B,N] int32 3-sigma radii (0 = culled)."""
    with torch.no_grad():
        visible = (radii_xy > 0).all(-1)
        A, Bc, C = conics.double().unbind(-1)  # inverse 2D covariance [[A, B], [B, C]]
        det = A * C - Bc * Bc
        det = torch.where(visible & (det > 0), det, torch.ones_like(det))  # culled rows hold garbage
        a, b, c = C / det, -Bc / det, A / det
        lam = 0.5 * (a + c) + torch.sqrt((0.5 * (a - c)) ** 2 + b * b)
        r = torch.ceil(3.0 * lam.clamp_min(0).sqrt())
        r = torch.where(visible & torch.isfinite(r), r, torch.zeros_like(r))
        return r.to(torch.int32)
