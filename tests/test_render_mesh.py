"""Tests of the mesh rasteriser (torch reference backend) and its helpers.

The reference is a brute-force per-pixel loop over triangles in float64
(``_brute_force``); pixel centres within 1e-3 pixel of an edge, or where two
triangles are within 1e-6 in depth, are ambiguous and skipped.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from headavatar.camera import Cameras, fov_to_focal, intrinsics, look_at
from headavatar.render.mesh import get_mesh_backend, nvdiffrast_available
from headavatar.render.mesh.ops import face_normals, mip_pyramid, texture2d, vertex_normals
from headavatar.render.mesh.torch_ref import (
    RasterOptions,
    TorchMeshBackend,
    antialias,
    coverage,
    edge_topology,
    interpolate,
    rasterize,
)

# ----------------------------------------------------------------- helpers


def _assert_close(got, want, atol=1e-7, rtol=1e-7):
    # torch.testing.assert_close costs ~2 s of lazy imports on its first call
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.allclose(got, want, atol=atol, rtol=rtol), float((got - want).abs().max())


def _brute_force(clip: np.ndarray, faces: np.ndarray, H: int, W: int):
    """Loop over triangles, test every pixel centre.  Returns face id [H,W] (-1 empty),
    depth, perspective-correct barycentrics [H,W,3] and an ambiguous mask."""
    cols, rows = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    tri = -np.ones((H, W), dtype=np.int64)
    depth = np.full((H, W), np.inf)
    second = np.full((H, W), np.inf)
    bary = np.zeros((H, W, 3))
    amb = np.zeros((H, W), dtype=bool)
    p_ndc = np.stack([2 * cols / W - 1, 2 * rows / H - 1, np.ones_like(cols)], -1)
    for f, idx in enumerate(faces):
        v = clip[idx]
        if (v[:, 3] <= 0).any() or (np.abs(v[:, 2]) > v[:, 3]).any():
            continue
        sp = (v[:, :2] / v[:, 3:4] + 1) * 0.5 * np.array([W, H])  # pixels
        area = (sp[1, 0] - sp[0, 0]) * (sp[2, 1] - sp[0, 1]) - (sp[2, 0] - sp[0, 0]) * (sp[1, 1] - sp[0, 1])
        if area == 0:
            continue
        e = []
        for k in range(3):
            a, b = sp[(k + 1) % 3], sp[(k + 2) % 3]
            ek = ((b[0] - a[0]) * (rows - a[1]) - (b[1] - a[1]) * (cols - a[0])) * np.sign(area)
            amb |= np.abs(ek) / np.linalg.norm(b - a) < 1e-3  # centre within 1e-3 px of the edge
            e.append(ek)
        e = np.stack(e, -1)
        inside = (e > 0).all(-1)
        z = (e / e.sum(-1, keepdims=True) * (v[:, 2] / v[:, 3])).sum(-1)  # NDC z is affine in screen space
        lam = p_ndc @ np.linalg.inv(v[:, [0, 1, 3]])  # lam @ [c_k] is parallel to p
        lam /= lam.sum(-1, keepdims=True)
        nearer = inside & (z < depth)
        second = np.where(nearer, depth, np.where(inside, np.minimum(second, z), second))
        depth = np.where(nearer, z, depth)
        tri = np.where(nearer, f, tri)
        bary = np.where(nearer[..., None], lam, bary)
    with np.errstate(invalid="ignore"):  # inf - inf where nothing or one triangle covers
        amb |= (second - depth) < 1e-6
    return tri, np.where(tri >= 0, depth, 0), bary, amb


def _random_scene(seed: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """n triangles in front of a perspective camera: overlapping, plus one pair intersecting in depth."""
    g = torch.Generator().manual_seed(seed)
    centre = (torch.rand(n, 1, 3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor([2.0, 2.0, 1.0])
    cam = centre + (torch.rand(n, 3, 3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor([5.0, 5.0, 1.0])
    cam[..., 2] += 3.0  # depth
    # make the last two triangles intersect: same footprint, opposite depth slopes
    cam[-1] = cam[-2].clone()
    cam[-1, :, 2] = cam[-2, :, 2].flip(0)
    pts = cam.reshape(-1, 3)
    near, far = 0.5, 10.0
    f = 1.7
    clip = torch.stack(
        [f * pts[:, 0], f * pts[:, 1], (far + near) / (far - near) * pts[:, 2] - 2 * far * near / (far - near), pts[:, 2]],
        -1,
    )
    faces = torch.arange(3 * n).reshape(n, 3)
    return clip, faces


def _subdivided_cube(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed unit cube [-1,1]^3, each face an n x n grid, outward (counter-clockwise) winding."""
    verts, faces = [], []
    g = torch.linspace(-1, 1, n + 1, dtype=torch.float64)
    uu, vv = torch.meshgrid(g, g, indexing="ij")
    for axis in range(3):
        for sign in (-1.0, 1.0):
            a, b = [i for i in range(3) if i != axis]
            p = torch.zeros(n + 1, n + 1, 3, dtype=torch.float64)
            p[..., axis] = sign
            p[..., a], p[..., b] = uu, vv
            base = sum(v.shape[0] for v in verts)
            verts.append(p.reshape(-1, 3))
            idx = torch.arange((n + 1) ** 2).reshape(n + 1, n + 1) + base
            q0, q1, q2, q3 = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
            quads = torch.stack([q0, q1, q2, q3], -1).reshape(-1, 4)
            t = torch.cat([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
            normal = torch.zeros(3, dtype=torch.float64)
            normal[axis] = sign
            P = p.reshape(-1, 3)
            e = torch.linalg.cross(P[t[:, 1] - base] - P[t[:, 0] - base], P[t[:, 2] - base] - P[t[:, 0] - base], dim=-1)
            if (e @ normal < 0).all():
                t = t.flip(1)
            faces.append(t)
    V = torch.cat(verts)
    key = torch.round(V * 1e6).long()
    uniq, inv = torch.unique(key, dim=0, return_inverse=True)
    Vu = torch.zeros(len(uniq), 3, dtype=torch.float64).index_copy(0, inv, V)
    return Vu, inv[torch.cat(faces)]


def _camera(res_hw, fov_deg=40.0, eye=(0.3, 0.5, 4.0), dtype=torch.float64) -> Cameras:
    H, W = res_hw
    f = fov_to_focal(math.radians(fov_deg), H)
    R, t = look_at(torch.tensor(eye), torch.zeros(3))
    return Cameras(intrinsics(f, f, W / 2, H / 2), R, t, H, W).to(dtype=dtype)


# --------------------------------------------------------------- rasterize


@pytest.mark.parametrize("res", [(16, 16), (8, 12)])
@pytest.mark.parametrize("face_dtype", [torch.int32, torch.int64])
def test_rasterize_matches_brute_force(res, face_dtype):
    H, W = res
    for seed in (0, 1):
        clip, faces = _random_scene(seed)
        rast = rasterize(clip, faces.to(face_dtype), (H, W))[0]
        tri, depth, bary, amb = _brute_force(clip.numpy(), faces.numpy(), H, W)
        ok = ~amb
        assert ok.sum() > 0.8 * H * W
        got = rast[..., 3].long().numpy() - 1
        np.testing.assert_array_equal(got[ok], tri[ok])
        cov = ok & (tri >= 0)
        assert cov.sum() > 0.3 * H * W
        np.testing.assert_allclose(rast[..., 2].numpy()[cov], depth[cov], atol=1e-9)
        np.testing.assert_allclose(rast[..., 0].numpy()[cov], bary[..., 1][cov], atol=1e-9)
        np.testing.assert_allclose(rast[..., 1].numpy()[cov], bary[..., 2][cov], atol=1e-9)
        assert (rast.numpy()[got < 0] == 0).all()


def test_rasterize_huge_thin_triangle():
    # A nearly horizontal edge 2e6 px long: its per-row column bound lies far off-screen
    # and must not mask the other edges' bounds (whatever the vertex order).
    H, W = 48, 64
    px = torch.tensor([[-1.0e6, 10.2], [1.0e6, 10.2 + 1 / 256], [30.3, 40.7]], dtype=torch.float64)
    ndc = px / torch.tensor([W, H]) * 2 - 1
    clip = torch.cat([ndc, torch.zeros(3, 1, dtype=torch.float64), torch.ones(3, 1, dtype=torch.float64)], 1)
    for order in ([0, 1, 2], [1, 2, 0], [0, 2, 1]):
        faces = torch.tensor([order])
        got = rasterize(clip, faces, (H, W))[0, ..., 3].long().numpy() - 1
        tri, _, _, amb = _brute_force(clip.numpy(), faces.numpy(), H, W)
        assert (tri >= 0).sum() > 1000
        np.testing.assert_array_equal(got[~amb], tri[~amb])


def test_rasterize_float32_matches_float64():
    clip, faces = _random_scene(3)
    r64 = rasterize(clip, faces, (16, 16))
    r32 = rasterize(clip.float(), faces, (16, 16))
    same = r64[..., 3] == r32[..., 3].double()
    assert same.float().mean() > 0.97
    _assert_close(r32[..., :3][same].double(), r64[..., :3][same], atol=1e-5, rtol=1e-5)


def test_rasterize_chunks_and_batch():
    clip, faces = _random_scene(4)
    clip2, _ = _random_scene(5)
    both = torch.stack([clip, clip2])
    r = rasterize(both, faces, (16, 16))
    assert r.shape == (2, 16, 16, 4)
    for b, c in enumerate((clip, clip2)):
        _assert_close(r[b], rasterize(c[None], faces, (16, 16))[0])
        _assert_close(r[b], rasterize(c[None], faces, (16, 16), RasterOptions(max_candidates=7))[0])
    assert not torch.equal(r[0], r[1])


def test_culling_near_plane_and_backfaces():
    clip, faces = _random_scene(6)
    base = rasterize(clip, faces, (16, 16))
    present = base[..., 3].unique().long() - 1
    victim = int(present[present >= 0][0])
    behind = clip.clone()
    behind[faces[victim, 0], 3] = -0.1  # w <= 0: the whole triangle is dropped
    ids = rasterize(behind, faces, (16, 16))[..., 3].long() - 1
    assert not (ids == victim).any()
    too_near = clip.clone()
    too_near[faces[victim, 1], 2] = -2 * too_near[faces[victim, 1], 3]  # z < -w
    assert not ((rasterize(too_near, faces, (16, 16))[..., 3].long() - 1) == victim).any()

    # the same triangle with both windings: one of them is culled with cull_backfaces
    tri = clip[faces[0]][None]
    one = torch.tensor([[0, 1, 2]])
    cov_ccw = rasterize(tri, one, (16, 16), RasterOptions(cull_backfaces=True))[..., 3] > 0
    cov_cw = rasterize(tri, one.flip(1), (16, 16), RasterOptions(cull_backfaces=True))[..., 3] > 0
    assert cov_ccw.any() != cov_cw.any()


def test_front_facing_is_outward_towards_the_camera():
    verts, faces = _subdivided_cube(2)
    cam = _camera((24, 24))
    clip = cam.to_clip(verts[None])
    n = face_normals(verts, faces)
    centroid = verts[faces].mean(1)
    towards = ((cam.centers - centroid) * n).sum(-1) > 0
    for cov in coverage(clip, faces, (24, 24)):
        assert torch.equal(cov.front, towards[cov.face])


def _count(clip, faces, res, front_only=None):
    H, W = res
    B = clip.shape[0] if clip.dim() == 3 else 1
    counts = torch.zeros(B * H * W, dtype=torch.int64)
    for cov in coverage(clip, faces, res):
        sel = cov.front if front_only is True else (~cov.front if front_only is False else torch.ones_like(cov.front))
        counts.index_add_(0, cov.pixel[sel], torch.ones_like(cov.pixel[sel]))
    return counts.reshape(B, H, W)


def test_watertight_grid_through_pixel_centres():
    # A planar grid whose vertices and edges pass exactly through pixel centres,
    # with both diagonal directions: every interior centre is covered exactly once.
    H, W = 12, 16
    n = 8
    xs = (2 * (torch.arange(n + 1) + 2.5) / W - 1).double()  # pixel centres 2.5 .. 10.5
    ys = (2 * (torch.arange(n + 1) + 1.5) / H - 1).double()
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    clip = torch.stack([gx, gy, torch.zeros_like(gx), torch.ones_like(gx)], -1).reshape(-1, 4)
    idx = torch.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    q0, q1, q2, q3 = idx[:-1, :-1], idx[:-1, 1:], idx[1:, 1:], idx[1:, :-1]
    quads = torch.stack([q0, q1, q2, q3], -1).reshape(-1, 4)
    alt = (torch.arange(n * n) % 3 == 0)[:, None]
    t1 = torch.where(alt, quads[:, [0, 1, 2]], quads[:, [0, 1, 3]])
    t2 = torch.where(alt, quads[:, [0, 2, 3]], quads[:, [1, 2, 3]])
    faces = torch.cat([t1, t2])
    counts = _count(clip, faces, (H, W))[0]
    # interior pixel centres: columns 3..9, rows 2..8 (the outer border is a tie)
    assert (counts[2:9, 3:10] == 1).all()
    assert counts.max() == 1


def test_watertight_fan_around_a_pixel_centre():
    H = W = 9
    centre = torch.tensor([2 * 4.5 / W - 1, 2 * 4.5 / H - 1], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    angles = torch.sort(torch.rand(7, generator=g, dtype=torch.float64) * 2 * math.pi).values
    ring = centre + 0.7 * torch.stack([angles.cos(), angles.sin()], -1)
    pts = torch.cat([centre[None], ring])
    clip = torch.cat([pts, torch.zeros(8, 1, dtype=torch.float64), torch.ones(8, 1, dtype=torch.float64)], 1)
    faces = torch.tensor([[0, 1 + i, 1 + (i + 1) % 7] for i in range(7)])
    counts = _count(clip, faces, (H, W))[0]
    assert counts[4, 4] == 1
    assert counts.max() == 1


@pytest.mark.parametrize("res", [(20, 20), (15, 22)])
def test_watertight_closed_mesh(res):
    verts, faces = _subdivided_cube(3)
    cam = _camera(res)
    clip = cam.to_clip(verts[None])
    front = _count(clip, faces, res, front_only=True)
    back = _count(clip, faces, res, front_only=False)
    inside = (front + back) > 0
    assert inside.sum() > 50
    # a closed convex mesh seen from outside: exactly one front and one back face per pixel
    assert (front[inside] == 1).all() and (back[inside] == 1).all()
    rast = rasterize(clip, faces, res, RasterOptions(cull_backfaces=True))
    assert torch.equal(rast[..., 3] > 0, inside)


# ------------------------------------------------------------- interpolate


def test_interpolate_is_perspective_correct():
    clip = torch.tensor(
        [[-0.8, -0.7, 0.2, 1.0], [1.6, -0.4, 1.5, 2.0], [0.1, 2.4, 2.0, 3.0]], dtype=torch.float64
    )
    faces = torch.tensor([[0, 1, 2]])
    attr = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0]], dtype=torch.float64)
    H, W = 8, 12
    rast = rasterize(clip, faces, (H, W))
    out = interpolate(attr, rast, faces)[0]
    covered = rast[0, ..., 3] > 0
    assert covered.sum() > 10
    for r, c in covered.nonzero().tolist():
        p = np.array([2 * (c + 0.5) / W - 1, 2 * (r + 0.5) / H - 1, 1.0])
        lam = np.linalg.solve(clip[:, [0, 1, 3]].numpy().T, p)
        lam /= lam.sum()
        np.testing.assert_allclose(out[r, c].numpy(), lam @ attr.numpy(), atol=1e-12)
    assert (out[~covered] == 0).all()
    # batched attributes broadcast like [V,C]
    _assert_close(interpolate(attr[None], rast, faces), out[None])


