"""Pure-PyTorch 3D Gaussian splatting (the ``torch`` backend; CPU and CUDA, autograd).

Semantics follow gsplat 1.5.3's ``rasterization(..., packed=False,
rasterize_mode="classic")`` so that the two backends can be checked against
each other (see the package docstring for the shared contract):

* projection: EWA with gsplat's Jacobian, whose x/z and y/z are clamped to
  1.3x the image's field of view (far off-screen Gaussians do not explode);
  ``eps2d`` px^2 added to the 2D covariance; the pixel skew K[0,1] is ignored
  (as gsplat's CUDA kernel does);
* culling (radii = 0, no contribution): depth outside [near, far], opacity
  < 1/255, or an opacity-aware bounding box (gsplat's) that misses the image;
* a (Gaussian, pixel) pair contributes where alpha = min(alpha_max, o*exp(-s))
  >= 1/255, pixels visited front to back by camera depth of the centres;
* early stop: as gsplat and the Inria rasteriser do, a pixel stops at the first
  contribution that would bring its transmittance to <= 1e-4; that one and all
  behind it are dropped (the background then gets the transmittance before
  it).  Only nearly opaque pixels change, by at most the transmittance at the
  stop (< 1e-4 / (1 - alpha_max)), but it keeps the two backends equal and
  lets hidden pairs be skipped;
* ``alpha_max``: 0.99 by default (the contract; Inria / FlashAvatar).  gsplat
  hard-codes 0.999: pass ``alpha_max=0.999`` to reproduce gsplat exactly.
  Both agree whenever opacities are <= 0.99.
* ``radii``: ceil(3 sqrt(largest eigenvalue of the 2D covariance)) for rendered
  Gaussians, 0 for culled ones (gsplat 1.5 itself returns an x/y pair).

How it is fast on a CPU: per-Gaussian work is ordinary autograd; the per-pixel
part is one custom autograd Function.  Each Gaussian's alpha >= 1/255 ellipse
is cut into one pixel span per image row; spans are expanded into (Gaussian,
pixel) pairs with ``repeat_interleave`` (no Python loop over Gaussians),
already in depth order, so one stable integer sort by pixel makes every
pixel's list contiguous and front to back.  Transmittance is a prefix sum of
log(1 - alpha) restarted at each pixel (float64), colours are scattered with
``index_add_``.  Gaussians go through in depth layers of at most ``max_pairs``
pairs, which bounds memory; the transmittance carries over between layers
and spans that lie only on pixels that have already stopped are never
expanded, which skips most hidden pairs of a dense head.  The backward pass
takes the saved (span, pixel, transmittance, o*exp(-sigma)) of the pairs
that contributed, gets the suffix sums of front-to-back compositing from
prefix sums (layers back to front), and reduces per span before per Gaussian.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from headavatar.render.gaussians import RenderOutput, register_backend
from headavatar.render.gaussians.sh import camera_centres, eval_sh
from headavatar.utils.rotations import quaternion_to_matrix

# the contract every backend shares (module docstring of render/gaussians): their defaults
NEAR, FAR = 0.01, 1e10  # Gaussians with camera depth outside [NEAR, FAR] are culled
EPS2D = 0.3  # px^2 low-pass added to the 2D covariance (3DGS)
ALPHA_MAX = 0.99  # per-Gaussian alpha cap (Inria / FlashAvatar)
ALPHA_THRESHOLD = 1.0 / 255.0
T_MIN = 1e-4  # compositing stops once transmittance would reach this (gsplat, Inria)
_LOG_T_MIN = math.log(T_MIN)
# depth layers hold about this many pairs per image pixel; between layers, spans on pixels
# that have stopped are skipped (a speed knob only: results do not depend on it)
_LAYER_PAIRS_PER_PIXEL = 8
_EXTEND_MAX = 3.33  # gsplat's cap on the bounding box, in standard deviations
_SPAN_MARGIN = 1e-3  # px; enlarge enumerated spans a little, the exact alpha test trims them

# options of other backends that this one accepts and ignores, so that callers of
# render_gaussians(backend="auto") can pass them unconditionally
# render_depth=False lets a fast backend skip the depth channel; this one always has it (it is cheap here)
_FOREIGN_OPTIONS = frozenset({"render_depth", "tile_size", "packed", "absgrad", "sparse_grad", "rasterize_mode", "channel_chunk"})


def ewa_projection(x, y, z, K, Wv, quats, scales, W: int, H: int, eps2d: float):
    """EWA splatting of G Gaussians: camera-space centres x, y, z [G], intrinsics K [G,3,3], view
    rotations Wv [G,3,3], quats [G,4], scales [G,3] -> the 2D covariance (a, bb, c) with the
    low-pass ``eps2d`` added, its determinant and the pixel centres (mx, my), each [G].
    Shared by this reference and the triton backend's PyTorch projection (same operations)."""
    fx, fy, cx, cy = K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2]
    # gsplat clamps the Jacobian's x/z, y/z to 1.3x the field of view
    lim_x_pos = (W - cx) / fx + 0.15 * W / fx
    lim_x_neg = cx / fx + 0.15 * W / fx
    lim_y_pos = (H - cy) / fy + 0.15 * H / fy
    lim_y_neg = cy / fy + 0.15 * H / fy
    rz = 1.0 / z
    tx = z * torch.clamp(x * rz, min=-lim_x_neg, max=lim_x_pos)
    ty = z * torch.clamp(y * rz, min=-lim_y_neg, max=lim_y_pos)
    # rows of J @ R_view: the 2x3 map from world offsets to pixel offsets
    T0 = (fx * rz)[:, None] * Wv[:, 0] - (fx * tx * rz * rz)[:, None] * Wv[:, 2]
    T1 = (fy * rz)[:, None] * Wv[:, 1] - (fy * ty * rz * rz)[:, None] * Wv[:, 2]
    M = quaternion_to_matrix(quats) * scales[:, None, :]
    # U = J R_view R_g S, the 2D covariance is U U^T (batched matmuls beat broadcasting here)
    U = torch.bmm(torch.stack([T0, T1], 1), M)
    cov = torch.bmm(U, U.transpose(1, 2))
    a = cov[:, 0, 0] + eps2d
    bb = cov[:, 0, 1]
    c = cov[:, 1, 1] + eps2d
    det = a * c - bb * bb
    mx = fx * x * rz + cx
    my = fy * y * rz + cy
    return a, bb, c, det, mx, my


