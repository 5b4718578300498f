"""Tests of the Gaussian-splat renderers (torch reference, SH, backend selection)."""

from __future__ import annotations

import math

import pytest
import torch

from headavatar.errors import UserError
from headavatar.render.gaussians import gsplat_available, render_gaussians, select_backend, torch_ref
from headavatar.render.gaussians.sh import C0, RGB2SH, SH2RGB, eval_sh, sh_basis
from headavatar.render.gaussians.torch_ref import render_torch

DT = torch.float64


# ----------------------------------------------------------------------------- scenes


def _look_at(eye, target):
    """World-to-camera 4x4 of an OpenCV camera (x right, y down, z forward)."""
    z = torch.nn.functional.normalize(target - eye, dim=0)
    x = torch.nn.functional.normalize(torch.linalg.cross(z, torch.tensor([0.0, 1.0, 0.0], dtype=eye.dtype)), dim=0)
    y = torch.linalg.cross(z, x)
    R = torch.stack([x, y, z])
    M = torch.eye(4, dtype=eye.dtype)
    M[:3, :3] = R
    M[:3, 3] = -R @ eye
    return M


def _scene(B=2, N=12, W=16, H=16, sh_degree=None, seed=0, opacity=(0.2, 0.95), spread=0.25, scale=(0.03, 0.12), dtype=DT):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    means = (r(B, N, 3) - 0.5) * 2 * spread
    quats = torch.randn(B, N, 4, generator=g, dtype=dtype)
    scales = scale[0] + (scale[1] - scale[0]) * r(B, N, 3)
    opac = opacity[0] + (opacity[1] - opacity[0]) * r(B, N)
    if sh_degree is None:
        colors = r(B, N, 3)
    else:
        colors = 0.5 * torch.randn(B, N, (sh_degree + 1) ** 2, 3, generator=g, dtype=dtype)
    views, Ks = [], []
    for b in range(B):
        eye = torch.tensor([0.3 * b - 0.1, -0.1 + 0.05 * b, -1.2 - 0.1 * b], dtype=dtype)
        views.append(_look_at(eye, torch.zeros(3, dtype=dtype)))
        f = 0.9 * max(W, H)
        Ks.append(torch.tensor([[f, 0, W / 2 + 0.7 * b], [0, f * 1.05, H / 2 - 0.4 * b], [0, 0, 1]], dtype=dtype))
    return dict(means=means, quats=quats, scales=scales, opacities=opac, colors=colors,
                viewmats=torch.stack(views), Ks=torch.stack(Ks), width=W, height=H, sh_degree=sh_degree)


# ----------------------------------------------------------------------------- brute force