def test_gradcheck_interpolate_wrt_attr_and_clip():
    clip = torch.tensor(
        [[-0.7, -0.6, 0.3, 1.1], [0.8, -0.5, 0.4, 1.3], [0.1, 0.9, 0.5, 0.9], [0.9, 0.7, 0.2, 1.2]],
        dtype=torch.float64,
        requires_grad=True,
    )
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    attr = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def f(a, c):
        return interpolate(a, rasterize(c, faces, (5, 6)), faces)

    assert (rasterize(clip, faces, (5, 6))[..., 3] > 0).sum() > 8
    assert torch.autograd.gradcheck(f, (attr, clip), eps=1e-7, atol=1e-6, fast_mode=True)


# --------------------------------------------------------------- antialias


def _triangle_over_background(dtype=torch.float64):
    clip = torch.tensor(
        [[-0.61, -0.53, 0.2, 1.0], [0.72, -0.38, 0.4, 1.25], [0.04, 0.83, 0.3, 0.85]], dtype=dtype
    )
    return clip, torch.tensor([[0, 1, 2]])


def _aa_image(clip, faces, res, colour=None):
    rast = rasterize(clip, faces, res)
    attr = torch.ones(clip.shape[-2], 1, dtype=clip.dtype) if colour is None else colour
    img = interpolate(attr, rast, faces)
    return antialias(img, rast, clip, faces), img


