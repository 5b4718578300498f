"""FlashAvatar tracking refinement (joint and test-time) and regional conditioning, on a tiny synthetic
subject whose tracking is perturbed: the synthetic subject's own tracking is the ground truth."""

import shutil

import numpy as np
import pytest
import torch

from headavatar.methods import load_avatar, train_method
from headavatar.methods.run import RunDir

TINY = {"iterations": 400, "resolution": 64, "uv_resolution": 32, "mlp_width": 64, "lpips_weight": 0.0, "zero_init_deform": True,
        "sh_increase_every": 100, "checkpoint_every": 1000, "preview_every": 0, "log_every": 100}
REFINE = {"refine_tracking": True, "refine_start": 80, "refine_lr": 0.3}


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    """(clean subject, the same with head pose perturbed on every frame)."""
    from headavatar.subjects.format import Tracking
    from headavatar.subjects.synthetic import make_synthetic_subject

    base = tmp_path_factory.mktemp("refine")
    clean = base / "clean"
    make_synthetic_subject(clean, num_frames=40, resolution=64, seed=3, progress=False)
    pert = base / "pert"
    shutil.copytree(clean, pert)
    tr = Tracking.load(pert / "tracking.npz")
    rng = np.random.default_rng(1)
    n = tr.num_frames
    tr.joint_rotations[:, 0] += rng.normal(0, 0.05, (n, 3)).astype(np.float32)  # ~3 degrees
    tr.translation += rng.normal(0, 0.005, (n, 3)).astype(np.float32)  # 5 mm
    tr.save(pert / "tracking.npz")
    return clean, pert


@pytest.fixture(scope="module")
def runs(subjects, tmp_path_factory):
    _, pert = subjects
    base = tmp_path_factory.mktemp("refine_runs")
    out = {}
    for name, extra in (("off", {}), ("on", REFINE)):
        out[name] = base / name
        train_method("flashavatar", pert, out[name], overrides={**TINY, **extra}, progress=False)
    return out


def _vertex_error_mm(subject_dir, tracking_arrays, frames) -> float:
    """Mean distance (mm) between the meshes posed by ``tracking_arrays`` and by the true tracking."""
    from headavatar.subjects.format import Subject

    subj = Subject.open(subject_dir)
    head, tr = subj.head_model(), subj.tracking
    shape = torch.as_tensor(tr.shape)[None].expand(len(frames), -1)
    def f(a):
        return torch.as_tensor(np.asarray(a), dtype=torch.float32)

    with torch.no_grad():
        v = head(shape=shape, expression=f(tracking_arrays["expression"]), joint_rotations=f(tracking_arrays["joint_rotations"]),
                 translation=f(tracking_arrays["translation"]))
        v0 = head(shape=shape, expression=f(tr.expression[frames]), joint_rotations=f(tr.joint_rotations[frames]), translation=f(tr.translation[frames]))
    return 1000 * float((v - v0).norm(dim=-1).mean())


def _heldout_psnr_true_tracking(run_dir, clean) -> float:
    """Held-out PSNR of a run rendered with the *true* tracking (the avatar's own quality)."""
    from headavatar.methods.flashavatar import FlashAvatarMethod
    from headavatar.subjects.dataset import FrameDataset, collate, prepare_targets

    av = FlashAvatarMethod().load(RunDir(run_dir), "cpu", subject_dir=clean)
    subj = av.subject
    te = subj.split["test"]
    H, W = av.size
    data = FrameDataset(subj, te, (H, W))
    tgt = prepare_targets(collate([data[k] for k in range(len(te))]), av.background, "cpu")
    out = av.render(subj.tracking.params(te), subj.tracking.cameras(te, subj.height, subj.width).resized(H, W))
    mse = ((out["rgb"] - tgt["gt"]) ** 2).mean((1, 2, 3))
    return float((-10 * torch.log10(mse)).mean())


def test_corrections_start_at_zero_and_touch_only_their_frames(subjects):
    from headavatar.methods.flashavatar.config import FlashAvatarConfig
    from headavatar.methods.flashavatar.refine import TrackingCorrections
    from headavatar.subjects.format import Subject

    subj = Subject.open(subjects[1])
    head = subj.head_model()
    cfg = FlashAvatarConfig()
    corr = TrackingCorrections.for_subject([0, 1, 2], subj.tracking, head, cfg)
    params = subj.tracking.params([1, 5])
    idx = torch.tensor([1, 5])
    same = corr.apply(params, idx)
    for k in ("expression", "joint_rotations", "translation"):
        assert torch.equal(same[k], params[k])
    with torch.no_grad():
        for emb in corr.blocks.values():
            emb.weight.fill_(1.0)
    moved = corr.apply(params, idx)
    # frame 1 is refined: translation moves by sigma; frame 5 is not: unchanged
    assert torch.allclose(moved["translation"][0] - params["translation"][0], torch.full((3,), cfg.refine_sigma_translation))
    assert torch.equal(moved["translation"][1], params["translation"][1])
    assert torch.equal(moved["expression"][1], params["expression"][1])
    assert corr.prior(idx, 1.0, 0.0) > 0
    # smoothness: zero when consecutive frames carry the same correction, positive when they differ
    both = torch.tensor([1, 2])
    assert corr.prior(both, 0.0, 1.0) == 0
    with torch.no_grad():
        corr.blocks["translation"].weight[2] += 1.0
    assert corr.prior(both, 0.0, 1.0) > 0


