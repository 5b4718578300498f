"""FLAME from the user's files: chumpy-free loading, sizes, LBS, eyelids, mouth faces, bad input.

The FLAME-format files are built by tests/fixtures_flame.py with made-up numbers.
"""

import dataclasses
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from fixtures_flame import (
    F_FLAME,
    V_FLAME,
    make_fake_flame,
    reference_flame,
    reference_landmarks,
    shared_flame_dir,
    write_generic_model,
    write_landmark_embedding,
    write_obj,
)
from headavatar.errors import UserError
from headavatar.headmodels import load_head_model
from headavatar.headmodels.flame import boundary_loops, build_flame_head, flame_spec, require_landmarks
from headavatar.headmodels.flame_pickle import ForeignPickleError, load_pickle
from headavatar.utils.rotations import axis_angle_to_6d, axis_angle_to_matrix, matrix_to_6d, matrix_to_axis_angle, rotation_6d_to_matrix


@pytest.fixture(scope="module")
def flame(tmp_path_factory):
    d, fake = shared_flame_dir(tmp_path_factory, template="both")
    return d, fake


@pytest.fixture(scope="module")
def model(flame):
    d, _ = flame
    return build_flame_head(d)  # FlameMesh.obj is preferred when both templates are there


def _t(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


# ------------------------------------------------------------------ loading
def test_pickle_looks_like_flame_2020(flame):
    d, _ = flame
    blob = (d / "generic_model.pkl").read_bytes()
    # what a Python 2 pickle of FLAME references, and no chumpy importable while loading
    assert b"chumpy.ch" in blob and b"numpy.core.multiarray" in blob and b"scipy.sparse.csc" in blob
    assert "chumpy" not in sys.modules


def test_loads_with_flame_sizes(model, flame):
    _, fake = flame
    model.validate()
    assert model.template.shape == (V_FLAME, 3)
    assert model.faces.shape == (F_FLAME + 30, 3)  # FlameMesh.obj's mouth faces are kept
    assert model.uv_faces.shape == model.faces.shape
    assert model.shape_basis.shape == (V_FLAME, 3, 300) and model.expr_basis.shape == (V_FLAME, 3, 100)
    assert model.pose_basis.shape == (36, V_FLAME * 3)
    assert model.post_basis["eyelids"].shape == (V_FLAME, 3, 2)
    assert model.joint_names == ["global", "neck", "jaw", "eye_left", "eye_right"]
    assert model.parents == [-1, 0, 1, 1, 1]
    assert model.condition_dim == 120  # exp 100 + jaw 6 + eyes 12 + eyelids 2, as FlashAvatar
    # the chumpy arrays and the sparse regressor came through exactly (float32)
    assert np.allclose(model.template.numpy(), fake["v_template"], atol=1e-6)
    assert np.allclose(model.expr_basis.numpy(), fake["shapedirs"][:, :, 300:], atol=1e-7)
    assert np.allclose(model.joint_regressor.numpy(), fake["J_regressor"], atol=1e-7)
    assert model.meta["has_landmarks"] and model.meta["mouth_faces"] == {"count": 30, "source": "template"}
    # regions: required ones, the mouth ring as the interior, eyes from the eyeballs
    assert set(model.regions["mouth_interior"]) == set(fake["mouth_loop"])
    assert set(model.regions["eyes"]) == set(np.concatenate(fake["eye_verts"]))
    assert np.array_equal(model.regions["boundary"], np.sort(fake["masks"]["boundary"]))
    assert (model.face_labels[F_FLAME:] == 5).all() and (model.face_labels[:F_FLAME] != 5).all()


def test_truncation_and_scale(flame, model):
    d, _ = flame
    m = build_flame_head(d, n_shape=100, n_expr=50, scale=4.0, eyelids=False)
    assert m.num_shape == 100 and m.num_expression == 50 and "eyelids" not in m.post_basis
    assert m.condition_dim == 50 + 18
    rng = np.random.default_rng(0)
    s, e, p = _t(rng.normal(0, 1, (1, 100))), _t(rng.normal(0, 1, (1, 50))), _t(rng.normal(0, 0.2, (1, 5, 3)))
    v4 = m(shape=s, expression=e, joint_rotations=p)
    v1 = model(shape=s, expression=e, joint_rotations=p)
    assert torch.allclose(v4, 4 * v1, atol=1e-5)


def test_forward_matches_published_flame(model, flame):
    _, fake = flame
    rng = np.random.default_rng(1)
    shape, pose, lids = rng.normal(0, 1, 300), rng.normal(0, 0.25, (5, 3)), np.array([0.4, 0.9])
    ref = reference_flame(fake, shape, np.zeros(100), pose, eyelids=lids)
    v = model(shape=_t(shape)[None], expression=torch.zeros(1, 100), joint_rotations=_t(pose)[None], extras={"eyelids": _t(lids)[None]})[0]
    assert np.abs(v.numpy() - ref).max() < 1e-6
    lm = model.landmarks(v[None])[0].numpy()
    assert np.abs(lm - reference_landmarks(fake, ref)).max() < 1e-6


def test_eyelid_order(model, flame):
    _, fake = flame
    base = model(expression=torch.zeros(1, 100), extras={"eyelids": torch.zeros(1, 2)})[0]
    left = model(expression=torch.zeros(1, 100), extras={"eyelids": torch.tensor([[1.0, 0.0]])})[0]
    moved = (left - base).norm(dim=-1) > 0
    # e[0] drives l_eyelid: vertices near the subject's left eye (+x)
    assert moved.any() and (model.template[moved, 0] > 0).all()
    assert torch.allclose(left - base, _t(fake["l_eyelid"]), atol=1e-7)


def test_lbs_invariants(model):
    rng = np.random.default_rng(2)
    shape = _t(rng.normal(0, 1, (1, 300)))
    rest, J = model(shape=shape, return_joints=True)
    assert torch.allclose(rest, model.shaped(shape), atol=1e-7)
    # a global rotation alone is rigid about the root joint
    aa = torch.zeros(1, 5, 3)
    aa[0, 0] = torch.tensor([0.3, -0.5, 0.2])
    v = model(shape=shape, joint_rotations=aa)
    R = axis_angle_to_matrix(aa[0, 0])
    expect = (rest[0] - J[0, 0]) @ R.T + J[0, 0]
    assert torch.allclose(v[0], expect, atol=1e-5)
    # without the pose correctives (which move every vertex a little), the left eye
    # turns its eyeball about its own centre and nothing else, and the jaw leaves the scalp
    rigid = dataclasses.replace(model, pose_basis=None)
    aa = torch.zeros(1, 5, 3)
    aa[0, 3] = torch.tensor([0.0, 0.4, 0.0])
    v = rigid(shape=shape, joint_rotations=aa)
    moved = set(torch.nonzero((v[0] - rest[0]).norm(dim=-1) > 1e-7).flatten().tolist())
    eye_l = torch.as_tensor(model.regions["left_eyeball"])
    assert moved and moved <= set(eye_l.tolist())
    d0 = (rest[0, eye_l] - J[0, 3]).norm(dim=-1)
    d1 = (v[0, eye_l] - J[0, 3]).norm(dim=-1)
    assert torch.allclose(d0, d1, atol=1e-6)
    aa = torch.zeros(1, 5, 3)
    aa[0, 2, 0] = 0.3
    v = rigid(shape=shape, joint_rotations=aa)
    scalp = torch.as_tensor(model.regions["scalp"])
    assert (v[0, scalp] - rest[0, scalp]).abs().max() < 1e-7
    jaw = model.skin_weights[:, 2] > 0.5
    assert (v[0, jaw] - rest[0, jaw]).norm(dim=-1).mean() > 1e-3
    # with them, a pose moves vertices by FLAME's corrective offsets (R_j - I) @ posedirs
    vc = model(shape=shape, joint_rotations=aa)
    feat = (axis_angle_to_matrix(aa[0, 1:]) - torch.eye(3)).reshape(1, -1)
    corr = (feat @ model.pose_basis).reshape(-1, 3)
    assert torch.allclose((vc - v)[0, scalp], corr[scalp], atol=1e-6)


def test_6d_layout_and_axis_angle_agree():
    # metrical-tracker / PyTorch3D 6D = the first two rows of the matrix
    c, s = np.cos(0.3), np.sin(0.3)
    Rz = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(matrix_to_6d(Rz), torch.tensor([c, -s, 0, s, c, 0], dtype=torch.float64))
    aa = torch.tensor([[0.2, -0.1, 0.4], [1e-9, 0.0, 0.0], [2.5, 0.3, -0.7]], dtype=torch.float64)
    d6 = axis_angle_to_6d(aa)
    assert torch.allclose(matrix_to_axis_angle(rotation_6d_to_matrix(d6)), aa, atol=1e-7)
    # a tracker's free 6D parameters need not be orthonormal: Gram-Schmidt gives the rotation
    raw = d6 * torch.tensor([1.07, 1.07, 1.07, 0.95, 0.95, 0.95], dtype=torch.float64)
    assert torch.allclose(rotation_6d_to_matrix(raw), axis_angle_to_matrix(aa), atol=1e-7)


def test_condition_vector_layout(model):
    expr = torch.randn(2, 100)
    aa = torch.zeros(2, 5, 3)
    aa[:, 2, 0] = 0.2
    lids = torch.rand(2, 2)
    c = model.condition(expr, aa, {"eyelids": lids})
    assert c.shape == (2, 120)
    assert torch.allclose(c[:, :100], expr) and torch.allclose(c[:, 118:], lids)
    assert torch.allclose(c[:, 100:106], axis_angle_to_6d(aa[:, 2]))
    # the matrices the forward computes anyway give the same vector (FlashAvatar passes them)
    aa = torch.randn(2, 5, 3) * 0.3
    v, rots = model(expression=expr, joint_rotations=aa, return_rotations=True)
    assert rots.shape == (2, 5, 3, 3)
    torch.testing.assert_close(model.condition(expr, aa, {"eyelids": lids}, rotations=rots),
                               model.condition(expr, aa, {"eyelids": lids}), rtol=0, atol=1e-6)


# ------------------------------------------------------------- mouth faces
def test_template_matching_and_built_mouth(flame):
    d, fake = flame
    m = build_flame_head(d, template_obj="head_template_mesh.obj")
    # shuffled, rotated OBJ faces still give each FLAME corner its own UV
    uv = m.uvs.numpy()[m.uv_faces[:F_FLAME].numpy()]
    assert np.allclose(uv, fake["uvs"][fake["uv_faces"]], atol=1e-6)
    assert m.meta["mouth_faces"] == {"count": 30, "source": "built"}
    new = m.faces[F_FLAME:].numpy()
    assert set(np.unique(new)) == set(fake["mouth_loop"])
    # the new faces continue the lips' winding: every boundary edge a->b is closed by b->a
    loop = fake["mouth_loop"]
    edges = {tuple(e) for f in new for e in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0]))}
    assert all((loop[(k + 1) % 32], loop[k]) in edges for k in range(32))
    assert boundary_loops(m.faces.numpy()) == []  # the fake head is closed now
    # their UVs lie on a disc in an empty part of the atlas
    disc = m.uvs.numpy()[len(fake["uvs"]):]
    assert len(disc) == 32 and (disc > 0).all() and (disc < 1).all()
    centre = disc.mean(0)
    assert not ((np.abs(fake["uvs"][:, 0] - centre[0]) < 0.03) & (np.abs(fake["uvs"][:, 1] - centre[1]) < 0.03)).any()
    none = build_flame_head(d, template_obj="head_template_mesh.obj", mouth_faces="none")
    assert none.faces.shape[0] == F_FLAME and none.meta["mouth_faces"]["count"] == 0
    assert set(none.regions["mouth_interior"]) == set(fake["mouth_loop"])