def screen_box(ok, o, a, bb, c, mx, my, W: int, H: int):
    """The pixel box of each projected Gaussian and what survives it: (ok & a non-empty box inside
    the image, half-widths rx, ry, the 2D covariance's largest eigenvalue lam).  The box is gsplat's
    opacity-aware one: it bounds exactly the alpha >= 1/255 ellipse.  No gradients."""
    extend = torch.sqrt(2.0 * torch.log(o.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)).clamp_max(_EXTEND_MAX)
    rx = torch.ceil(extend * a.clamp_min(0).sqrt())
    ry = torch.ceil(extend * c.clamp_min(0).sqrt())
    ok = ok & ((rx > 0) | (ry > 0))
    ok = ok & ((mx + rx > 0) & (mx - rx < W) & (my + ry > 0) & (my - ry < H))
    lam = 0.5 * (a + c) + torch.sqrt((0.5 * (a - c)) ** 2 + bb * bb)
    return ok, rx, ry, lam


@register_backend("torch")
def render_torch(means, quats, scales, opacities, colors, viewmats, Ks, width: int, height: int,
                 sh_degree: int | None = None, backgrounds=None, near: float = NEAR, far: float = FAR,
                 eps2d: float = EPS2D, alpha_max: float = ALPHA_MAX, max_pairs: int = 1 << 21, **kw) -> RenderOutput:
    """Render B frames of Gaussians; see the module and package docstrings.

    ``alpha_max`` is the per-splat alpha clamp (0.999 reproduces gsplat exactly).
    ``max_pairs`` bounds the (Gaussian, pixel) pairs expanded at once (about
    100 bytes each at the peak); results do not depend on it.  Pairs that
    contribute are kept for the backward pass (24 bytes each).
    """
    unknown = set(kw) - _FOREIGN_OPTIONS
    if unknown:
        raise TypeError(f"render_torch got unexpected options {sorted(unknown)}")
    width, height = int(width), int(height)
    opacities = _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds,
                              alpha_max)
    B, N = means.shape[:2]

    proj = _project(means, quats, scales, opacities, viewmats, Ks, width, height, near, far, eps2d)
    keep = proj["keep"]  # visible candidates, front to back
    cols = _candidate_colors(means, colors, viewmats, sh_degree, proj["cand"], N)  # [Gc, D]
    D = cols.shape[1]
    # depth rides along as one more channel
    feats = torch.cat([cols, proj["depth"][:, None]], 1).index_select(0, keep).t().contiguous()
    params = torch.stack([proj[k].index_select(0, keep) for k in ("mx", "my", "A", "B", "C", "opacity")], 0)
    idx = keep if proj["cand"] is None else proj["cand"].index_select(0, keep)
    img = torch.div(idx, N, rounding_mode="floor")

    # the Function saves its pair lists only when a backward pass can follow
    save = torch.is_grad_enabled() and (params.requires_grad or feats.requires_grad)
    out = _Composite.apply(params, feats, img, width, height, B, float(alpha_max), int(max_pairs), save)
    out = out.view(D + 2, B, height, width).permute(1, 2, 3, 0)
    alpha = out[..., D + 1:]
    rgb = out[..., :D]
    if backgrounds is not None:
        rgb = rgb + (1.0 - alpha) * backgrounds[:, None, None, :].to(rgb.dtype)
    depth = out[..., D:D + 1] / alpha.clamp_min(1e-10)
    return RenderOutput(rgb=rgb.contiguous(), alpha=alpha.contiguous(), depth=depth.contiguous(),
                        radii=proj["radii"].view(B, N))


