"""The procedural head model and its procedural textures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headavatar.headmodels import available_head_models, load_head_model
from headavatar.headmodels.procedural import EXPRESSION_NAMES, SHAPE_NAMES, build_procedural_head
from headavatar.headmodels.procedural_texture import procedural_textures, rasterize_triangles, rasterize_uv


@pytest.fixture(scope="module")
def model():
    return build_procedural_head()


def _pose(model, expr=None, rots=None, shape=None):
    e = torch.zeros(1, model.num_expression)
    for k, v in (expr or {}).items():
        e[0, model.expression_names.index(k)] = v
    r = torch.zeros(1, model.num_joints, 3)
    for k, v in (rots or {}).items():
        r[0, model.joint_index(k)] = torch.tensor(v)
    return model(shape=shape, expression=e, joint_rotations=r)[0]


def _part(model, name):
    a, b = model.meta["parts"][name]
    return np.arange(a, b)


def test_registry_validate_and_size(model):
    assert "procedural" in available_head_models()
    m2 = load_head_model()  # the embedded default
    assert m2.name == "procedural" and m2.fingerprint() == model.fingerprint()
    model.validate()
    assert 4000 <= model.num_vertices <= 10000
    assert model.joint_names == ["root", "neck", "jaw", "eye_left", "eye_right"]
    assert model.parents == [-1, 0, 1, 1, 1]
    assert model.condition_joints == ["jaw", "eye_left", "eye_right"]
    assert model.num_shape == len(SHAPE_NAMES) == 10
    assert model.expression_names == EXPRESSION_NAMES and model.num_expression >= 12
    assert set(model.face_labels.unique().tolist()) == {1, 2, 3, 4, 5, 6, 7}


def test_deterministic_and_coarse(model):
    a, b = model, build_procedural_head()
    for k in ("template", "faces", "uvs", "uv_faces", "shape_basis", "expr_basis", "joint_regressor", "skin_weights", "landmark_faces", "landmark_bary",
              "face_labels"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    for k in a.regions:
        assert np.array_equal(a.regions[k], b.regions[k])
    c = build_procedural_head(resolution=0.5)
    c.validate()
    assert c.num_vertices < a.num_vertices / 2.5


def test_rest_pose_and_identity_skinning(model):
    v = model(shape=torch.zeros(1, model.num_shape), expression=torch.zeros(1, model.num_expression), joint_rotations=torch.zeros(1, 5, 3))
    assert torch.allclose(v[0], model.template, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    shape = torch.randn(1, model.num_shape, generator=g)
    expr = torch.rand(1, model.num_expression, generator=g)
    posed = model(shape=shape, expression=expr, joint_rotations=torch.zeros(1, 5, 3))
    assert torch.allclose(posed, model.shaped(shape, expr), atol=1e-6)


def test_weights_and_regressor(model):
    W = model.skin_weights
    assert (W >= 0).all() and torch.allclose(W.sum(1), torch.ones(model.num_vertices), atol=1e-5)
    assert torch.allclose(model.joint_regressor.sum(1), torch.ones(5), atol=1e-5)
    J = model.joint_regressor @ model.template
    eye = model.meta["eye_centers"]
    assert torch.allclose(J[3], torch.tensor(eye["left"]), atol=1e-5) and torch.allclose(J[4], torch.tensor(eye["right"]), atol=1e-5)
    assert J[:3, 0].abs().max() < 1e-6  # root, neck, jaw on the sagittal plane
    # joints are regressed from the mesh with expressions: no expression may move them
    assert torch.einsum("jv,vce->jce", model.joint_regressor, model.expr_basis).abs().max() < 1e-6
    lm = model.landmarks(model.template[None])[0]
    # jaw pivot: behind the face and above the mouth, below the eyes
    assert J[2, 2] < lm[48:68, 2].min() - 0.05 and lm[48:68, 1].mean() < J[2, 1] < J[3, 1]
    assert J[0, 1] < J[2, 1] and J[1, 1] < J[0, 1]  # root above the neck joint, both below the jaw pivot
    eyes = model.regions["eyes"]
    assert (W[eyes][:, 3:].max(1).values == 1).all()


def test_regions(model):
    R = model.regions
    for name in ("face", "mouth_interior", "lips", "eyes", "hair", "neck", "boundary", "brows", "teeth", "eyelids", "nose"):
        assert len(R[name]) > 0, name
    T = model.template
    slit = np.concatenate([model.meta["slit_upper"], model.meta["mouth_corners"]])
    order = np.argsort(T[slit, 0].numpy())
    line_x, line_z = T[slit, 0].numpy()[order], T[slit, 2].numpy()[order]
    mi = T[R["mouth_interior"]].numpy()
    assert (mi[:, 2] < np.interp(mi[:, 0], line_x, line_z) - 0.002).all()  # behind the lip line
    eyes = np.concatenate([_part(model, "eyeball_left"), _part(model, "eyeball_right")])
    assert np.array_equal(np.sort(R["eyes"]), np.sort(eyes))
    for side in ("left", "right"):
        d = (T[_part(model, f"eyeball_{side}")] - torch.tensor(model.meta["eye_centers"][side])).norm(dim=1)
        assert torch.allclose(d, torch.full_like(d, model.meta["eye_radius"]), atol=1e-6)
    head = _part(model, "head")
    yb = T[R["boundary"], 1]
    assert yb.max() - yb.min() < 1e-6 and abs(yb.max() - T[head, 1].min()) < 1e-6  # the lowest rim
    assert T[R["hair"], 1].mean() > T[R["face"], 1].mean() > T[R["neck"], 1].mean()


def test_mesh_quality(model):
    T = model.template.numpy()
    F = model.faces.numpy()
    p = T[F]
    n = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    area = 0.5 * np.linalg.norm(n, axis=1)
    assert area.min() > 1e-10  # no degenerate faces
    part = np.asarray(model.meta["face_part"])
    names = model.meta["part_names"]
    head = part == names.index("head")
    out = ((p.mean(1) - [0, 0.0, -0.005]) * n).sum(1) > 0
    assert out[head].mean() > 0.97  # outward winding (the nose underside and ears are not star-shaped)
    for side in ("left", "right"):
        sel = part == names.index(f"eyeball_{side}")
        c = np.array(model.meta["eye_centers"][side])
        assert (((p[sel].mean(1) - c) * n[sel]).sum(1) > 0).all()
    # edges shared by at most two faces with opposite directions: consistent orientation
    e = np.concatenate([F[:, [0, 1]], F[:, [1, 2]], F[:, [2, 0]]])
    _, counts = np.unique(e, axis=0, return_counts=True)
    assert counts.max() == 1


def test_uv_layout(model):
    uv = model.uvs.numpy()
    assert uv.min() >= 0 and uv.max() <= 1
    _, _, count = rasterize_uv(uv, model.uv_faces.numpy(), 64, strict=True)
    assert count.max() == 1  # no texel centre inside two faces: charts do not overlap
    face, _, _ = rasterize_uv(uv, model.uv_faces.numpy(), 128)
    bnd = np.zeros(model.num_vertices, bool)
    bnd[model.regions["boundary"]] = True
    keep = ~bnd[model.faces.numpy()].any(1)
    n = int((keep[face[face >= 0]]).sum())
    assert 8000 <= n <= 14000, n


def test_blink_closes_eyelid(model):
    for name, side in (("blink_L", "left"), ("blink_R", "right")):
        c = np.array(model.meta["eye_centers"][side])
        for w, covered in ((0.0, False), (1.0, True)):
            V = _pose(model, {name: w}).numpy()
            # orthographic front view around the eye: which part is seen at the eye centre?
            s = 4000.0
            xy = np.stack([(V[:, 0] - c[0]) * s + 32, -(V[:, 1] - c[1]) * s + 32], -1)
            F = model.faces.numpy()
            face, _, _ = rasterize_triangles(xy[F], 64, 64, depth=-V[F][..., 2])
            part = model.meta["part_names"][model.meta["face_part"][face[32, 32]]]
            assert part == (f"lid_upper_{side}" if covered else f"eyeball_{side}"), (name, w, part)
        lid = _part(model, f"lid_upper_{side}")
        d = (torch.as_tensor(_pose(model, {name: 1.0}).numpy()[lid]) - torch.tensor(c)).norm(dim=1)
        assert d.min() > model.meta["eye_radius"]  # the closed lid stays outside the eyeball
    other = _pose(model, {"blink_L": 1.0})[_part(model, "lid_upper_right")]
    assert torch.equal(other, model.template[_part(model, "lid_upper_right")])


def test_jaw_and_eye_rotation(model):
    rest = _pose(model)
    V = _pose(model, rots={"jaw": [0.25, 0.0, 0.0]})
    d = (V - rest).norm(dim=1)
    lm0 = model.landmarks(rest[None])[0]
    lm1 = model.landmarks(V[None])[0]
    assert (lm1[8] - lm0[8]).norm() > 0.01 and lm1[8, 1] < lm0[8, 1]  # the chin drops
    assert (lm1[66, 1] - lm1[62, 1]) < -0.01  # the lips part
    assert d[_part(model, "teeth_lower")].min() > 0.005 and d[_part(model, "teeth_upper")].max() < 1e-7
    assert d[rest[:, 1] > 0.06].max() < 1e-7  # forehead and skull stay
    V = _pose(model, rots={"eye_left": [0.2, 0.3, 0.0]})
    moved = np.nonzero(((V - _pose(model)).norm(dim=1) > 1e-7).numpy())[0]
    assert set(moved) == set(_part(model, "eyeball_left"))


def test_bases_are_plausible(model):
    sb = model.shape_basis.norm(dim=1).amax(0)  # per mode, metres per unit coefficient
    assert (sb > 0.001).all() and (sb < 0.02).all(), sb
    eb = model.expr_basis.norm(dim=1).amax(0)
    assert (eb > 0.002).all() and (eb < 0.03).all(), eb
    # expressions are local: the back of the head never moves
    back = model.template[:, 2] < -0.05
    assert model.expr_basis[back].abs().max() == 0
    # eyes stay round under every identity mode (rigid translation)
    for side in ("left", "right"):
        d = model.shape_basis[_part(model, f"eyeball_{side}")]
        assert torch.allclose(d, d[:1].expand_as(d), atol=1e-7)


def test_landmarks(model):
    lm = model.landmarks(model.template[None])[0]
    assert lm[30, 2] == lm[:, 2].max()  # the nose tip is the front-most landmark
    assert lm[36:48, 1].mean() > lm[27:36, 1].mean() > lm[48:68, 1].mean() > lm[8, 1]
    assert lm[17:27, 1].min() > lm[36:48, 1].max()  # brows above the eyes
    assert lm[8, 1] == lm[:17, 1].min()
    # left/right symmetry of the iBUG pairs (subject's right = -x comes first)
    for a, b in ((0, 16), (17, 26), (36, 45), (39, 42), (48, 54), (31, 35), (60, 64)):
        assert lm[a, 0] < 0 < lm[b, 0] and abs(lm[a, 0] + lm[b, 0]) < 1e-4 and abs(lm[a, 1] - lm[b, 1]) < 1e-4
    slit_lo = set(model.meta["slit_lower"].tolist())
    assert any(int(v) in slit_lo for v in model.faces[model.landmark_faces[66]])  # inner lower lip on the lower row


def test_textures(model):
    t0 = procedural_textures(model, size=128, seed=0)
    t1 = procedural_textures(model, size=128, seed=0)
    t2 = procedural_textures(model, size=128, seed=1)
    assert t0["albedo"].shape == (128, 128, 3) and t0["roughness"].shape == (128, 128, 1) and t0["specular"].shape == (128, 128, 1)
    for k in t0:
        assert t0[k].dtype == np.float32 and np.array_equal(t0[k], t1[k])
        assert 0 <= t0[k].min() and t0[k].max() <= 1
    assert not np.array_equal(t0["albedo"], t2["albedo"])
    # eyes: white sclera and a dark pupil at the eyeball chart's centre
    cu, cv, r = model.meta["uv_charts"]["eyes"]["left"]
    col = lambda u, v: t0["albedo"][int((1 - v) * 128), int(u * 128)]  # noqa: E731
    assert col(cu, cv).max() < 0.05 and col(cu + 0.8 * r, cv).min() > 0.4
