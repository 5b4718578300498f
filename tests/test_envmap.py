"""Environment lighting: HDR I/O, cube maps, GGX prefiltering, irradiance and the split-sum table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from headavatar.errors import UserError
from headavatar.lighting.brdf import compute_split_sum_lut, ggx_ndf, lut_lookup, smith_g2, split_sum_lut
from headavatar.lighting.cubemap import (
    CubeMap,
    cube_directions,
    direction_to_face,
    irradiance,
    latlong_directions,
    latlong_to_cubemap,
    prefilter_ggx,
    sample_mips,
    texel_solid_angles,
)
from headavatar.lighting.envmap import EnvironmentLight, EnvMapLighting, load_envmap, procedural_sky
from headavatar.lighting.hdr_io import exr_available, float_to_rgbe, read_hdr, read_hdr_image, rgbe_to_float, write_hdr, write_hdr_image


def _unit(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1).float()


# ------------------------------------------------------------------ HDR files
def test_hdr_roundtrip_rle_and_flat(tmp_path):
    rng = np.random.default_rng(0)
    img = (rng.random((12, 40, 3)) ** 3 * 50).astype(np.float32)
    img[:, :10] = 2.5  # long runs
    write_hdr(tmp_path / "a.hdr", img)
    back = read_hdr(tmp_path / "a.hdr")
    assert back.shape == img.shape and back.dtype == np.float32
    # RGBE keeps 8 bits of mantissa relative to the brightest channel of each pixel
    assert np.all(np.abs(back - img) <= img.max(-1, keepdims=True) / 128 + 1e-6)
    small = (rng.random((3, 5, 3)) * 4).astype(np.float32)  # width < 8: written flat
    write_hdr(tmp_path / "s.hdr", small)
    assert np.all(np.abs(read_hdr(tmp_path / "s.hdr") - small) <= small.max(-1, keepdims=True) / 128 + 1e-6)


def test_hdr_reads_hand_written_flat_file_bottom_up(tmp_path):
    px = float_to_rgbe(np.array([[[1.0, 0.5, 0.25], [2.0, 2.0, 2.0]], [[0.0, 0.0, 0.0], [8.0, 1.0, 0.0]]], np.float32))
    data = b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n+Y 2 +X 2\n" + px.tobytes()
    (tmp_path / "f.hdr").write_bytes(data)
    back = read_hdr(tmp_path / "f.hdr")
    # "+Y" stores the bottom row first
    assert np.allclose(back[1], rgbe_to_float(px[0]), rtol=1e-6) and np.allclose(back[0], rgbe_to_float(px[1]), rtol=1e-6)


@pytest.mark.parametrize("content,ext,msg", [
    (b"\x89PNG\r\n\x1a\n not really", ".hdr", "not a Radiance HDR"),
    (b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 4 +X 16\n\x02\x02\x00\x10\x85", ".hdr", "truncated|corrupt"),
    (b"whatever", ".png", "must be HDR images"),
    (b"not exr", ".exr", "exr"),
])
def test_bad_environment_maps_are_user_errors(tmp_path, content, ext, msg):
    p = tmp_path / f"bad{ext}"
    p.write_bytes(content)
    with pytest.raises(UserError, match=f"(?i){msg}"):
        read_hdr_image(p)


def test_missing_black_and_non_latlong_maps(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_hdr_image(tmp_path / "nope.hdr")
    write_hdr(tmp_path / "black.hdr", np.zeros((8, 16, 3), np.float32))
    with pytest.raises(UserError, match="black"):
        read_hdr_image(tmp_path / "black.hdr")
    write_hdr(tmp_path / "square.hdr", np.ones((16, 16, 3), np.float32))
    with pytest.raises(UserError, match="lat-long"):
        load_envmap(tmp_path / "square.hdr")


@pytest.mark.skipif(not exr_available(), reason="optional OpenEXR package not installed")
def test_exr_roundtrip(tmp_path):
    img = (np.random.default_rng(1).random((8, 16, 3)) * 7).astype(np.float32)
    write_hdr_image(tmp_path / "a.exr", img)
    assert np.array_equal(read_hdr_image(tmp_path / "a.exr"), img)


# ------------------------------------------------------------------ cube maps
def test_cube_faces_and_directions_are_consistent():
    d = cube_directions(8)
    face, a, b = direction_to_face(d)
    assert torch.equal(face, torch.arange(6)[:, None, None].expand(6, 8, 8))
    c = 2 * (torch.arange(8) + 0.5) / 8 - 1
    assert torch.allclose(a, c[None, None, :].expand_as(a), atol=1e-6)
    assert torch.allclose(b, c[None, :, None].expand_as(b), atol=1e-6)
    assert abs(float(texel_solid_angles(16).sum()) * 6 - 4 * math.pi) < 1e-5


def test_latlong_to_cube_sampling_is_accurate_and_seamless():
    fn = lambda d: torch.stack([1 + 0.5 * d[..., 0], 1 + 0.3 * d[..., 1] + 0.2 * d[..., 2] ** 2, 2 + d[..., 2]], -1)  # noqa: E731
    cube = latlong_to_cubemap(fn(latlong_directions(64, 128)), 16)
    q = _unit(2000)
    assert (cube.sample(q) - fn(q)).abs().max() < 0.02
    # across a face edge the lookup is (nearly) continuous: the +x/+z edge approached from both sides
    # differs only by the second-order error of each face's linear interpolation into its border
    eps = 1e-4
    left = cube.sample(torch.nn.functional.normalize(torch.tensor([[1.0, 0.1, 1.0 - eps]]), dim=-1))
    right = cube.sample(torch.nn.functional.normalize(torch.tensor([[1.0 - eps, 0.1, 1.0]]), dim=-1))
    assert (left - right).abs().max() < 5e-3


def test_constant_white_map_prefilters_to_one():
    white = CubeMap.from_function(lambda d: torch.ones(d.shape[0], 3), 16)
    chain = [white]
    while chain[-1].size > 1:
        chain.append(chain[-1].downsample())
    for r in (0.08, 0.3, 1.0):
        assert torch.allclose(prefilter_ggx(chain, 8, r, samples=16).data, torch.ones(1), atol=1e-5)
    assert torch.allclose(irradiance(chain[1], 4).data, torch.ones(1), atol=1e-5)
    light = EnvironmentLight.constant((1.0, 1.0, 1.0), size=8)
    n = _unit(64)
    assert torch.allclose(light.diffuse(n), torch.ones(64, 3), atol=1e-5)
    assert torch.allclose(light.specular(n, torch.rand(64)), torch.ones(64, 3), atol=1e-5)


def test_irradiance_of_a_linear_map_is_analytic():
    # L(w) = 1 + a.w  ->  (1/pi) integral of L(w) max(0, n.w) dw = 1 + (2/3) a.n
    a = torch.tensor([0.3, -0.5, 0.4])
    lin = CubeMap.from_function(lambda d: (1 + d @ a)[:, None].expand(-1, 3), 16)
    E = irradiance(lin, 8)
    q = _unit(500, seed=3)
    assert (E.sample(q)[:, 0] - (1 + 2 / 3 * (q @ a))).abs().max() < 0.01


def test_ggx_prefilter_of_a_linear_map_and_mip_selection():
    # a GGX lobe about n is symmetric, so a linear map keeps its value at n up to the lobe's mean cosine
    a = torch.tensor([0.0, 0.0, 0.8])
    lin = CubeMap.from_function(lambda d: (1 + d @ a)[:, None].expand(-1, 3), 16)
    chain = [lin]
    while chain[-1].size > 1:
        chain.append(chain[-1].downsample())
    sharp = prefilter_ggx(chain, 16, 0.08, samples=16)
    q = _unit(200, seed=5)
    assert (sharp.sample(q)[:, 0] - (1 + q @ a)).abs().max() < 0.03
    rough = prefilter_ggx(chain, 8, 1.0, samples=64)
    v = rough.sample(q)[:, 0] - 1
    assert torch.all(v.abs() <= (q @ a).abs() + 0.02)  # blurred towards the mean
    light = EnvironmentLight.constant(size=16)
    L = len(light.specular_mips)
    lv = light.mip_level(torch.tensor([0.0, 0.08, 0.5, 0.75, 1.0]))
    assert torch.allclose(lv, torch.tensor([0.0, 0.0, L - 2, L - 1.5, L - 1]))
    assert torch.allclose(sample_mips(chain, q, torch.full((200,), 0.0)), lin.sample(q))


def test_rotation_and_procedural_sky():
    sky = procedural_sky(32, sun_elevation=30.0, sun_azimuth=90.0)
    assert sky.shape == (32, 64, 3) and np.isfinite(sky).all() and sky.min() >= 0
    env = EnvironmentLight.from_latlong(torch.from_numpy(sky), size=16, min_size=4, samples=16)
    sun = torch.tensor([[math.cos(math.radians(30)), math.sin(math.radians(30)), 0.0]])
    away = torch.tensor([[-math.cos(math.radians(30)), math.sin(math.radians(30)), 0.0]])
    assert float(env.background(sun).sum()) > 20 * float(env.background(away).sum())
    assert float(env.diffuse(sun).sum()) > float(env.diffuse(away).sum())
    turned = env.rotated(180.0)
    assert torch.allclose(turned.background(away), env.background(sun), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ split-sum table
def _direct_split_sum(nv: float, r: float, n: int = 300) -> tuple[float, float]:
    """Hemisphere quadrature of A, B: integral of f_spec/F * (1 - Fc | Fc) * n.l dl (no importance sampling)."""
    th = (torch.arange(n, dtype=torch.float64) + 0.5) / n * math.pi / 2
    ph = (torch.arange(2 * n, dtype=torch.float64) + 0.5) / (2 * n) * 2 * math.pi
    T, P = torch.meshgrid(th, ph, indexing="ij")
    L = torch.stack([T.sin() * P.cos(), T.sin() * P.sin(), T.cos()], -1)
    V = torch.tensor([math.sqrt(1 - nv * nv), 0.0, nv], dtype=torch.float64)
    Hh = torch.nn.functional.normalize(L + V, dim=-1)
    nl, nh, vh = L[..., 2], Hh[..., 2], (V * Hh).sum(-1)
    al = torch.tensor(r * r, dtype=torch.float64)
    f = ggx_ndf(nh, al) * smith_g2(torch.full_like(nl, nv), nl, al) / (4 * nv * nl)
    dw = T.sin() * (math.pi / 2 / n) * (2 * math.pi / (2 * n))
    fc = (1 - vh) ** 5
    return float((f * (1 - fc) * nl * dw).sum()), float((f * fc * nl * dw).sum())


def test_split_sum_table_matches_direct_integration():
    lut = compute_split_sum_lut(size=8, samples=1024)
    assert lut.shape == (8, 8, 2)
    for i, j in ((3, 3), (5, 1), (2, 6), (7, 7)):  # (roughness row, n.v column) at texel centres
        r, nv = (i + 0.5) / 8, (j + 0.5) / 8
        a_ref, b_ref = _direct_split_sum(nv, r)
        a, b = lut_lookup(lut, torch.tensor([nv]), torch.tensor([r]))[0].tolist()
        assert abs(a - a_ref) < 0.01 and abs(b - b_ref) < 0.004, (nv, r, a, a_ref, b, b_ref)
    assert float(lut.min()) >= 0 and float(lut.sum(-1).max()) <= 1.0 + 1e-3  # energy: A + B <= 1


def test_split_sum_table_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADAVATAR_CACHE_DIR", str(tmp_path))
    a = split_sum_lut(size=4, samples=16)
    files = list(tmp_path.glob("ggx_split_sum_*.npy"))
    assert len(files) == 1
    assert torch.equal(split_sum_lut(size=4, samples=16), a)


def test_envmap_lighting_for_the_synthetic_renderer():
    light = EnvironmentLight.constant((0.5, 0.5, 0.5), size=8)
    lt = EnvMapLighting(light, frame="world", f0=0.04, lut=compute_split_sum_lut(8, 64))
    n = torch.tensor([[0.0, 0.0, 1.0]])
    assert torch.allclose(lt.diffuse(n), torch.full((1, 3), 0.5), atol=1e-5)
    s = lt.specular(n, n, torch.tensor([[0.5]]))
    assert s.shape == (1, 3) and 0 < float(s[0, 0]) < 0.5
    with pytest.raises(UserError):
        EnvMapLighting(light, frame="camera")
