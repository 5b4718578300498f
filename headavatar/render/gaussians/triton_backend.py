"""The ``triton`` backend: a tile rasteriser of our own in Triton (CUDA; CPU through Triton's interpreter).

Same contract and conventions as the torch reference (``torch_ref``): EWA
projection with gsplat's clamped Jacobian and a 0.3 px^2 low-pass, near/far
culling, the opacity-aware bounding box, alpha = min(alpha_max, o exp(-sigma)),
pairs with alpha < 1/255 skipped, a pixel stops at the first contribution that
would bring its transmittance to <= 1e-4, then background and expected depth.

Pipeline, all on the device and without a host synchronisation, so that a
whole frame (forward and backward) can be captured in a CUDA graph:
  1. projection, SH colours and culling per Gaussian: plain torch ops (autograd
     gives their backward); culled Gaussians are masked, never compacted.
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
     reduced over the tile's pixels and added atomically per Gaussian.

Capacity and overflow: the pair buffer's capacity is sized from the scene on
first use of each (B, N, W, H) (one host read, outside any graph capture) with
a margin.  When a later frame needs more pairs, nothing is dropped: the
binning raises a device-side flag and the tile programs then walk every
Gaussian of their image in depth order instead of their tile list (correct,
only slower).  The largest need seen is kept on the device; eager calls check
it asynchronously (pinned copy + event, no sync) and grow the buffer for the
next call, and ``check_overflow()`` does it explicitly, off the hot path, for
callers that replay captured graphs (re-capture after it returns True).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from headavatar.errors import UserError
from headavatar.render.gaussians import RenderOutput, register_backend
from headavatar.render.gaussians.torch_ref import _EXTEND_MAX, ALPHA_THRESHOLD, T_MIN, _candidate_colors, _check_inputs
from headavatar.utils.rotations import quaternion_to_matrix

TILE = 16
_INT32_MAX = 2**31 - 1
# pair capacity = need * margin (+ slack) when sized from a scene; grown the same way on overflow
_CAPACITY_MARGIN = 1.5
_CAPACITY_SLACK = 4096
# options of other backends that this one accepts and ignores
_FOREIGN_OPTIONS = frozenset({"max_pairs", "render_depth", "tile_size", "packed", "absgrad", "sparse_grad",
                              "rasterize_mode", "channel_chunk"})


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _emit_pairs_kernel(incl_ptr, order_ptr, rect_ptr, keys_ptr, gids_ptr, cap, G, N, TX, TPI,
                       LOG_G: tl.constexpr, BLOCK: tl.constexpr):
    """Pair p -> (tile key, Gaussian id); p >= total gets key INT32_MAX (sorts last)."""
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
    key = tl.where(live, key, _INT32_MAX)
    tl.store(keys_ptr + p, key, mask=inb)
    tl.store(gids_ptr + p, tl.where(live, g, 0), mask=inb)


@triton.jit
def _chunk_alpha(params_ptr, rect_ptr, ids_sorted_ptr, order_ptr, ovf, i, end, G, tx, ty, pxf, pyf, alpha_max,
                 CH: tl.constexpr):
    """Load a chunk of CH Gaussians of the tile's list (or, after an overflow, of the image's
    depth order) and evaluate their alphas at the tile's pixels ([CH, PIX])."""
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
    mx = tl.load(params_ptr + 0 * G + gid, mask=m, other=0.0)
    my = tl.load(params_ptr + 1 * G + gid, mask=m, other=0.0)
    ca = tl.load(params_ptr + 2 * G + gid, mask=m, other=0.0)
    cb = tl.load(params_ptr + 3 * G + gid, mask=m, other=0.0)
    cc = tl.load(params_ptr + 4 * G + gid, mask=m, other=0.0)
    op = tl.load(params_ptr + 5 * G + gid, mask=m, other=0.0)
    dx = mx[:, None] - pxf[None, :]
    dy = my[:, None] - pyf[None, :]
    sigma = 0.5 * (ca[:, None] * dx * dx + cc[:, None] * dy * dy) + cb[:, None] * dx * dy
    og = op[:, None] * tl.exp(-sigma)
    alpha = tl.minimum(og, alpha_max)
    valid = m[:, None] & (alpha >= 1.0 / 255.0)
    return gid, m, dx, dy, og, alpha, valid, ca, cb, cc, op


