"""Procedural textures for the procedural head model, baked into its UV atlas.

``procedural_textures(model, size, seed)`` returns float32 maps:

* ``albedo``    [size,size,3] linear RGB in [0,1]
* ``roughness`` [size,size,1]
* ``specular``  [size,size,1] (specular intensity, FLARE's "ko")

Row 0 of every map is the *top* of the texture image, i.e. v = 1 (OBJ
convention: v = 0 at the bottom), so ``map[row, col]`` with
``row = (1 - v) * size``.

Colours are smooth functions of the template position of each texel (found by
rasterising the UV layout), of soft region masks the model stores in
``model.meta["masks"]`` and of a seed-dependent palette and value noise, so
the same seed always gives the same maps and region edges agree with the
model's ``face_labels``.  Detail is kept at a few millimetres or coarser:
the demo trains on 128-256 px renders where pixel-level noise would only
cost PSNR.
"""

from __future__ import annotations

import numpy as np

from headavatar.errors import UserError


# ----------------------------------------------------------- rasterising
def rasterize_triangles(tri: np.ndarray, height: int, width: int, depth: np.ndarray | None = None, strict: bool = False, chunk: int = 1 << 21):
    """Rasterise 2D triangles given in pixel units (x right, y down; pixel centres at +0.5).

    tri: [F,3,2].  Returns (face [H,W] int64, -1 where empty; bary [H,W,3]; count [H,W] int:
    how many triangles cover each pixel centre).  With ``depth`` [F,3] the nearest (smallest
    depth) triangle wins, otherwise the last one.  ``strict`` excludes centres lying exactly on
    an edge, so triangles that only share edges never count twice.
    """
    tri = np.asarray(tri, np.float64)
    F = tri.shape[0]
    face = np.full(height * width, -1, np.int64)
    bary = np.zeros((height * width, 3))
    count = np.zeros(height * width, np.int64)
    best = np.full(height * width, np.inf)
    if F == 0:
        return face.reshape(height, width), bary.reshape(height, width, 3), count.reshape(height, width)
    p0, p1, p2 = tri[:, 0], tri[:, 1], tri[:, 2]
    e1, e2 = p1 - p0, p2 - p0
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    ok = np.abs(det) > 1e-12
    lo = np.floor(tri.min(1) - 0.5).astype(np.int64) + 1
    hi = np.floor(tri.max(1) - 0.5).astype(np.int64)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, [width - 1, height - 1])
    nx = np.clip(hi[:, 0] - lo[:, 0] + 1, 0, None)
    ny = np.clip(hi[:, 1] - lo[:, 1] + 1, 0, None)
    n = np.where(ok, nx * ny, 0)
    # process faces in chunks so the candidate (face, pixel) pairs stay bounded
    cum = np.cumsum(n)
    starts = np.searchsorted(cum, np.arange(0, cum[-1] if len(cum) else 0, chunk), side="right")
    bounds = list(starts) + [F]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue
        fi = np.arange(a, b)
        nn = n[fi]
        fid = np.repeat(fi, nn)
        if fid.size == 0:
            continue
        local = np.arange(fid.size) - np.repeat(np.cumsum(nn) - nn, nn)
        px = lo[fid, 0] + local % nx[fid]
        py = lo[fid, 1] + local // nx[fid]
        qx = px + 0.5 - p0[fid, 0]
        qy = py + 0.5 - p0[fid, 1]
        d = det[fid]
        b1 = (qx * e2[fid, 1] - qy * e2[fid, 0]) / d
        b2 = (e1[fid, 0] * qy - e1[fid, 1] * qx) / d
        b0 = 1 - b1 - b2
        eps = 1e-9
        inside = (b0 > eps) & (b1 > eps) & (b2 > eps) if strict else (b0 >= -eps) & (b1 >= -eps) & (b2 >= -eps)
        pix = (py * width + px)[inside]
        fid = fid[inside]
        bb = np.stack([b0, b1, b2], -1)[inside]
        np.add.at(count, pix, 1)
        if depth is not None:
            z = (bb * depth[fid]).sum(-1)
            order = np.lexsort((-z, pix))  # per pixel, nearest last
            pix, fid, bb, z = pix[order], fid[order], bb[order], z[order]
            last = np.r_[pix[1:] != pix[:-1], True]
            pix, fid, bb, z = pix[last], fid[last], bb[last], z[last]
            win = z < best[pix]
            pix, fid, bb, z = pix[win], fid[win], bb[win], z[win]
            best[pix] = z
        face[pix] = fid
        bary[pix] = bb
    return face.reshape(height, width), bary.reshape(height, width, 3), count.reshape(height, width)