def _quat_to_R(q):
    q = q / q.norm()
    w, x, y, z = q.tolist()
    return torch.tensor([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                         [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                         [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]], dtype=q.dtype)


def _sh_color(coeffs, d, degree):
    """Direct transcription of the 3DGS SH formula (independent of sh.py)."""
    x, y, z = (d / d.norm()).tolist()
    c = 0.28209479177387814 * coeffs[0]
    if degree >= 1:
        c = c - 0.4886025119029199 * y * coeffs[1] + 0.4886025119029199 * z * coeffs[2] - 0.4886025119029199 * x * coeffs[3]
    if degree >= 2:
        c = (c + 1.0925484305920792 * x * y * coeffs[4] - 1.0925484305920792 * y * z * coeffs[5]
             + 0.31539156525252005 * (2 * z * z - x * x - y * y) * coeffs[6]
             - 1.0925484305920792 * x * z * coeffs[7] + 0.5462742152960396 * (x * x - y * y) * coeffs[8])
    if degree >= 3:
        c = (c - 0.5900435899266435 * y * (3 * x * x - y * y) * coeffs[9] + 2.890611442640554 * x * y * z * coeffs[10]
             - 0.4570457994644658 * y * (4 * z * z - x * x - y * y) * coeffs[11]
             + 0.3731763325901154 * z * (2 * z * z - 3 * x * x - 3 * y * y) * coeffs[12]
             - 0.4570457994644658 * x * (4 * z * z - x * x - y * y) * coeffs[13]
             + 1.445305721320277 * z * (x * x - y * y) * coeffs[14] - 0.5900435899266435 * x * (x * x - 3 * y * y) * coeffs[15])
    return torch.clamp_min(c + 0.5, 0)


def _brute_force(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree=None,
                 backgrounds=None, near=0.01, far=1e10, eps2d=0.3, alpha_max=0.99):
    """Per-Gaussian projection + per-pixel front-to-back loop, written for clarity."""
    B, N = means.shape[:2]
    W, H = width, height
    rgb = torch.zeros(B, H, W, 3, dtype=means.dtype)
    alpha_img = torch.zeros(B, H, W, 1, dtype=means.dtype)
    depth_img = torch.zeros(B, H, W, 1, dtype=means.dtype)
    radii = torch.zeros(B, N, dtype=torch.int32)
    py, px = torch.meshgrid(torch.arange(H, dtype=means.dtype) + 0.5, torch.arange(W, dtype=means.dtype) + 0.5, indexing="ij")
    for b in range(B):
        Rv, tv = viewmats[b, :3, :3], viewmats[b, :3, 3]
        fx, fy, cx, cy = Ks[b, 0, 0], Ks[b, 1, 1], Ks[b, 0, 2], Ks[b, 1, 2]
        cam = -Rv.T @ tv
        splats = []
        for n in range(N):
            p = Rv @ means[b, n] + tv
            if p[2] < near or p[2] > far:
                continue
            Rg = _quat_to_R(quats[b, n])
            S = torch.diag(scales[b, n])
            cov_c = Rv @ Rg @ S @ S @ Rg.T @ Rv.T
            xz = torch.clamp(p[0] / p[2], -(cx / fx + 0.15 * W / fx), (W - cx) / fx + 0.15 * W / fx)
            yz = torch.clamp(p[1] / p[2], -(cy / fy + 0.15 * H / fy), (H - cy) / fy + 0.15 * H / fy)
            J = torch.stack([torch.stack([fx / p[2], 0 * fx, -fx * xz / p[2]]), torch.stack([0 * fy, fy / p[2], -fy * yz / p[2]])])
            cov2 = J @ cov_c @ J.T + eps2d * torch.eye(2, dtype=means.dtype)
            o = opacities[b, n]
            if torch.linalg.det(cov2) <= 0 or o < 1 / 255:
                continue
            ext = min(3.33, math.sqrt(2 * math.log(o / (1 / 255))))
            rx, ry = math.ceil(ext * math.sqrt(cov2[0, 0])), math.ceil(ext * math.sqrt(cov2[1, 1]))
            m = torch.stack([fx * p[0] / p[2] + cx, fy * p[1] / p[2] + cy])
            if m[0] + rx <= 0 or m[0] - rx >= W or m[1] + ry <= 0 or m[1] - ry >= H:
                continue
            radii[b, n] = math.ceil(3 * math.sqrt(torch.linalg.eigvalsh(cov2).max()))
            c = colors[b, n] if sh_degree is None else _sh_color(colors[b, n], means[b, n] - cam, sh_degree)
            splats.append((float(p[2]), n, m, torch.linalg.inv(cov2), o, c, p[2]))
        splats.sort(key=lambda s: (s[0], s[1]))
        T = torch.ones(H, W, dtype=means.dtype)
        done = torch.zeros(H, W, dtype=torch.bool)
        for _, _, m, conic, o, c, z in splats:
            dx, dy = m[0] - px, m[1] - py
            sigma = 0.5 * (conic[0, 0] * dx * dx + conic[1, 1] * dy * dy) + conic[0, 1] * dx * dy
            a = torch.clamp_max(o * torch.exp(-sigma), alpha_max)
            use = (a >= 1 / 255) & (sigma >= 0) & ~done
            nxt = T * (1 - a)
            stop = use & (nxt <= 1e-4)
            done = done | stop
            use = use & ~stop
            wgt = torch.where(use, a * T, torch.zeros_like(T))
            rgb[b] = rgb[b] + wgt[..., None] * c
            depth_img[b, ..., 0] = depth_img[b, ..., 0] + wgt * z
            T = torch.where(use, nxt, T)
        alpha_img[b, ..., 0] = 1 - T
        if backgrounds is not None:
            rgb[b] = rgb[b] + T[..., None] * backgrounds[b]
    depth_img = depth_img / alpha_img.clamp_min(1e-10)
    return rgb, alpha_img, depth_img, radii


def _compare(sc, tol=1e-10, **kw):
    out = render_torch(**sc, **kw)
    ref = _brute_force(**sc, **kw)
    for name, a, b in zip(("rgb", "alpha", "depth"), (out.rgb, out.alpha, out.depth), ref[:3]):
        assert a.shape == b.shape, name
        assert (a - b).abs().max().item() < tol, (name, (a - b).abs().max().item())
    assert torch.equal(out.radii, ref[3])
    return out


# ----------------------------------------------------------------------------- (a) brute force


@pytest.fixture(params=["one_layer", "many_layers"])
def layers(request, monkeypatch):
    """Run a test with the default depth layers and with tiny ones (many layers,
    which exercises the carry-over of transmittance and the skipping of stopped pixels)."""
    if request.param == "many_layers":
        monkeypatch.setattr(torch_ref, "_LAYER_PAIRS_PER_PIXEL", 0.5)
    return request.param


@pytest.mark.parametrize("sh_degree", [None, 0, 3])
def test_matches_brute_force(sh_degree, layers):
    sc = _scene(B=2, N=20, sh_degree=sh_degree, seed=1)
    bg = torch.tensor([[0.1, 0.5, 0.9], [1.0, 1.0, 1.0]], dtype=DT)
    out = _compare(sc, backgrounds=bg)
    assert (out.radii > 0).sum() >= 30  # the scene really has overlapping, visible splats
    assert out.alpha.max() > 0.9


def test_early_stop_matches_brute_force(layers, monkeypatch):
    # many opaque layers (opacity <= 0.98 keeps alpha below the 0.99 clamp): pixels stop;
    # small splats far behind them lie on stopped pixels only (their spans get skipped)
    sc = _scene(B=1, N=40, seed=2, opacity=(0.85, 0.98), scale=(0.1, 0.2), spread=0.08)
    hidden = _scene(B=1, N=12, seed=13, opacity=(0.5, 0.9), scale=(0.005, 0.02), spread=0.05)
    hidden["means"][..., 2] += 0.4
    sc.update({k: torch.cat([sc[k], hidden[k]], 1) for k in ("means", "quats", "scales", "opacities", "colors")})
    out = _compare(sc)
    assert out.alpha.max() > 0.9998
    monkeypatch.setattr(torch_ref, "T_MIN", 0.0)
    monkeypatch.setattr(torch_ref, "_LOG_T_MIN", -math.inf)
    no_stop = render_torch(**sc)
    assert (no_stop.rgb - out.rgb).abs().max() > 1e-7  # the stop did change some pixels


def test_alpha_clamp_matches_brute_force():
    # opaque splats with centres on pixels: alpha is clamped (no exact ties at T_MIN with 0.95)
    sc = _scene(B=1, N=16, seed=3, opacity=(0.97, 1.0), scale=(0.08, 0.2), spread=0.1)
    _compare(sc, alpha_max=0.95)
    _compare(sc, alpha_max=0.999)
    a, b = render_torch(**sc, alpha_max=0.95), render_torch(**sc)
    assert (a.rgb - b.rgb).abs().max() > 1e-3  # the clamp was reached


def test_chunking_does_not_change_result():
    sc = _scene(B=2, N=20, seed=3)
    a = render_torch(**sc)
    b = render_torch(**sc, max_pairs=64)
    assert torch.allclose(a.rgb, b.rgb, atol=1e-12) and torch.allclose(a.depth, b.depth, atol=1e-12)


# ----------------------------------------------------------------------------- (b) gradients


def _grad_case(N=6, W=10, H=9, seed=4):
    sc = _scene(B=2, N=N, W=W, H=H, seed=seed, sh_degree=1, opacity=(0.3, 0.8), scale=(0.06, 0.15))
    bg = torch.tensor([[0.2, 0.3, 0.4], [0.5, 0.1, 0.0]], dtype=DT)
    wts = torch.randn(2, H, W, 5, generator=torch.Generator().manual_seed(0), dtype=DT)

    def f(keys, *xs):
        out = render_torch(**{**sc, **dict(zip(keys, xs))}, backgrounds=bg)
        # one scalar mixing every output so all backward paths are checked at once
        return (torch.cat([out.rgb, out.alpha, out.depth], -1) * wts).sum()

    return sc, f


def test_gradcheck(layers):
    sc, f = _grad_case()
    keys = ["means", "quats", "scales", "opacities", "colors"]
    inputs = [sc[k].clone().requires_grad_(True) for k in keys]
    # fast mode checks random directional derivatives of all inputs at once
    assert torch.autograd.gradcheck(lambda *xs: f(keys, *xs), inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_gradcheck_full_jacobian():
    sc, f = _grad_case(N=4, W=8, H=7, seed=12)
    keys = ["means", "opacities"]
    inputs = [sc[k].clone().requires_grad_(True) for k in keys]
    assert torch.autograd.gradcheck(lambda *xs: f(keys, *xs), inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradients_float32_match_float64():
    sc = _scene(B=1, N=30, W=24, H=20, seed=5)
    grads = {}
    for dt in (torch.float32, torch.float64):
        s = {k: (v.to(dt).requires_grad_(k in ("means", "scales", "opacities")) if torch.is_tensor(v) else v) for k, v in sc.items()}
        out = render_torch(**s)
        (out.rgb.square().sum() + out.alpha.sum()).backward()
        grads[dt] = [s[k].grad.double() for k in ("means", "scales", "opacities")]
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64]):
        assert ((g32 - g64).norm() / g64.norm()).item() < 1e-4


# ----------------------------------------------------------------------------- (c) edge cases


def test_culled_gaussians_contribute_nothing():
    sc = _scene(B=1, N=8, seed=6)
    base = render_torch(**sc)
    extra = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in sc.items()}
    cam = -(sc["viewmats"][0, :3, :3].T @ sc["viewmats"][0, :3, 3])
    fwd = sc["viewmats"][0, 2, :3]
    right = sc["viewmats"][0, 0, :3]
    behind = cam - 0.5 * fwd  # behind the camera
    too_near = cam + 0.005 * fwd  # in front but closer than near=0.01
    outside = cam + 1.0 * fwd + 3.0 * right  # far outside the image on the right
    pts = torch.stack([behind, too_near, outside])[None]
    extra["means"] = torch.cat([sc["means"], pts], 1)
    extra["quats"] = torch.cat([sc["quats"], torch.tensor([[[1.0, 0, 0, 0]] * 3], dtype=DT)], 1)
    extra["scales"] = torch.cat([sc["scales"], torch.full((1, 3, 3), 0.05, dtype=DT)], 1)
    extra["opacities"] = torch.cat([sc["opacities"], torch.ones(1, 3, dtype=DT) * 0.9], 1)
    extra["colors"] = torch.cat([sc["colors"], torch.ones(1, 3, 3, dtype=DT)], 1)
    out = render_torch(**extra)
    assert torch.equal(out.radii[0, -3:], torch.zeros(3, dtype=torch.int32))
    assert torch.equal(out.radii[:, :8], base.radii)
    assert torch.allclose(out.rgb, base.rgb, atol=1e-14) and torch.allclose(out.alpha, base.alpha, atol=1e-14)
    # a Gaussian below the opacity threshold is culled too
    sc2 = {**sc, "opacities": sc["opacities"].clone()}
    sc2["opacities"][0, 0] = 0.5 / 255
    assert render_torch(**sc2).radii[0, 0] == 0