@triton.jit
def _raster_fwd_kernel(params_ptr, feats_ptr, rect_ptr, ids_sorted_ptr, order_ptr, ranges_ptr, ovf_ptr,
                       out_ptr, tfin_ptr, G, N, W, H, TX, TPI, alpha_max,
                       DP: tl.constexpr, CH: tl.constexpr, TS: tl.constexpr):
    t = tl.program_id(0)
    img = t // TPI
    lt = t % TPI
    tx = lt % TX
    ty = lt // TX
    lane = tl.arange(0, TS * TS)
    px = tx * TS + lane % TS
    py = ty * TS + lane // TS
    inb = (px < W) & (py < H)
    pxf = px.to(tl.float32) + 0.5
    pyf = py.to(tl.float32) + 0.5
    ovf = tl.load(ovf_ptr)
    start = tl.where(ovf != 0, img * N, tl.load(ranges_ptr + t))
    end = tl.where(ovf != 0, img * N + N, tl.load(ranges_ptr + t + 1))
    chan = tl.arange(0, DP)

    T = tl.full([TS * TS], 1.0, tl.float32)
    done = ~inb
    acc = tl.zeros([TS * TS, DP], dtype=tl.float32)
    i = start
    while i < end:
        gid, m, dx, dy, og, alpha, valid, ca, cb, cc, op = _chunk_alpha(
            params_ptr, rect_ptr, ids_sorted_ptr, order_ptr, ovf, i, end, G, tx, ty, pxf, pyf, alpha_max, CH)
        valid = valid & ~done[None, :]
        f = tl.where(valid, 1.0 - alpha, 1.0)
        P = T[None, :] * tl.cumprod(f, axis=0)  # transmittance after each pair
        keep = valid & (P > T_MIN)
        w = tl.where(keep, alpha * (P / f), 0.0)
        feat = tl.load(feats_ptr + gid[:, None] * DP + chan[None, :], mask=m[:, None], other=0.0)
        acc += tl.sum(w[:, :, None] * feat[:, None, :], axis=0)
        T = tl.minimum(T, tl.min(tl.where(keep, P, 2.0), axis=0))
        done = done | (tl.sum((valid & (P <= T_MIN)).to(tl.int32), axis=0) > 0)
        all_done = tl.sum((~done).to(tl.int32), axis=0) == 0
        i = tl.where(all_done, end, i + CH)

    pix = (img * H + py) * W + px
    tl.store(out_ptr + pix[:, None] * DP + chan[None, :], acc, mask=inb[:, None])
    tl.store(tfin_ptr + pix, T, mask=inb)