# ----------------------------------------------------------------------------- inputs


def _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds,
                  alpha_max=ALPHA_MAX):
    """Shape checks (these are programming errors, hence ValueError); returns opacities as [B,N]."""
    if not 0.0 < alpha_max < 1.0:
        raise ValueError(f"alpha_max must be in (0, 1), got {alpha_max}")
    if means.dim() != 3 or means.shape[-1] != 3:
        raise ValueError(f"means must be [B,N,3], got {tuple(means.shape)}")
    B, N = means.shape[:2]
    if opacities.dim() == 3 and opacities.shape[-1] == 1:
        opacities = opacities[..., 0]
    expect = {"quats": (quats, (B, N, 4)), "scales": (scales, (B, N, 3)), "opacities": (opacities, (B, N)),
              "viewmats": (viewmats, (B, 4, 4)), "Ks": (Ks, (B, 3, 3))}
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)} for means {list(means.shape)}, got {list(t.shape)}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if sh_degree is None:
        if colors.dim() != 3 or tuple(colors.shape[:2]) != (B, N):
            raise ValueError(f"colors must be [B,N,D] without sh_degree, got {tuple(colors.shape)}")
    else:
        if colors.dim() != 4 or tuple(colors.shape[:2]) != (B, N) or colors.shape[-1] != 3:
            raise ValueError(f"colors must be [B,N,K,3] SH coefficients with sh_degree, got {tuple(colors.shape)}")
        if not 0 <= sh_degree <= 3 or (sh_degree + 1) ** 2 > colors.shape[2]:
            raise ValueError(f"sh_degree {sh_degree} needs 0..3 and (sh_degree+1)^2 <= K={colors.shape[2]}")
    if backgrounds is not None:
        D = 3 if sh_degree is not None else colors.shape[-1]
        if tuple(backgrounds.shape) != (B, D):
            raise ValueError(f"backgrounds must be [B,{D}], got {tuple(backgrounds.shape)}")
    return opacities


# ----------------------------------------------------------------------------- per Gaussian


def _take(t, idx):
    """Rows ``idx`` of ``t``; all of them when ``idx`` is None (skips a copy)."""
    return t if idx is None else t.index_select(0, idx)


