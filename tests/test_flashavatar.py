"""FlashAvatar end to end on a tiny synthetic subject: training improves held-out PSNR, resume, eval, render, CLI errors."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from headavatar.cli.main import main as cli
from headavatar.errors import UserError
from headavatar.methods import load_avatar, train_method
from headavatar.methods.run import RunDir

TINY = {"iterations": 60, "resolution": 48, "uv_resolution": 32, "mlp_width": 64, "lpips_weight": 0.0,
        "checkpoint_every": 30, "preview_every": 30, "log_every": 10, "sh_increase_every": 20, "eval_every": 30, "eval_frames": 4}


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    from headavatar.subjects.synthetic import make_synthetic_subject

    root = tmp_path_factory.mktemp("fa") / "subject"
    make_synthetic_subject(root, num_frames=20, resolution=48, seed=3, progress=False)
    return root


def _test_psnr(run_dir):
    from headavatar.methods.evaluate import evaluate_run

    return evaluate_run(run_dir, device="cpu", video=False, progress=False, lpips=False)["metrics"]["mean"]["psnr"]


def test_model_layout(subject):
    from headavatar.methods.flashavatar.build import build_model
    from headavatar.methods.flashavatar.config import FlashAvatarConfig
    from headavatar.subjects.format import Subject

    subj = Subject.open(subject)
    cfg = FlashAvatarConfig(uv_resolution=32, shell_layers=0)  # the paper's layout: every Gaussian on the mesh
    m = build_model(subj, cfg, torch.device("cpu"))
    head = m.head
    # paper's MLP: PE 51 + condition, 256 wide: check the input size and parameter count formula
    assert m.pe.shape[1] == 51
    C = head.condition_dim
    n_params = sum(p.numel() for p in m.mlp.parameters())
    assert n_params == (51 + C) * 256 + 256 + 5 * (256 * 256 + 256) + 256 * 10 + 10
    # Gaussians sit on the mesh at rest: with a zero MLP offset their positions are barycentric points
    tr = subj.tracking
    cond, verts = m.frame_inputs(tr.params([0]))
    assert cond.shape == (1, C)
    with torch.no_grad():
        m.mlp.out.weight.zero_(), m.mlp.out.bias.zero_()
        g = m.gaussians(cond, verts)
    tri = head.faces[m.face_idx]
    inside = verts[0, tri]  # [N,3,3]
    lo, hi = inside.min(1).values - 1e-6, inside.max(1).values + 1e-6
    assert ((g["means"][0] >= lo) & (g["means"][0] <= hi)).all()
    # no Gaussian on a boundary face
    assert not head.region_face_mask("boundary", mode="any")[m.face_idx].any()


def test_training_raises_heldout_psnr(subject, tmp_path):
    run = tmp_path / "run"
    train_method("flashavatar", subject, run, {**TINY, "iterations": 1, "checkpoint_every": 1}, progress=False)
    before = _test_psnr(run)
    run2 = tmp_path / "run2"
    train_method("flashavatar", subject, run2, {**TINY, "iterations": 150}, progress=False)
    after = _test_psnr(run2)
    # the margin: 150 CPU iterations on a 48² subject must add at least 3 dB over the initial state
    assert after > before + 3.0, (before, after)
    curves = RunDir(run2).read_curves()
    assert curves[-1]["step"] == 150 and "test_psnr" in curves[-1]
    assert (run2 / "previews").is_dir() and (run2 / "run.json").is_file()


def test_resume_is_exact(subject, tmp_path):
    full = tmp_path / "full"
    train_method("flashavatar", subject, full, {**TINY, "iterations": 40, "checkpoint_every": 20}, progress=False)
    part = tmp_path / "part"
    train_method("flashavatar", subject, part, {**TINY, "iterations": 20, "checkpoint_every": 20}, progress=False)
    train_method("flashavatar", subject, part, {"iterations": 40}, resume=True, progress=False)
    a = torch.load(RunDir(full).checkpoints()[-1][1], weights_only=True)["model"]
    b = torch.load(RunDir(part).checkpoints()[-1][1], weights_only=True)["model"]
    assert RunDir(part).checkpoints()[-1][0] == 40
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_resume_after_kill(subject, tmp_path):
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "headavatar", "train", str(subject), "-o", str(run), "--iterations", "100000", "--quiet",
           "--set", "checkpoint_every=5", "--set", "uv_resolution=32", "--set", "mlp_width=32", "--set", "resolution=32", "--set", "lpips_weight=0"]
    p = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and len(RunDir(run).checkpoints()) < 2:
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    ckpts = RunDir(run).checkpoints()
    assert ckpts, "no checkpoint was written before the kill"
    last = ckpts[-1][0]
    assert cli(["train", str(subject), "-o", str(run), "--resume", "--iterations", str(last + 5), "--quiet"]) == 0
    assert RunDir(run).checkpoints()[-1][0] == last + 5


def test_eval_render_and_reenactment(subject, tmp_path):
    run = tmp_path / "run"
    train_method("flashavatar", subject, run, {**TINY, "iterations": 10}, progress=False)
    assert cli(["eval", str(run), "--device", "cpu", "--no-lpips"]) == 0
    res = json.loads((run / "eval" / "metrics.json").read_text())
    assert res["num_frames"] == len(load_avatar(run).subject.split["test"])
    assert "protocol" in res and res["metrics"]["mean"]["psnr"] > 5
    assert (run / "eval" / "side_by_side.mp4").stat().st_size > 0
    out = tmp_path / "re.mp4"
    assert cli(["render", str(run), "-o", str(out), "--tracking", str(subject), "--device", "cpu"]) == 0
    import imageio.v2 as imageio

    n = sum(1 for _ in imageio.get_reader(str(out)))
    assert n == 20


def test_cli_errors(subject, tmp_path, capsys):
    assert cli(["train", str(tmp_path / "nope"), "-o", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["train", str(subject), "-o", str(tmp_path / "r"), "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert cli(["train", str(subject), "-o", str(tmp_path / "r"), "--set", "nonsense=1"]) == 2
    assert "unknown option" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert cli(["eval", str(tmp_path)]) == 2
    assert "not a training run" in capsys.readouterr().err
    assert cli(["train", str(subject), "-o", str(tmp_path / "r2"), "--method", "nosuch"]) == 2
    assert "unknown method" in capsys.readouterr().err
    # a run folder from another method
    run = tmp_path / "r3"
    RunDir(run).write_info("flare", subject, __import__("headavatar.methods.flashavatar.config", fromlist=["x"]).FlashAvatarConfig())
    assert cli(["train", str(subject), "-o", str(run), "--resume"]) == 2
    assert "is a 'flare' run, not 'flashavatar'" in capsys.readouterr().err
    # an existing run is not overwritten
    run4 = tmp_path / "r4"
    train_method("flashavatar", subject, run4, {**TINY, "iterations": 2}, progress=False)
    before = sorted(p.name for p in (run4 / "checkpoints").iterdir())
    assert cli(["train", str(subject), "-o", str(run4), "--iterations", "3"]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert sorted(p.name for p in (run4 / "checkpoints").iterdir()) == before


def test_nan_loss_is_a_clear_error(subject, tmp_path, monkeypatch, capsys):
    import headavatar.methods.flashavatar.train as fa_train

    real = fa_train.huber
    calls = {"n": 0}

    def poisoned(pred, gt, delta):
        calls["n"] += 1
        out = real(pred, gt, delta)
        return out * float("nan") if calls["n"] > 8 else out  # NaN from the 5th iteration on

    monkeypatch.setattr(fa_train, "huber", poisoned)
    run = tmp_path / "nan"
    rc = cli(["train", str(subject), "-o", str(run), "--iterations", "20", "--quiet", "--set", "log_every=5", "--set", "checkpoint_every=2",
              "--set", "uv_resolution=32", "--set", "mlp_width=32", "--set", "resolution=32", "--set", "lpips_weight=0"])
    err = capsys.readouterr().err
    assert rc == 3 and "diverged" in err and "--resume" in err and err.count("\n") == 1
    # the checkpoints written before the divergence are intact and loadable
    step, state = RunDir(run).load_checkpoint()
    assert step == 4 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_condition_clamp_keeps_the_training_range(subject, tmp_path):
    """condition_clamp=train_range: the checkpoint stores the training frames' condition range, and a
    frame outside it (an expression never trained on) reaches the MLP clamped entry by entry."""
    run = tmp_path / "run"
    train_method("flashavatar", subject, run, {**TINY, "iterations": 2, "checkpoint_every": 2, "condition_clamp": "train_range"}, progress=False)
    av = load_avatar(run, "cpu")
    m, tr, split = av.model, av.subject.tracking, av.subject.split
    lo, hi = m.cond_range
    m.cfg.condition_clamp = "off"
    c_train, _ = m.frame_inputs(tr.params(split["train"]))
    assert torch.allclose(lo, c_train.min(0).values) and torch.allclose(hi, c_train.max(0).values)
    p = tr.params([split["test"][0]])
    far = p.replace(expression=p.expression + 3.0 * (hi - lo).max())  # well outside what training saw
    c_off, _ = m.frame_inputs(far)
    m.cfg.condition_clamp = "train_range"
    c_on, v_on = m.frame_inputs(far)
    assert (c_off > hi).any() and torch.equal(c_on, torch.maximum(torch.minimum(c_off, hi), lo))
    assert torch.equal(v_on, m.frame_inputs(far)[1])  # the mesh itself is not clamped: only the MLP's input
    # a checkpoint from before the range was stored loads with no clamp
    state = {k: v for k, v in m.state_dict().items() if k != "cond_range"}
    m.load_state_dict(state)
    assert torch.isinf(m.cond_range).all()


def test_neck_anchor_keeps_the_neck_base_with_the_torso(subject, tmp_path):
    """neck_anchor=train_mean: the neck's lower rim takes the training frames' mean head rotation, the
    face the frame's own, the neck in between; a checkpoint without the anchor loads with it off."""
    run = tmp_path / "run"
    train_method("flashavatar", subject, run, {**TINY, "iterations": 2, "checkpoint_every": 2, "neck_anchor": "train_mean"}, progress=False)
    m, subj = load_avatar(run, "cpu").model, None
    from headavatar.subjects.format import Subject

    subj = Subject.open(subject)
    tr, train = subj.tracking, subj.split["train"]
    assert torch.allclose(m.neck_anchor, tr.params(train).joint_rotations[:, 0].mean(0), atol=1e-6)
    p = tr.params([subj.split["test"][0]])
    rot = p.joint_rotations.clone()
    rot[:, 0] = m.neck_anchor + torch.tensor([0.3, 0.2, 0.0])  # the head turned well away from the anchor
    turned = p.replace(joint_rotations=rot)
    _, v = m.frame_inputs(turned)
    shaped = turned.replace(shape=m.shape)
    v_head = m.head(shaped)
    rot_a = rot.clone()
    rot_a[:, 0] = m.neck_anchor
    v_torso = m.head(shaped.replace(joint_rotations=rot_a))
    w, regions = m.torso_w, m.head.regions
    rim, neck = torch.as_tensor(regions["boundary"]), torch.as_tensor(regions["neck"])
    off_neck = torch.ones(len(w), dtype=torch.bool)
    off_neck[neck] = False
    off_neck[rim] = False
    assert torch.allclose(v[0, rim], v_torso[0, rim], atol=1e-6) and torch.allclose(v[0, off_neck], v_head[0, off_neck], atol=1e-6)
    mid = neck[(w[neck] > 0.3) & (w[neck] < 0.7)]
    assert len(mid) > 0
    between = ((v[0, mid] - v_head[0, mid]).norm(dim=-1) > 1e-4) & ((v[0, mid] - v_torso[0, mid]).norm(dim=-1) > 1e-4)
    assert between.all()
    assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0
    from headavatar.methods.flashavatar.build import build_model
    from headavatar.utils.rotations import axis_angle_to_matrix

    # the anchor's cached matrix follows the loaded anchor, also when a parent module loads the state
    fresh = torch.nn.ModuleDict({"m": build_model(subj, m.cfg, torch.device("cpu"))})
    fresh.load_state_dict({f"m.{k}": t for k, t in m.state_dict().items()})
    assert torch.allclose(fresh["m"].neck_anchor_mt, axis_angle_to_matrix(m.neck_anchor).T, atol=1e-7)
    assert torch.allclose(fresh["m"].frame_inputs(turned)[1], v, atol=1e-7)

    half = build_model(subj, replace(m.cfg, neck_anchor_follow=0.5), torch.device("cpu"))  # the base follows half the turn
    assert torch.allclose(half.torso_w, 0.5 * w)
    # the default, auto: off for a synthetic subject (its generator turns head and neck as one), on for one from video
    auto = replace(m.cfg, neck_anchor="auto")
    assert build_model(subj, auto, torch.device("cpu")).torso_w is None
    subj.meta.pop("synthetic")
    assert torch.allclose(build_model(subj, auto, torch.device("cpu")).torso_w, w)
    # trained before the option existed (no anchor in the checkpoint): the whole mesh turns with the head
    m.load_state_dict({k: t for k, t in m.state_dict().items() if k != "neck_anchor"})
    assert m.torso_w is None and torch.allclose(m.frame_inputs(turned)[1], v_head, atol=1e-6)


def test_condition_noise_scales_with_the_training_range(subject, tmp_path):
    """condition_noise: each entry gets noise of std = fraction x its training range; none without a range."""
    run = tmp_path / "run"
    train_method("flashavatar", subject, run, {**TINY, "iterations": 4, "checkpoint_every": 4, "condition_noise": 0.1}, progress=False)
    m = load_avatar(run, "cpu").model
    span = m.cond_range[1] - m.cond_range[0]
    assert (span > 0).any()
    torch.manual_seed(0)
    c = torch.zeros(20000, span.shape[0])
    std = (m.noisy_condition(c, 0.1) - c).std(0)
    assert torch.allclose(std, 0.1 * span, rtol=0.05, atol=1e-6)
    m.cond_range.copy_(torch.stack([torch.full_like(span, -math.inf), torch.full_like(span, math.inf)]))
    assert torch.equal(m.noisy_condition(c, 0.1), c)
    with pytest.raises(UserError, match="condition_noise"):
        train_method("flashavatar", subject, tmp_path / "bad", {**TINY, "condition_noise": 3.0}, progress=False)