@triton.jit
def _raster_bwd_kernel(params_ptr, feats_ptr, rect_ptr, ids_sorted_ptr, order_ptr, ranges_ptr, ovf_ptr,
                       out_ptr, tfin_ptr, gout_ptr, gt_ptr, gparams_ptr, gfeats_ptr, G, N, W, H, TX, TPI, alpha_max,
                       DP: tl.constexpr, CH: tl.constexpr, TS: tl.constexpr):
    t = tl.program_id(0)
    img = t // TPI
    lt = t % TPI
    tx = lt % TX
    ty = lt // TX
    lane = tl.arange(0, TS * TS)
    px = tx * TS + lane % TS
    py = ty * TS + lane // TS
    inb = (px < W) & (py < H)
    pxf = px.to(tl.float32) + 0.5
    pyf = py.to(tl.float32) + 0.5
    ovf = tl.load(ovf_ptr)
    start = tl.where(ovf != 0, img * N, tl.load(ranges_ptr + t))
    end = tl.where(ovf != 0, img * N + N, tl.load(ranges_ptr + t + 1))
    chan = tl.arange(0, DP)
    pix = (img * H + py) * W + px

    gpix = tl.load(gout_ptr + pix[:, None] * DP + chan[None, :], mask=inb[:, None], other=0.0)  # [PIX, DP]
    outp = tl.load(out_ptr + pix[:, None] * DP + chan[None, :], mask=inb[:, None], other=0.0)
    total = tl.sum(gpix * outp, axis=1)  # sum over all contributions of w * (g . feat)
    # d loss / d T_final enters every pair through dT_final/dalpha_k = -T_final / (1 - alpha_k)
    q = tl.load(gt_ptr + pix, mask=inb, other=0.0) * tl.load(tfin_ptr + pix, mask=inb, other=1.0)

    T = tl.full([TS * TS], 1.0, tl.float32)
    done = ~inb
    prefix = tl.zeros([TS * TS], dtype=tl.float32)
    i = start
    while i < end:
        gid, m, dx, dy, og, alpha, valid, ca, cb, cc, op = _chunk_alpha(
            params_ptr, rect_ptr, ids_sorted_ptr, order_ptr, ovf, i, end, G, tx, ty, pxf, pyf, alpha_max, CH)
        valid = valid & ~done[None, :]
        f = tl.where(valid, 1.0 - alpha, 1.0)
        P = T[None, :] * tl.cumprod(f, axis=0)
        keep = valid & (P > T_MIN)
        tb = P / f  # transmittance in front of the pair
        w = tl.where(keep, alpha * tb, 0.0)
        feat = tl.load(feats_ptr + gid[:, None] * DP + chan[None, :], mask=m[:, None], other=0.0)
        v = tl.sum(feat[:, None, :] * gpix[None, :, :], axis=2)  # [CH, PIX]
        wv = w * v
        cs = tl.cumsum(wv, axis=0) + prefix[None, :]
        after = total[None, :] - cs  # contributions behind each pair
        g_a = tb * v - (after + q[None, :]) / (1.0 - alpha)
        mm = tl.where(keep & (og < alpha_max), og * g_a, 0.0)  # -dL/dsigma; the clamp blocks the gradient
        g_mx = -tl.sum(mm * (ca[:, None] * dx + cb[:, None] * dy), axis=1)
        g_my = -tl.sum(mm * (cb[:, None] * dx + cc[:, None] * dy), axis=1)
        g_ca = -0.5 * tl.sum(mm * dx * dx, axis=1)
        g_cb = -tl.sum(mm * dx * dy, axis=1)
        g_cc = -0.5 * tl.sum(mm * dy * dy, axis=1)
        g_op = tl.sum(mm, axis=1) / tl.where(m, op, 1.0)
        g_feat = tl.sum(w[:, :, None] * gpix[None, :, :], axis=1)  # [CH, DP]
        hit = m & (tl.sum(keep.to(tl.int32), axis=1) > 0)
        tl.atomic_add(gparams_ptr + 0 * G + gid, g_mx, mask=hit)
        tl.atomic_add(gparams_ptr + 1 * G + gid, g_my, mask=hit)
        tl.atomic_add(gparams_ptr + 2 * G + gid, g_ca, mask=hit)
        tl.atomic_add(gparams_ptr + 3 * G + gid, g_cb, mask=hit)
        tl.atomic_add(gparams_ptr + 4 * G + gid, g_cc, mask=hit)
        tl.atomic_add(gparams_ptr + 5 * G + gid, g_op, mask=hit)
        tl.atomic_add(gfeats_ptr + gid[:, None] * DP + chan[None, :], g_feat, mask=hit[:, None])
        prefix += tl.sum(wv, axis=0)
        T = tl.minimum(T, tl.min(tl.where(keep, P, 2.0), axis=0))
        done = done | (tl.sum((valid & (P <= T_MIN)).to(tl.int32), axis=0) > 0)
        all_done = tl.sum((~done).to(tl.int32), axis=0) == 0
        i = tl.where(all_done, end, i + CH)


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
        return True

    def poll(self) -> None:
        """Grow from the last eager call's need if its copy has landed; never blocks."""
        if self._event is not None and self._event.query():
            self.grow_to(int(self._host.item()))
            self._event = None

    def post(self) -> None:
        """Start an asynchronous copy of the need to the host (eager CUDA calls only)."""
        if self.need.device.type != "cuda" or self._event is not None:
            return
        if self._host is None:
            self._host = torch.zeros((), dtype=torch.int32, pin_memory=True)
        self._host.copy_(self.need, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()


_CAPS: dict[tuple, _Capacity] = {}


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
    K = Ks.index_select(0, b)
    fx, fy, cx, cy = K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2]
    lim_x_pos = (W - cx) / fx + 0.15 * W / fx
    lim_x_neg = cx / fx + 0.15 * W / fx
    lim_y_pos = (H - cy) / fy + 0.15 * H / fy
    lim_y_neg = cy / fy + 0.15 * H / fy
    rz = 1.0 / z
    tx = z * torch.clamp(x * rz, min=-lim_x_neg, max=lim_x_pos)
    ty = z * torch.clamp(y * rz, min=-lim_y_neg, max=lim_y_pos)
    Wv = Rw.index_select(0, b)
    T0 = (fx * rz)[:, None] * Wv[:, 0] - (fx * tx * rz * rz)[:, None] * Wv[:, 2]
    T1 = (fy * rz)[:, None] * Wv[:, 1] - (fy * ty * rz * rz)[:, None] * Wv[:, 2]
    M = quaternion_to_matrix(quats.reshape(-1, 4)) * scales.reshape(-1, 3)[:, None, :]
    U = torch.bmm(torch.stack([T0, T1], 1), M)
    cov = torch.bmm(U, U.transpose(1, 2))
    a = cov[:, 0, 0] + eps2d
    bb = cov[:, 0, 1]
    c = cov[:, 1, 1] + eps2d
    det = a * c - bb * bb
    mx = fx * x * rz + cx
    my = fy * y * rz + cy
    o = opacities.reshape(-1)
    with torch.no_grad():
        ok = front & (det > 0) & (o >= ALPHA_THRESHOLD)
        extend = torch.sqrt(2.0 * torch.log(o.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)).clamp_max(_EXTEND_MAX)
        rx = torch.ceil(extend * a.clamp_min(0).sqrt())
        ry = torch.ceil(extend * c.clamp_min(0).sqrt())
        ok &= (rx > 0) | (ry > 0)
        ok &= (mx + rx > 0) & (mx - rx < W) & (my + ry > 0) & (my - ry < H)
        lam = 0.5 * (a + c) + torch.sqrt((0.5 * (a - c)) ** 2 + bb * bb)
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