def rasterize_uv(uvs: np.ndarray, uv_faces: np.ndarray, size: int, strict: bool = False):
    """Rasterise a UV layout at size x size texels (row 0 = v 1). See ``rasterize_triangles``."""
    uv = np.asarray(uvs, np.float64)[np.asarray(uv_faces)]
    tri = np.stack([uv[..., 0] * size, (1.0 - uv[..., 1]) * size], -1)
    return rasterize_triangles(tri, size, size, strict=strict)


# ---------------------------------------------------------------- noise
def _value_noise(p: np.ndarray, freq: float, seed: int) -> np.ndarray:
    """Smooth value noise in [-1,1] at points p [...,3] with lattice spacing 1/freq (metres)."""
    q = np.asarray(p, np.float64) * freq
    i0 = np.floor(q).astype(np.int64)
    f = q - i0
    w = f * f * (3 - 2 * f)
    table = np.random.default_rng(np.random.PCG64(seed)).uniform(-1, 1, 4096)

    def val(di, dj, dk):
        h = ((i0[..., 0] + di) * 73856093) ^ ((i0[..., 1] + dj) * 19349663) ^ ((i0[..., 2] + dk) * 83492791)
        return table[np.mod(h, 4096)]

    out = 0.0
    for di in (0, 1):
        wx = w[..., 0] if di else 1 - w[..., 0]
        for dj in (0, 1):
            wy = w[..., 1] if dj else 1 - w[..., 1]
            for dk in (0, 1):
                wz = w[..., 2] if dk else 1 - w[..., 2]
                out = out + wx * wy * wz * val(di, dj, dk)
    return out


def _fbm(p, freq, seed, octaves=3):
    out, amp, norm = 0.0, 1.0, 0.0
    for o in range(octaves):
        out = out + amp * _value_noise(p, freq * 2**o, seed + 101 * o)
        norm += amp
        amp *= 0.5
    return out / norm