def test_antialias_leaves_interior_and_non_silhouette_edges_unchanged():
    # Two triangles sharing a diagonal (a quad) with a smooth colour.
    clip = torch.tensor(
        [[-0.63, -0.58, 0.1, 1.0], [0.61, -0.55, 0.1, 1.0], [0.66, 0.6, 0.1, 1.0], [-0.57, 0.64, 0.1, 1.0]],
        dtype=torch.float64,
    )
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    colour = torch.tensor([[0.1], [0.9], [0.4], [0.7]], dtype=torch.float64)
    out, img = _aa_image(clip, faces, (16, 16), colour)
    covered = img[0, ..., 0] != 0
    # pixels with all 4 neighbours covered are untouched, including those along the diagonal
    interior = covered.clone()
    interior[1:] &= covered[:-1]
    interior[:-1] &= covered[1:]
    interior[:, 1:] &= covered[:, :-1]
    interior[:, :-1] &= covered[:, 1:]
    assert interior.sum() > 40
    _assert_close(out[0][interior], img[0][interior])
    assert not torch.equal(out, img)  # the silhouette was blended
    # a mesh covering the whole image: nothing to blend
    full = torch.tensor([[-3, -3, 0.1, 1], [3, -3, 0.1, 1], [3, 3, 0.1, 1], [-3, 3, 0.1, 1]], dtype=torch.float64)
    o2, i2 = _aa_image(full, faces, (8, 8), colour)
    _assert_close(o2, i2)