def test_empty_scene_returns_background():
    sc = _scene(B=2, N=0, W=7, H=5)
    bg = torch.tensor([[0.1, 0.2, 0.3], [0.0, 1.0, 0.0]], dtype=DT)
    out = render_torch(**sc, backgrounds=bg)
    assert out.rgb.shape == (2, 5, 7, 3) and out.radii.shape == (2, 0)
    assert torch.allclose(out.rgb, bg[:, None, None, :].expand(2, 5, 7, 3))
    assert out.alpha.abs().max() == 0 and out.depth.abs().max() == 0
    # all Gaussians behind the camera: background, and backward still works
    sc = _scene(B=1, N=5)
    sc["means"] = sc["means"] * 0 + torch.tensor([0.0, 0.0, -5.0], dtype=DT)
    sc["means"].requires_grad_(True)
    out = render_torch(**sc, backgrounds=bg[:1])
    assert torch.allclose(out.rgb, bg[:1, None, None, :].expand_as(out.rgb))
    out.rgb.sum().backward()
    assert sc["means"].grad.abs().max() == 0


def test_non_square_and_off_centre_principal_point():
    sc = _scene(B=2, N=15, W=23, H=11, seed=7)
    sc["Ks"][0, 0, 2] = 4.0  # principal point far from the centre
    sc["Ks"][1, 1, 2] = 9.5
    _compare(sc)