def test_uv_sampling_uses_mouth_faces_and_boundary(model):
    from headavatar.methods.flashavatar.embedding import sample_uv_texels

    face, bary = sample_uv_texels(model, 128, exclude_boundary=True)
    face_all, _ = sample_uv_texels(model, 128, exclude_boundary=False)
    bad = model.region_face_mask("boundary", mode="any")
    assert not bad[face].any() and bad[face_all].any()
    assert (face >= F_FLAME).sum() > 0  # Gaussians on the mouth-cavity faces
    assert torch.allclose(bary.sum(-1), torch.ones(len(bary)))


# --------------------------------------------------------------- specs
def test_spec_has_no_absolute_paths_and_round_trips(flame, model, monkeypatch):
    d, _ = flame
    spec = flame_spec(model)
    assert "dir" not in spec and not any(isinstance(v, str) and os.path.isabs(v) for v in spec.values())
    assert spec["template_obj"] == "FlameMesh.obj" and spec["n_expr"] == 100 and spec["eyelids"] is True
    m2 = load_head_model(spec, dir=str(d))
    assert m2.fingerprint() == spec["fingerprint"]
    # without a FLAME folder: a clear message; with $HEADAVATAR_FLAME_DIR: found
    monkeypatch.delenv("HEADAVATAR_FLAME_DIR", raising=False)
    with pytest.raises(UserError, match="not bundled"):
        load_head_model(spec)
    monkeypatch.setenv("HEADAVATAR_FLAME_DIR", str(d))
    assert load_head_model(spec).fingerprint() == spec["fingerprint"]


