"""ICT-FaceKit: OBJ reader, FaceXModel -> npz converter, and the head model built from the shared npz."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from headavatar.errors import UserError
from headavatar.headmodels.ict import (
    LANDMARK_VERTICES,
    build_ict_head,
    default_npz_candidates,
    find_ict_npz,
    load_ict_npz,
    resolve_parts,
    uv_coverage,
)
from headavatar.headmodels.ict_import import convert_ict_folder
from headavatar.headmodels.obj import read_obj, read_obj_vertices, triangulate

SHARED_NPZ = default_npz_candidates()[0]
needs_shared = pytest.mark.skipif(not SHARED_NPZ.is_file(), reason=f"needs the shared ICT-FaceKit npz ({SHARED_NPZ})")


# --------------------------------------------------------------------------- OBJ
def _write_obj(path: Path, v: np.ndarray, vt: np.ndarray | None = None, faces: list[list[int]] | None = None, face_uvs=None) -> None:
    lines = ["# test mesh", "mtllib x.mtl", "o part"]
    lines += [f"v {a:.9f} {b:.9f} {c:.9f}" for a, b, c in v]
    if vt is not None:
        lines += [f"vt {a:.6f} {b:.6f}" for a, b in vt]
    lines.append("vn 0 0 1")
    for i, f in enumerate(faces or []):
        if face_uvs is not None:
            lines.append("f " + " ".join(f"{a + 1}/{t + 1}/1" for a, t in zip(f, face_uvs[i])))
        else:
            lines.append("f " + " ".join(str(a + 1) for a in f))
    path.write_text("\n".join(lines) + "\n")


def test_read_obj_polygons_and_index_forms(tmp_path):
    p = tmp_path / "m.obj"
    p.write_text(
        "v 0 0 0\nv 1 0 0\nv 1 1 0 0.5 0.5 0.5\nv 0 1 0\nv 2 0 0\n"
        "vt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\n"
        "f 1/1/1 2/2/1 3/3/1 4/4/1\n"  # quad, v/vt/vn
        "f 2//1 5//1 3//1\n"  # triangle, v//vn (no uv)
        "f -4/-4 -1/-3 -3/-2\n"  # negative (relative) indices
    )
    v, vt, polys, puvs = read_obj(p)
    assert v.shape == (5, 3) and vt.shape == (4, 2)
    np.testing.assert_array_equal(polys, [[0, 1, 2, 3], [1, 4, 2, -1], [1, 4, 2, -1]])
    np.testing.assert_array_equal(puvs, [[0, 1, 2, 3], [-1, -1, -1, -1], [0, 1, 2, -1]])
    np.testing.assert_allclose(read_obj_vertices(p), v)
    tris, src = triangulate(polys)
    # the quad splits along its a-c diagonal; triangles stay
    np.testing.assert_array_equal(tris, [[0, 1, 2], [0, 2, 3], [1, 4, 2], [1, 4, 2]])
    np.testing.assert_array_equal(src, [0, 0, 1, 2])


def test_read_obj_bad_input(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_obj(tmp_path / "missing.obj")
    (tmp_path / "lfs.obj").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(UserError, match="no vertices"):
        read_obj(tmp_path / "lfs.obj")
    (tmp_path / "bad.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 9\n")
    with pytest.raises(UserError, match="vertex that does not exist"):
        read_obj(tmp_path / "bad.obj")


# --------------------------------------------------------------------------- converter
def _make_facex_folder(root: Path, n_identity: int = 2, names=("jawOpen", "eyeBlink_L", "mouthSmile_R")) -> dict:
    """A tiny FaceXModel folder: 6 vertices, two quads and a triangle."""
    rng = np.random.default_rng(0)
    folder = root / "FaceXModel"
    folder.mkdir(parents=True)
    v = rng.normal(size=(6, 3)) * 5
    vt = rng.uniform(size=(7, 2))
    faces = [[0, 1, 2, 3], [2, 3, 4, 5], [0, 4, 5]]
    fuv = [[0, 1, 2, 3], [2, 3, 4, 6], [0, 4, 5]]
    _write_obj(folder / "generic_neutral_mesh.obj", v, vt, faces, fuv)
    ident = [rng.normal(size=(6, 3)) for _ in range(n_identity)]
    expr = [rng.normal(size=(6, 3)) for _ in names]
    for i, dlt in enumerate(ident):
        _write_obj(folder / f"identity{i:03d}.obj", v + dlt, vt, faces, fuv)
    for n, dlt in zip(names, expr):
        _write_obj(folder / f"{n}.obj", v + dlt, vt, faces, fuv)
    (folder / "vertex_indices.json").write_text(json.dumps({"expressions": list(names), "fitting_expressions": list(names), "idx_to_landmark_verts": [0, 1]}))
    return {"v": v, "vt": vt, "faces": faces, "fuv": fuv, "ident": ident, "expr": expr, "names": list(names), "folder": folder}


def test_convert_ict_folder_round_trip(tmp_path):
    src = _make_facex_folder(tmp_path / "ICT-FaceKit")
    out = tmp_path / "out" / "ict.npz"
    with pytest.warns(UserWarning, match="2 identity files"):
        summary = convert_ict_folder(tmp_path / "ICT-FaceKit", out, progress=False)  # the checkout root works too
    assert summary["identities"] == 2 and summary["expressions"] == 3 and summary["vertices"] == 6
    data = load_ict_npz(out)
    np.testing.assert_allclose(data["vertices"], src["v"], atol=1e-6)
    np.testing.assert_allclose(data["uvs"], src["vt"], atol=1e-6)
    assert data["faces"].dtype == np.int32 and data["faces"].shape == (3, 4)
    np.testing.assert_array_equal(data["faces"], [[0, 1, 2, 3], [2, 3, 4, 5], [0, 4, 5, -1]])
    np.testing.assert_array_equal(data["face_uvs"], [[0, 1, 2, 3], [2, 3, 4, 6], [0, 4, 5, -1]])
    assert list(data["expression_names"]) == src["names"]
    assert data["expression_deltas"].dtype == np.float16 and data["identity_deltas"].dtype == np.float16
    np.testing.assert_allclose(data["expression_deltas"], np.stack(src["expr"]), atol=2e-3)
    np.testing.assert_allclose(data["identity_deltas"], np.stack(src["ident"]), atol=2e-3)
    # a file with another topology is not an ICT head: clear message, not a crash
    with pytest.raises(UserError, match="topology"):
        build_ict_head(out)


@pytest.mark.filterwarnings("ignore:.*identity files")
def test_convert_ict_folder_bad_input(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        convert_ict_folder(tmp_path / "nope", tmp_path / "o.npz", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not an ICT-FaceKit checkout"):
        convert_ict_folder(tmp_path / "empty", tmp_path / "o.npz", progress=False)
    src = _make_facex_folder(tmp_path / "a", n_identity=1)
    with pytest.raises(UserError, match=r"\.npz"):
        convert_ict_folder(src["folder"], tmp_path / "o.txt", progress=False)
    (src["folder"] / "eyeBlink_L.obj").unlink()
    with pytest.raises(UserError, match="eyeBlink_L"):
        convert_ict_folder(src["folder"], tmp_path / "o.npz", progress=False)
    assert not (tmp_path / "o.npz").exists()  # nothing half-written
    src = _make_facex_folder(tmp_path / "b", n_identity=1)
    _write_obj(src["folder"] / "identity000.obj", np.zeros((5, 3)))
    with pytest.raises(UserError, match="one topology"):
        convert_ict_folder(src["folder"], tmp_path / "o.npz", progress=False)


def test_find_ict_npz(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="import-ict"):
        find_ict_npz(tmp_path / "missing.npz")
    monkeypatch.setenv("HEADAVATAR_ICT_NPZ", str(tmp_path / "also_missing.npz"))
    with pytest.raises(UserError, match="HEADAVATAR_ICT_NPZ"):
        find_ict_npz()
    f = tmp_path / "x.npz"
    f.write_bytes(b"not a zip")
    monkeypatch.setenv("HEADAVATAR_ICT_NPZ", str(f))
    assert find_ict_npz() == f
    with pytest.raises(UserError, match="not a readable npz"):
        load_ict_npz(f)


def test_resolve_parts():
    assert resolve_parts("avatar") == ("face", "head_neck", "mouth_socket", "teeth", "eyeball_left", "eyeball_right")
    assert resolve_parts("teeth, face") == ("face", "teeth")
    with pytest.raises(UserError, match="unknown ICT part"):
        resolve_parts("face,eyelashes_left")
    with pytest.raises(UserError, match="must include 'face'"):
        resolve_parts(["teeth"])


# --------------------------------------------------------------------------- the model from the shared npz
@pytest.fixture(scope="module")
def ict():
    if not SHARED_NPZ.is_file():
        pytest.skip(f"needs the shared ICT-FaceKit npz ({SHARED_NPZ})")
    return build_ict_head(SHARED_NPZ)


@needs_shared
def test_ict_model_invariants(ict):
    m = ict
    m.validate()
    raw = np.load(SHARED_NPZ)
    src = m.meta["source_vertex_index"]
    # zero parameters give the template, which is the neutral mesh in metres
    np.testing.assert_allclose(m.template.numpy(), raw["vertices"][src] * 0.01, atol=1e-7)
    v0 = m.shaped(torch.zeros(1, m.num_shape), torch.zeros(1, m.num_expression))[0]
    torch.testing.assert_close(v0, m.template)
    head_height = float(m.template[:, 1].max() - m.template[:, 1].min())
    assert 0.25 < head_height < 0.45  # crown to neck cut, metres
    # bases: cm -> m, float16 -> float32
    assert m.shape_basis.dtype == torch.float32 and m.shape_basis.shape == (m.num_vertices, 3, 100)
    np.testing.assert_allclose(m.expr_basis[:, :, 26].numpy(), raw["expression_deltas"][26][src].astype(np.float32) * 0.01, atol=1e-7)
    assert m.expression_names[26] == "jawOpen" and m.num_expression == 53
    assert m.condition_dim == 53 and m.condition_joints == [] and m.joint_names == ["root"]
    assert m.meta["expression_range"] == (0.0, 1.0)
    # the 68 landmarks sit exactly on the README's vertices
    lm = m.landmarks(m.template[None])[0].numpy()
    np.testing.assert_allclose(lm, raw["vertices"][list(LANDMARK_VERTICES)] * 0.01, atol=1e-7)
    # rigid head: one joint, every vertex fully bound to it, pivot between the ears
    assert torch.all(m.skin_weights == 1)
    pivot = (m.joint_regressor @ m.template)[0].numpy()
    assert abs(pivot[0]) < 1e-3 and np.linalg.norm(pivot - lm[[0, 16]].mean(0)) < 0.08  # between the ears
    assert torch.einsum("jv,vce->jce", m.joint_regressor, m.expr_basis).abs().max() < 1e-3  # expressions barely move it
    for name in ("face", "mouth_interior", "lips", "eyes", "hair", "neck", "boundary", "teeth"):
        assert len(m.regions[name]) > 0, name
    # the boundary is the bottom of the neck
    assert m.template[m.regions["boundary"], 1].mean() < m.template[m.regions["neck"], 1].mean()
    assert m.face_labels.shape == (m.faces.shape[0],) and set(np.unique(m.face_labels.numpy())) == {1, 2, 3, 4, 5, 6, 7}
    # triangles only, no degenerate index, dropped parts gone
    assert m.faces.shape[1] == 3 and int(m.faces.max()) == m.num_vertices - 1
    assert src.max() < 21451 + 1570 + 1570 and not np.isin(np.arange(24591, 26719), src).any()


@needs_shared
def test_ict_uv_atlas(ict):
    uvs, uvf = ict.uvs.numpy(), ict.uv_faces.numpy()
    assert uvs.min() >= 0 and uvs.max() <= 1
    cov = uv_coverage(uvs, uvf, 128)
    assert cov["overlapping"] == 0 and cov["faces_outside_unit_square"] == 0
    assert cov["covered"] > 8000  # one Gaussian per covered texel in FlashAvatar
    # ICT's own layout (UDIM tiles, folded into [0,1]) loses texels to overlaps: why the atlas exists
    raw = np.load(SHARED_NPZ)
    from headavatar.headmodels.obj import triangulate as tri

    eye = tri(raw["face_uvs"][21496:22296])[0]
    face = tri(raw["face_uvs"][:9230])[0]
    folded = raw["uvs"] % 1.0
    assert uv_coverage(folded, np.concatenate([face, eye]), 64)["overlapping"] > 100


@needs_shared
def test_ict_registry_loads():
    from headavatar.headmodels import available_head_models, load_head_model

    assert "ict" in available_head_models()
    m = load_head_model({"name": "ict", "path": str(SHARED_NPZ), "n_identity": 20})
    assert m.num_shape == 20 and m.num_vertices > 10000
