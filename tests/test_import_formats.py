"""Importing FlashAvatar (metrical-tracker) and IMavatar/FLARE data into native subjects.

Fixtures are written by tests/fixtures_flame.py in each tool's exact on-disk layout.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from fixtures_flame import (
    rodrigues,
    shared_flame_dir,
    write_flashavatar,
    write_imavatar_sequence,
)
from headavatar.errors import UserError
from headavatar.subjects.format import LABEL_IDS
from headavatar.subjects.importers import import_flashavatar, import_imavatar, load_tracker_frame
from headavatar.utils.io import read_image


@pytest.fixture(scope="module")
def flame(tmp_path_factory):
    return shared_flame_dir(tmp_path_factory, template="both")


@pytest.fixture(scope="module")
def fa_subject(tmp_path_factory, flame):
    d, _ = flame
    root = tmp_path_factory.mktemp("fa")
    fx = write_flashavatar(root, n_frames=6, size=(48, 40))
    subj = import_flashavatar(fx["dataset"], fx["tracker"].parent, d, root / "subject", test_frames=2, log=None)
    return subj, fx


@pytest.fixture(scope="module")
def im_subject(tmp_path_factory, flame):
    """Two sequences: one as IMavatar writes it, one with 70 keypoints and a rotated world_mat."""
    d, fake = flame
    root = tmp_path_factory.mktemp("im")
    a = write_imavatar_sequence(root / "subj", "MVI_1810", fake, n_frames=4, size=32)
    b = write_imavatar_sequence(root / "subj", "MVI_1812", fake, n_frames=3, size=32, seed=1, shape=a["shape"], n_keypoints=70, rotate_world=True)
    subj = import_imavatar(root / "subj", d, root / "subject", train=["MVI_1810"], test="MVI_1812", log=None)
    return subj, (a, b), root


# ------------------------------------------------------------ FlashAvatar
def test_flashavatar_tracking_and_split(fa_subject, flame):
    subj, fx = fa_subject
    tr = subj.tracking
    assert subj.num_frames == 6 and (subj.height, subj.width) == (48, 40)
    assert subj.split == {"train": [0, 1, 2, 3], "test": [4, 5]}
    # head motion in the camera: FLAME's global and neck rotations and translation are zero
    assert np.abs(tr.joint_rotations[:, :2]).max() == 0 and np.abs(tr.translation).max() == 0
    for n, fr in enumerate(fx["frames"]):
        jaw6 = fr["flame"]["jaw"][0]
        Rj = rodrigues(tr.joint_rotations[n, 2].astype(np.float64))
        # the (unnormalised) 6D parameters are Gram-Schmidt'ed rows, as PyTorch3D does
        assert np.allclose(Rj[0], jaw6[:3] / np.linalg.norm(jaw6[:3]), atol=1e-5)
        assert np.allclose(tr.expression[n], fr["flame"]["exp"][0])
        assert np.allclose(tr.extras["eyelids"][n], fr["flame"]["eyelids"][0])
        assert np.allclose(tr.R[n], fr["opencv"]["R"][0]) and np.allclose(tr.t[n], fr["opencv"]["t"][0])
        assert np.allclose(tr.K[n], fx["K"])  # principal point kept, non-square image
    assert np.allclose(tr.shape, fx["frames"][0]["flame"]["shape"][0])
    src = subj.meta["source"]
    assert src["frames"] == [[k, k + 1] for k in range(6)] and src["frame_offset"] == 1
    model = subj.head_model(dir=str(flame[0]))  # the subject stores no path: the FLAME folder is given again
    assert model.condition_dim == 120


def test_flashavatar_spec_and_labels(fa_subject):
    subj, fx = fa_subject
    spec = subj.head_model_spec
    assert spec["name"] == "flame" and "dir" not in spec
    assert not any(isinstance(v, str) and (os.path.isabs(v) or "/tmp" in v) for v in spec.values())
    # masks -> labels: neck-head minus mouth = skin, mouth = lips, matte outside the head = clothing
    head = read_image(fx["dataset"] / "parsing" / "00003_neckhead.png") > 127
    mouth = read_image(fx["dataset"] / "parsing" / "00003_mouth.png") > 127
    lab = subj.load_frame(2)["parsing"]
    assert (lab[head & ~mouth] == LABEL_IDS["skin"]).all() and (lab[head & mouth] == LABEL_IDS["lips"]).all()
    assert (lab[~head & (subj.load_frame(2)["alpha"] > 127)] == LABEL_IDS["clothing"]).all()
    # the JPEG frames are copied byte for byte
    assert (subj.root / "frames" / "000002.jpg").read_bytes() == (fx["dataset"] / "imgs" / "00003.jpg").read_bytes()


def test_flashavatar_camera_matches_hand_projection(fa_subject):
    subj, fx = fa_subject
    X = np.array([0.01, 0.02, 0.03])
    for n in (0, 3):
        fr = fx["frames"][n]["opencv"]
        xc = fr["R"][0].astype(np.float64) @ X + fr["t"][0]
        K = fr["K"][0]
        uv = [K[0, 0] * xc[0] / xc[2] + K[0, 2], K[1, 1] * xc[1] / xc[2] + K[1, 2]]
        got = subj.tracking.cameras(n, subj.height, subj.width).project(torch.tensor(X, dtype=torch.float32)[None, None])[0, 0]
        assert np.allclose(got.numpy(), uv, atol=1e-3)


def test_flashavatar_offset_detection_and_one_short(tmp_path, flame):
    d, _ = flame
    # tracked with begin_frames: 1: .frame k is image k+2, and one image fewer is tracked
    fx = write_flashavatar(tmp_path, n_frames=4, size=(32, 32), offset=2, tracker_inputs=True)
    subj = import_flashavatar(fx["dataset"], fx["tracker"], d, tmp_path / "auto", test_frames=1, log=None)
    assert subj.meta["source"]["frame_offset"] == 2 and subj.meta["source"]["frames"][0] == [0, 2]
    assert "matched the tracker's input images" in subj.meta["source"]["frame_offset_from"]
    # without the tracker's input images: FlashAvatar's pairing, with the metrical-tracker#22 warning
    shutil.rmtree(fx["tracker"].parent / "input")
    with pytest.warns(UserWarning, match="metrical-tracker#22"):
        s1 = import_flashavatar(fx["dataset"], fx["tracker"], d, tmp_path / "one", test_frames=1, log=None)
    assert s1.meta["source"]["frame_offset"] == 1 and s1.meta["source"]["frames"][-1] == [3, 4]
    s2 = import_flashavatar(fx["dataset"], fx["tracker"], d, tmp_path / "given", test_frames=1, frame_offset=2, log=None)
    assert s2.meta["source"]["frames"][-1] == [3, 5]


def test_flashavatar_short_clip_and_pairing_errors(tmp_path, flame):
    d, _ = flame
    fx = write_flashavatar(tmp_path, n_frames=5, size=(24, 24))
    # the reference's default (last 500 for testing) would leave nothing to train on
    with pytest.warns(UserWarning, match="holding out the last 1"):
        s = import_flashavatar(fx["dataset"], fx["tracker"], d, tmp_path / "s", log=None)
    assert s.split == {"train": [0, 1, 2, 3], "test": [4]}
    with pytest.raises(UserError, match="do not pair up"):
        import_flashavatar(fx["dataset"], fx["tracker"], d, tmp_path / "bad", frame_offset=3, log=None)
    with pytest.raises(UserError, match="no .frame files"):
        import_flashavatar(fx["dataset"], tmp_path, d, tmp_path / "bad2", log=None)
    with pytest.raises(UserError, match="no imgs/ folder"):
        import_flashavatar(tmp_path, fx["tracker"], d, tmp_path / "bad3", log=None)


def test_flashavatar_damaged_inputs(tmp_path, flame):
    d, _ = flame
    fx = write_flashavatar(tmp_path, n_frames=3, size=(24, 24))
    ck = fx["tracker"]
    good = (ck / "00001.frame").read_bytes()
    (ck / "00001.frame").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="00001.frame is damaged"):
        import_flashavatar(fx["dataset"], ck, d, tmp_path / "s", test_frames=1, log=None)
    torch.save({"flame": {"exp": np.zeros((1, 100))}, "x": _Foreign()}, ck / "00001.frame")
    with pytest.raises(UserError, match="objects other than arrays"):
        load_tracker_frame(ck / "00001.frame")
    torch.save({"flame": {"exp": np.zeros((1, 100), np.float32)}}, ck / "00001.frame")
    with pytest.raises(UserError, match="lacks flame.jaw"):
        import_flashavatar(fx["dataset"], ck, d, tmp_path / "s", test_frames=1, log=None)
    (ck / "00001.frame").write_bytes(good)
    (fx["dataset"] / "imgs" / "00003.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(UserError, match="00003.jpg is corrupt"):
        import_flashavatar(fx["dataset"], ck, d, tmp_path / "s", test_frames=1, log=None)


class _Foreign:
    pass


# --------------------------------------------------------------- IMavatar
def test_imavatar_landmark_check_consistent(im_subject):
    subj, _, _ = im_subject
    chk = subj.meta["source"]["landmark_check"]
    # FLAME's landmarks land on flame_keypoints: the camera chain is right
    assert chk["mean_px"] < 0.05 and chk["max_px"] < 0.25, chk
    assert set(chk["per_sequence_mean_px"]) == {"MVI_1810", "MVI_1812"}


def test_imavatar_split_tracking_and_camera(im_subject):
    subj, (a, b), _ = im_subject
    assert subj.num_frames == 7 and subj.split == {"train": [0, 1, 2, 3], "test": [4, 5, 6]}
    assert subj.meta["source"]["frames"][4] == ["MVI_1812", 1]
    tr = subj.tracking
    js = a["json"]["frames"][1]
    assert np.allclose(tr.joint_rotations[1].reshape(-1), js["pose"], atol=1e-6)
    assert np.allclose(tr.expression[1], js["expression"], atol=1e-6)
    assert subj.head_model_spec["n_shape"] == 100 and subj.head_model_spec["n_expr"] == 50
    # a known point through IMavatar's own formula (x4 FLAME, normalised intrinsics, -z camera)
    X = np.array([0.02, -0.01, 0.05])
    for n, seq, fr in ((1, a, js), (5, b, b["json"]["frames"][1])):
        i0, i1, i2, i3 = seq["intrinsics"]
        wm = np.asarray(fr["world_mat"])
        pc = wm[:, :3] @ (4 * X) + wm[:, 3]
        u = (pc[0] / pc[2] * 2 * i0 + 2 * i2 - 1 + 1) * 32 / 2
        v = (pc[1] / pc[2] * 2 * i1 + 2 * i3 - 1 + 1) * 32 / 2
        got = tr.cameras(n, 32, 32).project(torch.tensor(X, dtype=torch.float32)[None, None])[0, 0].numpy()
        assert np.allclose(got, [u, v], atol=1e-3)
    assert (tr.K[:, 0, 0] > 0).all() and np.allclose(tr.K[0, 0, 2], 32 * a["intrinsics"][2])


def test_imavatar_labels_and_mask(im_subject):
    subj, (a, _), _ = im_subject
    sem = read_image(a["path"] / "semantic" / "2.png")
    f = subj.load_frame(1)
    lab = f["parsing"]
    assert (lab[sem == 1] == LABEL_IDS["skin"]).all() and (lab[sem == 11] == LABEL_IDS["mouth_interior"]).all()
    assert (lab[sem == 16] == LABEL_IDS["clothing"]).all() and lab[0, 0] == LABEL_IDS["hair"] and lab[0, 1] == LABEL_IDS["lips"]
    assert lab[0, 2] == LABEL_IDS["eyes"] and lab[0, 3] == LABEL_IDS["neck"]
    # the matte is kept as uint8 0..255 (flare#5 read it as all zeros)
    assert np.array_equal(f["alpha"], read_image(a["path"] / "mask" / "2.png")) and f["alpha"].max() == 255


def test_imavatar_inconsistent_keypoints_are_reported(tmp_path, flame):
    d, fake = flame
    write_imavatar_sequence(tmp_path / "subj", "seq", fake, n_frames=3, size=32, consistent=False)
    with pytest.raises(UserError, match="from flame_keypoints"):
        import_imavatar(tmp_path / "subj", d, tmp_path / "s1", max_landmark_error=0.5, log=None)
    with pytest.warns(UserWarning, match="may not match"):
        s = import_imavatar(tmp_path / "subj" / "seq", d, tmp_path / "s2", log=None)
    assert s.meta["source"]["landmark_check"]["mean_px"] > 1.0
    assert s.split == {"train": [0, 1], "test": [2]}  # one sequence: its last 15%


def test_imavatar_bad_input(tmp_path, flame):
    d, fake = flame
    seq = write_imavatar_sequence(tmp_path / "subj", "seq", fake, n_frames=2, size=16, drop_key="world_mat")
    with pytest.raises(UserError, match="frame 0 .* lacks world_mat"):
        import_imavatar(tmp_path / "subj", d, tmp_path / "s", log=None)
    with pytest.raises(UserError, match="not found under"):
        import_imavatar(tmp_path / "subj", d, tmp_path / "s", train="nope", log=None)
    js = seq["json"]
    for fr in js["frames"]:
        fr["world_mat"] = np.concatenate([np.eye(3), [[0], [0], [-4]]], 1).tolist()
    js["intrinsics"][0] = -js["intrinsics"][0]  # a positive fx: the image would be mirrored
    (seq["path"] / "flame_params.json").write_text(json.dumps(js))
    with pytest.raises(UserError, match="mirrored"):
        import_imavatar(tmp_path / "subj", d, tmp_path / "s", log=None)
    del js["intrinsics"]
    (seq["path"] / "flame_params.json").write_text(json.dumps(js))
    with pytest.raises(UserError, match="lacks 'intrinsics'"):
        import_imavatar(tmp_path / "subj", d, tmp_path / "s", log=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no sequence with a flame_params.json"):
        import_imavatar(tmp_path / "empty", d, tmp_path / "s", log=None)


# ------------------------------------------------------------ training
@pytest.mark.slow
def test_short_training_on_imported_subjects(fa_subject, im_subject, flame, tmp_path, monkeypatch):
    from headavatar.methods import train_method

    d, _ = flame
    monkeypatch.setenv("HEADAVATAR_FLAME_DIR", str(d))  # the FLAME folder at train time
    overrides = {"iterations": 3, "uv_resolution": 32, "log_every": 1, "preview_every": 0, "checkpoint_every": 3,
                 "device": "cpu", "backend": "torch", "lpips_weight": 0.0}
    for name, subj in (("fa", fa_subject[0]), ("im", im_subject[0])):
        run = train_method("flashavatar", subj.root, tmp_path / name, overrides, progress=False)
        curve = [json.loads(line) for line in (run / "curves.jsonl").read_text().splitlines()]
        assert [r["step"] for r in curve] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in curve)


# ------------------------------------------------------------------- CLI
def test_cli_import_train_eval(flame, tmp_path, capsys):
    """The issue's interface: headavatar import flashavatar|imavatar ... then train/eval with --flame-dir."""
    from headavatar.cli.main import main as cli

    d, fake = flame
    fx = write_flashavatar(tmp_path / "fa", n_frames=6, size=(48, 40))
    out = tmp_path / "fa_subject"
    assert cli(["import", "flashavatar", str(fx["dataset"]), "--tracker-dir", str(fx["tracker"].parent), "--flame-dir", str(d),
                "-o", str(out), "--test-frames", "2"]) == 0
    assert "wrote subject" in capsys.readouterr().out
    run = tmp_path / "run"
    assert cli(["train", str(out), "-o", str(run), "--flame-dir", str(d), "--iterations", "2", "--resolution", "32", "--quiet",
                "--set", "uv_resolution=32", "--set", "lpips_weight=0", "--device", "cpu"]) == 0
    # the FLAME folder is remembered by the run: eval needs no flag
    assert cli(["eval", str(run), "--no-lpips", "--no-video", "--device", "cpu"]) == 0
    assert json.loads((run / "eval" / "metrics.json").read_text())["num_frames"] == 2

    a = write_imavatar_sequence(tmp_path / "im", "A", fake, n_frames=3, size=32)
    write_imavatar_sequence(tmp_path / "im", "B", fake, n_frames=2, size=32, seed=1, shape=a["shape"])
    assert cli(["import", "imavatar", str(tmp_path / "im"), "--flame-dir", str(d), "-o", str(tmp_path / "im_subject"),
                "--train", "A", "--test", "B"]) == 0
    # errors: a missing FLAME folder and a missing dataset are one line each, exit 2
    capsys.readouterr()
    assert cli(["import", "imavatar", str(tmp_path / "im"), "--flame-dir", str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err
    assert cli(["import", "flashavatar", str(tmp_path / "nope"), "--tracker-dir", str(tmp_path), "--flame-dir", str(d), "-o", str(tmp_path / "y")]) == 2
