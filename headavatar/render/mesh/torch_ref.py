"""Pure-PyTorch mesh rasteriser: the reference ``MeshBackend`` (CPU and CUDA).

Three stages, as in nvdiffrast (Laine et al. 2020):

* **Visibility** (no gradients).  Vertices are snapped to a fixed-point grid
  of ``1/2**subpixel_bits`` pixel.  Every (triangle, row) pair in the
  triangles' bounding boxes is enumerated with ``repeat_interleave`` (in
  chunks of triangles to bound memory, no Python loop over triangles); each
  edge function, evaluated exactly in int64 at the row's pixel centres, bounds
  the covered columns from the left or the right, so the span of covered
  pixels follows from integer floor divisions, and a second
  ``repeat_interleave`` lists the covered (triangle, pixel) pairs.  A top-left
  tie rule decides centres exactly on an edge, so a centre on an edge shared
  by two triangles belongs to exactly one of them (no cracks, no double
  cover).  NDC depth is affine in screen space and evaluated per pixel; the
  nearest pair per pixel wins through one ``scatter_reduce(amin)`` on the key
  ``float32 bits of (z_ndc+1)/2 << 32 | face`` (equal depths: lower face).
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

from headavatar.render.mesh import MESH_BACKENDS

_INT64_MAX = torch.iinfo(torch.int64).max
# Largest |fixed-point coordinate|: the products in the edge functions stay < 2**62.
_GUARD = 1 << 29


@dataclass(frozen=True)
class RasterOptions:
    """How visibility is decided (the same for every draw of a backend)."""

    cull_backfaces: bool = False  # drop triangles that appear clockwise in the image
    max_candidates: int | None = None  # bounding-box pixels per chunk of triangles (a memory bound); None: by device
    subpixel_bits: int = 8  # fixed-point precision of the visibility test, 1 to 16

    def __post_init__(self):
        if not 1 <= self.subpixel_bits <= 16:
            raise ValueError("subpixel_bits must be in [1, 16]")


DEFAULT_OPTIONS = RasterOptions()


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


@dataclass
class _Triangles:
    """Per live (batch, face) triangle, fixed-point set-up for the scanline pass.

    In row ``py`` (fixed point) the covered pixel centres ``px`` are those with
    ``q_0 <= px <= q_1``, ``q_j = floor((P_j py + Q_j) / D_j)``, and slot 2
    bounds px from below (``m_lo == 0``) or above (``m_hi == 0``) or not at all.
    Slot quantities are [3,T]; the rest [T].
    """

    P: torch.Tensor
    Q: torch.Tensor
    D: torch.Tensor
    m_lo: torch.Tensor
    m_hi: torch.Tensor
    col0: torch.Tensor  # bounding box in pixel indices, clamped to the image
    col1: torch.Tensor
    row0: torch.Tensor
    nrows: torch.Tensor
    base: torch.Tensor  # b*H*W
    face2: torch.Tensor  # 2*face + front
    zc: torch.Tensor  # float64: NDC z = zc + dzdx px + dzdy py (fixed-point px, py)
    dzdx: torch.Tensor
    dzdy: torch.Tensor
    area: torch.Tensor  # bounding-box pixel count (upper bound on covered pixels)

    def slice(self, t0: int, t1: int) -> "_Triangles":
        return _Triangles(**{k: getattr(self, k)[..., t0:t1] for k in self.__dataclass_fields__})


_BIG = 1 << 40  # "no bound", in fixed-point units (on-screen values are < 2**30)


def _floor_div(a: torch.Tensor, b) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def _triangle_setup(clip: torch.Tensor, faces: torch.Tensor, H: int, W: int, cull_backfaces: bool, bits: int):
    B = clip.shape[0]
    F = faces.shape[0]
    c = clip.detach()
    x, y, z, w = c.unbind(-1)  # [B,V]
    w_ok = w > 0
    ws = torch.where(w_ok, w, torch.ones_like(w))
    # Snap per vertex (not per triangle corner) so shared vertices snap identically.
    fx = (x / ws + 1) * (0.5 * W * (1 << bits))
    fy = (y / ws + 1) * (0.5 * H * (1 << bits))
    v_ok = w_ok & (z >= -w) & (z <= w) & (fx.abs() < _GUARD) & (fy.abs() < _GUARD)
    qx = torch.where(v_ok, fx, torch.zeros_like(fx)).round().long()
    qy = torch.where(v_ok, fy, torch.zeros_like(fy)).round().long()
    zn = torch.where(v_ok, z / ws, torch.zeros_like(z)).double()

    def corners(t: torch.Tensor) -> torch.Tensor:  # [B,V] -> [3, B*F]
        return t[:, faces.T].transpose(0, 1).reshape(3, B * F)

    X, Y = corners(qx), corners(qy)
    okv = corners(v_ok)
    ok = okv[0] & okv[1] & okv[2]
    area2 = (X[1] - X[0]) * (Y[2] - Y[0]) - (X[2] - X[0]) * (Y[1] - Y[0])
    front = area2 < 0
    ok &= area2 != 0
    if cull_backfaces:
        ok &= front

    half, sc = 1 << (bits - 1), 1 << bits
    # (Reductions over a leading dim of size 3 are slow on CPU: spell them out.)
    col0 = _floor_div(torch.minimum(torch.minimum(X[0], X[1]), X[2]) - half + sc - 1, sc).clamp_min(0)
    col1 = _floor_div(torch.maximum(torch.maximum(X[0], X[1]), X[2]) - half, sc).clamp_max(W - 1)
    row0 = _floor_div(torch.minimum(torch.minimum(Y[0], Y[1]), Y[2]) - half + sc - 1, sc).clamp_min(0)
    row1 = _floor_div(torch.maximum(torch.maximum(Y[0], Y[1]), Y[2]) - half, sc).clamp_max(H - 1)
    live = (ok & (col1 >= col0) & (row1 >= row0)).nonzero().squeeze(1)

    X = torch.stack([X[k].index_select(0, live) for k in range(3)])
    Y = torch.stack([Y[k].index_select(0, live) for k in range(3)])
    area2, front, col0, col1, row0, row1 = (
        t.index_select(0, live) for t in (area2, front, col0, col1, row0, row1)
    )
    s = torch.where(area2 > 0, 1, -1)
    nxt, prv = [1, 2, 0], [2, 0, 1]
    ax, ay = X[nxt], Y[nxt]
    ex, ey = (X[prv] - ax) * s, (Y[prv] - ay) * s
    # Edge k (vertices k+1 -> k+2): E_k(p) = A px + Bc py + C > 0 inside.
    A, Bc, C = -ey, ex, ey * ax - ex * ay
    # Top-left rule: a centre exactly on an edge counts only for edges with this
    # orientation; an edge shared by two consistently wound triangles runs in
    # opposite directions in them, so exactly one of the two includes it.
    C = C + ((ey > 0) | ((ey == 0) & (ex < 0))).long()

    # In row py, a left edge (A > 0) gives px >= floor((A - C - Bc py) / A), a
    # right edge (A < 0) px <= floor((C - 1 + Bc py) / -A): exact integer bounds.
    left, right, flat = A > 0, A < 0, A == 0
    zero = torch.zeros_like(A)
    Pn = torch.where(left, -Bc, torch.where(right, Bc, zero))
    Qn = torch.where(left, A - C, torch.where(right, C - 1, zero))
    Dn = torch.where(flat, 1, A.abs())
    # A horizontal edge only decides the row through it: clip the row range.
    Bs = torch.where(Bc == 0, 1, Bc.abs())
    py_lo = torch.where(flat & (Bc > 0), _floor_div(Bc - C, Bs), -_BIG)
    py_hi = torch.where(flat & (Bc < 0), _floor_div(C - 1, Bs), _BIG)
    py_lo = torch.maximum(torch.maximum(py_lo[0], py_lo[1]), py_lo[2])
    py_hi = torch.minimum(torch.minimum(py_hi[0], py_hi[1]), py_hi[2])
    row0 = torch.maximum(row0, _floor_div(py_lo - half + sc - 1, sc))
    row1 = torch.minimum(row1, _floor_div(py_hi - half, sc))
    nrows = (row1 - row0 + 1).clamp_min(0)
    # Slots: 0 = a left edge, 1 = a right edge (a non-degenerate triangle has both), 2 = the other.
    T = live.numel()
    s0 = torch.where(left[0], 0, torch.where(left[1], 1, 2))
    s1 = torch.where(right[0], 0, torch.where(right[1], 1, 2))
    flat_idx = (torch.stack([s0, s1, 3 - s0 - s1]) * T + torch.arange(T, device=live.device)).reshape(-1)

    def by_slot(t: torch.Tensor) -> torch.Tensor:  # [3,T] per edge -> [3,T] per slot
        return t.reshape(-1).index_select(0, flat_idx).reshape(3, T)

    left2, right2 = by_slot(left)[2], by_slot(right)[2]

    # NDC depth is affine in screen space: barycentric weights E_k / |area2|.
    # float64 keeps the expansion around the origin exact enough (~1e-12).
    zk = corners(zn)
    zk = torch.stack([zk[k].index_select(0, live) for k in range(3)])
    S = area2.abs().double()
    Ad, Bd = A.double(), Bc.double()
    dzdx = (Ad[0] * zk[0] + Ad[1] * zk[1] + Ad[2] * zk[2]) / S
    dzdy = (Bd[0] * zk[0] + Bd[1] * zk[1] + Bd[2] * zk[2]) / S
    zc = zk[0] - dzdx * X[0].double() - dzdy * Y[0].double()
    batch = _floor_div(live, F)
    return _Triangles(
        P=by_slot(Pn), Q=by_slot(Qn), D=by_slot(Dn),
        m_lo=torch.where(left2, 0, -4 * _BIG), m_hi=torch.where(right2, 0, 4 * _BIG),
        col0=col0, col1=col1, row0=row0, nrows=nrows,
        base=batch * (H * W), face2=2 * (live - batch * F) + front.long(),
        zc=zc, dzdx=dzdx, dzdy=dzdy, area=(col1 - col0 + 1) * nrows,
    )


def _scanline(tri: _Triangles, W: int, bits: int) -> Coverage:
    """Exact covered column span of every (triangle, row), then one entry per covered pixel."""
    half, sc = 1 << (bits - 1), 1 << bits
    rows = tri.nrows
    t = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), rows)
    row = tri.row0.index_select(0, t) + (
        torch.arange(t.numel(), device=t.device) - (rows.cumsum(0) - rows).index_select(0, t)
    )
    py = row * sc + half
    # 1-D gathers per slot (a gather along dim 1 of [3,T] is slow on CUDA).
    # Clamping to +-_BIG (far off any image) keeps slot 2's +-4*_BIG "no bound" dominant.
    q = [
        _floor_div(tri.P[j].index_select(0, t) * py + tri.Q[j].index_select(0, t), tri.D[j].index_select(0, t))
        .clamp_(-_BIG, _BIG)
        for j in range(3)
    ]
    px_lo = torch.maximum(q[0], q[2] + tri.m_lo.index_select(0, t))
    px_hi = torch.minimum(q[1], q[2] + tri.m_hi.index_select(0, t))
    c_lo = torch.maximum(_floor_div(px_lo - half + sc - 1, sc), tri.col0.index_select(0, t))
    c_hi = torch.minimum(_floor_div(px_hi - half, sc), tri.col1.index_select(0, t))
    span = (c_hi - c_lo + 1).clamp_min_(0)

    # Per row: first pixel's flat index and depth, and the depth step per column.
    pfirst = tri.base.index_select(0, t) + row * W + c_lo
    dzdx = tri.dzdx.index_select(0, t)
    zfirst = tri.zc.index_select(0, t) + dzdx * (c_lo * sc + half).double() + tri.dzdy.index_select(0, t) * py.double()
    zstep = dzdx * sc
    face2 = tri.face2.index_select(0, t)
    r = torch.repeat_interleave(torch.arange(span.numel(), device=span.device), span)
    off = torch.arange(r.numel(), device=r.device) - (span.cumsum(0) - span).index_select(0, r)
    face2 = face2.index_select(0, r)
    depth = (zfirst.index_select(0, r) + zstep.index_select(0, r) * off.double()).float()
    return Coverage(pixel=pfirst.index_select(0, r) + off, face=face2 >> 1, depth=depth, front=(face2 & 1).bool())


def coverage(clip: torch.Tensor, faces: torch.Tensor, resolution: tuple[int, int], options: RasterOptions = DEFAULT_OPTIONS) -> Iterator[Coverage]:
    """Yield every covering (pixel, face) pair, in chunks of triangles whose
    bounding boxes hold at most ~``options.max_candidates`` pixels (one huge triangle may exceed it).

    ``max_candidates`` bounds memory (~100 bytes per pixel); None: 2**20 on
    CPU, 2**23 elsewhere (fewer chunks, fewer kernel launches).
    """
    clip = _batched_clip(clip)
    max_candidates = options.max_candidates
    if max_candidates is None:
        max_candidates = 1 << (20 if clip.device.type == "cpu" else 23)
    faces = _long_faces(faces, clip.device)
    H, W = _resolution(resolution)
    subpixel_bits = options.subpixel_bits
    tri = _triangle_setup(clip, faces, H, W, options.cull_backfaces, subpixel_bits)
    T = tri.area.numel()
    if T == 0:
        return
    ends = tri.area.cumsum(0)
    total = int(ends[-1])
    if total <= max_candidates:
        yield _scanline(tri, W, subpixel_bits)
        return
    marks = torch.arange(max_candidates, total, max_candidates, device=ends.device)
    cuts = torch.searchsorted(ends, marks, right=True).clamp_min(1).tolist()
    bounds = sorted(set([0, *cuts, T]))
    for t0, t1 in zip(bounds[:-1], bounds[1:]):
        yield _scanline(tri.slice(t0, t1), W, subpixel_bits)


def visible_faces(clip: torch.Tensor, faces: torch.Tensor, resolution: tuple[int, int], options: RasterOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """Z-buffer: [B*H*W] int64 index of the nearest covering face per pixel, -1 where empty."""
    clip = _batched_clip(clip)
    H, W = _resolution(resolution)
    zbuf = torch.full((clip.shape[0] * H * W,), _INT64_MAX, dtype=torch.int64, device=clip.device)
    for cov in coverage(clip, faces, (H, W), options):
        d01 = ((cov.depth + 1) * 0.5).clamp(0, 1).float()
        # Non-negative float32 bit patterns sort like the floats themselves.
        key = (d01.view(torch.int32).long() << 32) | cov.face
        zbuf.scatter_reduce_(0, cov.pixel, key, "amin", include_self=True)
    return torch.where(zbuf == _INT64_MAX, -1, zbuf & 0xFFFFFFFF)


# ------------------------------------------------------ differentiable stages
def _pixel_centres_ndc(pix: torch.Tensor, H: int, W: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    rem = pix % (H * W)
    row = torch.div(rem, W, rounding_mode="floor")
    col = rem - row * W
    return (2 * col + 1).to(dtype) / W - 1, (2 * row + 1).to(dtype) / H - 1


def _face_corners(table: torch.Tensor, faces: torch.Tensor, face: torch.Tensor, b: torch.Tensor | None, V: int):
    """Rows of ``table`` [B*V, C] at the 3 corners of ``face`` [N] (batch ``b``): 3 x [N, C].

    ``index_select`` keeps the backward a plain ``index_add``.
    """
    out = []
    for k in range(3):
        vi = faces[:, k].index_select(0, face)
        if b is not None:
            vi = vi + b * V
        out.append(table.index_select(0, vi))
    return out


def _batch_of(pix: torch.Tensor, H: int, W: int, batch: int) -> torch.Tensor | None:
    """Batch index of flat pixels, or None when the per-vertex data is shared (batch 1)."""
    return torch.div(pix, H * W, rounding_mode="floor") if batch > 1 else None


def barycentrics(clip: torch.Tensor, faces: torch.Tensor, pix: torch.Tensor, face: torch.Tensor, H: int, W: int):
    """Perspective-correct weights [N,3] and z/w [N] of ``face`` at pixel centres ``pix``; differentiable in clip.

    With p = (x_ndc, y_ndc, 1) and c_k = (x, y, w) of vertex k, b_k is
    proportional to det(p, c_{k+1}, c_{k+2}), i.e. the weights for which
    sum_k b_k c_k is parallel to p.
    """
    Bc, V, _ = clip.shape
    c0, c1, c2 = _face_corners(clip.reshape(Bc * V, 4), faces, face, _batch_of(pix, H, W, Bc), V)
    xn, yn = _pixel_centres_ndc(pix, H, W, clip.dtype)
    px = [c[:, 0] - xn * c[:, 3] for c in (c0, c1, c2)]
    py = [c[:, 1] - yn * c[:, 3] for c in (c0, c1, c2)]
    a0 = px[1] * py[2] - py[1] * px[2]
    a1 = px[2] * py[0] - py[2] * px[0]
    a2 = px[0] * py[1] - py[0] * px[1]
    at = a0 + a1 + a2
    inv = 1 / torch.where(at == 0, torch.ones_like(at), at)
    b0, b1, b2 = a0 * inv, a1 * inv, a2 * inv
    zw = (b0 * c0[:, 2] + b1 * c1[:, 2] + b2 * c2[:, 2]) / (b0 * c0[:, 3] + b1 * c1[:, 3] + b2 * c2[:, 3])
    return torch.stack([b0, b1, b2], 1), zw


def rasterize(clip: torch.Tensor, faces: torch.Tensor, resolution: tuple[int, int], options: RasterOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """[B,H,W,4] = (u, v, z/w, face+1); u, v weigh vertices 1 and 2; 0 where empty."""
    clip = _batched_clip(clip)
    faces = _long_faces(faces, clip.device)
    H, W = _resolution(resolution)
    B = clip.shape[0]
    vis = visible_faces(clip, faces, (H, W), options)
    pix = (vis >= 0).nonzero().squeeze(1)
    face = vis.index_select(0, pix)
    bary, zw = barycentrics(clip, faces, pix, face, H, W)
    vals = torch.stack([bary[:, 1], bary[:, 2], zw, (face + 1).to(clip.dtype)], 1)
    rast = torch.zeros(B * H * W, 4, dtype=clip.dtype, device=clip.device).index_put((pix,), vals)
    return rast.reshape(B, H, W, 4)


def interpolate(attr: torch.Tensor, rast: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """attr [V,C] or [B|1,V,C] -> [B,H,W,C], perspective-correct, 0 where empty."""
    B, H, W, _ = rast.shape
    faces = _long_faces(faces, rast.device)
    if attr.dim() == 2:
        attr = attr[None]
    if attr.dim() != 3 or attr.shape[0] not in (1, B):
        raise ValueError(f"attr must be [V,C] or [B,V,C] with B in (1, {B}), got {tuple(attr.shape)}")
    Ba, V, C = attr.shape
    r = rast.reshape(-1, 4)
    pix = (r[:, 3] > 0).nonzero().squeeze(1)
    rp = r.index_select(0, pix)
    face = rp[:, 3].detach().long() - 1
    a0, a1, a2 = _face_corners(attr.reshape(Ba * V, C), faces, face, _batch_of(pix, H, W, Ba), V)
    vals = a0 + rp[:, 0:1] * (a1 - a0) + rp[:, 1:2] * (a2 - a0)
    out = torch.zeros(B * H * W, C, dtype=vals.dtype, device=rast.device).index_put((pix,), vals)
    return out.reshape(B, H, W, C)


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
    a, b = faces[:, [1, 2, 0]], faces[:, [2, 0, 1]]
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


_BLEND_H, _BLEND_V = 1, 2


def _silhouette_codes(clip: torch.Tensor, faces: torch.Tensor, opp: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """[B*F,3] per edge: _BLEND_H / _BLEND_V if it may blend horizontal / vertical pairs, else 0.

    An edge is a silhouette when it is open, or when the neighbour's far vertex
    lies on the same side of it as the face's own third vertex (the surface
    folds back there).  Mostly-vertical edges (|dy| >= |dx| in pixels) blend
    horizontal pairs, the others vertical pairs, so no edge blends twice.
    """
    c = clip.detach()
    Bc, V, _ = c.shape
    w = c[..., 3]
    ws = torch.where(w == 0, torch.ones_like(w), w)
    sx, sy = c[..., 0] / ws * (0.5 * W), c[..., 1] / ws * (0.5 * H)  # pixel units (offset irrelevant)
    wsign = torch.sign(w)
    fT, oT = faces.T, opp.T  # [3,F]
    X, Y = sx[:, fT], sy[:, fT]  # [B,3,F]
    area = (X[:, 1] - X[:, 0]) * (Y[:, 2] - Y[:, 0]) - (X[:, 2] - X[:, 0]) * (Y[:, 1] - Y[:, 0])
    nxt, prv = [1, 2, 0], [2, 0, 1]
    ax, ay, ex, ey = X[:, nxt], Y[:, nxt], X[:, prv] - X[:, nxt], Y[:, prv] - Y[:, nxt]
    o = oT.clamp_min(0)
    # A projected point behind the camera (w < 0) flips its orientation: multiply by sign(w).
    side = torch.sign(ex * (sy[:, o] - ay) - ey * (sx[:, o] - ax)) * wsign[:, o]
    sil = (oT < 0) | (side == torch.sign(area)[:, None]) | (side == 0)
    vertical = ey.abs() >= ex.abs()
    code = torch.where(vertical, _BLEND_H, _BLEND_V) * sil
    return code.transpose(1, 2).reshape(Bc * faces.shape[0], 3)


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
    a silhouette (see ``_silhouette_codes``) and mostly perpendicular to the
    pair, treat it as a straight line through both pixels: the pixel whose
    box it cuts is blended towards the other pixel's colour by the fraction
    of its box on the far side, ``|t - 1/2|`` (c_in's pixel when t < 1/2,
    else c_out's).  ``t`` is computed from F's clip-space vertices, so the
    image depends continuously on them and silhouettes give gradients to
    ``clip``; interior pixels and non-silhouette edges are left unchanged.

    As nvdiffrast's antialias (same edge classification, crossing window
    ``[-eps, 1+eps]`` clamped to [0, 1], one contribution per pair, summed
    per pixel).  Differences: the crossing edge is the one through which the
    segment leaves F (first crossing); no ``pos_gradient_boost``.
    """
    B, H, W, C = color.shape
    clip = _batched_clip(clip)
    Bc, V, _ = clip.shape
    faces = _long_faces(faces, color.device)
    F = faces.shape[0]
    opp = edge_topology(faces) if topology is None else topology.to(color.device).long()
    flat = color.reshape(-1, C)
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
    t0, t1 = tf.index_select(0, p0), tf.index_select(0, p1)
    use0 = (t1 < 0) | ((t0 >= 0) & (z.index_select(0, p0) < z.index_select(0, p1)))
    front = torch.where(use0, t0, t1)
    pin, pout = torch.where(use0, p0, p1), torch.where(use0, p1, p0)
    b = _batch_of(pin, H, W, Bc)

    # Cheap prefilter: the front face needs an edge that may blend this pair's direction.
    codes = _silhouette_codes(clip, faces, opp, H, W)
    want = torch.where(horiz, _BLEND_H, _BLEND_V)
    elig = codes.index_select(0, front if b is None else b * F + front) == want[:, None]  # [N,3]
    keep = elig.any(1).nonzero().squeeze(1)
    if keep.numel() == 0:
        return color
    horiz, front, pin, pout = (t.index_select(0, keep) for t in (horiz, front, pin, pout))
    elig = elig.index_select(0, keep)
    b = None if b is None else b.index_select(0, keep)

    corners = _face_corners(clip.reshape(Bc * V, 4), faces, front, b, V)  # differentiable
    sx = [(c[:, 0] / c[:, 3] + 1) * (0.5 * W) for c in corners]
    sy = [(c[:, 1] / c[:, 3] + 1) * (0.5 * H) for c in corners]
    rem = pin % (H * W)
    row = torch.div(rem, W, rounding_mode="floor")
    cy, cx = row.to(sx[0].dtype) + 0.5, (rem - row * W).to(sx[0].dtype) + 0.5
    step = torch.sign(pout - pin).to(sx[0].dtype)
    dxs, dys = torch.where(horiz, step, 0.0), torch.where(horiz, 0.0, step)
    area = (sx[1] - sx[0]) * (sy[2] - sy[0]) - (sx[2] - sx[0]) * (sy[1] - sy[0])
    s = torch.where(area > 0, 1.0, -1.0).to(sx[0].dtype)
    e_in, slope = [], []
    for k in range(3):
        a, bb = (k + 1) % 3, (k + 2) % 3
        ex, ey = sx[bb] - sx[a], sy[bb] - sy[a]
        e_in.append(s * (ex * (cy - sy[a]) - ey * (cx - sx[a])))  # > 0 inside F
        slope.append(s * (ex * dys - ey * dxs))  # change along the segment c_in -> c_out
    e_in, slope = torch.stack(e_in, 1), torch.stack(slope, 1)  # [N,3]
    leaves = (e_in + slope < 0) & (slope < 0)
    t_k = e_in / torch.where(leaves, -slope, torch.ones_like(slope))
    t_k = torch.where(leaves, t_k, torch.full_like(t_k, float("inf")))
    k = t_k.detach().argmin(1, keepdim=True)
    t = t_k.gather(1, k)[:, 0]
    td = t.detach()
    ok = leaves.gather(1, k)[:, 0] & elig.gather(1, k)[:, 0] & (td > -eps) & (td < 1 + eps)
    idx = ok.nonzero().squeeze(1)
    if idx.numel() == 0:
        return color
    alpha = 0.5 - t.index_select(0, idx).clamp(0, 1)
    pin, pout = pin.index_select(0, idx), pout.index_select(0, idx)
    into_in = alpha > 0
    target = torch.where(into_in, pin, pout)
    source = torch.where(into_in, pout, pin)
    delta = alpha.abs()[:, None] * (flat.index_select(0, source) - flat.index_select(0, target))
    return flat.index_add(0, target, delta).reshape(B, H, W, C)