def test_single_gaussian_lands_where_projected():
    # one small splat straight ahead of an off-centre principal point: brightest pixel = (cx, cy)
    W, H = 21, 13
    M = torch.eye(4, dtype=DT)
    K = torch.tensor([[30.0, 0, 6.5], [0, 30.0, 9.5], [0, 0, 1]], dtype=DT)
    out = render_torch(torch.tensor([[[0.0, 0.0, 2.0]]], dtype=DT), torch.tensor([[[1.0, 0, 0, 0]]], dtype=DT),
                       torch.full((1, 1, 3), 0.02, dtype=DT), torch.tensor([[0.9]], dtype=DT),
                       torch.ones(1, 1, 3, dtype=DT), M[None], K[None], W, H)
    a = out.alpha[0, ..., 0]
    j, i = divmod(int(a.argmax()), W)
    assert (i, j) == (6, 9)
    assert abs(out.depth[0, j, i, 0].item() - 2.0) < 1e-12


def test_float32_no_grad_and_default_device():
    sc = _scene(B=1, N=10, seed=8, dtype=torch.float32)
    with torch.no_grad():
        out = render_torch(**sc)
    assert out.rgb.dtype == torch.float32 and not out.rgb.requires_grad
    ref = _brute_force(**{k: (v.double() if torch.is_tensor(v) else v) for k, v in sc.items()})
    assert (out.rgb.double() - ref[0]).abs().max() < 1e-5


