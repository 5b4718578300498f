"""The ``triton`` backend: a tile rasteriser of our own in Triton (CUDA; CPU through Triton's interpreter).

Same contract and conventions as the torch reference (``torch_ref``): EWA
projection with gsplat's clamped Jacobian and a 0.3 px^2 low-pass, near/far
culling, the opacity-aware bounding box, alpha = min(alpha_max, o exp(-sigma)),
pairs with alpha < 1/255 skipped, a pixel stops at the first contribution that
would bring its transmittance to <= 1e-4, then background and expected depth.

Pipeline, all on the device and without a host synchronisation, so that a
whole frame (forward and backward) can be captured in a CUDA graph:
  1. projection, culling and SH colours per Gaussian: two fused Triton kernels
     with hand-written backward kernels (cameras get no gradient there; when
     they need one, plain torch ops and autograd are used instead); culled
     Gaussians are masked, never compacted.
  2. binning: Gaussians are sorted by depth within each image ([B,N] sort),
     every Gaussian writes one (tile, Gaussian) pair per 16x16 tile its box
     touches into a buffer of fixed capacity, and a stable sort by tile id then
     leaves each tile's list contiguous and front to back.  Tile ranges come
     from a searchsorted over the fixed-size buffer.
  3. one Triton program per tile composites its Gaussians front to back in
     chunks (transmittance by a cumulative product inside a chunk), stopping
     when all its pixels have.
  4. backward: the same traversal front to back again; the sum of the
     contributions behind a pair is the pixel's total (known from the forward
     output) minus a running prefix, so no back-to-front pass or per-pixel list
     is needed.  Gradients to the 2D means, conics, opacities and features are
     reduced over the tile's pixels and added atomically per Gaussian.  Variants
     selectable for timing (same results): the forward's per-pixel stop positions
     bound the walk (``last_index``), ten sums and one atomic block per chunk into a
     [G, 16] buffer (``packed_grads``), chunks with no kept pair skipped
     (``skip_empty``), one multi-operand reduction (``one_reduce``).

Capacity and overflow: the pair buffer's capacity is sized from the scene on
first use of each (B, N, W, H) (one host read, outside any graph capture) with
a margin.  When a later frame needs more pairs, nothing is dropped: the
binning raises a device-side flag and the tile programs then walk every
Gaussian of their image in depth order instead of their tile list (correct,
only slower).  The largest need seen is kept on the device; eager calls check
it asynchronously (pinned copy + event, no sync) and grow the buffer for the
next call; callers that replay captured graphs call ``watch_overflow()`` (the
same, non-blocking) or ``check_overflow()`` (one sync) off the hot path and
re-capture when ``generation()`` changes (FlashAvatarAvatar.render does).

Speed on an H100 and the targets it meets or misses: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from headavatar.errors import UserError
from headavatar.render.gaussians import RenderOutput, register_backend
from headavatar.render.gaussians.torch_ref import (
    ALPHA_MAX,
    ALPHA_THRESHOLD,
    EPS2D,
    FAR,
    NEAR,
    T_MIN,
    _candidate_colors,
    _check_inputs,
    ewa_projection,
    screen_box,
)

TILE = 16
_INT32_MAX = tl.constexpr(2**31 - 1)  # kernels may only read constexpr globals
_T_MIN = tl.constexpr(T_MIN)
# pair capacity = need * margin (+ slack) when sized from a scene; grown the same way on overflow
_CAPACITY_MARGIN = 1.5
_CAPACITY_SLACK = 4096
# options of other backends that this one accepts and ignores
_FOREIGN_OPTIONS = frozenset({"max_pairs", "tile_size", "packed", "absgrad", "sparse_grad",
                              "rasterize_mode", "channel_chunk"})


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _tile_reached(params_ptr, g, G, tx, ty, live, TS: tl.constexpr):
    """Whether Gaussian g can reach alpha >= 1/255 at any pixel centre of tile (tx, ty): the
    smallest sigma over the rectangle of the tile's pixel centres (a convex quadratic: 0 when the
    mean's projection is inside, else its minimum over the four edges) against ln(255 o).  Exact
    enough to be conservative: a continuous rectangle holds every pixel centre, and a margin
    covers rounding, so dropping the pair changes no pixel."""
    mx = tl.load(params_ptr + 0 * G + g, mask=live, other=0.0)
    my = tl.load(params_ptr + 1 * G + g, mask=live, other=0.0)
    ca = tl.load(params_ptr + 2 * G + g, mask=live, other=1.0)
    cb = tl.load(params_ptr + 3 * G + g, mask=live, other=0.0)
    cc = tl.load(params_ptr + 4 * G + g, mask=live, other=1.0)
    op = tl.load(params_ptr + 5 * G + g, mask=live, other=1.0)
    # offsets d = mean - pixel over the tile: [lo, hi] per axis
    xlo = mx - ((tx * TS).to(tl.float32) + (TS - 0.5))
    xhi = mx - ((tx * TS).to(tl.float32) + 0.5)
    ylo = my - ((ty * TS).to(tl.float32) + (TS - 0.5))
    yhi = my - ((ty * TS).to(tl.float32) + 0.5)
    ca = tl.maximum(ca, 1e-12)
    cc = tl.maximum(cc, 1e-12)
    # edges x = xlo, xhi: the best y is -cb x / cc (clamped); edges y = ylo, yhi likewise
    y1 = tl.minimum(tl.maximum(-cb * xlo / cc, ylo), yhi)
    y2 = tl.minimum(tl.maximum(-cb * xhi / cc, ylo), yhi)
    x3 = tl.minimum(tl.maximum(-cb * ylo / ca, xlo), xhi)
    x4 = tl.minimum(tl.maximum(-cb * yhi / ca, xlo), xhi)
    s1 = 0.5 * (ca * xlo * xlo + cc * y1 * y1) + cb * xlo * y1
    s2 = 0.5 * (ca * xhi * xhi + cc * y2 * y2) + cb * xhi * y2
    s3 = 0.5 * (ca * x3 * x3 + cc * ylo * ylo) + cb * x3 * ylo
    s4 = 0.5 * (ca * x4 * x4 + cc * yhi * yhi) + cb * x4 * yhi
    smin = tl.minimum(tl.minimum(s1, s2), tl.minimum(s3, s4))
    inside = (xlo <= 0.0) & (xhi >= 0.0) & (ylo <= 0.0) & (yhi >= 0.0)
    smin = tl.where(inside, 0.0, smin)
    # alpha >= 1/255  <=>  sigma <= ln(255 o); the margin (relative and absolute) absorbs rounding
    lim = tl.log(tl.maximum(op, 1e-30) * 255.0)
    return smin <= lim + 1e-3 * tl.abs(lim) + 1e-3


@triton.jit
def _emit_pairs_kernel(incl_ptr, order_ptr, rect_ptr, params_ptr, keys_ptr, gids_ptr, cap, G, N, TX, TPI,
                       LOG_G: tl.constexpr, BLOCK: tl.constexpr, CULL: tl.constexpr, KEY_MAX: tl.constexpr,
                       TS: tl.constexpr):
    """Pair p -> (tile key, Gaussian id); p >= total gets key KEY_MAX (sorts last, outside every
    tile's range).  CULL: so does a pair whose Gaussian reaches no pixel of its tile with alpha >=
    1/255 (a tile of the box that its ellipse misses): the tile programs then never visit it."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = p < cap
    total = tl.load(incl_ptr + G - 1)
    live = inb & (p < total)
    # j = first index with incl[j] > p (binary search over the inclusive prefix sums)
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = tl.zeros([BLOCK], dtype=tl.int32) + G
    for _ in tl.static_range(LOG_G):
        mid = (lo + hi) // 2
        v = tl.load(incl_ptr + mid, mask=live & (mid < G), other=0)
        go_right = v <= p
        active = live & (lo < hi)
        lo = tl.where(active & go_right, mid + 1, lo)
        hi = tl.where(active & ~go_right, mid, hi)
    j = tl.minimum(lo, G - 1)
    end = tl.load(incl_ptr + j, mask=live, other=0)
    g = tl.load(order_ptr + j, mask=live, other=0)
    tx0 = tl.load(rect_ptr + g * 4 + 0, mask=live, other=0)
    ty0 = tl.load(rect_ptr + g * 4 + 1, mask=live, other=0)
    tx1 = tl.load(rect_ptr + g * 4 + 2, mask=live, other=0)
    ty1 = tl.load(rect_ptr + g * 4 + 3, mask=live, other=0)
    w = tl.maximum(tx1 - tx0 + 1, 1)
    h = tl.maximum(ty1 - ty0 + 1, 1)
    local = p - (end - w * h)
    tx = tx0 + local % w
    ty = ty0 + local // w
    key = (g // N) * TPI + ty * TX + tx
    if CULL:
        live = live & _tile_reached(params_ptr, g, G, tx, ty, live, TS)
    key = tl.where(live, key, KEY_MAX)
    tl.store(keys_ptr + p, key, mask=inb)
    tl.store(gids_ptr + p, tl.where(live, g, 0), mask=inb)


@triton.jit
def _load_rows6(ptr, G, idx, m5, m6):
    """Columns idx of a [6, G] array (mx, my, A, B, C, opacity or their gradients); the first five
    rows under mask m5, the last under m6 (0 where masked)."""
    return (tl.load(ptr + 0 * G + idx, mask=m5, other=0.0), tl.load(ptr + 1 * G + idx, mask=m5, other=0.0),
            tl.load(ptr + 2 * G + idx, mask=m5, other=0.0), tl.load(ptr + 3 * G + idx, mask=m5, other=0.0),
            tl.load(ptr + 4 * G + idx, mask=m5, other=0.0), tl.load(ptr + 5 * G + idx, mask=m6, other=0.0))


@triton.jit
def _chunk_load(params_ptr, feats_ptr, rect_ptr, ids_sorted_ptr, order_ptr, ovf, i, end, G, tx, ty,
                CH: tl.constexpr, FEATS: tl.constexpr):
    """Load a chunk of CH Gaussians of the tile's list (or, after an overflow, of the image's depth
    order): ids, mask, the six projected parameters and (FEATS) the four features."""
    offs = i + tl.arange(0, CH)
    m = offs < end
    # the flag broadcast to the chunk explicitly (the interpreter rejects block & scalar masks)
    use_all = (tl.zeros([CH], dtype=tl.int32) + ovf) != 0
    id_list = tl.load(ids_sorted_ptr + offs, mask=m & ~use_all, other=0)
    id_all = tl.load(order_ptr + offs, mask=m & use_all, other=0)
    gid = tl.where(use_all, id_all, id_list)
    # after an overflow every Gaussian of the image is visited: keep those whose box meets this tile
    rx0 = tl.load(rect_ptr + gid * 4 + 0, mask=m & use_all, other=0)
    ry0 = tl.load(rect_ptr + gid * 4 + 1, mask=m & use_all, other=0)
    rx1 = tl.load(rect_ptr + gid * 4 + 2, mask=m & use_all, other=0)
    ry1 = tl.load(rect_ptr + gid * 4 + 3, mask=m & use_all, other=0)
    inrect = ~use_all | ((rx0 <= tx) & (tx <= rx1) & (ry0 <= ty) & (ty <= ry1))
    m = m & inrect
    mx, my, ca, cb, cc, op = _load_rows6(params_ptr, G, gid, m, m)
    f0 = tl.zeros([CH], dtype=tl.float32)
    f1 = tl.zeros([CH], dtype=tl.float32)
    f2 = tl.zeros([CH], dtype=tl.float32)
    f3 = tl.zeros([CH], dtype=tl.float32)
    if FEATS:
        f0 = tl.load(feats_ptr + gid * 4 + 0, mask=m, other=0.0)
        f1 = tl.load(feats_ptr + gid * 4 + 1, mask=m, other=0.0)
        f2 = tl.load(feats_ptr + gid * 4 + 2, mask=m, other=0.0)
        f3 = tl.load(feats_ptr + gid * 4 + 3, mask=m, other=0.0)
    return gid, m, mx, my, ca, cb, cc, op, f0, f1, f2, f3


@triton.jit
def _chunk_eval(m, mx, my, ca, cb, cc, op, pxf, pyf, alpha_max):
    """A loaded chunk's alphas at the tile's pixels ([CH, PIX])."""
    dx = mx[:, None] - pxf[None, :]
    dy = my[:, None] - pyf[None, :]
    sigma = 0.5 * (ca[:, None] * dx * dx + cc[:, None] * dy * dy) + cb[:, None] * dx * dy
    og = op[:, None] * tl.exp(-sigma)
    alpha = tl.minimum(og, alpha_max)
    valid = m[:, None] & (alpha >= 1.0 / 255.0)
    return dx, dy, og, alpha, valid


@triton.jit
def _chunk_alpha(params_ptr, rect_ptr, ids_sorted_ptr, order_ptr, ovf, i, end, G, tx, ty, pxf, pyf, alpha_max,
                 CH: tl.constexpr):
    """Load a chunk of CH Gaussians of the tile's list (or, after an overflow, of the image's
    depth order) and evaluate their alphas at the tile's pixels ([CH, PIX])."""
    gid, m, mx, my, ca, cb, cc, op, f0, f1, f2, f3 = _chunk_load(params_ptr, params_ptr, rect_ptr, ids_sorted_ptr, order_ptr,
                                                                  ovf, i, end, G, tx, ty, CH, False)
    dx, dy, og, alpha, valid = _chunk_eval(m, mx, my, ca, cb, cc, op, pxf, pyf, alpha_max)
    return gid, m, dx, dy, og, alpha, valid, ca, cb, cc, op


@triton.jit
def _tile_setup(ranges_ptr, ovf_ptr, N, W, H, TX, TPI, TS: tl.constexpr):
    """This program's tile: its image, tile column/row, pixel coordinates (and centres at +0.5), in-bounds
    mask, the overflow flag and the range of its sorted pairs (all of its image's Gaussians after an overflow)."""
    t = tl.program_id(0)
    img = t // TPI
    lt = t % TPI
    tx = lt % TX
    ty = lt // TX
    lane = tl.arange(0, TS * TS)
    px = tx * TS + lane % TS
    py = ty * TS + lane // TS
    inb = (px < W) & (py < H)
    ovf = tl.load(ovf_ptr)
    start = tl.where(ovf != 0, img * N, tl.load(ranges_ptr + t))
    end = tl.where(ovf != 0, img * N + N, tl.load(ranges_ptr + t + 1))
    return img, tx, ty, px, py, inb, px.to(tl.float32) + 0.5, py.to(tl.float32) + 0.5, ovf, start, end


@triton.jit
def _raster_fwd_kernel(params_ptr, feats_ptr, rect_ptr, ids_sorted_ptr, order_ptr, ranges_ptr, ovf_ptr,
                       out_ptr, tfin_ptr, last_ptr, G, N, W, H, TX, TPI, alpha_max,
                       DP: tl.constexpr, CH: tl.constexpr, TS: tl.constexpr, SPLIT: tl.constexpr,
                       LAST: tl.constexpr, PREFETCH: tl.constexpr):
    # SPLIT (DP == 4: RGB + depth): one [PIX] accumulator per channel instead of a
    # [CH, PIX, DP] product, which keeps fewer values in registers.
    # LAST: also store per pixel 1 + the list position of its last kept pair (0: none), for the
    # backward's LAST mode
    # PREFETCH (needs SPLIT): the next chunk's ids, parameters and features are loaded before this
    # chunk is composited, so that their latency overlaps the arithmetic
    img, tx, ty, px, py, inb, pxf, pyf, ovf, start, end = _tile_setup(ranges_ptr, ovf_ptr, N, W, H, TX, TPI, TS)
    chan = tl.arange(0, DP)

    T = tl.full([TS * TS], 1.0, tl.float32)
    done = ~inb
    acc = tl.zeros([TS * TS, DP], dtype=tl.float32)
    acc0 = tl.zeros([TS * TS], dtype=tl.float32)
    acc1 = tl.zeros([TS * TS], dtype=tl.float32)
    acc2 = tl.zeros([TS * TS], dtype=tl.float32)
    acc3 = tl.zeros([TS * TS], dtype=tl.float32)
    lastp = tl.zeros([TS * TS], dtype=tl.int32)
    i = start
    if PREFETCH:
        n_gid, n_m, n_mx, n_my, n_ca, n_cb, n_cc, n_op, n_f0, n_f1, n_f2, n_f3 = _chunk_load(
            params_ptr, feats_ptr, rect_ptr, ids_sorted_ptr, order_ptr, ovf, i, end, G, tx, ty, CH, True)
    while i < end:
        if PREFETCH:
            gid, m, mx, my, ca, cb, cc, op, c0, c1, c2, c3 = n_gid, n_m, n_mx, n_my, n_ca, n_cb, n_cc, n_op, n_f0, n_f1, n_f2, n_f3
            n_gid, n_m, n_mx, n_my, n_ca, n_cb, n_cc, n_op, n_f0, n_f1, n_f2, n_f3 = _chunk_load(
                params_ptr, feats_ptr, rect_ptr, ids_sorted_ptr, order_ptr, ovf, i + CH, end, G, tx, ty, CH, True)
            dx, dy, og, alpha, valid = _chunk_eval(m, mx, my, ca, cb, cc, op, pxf, pyf, alpha_max)
        else:
            gid, m, dx, dy, og, alpha, valid, ca, cb, cc, op = _chunk_alpha(
                params_ptr, rect_ptr, ids_sorted_ptr, order_ptr, ovf, i, end, G, tx, ty, pxf, pyf, alpha_max, CH)
        valid = valid & ~done[None, :]
        f = tl.where(valid, 1.0 - alpha, 1.0)
        P = T[None, :] * tl.cumprod(f, axis=0)  # transmittance after each pair
        keep = valid & (P > _T_MIN)
        if LAST:
            pos1 = i + 1 + tl.arange(0, CH)
            lastp = tl.maximum(lastp, tl.max(tl.where(keep, pos1[:, None], 0), axis=0))
        w = tl.where(keep, alpha * (P / f), 0.0)
        if PREFETCH:
            acc0 += tl.sum(w * c0[:, None], axis=0)
            acc1 += tl.sum(w * c1[:, None], axis=0)
            acc2 += tl.sum(w * c2[:, None], axis=0)
            acc3 += tl.sum(w * c3[:, None], axis=0)
        elif SPLIT:
            acc0 += tl.sum(w * tl.load(feats_ptr + gid * 4 + 0, mask=m, other=0.0)[:, None], axis=0)
            acc1 += tl.sum(w * tl.load(feats_ptr + gid * 4 + 1, mask=m, other=0.0)[:, None], axis=0)
            acc2 += tl.sum(w * tl.load(feats_ptr + gid * 4 + 2, mask=m, other=0.0)[:, None], axis=0)
            acc3 += tl.sum(w * tl.load(feats_ptr + gid * 4 + 3, mask=m, other=0.0)[:, None], axis=0)
        else:
            feat = tl.load(feats_ptr + gid[:, None] * DP + chan[None, :], mask=m[:, None], other=0.0)
            acc += tl.sum(w[:, :, None] * feat[:, None, :], axis=0)
        T = tl.minimum(T, tl.min(tl.where(keep, P, 2.0), axis=0))
        done = done | (tl.sum((valid & (P <= _T_MIN)).to(tl.int32), axis=0) > 0)
        all_done = tl.sum((~done).to(tl.int32), axis=0) == 0
        i = tl.where(all_done, end, i + CH)

    pix = (img * H + py) * W + px
    if SPLIT:
        tl.store(out_ptr + pix * 4 + 0, acc0, mask=inb)
        tl.store(out_ptr + pix * 4 + 1, acc1, mask=inb)
        tl.store(out_ptr + pix * 4 + 2, acc2, mask=inb)
        tl.store(out_ptr + pix * 4 + 3, acc3, mask=inb)
    else:
        tl.store(out_ptr + pix[:, None] * DP + chan[None, :], acc, mask=inb[:, None])
    tl.store(tfin_ptr + pix, T, mask=inb)
    if LAST:
        tl.store(last_ptr + pix, lastp, mask=inb)


@triton.jit
def _raster_fwd_seq_kernel(params_ptr, feats_ptr, rect_ptr, ids_sorted_ptr, order_ptr, ranges_ptr, ovf_ptr,
                           out_ptr, tfin_ptr, last_ptr, G, N, W, H, TX, TPI, alpha_max,
                           CH: tl.constexpr, TS: tl.constexpr, LAST: tl.constexpr):
    """The forward with the pairs taken one at a time (four channels: RGB + depth).

    Every value is per pixel ([PIX] vectors): each Gaussian's parameters are scalar loads that all
    threads share, the transmittance is updated pair by pair as the reference does, and no value
    crosses threads except the tile's "all done" test once per CH pairs.  The [CH, PIX] kernel
    above needs a scan and five reductions across the chunk axis per chunk instead."""
    img, tx, ty, px, py, inb, pxf, pyf, ovf, start, end = _tile_setup(ranges_ptr, ovf_ptr, N, W, H, TX, TPI, TS)
    T = tl.full([TS * TS], 1.0, tl.float32)
    done = ~inb
    acc0 = tl.zeros([TS * TS], dtype=tl.float32)
    acc1 = tl.zeros([TS * TS], dtype=tl.float32)
    acc2 = tl.zeros([TS * TS], dtype=tl.float32)
    acc3 = tl.zeros([TS * TS], dtype=tl.float32)
    lastp = tl.zeros([TS * TS], dtype=tl.int32)
    use_all = ovf != 0
    i = start
    while i < end:
        for k in tl.static_range(CH):
            j = i + k
            mj = j < end
            gid = tl.where(use_all, tl.load(order_ptr + j, mask=mj & use_all, other=0),
                           tl.load(ids_sorted_ptr + j, mask=mj & ~use_all, other=0))
            # after an overflow: every Gaussian of the image, those whose box meets this tile (masks,
            # not a branch: a branch per pair keeps the compiler from issuing the chunk's loads early)
            ma = mj & use_all
            rx0 = tl.load(rect_ptr + gid * 4 + 0, mask=ma, other=0)
            ry0 = tl.load(rect_ptr + gid * 4 + 1, mask=ma, other=0)
            rx1 = tl.load(rect_ptr + gid * 4 + 2, mask=ma, other=0)
            ry1 = tl.load(rect_ptr + gid * 4 + 3, mask=ma, other=0)
            mj = mj & (~use_all | ((rx0 <= tx) & (tx <= rx1) & (ry0 <= ty) & (ty <= ry1)))
            mx = tl.load(params_ptr + 0 * G + gid, mask=mj, other=0.0)
            my = tl.load(params_ptr + 1 * G + gid, mask=mj, other=0.0)
            ca = tl.load(params_ptr + 2 * G + gid, mask=mj, other=0.0)
            cb = tl.load(params_ptr + 3 * G + gid, mask=mj, other=0.0)
            cc = tl.load(params_ptr + 4 * G + gid, mask=mj, other=0.0)
            op = tl.load(params_ptr + 5 * G + gid, mask=mj, other=0.0)  # 0: alpha 0, never valid
            f0 = tl.load(feats_ptr + gid * 4 + 0, mask=mj, other=0.0)
            f1 = tl.load(feats_ptr + gid * 4 + 1, mask=mj, other=0.0)
            f2 = tl.load(feats_ptr + gid * 4 + 2, mask=mj, other=0.0)
            f3 = tl.load(feats_ptr + gid * 4 + 3, mask=mj, other=0.0)
            dx = mx - pxf
            dy = my - pyf
            sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
            alpha = tl.minimum(op * tl.exp(-sigma), alpha_max)
            valid = (alpha >= 1.0 / 255.0) & ~done
            tn = T * (1.0 - alpha)
            keep = valid & (tn > _T_MIN)
            w = tl.where(keep, alpha * T, 0.0)
            acc0 += w * f0
            acc1 += w * f1
            acc2 += w * f2
            acc3 += w * f3
            T = tl.where(keep, tn, T)
            done = done | (valid & (tn <= _T_MIN))
            if LAST:
                lastp = tl.where(keep, j + 1, lastp)
        all_done = tl.sum((~done).to(tl.int32), axis=0) == 0
        i = tl.where(all_done, end, i + CH)

    pix = (img * H + py) * W + px
    tl.store(out_ptr + pix * 4 + 0, acc0, mask=inb)
    tl.store(out_ptr + pix * 4 + 1, acc1, mask=inb)
    tl.store(out_ptr + pix * 4 + 2, acc2, mask=inb)
    tl.store(out_ptr + pix * 4 + 3, acc3, mask=inb)
    tl.store(tfin_ptr + pix, T, mask=inb)
    if LAST:
        tl.store(last_ptr + pix, lastp, mask=inb)


@triton.jit
def _add10(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, a5 + b5, a6 + b6, a7 + b7, a8 + b8, a9 + b9


@triton.jit
def _add11(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, a5 + b5, a6 + b6, a7 + b7, a8 + b8, a9 + b9, a10 + b10


@triton.jit
def _raster_bwd_kernel(params_ptr, feats_ptr, rect_ptr, ids_sorted_ptr, order_ptr, ranges_ptr, ovf_ptr,
                       out_ptr, tfin_ptr, last_ptr, gout_ptr, gt_ptr, gparams_ptr, gfeats_ptr, gpack_ptr,
                       G, N, W, H, TX, TPI, alpha_max,
                       DP: tl.constexpr, CH: tl.constexpr, TS: tl.constexpr, SPLIT: tl.constexpr,
                       ONE_REDUCE: tl.constexpr, LAST: tl.constexpr, PACK: tl.constexpr, SKIP: tl.constexpr,
                       PREFETCH: tl.constexpr):
    # PREFETCH (needs SPLIT): the next chunk's ids, parameters and features are loaded before this
    #   chunk's gradients are computed (as the forward's PREFETCH).
    # ONE_REDUCE (needs SPLIT): the per-Gaussian sums as one multi-operand reduction.
    # LAST: the forward's per-pixel stop positions bound the walk (the tile's largest) and
    #   select the kept pairs, instead of tracking T <= 1e-4 and testing for "all done" per chunk.
    # PACK (needs SPLIT): ten sums (the conic's coefficients taken out of the pixel sums), no
    #   separate hit count, and one atomic add of a [CH, 16] block into a [G, 16] buffer
    #   (a Gaussian's gradients in one 64-byte row instead of ten arrays).
    # SKIP: one reduction per chunk tests whether any pair is kept at any pixel; if none, the
    #   chunk's gradient sums, atomics and running sums are skipped.
    img, tx, ty, px, py, inb, pxf, pyf, ovf, start, end = _tile_setup(ranges_ptr, ovf_ptr, N, W, H, TX, TPI, TS)
    chan = tl.arange(0, DP)
    pix = (img * H + py) * W + px
    lastp = tl.zeros([TS * TS], dtype=tl.int32)
    if LAST:
        lastp = tl.load(last_ptr + pix, mask=inb, other=0)
        end = tl.minimum(end, tl.max(lastp, axis=0))

    gpix = tl.load(gout_ptr + pix[:, None] * DP + chan[None, :], mask=inb[:, None], other=0.0)  # [PIX, DP]
    outp = tl.load(out_ptr + pix[:, None] * DP + chan[None, :], mask=inb[:, None], other=0.0)
    total = tl.sum(gpix * outp, axis=1)  # sum over all contributions of w * (g . feat)
    g0 = tl.zeros([TS * TS], dtype=tl.float32)
    g1 = tl.zeros([TS * TS], dtype=tl.float32)
    g2 = tl.zeros([TS * TS], dtype=tl.float32)
    g3 = tl.zeros([TS * TS], dtype=tl.float32)
    if SPLIT:
        g0 = tl.load(gout_ptr + pix * 4 + 0, mask=inb, other=0.0)
        g1 = tl.load(gout_ptr + pix * 4 + 1, mask=inb, other=0.0)
        g2 = tl.load(gout_ptr + pix * 4 + 2, mask=inb, other=0.0)
        g3 = tl.load(gout_ptr + pix * 4 + 3, mask=inb, other=0.0)
    # d loss / d T_final enters every pair through dT_final/dalpha_k = -T_final / (1 - alpha_k)
    q = tl.load(gt_ptr + pix, mask=inb, other=0.0) * tl.load(tfin_ptr + pix, mask=inb, other=1.0)

    T = tl.full([TS * TS], 1.0, tl.float32)
    done = ~inb
    prefix = tl.zeros([TS * TS], dtype=tl.float32)
    i = start
    if PREFETCH:
        n_gid, n_m, n_mx, n_my, n_ca, n_cb, n_cc, n_op, n_f0, n_f1, n_f2, n_f3 = _chunk_load(
            params_ptr, feats_ptr, rect_ptr, ids_sorted_ptr, order_ptr, ovf, i, end, G, tx, ty, CH, True)
    while i < end:
        if PREFETCH:
            gid, m, mx, my, ca, cb, cc, op, f0, f1, f2, f3 = n_gid, n_m, n_mx, n_my, n_ca, n_cb, n_cc, n_op, n_f0, n_f1, n_f2, n_f3
            n_gid, n_m, n_mx, n_my, n_ca, n_cb, n_cc, n_op, n_f0, n_f1, n_f2, n_f3 = _chunk_load(
                params_ptr, feats_ptr, rect_ptr, ids_sorted_ptr, order_ptr, ovf, i + CH, end, G, tx, ty, CH, True)
            dx, dy, og, alpha, valid = _chunk_eval(m, mx, my, ca, cb, cc, op, pxf, pyf, alpha_max)
        else:
            gid, m, dx, dy, og, alpha, valid, ca, cb, cc, op = _chunk_alpha(
                params_ptr, rect_ptr, ids_sorted_ptr, order_ptr, ovf, i, end, G, tx, ty, pxf, pyf, alpha_max, CH)
        if LAST:
            # the pairs the forward kept: valid and in front of the pixel's stop (the same f and
            # cumulative product as the forward's up to there, so the same P)
            valid = valid & ((i + tl.arange(0, CH))[:, None] < lastp[None, :])
        else:
            valid = valid & ~done[None, :]
        f = tl.where(valid, 1.0 - alpha, 1.0)
        P = T[None, :] * tl.cumprod(f, axis=0)
        keep = valid & (P > _T_MIN)
        tb = P / f  # transmittance in front of the pair
        if SKIP:
            # a chunk none of whose pairs is kept at any pixel adds nothing: skip the rest
            live = tl.max(tl.max(keep.to(tl.int32), axis=1), axis=0)
        else:
            live = 1
        if live > 0:
            w = tl.where(keep, alpha * tb, 0.0)
            if PREFETCH:
                v = f0[:, None] * g0[None, :] + f1[:, None] * g1[None, :] + f2[:, None] * g2[None, :] + f3[:, None] * g3[None, :]
            elif SPLIT:
                f0 = tl.load(feats_ptr + gid * 4 + 0, mask=m, other=0.0)
                f1 = tl.load(feats_ptr + gid * 4 + 1, mask=m, other=0.0)
                f2 = tl.load(feats_ptr + gid * 4 + 2, mask=m, other=0.0)
                f3 = tl.load(feats_ptr + gid * 4 + 3, mask=m, other=0.0)
                v = f0[:, None] * g0[None, :] + f1[:, None] * g1[None, :] + f2[:, None] * g2[None, :] + f3[:, None] * g3[None, :]
            else:
                feat = tl.load(feats_ptr + gid[:, None] * DP + chan[None, :], mask=m[:, None], other=0.0)
                v = tl.sum(feat[:, None, :] * gpix[None, :, :], axis=2)  # [CH, PIX]
            wv = w * v
            cs = tl.cumsum(wv, axis=0) + prefix[None, :]
            after = total[None, :] - cs  # contributions behind each pair
            g_a = tb * v - (after + q[None, :]) / (1.0 - alpha)
            mm = tl.where(keep & (og < alpha_max), og * g_a, 0.0)  # -dL/dsigma; the clamp blocks the gradient
            if PACK:
                if ONE_REDUCE:
                    s_x, s_y, s_xx, s_xy, s_yy, s_m, s_f0, s_f1, s_f2, s_f3 = tl.reduce(
                        (mm * dx, mm * dy, mm * dx * dx, mm * dx * dy, mm * dy * dy, mm,
                         w * g0[None, :], w * g1[None, :], w * g2[None, :], w * g3[None, :]), axis=1, combine_fn=_add10)
                else:
                    s_x = tl.sum(mm * dx, axis=1)
                    s_y = tl.sum(mm * dy, axis=1)
                    s_xx = tl.sum(mm * dx * dx, axis=1)
                    s_xy = tl.sum(mm * dx * dy, axis=1)
                    s_yy = tl.sum(mm * dy * dy, axis=1)
                    s_m = tl.sum(mm, axis=1)
                    s_f0 = tl.sum(w * g0[None, :], axis=1)
                    s_f1 = tl.sum(w * g1[None, :], axis=1)
                    s_f2 = tl.sum(w * g2[None, :], axis=1)
                    s_f3 = tl.sum(w * g3[None, :], axis=1)
                # a Gaussian whose sums are all zero would add zeros: skipping it changes nothing
                hit = m & ((s_m != 0.0) | (s_f0 != 0.0) | (s_f1 != 0.0) | (s_f2 != 0.0) | (s_f3 != 0.0))
                k = tl.arange(0, 16)[None, :]
                row = tl.where(k == 0, -(ca * s_x + cb * s_y)[:, None], 0.0)
                row = tl.where(k == 1, -(cb * s_x + cc * s_y)[:, None], row)
                row = tl.where(k == 2, -0.5 * s_xx[:, None], row)
                row = tl.where(k == 3, -s_xy[:, None], row)
                row = tl.where(k == 4, -0.5 * s_yy[:, None], row)
                row = tl.where(k == 5, (s_m / tl.where(m, op, 1.0))[:, None], row)
                row = tl.where(k == 6, s_f0[:, None], row)
                row = tl.where(k == 7, s_f1[:, None], row)
                row = tl.where(k == 8, s_f2[:, None], row)
                row = tl.where(k == 9, s_f3[:, None], row)
                tl.atomic_add(gpack_ptr + gid[:, None] * 16 + k, row, mask=hit[:, None] & (k < 10))
            elif ONE_REDUCE:
                # all per-Gaussian sums over the tile's pixels in one multi-operand reduction
                # (one round of shuffles and barriers instead of eleven)
                r_mx, r_my, r_ca, r_cb, r_cc, r_m, r_f0, r_f1, r_f2, r_f3, r_hit = tl.reduce(
                    (mm * (ca[:, None] * dx + cb[:, None] * dy), mm * (cb[:, None] * dx + cc[:, None] * dy),
                     mm * dx * dx, mm * dx * dy, mm * dy * dy, mm,
                     w * g0[None, :], w * g1[None, :], w * g2[None, :], w * g3[None, :], keep.to(tl.float32)),
                    axis=1, combine_fn=_add11)
                hit = m & (r_hit > 0)
                tl.atomic_add(gparams_ptr + 0 * G + gid, -r_mx, mask=hit)
                tl.atomic_add(gparams_ptr + 1 * G + gid, -r_my, mask=hit)
                tl.atomic_add(gparams_ptr + 2 * G + gid, -0.5 * r_ca, mask=hit)
                tl.atomic_add(gparams_ptr + 3 * G + gid, -r_cb, mask=hit)
                tl.atomic_add(gparams_ptr + 4 * G + gid, -0.5 * r_cc, mask=hit)
                tl.atomic_add(gparams_ptr + 5 * G + gid, r_m / tl.where(m, op, 1.0), mask=hit)
                tl.atomic_add(gfeats_ptr + gid * 4 + 0, r_f0, mask=hit)
                tl.atomic_add(gfeats_ptr + gid * 4 + 1, r_f1, mask=hit)
                tl.atomic_add(gfeats_ptr + gid * 4 + 2, r_f2, mask=hit)
                tl.atomic_add(gfeats_ptr + gid * 4 + 3, r_f3, mask=hit)
            else:
                g_mx = -tl.sum(mm * (ca[:, None] * dx + cb[:, None] * dy), axis=1)
                g_my = -tl.sum(mm * (cb[:, None] * dx + cc[:, None] * dy), axis=1)
                g_ca = -0.5 * tl.sum(mm * dx * dx, axis=1)
                g_cb = -tl.sum(mm * dx * dy, axis=1)
                g_cc = -0.5 * tl.sum(mm * dy * dy, axis=1)
                g_op = tl.sum(mm, axis=1) / tl.where(m, op, 1.0)
                hit = m & (tl.sum(keep.to(tl.int32), axis=1) > 0)
                tl.atomic_add(gparams_ptr + 0 * G + gid, g_mx, mask=hit)
                tl.atomic_add(gparams_ptr + 1 * G + gid, g_my, mask=hit)
                tl.atomic_add(gparams_ptr + 2 * G + gid, g_ca, mask=hit)
                tl.atomic_add(gparams_ptr + 3 * G + gid, g_cb, mask=hit)
                tl.atomic_add(gparams_ptr + 4 * G + gid, g_cc, mask=hit)
                tl.atomic_add(gparams_ptr + 5 * G + gid, g_op, mask=hit)
                if SPLIT:
                    tl.atomic_add(gfeats_ptr + gid * 4 + 0, tl.sum(w * g0[None, :], axis=1), mask=hit)
                    tl.atomic_add(gfeats_ptr + gid * 4 + 1, tl.sum(w * g1[None, :], axis=1), mask=hit)
                    tl.atomic_add(gfeats_ptr + gid * 4 + 2, tl.sum(w * g2[None, :], axis=1), mask=hit)
                    tl.atomic_add(gfeats_ptr + gid * 4 + 3, tl.sum(w * g3[None, :], axis=1), mask=hit)
                else:
                    g_feat = tl.sum(w[:, :, None] * gpix[None, :, :], axis=1)  # [CH, DP]
                    tl.atomic_add(gfeats_ptr + gid[:, None] * DP + chan[None, :], g_feat, mask=hit[:, None] & (chan[None, :] < DP))
            prefix += tl.sum(wv, axis=0)
            T = tl.minimum(T, tl.min(tl.where(keep, P, 2.0), axis=0))
        if LAST:
            i += CH
        else:
            done = done | (tl.sum((valid & (P <= _T_MIN)).to(tl.int32), axis=0) > 0)
            all_done = tl.sum((~done).to(tl.int32), axis=0) == 0
            i = tl.where(all_done, end, i + CH)


@triton.jit
def _matrix_row(rp, m, o0, o1, o2):
    """Four entries of a matrix row at rp (o0..o2, 0 where masked off)."""
    return (tl.load(rp + 0, mask=m, other=o0), tl.load(rp + 1, mask=m, other=o1), tl.load(rp + 2, mask=m, other=o2),
            tl.load(rp + 3, mask=m, other=0.0))


@triton.jit
def _load_view(view_ptr, b, m):
    """The top three rows of image b's world-to-camera matrix (identity where masked off)."""
    vb = view_ptr + b * 16
    r00, r01, r02, t0 = _matrix_row(vb, m, 1.0, 0.0, 0.0)
    r10, r11, r12, t1 = _matrix_row(vb + 4, m, 0.0, 1.0, 0.0)
    r20, r21, r22, t2 = _matrix_row(vb + 8, m, 0.0, 0.0, 1.0)
    return r00, r01, r02, t0, r10, r11, r12, t1, r20, r21, r22, t2


@triton.jit
def _proj_common(means_ptr, quats_ptr, scales_ptr, view_ptr, K_ptr, G, N, W, H, near, far, eps2d, BLOCK: tl.constexpr):
    """This program's Gaussians g (mask m) and their EWA projection (the torch path's arithmetic, in registers)."""
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = g < G
    b = g // N
    r00, r01, r02, t0, r10, r11, r12, t1, r20, r21, r22, t2 = _load_view(view_ptr, b, m)
    kb = K_ptr + b * 9
    fx = tl.load(kb + 0, mask=m, other=1.0)
    cx = tl.load(kb + 2, mask=m, other=0.0)
    fy = tl.load(kb + 4, mask=m, other=1.0)
    cy = tl.load(kb + 5, mask=m, other=0.0)
    mx_w = tl.load(means_ptr + g * 3 + 0, mask=m, other=0.0)
    my_w = tl.load(means_ptr + g * 3 + 1, mask=m, other=0.0)
    mz_w = tl.load(means_ptr + g * 3 + 2, mask=m, other=0.0)
    px = r00 * mx_w + r01 * my_w + r02 * mz_w + t0
    py = r10 * mx_w + r11 * my_w + r12 * mz_w + t1
    pz = r20 * mx_w + r21 * my_w + r22 * mz_w + t2
    front = m & (pz >= near) & (pz <= far)
    z = tl.where(front, pz, 1.0)
    rz = 1.0 / z
    lxp = (W - cx) / fx + 0.15 * W / fx
    lxn = cx / fx + 0.15 * W / fx
    lyp = (H - cy) / fy + 0.15 * H / fy
    lyn = cy / fy + 0.15 * H / fy
    xr = px * rz
    yr = py * rz
    xc = tl.minimum(tl.maximum(xr, -lxn), lxp)
    yc = tl.minimum(tl.maximum(yr, -lyn), lyp)
    tx = z * xc
    ty = z * yc
    # rows of J R_view
    a0 = fx * rz
    a2 = fx * tx * rz * rz
    T00 = a0 * r00 - a2 * r20
    T01 = a0 * r01 - a2 * r21
    T02 = a0 * r02 - a2 * r22
    b1 = fy * rz
    b2 = fy * ty * rz * rz
    T10 = b1 * r10 - b2 * r20
    T11 = b1 * r11 - b2 * r21
    T12 = b1 * r12 - b2 * r22
    # rotation of the Gaussian (normalised quaternion) times its scales
    qw = tl.load(quats_ptr + g * 4 + 0, mask=m, other=1.0)
    qx = tl.load(quats_ptr + g * 4 + 1, mask=m, other=0.0)
    qy = tl.load(quats_ptr + g * 4 + 2, mask=m, other=0.0)
    qz = tl.load(quats_ptr + g * 4 + 3, mask=m, other=0.0)
    qn = tl.maximum(tl.sqrt(qw * qw + qx * qx + qy * qy + qz * qz), 1e-12)
    w = qw / qn
    x = qx / qn
    y = qy / qn
    zq = qz / qn
    s0 = tl.load(scales_ptr + g * 3 + 0, mask=m, other=1.0)
    s1 = tl.load(scales_ptr + g * 3 + 1, mask=m, other=1.0)
    s2 = tl.load(scales_ptr + g * 3 + 2, mask=m, other=1.0)
    R00 = 1.0 - 2.0 * (y * y + zq * zq)
    R01 = 2.0 * (x * y - w * zq)
    R02 = 2.0 * (x * zq + w * y)
    R10 = 2.0 * (x * y + w * zq)
    R11 = 1.0 - 2.0 * (x * x + zq * zq)
    R12 = 2.0 * (y * zq - w * x)
    R20 = 2.0 * (x * zq - w * y)
    R21 = 2.0 * (y * zq + w * x)
    R22 = 1.0 - 2.0 * (x * x + y * y)
    # U = T (R_g S): column j of R_g scaled by s_j
    U00 = (T00 * R00 + T01 * R10 + T02 * R20) * s0
    U01 = (T00 * R01 + T01 * R11 + T02 * R21) * s1
    U02 = (T00 * R02 + T01 * R12 + T02 * R22) * s2
    U10 = (T10 * R00 + T11 * R10 + T12 * R20) * s0
    U11 = (T10 * R01 + T11 * R11 + T12 * R21) * s1
    U12 = (T10 * R02 + T11 * R12 + T12 * R22) * s2
    ca = U00 * U00 + U01 * U01 + U02 * U02 + eps2d
    cb = U00 * U10 + U01 * U11 + U02 * U12
    cc = U10 * U10 + U11 * U11 + U12 * U12 + eps2d
    det = ca * cc - cb * cb
    mxp = fx * px * rz + cx
    myp = fy * py * rz + cy
    return (g, m, front, z, rz, px, py, xr, yr, xc, yc, tx, ty, lxn, lxp, lyn, lyp, fx, fy,
            r00, r01, r02, r10, r11, r12, r20, r21, r22, T00, T01, T02, T10, T11, T12,
            qn, w, x, y, zq, s0, s1, s2, R00, R01, R02, R10, R11, R12, R20, R21, R22,
            U00, U01, U02, U10, U11, U12, ca, cb, cc, det, mxp, myp)


@triton.jit
def _project_fwd_kernel(means_ptr, quats_ptr, scales_ptr, opac_ptr, view_ptr, K_ptr,
                        params_ptr, z_ptr, rect_ptr, count_ptr, radii_ptr,
                        G, N, W, H, TXn, TYn, near, far, eps2d, BLOCK: tl.constexpr, TS: tl.constexpr):
    (g, m, front, z, rz, px, py, xr, yr, xc, yc, tx, ty, lxn, lxp, lyn, lyp, fx, fy,
     r00, r01, r02, r10, r11, r12, r20, r21, r22, T00, T01, T02, T10, T11, T12,
     qn, w, x, y, zq, s0, s1, s2, R00, R01, R02, R10, R11, R12, R20, R21, R22,
     U00, U01, U02, U10, U11, U12, ca, cb, cc, det, mxp, myp) = _proj_common(
        means_ptr, quats_ptr, scales_ptr, view_ptr, K_ptr, G, N, W, H, near, far, eps2d, BLOCK)
    o = tl.load(opac_ptr + g, mask=m, other=0.0)
    thr = 1.0 / 255.0
    ok = front & (det > 0) & (o >= thr)
    extend = tl.minimum(tl.sqrt_rn(2.0 * tl.log(tl.maximum(o, thr) / thr)), 3.33)
    rx = tl.ceil(extend * tl.sqrt_rn(tl.maximum(ca, 0.0)))
    ry = tl.ceil(extend * tl.sqrt_rn(tl.maximum(cc, 0.0)))
    ok = ok & ((rx > 0) | (ry > 0))
    ok = ok & (mxp + rx > 0) & (mxp - rx < W) & (myp + ry > 0) & (myp - ry < H)
    hd = 0.5 * (ca - cc)
    lam = 0.5 * (ca + cc) + tl.sqrt_rn(hd * hd + cb * cb)
    radius = tl.where(ok, tl.ceil(3.0 * tl.sqrt_rn(tl.maximum(lam, 0.0))), 0.0)
    tx0 = tl.minimum(tl.maximum(tl.floor((mxp - rx) / TS), 0.0), TXn - 1.0)
    tx1 = tl.minimum(tl.maximum(tl.floor((mxp + rx) / TS), 0.0), TXn - 1.0)
    ty0 = tl.minimum(tl.maximum(tl.floor((myp - ry) / TS), 0.0), TYn - 1.0)
    ty1 = tl.minimum(tl.maximum(tl.floor((myp + ry) / TS), 0.0), TYn - 1.0)
    count = tl.where(ok, (tx1 - tx0 + 1.0) * (ty1 - ty0 + 1.0), 0.0)
    dets = tl.where(ok, det, 1.0)
    tl.store(params_ptr + 0 * G + g, mxp, mask=m)
    tl.store(params_ptr + 1 * G + g, myp, mask=m)
    tl.store(params_ptr + 2 * G + g, cc / dets, mask=m)
    tl.store(params_ptr + 3 * G + g, -cb / dets, mask=m)
    tl.store(params_ptr + 4 * G + g, ca / dets, mask=m)
    tl.store(params_ptr + 5 * G + g, o, mask=m)
    tl.store(z_ptr + g, z, mask=m)
    tl.store(rect_ptr + g * 4 + 0, tl.where(ok, tx0, 1.0).to(tl.int32), mask=m)
    tl.store(rect_ptr + g * 4 + 1, tl.where(ok, ty0, 1.0).to(tl.int32), mask=m)
    tl.store(rect_ptr + g * 4 + 2, tl.where(ok, tx1, 0.0).to(tl.int32), mask=m)
    tl.store(rect_ptr + g * 4 + 3, tl.where(ok, ty1, 0.0).to(tl.int32), mask=m)
    tl.store(count_ptr + g, count.to(tl.int32), mask=m)
    tl.store(radii_ptr + g, radius.to(tl.int32), mask=m)


@triton.jit
def _project_bwd_kernel(means_ptr, quats_ptr, scales_ptr, view_ptr, K_ptr, count_ptr, gparams_ptr, gz_ptr,
                        gmeans_ptr, gquats_ptr, gscales_ptr, gopac_ptr,
                        G, N, W, H, near, far, eps2d, BLOCK: tl.constexpr):
    (g, m, front, z, rz, px, py, xr, yr, xc, yc, tx, ty, lxn, lxp, lyn, lyp, fx, fy,
     r00, r01, r02, r10, r11, r12, r20, r21, r22, T00, T01, T02, T10, T11, T12,
     qn, w, x, y, zq, s0, s1, s2, R00, R01, R02, R10, R11, R12, R20, R21, R22,
     U00, U01, U02, U10, U11, U12, ca, cb, cc, det, mxp, myp) = _proj_common(
        means_ptr, quats_ptr, scales_ptr, view_ptr, K_ptr, G, N, W, H, near, far, eps2d, BLOCK)
    # only rendered Gaussians (count > 0) receive gradients; the others' are exactly 0 (as in torch)
    ok = m & (tl.load(count_ptr + g, mask=m, other=0) > 0)
    gmx, gmy, gA, gB, gC, go = _load_rows6(gparams_ptr, G, g, ok, m)
    gzz = tl.load(gz_ptr + g, mask=ok, other=0.0)
    # conic (A, B, C) = (c, -b, a) / det  ->  2D covariance (a, b, c)
    dets = tl.where(ok, det, 1.0)
    id2 = 1.0 / (dets * dets)
    ga = (-gA * cc * cc + gB * cb * cc - gC * cb * cb) * id2
    gb = (2.0 * gA * cb * cc - gB * (ca * cc + cb * cb) + 2.0 * gC * ca * cb) * id2
    gc = (-gA * cb * cb + gB * ca * cb - gC * ca * ca) * id2
    # covariance = U U^T
    gU00 = 2.0 * ga * U00 + gb * U10
    gU01 = 2.0 * ga * U01 + gb * U11
    gU02 = 2.0 * ga * U02 + gb * U12
    gU10 = 2.0 * gc * U10 + gb * U00
    gU11 = 2.0 * gc * U11 + gb * U01
    gU12 = 2.0 * gc * U12 + gb * U02
    # U = T M with M = R_g diag(s): gM[k][j] = sum_r T[r][k] gU[r][j]
    gM00 = T00 * gU00 + T10 * gU10
    gM01 = T00 * gU01 + T10 * gU11
    gM02 = T00 * gU02 + T10 * gU12
    gM10 = T01 * gU00 + T11 * gU10
    gM11 = T01 * gU01 + T11 * gU11
    gM12 = T01 * gU02 + T11 * gU12
    gM20 = T02 * gU00 + T12 * gU10
    gM21 = T02 * gU01 + T12 * gU11
    gM22 = T02 * gU02 + T12 * gU12
    gs0 = gM00 * R00 + gM10 * R10 + gM20 * R20
    gs1 = gM01 * R01 + gM11 * R11 + gM21 * R21
    gs2 = gM02 * R02 + gM12 * R12 + gM22 * R22
    g00 = gM00 * s0
    g01 = gM01 * s1
    g02 = gM02 * s2
    g10 = gM10 * s0
    g11 = gM11 * s1
    g12 = gM12 * s2
    g20 = gM20 * s0
    g21 = gM21 * s1
    g22 = gM22 * s2
    gw = 2.0 * (-zq * g01 + y * g02 + zq * g10 - x * g12 - y * g20 + x * g21)
    gx = 2.0 * (y * g01 + zq * g02 + y * g10 - 2.0 * x * g11 - w * g12 + zq * g20 + w * g21 - 2.0 * x * g22)
    gy = 2.0 * (-2.0 * y * g00 + x * g01 + w * g02 + x * g10 + zq * g12 - w * g20 + zq * g21 - 2.0 * y * g22)
    gzq = 2.0 * (-2.0 * zq * g00 - w * g01 + x * g02 + w * g10 - 2.0 * zq * g11 + y * g12 + x * g20 + y * g21)
    # through the normalisation q / |q|
    dotq = gw * w + gx * x + gy * y + gzq * zq
    tl.store(gquats_ptr + g * 4 + 0, (gw - w * dotq) / qn, mask=m)
    tl.store(gquats_ptr + g * 4 + 1, (gx - x * dotq) / qn, mask=m)
    tl.store(gquats_ptr + g * 4 + 2, (gy - y * dotq) / qn, mask=m)
    tl.store(gquats_ptr + g * 4 + 3, (gzq - zq * dotq) / qn, mask=m)
    tl.store(gscales_ptr + g * 3 + 0, gs0, mask=m)
    tl.store(gscales_ptr + g * 3 + 1, gs1, mask=m)
    tl.store(gscales_ptr + g * 3 + 2, gs2, mask=m)
    tl.store(gopac_ptr + g, go, mask=m)
    # T rows: T0 = fx rz Rv0 - fx tx rz^2 Rv2, T1 = fy rz Rv1 - fy ty rz^2 Rv2 (Rv rows of the view rotation)
    gT00 = gU00 * (R00 * s0) + gU01 * (R01 * s1) + gU02 * (R02 * s2)
    gT01 = gU00 * (R10 * s0) + gU01 * (R11 * s1) + gU02 * (R12 * s2)
    gT02 = gU00 * (R20 * s0) + gU01 * (R21 * s1) + gU02 * (R22 * s2)
    gT10 = gU10 * (R00 * s0) + gU11 * (R01 * s1) + gU12 * (R02 * s2)
    gT11 = gU10 * (R10 * s0) + gU11 * (R11 * s1) + gU12 * (R12 * s2)
    gT12 = gU10 * (R20 * s0) + gU11 * (R21 * s1) + gU12 * (R22 * s2)
    d0_r0 = gT00 * r00 + gT01 * r01 + gT02 * r02  # gT0 . Rv0
    d0_r2 = gT00 * r20 + gT01 * r21 + gT02 * r22  # gT0 . Rv2
    d1_r1 = gT10 * r10 + gT11 * r11 + gT12 * r12
    d1_r2 = gT10 * r20 + gT11 * r21 + gT12 * r22
    rz2 = rz * rz
    g_tx = -fx * rz2 * d0_r2
    g_ty = -fy * rz2 * d1_r2
    g_z = (-fx * rz2 * d0_r0 + 2.0 * fx * tx * rz2 * rz * d0_r2
           - fy * rz2 * d1_r1 + 2.0 * fy * ty * rz2 * rz * d1_r2)
    # tx = z clamp(x / z): derivative 1 in x inside the clamp; in z: clamp(x/z) - [inside] x/z
    in_x = ((xr >= -lxn) & (xr <= lxp)).to(tl.float32)
    in_y = ((yr >= -lyn) & (yr <= lyp)).to(tl.float32)
    g_x = g_tx * in_x + gmx * fx * rz
    g_y = g_ty * in_y + gmy * fy * rz
    g_z += g_tx * (xc - in_x * xr) + g_ty * (yc - in_y * yr)
    g_z += -gmx * fx * px * rz2 - gmy * fy * py * rz2 + gzz
    g_x = tl.where(front, g_x, 0.0)
    g_y = tl.where(front, g_y, 0.0)
    g_z = tl.where(front, g_z, 0.0)
    # camera point p = Rv m + t  ->  world mean
    tl.store(gmeans_ptr + g * 3 + 0, r00 * g_x + r10 * g_y + r20 * g_z, mask=m)
    tl.store(gmeans_ptr + g * 3 + 1, r01 * g_x + r11 * g_y + r21 * g_z, mask=m)
    tl.store(gmeans_ptr + g * 3 + 2, r02 * g_x + r12 * g_y + r22 * g_z, mask=m)


@triton.jit
def _sh_dirs(means_ptr, view_ptr, g, m, N):
    """Unit view directions (mean - camera centre) of Gaussians g, their length before normalising."""
    b = g // N
    r00, r01, r02, t0, r10, r11, r12, t1, r20, r21, r22, t2 = _load_view(view_ptr, b, m)
    # camera centre -R^T t
    vx = tl.load(means_ptr + g * 3 + 0, mask=m, other=1.0) + (r00 * t0 + r10 * t1 + r20 * t2)
    vy = tl.load(means_ptr + g * 3 + 1, mask=m, other=0.0) + (r01 * t0 + r11 * t1 + r21 * t2)
    vz = tl.load(means_ptr + g * 3 + 2, mask=m, other=0.0) + (r02 * t0 + r12 * t1 + r22 * t2)
    nrm = tl.maximum(tl.sqrt(vx * vx + vy * vy + vz * vz), 1e-12)
    return vx / nrm, vy / nrm, vz / nrm, nrm


@triton.jit
def _sh_setup(coef_ptr, sb, sn, means_ptr, view_ptr, G, N, BLOCK: tl.constexpr):
    """This program's Gaussians, their unit view directions (and squares) and coefficient rows."""
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = g < G
    x, y, z, nrm = _sh_dirs(means_ptr, view_ptr, g, m, N)
    cb = coef_ptr + (g // N).to(tl.int64) * sb + (g % N).to(tl.int64) * sn
    return g, m, x, y, z, nrm, x * x, y * y, z * z, cb


@triton.jit
def _sh_acc(cb, k: tl.constexpr, sk, sc, m, bk, acc_r, acc_g, acc_b):
    """acc += basis value bk times coefficient k (RGB)."""
    acc_r += bk * tl.load(cb + k * sk + 0 * sc, mask=m, other=0.0)
    acc_g += bk * tl.load(cb + k * sk + 1 * sc, mask=m, other=0.0)
    acc_b += bk * tl.load(cb + k * sk + 2 * sc, mask=m, other=0.0)
    return acc_r, acc_g, acc_b


@triton.jit
def _sh_coef_grad(cb, k: tl.constexpr, sk, sc, m, bk, gr, gg, gb, gc):
    """Coefficient k's gradient (basis value bk times the colour gradient, stored at gc + 3k);
    returns coefficient k . colour gradient (what the basis value's own gradient is scaled by)."""
    tl.store(gc + 3 * k + 0, bk * gr, mask=m)
    tl.store(gc + 3 * k + 1, bk * gg, mask=m)
    tl.store(gc + 3 * k + 2, bk * gb, mask=m)
    return (tl.load(cb + k * sk, mask=m, other=0.0) * gr + tl.load(cb + k * sk + sc, mask=m, other=0.0) * gg
            + tl.load(cb + k * sk + 2 * sc, mask=m, other=0.0) * gb)


@triton.jit
def _sh_fwd_kernel(coef_ptr, sb, sn, sk, sc, means_ptr, view_ptr, out_ptr, G, N,
                   DEG: tl.constexpr, BLOCK: tl.constexpr):
    """colour = max(SH_DEG(dir) . coefficients + 0.5, 0), 3DGS basis (sh.py); coefficients by strides
    (an expanded [B,N,K,3] view is read in place)."""
    g, m, x, y, z, nrm, xx, yy, zz, cb = _sh_setup(coef_ptr, sb, sn, means_ptr, view_ptr, G, N, BLOCK)
    acc_r = tl.zeros([BLOCK], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK], dtype=tl.float32)
    acc_r, acc_g, acc_b = _sh_acc(cb, 0, sk, sc, m, 0.28209479177387814, acc_r, acc_g, acc_b)
    if DEG >= 1:
        acc_r, acc_g, acc_b = _sh_acc(cb, 1, sk, sc, m, -0.4886025119029199 * y, acc_r, acc_g, acc_b)
        acc_r, acc_g, acc_b = _sh_acc(cb, 2, sk, sc, m, 0.4886025119029199 * z, acc_r, acc_g, acc_b)
        acc_r, acc_g, acc_b = _sh_acc(cb, 3, sk, sc, m, -0.4886025119029199 * x, acc_r, acc_g, acc_b)
    if DEG >= 2:
        acc_r, acc_g, acc_b = _sh_acc(cb, 4, sk, sc, m, 1.0925484305920792 * x * y, acc_r, acc_g, acc_b)
        acc_r, acc_g, acc_b = _sh_acc(cb, 5, sk, sc, m, -1.0925484305920792 * y * z, acc_r, acc_g, acc_b)
        acc_r, acc_g, acc_b = _sh_acc(cb, 6, sk, sc, m, 0.31539156525252005 * (2.0 * zz - xx - yy), acc_r, acc_g, acc_b)
        acc_r, acc_g, acc_b = _sh_acc(cb, 7, sk, sc, m, -1.0925484305920792 * x * z, acc_r, acc_g, acc_b)
        acc_r, acc_g, acc_b = _sh_acc(cb, 8, sk, sc, m, 0.5462742152960396 * (xx - yy), acc_r, acc_g, acc_b)
    if DEG >= 3:
        acc_r, acc_g, acc_b = _sh_acc(cb, 9, sk, sc, m, -0.5900435899266435 * y * (3.0 * xx - yy), acc_r, acc_g, acc_b)
        acc_r, acc_g, acc_b = _sh_acc(cb, 10, sk, sc, m, 2.890611442640554 * x * y * z, acc_r, acc_g, acc_b)
        acc_r, acc_g, acc_b = _sh_acc(cb, 11, sk, sc, m, -0.4570457994644658 * y * (4.0 * zz - xx - yy), acc_r, acc_g, acc_b)
        acc_r, acc_g, acc_b = _sh_acc(cb, 12, sk, sc, m, 0.3731763325901154 * z * (2.0 * zz - 3.0 * xx - 3.0 * yy), acc_r, acc_g, acc_b)
        acc_r, acc_g, acc_b = _sh_acc(cb, 13, sk, sc, m, -0.4570457994644658 * x * (4.0 * zz - xx - yy), acc_r, acc_g, acc_b)
        acc_r, acc_g, acc_b = _sh_acc(cb, 14, sk, sc, m, 1.445305721320277 * z * (xx - yy), acc_r, acc_g, acc_b)
        acc_r, acc_g, acc_b = _sh_acc(cb, 15, sk, sc, m, -0.5900435899266435 * x * (xx - 3.0 * yy), acc_r, acc_g, acc_b)
    tl.store(out_ptr + g * 3 + 0, tl.maximum(acc_r + 0.5, 0.0), mask=m)
    tl.store(out_ptr + g * 3 + 1, tl.maximum(acc_g + 0.5, 0.0), mask=m)
    tl.store(out_ptr + g * 3 + 2, tl.maximum(acc_b + 0.5, 0.0), mask=m)


@triton.jit
def _sh_bwd_kernel(coef_ptr, sb, sn, sk, sc, means_ptr, view_ptr, col_ptr, gcol_ptr, gcoef_ptr, gmeans_ptr, G, N, K,
                   DEG: tl.constexpr, BLOCK: tl.constexpr):
    """Gradients of _sh_fwd_kernel: to the coefficients ([G,K,3], the first (DEG+1)^2 written)
    and to the means through the view direction."""
    g, m, x, y, z, nrm, xx, yy, zz, cb = _sh_setup(coef_ptr, sb, sn, means_ptr, view_ptr, G, N, BLOCK)
    # the clamp at 0 passes the gradient where the colour is > 0 (torch also at exactly 0: measure zero)
    gr = tl.load(gcol_ptr + g * 3 + 0, mask=m, other=0.0)
    gg = tl.load(gcol_ptr + g * 3 + 1, mask=m, other=0.0)
    gb = tl.load(gcol_ptr + g * 3 + 2, mask=m, other=0.0)
    gr = tl.where(tl.load(col_ptr + g * 3 + 0, mask=m, other=0.0) > 0, gr, 0.0)
    gg = tl.where(tl.load(col_ptr + g * 3 + 1, mask=m, other=0.0) > 0, gg, 0.0)
    gb = tl.where(tl.load(col_ptr + g * 3 + 2, mask=m, other=0.0) > 0, gb, 0.0)
    gx = tl.zeros([BLOCK], dtype=tl.float32)
    gy = tl.zeros([BLOCK], dtype=tl.float32)
    gz = tl.zeros([BLOCK], dtype=tl.float32)
    gc = gcoef_ptr + g * (K * 3)  # this Gaussian's [K, 3] gradient row
    s = _sh_coef_grad(cb, 0, sk, sc, m, 0.28209479177387814, gr, gg, gb, gc)
    if DEG >= 1:
        s = _sh_coef_grad(cb, 1, sk, sc, m, -0.4886025119029199 * y, gr, gg, gb, gc)
        gy += s * (-0.4886025119029199)
        s = _sh_coef_grad(cb, 2, sk, sc, m, 0.4886025119029199 * z, gr, gg, gb, gc)
        gz += s * (0.4886025119029199)
        s = _sh_coef_grad(cb, 3, sk, sc, m, -0.4886025119029199 * x, gr, gg, gb, gc)
        gx += s * (-0.4886025119029199)
    if DEG >= 2:
        s = _sh_coef_grad(cb, 4, sk, sc, m, 1.0925484305920792 * x * y, gr, gg, gb, gc)
        gx += s * (1.0925484305920792 * y)
        gy += s * (1.0925484305920792 * x)
        s = _sh_coef_grad(cb, 5, sk, sc, m, -1.0925484305920792 * y * z, gr, gg, gb, gc)
        gy += s * (-1.0925484305920792 * z)
        gz += s * (-1.0925484305920792 * y)
        s = _sh_coef_grad(cb, 6, sk, sc, m, 0.31539156525252005 * (2.0 * zz - xx - yy), gr, gg, gb, gc)
        gx += s * (-2.0 * 0.31539156525252005 * x)
        gy += s * (-2.0 * 0.31539156525252005 * y)
        gz += s * (4.0 * 0.31539156525252005 * z)
        s = _sh_coef_grad(cb, 7, sk, sc, m, -1.0925484305920792 * x * z, gr, gg, gb, gc)
        gx += s * (-1.0925484305920792 * z)
        gz += s * (-1.0925484305920792 * x)
        s = _sh_coef_grad(cb, 8, sk, sc, m, 0.5462742152960396 * (xx - yy), gr, gg, gb, gc)
        gx += s * (2.0 * 0.5462742152960396 * x)
        gy += s * (-2.0 * 0.5462742152960396 * y)
    if DEG >= 3:
        s = _sh_coef_grad(cb, 9, sk, sc, m, -0.5900435899266435 * y * (3.0 * xx - yy), gr, gg, gb, gc)
        gx += s * (6.0 * -0.5900435899266435 * x * y)
        gy += s * (-0.5900435899266435 * (3.0 * xx - 3.0 * yy))
        s = _sh_coef_grad(cb, 10, sk, sc, m, 2.890611442640554 * x * y * z, gr, gg, gb, gc)
        gx += s * (2.890611442640554 * y * z)
        gy += s * (2.890611442640554 * x * z)
        gz += s * (2.890611442640554 * x * y)
        s = _sh_coef_grad(cb, 11, sk, sc, m, -0.4570457994644658 * y * (4.0 * zz - xx - yy), gr, gg, gb, gc)
        gx += s * (-2.0 * -0.4570457994644658 * x * y)
        gy += s * (-0.4570457994644658 * (4.0 * zz - xx - 3.0 * yy))
        gz += s * (8.0 * -0.4570457994644658 * y * z)
        s = _sh_coef_grad(cb, 12, sk, sc, m, 0.3731763325901154 * z * (2.0 * zz - 3.0 * xx - 3.0 * yy), gr, gg, gb, gc)
        gx += s * (-6.0 * 0.3731763325901154 * x * z)
        gy += s * (-6.0 * 0.3731763325901154 * y * z)
        gz += s * (0.3731763325901154 * (6.0 * zz - 3.0 * xx - 3.0 * yy))
        s = _sh_coef_grad(cb, 13, sk, sc, m, -0.4570457994644658 * x * (4.0 * zz - xx - yy), gr, gg, gb, gc)
        gx += s * (-0.4570457994644658 * (4.0 * zz - 3.0 * xx - yy))
        gy += s * (-2.0 * -0.4570457994644658 * x * y)
        gz += s * (8.0 * -0.4570457994644658 * x * z)
        s = _sh_coef_grad(cb, 14, sk, sc, m, 1.445305721320277 * z * (xx - yy), gr, gg, gb, gc)
        gx += s * (2.0 * 1.445305721320277 * x * z)
        gy += s * (-2.0 * 1.445305721320277 * y * z)
        gz += s * (1.445305721320277 * (xx - yy))
        s = _sh_coef_grad(cb, 15, sk, sc, m, -0.5900435899266435 * x * (xx - 3.0 * yy), gr, gg, gb, gc)
        gx += s * (-0.5900435899266435 * (3.0 * xx - 3.0 * yy))
        gy += s * (-6.0 * -0.5900435899266435 * x * y)
    # through the normalisation dir = v / |v|
    dot = gx * x + gy * y + gz * z
    tl.store(gmeans_ptr + g * 3 + 0, (gx - x * dot) / nrm, mask=m)
    tl.store(gmeans_ptr + g * 3 + 1, (gy - y * dot) / nrm, mask=m)
    tl.store(gmeans_ptr + g * 3 + 2, (gz - z * dot) / nrm, mask=m)


# ----------------------------------------------------------------------------- capacity state


class _Capacity:
    """Pair-buffer capacity of one (B, N, W, H, device) and the largest need seen (on the device)."""

    def __init__(self, cap: int, device):
        self.cap = cap
        self.need = torch.zeros((), dtype=torch.int32, device=device)
        self._host = None
        self._event = None

    def grow_to(self, need: int) -> bool:
        if need <= self.cap:
            return False
        self.cap = int(need * _CAPACITY_MARGIN) + _CAPACITY_SLACK
        _GENERATION[0] += 1
        return True

    def poll(self) -> None:
        """Grow from the last eager call's need if its copy has landed; never blocks."""
        if self._event is not None and self._event.query():
            self.grow_to(int(self._host.item()))
            self._event = None

    def post(self) -> None:
        """Start an asynchronous copy of the need to the host (CUDA, outside graph capture)."""
        if self.need.device.type != "cuda" or self._event is not None or _capturing(self.need.device):
            return
        if self._host is None:
            self._host = torch.zeros((), dtype=torch.int32, pin_memory=True)
        self._host.copy_(self.need, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()


_CAPS: dict[tuple, _Capacity] = {}
_GENERATION = [0]  # bumped whenever a capacity grows: graphs captured before are stale


def generation() -> int:
    """Changes whenever a pair buffer has grown; re-capture graphs that were captured before."""
    return _GENERATION[0]


def watch_overflow() -> int:
    """Non-blocking overflow watch for callers that replay captured graphs: starts an async copy
    of each buffer's need and grows any whose previous copy shows an overflow. Returns generation()."""
    for c in _CAPS.values():
        c.poll()
        c.post()
    return _GENERATION[0]


def check_overflow() -> bool:
    """Read every buffer's largest need (one host sync), grow those that overflowed.

    Returns True when any grew: frames since the last check were rendered
    correctly but by the slow path, and CUDA graphs captured with the old
    capacity should be captured again to get the fast path back.
    """
    grew = False
    for c in _CAPS.values():
        grew |= c.grow_to(int(c.need.item()))
    return grew


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------------------------- per Gaussian


def _project(means, quats, scales, opacities, viewmats, Ks, W, H, near, far, eps2d):
    """EWA projection of all B*N Gaussians (culled ones masked, not removed): differentiable
    mx, my, conic (A, B, C), opacity, depth, plus ok [G] and radii [B,N] (as torch_ref)."""
    B, N = means.shape[:2]
    dev = means.device
    Rw = viewmats[:, :3, :3]
    mean_c = (means @ Rw.transpose(1, 2) + viewmats[:, None, :3, 3]).reshape(B * N, 3)
    x, y, z = mean_c.unbind(-1)
    with torch.no_grad():
        front = (z >= near) & (z <= far)
    # culled Gaussians get harmless values so that nothing below divides by a bad depth (no NaN grads)
    z = torch.where(front, z, torch.ones_like(z))
    b = torch.div(torch.arange(B * N, device=dev), N, rounding_mode="floor")  # image of each Gaussian
    a, bb, c, det, mx, my = ewa_projection(x, y, z, Ks.index_select(0, b), Rw.index_select(0, b), quats.reshape(-1, 4), scales.reshape(-1, 3),
                                           W, H, eps2d)
    o = opacities.reshape(-1)
    with torch.no_grad():
        ok, rx, ry, lam = screen_box(front & (det > 0) & (o >= ALPHA_THRESHOLD), o, a, bb, c, mx, my, W, H)
        radii = torch.where(ok, torch.ceil(3.0 * lam.clamp_min(0).sqrt()), torch.zeros_like(lam)).to(torch.int32)
        # tiles that the box [m - r, m + r] touches (inclusive), empty for culled Gaussians
        TXn, TYn = (W + TILE - 1) // TILE, (H + TILE - 1) // TILE
        mxd, myd = mx.detach(), my.detach()
        tx0 = torch.floor((mxd - rx) / TILE).clamp(0, TXn - 1)
        tx1 = torch.floor((mxd + rx) / TILE).clamp(0, TXn - 1)
        ty0 = torch.floor((myd - ry) / TILE).clamp(0, TYn - 1)
        ty1 = torch.floor((myd + ry) / TILE).clamp(0, TYn - 1)
        # culled: an empty rectangle (x0 > x1), built without a host-to-device copy (graph capture)
        rect = torch.stack([torch.where(ok, tx0, 1.0), torch.where(ok, ty0, 1.0), torch.where(ok, tx1, 0.0),
                            torch.where(ok, ty1, 0.0)], 1).to(torch.int32)
        count = torch.where(ok, (tx1 - tx0 + 1) * (ty1 - ty0 + 1), torch.zeros_like(tx0)).to(torch.int32)
    det = torch.where(ok, det, torch.ones_like(det))
    inv = 1.0 / det
    return {"mx": mx, "my": my, "A": c * inv, "B": -bb * inv, "C": a * inv, "opacity": o, "depth": z,
            "ok": ok, "rect": rect, "count": count, "radii": radii.view(B, N)}


class _Project(torch.autograd.Function):
    """The fused projection kernel (forward and its hand-written backward): means, quats, scales,
    opacities -> params [6,G] (mx, my, conic A, B, C, opacity) and depth [G]; rect, count, radii
    ride along without gradients.  Cameras get no gradient (the torch path is used when they need one)."""

    @staticmethod
    def forward(ctx, means, quats, scales, opac, viewmats, Ks, W, H, near, far, eps2d):
        B, N = means.shape[:2]
        G = B * N
        dev = means.device
        means, quats, scales = means.contiguous(), quats.contiguous(), scales.contiguous()
        opac, viewmats, Ks = opac.contiguous(), viewmats.contiguous(), Ks.contiguous()
        params = torch.empty(6, G, dtype=torch.float32, device=dev)
        z = torch.empty(G, dtype=torch.float32, device=dev)
        rect = torch.empty(G, 4, dtype=torch.int32, device=dev)
        count = torch.empty(G, dtype=torch.int32, device=dev)
        radii = torch.empty(G, dtype=torch.int32, device=dev)
        TXn, TYn = (W + TILE - 1) // TILE, (H + TILE - 1) // TILE
        BLOCK = 128
        _project_fwd_kernel[(triton.cdiv(G, BLOCK),)](means, quats, scales, opac, viewmats, Ks, params, z, rect, count, radii,
                                                      G, N, W, H, TXn, TYn, near, far, eps2d, BLOCK=BLOCK, TS=TILE)
        ctx.save_for_backward(means, quats, scales, viewmats, Ks, count)
        ctx.meta = (B, N, W, H, near, far, eps2d)
        ctx.mark_non_differentiable(rect, count, radii)
        return params, z, rect, count, radii

    @staticmethod
    def backward(ctx, gparams, gz, _r, _c, _d):
        means, quats, scales, viewmats, Ks, count = ctx.saved_tensors
        B, N, W, H, near, far, eps2d = ctx.meta
        G = B * N
        gparams = torch.zeros(6, G, dtype=torch.float32, device=means.device) if gparams is None else gparams.contiguous()
        gz = torch.zeros(G, dtype=torch.float32, device=means.device) if gz is None else gz.contiguous()
        gm, gq, gs = torch.empty_like(means), torch.empty_like(quats), torch.empty_like(scales)
        go = torch.empty(B, N, dtype=torch.float32, device=means.device)
        BLOCK = 128
        _project_bwd_kernel[(triton.cdiv(G, BLOCK),)](means, quats, scales, viewmats, Ks, count, gparams, gz, gm, gq, gs, go,
                                                      G, N, W, H, near, far, eps2d, BLOCK=BLOCK)
        return gm, gq, gs, go, None, None, None, None, None, None, None


def _project_fused(means, quats, scales, opacities, viewmats, Ks, W, H, near, far, eps2d):
    """_project's result from the fused kernel."""
    B, N = means.shape[:2]
    params, z, rect, count, radii = _Project.apply(means, quats, scales, opacities, viewmats, Ks, W, H, near, far, eps2d)
    return {"params": params, "depth": z, "rect": rect, "count": count, "radii": radii.view(B, N),
            "ok": count > 0}


class _SH(torch.autograd.Function):
    """Fused SH colours (sh.py's basis): coefficients [B,N,K,3] (any strides), means [B,N,3],
    viewmats [B,4,4] -> colours [B*N,3] = max(SH + 0.5, 0); the cameras get no gradient."""

    @staticmethod
    def forward(ctx, coeffs, means, viewmats, degree):
        B, N, K = coeffs.shape[:3]
        G = B * N
        means, viewmats = means.contiguous(), viewmats.contiguous()
        out = torch.empty(G, 3, dtype=torch.float32, device=means.device)
        BLOCK = 128
        _sh_fwd_kernel[(triton.cdiv(G, BLOCK),)](coeffs, *coeffs.stride(), means, viewmats, out, G, N, DEG=degree, BLOCK=BLOCK)
        ctx.save_for_backward(coeffs, means, viewmats, out)
        ctx.degree = degree
        return out

    @staticmethod
    def backward(ctx, gcol):
        coeffs, means, viewmats, out = ctx.saved_tensors
        B, N, K = coeffs.shape[:3]
        G = B * N
        gcoef = torch.zeros(B, N, K, 3, dtype=torch.float32, device=means.device)
        gmeans = torch.empty_like(means)
        BLOCK = 128
        _sh_bwd_kernel[(triton.cdiv(G, BLOCK),)](coeffs, *coeffs.stride(), means, viewmats, out, gcol.contiguous(), gcoef, gmeans,
                                                 G, N, K, DEG=ctx.degree, BLOCK=BLOCK)
        return gcoef, gmeans, None, None


# ----------------------------------------------------------------------------- binning


def _bin(proj, B, N, W, H, state: _Capacity | None, device, params=None, cull: bool = False, key16: bool = False):
    """Depth order per image, the pair buffer sorted by tile, tile ranges and the overflow flag.

    ``cull`` (needs ``params``, [6, G]): pairs whose Gaussian reaches no pixel of the tile are sent
    past the last tile's range.  ``key16``: tile keys sorted as int16 where they fit (half the radix
    passes of int32)."""
    G = B * N
    TXn, TYn = (W + TILE - 1) // TILE, (H + TILE - 1) // TILE
    TPI = TXn * TYn
    with torch.no_grad():
        z = torch.where(proj["ok"], proj["depth"].detach(), torch.full_like(proj["depth"], float("inf")))
        _, idx = torch.sort(z.view(B, N), dim=1, stable=True)
        order64 = (idx + _constant("image_offsets", (B, N), device, lambda: torch.arange(B, device=device)[:, None] * N)).view(-1)
        order = order64.to(torch.int32)
        cnt = proj["count"].index_select(0, order64)
        incl = torch.cumsum(cnt, 0, dtype=torch.int32)
        total = incl[-1]
        if state is None:
            # first use of this shape: size the buffer from the scene (one host read); inside a
            # capture that cannot be read, so guess generously (an overflow is still caught)
            need = 16 * G if _capturing(device) else int(total)
            state = _Capacity(int(need * _CAPACITY_MARGIN) + _CAPACITY_SLACK, device)
            _CAPS[_key(B, N, W, H, device)] = state
        cap = state.cap
        torch.maximum(state.need, total, out=state.need)
        ovf = (total > cap).to(torch.int32).reshape(1)
        short = key16 and B * TPI < 2**15 - 1
        kdt, kmax = (torch.int16, 2**15 - 1) if short else (torch.int32, 2**31 - 1)
        keys = torch.empty(cap, dtype=kdt, device=device)
        gids = torch.empty(cap, dtype=torch.int32, device=device)
        cull = cull and params is not None
        BLOCK = 256
        _emit_pairs_kernel[(triton.cdiv(cap, BLOCK),)](incl, order, proj["rect"], params if cull else incl, keys, gids, cap, G, N,
                                                        TXn, TPI, LOG_G=max(1, math.ceil(math.log2(G + 1))), BLOCK=BLOCK,
                                                        CULL=cull, KEY_MAX=kmax, TS=TILE)
        skeys, perm = torch.sort(keys, stable=True)
        ids_sorted = gids.index_select(0, perm)
        tiles = _constant("tile_ids", (B * TPI + 1, kdt), device, lambda: torch.arange(B * TPI + 1, dtype=kdt, device=device))
        ranges = torch.searchsorted(skeys, tiles, out_int32=True)
    return dict(order=order, ids=ids_sorted, ranges=ranges, ovf=ovf, rect=proj["rect"], TX=TXn, TPI=TPI, state=state)


def _key(B, N, W, H, device):
    return (B, N, W, H, str(device))


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(name: str, key: tuple, device, make) -> torch.Tensor:
    """A per-shape constant tensor (image offsets, tile ids) built once, outside any capture, and read
    by every later frame: in a replayed frame each would otherwise be one more graph node."""
    k = (name, key, str(device))
    t = _CONSTANTS.get(k)
    if t is None:
        t = make()
        if not _capturing(device):  # memory of a capture's pool must not outlive its graph in this cache
            _CONSTANTS[k] = t
    return t


# ----------------------------------------------------------------------------- compositing


class _Raster(torch.autograd.Function):
    """params [6,G] (mx, my, A, B, C, opacity), feats [G,DP] -> out [B*H*W, DP], T_final [B*H*W]."""

    @staticmethod
    def forward(ctx, params, feats, bins, B, N, W, H, alpha_max, chunk, num_warps, split, prefetch, seq_chunk, bwd_cfg):
        G, DP = feats.shape
        dev = feats.device
        out = torch.empty(B * H * W, DP, dtype=torch.float32, device=dev)
        tfin = torch.empty(B * H * W, dtype=torch.float32, device=dev)
        # the stop positions are written only when a backward will read them
        last = bwd_cfg[3] and any(ctx.needs_input_grad[:2])
        lastpos = torch.empty(B * H * W if last else 1, dtype=torch.int32, device=dev)
        params, feats = params.contiguous(), feats.contiguous()
        grid = (B * bins["TPI"],)
        if seq_chunk and DP == 4:
            _raster_fwd_seq_kernel[grid](params, feats, bins["rect"], bins["ids"], bins["order"], bins["ranges"], bins["ovf"],
                                         out, tfin, lastpos, G, N, W, H, bins["TX"], bins["TPI"], alpha_max,
                                         CH=seq_chunk, TS=TILE, LAST=last, num_warps=num_warps)
        else:
            _raster_fwd_kernel[grid](params, feats, bins["rect"], bins["ids"], bins["order"], bins["ranges"], bins["ovf"],
                                     out, tfin, lastpos, G, N, W, H, bins["TX"], bins["TPI"], alpha_max,
                                     DP=DP, CH=chunk, TS=TILE, SPLIT=split, LAST=last, PREFETCH=split and prefetch,
                                     num_warps=num_warps)
        ctx.save_for_backward(params, feats, bins["rect"], bins["ids"], bins["order"], bins["ranges"], bins["ovf"], out, tfin,
                              lastpos)
        ctx.meta = (B, N, W, H, bins["TX"], bins["TPI"], alpha_max, bwd_cfg[0], bwd_cfg[1], split, bwd_cfg[2], last,
                    bwd_cfg[4], bwd_cfg[5], bwd_cfg[6])
        return out, tfin

    @staticmethod
    def backward(ctx, g_out, g_t):
        params, feats, rect, ids, order, ranges, ovf, out, tfin, lastpos = ctx.saved_tensors
        B, N, W, H, TX, TPI, alpha_max, chunk, num_warps, split, one_reduce, last, packed, skip, prefetch_bwd = ctx.meta
        G, DP = feats.shape
        g_out = torch.zeros_like(out) if g_out is None else g_out.contiguous().float()
        g_t = torch.zeros_like(tfin) if g_t is None else g_t.contiguous().float()
        packed = packed and split
        if packed:
            # one [G, 16] buffer: mx, my, A, B, C, opacity, 4 features, 6 unused (64-byte rows)
            gpack = torch.zeros(G, 16, dtype=torch.float32, device=feats.device)
            gparams = gfeats = gpack  # not written by the kernel in this mode
        else:
            gpack = params  # not written by the kernel in this mode
            gparams = torch.zeros_like(params)
            gfeats = torch.zeros_like(feats)
        _raster_bwd_kernel[(B * TPI,)](params, feats, rect, ids, order, ranges, ovf, out, tfin, lastpos, g_out, g_t,
                                       gparams, gfeats, gpack, G, N, W, H, TX, TPI, alpha_max,
                                       DP=DP, CH=chunk, TS=TILE, SPLIT=split, ONE_REDUCE=split and one_reduce,
                                       LAST=last, PACK=packed, SKIP=skip, PREFETCH=split and prefetch_bwd, num_warps=num_warps)
        if packed:
            gparams = gpack[:, :6].t().contiguous()
            gfeats = gpack[:, 6:10].contiguous()
        return gparams, gfeats, None, None, None, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- entry point


def triton_device_ok(device) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type == "cuda":
        return True, "ok"
    if interpreting():
        return True, "ok (Triton interpreter)"
    return False, "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for slow CPU checks)"


@register_backend("triton")
def render_triton(means, quats, scales, opacities, colors, viewmats, Ks, width: int, height: int,
                  sh_degree: int | None = None, backgrounds=None, near: float = NEAR, far: float = FAR,
                  eps2d: float = EPS2D, alpha_max: float = ALPHA_MAX, chunk: int = 8, num_warps: int = 4, chunk_bwd: int = 8,
                  num_warps_bwd: int = 4, fused_projection: bool = True, split_channels: bool = True, one_reduce: bool = True,
                  last_index: bool = True, packed_grads: bool = True, skip_empty: bool = False, tile_cull: bool = True,
                  key16: bool = True, prefetch: bool = True, seq_chunk: int = 0, prefetch_bwd: bool = False,
                  render_depth: bool = True, **kw) -> RenderOutput:
    """Render B frames with the Triton tile rasteriser; same arguments as ``render_torch``.

    ``chunk`` (Gaussians composited per step of a tile program, a power of two) and
    ``num_warps`` (per tile program), and ``chunk_bwd``/``num_warps_bwd`` for the backward
    pass, change speed only (defaults: the fastest of a sweep on an H100, docs/BENCHMARKS.md); ``fused_projection=False`` projects
    with plain torch ops instead of the fused kernel (same results; for checks);
    ``split_channels``: per-channel accumulators when there are 3 colour channels (speed only);
    ``one_reduce``: the backward's per-Gaussian sums as one multi-operand reduction (with
    split channels; same results).
    ``last_index``: the forward also stores each pixel's stop position (int32 a pixel) and the
    backward walks each tile's list only up to its pixels' last stop (no per-chunk "all done"
    test); ``packed_grads``: the backward's per-Gaussian sums cut to ten and added with one atomic
    block per chunk into a [G, 16] buffer (with split channels); ``skip_empty``: the backward
    skips the gradient work of chunks with no kept pair at any pixel of the tile (one extra
    reduction per chunk).  All of these: same results, speed only.  Defaults: one_reduce +
    last_index + packed_grads on, skip_empty off — the fastest backward of the H100 sweep of
    2026-12-06 (batch 16 forward+backward 17.5 -> 11.0 ms; docs/BENCHMARKS.md).
    Forward and binning variants (same images and gradients up to float rounding, speed only):
    ``tile_cull`` drops the (Gaussian, tile) pairs of a box whose tile the Gaussian's ellipse
    misses (no pixel of the tile reaches alpha 1/255; 17-19 % of the pairs of a head), so both
    passes walk shorter lists; ``key16`` sorts the tile keys as int16 where they fit (B * tiles <
    32767); ``prefetch`` loads the forward's next chunk before compositing this one;
    ``seq_chunk`` > 0 (with RGB colours) composites the pairs one at a time with per-pixel values
    only, CH = seq_chunk pairs between the tile's "all done" tests, instead of the [chunk, pixels]
    blocks of the default forward; ``prefetch_bwd`` does in the backward what ``prefetch`` does in
    the forward (not yet timed on a GPU, so off).  ``render_depth=False``: ``depth`` is None (as
    with gsplat), for callers that only need colour and alpha.  Defaults: tile_cull + key16 + prefetch on, seq_chunk 0 — the
    fastest of the H100 sweep of 2026-12-08 (forward at batch 1 / 16 / 64: 0.48 / 3.41 / 12.3 ms ->
    0.28 / 1.65 / 6.30 ms; docs/BENCHMARKS.md).
    """
    unknown = set(kw) - _FOREIGN_OPTIONS
    if unknown:
        raise TypeError(f"render_triton got unexpected options {sorted(unknown)}")
    ok, why = triton_device_ok(means.device)
    if not ok:
        raise UserError(why)
    width, height = int(width), int(height)
    opacities = _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds,
                              alpha_max)
    out_dtype = means.dtype
    f32 = lambda t: t if t is None or t.dtype == torch.float32 else t.float()  # noqa: E731
    means, quats, scales, opacities, colors, viewmats, Ks = map(f32, (means, quats, scales, opacities, colors, viewmats, Ks))
    B, N = means.shape[:2]
    dev = means.device
    if B * N == 0:  # nothing to bin: background only
        from headavatar.render.gaussians.torch_ref import render_torch

        return render_torch(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree=sh_degree,
                            backgrounds=backgrounds, near=near, far=far, eps2d=eps2d, alpha_max=alpha_max)

    # the fused kernel unless the cameras themselves need gradients (then plain torch ops)
    if fused_projection and not (viewmats.requires_grad or Ks.requires_grad):
        proj = _project_fused(means, quats, scales, opacities, viewmats, Ks, width, height, near, far, eps2d)
        params = proj["params"]
    else:
        proj = _project(means, quats, scales, opacities, viewmats, Ks, width, height, near, far, eps2d)
        params = torch.stack([proj[k] for k in ("mx", "my", "A", "B", "C", "opacity")], 0)
    state = _CAPS.get(_key(B, N, width, height, dev))
    eager = not _capturing(dev)
    if state is not None and eager:
        state.poll()
    bins = _bin(proj, B, N, width, height, state, dev, params=params, cull=tile_cull, key16=key16)
    if eager:
        bins["state"].post()

    if sh_degree is not None and fused_projection and not viewmats.requires_grad:
        cols = _SH.apply(colors, means, viewmats, int(sh_degree))  # [G, 3]
    else:
        cols = _candidate_colors(means, colors, viewmats, sh_degree, None, N)  # [G, D]
    D = cols.shape[1]
    DP = max(2, triton.next_power_of_2(D + 1))
    parts = [cols, proj["depth"][:, None]]
    if DP > D + 1:
        parts.append(cols.new_zeros(B * N, DP - D - 1))
    feats = torch.cat(parts, 1)
    bwd_cfg = (int(chunk_bwd), int(num_warps_bwd), bool(one_reduce), bool(last_index), bool(packed_grads), bool(skip_empty),
               bool(prefetch_bwd))
    out, tfin = _Raster.apply(params, feats, bins, B, N, width, height, float(alpha_max), int(chunk), int(num_warps),
                              bool(split_channels and DP == 4), bool(prefetch), int(seq_chunk), bwd_cfg)
    out = out.view(B, height, width, DP)
    tfin = tfin.view(B, height, width, 1)
    alpha = 1.0 - tfin
    rgb = out[..., :D]
    if backgrounds is not None:  # colour + T * background in one operation (its result contiguous: no copy after)
        rgb = torch.addcmul(rgb, tfin, backgrounds[:, None, None, :].float())
    cast = lambda t: t.to(out_dtype).contiguous()  # noqa: E731
    # without render_depth (as gsplat's backend) no depth: two graph nodes fewer in a replayed frame
    depth = cast(out[..., D:D + 1] / alpha.clamp_min(1e-10)) if render_depth else None
    return RenderOutput(rgb=cast(rgb), alpha=cast(alpha), depth=depth, radii=proj["radii"])