def test_joint_refinement_recovers_tracking_and_raises_heldout_psnr(subjects, runs):
    from headavatar.methods.flashavatar.refine import REFINED_TRACKING
    from headavatar.subjects.format import Tracking

    clean, pert = subjects
    z = np.load(runs["on"] / REFINED_TRACKING)
    frames = z["frames"]
    pt = Tracking.load(pert / "tracking.npz")
    err_refined = _vertex_error_mm(clean, z, frames)
    err_perturbed = _vertex_error_mm(clean, {"expression": pt.expression[frames], "joint_rotations": pt.joint_rotations[frames],
                                             "translation": pt.translation[frames]}, frames)
    assert err_refined < 0.9 * err_perturbed, (err_refined, err_perturbed)
    assert not (runs["off"] / REFINED_TRACKING).exists()
    # the avatar learnt under refined tracking is better on held-out frames (rendered with the true tracking)
    on, off = _heldout_psnr_true_tracking(runs["on"], clean), _heldout_psnr_true_tracking(runs["off"], clean)
    assert on > off + 0.3, (on, off)
    # loading the run puts the refined values on the training frames and leaves the held-out frames alone
    av = load_avatar(runs["on"], "cpu")
    assert av.refined_tracking
    tr = av.subject.tracking
    np.testing.assert_allclose(tr.translation[frames], z["translation"], atol=1e-7)
    test = av.subject.split["test"]
    np.testing.assert_array_equal(tr.translation[test], pt.translation[test])
    assert not np.allclose(tr.translation[frames], pt.translation[frames])