def test_antialias_coverage_approximates_area():
    clip, faces = _triangle_over_background()
    H = W = 24
    out, img = _aa_image(clip, faces, (H, W))
    s = clip[:, :2] / clip[:, 3:4]
    p = (s + 1) * 0.5 * torch.tensor([W, H], dtype=s.dtype)
    area = 0.5 * abs(float(torch.linalg.det(torch.stack([p[1] - p[0], p[2] - p[0]]))))
    assert abs(out.sum().item() - area) < 0.02 * area
    assert abs(out.sum().item() - area) < abs(img.sum().item() - area) + 0.5
    assert out.min() >= 0 and out.max() <= 1


def test_antialias_position_gradient_matches_finite_differences():
    clip, faces = _triangle_over_background()
    res = (16, 16)
    g = torch.Generator().manual_seed(1)
    weights = torch.rand(1, *res, 1, generator=g, dtype=torch.float64)
    colour = torch.tensor([[0.9], [0.5], [0.2]], dtype=torch.float64)

    def loss(c):
        return (_aa_image(c, faces, res, colour)[0] * weights).sum()

    c = clip.clone().requires_grad_(True)
    loss(c).backward()
    grad = c.grad
    eps = 1e-7
    for v in range(3):
        for k in (0, 1):
            cp, cm = clip.clone(), clip.clone()
            cp[v, k] += eps
            cm[v, k] -= eps
            fd = (loss(cp) - loss(cm)).item() / (2 * eps)
            assert abs(fd - grad[v, k].item()) < 1e-5 * max(1.0, abs(fd)), (v, k, fd, grad[v, k].item())
    assert grad[:, :2].abs().max() > 1.0