# ------------------------------------------------------------ landmarks
def test_landmark_embedding_variants(tmp_path, flame):
    d, fake = flame
    from headavatar.headmodels.flame import read_landmark_embedding

    full = read_landmark_embedding(d / "landmark_embedding.npy")
    assert full[2] == "full_lmk" and np.array_equal(full[0], fake["lmk_faces"])
    write_landmark_embedding(tmp_path / "lm.npy", fake, full=False)
    part = read_landmark_embedding(tmp_path / "lm.npy")  # 17 contour (dynamic row 0, torch tensors) + 51 static
    assert part[2] == "static+dynamic[0]" and np.array_equal(part[0], full[0]) and np.allclose(part[1], full[1])
    np.savez(tmp_path / "lm51.npz", lmk_face_idx=fake["lmk_faces"][:51], lmk_b_coords=fake["lmk_bary"][:51])
    with pytest.raises(UserError, match="68 are needed"):
        read_landmark_embedding(tmp_path / "lm51.npz")


def test_without_landmarks_loads_but_refuses_fitting(tmp_path, flame):
    d, _ = flame
    for name in ("generic_model.pkl", "FLAME_masks.pkl", "FlameMesh.obj"):
        os.symlink(d / name, tmp_path / name)
    m = build_flame_head(tmp_path)
    m.validate()
    assert m.meta["has_landmarks"] is False and "eyelids" not in m.post_basis
    assert m.condition_dim == 118
    with pytest.raises(UserError, match="landmark_embedding.npy"):
        require_landmarks(m, "fitting")
    with pytest.raises(UserError, match="eyelid blendshapes"):
        build_flame_head(tmp_path, eyelids=True)