# ----------------------------------------------------------------------------- binning


def _bin(proj, B, N, W, H, state: _Capacity | None, device):
    """Depth order per image, the pair buffer sorted by tile, tile ranges and the overflow flag."""
    G = B * N
    TXn, TYn = (W + TILE - 1) // TILE, (H + TILE - 1) // TILE
    TPI = TXn * TYn
    with torch.no_grad():
        z = torch.where(proj["ok"], proj["depth"].detach(), torch.full_like(proj["depth"], float("inf")))
        _, idx = torch.sort(z.view(B, N), dim=1, stable=True)
        order = (idx + torch.arange(B, device=device)[:, None] * N).reshape(-1).to(torch.int32)
        cnt = proj["count"].index_select(0, order.long())
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
        keys = torch.empty(cap, dtype=torch.int32, device=device)
        gids = torch.empty(cap, dtype=torch.int32, device=device)
        BLOCK = 256
        _emit_pairs_kernel[(triton.cdiv(cap, BLOCK),)](incl, order, proj["rect"], keys, gids, cap, G, N, TXn, TPI,
                                                        LOG_G=max(1, math.ceil(math.log2(G + 1))), BLOCK=BLOCK)
        skeys, perm = torch.sort(keys, stable=True)
        ids_sorted = gids.index_select(0, perm)
        ranges = torch.searchsorted(skeys, torch.arange(B * TPI + 1, dtype=torch.int32, device=device)).to(torch.int32)
    return dict(order=order, ids=ids_sorted, ranges=ranges, ovf=ovf, rect=proj["rect"], TX=TXn, TPI=TPI, state=state)


def _key(B, N, W, H, device):
    return (B, N, W, H, str(device))


# ----------------------------------------------------------------------------- compositing


