"""Eye gaze (headmodels/gaze.py, tracking/gaze.py) and compact subject storage (subjects/chunks.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headavatar.errors import UserError
from headavatar.headmodels.gaze import EYES, eyeball_spec, eyeballs, rotate_eyes
from headavatar.subjects.format import Subject, SubjectWriter, Tracking

av_missing = pytest.mark.skipif(__import__("importlib").util.find_spec("av") is None, reason="PyAV is not installed")


def procedural_with_eyeballs():
    """The procedural head with its eyeball caps declared as gaze-turnable (centre: the eye joint)."""
    from headavatar.headmodels import load_head_model

    m = load_head_model({"name": "procedural"})
    t = m.template.numpy()
    joints = (m.joint_regressor @ m.template).numpy()
    spec = {}
    for eye in EYES:
        j = m.joint_names.index(f"eye_{eye}")
        idx = np.flatnonzero(m.skin_weights[:, j].numpy() > 0.99)  # the eyeball cap, rigid to its eye joint
        c = joints[j]
        spec[eye] = eyeball_spec(t, idx, c, float(np.linalg.norm(t[idx] - c, axis=1).max()))
    m.meta = {**m.meta, "eyeballs": spec}
    return m


def _tracking(model, n: int, gaze: np.ndarray, size: int = 256) -> Tracking:
    from headavatar.subjects.synthetic import synthetic_camera

    K, R, t = synthetic_camera(size)
    rng = np.random.default_rng(1)
    rots = np.zeros((n, model.num_joints, 3), np.float32)
    rots[:, 0] = rng.normal(0, 0.12, (n, 3))  # head turned a little, differently each frame
    return Tracking(shape=np.zeros(model.num_shape, np.float32), expression=np.zeros((n, model.num_expression), np.float32),
                    joint_rotations=rots, translation=np.zeros((n, 3), np.float32), K=np.repeat(K[None], n, 0),
                    R=np.repeat(R[None], n, 0), t=np.repeat(t[None], n, 0), extras={"gaze": gaze.astype(np.float32)})


def _pupils_px(model, tr: Tracking, size: int) -> np.ndarray:
    """Project each eyeball's pupil vertex (front-most along its rest direction), rendered with the tracking's gaze."""
    p = tr.params(np.arange(tr.num_frames))
    v = model.forward(p["shape"], p["expression"], p["joint_rotations"], p["translation"], p["extras"])
    eb = eyeballs(model)
    t = model.template.numpy()
    out = []
    for e in EYES:
        idx = np.asarray(eb[e]["vertices"])
        c = t[idx].mean(0) + eb[e]["centre_offset"]
        front = idx[np.argmax((t[idx] - c) @ eb[e]["rest_direction"])]
        out.append(tr.cameras(np.arange(tr.num_frames), size, size).project(v[:, front][:, None])[:, 0, :2])
    return torch.stack(out, 1).numpy()


def test_gaze_rotates_only_the_eyeballs_and_zero_is_rest():
    m = procedural_with_eyeballs()
    v0 = m.forward()
    assert torch.allclose(rotate_eyes(m, v0, torch.zeros(1, 4)), v0, atol=1e-7)
    v = m.forward(extras={"gaze": torch.tensor([[0.3, 0.0, 0.0, 0.2]])})
    moved = (v - v0).norm(dim=-1)[0] > 1e-7
    eb = eyeballs(m)
    eye_idx = np.concatenate([eb["right"]["vertices"], eb["left"]["vertices"]])
    assert moved.any() and not moved.numpy()[np.setdiff1d(np.arange(m.num_vertices), eye_idx)].any()
    # yaw turns the right eye towards +x, pitch the left eye up
    r, lft = eb["right"]["vertices"], eb["left"]["vertices"]
    assert (v[0, r, 0] - v0[0, r, 0]).mean() > 0 and abs(float((v[0, r, 1] - v0[0, r, 1]).mean())) < 1e-4
    assert (v[0, lft, 1] - v0[0, lft, 1]).mean() > 0
    # a model that cannot express gaze ignores it
    from headavatar.headmodels import load_head_model

    plain = load_head_model({"name": "procedural"})
    assert torch.equal(plain.forward(extras={"gaze": torch.ones(1, 4)}), plain.forward())


def test_gaze_recovered_from_projected_iris_landmarks():
    from headavatar.tracking.gaze import GazeConfig, estimate_gaze

    m = procedural_with_eyeballs()
    n, size = 12, 256
    rng = np.random.default_rng(0)
    true = rng.uniform(-0.35, 0.35, (n, 4)).astype(np.float32)
    tr = _tracking(m, n, true, size)
    iris = _pupils_px(m, tr, size)
    tr_est = _tracking(m, n, np.zeros_like(true), size)  # what the fitter hands over: no gaze yet
    gaze, ok = estimate_gaze(m, tr_est, iris, cfg=GazeConfig(smooth_frames=0))
    assert ok.all()
    err = np.abs(gaze - true)
    assert err.max() < 0.02, err.max()  # radians
    # a blink (unusable iris) is interpolated from its neighbours
    usable = np.ones((n, 2), bool)
    usable[5, 0] = False
    gaze2, ok2 = estimate_gaze(m, tr_est, iris, usable, cfg=GazeConfig(smooth_frames=0))
    assert not ok2[5, 0] and np.allclose(gaze2[5, :2], (gaze[4, :2] + gaze[6, :2]) / 2, atol=1e-5)


def test_gaze_is_zero_for_models_without_eyeballs():
    from headavatar.headmodels import load_head_model
    from headavatar.tracking.gaze import estimate_gaze

    m = load_head_model({"name": "procedural"})
    tr = _tracking(m, 3, np.zeros((3, 4)))
    g, ok = estimate_gaze(m, tr, np.full((3, 2, 2), 100.0))
    assert (g == 0).all() and not ok.any()


# ---------------------------------------------------------------------------------- compact storage
def _write(root, layout, n=21, size=32):
    rng = np.random.default_rng(0)
    w = SubjectWriter(root, image_ext=".png", layout=layout)
    frames = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([200 * xx, 200 * yy, 120 + 80 * np.sin(6 * xx + 3 * yy)], -1)  # smooth, as photos are
    for i in range(n):
        img = np.clip(base + 3 * i, 0, 255).astype(np.uint8)  # a smooth, slowly changing picture
        alpha = rng.integers(0, 256, (size, size)).astype(np.uint8)
        parsing = rng.integers(0, 10, (size, size)).astype(np.uint8)
        frames.append((img, alpha, parsing))
    for i in [*range(0, n, 2), *range(1, n, 2)]:  # out of order: chunks complete late
        w.write_frame(i, *frames[i])
    tr = Tracking(shape=np.zeros(2, np.float32), expression=np.zeros((n, 3), np.float32), joint_rotations=np.zeros((n, 1, 3), np.float32),
                  translation=np.zeros((n, 3), np.float32), K=np.repeat(np.eye(3, dtype=np.float32)[None], n, 0),
                  R=np.repeat(np.eye(3, dtype=np.float32)[None], n, 0), t=np.zeros((n, 3), np.float32))
    return w.finalize(tr, {"name": "procedural"}, (size, size), fps=10), frames


@av_missing
def test_compact_layout_round_trip_and_conversion(tmp_path):
    from headavatar.subjects.convert import convert_subject
    from headavatar.subjects.dataset import FrameDataset

    s, frames = _write(tmp_path / "c", "chunks")
    assert s.chunked and s.meta["version"] == 2 and not (tmp_path / "c" / "frames").exists()
    for i in (20, 0, 17, 3):  # random access across chunks, the last one short
        f = s.load_frame(i)
        assert np.array_equal(f["alpha"], frames[i][1]) and np.array_equal(f["parsing"], frames[i][2])  # lossless
        mse = np.mean((f["image"].astype(float) - frames[i][0]) ** 2)
        assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 35
    assert len(FrameDataset(s, [0, 20], (16, 16))[1]["image"]) == 16
    # per-file -> compact -> per-file keeps tracking, split and masks
    p, _ = _write(tmp_path / "p", "frames")
    assert p.layout == "frames" and p.meta["version"] == 1
    c = convert_subject(p.root, tmp_path / "pc", progress=False)
    e = convert_subject(c.root, tmp_path / "pce", layout="frames", image_ext=".png", progress=False)
    assert c.split == p.split and np.array_equal(e.load_frame(7)["parsing"], p.load_frame(7)["parsing"])
    with pytest.raises(UserError, match="own folder"):
        convert_subject(p.root, p.root, progress=False)
    # a lost chunk file is named when the subject is opened
    (tmp_path / "c" / "chunks" / "000016_masks.mkv").unlink()
    with pytest.raises(UserError, match="chunk files are missing"):
        Subject.open(tmp_path / "c")


@av_missing
def test_subject_compact_cli(tmp_path, capsys):
    from headavatar.cli.main import main

    _write(tmp_path / "p", "frames")
    assert main(["subject", "compact", str(tmp_path / "p"), "-o", str(tmp_path / "c"), "--lean"]) == 0
    assert Subject.open(tmp_path / "c").chunked
    assert main(["subject", "compact", str(tmp_path / "p"), "-o", str(tmp_path / "c2"), "--crf", "99"]) != 0


@av_missing
def test_compact_subjects_load_in_spawned_workers(tmp_path, monkeypatch):
    """Loader workers of a compact subject are spawned, not forked (a forked worker inherits the
    parent's FFmpeg state and hung in its first decode on a GPU machine), and give the same batches."""
    import torch

    from headavatar.subjects import dataset as D

    s, _ = _write(tmp_path / "c", "chunks")
    contexts = []
    real = torch.utils.data.DataLoader

    def recording(*a, **k):
        contexts.append(k.get("multiprocessing_context"))
        return real(*a, **k)

    monkeypatch.setattr(torch.utils.data, "DataLoader", recording)
    batches = {}
    for workers in (0, 2):
        _, it = D.training_stream(s, list(range(21)), (32, 32), 4, 0, 21, workers, 64, 0, torch.device("cpu"))
        batches[workers] = [next(it) for _ in range(3)]
    assert contexts == [None, "spawn"]
    for a, b in zip(batches[0], batches[2]):
        assert all(torch.equal(a[k], b[k]) for k in ("index", "image", "alpha", "parsing"))
    p, _ = _write(tmp_path / "p", "frames")  # per-file subjects keep the default (fork on Linux: fast to start)
    D.training_stream(p, list(range(21)), (32, 32), 4, 0, 21, 2, 64, 0, torch.device("cpu"))
    assert contexts[-1] is None


@av_missing
def test_compact_of_a_compact_subject_copies_its_chunks(tmp_path):
    from headavatar.subjects.convert import convert_subject

    s, _ = _write(tmp_path / "c", "chunks")
    same = convert_subject(s.root, tmp_path / "lean", extras=False, progress=False)  # its own crf and chunk length
    names = sorted(f.name for f in (s.root / "chunks").iterdir())
    assert names == sorted(f.name for f in (same.root / "chunks").iterdir())
    for n in names:  # copied byte for byte: no second generation of H.264 loss
        assert (s.root / "chunks" / n).read_bytes() == (same.root / "chunks" / n).read_bytes()
    assert same.meta["storage"] == s.meta["storage"] and same.split == s.split and same.num_frames == s.num_frames
    assert np.array_equal(same.load_frame(20)["image"], s.load_frame(20)["image"])
    other = convert_subject(s.root, tmp_path / "q", crf=30, progress=False)  # another quality is encoded again
    assert other.meta["storage"]["crf"] == 30
    assert (other.root / "chunks" / "000000_rgb.mkv").read_bytes() != (s.root / "chunks" / "000000_rgb.mkv").read_bytes()


def _ict_or_skip():
    from headavatar.headmodels import load_head_model

    try:
        return load_head_model({"name": "ict"})
    except UserError as e:
        pytest.skip(f"the ICT-FaceKit npz is not available (../shared/assets or $HEADAVATAR_ICT_NPZ): {e}")


def test_ict_eyeballs_turn_and_gaze_round_trip():
    from headavatar.tracking.gaze import GazeConfig, estimate_gaze

    m = _ict_or_skip()
    eb = eyeballs(m)
    assert eb is not None and eb["left"]["centre_offset"][2] < 0  # the sphere's centre lies behind the kept cap
    assert float(m.template[eb["left"]["vertices"], 0].mean()) > 0  # "left" is the subject's left: +x
    n, size = 6, 512
    true = np.random.default_rng(2).uniform(-0.3, 0.3, (n, 4)).astype(np.float32)
    tr = _tracking(m, n, true, size)
    tr.translation[:] = (0, 0, -0.6)  # half a metre in front of the camera
    tr0 = _tracking(m, n, np.zeros_like(true), size)
    tr0.joint_rotations[:] = tr.joint_rotations
    tr0.translation[:] = tr.translation
    gaze, ok = estimate_gaze(m, tr0, _pupils_px(m, tr, size), cfg=GazeConfig(smooth_frames=0))
    assert ok.all() and np.abs(gaze - true).max() < 0.02