def test_test_time_refinement_is_a_separate_protocol(subjects, runs, capsys):
    from headavatar.cli.main import main as cli
    from headavatar.subjects.format import Tracking
    from headavatar.utils.io import read_json

    clean, pert = subjects
    assert cli(["eval", str(runs["on"]), "--no-video", "--no-lpips", "--device", "cpu", "--refine-tracking", "40"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "psnr" in ln]
    assert "test frames" in lines[0] and "test-time refined" in lines[1]  # the fixed figure first
    fixed = read_json(runs["on"] / "eval" / "metrics.json")
    refined = read_json(runs["on"] / "eval" / "metrics_refined.json")
    assert "TEST-TIME REFINED" in refined["tracking"] and refined["refine_steps"] == 40
    assert refined["lpips"] == {"computed": False, "reason": "--no-lpips was given"}  # says why, as eval does
    assert refined["metrics"]["mean"]["psnr"] > fixed["metrics"]["mean"]["psnr"] + 0.3
    z = np.load(runs["on"] / "eval" / "refined_tracking_test.npz")
    frames = z["frames"]
    pt = Tracking.load(pert / "tracking.npz")
    err_perturbed = _vertex_error_mm(clean, {"expression": pt.expression[frames], "joint_rotations": pt.joint_rotations[frames],
                                             "translation": pt.translation[frames]}, frames)
    assert _vertex_error_mm(clean, z, frames) < 0.9 * err_perturbed


def test_refine_tracking_resumes(subjects, tmp_path):
    """The corrections and their optimiser are in the checkpoint: a resumed run continues them."""
    from headavatar.methods.flashavatar.refine import REFINED_TRACKING

    _, pert = subjects
    small = {**TINY, **REFINE, "iterations": 20, "refine_start": 5, "checkpoint_every": 10}
    train_method("flashavatar", pert, tmp_path / "r", overrides={**small, "iterations": 10}, progress=False)
    first = np.load(tmp_path / "r" / REFINED_TRACKING)["translation"].copy()
    train_method("flashavatar", pert, tmp_path / "r", overrides=small, resume=True, progress=False)
    _, state = RunDir(tmp_path / "r").load_checkpoint()
    assert "refine" in state and state["step"] == 20
    assert not np.allclose(np.load(tmp_path / "r" / REFINED_TRACKING)["translation"], first)


def test_regional_conditioning_frees_hair_from_the_expression_code(subjects):
    from headavatar.methods.flashavatar.config import FlashAvatarConfig
    from headavatar.methods.flashavatar.train import build_model
    from headavatar.subjects.format import Subject

    subj = Subject.open(subjects[0])
    m = build_model(subj, FlashAvatarConfig(uv_resolution=32, mlp_width=32, condition_regions="basis"), torch.device("cpu"))
    head = m.head
    per = m.cond_masks[m.cond_group]  # [N,C]
    hair = torch.zeros(head.num_vertices, dtype=torch.bool)
    hair[torch.as_tensor(head.regions["hair"])] = True
    g_hair = hair[head.faces[m.face_idx]].all(1)
    free = per.sum(1) == 0
    assert g_hair.any() and free[g_hair].float().mean() > 0.9  # no blendshape moves the hair (but at its rim)
    assert per.sum(1).max() > 0 and per.sum(1).float().mean() < head.condition_dim
    # an expression change moves some Gaussians' MLP output, never an unconditioned one's
    tr = subj.tracking
    p0 = tr.params([0])
    p1 = p0.replace(expression=p0.expression + 0.5)
    with torch.no_grad():
        o0 = m.mlp(m.pe, m.frame_inputs(p0)[0], m.cond_masks, m.cond_group)
        o1 = m.mlp(m.pe, m.frame_inputs(p1)[0], m.cond_masks, m.cond_group)
    diff = (o1 - o0).abs().amax(-1)[0]
    assert diff[free].max() == 0 and diff.max() > 0
    # with the head pose in the condition, the unconditioned Gaussians (hair, scalp) see the pose alone
    mp = build_model(subj, FlashAvatarConfig(uv_resolution=32, mlp_width=32, condition_regions="basis", condition_pose="root"), torch.device("cpu"))
    p2 = {**p0, "joint_rotations": p0["joint_rotations"].clone()}
    p2["joint_rotations"][:, 0] += 0.2
    with torch.no_grad():
        base = mp.mlp(mp.pe, mp.frame_inputs(p0)[0], mp.cond_masks, mp.cond_group)
        d_expr = (mp.mlp(mp.pe, mp.frame_inputs(p1)[0], mp.cond_masks, mp.cond_group) - base).abs().amax(-1)[0]
        d_pose = (mp.mlp(mp.pe, mp.frame_inputs(p2)[0], mp.cond_masks, mp.cond_group) - base).abs().amax(-1)[0]
    assert d_expr[free].max() == 0 and d_pose[free].min() > 0
    # static: the same Gaussians lose the condition, every other one keeps all of it
    ms = build_model(subj, FlashAvatarConfig(uv_resolution=32, mlp_width=32, condition_regions="static"), torch.device("cpu"))
    ps = ms.cond_masks[ms.cond_group]
    assert torch.equal(ps.sum(1) == 0, free) and (ps[~free] == 1).all()
    # the unrestricted (paper) model lets every Gaussian see the expression
    full = build_model(subj, FlashAvatarConfig(uv_resolution=32, mlp_width=32), torch.device("cpu"))
    with torch.no_grad():
        d = (full.mlp(full.pe, full.frame_inputs(p1)[0]) - full.mlp(full.pe, full.frame_inputs(p0)[0])).abs().amax(-1)[0]
    assert d[g_hair].min() > 0


def test_shell_gaussians_sit_off_the_surface_and_follow_the_head(subjects):
    from headavatar.methods.flashavatar.config import FlashAvatarConfig
    from headavatar.methods.flashavatar.embedding import barycentric_points
    from headavatar.methods.flashavatar.model import face_normals
    from headavatar.methods.flashavatar.train import build_model, make_optimizer
    from headavatar.subjects.format import Subject

    subj = Subject.open(subjects[0])
    base = build_model(subj, FlashAvatarConfig(uv_resolution=32, mlp_width=32, shell_layers=0), torch.device("cpu"))
    cfg = FlashAvatarConfig(uv_resolution=32, mlp_width=32, zero_init_deform=True, shell_layers=2, shell_spacing=0.01)
    m = build_model(subj, cfg, torch.device("cpu"))
    n0 = base.num_gaussians
    n_shell = m.num_gaussians - n0
    assert n_shell > 0 and n_shell % 2 == 0
    # bound to the same triangles as originals of the hair region (binding inheritance)
    assert torch.equal(m.face_idx[:n0], base.face_idx) and set(m.face_idx[n0:].tolist()) <= set(base.face_idx.tolist())
    for frame in (0, 7):
        cond, verts = m.frame_inputs(subj.tracking.params([frame]))
        with torch.no_grad():
            g = m.gaussians(cond, verts)
        on_surface = barycentric_points(verts, m.head.faces, m.face_idx, m.bary)
        d = ((g["means"] - on_surface) * face_normals(verts, m.head.faces, m.face_idx, m.normal_sign)).sum(-1)[0]
        assert torch.allclose(d[:n0], torch.zeros(n0), atol=1e-6)
        assert torch.allclose(d[n0:n0 + n_shell // 2], torch.full((n_shell // 2,), 0.01), atol=1e-5)
        assert torch.allclose(d[n0 + n_shell // 2:], torch.full((n_shell // 2,), 0.02), atol=1e-5)
        centre = verts[0].mean(0)
        outward = ((on_surface[0, n0:] - centre) * face_normals(verts, m.head.faces, m.face_idx, m.normal_sign)[0, n0:]).sum(-1)
        assert (outward > 0).float().mean() > 0.95
    assert any(gr["name"] == "normal_offset" for gr in make_optimizer(m, cfg).param_groups)