def _fill_empty(maps: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Copy the nearest covered texel into every empty one, so bilinear lookups near chart
    edges (and mip-mapping) never pick up an undefined background."""
    from scipy.ndimage import distance_transform_edt

    idx = distance_transform_edt(~covered, return_distances=False, return_indices=True)
    return maps[idx[0], idx[1]]


# ------------------------------------------------------------- textures
_SKIN_TONES = np.array([[0.70, 0.47, 0.37], [0.60, 0.39, 0.29], [0.47, 0.28, 0.19], [0.30, 0.17, 0.11]])
_HAIR_COLOURS = np.array([[0.05, 0.030, 0.018], [0.12, 0.065, 0.035], [0.025, 0.020, 0.018], [0.20, 0.075, 0.030], [0.30, 0.20, 0.09]])
_IRIS_COLOURS = np.array([[0.08, 0.20, 0.38], [0.16, 0.07, 0.025], [0.10, 0.20, 0.09], [0.20, 0.13, 0.05]])


def procedural_textures(model, size: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
    """Albedo (linear RGB), roughness and specular maps in the procedural model's UV atlas.

    Deterministic for a given (model, size, seed).  See the module docstring.
    """
    meta = getattr(model, "meta", {}) or {}
    if "masks" not in meta or "parts" not in meta:
        raise UserError(f"procedural textures need the procedural head model (got '{model.name}')")
    size = int(size)
    if size < 16:
        raise UserError(f"texture size must be at least 16 (got {size})")
    rng = np.random.default_rng(np.random.PCG64(seed))
    skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] * rng.uniform(0.93, 1.07, 3)
    hair_c = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * rng.uniform(0.9, 1.1, 3)
    iris_c = _IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] * rng.uniform(0.85, 1.15, 3)
    lip_c = np.clip(skin * np.array([0.78, 0.42, 0.42]) + np.array([0.05, 0.0, 0.0]), 0, 1) * rng.uniform(0.9, 1.1)
    nseed = int(rng.integers(1 << 30))

    faces = model.faces.cpu().numpy()
    V = model.template.cpu().numpy().astype(np.float64)
    face, bary, _ = rasterize_uv(model.uvs.cpu().numpy(), model.uv_faces.cpu().numpy(), size)
    cov = face >= 0
    fi = face[cov]
    bw = bary[cov]
    tri = faces[fi]

    def interp(attr):  # per-vertex attribute -> covered texels
        a = np.asarray(attr, np.float64)
        if a.ndim == 1:
            return (a[tri] * bw).sum(-1)
        return (a[tri] * bw[..., None]).sum(-2)

    P = interp(V)
    masks = {k: interp(v) for k, v in meta["masks"].items()}
    part_names = meta["part_names"]
    part = np.asarray(meta["face_part"])[fi]
    is_part = lambda prefix: np.isin(part, [i for i, n in enumerate(part_names) if n.startswith(prefix)])  # noqa: E731
    x, y, z = P[:, 0], P[:, 1], P[:, 2]
    N = len(fi)
    albedo = np.zeros((N, 3))
    rough = np.zeros(N)
    spec = np.zeros(N)

    def paint(sel, colour, roughness: float, specular: float) -> None:
        """One material on the texels ``sel`` (a boolean mask or a slice)."""
        albedo[sel] = colour
        rough[sel] = roughness
        spec[sel] = specular

    def layer(m, colour, roughness: float, specular: float) -> None:
        """A material over what is painted, by the soft mask ``m`` [N] in [0, 1]."""
        albedo[:] = _mix(albedo, colour, m[:, None])
        rough[:] = _mix(rough, roughness, m)
        spec[:] = _mix(spec, specular, m)

    # ---- skin: low-frequency tone variation, flushed cheeks/nose, a few moles
    n1 = _fbm(P, 25.0, nseed, 3)
    n2 = _fbm(P + 3.1, 60.0, nseed + 7, 2)
    s = skin[None] * (1 + 0.07 * n1[:, None] + 0.025 * n2[:, None] * np.array([1.0, 0.8, 0.8]))
    flush = np.exp(-(((np.abs(x) - 0.042) / 0.016) ** 2) - ((y + 0.004) / 0.016) ** 2) + 0.6 * np.exp(-((x / 0.008) ** 2) - ((y - 0.004) / 0.008) ** 2)
    s = s * (1 - 0.06 * flush[:, None] * np.array([0.0, 1.0, 1.0]))
    spots = rng.normal(0, 1, (18, 2)) * [0.03, 0.03] + [0.0, 0.01]
    for sx_, sy_ in spots:
        r = rng.uniform(0.0015, 0.0028)
        d = np.exp(-(((x - sx_) ** 2 + (y - sy_) ** 2) / r**2)) * (z > 0.03)
        s = s * (1 - 0.22 * d[:, None] * np.array([0.8, 1.0, 1.0]))
    # nostrils: darker under the tip
    nost = np.exp(-(((np.abs(x) - 0.0062) / 0.0028) ** 2) - ((y + 0.0085) / 0.0022) ** 2) * (z > 0.09)
    s = s * (1 - 0.6 * nost[:, None])
    neck = masks["neck"][:, None]
    s = s * (1 - 0.06 * neck)  # the neck is a shade darker (less sun)
    paint(slice(None), s, 0.5, 0.3)
    # ---- lips
    lipv = lip_c[None] * (1 + 0.06 * n2[:, None])
    layer(np.clip(masks["lips"], 0, 1), lipv, 0.38, 0.4)
    # ---- hair: strands flow down from the crown; streaks a few millimetres wide
    phi = np.arctan2(x, z + 0.01)
    streak = _value_noise(np.stack([phi * 14.0, y * 1.2, np.zeros_like(y)], -1), 1.0 * 6.5, nseed + 11)
    streak2 = _value_noise(np.stack([phi * 14.0, y * 1.2, np.ones_like(y)], -1), 13.0, nseed + 13)
    hair_v = hair_c[None] * (1 + 0.35 * streak[:, None] + 0.15 * streak2[:, None])
    layer(np.clip(masks["hair"], 0, 1), hair_v, 0.8, 0.15)
    # ---- brows: hair colour, slightly lighter, streaked along the brow
    bstreak = _value_noise(np.stack([x * 1.0, y * 4.0, np.zeros_like(x)], -1), 250.0, nseed + 17)
    brow_v = (hair_c[None] * 1.2 + 0.01) * (1 + 0.3 * bstreak[:, None])
    layer(np.clip(masks["brows"], 0, 1) * 0.92, brow_v, 0.7, 0.15)
    # ---- eyelids: skin with a dark lash line at the margin
    lids = is_part("lid_")
    ls = masks["lid_s"]
    upper = is_part("lid_upper")
    lash = np.where(upper, np.clip((ls - 0.80) / 0.12, 0, 1), 0.6 * np.clip((ls - 0.86) / 0.1, 0, 1))
    lid_v = albedo * (1 - 0.08 * (1 - ls))[:, None]
    lid_v = _mix(lid_v, np.array([0.03, 0.022, 0.02]), lash[:, None])
    albedo[lids] = lid_v[lids]
    # ---- eyeballs: sclera, iris with radial fibres, pupil (polar angle from the eye's front)
    for side in ("left", "right"):
        sel = is_part(f"eyeball_{side}")
        c = np.array(meta["eye_centers"][side])
        d = P[sel] - c
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        al = np.degrees(np.arccos(np.clip(d[:, 2], -1, 1)))
        ps = np.arctan2(d[:, 1], d[:, 0])
        fib = _value_noise(np.stack([np.cos(ps) * 3, np.sin(ps) * 3, al * 0.02], -1), 4.0, nseed + 23)
        sclera = (np.array([0.78, 0.74, 0.70]) * (1 - 0.12 * _smooth01((al - 40) / 40))[:, None]
                  + np.array([0.04, 0.0, 0.0]) * _smooth01((al - 45) / 40)[:, None])
        iris = iris_c[None] * (1 + 0.45 * fib[:, None]) * (1 - 0.45 * _smooth01((al - 22) / 6))[:, None]
        t_iris = _smooth01((27.5 - al) / 2.0)[:, None]
        t_pup = _smooth01((11.0 - al) / 1.5)[:, None]
        col = _mix(_mix(sclera, iris, t_iris), np.array([0.012, 0.012, 0.014]), t_pup)
        paint(sel, col, 0.1, 0.9)
    # ---- teeth: off-white with darker gaps between teeth and gums at the roots
    teeth = is_part("teeth")
    if teeth.any():
        tx = np.abs(x[teeth])
        edges = np.array([0.0, 0.0043, 0.0085, 0.0122, 0.0160, 0.0200, 0.024])
        gap = np.exp(-((tx[:, None] - edges[None, 1:]) / 0.0005) ** 2).sum(1) + np.exp(-((tx / 0.0004) ** 2))
        col = np.array([0.74, 0.70, 0.60])[None] * (1 - 0.45 * np.clip(gap, 0, 1))[:, None]
        ty = y[teeth] - (-0.028)
        gum = _smooth01((np.abs(ty) - 0.0068) / 0.0012)[:, None]
        paint(teeth, _mix(col, np.array([0.45, 0.12, 0.12]), gum), 0.3, 0.5)
    # ---- mouth interior: dark red, darker towards the back
    mouth = is_part("mouth")
    if mouth.any():
        depth = np.clip((z[mouth].max() - z[mouth]) / 0.03, 0, 1)
        paint(mouth, np.array([0.16, 0.03, 0.03])[None] * (1 - 0.6 * depth)[:, None], 0.4, 0.3)

    albedo = np.clip(albedo, 0.0, 1.0)
    full = np.zeros((size, size, 5))
    full[cov] = np.concatenate([albedo, rough[:, None], spec[:, None]], 1)
    full = _fill_empty(full, cov)
    full = full.astype(np.float32)
    return {"albedo": np.ascontiguousarray(full[..., :3]), "roughness": np.ascontiguousarray(full[..., 3:4]), "specular": np.ascontiguousarray(full[..., 4:5])}


def _mix(a, b, t):
    """``a`` where ``t`` is 0, ``b`` where it is 1, linear in between."""
    return a * (1 - t) + b * t


def _smooth01(t):
    t = np.clip(t, 0, 1)
    return t * t * (3 - 2 * t)
