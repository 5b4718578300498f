"""Camera convention, rotations, configs, the subject format and its error paths."""

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from headavatar.camera import Cameras, intrinsics, look_at, opencv_K_to_internal, opengl_c2w_to_w2c
from headavatar.config import apply_overrides, from_dict, to_dict
from headavatar.errors import UserError
from headavatar.subjects.format import Subject, SubjectWriter, Tracking, default_split
from headavatar.utils import rotations as rot


# ---------------------------------------------------------------- camera
def test_projection_matches_hand_computation():
    R, t = look_at(torch.tensor([0.0, 0.0, 1.0]), torch.zeros(3))
    cam = Cameras(intrinsics(500, 400, 256, 200), R, t, 400, 512)
    p = torch.tensor([[[0.05, 0.1, 0.2]]])
    # camera at z=1 looking at -z: x_cam = x, y_cam = -y, depth = 1 - z
    u = 500 * 0.05 / 0.8 + 256
    v = 400 * (-0.1) / 0.8 + 200
    assert torch.allclose(cam.project(p)[0, 0], torch.tensor([u, v]), atol=1e-4)
    assert torch.allclose(cam.centers[0], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)


def test_clip_space_agrees_with_pixels():
    R, t = look_at(torch.tensor([0.3, 0.1, 0.9]), torch.zeros(3))
    cam = Cameras(intrinsics(300, 310, 70, 52), R, t, 100, 128)
    x = torch.randn(1, 20, 3) * 0.1
    clip = cam.to_clip(x, near=0.1, far=10)
    ndc = clip[..., :2] / clip[..., 3:]
    uv = cam.project(x)
    assert torch.allclose((ndc[..., 0] + 1) * 64, uv[..., 0], atol=1e-3)
    assert torch.allclose((ndc[..., 1] + 1) * 50, uv[..., 1], atol=1e-3)
    z = clip[..., 2] / clip[..., 3]
    assert (z > -1).all() and (z < 1).all()


def test_resized_cameras_scale_pixels():
    R, t = look_at(torch.tensor([0.0, 0.0, 1.0]), torch.zeros(3))
    cam = Cameras(intrinsics(500, 500, 256, 256), R, t, 512, 512)
    x = torch.randn(1, 5, 3) * 0.05
    assert torch.allclose(cam.resized(128, 128).project(x), cam.project(x) / 4, atol=1e-4)


def test_opengl_conversion_roundtrip():
    R, t = look_at(torch.tensor([0.2, -0.3, 1.1]), torch.tensor([0.0, 0.05, 0.0]))
    # build the OpenGL camera-to-world of the same camera and convert back
    Rc2w_cv = R[0].T
    c = -(Rc2w_cv @ t[0])
    c2w = torch.eye(4)
    c2w[:3, :3] = Rc2w_cv @ torch.diag(torch.tensor([1.0, -1.0, -1.0]))
    c2w[:3, 3] = c
    R2, t2 = opengl_c2w_to_w2c(c2w)
    assert torch.allclose(R2, R[0], atol=1e-5) and torch.allclose(t2, t[0], atol=1e-5)
    K = opencv_K_to_internal(intrinsics(100, 100, 63.5, 63.5))
    assert K[0, 2] == 64 and K[1, 2] == 64


# ------------------------------------------------------------- rotations
def test_rotation_roundtrips():
    g = torch.Generator().manual_seed(0)
    aa = torch.randn(64, 3, generator=g) * 1.2
    R = rot.axis_angle_to_matrix(aa)
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3).expand(64, 3, 3), atol=1e-5)
    assert torch.allclose(rot.axis_angle_to_matrix(rot.matrix_to_axis_angle(R)), R, atol=1e-5)
    assert torch.allclose(rot.quaternion_to_matrix(rot.matrix_to_quaternion(R)), R, atol=1e-5)
    assert torch.allclose(rot.rotation_6d_to_matrix(rot.matrix_to_6d(R)), R, atol=1e-5)
    # tiny angles stay finite and accurate
    small = torch.full((1, 3), 1e-7)
    assert torch.allclose(rot.axis_angle_to_matrix(small), torch.eye(3)[None], atol=1e-6)
    # Hamilton product composes rotations like matrices
    q1, q2 = rot.matrix_to_quaternion(R[:32]), rot.matrix_to_quaternion(R[32:])
    assert torch.allclose(rot.quaternion_to_matrix(rot.quaternion_multiply(q1, q2)), R[:32] @ R[32:], atol=1e-5)


def test_axis_angle_gradient_finite_at_zero():
    aa = torch.zeros(2, 3, requires_grad=True)
    rot.axis_angle_to_matrix(aa).sum().backward()
    assert torch.isfinite(aa.grad).all()


# ---------------------------------------------------------------- config
@dataclass
class _Inner:
    a: float = 1.0