# ------------------------------------------------------------------ backend
class TorchMeshBackend:
    """``MeshBackend`` in pure PyTorch (runs wherever ``clip`` lives), drawing with ``options``."""

    name = "torch"

    def __init__(self, options: RasterOptions = DEFAULT_OPTIONS):
        self.options = options
        self._topology: tuple[torch.Tensor, torch.Tensor] | None = None  # (faces, edge_topology(faces))

    def topology(self, faces: torch.Tensor) -> torch.Tensor:
        """``edge_topology(faces)``, remembered for the last mesh (checked by value, O(F))."""
        cached = self._topology
        if cached is not None and cached[0].shape == faces.shape and cached[0].device == faces.device:
            if torch.equal(cached[0], faces.to(cached[0].dtype)):
                return cached[1]
        topo = edge_topology(faces)
        self._topology = (faces.detach().clone(), topo)
        return topo

    def rasterize(self, clip: torch.Tensor, faces: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
        return rasterize(clip, faces, resolution, self.options)

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
        return antialias(color, rast, clip, faces, self.topology(faces) if topology is None else topology)


@MESH_BACKENDS.register("torch")
def _make_torch_backend(device: torch.device) -> TorchMeshBackend:
    return TorchMeshBackend()  # device-agnostic: it runs wherever ``clip`` lives