def test_antialias_silhouette_gradient_sign_and_size():
    # A constant-colour triangle over black: the image sum is ~ its pixel area, so moving
    # the rightmost vertex to the right (+x) must increase it at the rate of the area.
    clip, faces = _triangle_over_background()
    H = W = 32
    c = clip.clone().requires_grad_(True)
    out, _ = _aa_image(c, faces, (H, W))
    out.sum().backward()
    right = int(torch.argmax(clip[:, 0] / clip[:, 3]))
    s = clip[:, :2] / clip[:, 3:4]
    p = (s + 1) * 0.5 * torch.tensor([W, H], dtype=s.dtype)
    # d area / d x_pixel of vertex `right` = 0.5 |y_next - y_prev| ; dx_pixel / dclip_x = W / (2 w)
    a, b = [i for i in range(3) if i != right]
    expected = 0.5 * abs((p[a, 1] - p[b, 1]).item()) * W / (2 * clip[right, 3].item())
    got = c.grad[right, 0].item()
    assert got > 0
    assert abs(got - expected) < 0.05 * expected


def test_antialias_batch_and_topology():
    clip, faces = _triangle_over_background()
    shifted = clip.clone()
    shifted[:, 0] += 0.2 * shifted[:, 3]
    both = torch.stack([clip, shifted])
    out, _ = _aa_image(both, faces, (12, 12))
    for b, c in enumerate((clip, shifted)):
        _assert_close(out[b], _aa_image(c[None], faces, (12, 12))[0][0])