# ------------------------------------------------------------ bad input
def _link_flame(src, dst, skip=()):
    for name in ("generic_model.pkl", "FLAME_masks.pkl", "FlameMesh.obj", "landmark_embedding.npy"):
        if name not in skip:
            os.symlink(src / name, dst / name)


def test_missing_files(tmp_path, flame):
    d, _ = flame
    _link_flame(d, tmp_path, skip=("FLAME_masks.pkl",))
    with pytest.raises(UserError, match="FLAME_masks.pkl"):
        build_flame_head(tmp_path)
    with pytest.raises(UserError, match="not bundled"):
        build_flame_head(tmp_path / "nope")
    with pytest.raises(UserError, match="missing.pkl does not exist"):
        build_flame_head(tmp_path, model_path="missing.pkl")
    (tmp_path / "generic_model.pkl").unlink()
    with pytest.raises(UserError, match="looked for generic_model.pkl"):
        build_flame_head(tmp_path)


def test_wrong_flame_release_by_name(tmp_path, flame):
    d, _ = flame
    _link_flame(d, tmp_path, skip=("generic_model.pkl",))
    os.symlink(d / "generic_model.pkl", tmp_path / "flame2023.pkl")
    with pytest.raises(UserError, match="FLAME 2023"):
        build_flame_head(tmp_path, model_path="flame2023.pkl")


def test_not_flame_pickles(tmp_path):
    with open(tmp_path / "dict.pkl", "wb") as f:
        pickle.dump({"weights": np.zeros(3)}, f)
    with pytest.raises(UserError, match="not a FLAME model"):
        from headavatar.headmodels.flame import read_flame_model

        read_flame_model(tmp_path / "dict.pkl")
    smpl = {"v_template": np.zeros((6890, 3)), "f": np.zeros((13776, 3), np.int64), "shapedirs": np.zeros((6890, 3, 10)),
            "posedirs": np.zeros((6890, 3, 207)), "J_regressor": np.zeros((24, 6890)), "weights": np.zeros((6890, 24)),
            "kintree_table": np.zeros((2, 24), np.int64)}
    with open(tmp_path / "smpl.pkl", "wb") as f:
        pickle.dump(smpl, f, protocol=2)
    with pytest.raises(UserError, match="SMPL body model"):
        read_flame_model(tmp_path / "smpl.pkl")
    (tmp_path / "trunc.pkl").write_bytes(pickle.dumps(smpl, protocol=2)[:1000])
    with pytest.raises(UserError, match="damaged"):
        read_flame_model(tmp_path / "trunc.pkl")


def test_cut_down_shapedirs(tmp_path):
    fake = make_fake_flame(0)
    write_generic_model(tmp_path / "generic_model.pkl", fake, chumpy=False, shapedirs=np.zeros((V_FLAME, 3, 300), np.float16))
    from headavatar.headmodels.flame import read_flame_model

    with pytest.raises(UserError, match="300 shape \\+ 100 expression"):
        read_flame_model(tmp_path / "generic_model.pkl")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + str(_Evil.target),))


def test_restricted_unpickler_runs_no_code(tmp_path):
    _Evil.target = tmp_path / "pwned"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"v_template": _Evil()}, f)
    with pytest.raises(ForeignPickleError):
        load_pickle(tmp_path / "evil.pkl")
    assert not _Evil.target.exists()


def test_template_obj_with_other_topology(tmp_path, flame):
    d, fake = flame
    _link_flame(d, tmp_path, skip=("FlameMesh.obj",))
    write_obj(tmp_path / "head_template_mesh.obj", fake["v_template"][:100], fake["f"][:10] % 100, fake["uvs"], fake["uv_faces"][:10])
    with pytest.raises(UserError, match="not a FLAME template"):
        build_flame_head(tmp_path)