def _project(means, quats, scales, opacities, viewmats, Ks, W, H, near, far, eps2d):
    """EWA projection and culling of the Gaussians in front of the camera ("candidates").

    Returns per-candidate tensors, ``cand`` (flat indices into B*N, or None for
    all), ``keep`` (candidates that are rendered, sorted by depth) and radii [B*N].
    """
    B, N = means.shape[:2]
    Rw = viewmats[:, :3, :3]
    mean_c = (means @ Rw.transpose(1, 2) + viewmats[:, None, :3, 3]).reshape(B * N, 3)
    # select Gaussians in front first so that nothing below divides by a bad depth
    with torch.no_grad():
        z_all = mean_c[:, 2]
        front = (z_all >= near) & (z_all <= far)
        cand = None if bool(front.all()) else torch.nonzero(front).squeeze(1)
        b = torch.div(torch.arange(B * N, device=means.device) if cand is None else cand, N, rounding_mode="floor")
    x, y, z = _take(mean_c, cand).unbind(-1)
    a, bb, c, det, mx, my = ewa_projection(x, y, z, Ks.index_select(0, b), Rw.index_select(0, b), _take(quats.reshape(-1, 4), cand),
                                           _take(scales.reshape(-1, 3), cand), W, H, eps2d)
    o = _take(opacities.reshape(-1), cand)

    with torch.no_grad():
        ok, rx, ry, lam = screen_box((det > 0) & (o >= ALPHA_THRESHOLD), o, a, bb, c, mx, my, W, H)
        r3 = torch.where(ok, torch.ceil(3.0 * lam.sqrt()), torch.zeros_like(lam)).to(torch.int32)
        radii = r3 if cand is None else torch.zeros(B * N, dtype=torch.int32, device=means.device).index_copy_(0, cand, r3)
        keep = torch.nonzero(ok).squeeze(1)
        keep = keep.index_select(0, torch.argsort(z.detach().index_select(0, keep), stable=True))

    inv = 1.0 / det
    return {"cand": cand, "keep": keep, "radii": radii, "mx": mx, "my": my,
            "A": c * inv, "B": -bb * inv, "C": a * inv, "opacity": o, "depth": z}


def _candidate_colors(means, colors, viewmats, sh_degree, cand, N):
    """[Gc, D] colours of the candidates ``cand`` (flat indices into B*N, None for all)."""
    if sh_degree is None:
        return _take(colors.reshape(-1, colors.shape[-1]), cand)
    dirs = means - camera_centres(viewmats)[:, None, :]
    k = (sh_degree + 1) ** 2
    coeffs = colors if colors.shape[2] == k else colors[:, :, :k]
    dirs, coeffs = _take(dirs.reshape(-1, 3), cand), _take(coeffs.reshape(-1, k, 3), cand)
    return torch.clamp_min(eval_sh(sh_degree, coeffs, dirs) + 0.5, 0.0)


# ----------------------------------------------------------------------------- pairs


class _Spans(NamedTuple):
    """Per (Gaussian, image row) pixel spans covering the alpha >= 1/255 ellipse.

    In Gaussian order, i.e. front to back.  With ``dx = mx - px`` for the span's
    pixels ``px = first column + l + 0.5``, the Gaussian's exponent on this row
    is ``sigma = quad*dx^2 + lin*dx + 0.5*C*dy^2``, so
    ``o*exp(-sigma) = exp(const - (quad*dx + lin)*dx)``.
    """

    gauss: torch.Tensor  # Gaussian index
    first: torch.Tensor  # global pixel index (img*H + j)*W + i of the first pixel
    count: torch.Tensor  # number of pixels
    cx: torch.Tensor  # dx of the first pixel
    dy: torch.Tensor  # my - (j + 0.5)
    quad: torch.Tensor  # 0.5*A
    lin: torch.Tensor  # B*dy
    const: torch.Tensor  # log(o) - 0.5*C*dy^2