@dataclass
class _Cfg:
    n: int = 3
    name: str = "x"
    opt: int | None = None
    flag: bool = False
    bg: list[float] = field(default_factory=lambda: [0.0, 1.0, 0.0])
    inner: _Inner = field(default_factory=_Inner)


def test_config_overrides_and_roundtrip():
    c = apply_overrides(_Cfg(), ["n=15e3", "opt=none", "flag=yes", "bg=1,1,1", "inner.a=0.5"])
    assert c.n == 15000 and c.opt is None and c.flag is True and c.bg == [1.0, 1.0, 1.0] and c.inner.a == 0.5
    assert from_dict(_Cfg, to_dict(c)) == c
    with pytest.raises(UserError, match="unknown option"):
        apply_overrides(_Cfg(), ["nope=1"])
    with pytest.raises(UserError, match="not a valid int"):
        apply_overrides(_Cfg(), ["n=1.5"])
    with pytest.raises(UserError, match="unknown option"):
        from_dict(_Cfg, {"n": 1, "zzz": 2})


# ---------------------------------------------------------------- format
def _tracking(n, J=5, E=4):
    rng = np.random.default_rng(0)
    R, t = look_at(torch.tensor([0.0, 0.0, 1.0]), torch.zeros(3))
    return Tracking(
        shape=rng.normal(size=6).astype(np.float32),
        expression=rng.uniform(size=(n, E)).astype(np.float32),
        joint_rotations=(rng.normal(size=(n, J, 3)) * 0.1).astype(np.float32),
        translation=np.zeros((n, 3), np.float32),
        K=np.repeat(intrinsics(50, 50, 16, 16).numpy()[None], n, 0),
        R=np.repeat(R.numpy(), n, 0),
        t=np.repeat(t.numpy(), n, 0),
        extras={"eyelids": np.zeros((n, 2), np.float32)},
    )


def _write_subject(root, n=5, size=32):
    w = SubjectWriter(root)
    rng = np.random.default_rng(1)
    for i in range(n):
        w.write_frame(i, rng.integers(0, 255, (size, size, 3), dtype=np.uint8), np.full((size, size), 255, np.uint8), np.ones((size, size), np.uint8))
    return w.finalize(_tracking(n), {"name": "procedural"}, (size, size))


def test_subject_roundtrip(tmp_path):
    s = _write_subject(tmp_path / "s")
    s2 = Subject.open(tmp_path / "s")
    assert s2.num_frames == 5 and (s2.height, s2.width) == (32, 32)
    np.testing.assert_array_equal(s2.tracking.expression, s.tracking.expression)
    np.testing.assert_array_equal(s2.tracking.extras["eyelids"], np.zeros((5, 2)))
    f = s2.load_frame(3)
    assert f["image"].dtype == np.uint8 and f["image"].shape == (32, 32, 3)
    assert f["alpha"].shape == (32, 32) and f["parsing"].max() == 1
    assert s2.split["train"] and s2.split["test"] and not set(s2.split["train"]) & set(s2.split["test"])
    cams = s2.tracking.cameras([0, 1], 32, 32)
    assert cams.K.shape == (2, 3, 3)


def test_subject_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Subject.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        Subject.open(tmp_path / "empty")
    _write_subject(tmp_path / "s")
    with pytest.raises(UserError, match="already holds a subject"):
        SubjectWriter(tmp_path / "s")
    # a truncated frame: clear error naming the file, at load time
    p = tmp_path / "s" / "frames" / "000002.png"
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(UserError, match="000002.png.*corrupt or truncated"):
        Subject.open(tmp_path / "s").load_frame(2)
    # a missing frame: caught at open
    p.unlink()
    with pytest.raises(UserError, match="missing"):
        Subject.open(tmp_path / "s")


def test_tracking_shape_errors(tmp_path):
    s = _write_subject(tmp_path / "s")
    tr = s.tracking
    fields = ("shape", "expression", "joint_rotations", "translation", "K", "R", "t")
    bad = Tracking(**{**{k: getattr(tr, k) for k in fields}, "translation": np.zeros((4, 3), np.float32)})
    with pytest.raises(UserError, match="translation"):
        bad.check()
    bad.translation = np.zeros((5, 3), np.float32)
    bad.check()
    with pytest.raises(UserError, match="joint_rotations"):
        bad.check(num_joints=3)
    bad.expression = bad.expression.copy()
    bad.expression[0, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        bad.check()
    # frame-count mismatch between subject.json and tracking.npz
    _tracking(3).save(tmp_path / "s" / "tracking.npz")
    with pytest.raises(UserError, match="out of step"):
        Subject.open(tmp_path / "s")


def test_default_split():
    sp = default_split(20, 0.15)
    assert sp["test"] == [17, 18, 19] and sp["train"] == list(range(17))
    valid = np.ones(20, bool)
    valid[[3, 18]] = False
    sp = default_split(20, 0.15, valid=valid)
    assert 3 not in sp["train"] and 18 not in sp["test"]
    with pytest.raises(UserError):
        default_split(1)
