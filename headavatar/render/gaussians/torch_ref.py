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
  behind it are dropped.  This makes a difference only in nearly opaque
  pixels (< 1e-4 of the colour) but it keeps the two backends equal;
* ``alpha_max``: 0.99 by default (the contract; Inria / FlashAvatar).  gsplat
  hard-codes 0.999: pass ``alpha_max=0.999`` to reproduce gsplat exactly.
  Both agree whenever opacities are <= 0.99.
* ``radii``: ceil(3 sqrt(largest eigenvalue of the 2D covariance)) for rendered
  Gaussians, 0 for culled ones (gsplat 1.5 itself returns an x/y pair).

How it is fast on a CPU: per-Gaussian work is ordinary autograd; the per-pixel
part is one custom autograd Function.  Pairs are enumerated row by row inside
each Gaussian's alpha >= 1/255 ellipse (``repeat_interleave``, no Python loop
over Gaussians), already in depth order; one stable integer sort by pixel makes
every pixel's list contiguous and front to back; transmittance is a segmented
cumulative sum of log(1 - alpha) (float64); colours are scattered with
``index_add_``.  The backward pass recomputes alphas from the saved (Gaussian,
pixel, transmittance) triples and uses the closed-form gradient of
front-to-back compositing (suffix sums instead of a reverse loop).  Work is
split into chunks of image rows holding at most ``max_pairs`` pairs to bound
memory.
"""

from __future__ import annotations

import math

import torch

from headavatar.render.gaussians import RenderOutput, register_backend
from headavatar.render.gaussians.sh import eval_sh
from headavatar.utils.rotations import quaternion_to_matrix

ALPHA_THRESHOLD = 1.0 / 255.0
T_MIN = 1e-4  # compositing stops once transmittance would reach this (gsplat, Inria)
_EXTEND_MAX = 3.33  # gsplat's cap on the bounding box, in standard deviations
_SPAN_MARGIN = 1e-3  # px; enlarge enumerated spans a little, the exact alpha test trims them
_NUM_PARAMS = 6  # rows of the per-Gaussian parameter block: mx, my, conic A, B, C, opacity

# options of other backends that this one accepts and ignores, so that callers of
# render_gaussians(backend="auto") can pass them unconditionally
_FOREIGN_OPTIONS = frozenset({"tile_size", "packed", "absgrad", "sparse_grad", "rasterize_mode", "channel_chunk"})


@register_backend("torch")
def render_torch(means, quats, scales, opacities, colors, viewmats, Ks, width: int, height: int,
                 sh_degree: int | None = None, backgrounds=None, near: float = 0.01, far: float = 1e10,
                 eps2d: float = 0.3, alpha_max: float = 0.99, max_pairs: int = 1 << 21, **kw) -> RenderOutput:
    """Render B frames of Gaussians; see the module and package docstrings.

    ``max_pairs`` bounds the (Gaussian, pixel) pairs processed at once (about
    150 bytes each at the peak); results do not depend on it.
    """
    unknown = set(kw) - _FOREIGN_OPTIONS
    if unknown:
        raise TypeError(f"render_torch got unexpected options {sorted(unknown)}")
    width, height = int(width), int(height)
    opacities = _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds)
    B, N = means.shape[:2]

    proj = _project(means, quats, scales, opacities, viewmats, Ks, width, height, near, far, eps2d)
    idx = proj["order"]  # visible Gaussians, flat indices into B*N, front to back

    feats = _gaussian_colors(means, colors, viewmats, sh_degree, idx, N)  # [G, D]
    D = feats.shape[1]
    feats = torch.cat([feats, proj["depth"][:, None]], 1).t().contiguous()  # depth rides along as a channel
    params = torch.stack([proj["mx"], proj["my"], proj["A"], proj["B"], proj["C"], proj["opacity"]], 0)
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


def _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds):
    """Shape checks (these are programming errors, hence ValueError); returns opacities as [B,N]."""
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


def _project(means, quats, scales, opacities, viewmats, Ks, W, H, near, far, eps2d):
    """EWA projection and culling; returns per-visible-Gaussian tensors sorted by depth."""
    B, N = means.shape[:2]
    Rw = viewmats[:, :3, :3]
    mean_c = (means @ Rw.transpose(1, 2) + viewmats[:, None, :3, 3]).reshape(B * N, 3)
    # select Gaussians in front first so that nothing below divides by a bad depth
    with torch.no_grad():
        z_all = mean_c[:, 2]
        cand = torch.nonzero((z_all >= near) & (z_all <= far)).squeeze(1)
    b = torch.div(cand, N, rounding_mode="floor")
    mc = mean_c.index_select(0, cand)
    x, y, z = mc.unbind(-1)
    K = Ks.index_select(0, b)
    fx, fy, cx, cy = K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2]
    # gsplat clamps the Jacobian's x/z, y/z to 1.3x the field of view
    lim_x_pos = (W - cx) / fx + 0.15 * W / fx
    lim_x_neg = cx / fx + 0.15 * W / fx
    lim_y_pos = (H - cy) / fy + 0.15 * H / fy
    lim_y_neg = cy / fy + 0.15 * H / fy
    rz = 1.0 / z
    tx = z * torch.clamp(x * rz, min=-lim_x_neg, max=lim_x_pos)
    ty = z * torch.clamp(y * rz, min=-lim_y_neg, max=lim_y_pos)
    Wv = Rw.index_select(0, b)  # [G,3,3]
    # rows of J @ R_view: the 2x3 map from world offsets to pixel offsets
    T0 = (fx * rz)[:, None] * Wv[:, 0] - (fx * tx * rz * rz)[:, None] * Wv[:, 2]
    T1 = (fy * rz)[:, None] * Wv[:, 1] - (fy * ty * rz * rz)[:, None] * Wv[:, 2]
    M = quaternion_to_matrix(quats.reshape(-1, 4).index_select(0, cand)) * scales.reshape(-1, 3).index_select(0, cand)[:, None, :]
    U0 = (T0[:, :, None] * M).sum(1)  # rows of J R_view R_g S; covariance = U U^T
    U1 = (T1[:, :, None] * M).sum(1)
    a = (U0 * U0).sum(-1) + eps2d
    bb = (U0 * U1).sum(-1)
    c = (U1 * U1).sum(-1) + eps2d
    det = a * c - bb * bb
    mx = fx * x * rz + cx
    my = fy * y * rz + cy
    o = opacities.reshape(-1).index_select(0, cand)

    with torch.no_grad():
        ok = (det > 0) & (o >= ALPHA_THRESHOLD)
        # gsplat's opacity-aware box: it bounds exactly the alpha >= 1/255 ellipse
        extend = torch.sqrt(2.0 * torch.log(o.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)).clamp_max(_EXTEND_MAX)
        rx = torch.ceil(extend * a.clamp_min(0).sqrt())
        ry = torch.ceil(extend * c.clamp_min(0).sqrt())
        ok &= (rx > 0) | (ry > 0)
        ok &= (mx + rx > 0) & (mx - rx < W) & (my + ry > 0) & (my - ry < H)
        lam = 0.5 * (a + c) + torch.sqrt((0.5 * (a - c)) ** 2 + bb * bb)
        radii = torch.zeros(B * N, dtype=torch.int32, device=means.device)
        radii[cand[ok]] = torch.ceil(3.0 * lam[ok].sqrt()).to(torch.int32)
        keep = torch.nonzero(ok).squeeze(1)
        keep = keep[torch.argsort(z.detach()[keep], stable=True)]

    inv = 1.0 / det.index_select(0, keep)
    return {
        "order": cand[keep],
        "radii": radii,
        "mx": mx.index_select(0, keep),
        "my": my.index_select(0, keep),
        "A": c.index_select(0, keep) * inv,
        "B": -bb.index_select(0, keep) * inv,
        "C": a.index_select(0, keep) * inv,
        "opacity": o.index_select(0, keep),
        "depth": z.index_select(0, keep),
    }


def _gaussian_colors(means, colors, viewmats, sh_degree, idx, N):
    """[G, D] colours of the visible Gaussians ``idx`` (flat indices into B*N)."""
    if sh_degree is None:
        return colors.reshape(-1, colors.shape[-1]).index_select(0, idx)
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    centres = -(R.transpose(1, 2) @ t[:, :, None])[..., 0]  # [B,3]
    b = torch.div(idx, N, rounding_mode="floor")
    dirs = means.reshape(-1, 3).index_select(0, idx) - centres.index_select(0, b)
    k = (sh_degree + 1) ** 2
    coeffs = colors[:, :, :k].reshape(-1, k, 3).index_select(0, idx)
    return torch.clamp_min(eval_sh(sh_degree, coeffs, dirs) + 0.5, 0.0)


# ----------------------------------------------------------------------------- pairs


def _row_spans(params, img, W, H):
    """Per (Gaussian, image row) pixel spans covering the alpha >= 1/255 ellipse.

    Returns (gauss [R], row [R] global row img*H + j, first pixel [R] global
    index, count [R]) for rows with a non-empty span, in Gaussian order.
    """
    mx, my, A, Bc, C, o = params.detach()
    dev = params.device
    thr = torch.log(o / ALPHA_THRESHOLD).clamp_min(0)  # alpha >= 1/255  <=>  sigma <= thr
    detc = (A * C - Bc * Bc).clamp_min(1e-30)
    hy = torch.sqrt(2.0 * thr * A / detc) + _SPAN_MARGIN  # A / det(conic) = covariance yy
    j0 = torch.ceil(my - hy - 0.5).clamp(0, H)
    j1 = torch.floor(my + hy - 0.5).clamp(-1, H - 1)
    nrows = (j1 - j0 + 1).clamp_min(0).long()
    R = int(nrows.sum())
    gauss = torch.repeat_interleave(torch.arange(nrows.numel(), device=dev), nrows, output_size=R)
    first = torch.cumsum(nrows, 0) - nrows
    j = j0.long().index_select(0, gauss) + (torch.arange(R, device=dev) - first.index_select(0, gauss))
    dy = my.index_select(0, gauss) - (j.to(my.dtype) + 0.5)
    Ag, Bg, Cg = A.index_select(0, gauss), Bc.index_select(0, gauss), C.index_select(0, gauss)
    # sigma(dx) <= thr is a quadratic inequality in dx = mx - px
    disc = Bg * Bg * dy * dy - Ag * (Cg * dy * dy - 2.0 * thr.index_select(0, gauss))
    half = torch.sqrt(disc.clamp_min(0)) / Ag
    centre = mx.index_select(0, gauss) + Bg * dy / Ag  # the px where sigma is smallest on this row
    i0 = torch.ceil(centre - half - 0.5 - _SPAN_MARGIN).clamp(0, W)
    i1 = torch.floor(centre + half - 0.5 + _SPAN_MARGIN).clamp(-1, W - 1)
    count = torch.where(disc >= 0, i1 - i0 + 1, torch.zeros_like(i0)).clamp_min(0).long()
    row = img.index_select(0, gauss) * H + j
    nz = torch.nonzero(count).squeeze(1)
    row = row.index_select(0, nz)
    return gauss.index_select(0, nz), row, row * W + i0.long().index_select(0, nz), count.index_select(0, nz)


def _row_chunks(row, count, n_rows, max_pairs):
    """Split global image rows into ranges holding about ``max_pairs`` pairs each."""
    if count.numel() == 0:
        return []
    per_row = torch.zeros(n_rows, dtype=torch.long, device=row.device).index_add_(0, row, count)
    cum = torch.cumsum(per_row, 0)
    total = int(cum[-1])
    if total <= max_pairs:
        return [(0, n_rows)]
    targets = torch.arange(1, (total + max_pairs - 1) // max_pairs, device=row.device) * max_pairs
    cuts = torch.unique(torch.searchsorted(cum, targets, right=True)).tolist()
    bounds = [0] + [c for c in cuts if 0 < c < n_rows] + [n_rows]
    return [(r0, r1) for r0, r1 in zip(bounds[:-1], bounds[1:]) if r1 > r0]


def _expand_pairs(gauss, first, count, pix_base, n_pix):
    """(Gaussian, pixel) pairs of the given spans (pixels in [pix_base, pix_base+n_pix)),
    sorted by pixel then depth."""
    P = int(count.sum())
    dev = count.device
    start = torch.cumsum(count, 0) - count
    # pixel of the k-th pair = k + (first pixel of its span - index of the span's first pair)
    pix = torch.arange(P, device=dev) + torch.repeat_interleave(first - start - pix_base, count, output_size=P)
    g = torch.repeat_interleave(gauss, count, output_size=P)
    # spans come in depth order, so a stable sort by pixel keeps each pixel front to back;
    # int32 keys make the radix sort about twice as fast as int64
    key = pix.to(torch.int32) if n_pix < 2**31 else pix
    pix, perm = torch.sort(key, stable=True)
    return g.index_select(0, perm), pix.long() + pix_base


def _pair_alpha(params, g, pix, W, H, alpha_max):
    """dx, dy, sigma, exp(-sigma), o*exp(-sigma) and clamped alpha of each pair."""
    mx, my, A, Bc, C, o = params.index_select(1, g)
    px = torch.remainder(pix, W)
    py = torch.remainder(torch.div(pix, W, rounding_mode="floor"), H)
    dx = mx - (px.to(mx.dtype) + 0.5)
    dy = my - (py.to(mx.dtype) + 0.5)
    sigma = 0.5 * (A * dx * dx + C * dy * dy) + Bc * dx * dy
    gv = torch.exp(-sigma)
    og = o * gv
    return dx, dy, sigma, gv, og, og.clamp_max(alpha_max), (A, Bc, C)


def _segment_starts(pix):
    """Indices where a run of equal (sorted) pixel ids starts, and run lengths."""
    new = torch.ones_like(pix, dtype=torch.bool)
    new[1:] = pix[1:] != pix[:-1]
    starts = torch.nonzero(new).squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([pix.numel()])])
    return starts, ends - starts


# ----------------------------------------------------------------------------- compositing


class _Composite(torch.autograd.Function):
    """Front-to-back compositing of visible, depth-sorted Gaussians.

    params [6,G] (mean x, mean y, conic A,B,C, opacity), feats [D,G], img [G]
    -> [D+1, n_img*H*W]: sum_k w_k feats_k per channel, then alpha = 1 - T_final.
    """

    @staticmethod
    def forward(ctx, params, feats, img, W, H, n_img, alpha_max, max_pairs, save):
        D = feats.shape[0]
        npix = n_img * H * W
        out = torch.zeros(D, npix, dtype=feats.dtype, device=feats.device)
        log_t = torch.zeros(npix, dtype=torch.float64, device=feats.device)
        gauss, row, first, count = _row_spans(params, img, W, H)
        kept_g, kept_pix, kept_t, bounds = [], [], [], [0]
        for r0, r1 in _row_chunks(row, count, n_img * H, max_pairs):
            sel = torch.nonzero((row >= r0) & (row < r1)).squeeze(1) if (r0, r1) != (0, n_img * H) else None
            gs, fs, cs = (gauss, first, count) if sel is None else (gauss[sel], first[sel], count[sel])
            g, pix = _expand_pairs(gs, fs, cs, r0 * W, (r1 - r0) * W)
            _, _, sigma, _, _, alpha, _ = _pair_alpha(params, g, pix, W, H, alpha_max)
            valid = (alpha >= ALPHA_THRESHOLD) & (sigma >= 0)
            lt = torch.where(valid, torch.log1p(-alpha.double()), torch.zeros((), dtype=torch.float64, device=alpha.device))
            starts, lengths = _segment_starts(pix)
            cum = torch.cumsum(lt, 0)
            excl = cum - lt
            log_te = excl - torch.repeat_interleave(excl.index_select(0, starts), lengths, output_size=excl.numel())
            keep = torch.nonzero(valid & (log_te + lt > math.log(T_MIN))).squeeze(1)
            g, pix = g.index_select(0, keep), pix.index_select(0, keep)
            te = torch.exp(log_te.index_select(0, keep)).to(feats.dtype)
            w = alpha.index_select(0, keep) * te
            out.index_add_(1, pix, feats.index_select(1, g) * w)
            log_t.index_add_(0, pix, lt.index_select(0, keep))
            if save:
                kept_g.append(g.to(torch.int32))
                kept_pix.append(pix.to(torch.int32) if npix < 2**31 else pix)
                kept_t.append(te)
                bounds.append(bounds[-1] + g.numel())
        t_final = torch.exp(log_t).to(feats.dtype)
        if save:
            cat = lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt, device=feats.device)  # noqa: E731
            ctx.save_for_backward(params, feats, cat(kept_g, torch.int32), cat(kept_pix, torch.int32),
                                  cat(kept_t, feats.dtype), t_final)
            ctx.meta = (W, H, alpha_max, bounds)
        return torch.cat([out, (1.0 - t_final)[None]], 0)

    @staticmethod
    def backward(ctx, grad_out):
        params, feats, kept_g, kept_pix, kept_t, t_final = ctx.saved_tensors
        W, H, alpha_max, bounds = ctx.meta
        D = feats.shape[0]
        grad_out = grad_out.contiguous()
        g_feat, g_alpha = grad_out[:D], grad_out[D]
        q_pix = g_alpha * t_final  # d alpha_img / d alpha_k = T_final / (1 - alpha_k)
        grad_params = torch.zeros_like(params)
        grad_feats = torch.zeros_like(feats)
        for s, e in zip(bounds[:-1], bounds[1:]):
            if e == s:
                continue
            g, pix, te = kept_g[s:e].long(), kept_pix[s:e].long(), kept_t[s:e]
            dx, dy, _, gv, og, alpha, (A, Bc, C) = _pair_alpha(params, g, pix, W, H, alpha_max)
            w = alpha * te
            gf = g_feat.index_select(1, pix)  # [D,P]
            v = (feats.index_select(1, g) * gf).sum(0)
            # suffix sum over the pixel's later contributions, via a float64 prefix sum
            cum = torch.cumsum((w * v).double(), 0)
            starts, lengths = _segment_starts(pix)
            last = cum.index_select(0, starts + lengths - 1)
            after = (torch.repeat_interleave(last, lengths, output_size=cum.numel()) - cum).to(w.dtype)
            g_a = te * v - (after - q_pix.index_select(0, pix)) / (1.0 - alpha)
            free = og < alpha_max  # the min(alpha_max, .) clamp blocks the gradient
            g_s = torch.where(free, -og * g_a, torch.zeros_like(g_a))
            g_o = torch.where(free, gv * g_a, torch.zeros_like(g_a))
            rows = torch.stack([g_s * (A * dx + Bc * dy), g_s * (Bc * dx + C * dy),
                                0.5 * g_s * dx * dx, g_s * dx * dy, 0.5 * g_s * dy * dy, g_o], 0)
            grad_params.index_add_(1, g, rows)
            grad_feats.index_add_(1, g, gf * w)
        return grad_params, grad_feats, None, None, None, None, None, None, None
