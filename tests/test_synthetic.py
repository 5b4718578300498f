"""The synthetic demo subject: format, determinism, exact tracking, labels, matte, lighting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headavatar.errors import UserError
from headavatar.headmodels.procedural_texture import procedural_textures
from headavatar.subjects.format import LABEL_IDS, Subject
from headavatar.subjects.synthetic import (
    FunctionLighting,
    SHLighting,
    StudioLighting,
    make_synthetic_animation,
    make_synthetic_subject,
    render_synthetic_frames,
    sh9_basis,
)

TINY = dict(num_frames=6, resolution=48, progress=False, texture_size=128)


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return make_synthetic_subject(tmp_path_factory.mktemp("syn") / "a", seed=0, **TINY)


def _frames(s: Subject):
    return [s.load_frame(i) for i in range(s.num_frames)]


def test_writes_native_format(subject):
    s = Subject.open(subject.root)
    assert s.num_frames == 6 and (s.height, s.width) == (48, 48)
    assert s.split["test"] == [5] and s.split["train"] == [0, 1, 2, 3, 4]
    model = s.head_model()  # rebuilds the procedural model and checks the fingerprint
    assert s.head_model_spec["name"] == "procedural" and s.head_model_spec["fingerprint"] == model.fingerprint()
    for f in _frames(s):
        assert f["image"].shape == (48, 48, 3) and f["image"].dtype == np.uint8
        assert f["alpha"].shape == (48, 48) and f["alpha"].dtype == np.uint8
        assert f["parsing"].shape == (48, 48) and f["parsing"].dtype == np.uint8
    tr = s.tracking
    assert np.allclose(tr.K[:, 0, 2], 24) and np.allclose(tr.K[:, 1, 2], 24)
    assert np.array_equal(tr.R, np.repeat(tr.R[:1], 6, 0))  # one fixed camera
    assert s.meta["synthetic"]["seed"] == 0


def test_matte_and_labels(subject):
    frames = _frames(subject)
    for f in frames:
        a = f["alpha"]
        assert a[0, 0] == a[0, -1] == a[-1, 0] == a[-1, -1] == 0
        assert a[24, 24] == 255  # the face is at the image centre
        bg = a == 0
        assert np.all(f["parsing"][bg] == 0) and np.all(f["image"][bg] == 128)  # mid-grey backdrop
        assert np.all(f["parsing"][a == 255] > 0)
        assert 0 < ((a > 0) & (a < 255)).sum() < 0.2 * a.size  # antialiased edge only
    present = set(np.unique(np.concatenate([f["parsing"].ravel() for f in frames])).tolist())
    assert {LABEL_IDS[k] for k in ("skin", "hair", "lips", "eyes", "neck")} <= present


def test_deterministic_by_seed(subject, tmp_path):
    again = make_synthetic_subject(tmp_path / "b", seed=0, **TINY)
    other = make_synthetic_subject(tmp_path / "c", seed=1, **{**TINY, "num_frames": 2})
    for i in range(6):
        f0, f1 = subject.load_frame(i), again.load_frame(i)
        for k in ("image", "alpha", "parsing"):
            assert np.array_equal(f0[k], f1[k]), (i, k)
    assert not np.array_equal(subject.load_frame(0)["image"], other.load_frame(0)["image"])
    assert np.array_equal(subject.tracking.expression, again.tracking.expression)
    with pytest.raises(UserError):
        make_synthetic_subject(tmp_path / "b", seed=0, **TINY)  # exists, no overwrite


def test_tracking_reproduces_render(subject):
    model = subject.head_model()
    tex = procedural_textures(model, size=128, seed=0)
    k = 3
    tr = subject.tracking.subset([k])
    rgb, alpha, pars = render_synthetic_frames(model, tex, tr, tr.cameras([0], 48, 48), "head", None, subject.meta["synthetic"]["supersample"])
    f = subject.load_frame(k)
    assert np.array_equal(rgb[0], f["image"]) and np.array_equal(alpha[0], f["alpha"]) and np.array_equal(pars[0], f["parsing"])
    rgb2, _, _ = render_synthetic_frames(model, tex, tr)  # cameras from the tracking, defaults as written
    assert np.array_equal(rgb2[0], f["image"])


def test_bad_input(tmp_path):
    with pytest.raises(UserError):
        make_synthetic_subject(tmp_path / "x", num_frames=6, resolution=16, progress=False)
    with pytest.raises(UserError):
        make_synthetic_subject(tmp_path / "y", num_frames=1, resolution=48, progress=False)
    with pytest.raises(UserError):
        make_synthetic_subject(tmp_path / "z", num_frames=6, resolution=48, progress=False, lighting="moon")


def test_animation_ranges(subject):
    model = subject.head_model()
    a = make_synthetic_animation(model, 250, fps=25, seed=3)
    E = a["expression"]
    assert E.shape == (250, model.num_expression) and E.min() >= 0 and E.max() <= 1
    names = model.expression_names
    blink = E[:, names.index("blink_L")]
    assert blink.max() == 1 and (blink > 0).mean() < 0.25  # short blink events that shut the eye
    assert np.median(E[:, [k for k, n in enumerate(names) if not n.startswith("blink")]].sum(1)) > 0.3
    yaw = np.degrees(a["joint_rotations"][:, 0, 1])
    assert 20 < np.abs(yaw).max() <= 31 and yaw.min() < -5 and yaw.max() > 5
    jaw = a["joint_rotations"][:, model.joint_index("jaw"), 0]
    assert jaw.max() > 0.1 and (jaw < 0.01).mean() > 0.2  # talking with pauses
    gaze = np.degrees(np.abs(a["joint_rotations"][:, 3]).max())
    assert 3 < gaze <= 19
    # smooth: no jumps between consecutive frames apart from blinks and saccades
    assert np.degrees(np.abs(np.diff(a["joint_rotations"][:, 0], axis=0)).max()) < 3
    # held-out frames (last 15%) are new frames inside the trained range
    n_test = int(round(250 * 0.15))
    tr, te = a["joint_rotations"][:-n_test, 0], a["joint_rotations"][-n_test:, 0]
    assert (np.abs(te) <= np.abs(tr).max(0) + 1e-6).all()
    assert not any(np.allclose(E[-n_test + i], E[j]) and np.allclose(te[i], tr[j]) for i in range(n_test) for j in range(len(tr)))


def test_lighting_objects(subject):
    model = subject.head_model()
    tex = procedural_textures(model, size=128, seed=0)
    tr = subject.tracking.subset([0])
    cams = tr.cameras([0], 48, 48)
    # unit white diffuse light, no specular: the render is the sRGB albedo
    flat = FunctionLighting(lambda n: torch.ones(n.shape[:-1] + (3,)), frame="world")
    rgb, alpha, _ = render_synthetic_frames(model, tex, tr, cams, flat, None, 1)
    a = tex["albedo"].reshape(-1, 3)
    srgb = np.where(a <= 0.0031308, 12.92 * a, 1.055 * np.clip(a, 0, 1) ** (1 / 2.4) - 0.055)
    inside = rgb[0][alpha[0] == 255] / 255.0
    assert inside.min() >= srgb.min() - 0.01 and inside.max() <= srgb.max() + 0.01
    # SH: a constant environment of radiance L gives diffuse shading L everywhere
    c = torch.zeros(9, 3)
    c[0] = 0.7 / 0.282095
    sh = SHLighting(c, frame="world", specular_scale=0.0)
    n = torch.nn.functional.normalize(torch.randn(50, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert torch.allclose(sh.diffuse(n), torch.full((50, 3), 0.7), atol=1e-5)
    assert sh9_basis(n).shape == (50, 9)
    # head-frame lights turn with the head: a surface point keeps its colour as the head turns;
    # world-frame lights do not
    p = tr.params([0])
    diffs = {}
    for frame in ("head", "world"):
        cols = []
        for yaw in (-0.45, 0.45):
            q = p.replace(extras={}).clone()
            q.joint_rotations[0, 0] = torch.tensor([0.0, yaw, 0.0])
            img = render_synthetic_frames(model, tex, q, cams.resized(96, 96), StudioLighting(frame=frame, specular_scale=0.0), None, 1)[0][0]
            verts = model(q)
            uv = cams.resized(96, 96).project(model.landmarks(verts)[:, [29, 2, 14]])[0]  # nose, both cheeks
            cols.append(np.stack([img[int(v), int(u)] for u, v in uv.tolist()]).astype(float))
        diffs[frame] = np.abs(cols[0] - cols[1]).mean()
    assert diffs["head"] < 0.5 * diffs["world"], diffs