def _row_spans(params, img, W, H, layer_pairs):
    """All non-empty spans, and [start, end) ranges of consecutive spans ("depth
    layers") holding about ``layer_pairs`` pairs each."""
    mx, my, A, Bc, C, o = params.detach()
    dev = params.device
    thr = torch.log(o / ALPHA_THRESHOLD).clamp_min(0)  # alpha >= 1/255  <=>  sigma <= thr
    detc = (A * C - Bc * Bc).clamp_min(1e-30)
    hy = torch.sqrt(2.0 * thr * A / detc) + _SPAN_MARGIN  # A / det(conic) = covariance yy
    j0 = torch.ceil(my - hy - 0.5).clamp(0, H)
    j1 = torch.floor(my + hy - 0.5).clamp(-1, H - 1)
    nrows = (j1 - j0 + 1).clamp_min(0).long()
    R = int(nrows.sum())
    gauss = torch.repeat_interleave(nrows, output_size=R)
    first_row = torch.cumsum(nrows, 0) - nrows
    j = j0.long().index_select(0, gauss) + (torch.arange(R, device=dev) - first_row.index_select(0, gauss))
    dy = my.index_select(0, gauss) - (j.to(my.dtype) + 0.5)
    Ag, Bg, Cg = A.index_select(0, gauss), Bc.index_select(0, gauss), C.index_select(0, gauss)
    # sigma <= thr is a quadratic inequality in dx = mx - px on this row
    disc = Bg * Bg * dy * dy - Ag * (Cg * dy * dy - 2.0 * thr.index_select(0, gauss))
    half = torch.sqrt(disc.clamp_min(0)) / Ag
    centre = mx.index_select(0, gauss) + Bg * dy / Ag  # the px where sigma is smallest on this row
    i0 = torch.ceil(centre - half - 0.5 - _SPAN_MARGIN).clamp(0, W)
    i1 = torch.floor(centre + half - 0.5 + _SPAN_MARGIN).clamp(-1, W - 1)
    count = torch.where(disc >= 0, i1 - i0 + 1, torch.zeros_like(i0)).clamp_min(0).long()
    nz = torch.nonzero(count).squeeze(1)  # increasing: the spans stay in depth order
    pick = lambda t: t.index_select(0, nz)  # noqa: E731
    gauss, j, dy, i0, count, Ag, Bg, Cg = (pick(t) for t in (gauss, j, dy, i0, count, Ag, Bg, Cg))
    spans = _Spans(
        gauss=gauss, first=(img.index_select(0, gauss) * H + j) * W + i0.long(), count=count,
        cx=mx.index_select(0, gauss) - i0 - 0.5, dy=dy, quad=0.5 * Ag, lin=Bg * dy,
        const=torch.log(o).index_select(0, gauss) - 0.5 * Cg * dy * dy,
    )
    # layers: cut where the running pair count crosses a multiple of layer_pairs
    ends = torch.cumsum(count, 0)
    if ends.numel() == 0:
        return spans, []
    targets = torch.arange(1, int(ends[-1]) // layer_pairs + 1, device=dev) * layer_pairs
    cuts = torch.searchsorted(ends, targets, right=True).tolist()
    bounds = sorted({0, count.numel(), *(c for c in cuts if c < count.numel())})
    return spans, list(zip(bounds[:-1], bounds[1:]))


def _live_spans(spans: _Spans, sel, stopped):
    """The spans of ``sel`` with at least one pixel that has not stopped compositing."""
    done = torch.zeros(stopped.numel() + 1, dtype=torch.int32, device=sel.device)
    done[1:] = torch.cumsum(stopped, 0, dtype=torch.int32)  # stopped pixels before each index
    first, count = spans.first.index_select(0, sel), spans.count.index_select(0, sel)
    n_done = done.index_select(0, first + count) - done.index_select(0, first)
    return sel.index_select(0, torch.nonzero(n_done < count).squeeze(1))


def _span_alpha(spans: _Spans, r, dx):
    """o*exp(-sigma) of pairs in spans ``r`` at offsets ``dx``."""
    q, lin, c = spans.quad.index_select(0, r), spans.lin.index_select(0, r), spans.const.index_select(0, r)
    return torch.exp(c - (q * dx + lin) * dx)


class _Runs(NamedTuple):
    """Runs of equal pixel ids in a pixel-sorted pair list."""

    pix: torch.Tensor  # [S] pixels that have pairs
    first: torch.Tensor  # [S] index of each run's first pair
    last: torch.Tensor  # [S] index of each run's last pair


def _runs(pix, npix) -> _Runs:
    """Runs of ``pix`` (sorted, values < npix); bincount + cumsum is cheaper than
    a nonzero over the pairs."""
    counts = torch.bincount(pix, minlength=npix)
    ends = torch.cumsum(counts, 0)
    has = torch.nonzero(counts).squeeze(1)
    last = ends.index_select(0, has) - 1
    return _Runs(has, last - counts.index_select(0, has) + 1, last)


def _layer_pairs(spans: _Spans, sel, npix, stopped=None):
    """Pairs of the spans ``sel`` sorted by pixel then depth: (span, pixel,
    o*exp(-sigma)); pairs on ``stopped`` pixels are left out."""
    cnt = spans.count.index_select(0, sel)
    P = int(cnt.sum())
    dev = cnt.device
    r = torch.repeat_interleave(cnt, output_size=P)  # position in sel of each pair
    local = torch.arange(P, device=dev) - (torch.cumsum(cnt, 0) - cnt).index_select(0, r)
    r = sel.index_select(0, r)
    pix = local + spans.first.index_select(0, r)
    if stopped is not None:
        live = torch.nonzero(~stopped.index_select(0, pix)).squeeze(1)
        if live.numel() < P:
            r, local, pix = r.index_select(0, live), local.index_select(0, live), pix.index_select(0, live)
    og = _span_alpha(spans, r, spans.cx.index_select(0, r) - local.to(spans.cx.dtype))
    # spans come front to back, so a stable sort by pixel makes each pixel's list
    # contiguous and front to back; the radix sort takes one pass per key byte
    key_type = torch.int16 if npix <= 2**15 else torch.int32 if npix <= 2**31 else torch.int64
    pix, perm = torch.sort(pix.to(key_type), stable=True)
    return r.index_select(0, perm), pix.long(), og.index_select(0, perm)


# ----------------------------------------------------------------------------- compositing


class _Composite(torch.autograd.Function):
    """Front-to-back compositing of visible, depth-sorted Gaussians.

    params [6,G] (mean x, mean y, conic A,B,C, opacity), feats [D,G], img [G]
    -> [D+1, n_img*H*W]: sum_k w_k feats_k per channel, then alpha = 1 - T_final.

    Gaussians are processed in depth layers of at most ``max_pairs`` pairs; the
    transmittance in front of a layer carries over from the ones before, and
    pairs on pixels that have already stopped (T reached T_MIN) are never
    expanded, which skips most hidden pairs of a dense scene.
    """

    @staticmethod
    def forward(ctx, params, feats, img, W, H, n_img, alpha_max, max_pairs, save):
        D = feats.shape[0]
        dt, dev = feats.dtype, feats.device
        npix = n_img * H * W
        out = torch.zeros(D, npix, dtype=dt, device=dev)
        log_t = torch.zeros(npix, dtype=dt, device=dev)  # log transmittance so far
        stopped = torch.zeros(npix, dtype=torch.bool, device=dev)
        layer_pairs = max(min(int(_LAYER_PAIRS_PER_PIXEL * npix), max_pairs), 1)
        spans, layers = _row_spans(params, img, W, H, layer_pairs)
        kept_r, kept_pix, kept_t, kept_og, bounds = [], [], [], [], [0]
        for li, (a, b) in enumerate(layers):
            sel = torch.arange(a, b, device=dev)
            if li:
                sel = _live_spans(spans, sel, stopped)
                if sel.numel() == 0:
                    continue
            r, pix, og = _layer_pairs(spans, sel, npix, stopped if li else None)
            alpha = og.clamp_max(alpha_max)
            valid = alpha >= ALPHA_THRESHOLD
            lt = torch.where(valid, torch.log(1.0 - alpha), torch.zeros((), dtype=dt, device=dev))
            # log transmittance after each pair: a prefix sum restarted at each pixel's run
            # (float64: the running total over all pixels grows large) plus the
            # pixel's log transmittance from the layers in front
            cum = torch.cumsum(lt.double(), 0)
            runs = _runs(pix, npix)
            base = torch.zeros(npix, dtype=torch.float64, device=dev)
            base[runs.pix] = cum.index_select(0, runs.first) - lt.index_select(0, runs.first).double() \
                - log_t.index_select(0, runs.pix).double()
            log_ti = (cum - base.index_select(0, pix)).to(dt)
            keep = torch.nonzero(valid & (log_ti > _LOG_T_MIN)).squeeze(1)
            # stopping is monotone along a run, so a pixel stopped iff its last pair failed
            stopped[runs.pix] = log_ti.index_select(0, runs.last) <= _LOG_T_MIN
            r, pix, lt, og = (t.index_select(0, keep) for t in (r, pix, lt, og))
            te = torch.exp(log_ti.index_select(0, keep) - lt)  # transmittance in front of the pair
            w = og.clamp_max(alpha_max) * te
            g = spans.gauss.index_select(0, r)
            for c in range(D):
                out[c].index_add_(0, pix, feats[c].index_select(0, g) * w)
            log_t.index_add_(0, pix, lt)
            if save:
                kept_r.append(r)
                kept_pix.append(pix)
                kept_t.append(te)
                kept_og.append(og)
                bounds.append(bounds[-1] + r.numel())
        t_final = torch.exp(log_t)
        if save:
            def cat(xs, dtype):
                return torch.cat(xs) if xs else torch.zeros(0, dtype=dtype, device=dev)

            ctx.save_for_backward(params, feats, cat(kept_r, torch.long), cat(kept_pix, torch.long),
                                  cat(kept_t, dt), cat(kept_og, dt), t_final)
            ctx.spans, ctx.meta = spans, (alpha_max, bounds)
        return torch.cat([out, (1.0 - t_final)[None]], 0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        params, feats, kept_r, kept_pix, kept_t, kept_og, t_final = ctx.saved_tensors
        spans, (alpha_max, bounds) = ctx.spans, ctx.meta
        D = feats.shape[0]
        dt = feats.dtype
        npix = t_final.numel()
        grad_out = grad_out.contiguous()
        g_feat, g_alpha = grad_out[:D], grad_out[D]
        q_pix = g_alpha * t_final  # d alpha_img / d alpha_k = T_final / (1 - alpha_k)
        behind = torch.zeros(npix, dtype=torch.float64, device=feats.device)  # sum of w*v in later layers
        # per-span sums of m, m*dx, m*dx^2 (m = -dL/dsigma) and of w*dL/dfeat
        sums = torch.zeros(3 + D, spans.count.numel(), dtype=dt, device=feats.device)
        # layers go back to front so that the contributions behind each pair are known
        for s, e in reversed(list(zip(bounds[:-1], bounds[1:]))):
            if e == s:
                continue
            r, pix, te, og = kept_r[s:e], kept_pix[s:e], kept_t[s:e], kept_og[s:e]
            dx = spans.cx.index_select(0, r) - (pix - spans.first.index_select(0, r)).to(dt)
            alpha = og.clamp_max(alpha_max)
            w = alpha * te
            g = spans.gauss.index_select(0, r)
            gfs = [g_feat[c].index_select(0, pix) for c in range(D)]
            v = sum(feats[c].index_select(0, g) * gfs[c] for c in range(D))
            # dL/dalpha_k = T_k v_k - (sum_{j>k} w_j v_j - gA T_final) / (1 - alpha_k); the
            # suffix sum comes from a float64 prefix sum, the run's end and the later layers
            wv = (w * v).double()
            cum = torch.cumsum(wv, 0)
            runs = _runs(pix, npix)
            end = cum.index_select(0, runs.last)
            tail = torch.zeros(npix, dtype=torch.float64, device=feats.device)
            tail[runs.pix] = end + behind.index_select(0, runs.pix)
            behind[runs.pix] += end - cum.index_select(0, runs.first) + wv.index_select(0, runs.first)
            after = (tail.index_select(0, pix) - cum).to(dt)
            g_a = te * v - (after - q_pix.index_select(0, pix)) / (1.0 - alpha)
            m = torch.where(og < alpha_max, og * g_a, torch.zeros_like(g_a))  # the clamp blocks the gradient
            mdx = m * dx
            sums[0].index_add_(0, r, m)
            sums[1].index_add_(0, r, mdx)
            sums[2].index_add_(0, r, mdx * dx)
            for c in range(D):
                sums[3 + c].index_add_(0, r, gfs[c] * w)
        # spans -> Gaussians; dy is constant along a span
        _, _, A, Bc, C, o = params.detach()
        gs = spans.gauss
        Ag, Bg, Cg = A.index_select(0, gs), Bc.index_select(0, gs), C.index_select(0, gs)
        S0, S1, S2, dy = sums[0], sums[1], sums[2], spans.dy
        per_span = torch.stack([-(Ag * S1 + Bg * dy * S0), -(Bg * S1 + Cg * dy * S0),
                                -0.5 * S2, -dy * S1, -0.5 * dy * dy * S0, S0 / o.index_select(0, gs)], 0)
        grad_params = torch.zeros_like(params).index_add_(1, gs, per_span)
        grad_feats = torch.zeros_like(feats).index_add_(1, gs, sums[3:])
        return grad_params, grad_feats, None, None, None, None, None, None, None