def test_edge_topology_tetrahedron():
    faces = torch.tensor([[0, 1, 2], [0, 3, 1], [1, 3, 2], [2, 3, 0]])
    opp = edge_topology(faces)
    for f in range(4):
        for k in range(3):
            a, b = int(faces[f, (k + 1) % 3]), int(faces[f, (k + 2) % 3])
            (other,) = [g for g in range(4) if g != f and a in faces[g] and b in faces[g]]
            expected = [v for v in faces[other].tolist() if v not in (a, b)][0]
            assert opp[f, k] == expected
    assert (edge_topology(faces[:1]) == -1).all()


# ----------------------------------------------------------------- backend


def test_backend_protocol():
    be = get_mesh_backend("torch")
    assert isinstance(be, TorchMeshBackend) and be.name == "torch"
    verts, faces = _subdivided_cube(1)
    cam = _camera((10, 14), dtype=torch.float32)
    clip = cam.to_clip(verts[None].float()).requires_grad_(True)
    rast = be.rasterize(clip, faces.int(), (10, 14))
    col = be.interpolate(verts.float(), rast, faces)
    out = be.antialias(col, rast, clip, faces)
    assert out.shape == (1, 10, 14, 3) and out.dtype == torch.float32
    out.sum().backward()
    assert torch.isfinite(clip.grad).all() and clip.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    verts, faces = _subdivided_cube(2)
    cam = _camera((20, 24), dtype=torch.float32)
    clip = cam.to_clip(verts[None].float())
    r_cpu = rasterize(clip, faces, (20, 24))
    r_gpu = rasterize(clip.cuda(), faces.cuda(), (20, 24)).cpu()
    _assert_close(r_gpu, r_cpu, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not nvdiffrast_available()[0], reason="nvdiffrast not available")