def test_bad_shapes_raise():
    sc = _scene(B=1, N=3)
    with pytest.raises(ValueError, match="quats"):
        render_torch(**{**sc, "quats": sc["quats"][..., :3]})
    with pytest.raises(ValueError, match="sh_degree"):
        render_torch(**{**sc, "sh_degree": 1})
    with pytest.raises(TypeError, match="unexpected"):
        render_torch(**sc, nearr=0.1)
    with pytest.raises(ValueError, match="alpha_max"):
        render_torch(**sc, alpha_max=1.0)


# ----------------------------------------------------------------------------- (d) SH


def test_sh_degree0_and_rgb_helpers():
    coeffs = torch.randn(5, 16, 3, dtype=DT)
    dirs = torch.randn(5, 3, dtype=DT)
    assert torch.allclose(eval_sh(0, coeffs, dirs), C0 * coeffs[:, 0])
    rgb = torch.rand(7, 3, dtype=DT)
    assert torch.allclose(SH2RGB(RGB2SH(rgb)), rgb)
    assert C0 == 0.28209479177387814


def test_sh_matches_3dgs_formula_and_ignores_dir_norm():
    g = torch.Generator().manual_seed(9)
    coeffs = torch.randn(16, 3, generator=g, dtype=DT)
    for _ in range(5):
        d = torch.randn(3, generator=g, dtype=DT)
        for deg in range(4):
            ref = _sh_color(coeffs, d, deg)
            got = torch.clamp_min(eval_sh(deg, coeffs, 3.7 * d) + 0.5, 0)
            assert torch.allclose(got, ref, atol=1e-14)


