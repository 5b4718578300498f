"""Pure-PyTorch mesh rasteriser: the reference ``MeshBackend`` (CPU and CUDA).

Three stages, as in nvdiffrast (Laine et al. 2020):

* **Visibility** (no gradients).  Vertices are snapped to a fixed-point grid
  of ``1/2**subpixel_bits`` pixel and every (triangle, pixel) pair inside the
  triangle's screen bounding box is enumerated with ``repeat_interleave`` (in
  chunks to bound memory).  The inside test uses exact int64 edge functions at
  pixel centres with a top-left tie rule, so a pixel centre on an edge shared
  by two triangles belongs to exactly one of them (no cracks, no double
  cover).  The nearest pair per pixel wins through one ``scatter_reduce(amin)``
  on the key ``float32 bits of (z_ndc+1)/2 << 32 | face``; equal depths go to
  the lower face index.
* **Barycentrics** (differentiable).  For each covered pixel the
  perspective-correct weights are recomputed from the clip-space vertices of
  the winning triangle, so gradients reach ``clip``.
* **Antialiasing** (differentiable): analytic blending across silhouette
  edges, see :func:`antialias`.

Triangles are culled -- not clipped, unlike nvdiffrast -- when any vertex has
``w <= 0`` or ``z`` outside ``[-w, w]`` (in front of the near or beyond the
far plane), or when a vertex lies beyond the fixed-point guard band
(``2**(29 - subpixel_bits)`` pixels), which keeps the int64 edge functions
exact.  Both windings are rasterised unless ``cull_backfaces``.  A triangle is
*front-facing* when it appears counter-clockwise in the image (row 0 at the
top), i.e. its vertices wind counter-clockwise around an outward normal
pointing at the (OpenCV) camera; its signed area in pixel coordinates
(y down) is then negative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

_INT64_MAX = torch.iinfo(torch.int64).max
# Largest |fixed-point coordinate|: the products in the edge functions stay < 2**62.
_GUARD = 1 << 29


# --------------------------------------------------------------------- checks
def _batched_clip(clip: torch.Tensor) -> torch.Tensor:
    if clip.dim() == 2:
        clip = clip[None]
    if clip.dim() != 3 or clip.shape[-1] != 4:
        raise ValueError(f"clip must be [B,V,4] (or [V,4]), got {tuple(clip.shape)}")
    return clip


def _long_faces(faces: torch.Tensor, device: torch.device) -> torch.Tensor:
    if faces.dim() != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be [F,3], got {tuple(faces.shape)}")
    if faces.dtype.is_floating_point:
        raise ValueError("faces must be an integer tensor")
    return faces.to(device=device, dtype=torch.int64)


def _resolution(resolution) -> tuple[int, int]:
    H, W = (int(r) for r in resolution)
    if H <= 0 or W <= 0:
        raise ValueError(f"resolution must be positive (H, W), got {resolution}")
    return H, W


# ------------------------------------------------------------- visibility pass
@dataclass
class Coverage:
    """(pixel, face) pairs whose pixel centre lies inside the face.

    pixel: [N] flat index ``b*H*W + row*W + col``; face: [N] face index;
    depth: [N] float32 NDC z at the pixel centre; front: [N] front-facing flag.
    """

    pixel: torch.Tensor
    face: torch.Tensor
    depth: torch.Tensor
    front: torch.Tensor


def _triangle_setup(clip: torch.Tensor, faces: torch.Tensor, H: int, W: int, cull_backfaces: bool, bits: int):
    """Per (batch, face) fixed-point edge equations, bounding boxes and depths."""
    B, _, _ = clip.shape
    F = faces.shape[0]
    c = clip.detach()
    x, y, z, w = c.unbind(-1)  # [B,V]
    w_ok = w > 0
    ws = torch.where(w_ok, w, torch.ones_like(w))
    scale = float(1 << bits)
    # Snap per vertex (not per triangle corner) so shared vertices snap identically.
    fx = (x / ws + 1) * (0.5 * W * scale)
    fy = (y / ws + 1) * (0.5 * H * scale)
    v_ok = w_ok & (z >= -w) & (z <= w) & (fx.abs() < _GUARD) & (fy.abs() < _GUARD)
    qx = torch.where(v_ok, fx, torch.zeros_like(fx)).round().long()
    qy = torch.where(v_ok, fy, torch.zeros_like(fy)).round().long()
    zn = torch.where(v_ok, z / ws, torch.zeros_like(z)).float()

    X, Y = qx[:, faces], qy[:, faces]  # [B,F,3]
    ok = v_ok[:, faces].all(-1)
    area2 = (X[..., 1] - X[..., 0]) * (Y[..., 2] - Y[..., 0]) - (X[..., 2] - X[..., 0]) * (Y[..., 1] - Y[..., 0])
    front = area2 < 0
    ok &= area2 != 0
    if cull_backfaces:
        ok &= front
    s = torch.where(area2 > 0, 1, -1)

    # Edge k joins vertices k+1 -> k+2 (opposite vertex k); E_k(v_k) = area2.
    ax, ay = X.roll(-1, -1), Y.roll(-1, -1)
    bx, by = X.roll(-2, -1), Y.roll(-2, -1)
    ex, ey = (bx - ax) * s[..., None], (by - ay) * s[..., None]
    # E_k(p) = ex*(py-ay) - ey*(px-ax) = A px + Bc py + C, normalised so inside > 0.
    A, Bc, C = -ey, ex, ey * ax - ex * ay
    # Top-left rule: a centre exactly on an edge counts only for edges with this
    # orientation; an edge shared by two consistently wound triangles runs in
    # opposite directions in them, so exactly one of the two includes it.
    top_left = (ey > 0) | ((ey == 0) & (ex < 0))
    C = C + top_left.long()

    half, sc = 1 << (bits - 1), 1 << bits
    col0 = (-torch.div(half - X.min(-1).values, sc, rounding_mode="floor")).clamp_min(0)
    col1 = torch.div(X.max(-1).values - half, sc, rounding_mode="floor").clamp_max(W - 1)
    row0 = (-torch.div(half - Y.min(-1).values, sc, rounding_mode="floor")).clamp_min(0)
    row1 = torch.div(Y.max(-1).values - half, sc, rounding_mode="floor").clamp_max(H - 1)
    nx = (col1 - col0 + 1).clamp_min(0)
    ny = (row1 - row0 + 1).clamp_min(0)
    count = torch.where(ok, nx * ny, torch.zeros_like(nx))

    base = torch.arange(B, device=c.device)[:, None].expand(B, F) * (H * W)
    face = torch.arange(F, device=c.device)[None].expand(B, F)
    table_i = torch.cat(
        [A, Bc, C, torch.stack([col0, row0, nx, base + row0 * W + col0, face, front.long()], -1)], -1
    ).reshape(B * F, -1)
    table_z = zn[:, faces].reshape(B * F, 3)
    return table_i, table_z, count.reshape(-1)


def coverage(
    clip: torch.Tensor,
    faces: torch.Tensor,
    resolution: tuple[int, int],
    cull_backfaces: bool = False,
    max_candidates: int = 1 << 20,
    subpixel_bits: int = 8,
) -> Iterator[Coverage]:
    """Yield every covering (pixel, face) pair, in chunks of at most ~``max_candidates`` tested pairs."""
    clip = _batched_clip(clip)
    faces = _long_faces(faces, clip.device)
    H, W = _resolution(resolution)
    table_i, table_z, count = _triangle_setup(clip, faces, H, W, cull_backfaces, subpixel_bits)
    live = count.nonzero().squeeze(1)
    if live.numel() == 0:
        return
    table_i, table_z, count = table_i[live], table_z[live], count[live]
    ends = count.cumsum(0)
    total = int(ends[-1])
    # Chunk boundaries on whole triangles: a single huge triangle may exceed the budget.
    if total <= max_candidates:
        bounds = [0, live.numel()]
    else:
        marks = torch.arange(max_candidates, total, max_candidates, device=ends.device)
        cuts = torch.searchsorted(ends, marks, right=True).clamp_min(1).tolist()
        bounds = sorted(set([0, *cuts, live.numel()]))
    sc, half = 1 << subpixel_bits, 1 << (subpixel_bits - 1)
    for t0, t1 in zip(bounds[:-1], bounds[1:]):
        cnt = count[t0:t1]
        n = int(ends[t1 - 1] - (ends[t0 - 1] if t0 > 0 else 0))
        tri = torch.repeat_interleave(torch.arange(t1 - t0, device=cnt.device), cnt, output_size=n)
        start = ends[t0:t1] - cnt - (ends[t0 - 1] if t0 > 0 else 0)
        ti = table_i[t0:t1].index_select(0, tri)  # [n,15]
        off = torch.arange(n, device=cnt.device) - start.index_select(0, tri)
        dy = torch.div(off, ti[:, 11], rounding_mode="floor")  # row, column inside the box
        dx = off - dy * ti[:, 11]
        px = (ti[:, 9] + dx) * sc + half
        py = (ti[:, 10] + dy) * sc + half
        E = ti[:, 0:3] * px[:, None] + ti[:, 3:6] * py[:, None] + ti[:, 6:9]
        inside = (E > 0).all(1).nonzero().squeeze(1)
        E = E.index_select(0, inside).float()
        ti = ti.index_select(0, inside)
        zk = table_z[t0:t1].index_select(0, tri.index_select(0, inside))
        depth = (E * zk).sum(1) / E.sum(1)
        pixel = ti[:, 12] + dy.index_select(0, inside) * W + dx.index_select(0, inside)
        yield Coverage(pixel=pixel, face=ti[:, 13], depth=depth, front=ti[:, 14].bool())


def visible_faces(
    clip: torch.Tensor,
    faces: torch.Tensor,
    resolution: tuple[int, int],
    cull_backfaces: bool = False,
    max_candidates: int = 1 << 20,
    subpixel_bits: int = 8,
) -> torch.Tensor:
    """Z-buffer: [B*H*W] int64 index of the nearest covering face per pixel, -1 where empty."""
    clip = _batched_clip(clip)
    H, W = _resolution(resolution)
    zbuf = torch.full((clip.shape[0] * H * W,), _INT64_MAX, dtype=torch.int64, device=clip.device)
    for cov in coverage(clip, faces, (H, W), cull_backfaces, max_candidates, subpixel_bits):
        d01 = ((cov.depth + 1) * 0.5).clamp(0, 1).float()
        # Non-negative float32 bit patterns sort like the floats themselves.
        key = (d01.view(torch.int32).long() << 32) | cov.face
        zbuf.scatter_reduce_(0, cov.pixel, key, "amin", include_self=True)
    return torch.where(zbuf == _INT64_MAX, -1, zbuf & 0xFFFFFFFF)


# ------------------------------------------------------ differentiable stages
def _pixel_centres_ndc(pix: torch.Tensor, H: int, W: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    rem = pix % (H * W)
    row, col = torch.div(rem, W, rounding_mode="floor"), rem % W
    return (2 * col + 1).to(dtype) / W - 1, (2 * row + 1).to(dtype) / H - 1


def barycentrics(clip: torch.Tensor, faces: torch.Tensor, pix: torch.Tensor, face: torch.Tensor, H: int, W: int):
    """Perspective-correct (b0, b1, b2) and z/w of ``face`` at pixel centres ``pix``; differentiable in clip.

    With p = (x_ndc, y_ndc, 1) and c_k = (x, y, w) of vertex k, b_k is
    proportional to det(p, c_{k+1}, c_{k+2}), i.e. the weights for which
    sum_k b_k c_k is parallel to p.
    """
    b = torch.div(pix, H * W, rounding_mode="floor")
    if clip.shape[0] == 1:
        b = torch.zeros_like(b)
    cv = clip[b[:, None], faces[face]]  # [N,3,4]
    xn, yn = _pixel_centres_ndc(pix, H, W, clip.dtype)
    px = cv[..., 0] - xn[:, None] * cv[..., 3]
    py = cv[..., 1] - yn[:, None] * cv[..., 3]
    a = px.roll(-1, 1) * py.roll(-2, 1) - py.roll(-1, 1) * px.roll(-2, 1)  # [N,3]
    at = a.sum(1, keepdim=True)
    bary = a / torch.where(at == 0, torch.ones_like(at), at)
    zw = (bary * cv[..., 2]).sum(1) / (bary * cv[..., 3]).sum(1)
    return bary, zw


def rasterize(
    clip: torch.Tensor,
    faces: torch.Tensor,
    resolution: tuple[int, int],
    cull_backfaces: bool = False,
    max_candidates: int = 1 << 20,
    subpixel_bits: int = 8,
) -> torch.Tensor:
    """[B,H,W,4] = (u, v, z/w, face+1); u, v weigh vertices 1 and 2; 0 where empty."""
    clip = _batched_clip(clip)
    faces = _long_faces(faces, clip.device)
    H, W = _resolution(resolution)
    B = clip.shape[0]
    vis = visible_faces(clip, faces, (H, W), cull_backfaces, max_candidates, subpixel_bits)
    pix = (vis >= 0).nonzero().squeeze(1)
    face = vis.index_select(0, pix)
    bary, zw = barycentrics(clip, faces, pix, face, H, W)
    vals = torch.cat([bary[:, 1:], zw[:, None], (face + 1).to(clip.dtype)[:, None]], 1)
    rast = torch.zeros(B * H * W, 4, dtype=clip.dtype, device=clip.device).index_put((pix,), vals)
    return rast.reshape(B, H, W, 4)


def interpolate(attr: torch.Tensor, rast: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """attr [V,C] or [B|1,V,C] -> [B,H,W,C], perspective-correct, 0 where empty."""
    B, H, W, _ = rast.shape
    faces = _long_faces(faces, rast.device)
    r = rast.reshape(-1, 4)
    pix = (r[:, 3] > 0).nonzero().squeeze(1)
    face = r[:, 3].detach().index_select(0, pix).long() - 1
    u, v = r[pix, 0:1], r[pix, 1:2]
    vi = faces[face]  # [N,3]
    if attr.dim() == 2:
        a = attr[vi]
    elif attr.dim() == 3 and attr.shape[0] in (1, B):
        b = torch.div(pix, H * W, rounding_mode="floor") if attr.shape[0] > 1 else torch.zeros_like(pix)
        a = attr[b[:, None], vi]
    else:
        raise ValueError(f"attr must be [V,C] or [B,V,C] with B in (1, {B}), got {tuple(attr.shape)}")
    vals = (1 - u - v) * a[:, 0] + u * a[:, 1] + v * a[:, 2]
    out = torch.zeros(B * H * W, attr.shape[-1], dtype=vals.dtype, device=rast.device).index_put((pix,), vals)
    return out.reshape(B, H, W, -1)


# ------------------------------------------------------------- antialiasing
def edge_topology(faces: torch.Tensor) -> torch.Tensor:
    """[F,3] vertex across edge k (vertices k+1, k+2) in the neighbouring face; -1 on open edges.

    Edges shared by more than two faces get one of the others (arbitrarily).
    Depends on ``faces`` only: compute once per mesh and pass to ``antialias``.
    """
    faces = _long_faces(faces, faces.device)
    F = faces.shape[0]
    if F == 0:
        return faces.clone()
    a, b = faces.roll(-1, 1), faces.roll(-2, 1)
    n = int(faces.max()) + 1
    key = (torch.minimum(a, b) * n + torch.maximum(a, b)).reshape(-1)
    order = torch.argsort(key, stable=True)
    sk = key[order]
    same = sk[1:] == sk[:-1]
    mate = torch.full_like(order, -1)
    mate[:-1] = torch.where(same, order[1:], mate[:-1])
    mate[1:] = torch.where(same & (mate[1:] < 0), order[:-1], mate[1:])
    nbr = torch.empty_like(mate)
    nbr[order] = mate
    flat = faces.reshape(-1)
    return torch.where(nbr >= 0, flat[nbr.clamp_min(0)], -1).reshape(F, 3)


def _det_xyw(p: torch.Tensor, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """det of rows (x, y, w) of clip vectors [...,4] = w_p w_q w_r * screen orientation."""
    p, q, r = p[..., [0, 1, 3]], q[..., [0, 1, 3]], r[..., [0, 1, 3]]
    return (p * torch.linalg.cross(q, r, dim=-1)).sum(-1)


def _silhouette_edges(clip: torch.Tensor, faces: torch.Tensor, opp: torch.Tensor, H: int, W: int):
    """[B,F,3] masks of edges that may blend horizontal / vertical pixel pairs.

    An edge is a silhouette when it is open, or when the neighbour's far vertex
    lies on the same side of it as the face's own third vertex (the surface
    folds back there).  Mostly-vertical edges (|dy| >= |dx| in pixels) blend
    horizontal pairs, the others vertical pairs, so no edge blends twice.
    """
    c = clip.detach()
    cv = c[:, faces]  # [B,F,3,4]
    ca, cb = cv.roll(-1, 2), cv.roll(-2, 2)
    own = torch.sign(_det_xyw(cv[:, :, 0], cv[:, :, 1], cv[:, :, 2]))[..., None]
    co = c[:, opp.clamp_min(0)]  # [B,F,3,4]
    co = torch.where((opp >= 0)[None, ..., None], co, cv)  # no neighbour: own vertex => silhouette
    side = torch.sign(_det_xyw(ca, cb, co)) * torch.sign(co[..., 3])
    sil = (side == own) | (side == 0)
    wa = torch.where(ca[..., 3] > 0, ca[..., 3], torch.ones_like(ca[..., 3]))
    wb = torch.where(cb[..., 3] > 0, cb[..., 3], torch.ones_like(cb[..., 3]))
    dx = (cb[..., 0] / wb - ca[..., 0] / wa).abs() * W
    dy = (cb[..., 1] / wb - ca[..., 1] / wa).abs() * H
    mostly_vertical = dy >= dx
    return sil & mostly_vertical, sil & ~mostly_vertical


def antialias(
    color: torch.Tensor,
    rast: torch.Tensor,
    clip: torch.Tensor,
    faces: torch.Tensor,
    topology: torch.Tensor | None = None,
    eps: float = 1.0 / 16,
) -> torch.Tensor:
    """Blend colours across silhouette edges by their analytic pixel coverage.

    For every horizontally or vertically adjacent pixel pair with different
    face ids, take the nearer face F (or the only one); its pixel centre c_in
    is inside F, the other one c_out is not.  The edge of F through which the
    segment c_in -> c_out leaves F crosses it at t in [0, 1].  If that edge is
    a silhouette (see ``_silhouette_edges``) and mostly perpendicular to the
    pair, treat it as a straight line through both pixels: the pixel whose
    box it cuts is blended towards the other pixel's colour by the fraction
    of its box on the far side, ``|t - 1/2|`` (c_in's pixel when t < 1/2,
    else c_out's).  ``t`` is computed from F's clip-space vertices, so the
    image depends continuously on them and silhouettes give gradients to
    ``clip``; interior pixels and non-silhouette edges are left unchanged.

    Like nvdiffrast's antialias (same edge classification, crossing window
    ``[-eps, 1+eps]`` clamped to [0, 1], one contribution per pair, summed
    per pixel); differences: the crossing edge is the exit edge of the
    segment (first crossing), and no ``pos_gradient_boost``.
    """
    B, H, W, C = color.shape
    clip = _batched_clip(clip)
    faces = _long_faces(faces, color.device)
    opp = edge_topology(faces) if topology is None else topology.to(color.device).long()
    out = color.reshape(-1, C)
    tri = rast[..., 3].detach().reshape(B, H, W).long() - 1
    z = rast[..., 2].detach().reshape(-1)

    mh = torch.zeros_like(tri, dtype=torch.bool)
    mh[:, :, :-1] = tri[:, :, :-1] != tri[:, :, 1:]
    mv = torch.zeros_like(tri, dtype=torch.bool)
    mv[:, :-1, :] = tri[:, :-1, :] != tri[:, 1:, :]
    ph, pv = mh.reshape(-1).nonzero().squeeze(1), mv.reshape(-1).nonzero().squeeze(1)
    p0 = torch.cat([ph, pv])
    if p0.numel() == 0:
        return color
    horiz = torch.arange(p0.numel(), device=p0.device) < ph.numel()
    p1 = p0 + torch.where(horiz, 1, W)
    tf = tri.reshape(-1)
    t0, t1 = tf[p0], tf[p1]
    use0 = (t1 < 0) | ((t0 >= 0) & (z[p0] < z[p1]))
    front = torch.where(use0, t0, t1)
    pin, pout = torch.where(use0, p0, p1), torch.where(use0, p1, p0)
    b = torch.div(pin, H * W, rounding_mode="floor")
    if clip.shape[0] == 1:
        b = torch.zeros_like(b)

    # Cheap prefilter: the front face must have an edge eligible for this direction.
    sil_h, sil_v = _silhouette_edges(clip, faces, opp, H, W)
    elig = torch.where(horiz[:, None], sil_h[b, front], sil_v[b, front])  # [N,3]
    keep = elig.any(1).nonzero().squeeze(1)
    if keep.numel() == 0:
        return color
    horiz, front, pin, pout, b, elig = (t[keep] for t in (horiz, front, pin, pout, b, elig))

    cv = clip[b[:, None], faces[front]]  # [N,3,4], differentiable
    sx = (cv[..., 0] / cv[..., 3] + 1) * (0.5 * W)
    sy = (cv[..., 1] / cv[..., 3] + 1) * (0.5 * H)
    rem = pin % (H * W)
    cy = torch.div(rem, W, rounding_mode="floor").to(sx.dtype) + 0.5
    cx = (rem % W).to(sx.dtype) + 0.5
    step = torch.sign(pout - pin).to(sx.dtype)
    dxs, dys = torch.where(horiz, step, 0.0), torch.where(horiz, 0.0, step)

    ax, ay, bx, by = sx.roll(-1, 1), sy.roll(-1, 1), sx.roll(-2, 1), sy.roll(-2, 1)
    ex, ey = bx - ax, by - ay
    area = (sx[:, 1] - sx[:, 0]) * (sy[:, 2] - sy[:, 0]) - (sx[:, 2] - sx[:, 0]) * (sy[:, 1] - sy[:, 0])
    s = torch.where(area > 0, 1.0, -1.0).to(sx.dtype)[:, None]
    e_in = s * (ex * (cy[:, None] - ay) - ey * (cx[:, None] - ax))  # > 0 inside F
    slope = s * (ex * dys[:, None] - ey * dxs[:, None])  # d e / d t along the segment
    leaves = (e_in + slope < 0) & (slope < 0)
    t_k = e_in / torch.where(leaves, -slope, torch.ones_like(slope))
    t_k = torch.where(leaves, t_k, torch.full_like(t_k, float("inf")))
    k = t_k.detach().argmin(1, keepdim=True)
    t = t_k.gather(1, k)[:, 0]
    ok = leaves.gather(1, k)[:, 0] & elig.gather(1, k)[:, 0] & (t.detach() > -eps) & (t.detach() < 1 + eps)
    idx = ok.nonzero().squeeze(1)
    if idx.numel() == 0:
        return color
    alpha = 0.5 - t[idx].clamp(0, 1)
    pin, pout = pin[idx], pout[idx]
    into_in = alpha > 0
    target = torch.where(into_in, pin, pout)
    source = torch.where(into_in, pout, pin)
    delta = alpha.abs()[:, None] * (out[source] - out[target])
    return out.index_add(0, target, delta).reshape(B, H, W, C)


# ------------------------------------------------------------------ backend
class TorchMeshBackend:
    """``MeshBackend`` in pure PyTorch (runs wherever ``clip`` lives).

    cull_backfaces: drop triangles that appear clockwise in the image.
    max_candidates: (triangle, pixel) pairs tested per chunk (~100 bytes each).
    subpixel_bits: fixed-point precision of the visibility test.
    """

    name = "torch"

    def __init__(self, cull_backfaces: bool = False, max_candidates: int = 1 << 20, subpixel_bits: int = 8):
        if not 1 <= subpixel_bits <= 16:
            raise ValueError("subpixel_bits must be in [1, 16]")
        self.cull_backfaces = cull_backfaces
        self.max_candidates = int(max_candidates)
        self.subpixel_bits = int(subpixel_bits)

    def rasterize(self, clip: torch.Tensor, faces: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
        return rasterize(clip, faces, resolution, self.cull_backfaces, self.max_candidates, self.subpixel_bits)

    def interpolate(self, attr: torch.Tensor, rast: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        return interpolate(attr, rast, faces)

    def antialias(
        self,
        color: torch.Tensor,
        rast: torch.Tensor,
        clip: torch.Tensor,
        faces: torch.Tensor,
        topology: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return antialias(color, rast, clip, faces, topology)