def test_nvdiffrast_parity():
    verts, faces = _subdivided_cube(4)
    cam = _camera((64, 48), dtype=torch.float32)
    clip = cam.to_clip(verts[None].float()).cuda()
    faces = faces.cuda()
    nv = get_mesh_backend("nvdiffrast", "cuda")
    ref = TorchMeshBackend()
    r_nv, r_t = nv.rasterize(clip, faces, (64, 48)), ref.rasterize(clip, faces, (64, 48))
    agree = (r_nv[..., 3] == r_t[..., 3]).float().mean()
    assert agree > 0.995
    a_nv = nv.interpolate(verts.float().cuda(), r_nv, faces)
    a_t = ref.interpolate(verts.float().cuda(), r_t, faces)
    same = r_nv[..., 3] == r_t[..., 3]
    _assert_close(a_nv[same], a_t[same], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------- ops


def test_normals():
    verts, faces = _subdivided_cube(2)
    sphere = torch.nn.functional.normalize(verts, dim=-1)
    n = vertex_normals(sphere[None], faces)[0]
    assert (torch.nn.functional.cosine_similarity(n, sphere, dim=-1) > 0.97).all()
    fn = face_normals(verts, faces)
    centroid = verts[faces].mean(1)
    assert ((fn * centroid).sum(-1) > 0).all()  # outward
    _assert_close(fn.norm(dim=-1), torch.ones(len(faces), dtype=fn.dtype))
    # area weighting: a vertex shared by a big and a tiny triangle follows the big one
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0.01], [0, -0.01, 0]])
    f = torch.tensor([[0, 1, 2], [0, 3, 4]])
    assert vertex_normals(v, f)[0, 2] > 0.99


def test_texture2d_conventions_and_gradients():
    tex = torch.arange(2 * 3 * 4 * 2, dtype=torch.float64).reshape(2, 3, 4, 2)
    # texel centres return the texel; v = 0 is the bottom row of the image
    i, j = 1, 0  # column 1, top row
    uv = torch.tensor([[(i + 0.5) / 4, 1 - (j + 0.5) / 3]], dtype=torch.float64).expand(2, 1, 2)
    out = texture2d(tex, uv[:, :, None])  # [2,1,1,2]
    _assert_close(out[:, 0, 0], tex[:, j, i])
    near = texture2d(tex, uv[:, :, None] + 0.01, filter="nearest")
    _assert_close(near[:, 0, 0], tex[:, j, i])
    # clamp vs wrap at the left border (u = 0 lies between the last and first columns when wrapping)
    edge = torch.tensor([[[0.0, 1 - 0.5 / 3]]], dtype=torch.float64).expand(2, 1, 2)[:, :, None]
    _assert_close(texture2d(tex, edge, boundary="clamp")[:, 0, 0], tex[:, 0, 0])
    _assert_close(texture2d(tex, edge, boundary="wrap")[:, 0, 0], 0.5 * (tex[:, 0, 0] + tex[:, 0, 3]))
    # gradients w.r.t. texture and uv (one shared texture broadcast over the batch)
    t1 = torch.rand(1, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    uvs = (torch.rand(2, 2, 3, 2, dtype=torch.float64) * 1.2 - 0.1).requires_grad_(True)
    for boundary in ("clamp", "wrap"):
        assert torch.autograd.gradcheck(lambda t, u: texture2d(t, u, boundary=boundary), (t1, uvs))
    # trilinear at the finest level equals bilinear; coarse levels are box averages
    lod0 = torch.zeros(2, 2, 3, dtype=torch.float64)
    _assert_close(texture2d(tex, uvs.detach(), "trilinear", lod=lod0), texture2d(tex, uvs.detach()))
    levels = mip_pyramid(tex)
    assert levels[-1].shape[1:3] == (1, 1)
    big = torch.full((2, 2, 3), 10.0, dtype=torch.float64)
    _assert_close(texture2d(tex, uvs.detach(), "trilinear", lod=big), levels[-1].expand(2, 2, 3, 2))