def test_sh_basis_is_orthonormal():
    # Gauss-Legendre in cos(theta) x uniform in phi integrates these polynomials exactly
    n = 12
    xg, wg = torch.from_numpy(__import__("numpy").polynomial.legendre.leggauss(n)[0]), \
        torch.from_numpy(__import__("numpy").polynomial.legendre.leggauss(n)[1])
    phi = torch.arange(2 * n, dtype=DT) * (2 * math.pi / (2 * n))
    ct, ph = torch.meshgrid(xg.to(DT), phi, indexing="ij")
    st = torch.sqrt(1 - ct * ct)
    dirs = torch.stack([st * torch.cos(ph), st * torch.sin(ph), ct], -1).reshape(-1, 3)
    w = (wg.to(DT)[:, None] * torch.full((1, 2 * n), 2 * math.pi / (2 * n), dtype=DT)).reshape(-1)
    Y = sh_basis(3, dirs)  # [P,16]
    gram = (Y * w[:, None]).T @ Y
    assert torch.allclose(gram, torch.eye(16, dtype=DT), atol=1e-12)


# ----------------------------------------------------------------------------- (e) backends


def test_backend_selection():
    assert select_backend("auto", "cpu") == "torch"
    assert select_backend("torch", "cpu") == "torch"
    with pytest.raises(UserError, match="CUDA"):
        select_backend("gsplat", "cpu")
    with pytest.raises(UserError, match="unknown"):
        select_backend("vulkan", "cpu")


def test_render_gaussians_dispatches_to_torch_on_cpu():
    sc = _scene(B=1, N=5, seed=10)
    a = render_gaussians(**sc, backend="auto")
    b = render_torch(**sc)
    assert torch.equal(a.rgb, b.rgb)


def test_gsplat_backend_refuses_cpu_tensors():
    from headavatar.render.gaussians.gsplat_backend import render_gsplat

    with pytest.raises(UserError, match="CUDA"):
        render_gsplat(**_scene(B=1, N=3, dtype=torch.float32))


def test_gsplat_radii_conversion_matches_torch_radii():
    # gsplat returns per-axis radii and conics; the backend turns them into our 3-sigma radii
    from headavatar.render.gaussians.gsplat_backend import _contract_radii

    sc = _scene(B=2, N=20, seed=14)
    p = torch_ref._project(sc["means"], sc["quats"], sc["scales"], sc["opacities"], sc["viewmats"], sc["Ks"],
                           sc["width"], sc["height"], 0.01, 1e10, 0.3)
    radii = p["radii"].view(2, 20)
    conics = torch.full((2 * 20, 3), float("nan"), dtype=DT)  # culled rows hold garbage in gsplat
    conics[p["keep"]] = torch.stack([p["A"], p["B"], p["C"]], -1)[p["keep"]].detach()
    xy = (radii > 0).to(torch.int32)[..., None].expand(2, 20, 2)
    assert torch.equal(_contract_radii(xy, conics.view(2, 20, 3)), radii)


@pytest.mark.skipif(not gsplat_available()[0], reason=f"gsplat backend unavailable: {gsplat_available()[1]}")
def test_gsplat_matches_torch():
    sc = _scene(B=2, N=40, W=64, H=48, sh_degree=3, seed=11, dtype=torch.float32)
    sc = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in sc.items()}
    a = render_gaussians(**sc, backend="gsplat")
    b = render_gaussians(**sc, backend="torch")
    assert (a.rgb - b.rgb).abs().max() < 1e-3
    assert (a.alpha - b.alpha).abs().max() < 1e-3
    assert torch.equal(a.radii > 0, b.radii > 0)