class _Raster(torch.autograd.Function):
    """params [6,G] (mx, my, A, B, C, opacity), feats [G,DP] -> out [B*H*W, DP], T_final [B*H*W]."""

    @staticmethod
    def forward(ctx, params, feats, bins, B, N, W, H, alpha_max, chunk, num_warps):
        G, DP = feats.shape
        dev = feats.device
        out = torch.empty(B * H * W, DP, dtype=torch.float32, device=dev)
        tfin = torch.empty(B * H * W, dtype=torch.float32, device=dev)
        params, feats = params.contiguous(), feats.contiguous()
        grid = (B * bins["TPI"],)
        _raster_fwd_kernel[grid](params, feats, bins["rect"], bins["ids"], bins["order"], bins["ranges"], bins["ovf"],
                                 out, tfin, G, N, W, H, bins["TX"], bins["TPI"], alpha_max,
                                 DP=DP, CH=chunk, TS=TILE, num_warps=num_warps)
        ctx.save_for_backward(params, feats, bins["rect"], bins["ids"], bins["order"], bins["ranges"], bins["ovf"], out, tfin)
        ctx.meta = (B, N, W, H, bins["TX"], bins["TPI"], alpha_max, chunk, num_warps)
        return out, tfin

    @staticmethod
    def backward(ctx, g_out, g_t):
        params, feats, rect, ids, order, ranges, ovf, out, tfin = ctx.saved_tensors
        B, N, W, H, TX, TPI, alpha_max, chunk, num_warps = ctx.meta
        G, DP = feats.shape
        g_out = torch.zeros_like(out) if g_out is None else g_out.contiguous().float()
        g_t = torch.zeros_like(tfin) if g_t is None else g_t.contiguous().float()
        gparams = torch.zeros_like(params)
        gfeats = torch.zeros_like(feats)
        _raster_bwd_kernel[(B * TPI,)](params, feats, rect, ids, order, ranges, ovf, out, tfin, g_out, g_t,
                                       gparams, gfeats, G, N, W, H, TX, TPI, alpha_max,
                                       DP=DP, CH=chunk, TS=TILE, num_warps=num_warps)
        return gparams, gfeats, None, None, None, None, None, None, None, None


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
                  sh_degree: int | None = None, backgrounds=None, near: float = 0.01, far: float = 1e10,
                  eps2d: float = 0.3, alpha_max: float = 0.99, chunk: int = 16, num_warps: int = 4, **kw) -> RenderOutput:
    """Render B frames with the Triton tile rasteriser; same arguments as ``render_torch``.

    ``chunk`` (Gaussians composited per step of a tile program, a power of two) and
    ``num_warps`` (per tile program) change speed only.
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

    proj = _project(means, quats, scales, opacities, viewmats, Ks, width, height, near, far, eps2d)
    state = _CAPS.get(_key(B, N, width, height, dev))
    eager = not _capturing(dev)
    if state is not None and eager:
        state.poll()
    bins = _bin(proj, B, N, width, height, state, dev)
    if eager:
        bins["state"].post()

    cols = _candidate_colors(means, colors, viewmats, sh_degree, None, N)  # [G, D]
    D = cols.shape[1]
    DP = max(2, triton.next_power_of_2(D + 1))
    parts = [cols, proj["depth"][:, None]]
    if DP > D + 1:
        parts.append(cols.new_zeros(B * N, DP - D - 1))
    feats = torch.cat(parts, 1)
    params = torch.stack([proj[k] for k in ("mx", "my", "A", "B", "C", "opacity")], 0)
    out, tfin = _Raster.apply(params, feats, bins, B, N, width, height, float(alpha_max), int(chunk), int(num_warps))
    out = out.view(B, height, width, DP)
    alpha = (1.0 - tfin).view(B, height, width, 1)
    rgb = out[..., :D]
    if backgrounds is not None:
        rgb = rgb + (1.0 - alpha) * backgrounds[:, None, None, :].float()
    depth = out[..., D:D + 1] / alpha.clamp_min(1e-10)
    cast = lambda t: t.to(out_dtype).contiguous()  # noqa: E731
    return RenderOutput(rgb=cast(rgb), alpha=cast(alpha), depth=cast(depth), radii=proj["radii"])
