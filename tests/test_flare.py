"""FLARE: encodings, light, deformation, remeshing, a short training run, relighting and failure handling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from headavatar.errors import TrainingDiverged, UserError
from headavatar.headmodels.skinning import global_transforms
from headavatar.methods.flare.config import FlareConfig
from headavatar.methods.flare.light import LightMLP, integrated_directional_encoding, spherical_harmonics_complex
from headavatar.methods.flare.losses import AdaptiveRobustLoss, MeshRegularizer, hinge_prior
from headavatar.methods.flare.materials import HashGrid, MaterialMLP, positional_encoding
from headavatar.methods.flare.model import HeadPrior, deform
from headavatar.methods.flare.remesh import mean_edge_length, remesh, split_long_edges
from headavatar.methods.flare.train import Schedule

# Tiny networks and images: the tests check behaviour, not quality.
TINY = {
    "deformer_width": 32, "material_width": 32, "material_layers": 1, "hash_levels": 4, "hash_log2_size": 10, "hash_mlp_width": 16,
    "hash_mlp_layers": 1, "light_width": 16, "light_layers": 1, "w_perceptual": 0.0, "lut_size": 16, "lut_samples": 64,
    "remesh_backend": "builtin", "batch_size": 2, "log_every": 2, "preview_every": 4, "checkpoint_every": 4, "device": "cpu",
}


# ------------------------------------------------------------------ encodings
def test_positional_encoding_and_material_shapes():
    x = torch.rand(7, 3)
    assert positional_encoding(x, 4).shape == (7, 27)  # the reference's 27 inputs
    cfg = FlareConfig(**{k: v for k, v in TINY.items() if k in FlareConfig.__dataclass_fields__})
    for enc in ("pe", "hash"):
        with torch.no_grad():
            kd, kr, ko = MaterialMLP(enc, cfg)(x)
        assert kd.shape == (7, 3) and kr.shape == (7, 1) and ko.shape == (7, 1)
        assert float(torch.cat([kd, kr, ko], -1).min()) > 0 and float(torch.cat([kd, kr, ko], -1).max()) < 1


def test_hash_grid_shapes_levels_and_gradients():
    g = HashGrid(levels=16, features=2, log2_size=14)
    assert g.output_dim == 32 and g.resolutions[0] == 16 and abs(g.resolutions[-1] - 4096) <= 2  # 16 * 1.4473^15
    assert g.dense.tolist()[:3] == [True, True, False] and not bool(g.dense[-1])  # dense while (res+1)^3 fits
    small = HashGrid(levels=3, features=2, log2_size=8, base_resolution=2, scale=2.0).double()
    with torch.no_grad():
        small.table.normal_()
    x = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
    assert small(x).shape == (5, 6)
    # away from cell boundaries the encoding is smooth in x ...
    x = (torch.rand(4, 3, dtype=torch.float64) * 0.2 + 0.4).requires_grad_()
    assert torch.autograd.gradcheck(small, (x,), atol=1e-6)
    # ... and linear in the table, so the table gradient is exact
    w = torch.randn(4, 6, dtype=torch.float64)
    (small(x) * w).sum().backward()
    rows = torch.nonzero(small.table.grad.abs().sum(1)).squeeze(1)[:5]
    for r in rows.tolist():
        with torch.no_grad():
            before = (small(x) * w).sum()
            small.table[r, 0] += 1.0
            after = (small(x) * w).sum()
            small.table[r, 0] -= 1.0
        assert float(after - before) == pytest.approx(float(small.table.grad[r, 0]), abs=1e-9)


def test_hash_grid_dense_level_is_trilinear_interpolation():
    g = HashGrid(levels=1, features=1, log2_size=10, base_resolution=4, scale=1.0).double()
    r = 4
    values = torch.randn(r + 1, r + 1, r + 1, dtype=torch.float64)
    with torch.no_grad():
        g.table.copy_(values.reshape(-1, 1))
    x = torch.rand(50, 3, dtype=torch.float64)
    grid = values[None, None].permute(0, 1, 4, 3, 2)  # grid_sample wants [N,C,D,H,W] with x the last axis
    ref = torch.nn.functional.grid_sample(grid, (x * 2 - 1).view(1, 50, 1, 1, 3), align_corners=True)[0, 0, :, 0, 0]
    assert torch.allclose(g(x)[:, 0], ref, atol=1e-10)


# ------------------------------------------------------------------ light
def test_spherical_harmonics_match_scipy_and_ide_attenuates():
    from scipy.special import sph_harm_y

    d = torch.nn.functional.normalize(torch.randn(64, 3, dtype=torch.float64), dim=-1)
    re, im, ls = spherical_harmonics_complex(d)
    theta = torch.acos(d[:, 2]).numpy()
    phi = torch.atan2(d[:, 1], d[:, 0]).numpy()
    k = 0
    for l in (1, 2, 4, 8):
        for m in range(l + 1):
            ref = sph_harm_y(l, m, theta, phi)
            assert np.abs(ref - (re[:, k] + 1j * im[:, k]).numpy()).max() < 1e-4
            k += 1
    assert k == 19
    sharp = integrated_directional_encoding(d.float(), torch.full((64, 1), 0.05))
    blurry = integrated_directional_encoding(d.float(), torch.full((64, 1), 0.9))
    assert sharp.shape == (64, 38)
    assert float(blurry.abs().sum()) < float(sharp.abs().sum())  # Ref-NeRF: rougher -> smoother
    # as coded in the reference (divide by r) it is the other way round
    coded = [float(integrated_directional_encoding(d.float(), torch.full((64, 1), r), attenuation="flare").abs().sum()) for r in (0.05, 0.9)]
    assert coded[1] > coded[0]


def test_light_output_is_non_negative_with_softplus():
    torch.manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(256, 3), dim=-1)
    fixed = LightMLP(16, 1, "softplus", init_bias=-3.0)
    original = LightMLP(16, 1, "none", init_bias=-3.0)
    with torch.no_grad():
        assert float(fixed(d, torch.rand(256, 1)).min()) >= 0
        assert float(original(d, torch.rand(256, 1)).min()) < 0  # the reference's failure mode (flare#2, #4)
        D, S = fixed.both(d, d, torch.rand(256, 1))
    assert D.shape == S.shape == (256, 3)


# ------------------------------------------------------------------ deformation
@pytest.fixture(scope="module")
def small_head():
    from headavatar.headmodels import load_head_model

    return load_head_model({"name": "procedural", "resolution": 0.5})


def test_deformation_with_head_model_targets_reproduces_the_head_model(small_head):
    head = small_head
    cfg = FlareConfig()
    g = torch.Generator().manual_seed(0)
    shape = torch.randn(head.num_shape, generator=g) * 0.5
    expr_can = torch.rand(head.num_expression, generator=g) * 0.3
    prior = HeadPrior(head, shape, expr_can, cfg)
    assert head.jaw_open_sign() in (1.0, -1.0)
    B = 3
    params = {
        "expression": torch.rand(B, head.num_expression, generator=g) * 0.6,
        "joint_rotations": torch.randn(B, head.num_joints, 3, generator=g) * 0.2,
        "translation": torch.randn(B, 3, generator=g) * 0.01,
    }
    frame = prior.frame_inputs(params, cfg.world_scale)
    assert frame["G"].shape == (B, head.num_joints + 1, 3, 4)  # ghost bone first
    got = deform(prior.verts, prior.expr_basis, prior.pose_basis, prior.skin_weights, prior, frame)
    want = head(shape=shape[None].expand(B, -1), **params) * cfg.world_scale
    assert (got - want).abs().max() < 1e-4


def test_deformation_with_a_flame_like_model(tmp_path):
    """Pose correctives, eyelid extras and FLAME's joints: the same identity with the model's own bases."""
    from fixtures_flame import write_flame_dir
    from headavatar.headmodels.flame import build_flame_head

    write_flame_dir(tmp_path / "flame")
    head = build_flame_head(tmp_path / "flame")
    assert head.pose_basis is not None and head.extras_sizes()
    cfg = FlareConfig()
    g = torch.Generator().manual_seed(1)
    shape = torch.randn(head.num_shape, generator=g) * 0.3
    prior = HeadPrior(head, shape, torch.zeros(head.num_expression), cfg)
    assert prior.num_blend == head.num_expression + sum(head.extras_sizes().values())
    assert prior.num_pose == 9 * (head.num_joints - 1) and prior.skin_weights.shape[1] == head.num_joints + 1
    B = 2
    params = {"expression": torch.randn(B, head.num_expression, generator=g) * 0.5,
              "joint_rotations": torch.randn(B, head.num_joints, 3, generator=g) * 0.15, "translation": torch.zeros(B, 3),
              "extras": {k: torch.zeros(B, n) for k, n in head.extras_sizes().items()}}  # FLAME's extras act after skinning
    frame = prior.frame_inputs(params, cfg.world_scale)
    got = deform(prior.verts, prior.expr_basis, prior.pose_basis, prior.skin_weights, prior, frame)
    want = head(shape=shape[None].expand(B, -1), **params) * cfg.world_scale
    assert (got - want).abs().max() < 1e-4


def test_root_only_head_model_trains_without_nan(small_head):
    """ICT-FaceKit has one joint (no jaw): no pose correctives, and the head-model prior must stay finite."""
    import dataclasses

    from headavatar.methods.flare.losses import head_prior_loss
    from headavatar.methods.flare.model import FlareModel, nearest_with_distance

    V = small_head.num_vertices
    reg = small_head.joint_regressor[:1]
    head = dataclasses.replace(small_head, joint_names=["root"], parents=[-1], joint_regressor=reg / reg.sum(), skin_weights=torch.ones(V, 1),
                               pose_basis=None, condition_joints=[])
    cfg = FlareConfig()
    model = FlareModel(head, cfg, torch.zeros(head.num_shape), torch.zeros(head.num_expression))
    x_c, E, P, W = model.deformation()
    assert P.shape[1] == 0 and W.shape[1] == 2  # ghost bone + root
    idx, d2 = nearest_with_distance(x_c, model.prior.verts)
    loss = head_prior_loss(E, P, W, idx, d2 < cfg.flame_max_dist2, model.prior)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.deformer.parameters() if p.grad is not None)
    params = {"expression": torch.zeros(2, head.num_expression), "joint_rotations": torch.zeros(2, 1, 3), "translation": torch.zeros(2, 3)}
    verts, _ = model.posed(params)
    assert verts.shape == (2, model.num_vertices, 3) and torch.isfinite(verts).all()


def test_global_transforms_rest_pose_is_identity(small_head):
    J = small_head.num_joints
    G = global_transforms(small_head.parents, torch.eye(3).expand(1, J, 3, 3), torch.randn(1, J, 3))
    assert torch.allclose(G, torch.eye(4).expand(1, J, 4, 4), atol=1e-6)


# ------------------------------------------------------------------ geometry
def _icosphere():
    t = (1 + 5**0.5) / 2
    V = np.array([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t], [0, -1, -t], [0, 1, -t],
                  [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], float)
    F = np.array([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4], [11, 10, 2], [10, 7, 6], [7, 1, 8],
                  [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]])
    return V / np.linalg.norm(V, axis=1, keepdims=True), F


def _signed_volume(V, F):
    return float(np.einsum("ij,ij->i", V[F[:, 0]], np.cross(V[F[:, 1]], V[F[:, 2]])).sum() / 6)


def test_builtin_remesh_refines_and_keeps_orientation():
    V, F = _icosphere()
    h = mean_edge_length(V, F) / 3
    U, G = split_long_edges(V, F, h)
    assert len(U) > len(V) and len(G) > len(F)
    e = np.concatenate([G[:, [0, 1]], G[:, [1, 2]], G[:, [2, 0]]])
    assert np.linalg.norm(U[e[:, 0]] - U[e[:, 1]], axis=1).max() <= 1.75 * h + 1e-9
    assert math.isclose(_signed_volume(U, G), _signed_volume(V, F), rel_tol=1e-9)  # splits never fold
    U2, G2, how = remesh(V, F, h, backend="builtin")
    assert how == "builtin" and len(G2) == len(G)
    with pytest.raises(UserError):
        remesh(V, F, h, backend="magic")


def test_gpytoolbox_remesh_when_installed():
    pytest.importorskip("gpytoolbox")
    V, F = _icosphere()
    U, G = split_long_edges(V, F, 0.2)
    out, faces, how = remesh(U, G, 0.2, backend="gpytoolbox")
    assert how == "gpytoolbox" and len(faces) > 0 and _signed_volume(out, faces) > 0


def test_mesh_regularizers():
    V, F = _icosphere()
    reg = MeshRegularizer(torch.as_tensor(F), len(V))
    v = torch.as_tensor(V, dtype=torch.float32)
    assert reg.pairs.shape == (30, 2)  # every edge of a closed icosahedron joins two faces
    assert float(reg.laplacian(v)) > 0 and float(reg.normal_consistency(v, torch.as_tensor(F))) > 0
    flat = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    quad = torch.tensor([[0, 1, 2], [1, 3, 2]])
    assert float(MeshRegularizer(quad, 4).normal_consistency(flat, quad)) < 1e-12


def test_robust_loss_partition_and_priors():
    r = AdaptiveRobustLoss(2)
    z = r.log_partition(torch.tensor([1.0, 1.999])).exp()
    # alpha=1: 2e K1(1) (Charbonnier); alpha->2: sqrt(2 pi) (Gaussian)
    assert abs(float(z[0]) - 2 * math.e * 0.6019072301972346) < 1e-3 and abs(float(z[1]) - math.sqrt(2 * math.pi)) < 0.01
    assert float(hinge_prior(torch.tensor([0.5, 0.6, 0.69]), 0.5, 0.1)) == 0.0
    assert float(hinge_prior(torch.tensor([0.9]), 0.5, 0.1)) == pytest.approx(2.0)


def test_masked_losses_equal_the_indexed_ones():
    """The sync-free masked means give what boolean indexing gives (and 0 when nothing is selected)."""
    from types import SimpleNamespace

    from headavatar.methods.flare.losses import head_prior_loss
    from headavatar.methods.flare.train import _vertices_of

    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 1, generator=g)
    m = torch.rand(50, generator=g) > 0.6
    assert float(hinge_prior(x, 0.3, 0.1, mask=m)) == pytest.approx(float(hinge_prior(x[m], 0.3, 0.1)), rel=1e-6)
    assert float(hinge_prior(x, 0.3, 0.1, mask=torch.zeros(50, dtype=torch.bool))) == 0.0
    V, Vh, J, Ne, Np = 40, 30, 4, 5, 9
    prior = SimpleNamespace(skin_weights=torch.rand(Vh, J, generator=g), expr_basis=torch.rand(Vh, 3, Ne, generator=g),
                            pose_basis=torch.rand(Vh, Np, 3, generator=g))
    E, P, W = torch.rand(V, 3, Ne, generator=g), torch.rand(V, Np, 3, generator=g), torch.rand(V, J, generator=g)
    idx = torch.randint(0, Vh, (V,), generator=g)
    valid, zb, ghost = (torch.rand(V, generator=g) > p for p in (0.3, 0.8, 0.8))
    got = head_prior_loss(E, P, W, idx, valid, prior, zb, ghost, 5.0, 1e4)
    tw = torch.where(ghost[:, None], torch.eye(J)[0].expand(V, J), prior.skin_weights[idx])
    keep = (~zb).float()[:, None, None]
    te, tp = prior.expr_basis[idx] * keep, prior.pose_basis[idx] * keep
    v = valid
    want = 5.0 * (W[v] - tw[v]).square().mean() + 1e4 * (E[v] - te[v]).square().mean() + 1e4 * (P[v] - tp[v]).square().mean()
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert float(head_prior_loss(E, P, W, idx, torch.zeros(V, dtype=torch.bool), prior)) == 0.0
    faces = torch.tensor([[0, 1, 2], [2, 3, 4], [5, 6, 7]])
    face = torch.tensor([0, 2, 2, 1])
    pixels = torch.tensor([True, False, False, False])
    assert _vertices_of(pixels, face, faces, 9).nonzero().squeeze(1).tolist() == [0, 1, 2]
    assert not _vertices_of(torch.zeros(4, dtype=torch.bool), face, faces, 9).any()


def test_config_defaults_are_the_reference_and_schedule_scales():
    c = FlareConfig()
    assert (c.iterations - c.stage2_iterations, c.stage2_iterations, c.batch_size) == (1500, 1000, 4)
    assert (c.lr_vertices, c.lr_vertices_stage2, c.lr_deformer, c.lr_shader) == (1e-3, 1e-5, 1e-3, 1e-3)
    assert (c.w_mask, c.w_laplacian, c.w_normal, c.w_white_light, c.w_roughness, c.w_perceptual) == (2.0, 60.0, 0.1, 0.01, 0.01, 0.1)
    assert c.remesh_at == [500] and c.light_activation == "softplus"
    s = Schedule.make(c)
    assert (s.n1, s.n2, s.remesh, s.stage(1500), s.stage(1501)) == (1500, 1000, [500], (1, 1500, 1.0), (2, 1, 1.0))
    short = Schedule.make(FlareConfig(iterations=250, stage2_iterations=100))
    assert short.remesh == [50] and short.s1 == pytest.approx(0.1)


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from headavatar.methods import train_method
    from headavatar.subjects.synthetic import make_synthetic_subject

    root = tmp_path_factory.mktemp("flare")
    subj = root / "subject"
    make_synthetic_subject(subj, num_frames=6, resolution=32, seed=0, progress=False, texture_size=64, supersample=1)
    run = root / "run"
    # remesh_edge_factor 1: a light refinement keeps the test fast
    train_method("flare", subj, run, {**TINY, "iterations": 8, "stage2_iterations": 3, "remesh_edge_factor": 1.0}, progress=False)
    return subj, run


def test_training_lowers_the_loss_and_writes_every_output(trained):
    subj, run = trained
    info = json.loads((run / "run.json").read_text())
    assert info["method"] == "flare" and info["light_frame"] == "head"  # the synthetic subject's lights turn with the head
    rows = [json.loads(x) for x in (run / "curves.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5, 6, 8] and rows[-1]["stage"] == 2
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(math.isfinite(r["loss"]) and r["diffuse_light"] > 0 for r in rows)
    remeshed = json.loads((run / "remesh.json").read_text())
    from headavatar.subjects.format import Subject

    initial = Subject.open(subj).head_model().num_vertices
    assert remeshed[0]["method"] == "builtin" and remeshed[0]["step"] == 2  # 500 of 1500 stage-1 steps, scaled to 5
    assert rows[-1]["vertices"] == remeshed[0]["vertices"] > initial
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt_0000004.pt", "ckpt_0000008.pt"]
    assert (run / "previews" / "0000008.jpg").is_file()


def test_load_render_and_resume(trained, tmp_path):
    import shutil

    from headavatar.methods import load_avatar, train_method

    subj, run = trained
    av = load_avatar(run, "cpu")
    assert (av.method, av.eval_protocol, av.size, av.step) == ("flare", "imavatar", (32, 32), 8)
    tr = av.subject.tracking
    out = av.render(tr.params([0, 5]), tr.cameras([0, 5], 32, 32))
    assert out["rgb"].shape == (2, 32, 32, 3) and out["alpha"].shape == (2, 32, 32, 1)
    assert 0 <= float(out["rgb"].min()) and float(out["rgb"].max()) <= 1 and float(out["alpha"].mean()) > 0.1
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    train_method("flare", subj, copy, {"iterations": 10}, resume=True, progress=False)
    rows = [json.loads(x) for x in (copy / "curves.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 10 and rows[-1]["stage"] == 2


def test_relight_cli_with_a_small_hdr(trained, tmp_path):
    import argparse

    from headavatar.cli.relight_cmd import add_relight_arguments, relight_command
    from headavatar.lighting import procedural_sky
    from headavatar.lighting.hdr_io import write_hdr
    from headavatar.methods.flare.relight import relight_run

    _, run = trained
    hdr = tmp_path / "sky.hdr"
    write_hdr(hdr, procedural_sky(16))
    p = argparse.ArgumentParser()
    add_relight_arguments(p)
    args = p.parse_args([str(run), "--envmap", str(hdr), "-o", str(tmp_path / "relit.mp4"), "--device", "cpu", "--frames", "test",
                         "--env-size", "8", "--spin", "90"])
    assert relight_command(args) == 0
    assert (tmp_path / "relit.mp4").stat().st_size > 0
    assert (tmp_path / "relit_intrinsics.mp4").is_file()
    names = sorted(p.name for p in (tmp_path / "relit_intrinsics").iterdir())
    assert names == sorted(["relit.png", "albedo.png", "roughness.png", "specular.png", "normal.png", "diffuse_shading.png", "specular_shading.png"])
    res = relight_run(run, "sky", tmp_path / "plain.mp4", device="cpu", frames="test", env_size=8, background="grey", intrinsics=False, progress=False)
    assert res["frames"] == 1 and "intrinsics_video" not in res
    assert len(res["exposure_scale"]) == 3  # auto: the synthetic subject's recorded capture light
    probe = relight_run(run, "sky", tmp_path / "probe.mp4", device="cpu", frames="test", env_size=8, intrinsics=False, progress=False, calibrate=str(hdr))
    assert all(math.isfinite(v) and v > 0 for v in probe["exposure_scale"])
    raw = relight_run(run, "sky", tmp_path / "raw.mp4", device="cpu", frames="test", env_size=8, intrinsics=False, progress=False, calibrate="none")
    assert raw["exposure_scale"] is None
    bad = tmp_path / "bad.hdr"
    bad.write_bytes(b"not an hdr")
    with pytest.raises(UserError, match="Radiance"):
        relight_run(run, bad, tmp_path / "x.mp4", device="cpu", progress=False)


def test_relighting_ground_truth_evaluation(trained):
    from headavatar.methods.flare.relight import evaluate_relighting

    _, run = trained
    res = evaluate_relighting(run, "sky", device="cpu", frames="test", env_size=8, supersample=1, max_frames=1)
    m = res["mean"]
    assert set(m) == {"psnr_raw", "psnr_matte_raw", "psnr_calibrated", "psnr_matte_calibrated", "psnr_albedo_aligned", "psnr_matte_albedo_aligned"}
    assert all(math.isfinite(v) and v > 5 for v in m.values()) and len(res["albedo_scale"]) == 3 and len(res["exposure_scale"]) == 3
    assert (run / "relight_eval" / "metrics.json").is_file()


def test_exposure_calibration_recovers_a_known_light_scale(trained):
    """A capture light that is the learnt light x(2, 3, 4) in the same frame gives materials x(2, 3, 4)."""
    from headavatar.methods import load_avatar
    from headavatar.methods.flare.calibration import capture_light, exposure_scale
    from headavatar.subjects.synthetic import FunctionLighting, StudioLighting, capture_lighting, lighting_from_spec, lighting_spec

    _, run = trained
    av = load_avatar(run, "cpu")
    learnt = av.model.shader.light
    factor = torch.tensor([0.5, 1 / 3, 0.25])
    cap = FunctionLighting(lambda n: learnt.diffuse(n) * factor, frame="head")
    k = exposure_scale(av, cap, frames=3)
    assert torch.allclose(k, 1 / factor, rtol=1e-4)
    # the synthetic subject records its studio light; specs round-trip
    rec = capture_light(av, "auto")
    assert isinstance(rec, StudioLighting) and rec.frame == "head"
    assert lighting_spec(lighting_from_spec(lighting_spec(rec))) == lighting_spec(rec)
    assert capture_lighting({"lighting": "FunctionLighting"}) is None and capture_light(av, "none") is None
    with pytest.raises(UserError, match="no such light probe"):
        capture_light(av, "/no/probe.hdr")


def test_wrong_method_runs_are_refused(trained, tmp_path):
    from headavatar.methods.flare import FlareAvatar
    from headavatar.methods.flare.relight import relight_run
    from headavatar.methods.run import RunDir

    other = tmp_path / "fa"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"method": "flashavatar", "subject": str(trained[0]), "config": {}}))
    with pytest.raises(UserError, match="flashavatar"):
        relight_run(other, "sky", tmp_path / "o.mp4", device="cpu", progress=False)
    with pytest.raises(UserError, match="not 'flare'"):
        FlareAvatar(RunDir(other), "cpu")


def test_collapsed_light_is_reported_not_retried_forever(trained, tmp_path):
    from headavatar.methods import train_method

    subj, _ = trained
    cfg = {**TINY, "iterations": 6, "stage2_iterations": 0, "remesh_at": "[]", "log_every": 1, "checkpoint_every": 100,
           "light_activation": "none", "light_init_bias": -10.0, "max_recoveries": 1}
    with pytest.raises(TrainingDiverged, match="collapsed"):
        train_method("flare", subj, tmp_path / "dead", cfg, progress=False)


def test_nan_loss_recovers_from_the_last_checkpoint(trained, tmp_path, monkeypatch, capsys):
    import headavatar.methods.flare.train as flare_train
    from headavatar.methods import train_method

    subj, _ = trained
    real = flare_train.shading_loss
    calls = {"n": 0}

    def flaky(pred, gt):
        calls["n"] += 1
        loss = real(pred, gt)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(flare_train, "shading_loss", flaky)
    cfg = {**TINY, "iterations": 4, "stage2_iterations": 0, "remesh_at": "[]", "log_every": 1, "checkpoint_every": 2}
    train_method("flare", subj, tmp_path / "nan", cfg, progress=False)
    assert "warning: " in (err := capsys.readouterr().err) and "restarting from the last checkpoint" in err
    rows = [json.loads(x) for x in (tmp_path / "nan" / "curves.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    state = torch.load(tmp_path / "nan" / "checkpoints" / "ckpt_0000004.pt", weights_only=True)
    assert state["recoveries"] == 1 and state["lr_scale"] == 0.5


def test_head_matte_protocol_composites_a_whole_person_avatar(trained):
    # FLARE renders the whole matte (torso, clothes); under the flashavatar protocol the target keeps only
    # the head matte, so the prediction is composited with the same matte before scoring
    from headavatar.methods import load_avatar
    from headavatar.methods.evaluate import PERSON_NOTE, evaluate_run
    from headavatar.metrics.protocols import evaluate_frames
    from headavatar.subjects.dataset import FrameDataset, collate, prepare_targets

    _, run = trained
    res = evaluate_run(run, protocol="flashavatar", video=False, progress=False, lpips=False, announce=False)
    assert res["protocol"].endswith(PERSON_NOTE)
    av = load_avatar(run)
    assert av.covers == "person"
    subj, frames = av.subject, av.subject.split["test"]
    b = collate([FrameDataset(subj, frames, av.size)[k] for k in range(len(frames))])
    tgt = prepare_targets(b, av.background, av.device)
    pred = av.render(subj.tracking.params(frames), subj.tracking.cameras(frames, subj.height, subj.width).resized(*av.size))["rgb"]
    pred = pred.permute(0, 3, 1, 2).clamp(0, 1)
    m = tgt["alpha"][..., 0]
    gt = b["image"].permute(0, 3, 1, 2).float() / 255
    comp = pred * m[:, None] + av.background.view(1, 3, 1, 1) * (1 - m[:, None])
    want = evaluate_frames(comp, gt, m, "flashavatar", background=av.background, lpips=False)
    raw = evaluate_frames(pred, gt, m, "flashavatar", background=av.background, lpips=False)
    got = [r["psnr"] for r in res["per_frame"]]
    assert got == pytest.approx([r["psnr"] for r in want], abs=1e-4)
    assert min(got) > 0 and all(g >= r["psnr"] - 1e-6 for g, r in zip(got, raw))
