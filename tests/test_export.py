"""Export round trips: 3DGS .ply (read back with plyfile, re-rendered), glb/obj meshes (read back with trimesh, pygltflib)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from avatar_runs import shared_runs
from headavatar.errors import UserError
from headavatar.export import export_run
from headavatar.export.frames import frame_params, neutral_params
from headavatar.export.ply import PROPERTIES
from headavatar.methods import load_avatar
from headavatar.render.gaussians import render_gaussians

plyfile = pytest.importorskip("plyfile", reason="plyfile (the independent PLY reader) is not installed: pip install plyfile")
trimesh = pytest.importorskip("trimesh", reason="trimesh (the independent mesh reader) is not installed: pip install trimesh")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)  # read-only: tests that write into a run copy it first


@pytest.fixture(scope="module")
def fa(runs):
    return load_avatar(runs["fa"], "cpu")


@pytest.fixture(scope="module")
def flare(runs):
    return load_avatar(runs["flare"], "cpu")


# ------------------------------------------------------------------ ply
def _read_ply(path):
    """The file through plyfile, back to activated Gaussians, independently of headavatar's reader."""
    ply = plyfile.PlyData.read(str(path))
    assert [e.name for e in ply.elements] == ["vertex"]
    v = ply["vertex"]
    assert [p.name for p in v.properties] == PROPERTIES
    assert all(v.data.dtype[p] == np.dtype("<f4") for p in PROPERTIES)
    col = lambda names: np.stack([np.asarray(v[n]) for n in names], 1)  # noqa: E731
    n = len(v.data)
    rest = col([f"f_rest_{i}" for i in range(45)]).reshape(n, 3, 15).transpose(0, 2, 1)  # channel-major on disk
    return {
        "means": col(["x", "y", "z"]), "normals": col(["nx", "ny", "nz"]),
        "sh": np.concatenate([col(["f_dc_0", "f_dc_1", "f_dc_2"])[:, None], rest], 1),
        "opacities": 1 / (1 + np.exp(-np.asarray(v["opacity"]))), "scales": np.exp(col(["scale_0", "scale_1", "scale_2"])),
        "quats": col(["rot_0", "rot_1", "rot_2", "rot_3"]),
    }


def _render_read_back(g, cams, background, sh_degree=3):
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)[None]  # noqa: E731
    out = render_gaussians(t(g["means"]), t(g["quats"]), t(g["scales"]), t(g["opacities"]), t(g["sh"]), cams.viewmats, cams.K,
                           cams.width, cams.height, sh_degree=sh_degree, backgrounds=background.view(1, 3), backend="torch")
    return out.rgb[0]


def test_ply_canonical_round_trip(runs, fa, tmp_path):
    out = tmp_path / "canonical.ply"
    assert export_run(runs["fa"], out, "ply") == [out]
    header = out.read_bytes()[:80].decode("ascii", "replace")
    assert header.startswith("ply\nformat binary_little_endian 1.0\nelement vertex ")
    g = _read_ply(out)
    ref = fa.gaussians(neutral_params(fa))
    N = fa.model.num_gaussians
    assert g["means"].shape == (N, 3) and g["sh"].shape == (N, 16, 3)
    np.testing.assert_allclose(g["means"], ref["means"][0].numpy(), atol=1e-6)
    np.testing.assert_allclose(g["scales"], ref["scales"][0].numpy(), rtol=1e-5)
    np.testing.assert_allclose(g["opacities"], ref["opacities"][0].numpy(), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(g["quats"], axis=1), 1.0, atol=1e-6)
    q = ref["quats"][0].numpy()
    np.testing.assert_allclose(g["quats"], q / np.linalg.norm(q, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(g["sh"], ref["colors"][0].numpy(), atol=1e-7)
    assert not g["normals"].any()
    # canonical = the neutral pose *with* the MLP's offsets: re-rendered, it is what the avatar itself renders there
    tr = fa.subject.tracking
    cams = tr.cameras([0], fa.subject.height, fa.subject.width).resized(*fa.size)
    cams.t = cams.t + (cams.R @ torch.as_tensor(tr.translation[0])[:, None])[..., 0]  # frame 0's view of the head at the origin
    own = fa.render(neutral_params(fa), cams)["rgb"][0]
    back = _render_read_back(g, cams, fa.background)
    assert (own - back).abs().max().item() < 1e-4
    assert (own - fa.background).abs().sum(-1).gt(0.05).float().mean().item() > 0.05  # the comparison is not between two empty images


def test_ply_frame_and_sequence(runs, fa, tmp_path):
    out = tmp_path / "f5.ply"
    export_run(runs["fa"], out, frames=5)
    g = _read_ply(out)
    tr = fa.subject.tracking
    cams = tr.cameras([5], fa.subject.height, fa.subject.width).resized(*fa.size)
    own = fa.render(frame_params(fa, 5), cams)["rgb"][0]
    assert (own - _render_read_back(g, cams, fa.background)).abs().max().item() < 1e-4
    seq = tmp_path / "seq"
    files = export_run(runs["fa"], seq, "ply", frames="2,5")
    assert [p.name for p in files] == ["frame_000002.ply", "frame_000005.ply", "frames.json"]
    np.testing.assert_array_equal(_read_ply(seq / "frame_000005.ply")["means"], g["means"])
    index = json.loads((seq / "frames.json").read_text())
    assert [f["frame"] for f in index["frames"]] == [2, 5] and index["fps"] == fa.subject.fps
    assert (out.stat().st_mode & 0o777) == 0o644


def test_export_errors(runs, tmp_path):
    with pytest.raises(UserError, match="FlashAvatar run .* use --format ply"):
        export_run(runs["fa"], tmp_path / "x.glb")
    with pytest.raises(UserError, match="FLARE run .* use --format glb or obj"):
        export_run(runs["flare"], tmp_path / "x.ply", "ply")
    with pytest.raises(UserError, match="unknown frame index 99: the subject has 8 frames"):
        export_run(runs["fa"], tmp_path / "x.ply", frames=99)
    with pytest.raises(UserError, match="unknown frame selection 'abc'"):
        export_run(runs["fa"], tmp_path / "x.ply", frames="abc")
    with pytest.raises(UserError, match="must end in .ply"):
        export_run(runs["fa"], tmp_path / "x.txt", "ply")
    with pytest.raises(UserError, match="--texture-size must lie between 16 and 8192"):
        export_run(runs["flare"], tmp_path / "x.glb", texture_size=4)
    with pytest.raises(UserError, match="unknown export format 'fbx'"):
        export_run(runs["fa"], tmp_path / "x.fbx", "fbx")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(runs["fa"] / "run.json", bare / "run.json")
    with pytest.raises(UserError, match="has no checkpoint"):
        export_run(bare, tmp_path / "x.ply")
    with pytest.raises(UserError, match="does not exist"):
        export_run(tmp_path / "nowhere", tmp_path / "x.ply")
    assert not list(tmp_path.glob("x.*"))


# ------------------------------------------------------------------ meshes
def _gltf_target_deltas(path):
    """Morph-target POSITION deltas through pygltflib (trimesh reads only their names)."""
    pygltflib = pytest.importorskip("pygltflib", reason="pygltflib is not installed: pip install pygltflib")
    g = pygltflib.GLTF2().load(str(path))
    blob = g.binary_blob()
    prim = g.meshes[0].primitives[0]

    def read(acc_idx):
        acc = g.accessors[acc_idx]
        view = g.bufferViews[acc.bufferView]
        start = view.byteOffset + (acc.byteOffset or 0)
        return np.frombuffer(blob, "<f4", count=acc.count * 3, offset=start).reshape(acc.count, 3)

    return g, [read(t["POSITION"]) for t in prim.targets or []]


def test_mesh_writer_on_the_procedural_head(tmp_path):
    from headavatar.export.mesh import head_model_mesh, write_glb, write_obj
    from headavatar.headmodels import load_head_model
    from headavatar.headmodels.procedural_texture import procedural_textures

    head = load_head_model("procedural")
    mesh = head_model_mesh(head, textures=procedural_textures(head, 64, seed=1))
    write_glb(mesh, tmp_path / "head.glb")
    files = write_obj(mesh, tmp_path / "head.obj")
    assert sorted(p.name for p in files) == ["head.mtl", "head.obj", "head_albedo.png", "head_roughness.png", "head_specular.png"]

    scene = trimesh.load(tmp_path / "head.glb", process=False)
    (geom,) = scene.geometry.values()
    np.testing.assert_allclose(geom.vertices, mesh.vertices, atol=1e-6)
    np.testing.assert_array_equal(geom.faces, mesh.faces)
    np.testing.assert_allclose(geom.visual.uv, mesh.uvs, atol=1e-6)  # trimesh flips glTF's v back to OBJ's
    mat = geom.visual.material
    np.testing.assert_array_equal(np.asarray(mat.baseColorTexture.convert("RGB")), mesh.albedo)
    assert np.asarray(mat.metallicRoughnessTexture).shape[:2] == (64, 64)
    # the neutral mesh is the model's: seams split, positions unchanged, normals point outwards
    np.testing.assert_allclose(mesh.vertices, head.template.numpy()[mesh.source_index], atol=1e-6)
    out_dir = (mesh.vertices - mesh.vertices.mean(0)) * mesh.normals
    assert (out_dir.sum(1) > 0).mean() > 0.8

    g, deltas = _gltf_target_deltas(tmp_path / "head.glb")
    assert g.meshes[0].extras["targetNames"] == head.expression_names
    assert "KHR_materials_specular" in g.extensionsUsed
    basis = head.expr_basis.numpy()
    for e in (0, len(deltas) - 1):
        np.testing.assert_allclose(deltas[e], basis[mesh.source_index, :, e], atol=1e-7)

    obj = trimesh.load(tmp_path / "head.obj", process=False)
    np.testing.assert_allclose(obj.vertices, mesh.vertices, atol=1e-6)
    np.testing.assert_array_equal(obj.faces, mesh.faces)
    np.testing.assert_allclose(obj.visual.uv, mesh.uvs, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(obj.visual.material.image.convert("RGB")), mesh.albedo)


def test_flare_glb_with_morph_targets(runs, flare, tmp_path):
    from headavatar.export.mesh import uv_texel_samples
    from headavatar.lighting.color import linear_to_srgb
    from headavatar.methods.flare.export_mesh import bake_materials, blend_names, posed_vertices

    out = tmp_path / "flare.glb"
    export_run(runs["flare"], out, texture_size=64)
    scene = trimesh.load(out, process=False)
    (geom,) = scene.geometry.values()
    g, deltas = _gltf_target_deltas(out)
    extras = g.asset.extras
    assert extras["uv"] == "head" and extras["frame"] == "canonical"
    names = blend_names(flare.model)
    assert g.meshes[0].extras["targetNames"] == names and len(deltas) == len(names)

    # which source vertex each exported one copies: recovered from positions, so nothing is taken on trust
    verts, _ = posed_vertices(flare, None)
    from scipy.spatial import cKDTree

    d, vi = cKDTree(verts).query(np.asarray(geom.vertices))
    assert d.max() < 1e-6
    # morph target e = FLARE's deformation for a unit expression e (at rest pose, the skinning is the identity)
    model = flare.model
    for e in (0, 5):
        p = neutral_params(flare)
        p["expression"][0, e] = 1.0
        with torch.no_grad():
            moved = (model.posed(p)[0][0] / model.scale).numpy()
        np.testing.assert_allclose(np.asarray(geom.vertices) + deltas[e], moved[vi], atol=2e-6)
        assert np.abs(deltas[e]).max() > 1e-5  # not a vacuous comparison

    # the albedo map holds the material network's colour at the canonical point under each texel
    albedo = np.asarray(geom.visual.material.baseColorTexture.convert("RGB"))
    face, bary, covered = uv_texel_samples(np.asarray(geom.visual.uv), np.asarray(geom.faces), 64)
    rows, cols = np.nonzero(covered)
    pick = np.linspace(0, len(rows) - 1, 20).astype(int)
    xc = model.canonical_vertices().detach()
    pts = torch.stack([(xc[vi[geom.faces[face[r, c]]]] * torch.as_tensor(bary[r, c], dtype=torch.float32)[:, None]).sum(0)
                       for r, c in zip(rows[pick], cols[pick])])
    want = (linear_to_srgb(bake_materials(model, pts)["kd"].clamp(0, 1)).numpy() * 255)
    assert np.abs(albedo[rows[pick], cols[pick]].astype(float) - want).max() <= 1.01
    assert albedo[covered].std() > 1.0  # the network's colours vary over the head


def test_flare_obj_frame_and_sequence(runs, flare, tmp_path):
    from headavatar.methods.flare.export_mesh import posed_vertices

    files = export_run(runs["flare"], tmp_path / "f3.obj", frames=3, texture_size=32)
    assert [p.name for p in files] == ["f3.obj", "f3.mtl", "f3_albedo.png", "f3_roughness.png", "f3_specular.png"]
    mtl = (tmp_path / "f3.mtl").read_text()
    assert "map_Kd f3_albedo.png" in mtl and "map_Pr f3_roughness.png" in mtl and "map_Ks f3_specular.png" in mtl
    obj = trimesh.load(tmp_path / "f3.obj", process=False)
    verts, _ = posed_vertices(flare, frame_params(flare, 3))
    from scipy.spatial import cKDTree

    assert cKDTree(verts).query(np.asarray(obj.vertices))[0].max() < 1e-6
    assert obj.visual.material.image.size == (32, 32)
    seq = export_run(runs["flare"], tmp_path / "seq", "glb", frames="0,7", texture_size=32)
    assert sorted(p.name for p in seq) == ["frame_000000.glb", "frame_000007.glb", "frames.json"]
    s7 = trimesh.load(tmp_path / "seq" / "frame_000007.glb", process=False)
    assert cKDTree(posed_vertices(flare, frame_params(flare, 7))[0]).query(np.asarray(next(iter(s7.geometry.values())).vertices))[0].max() < 1e-6


def test_flare_remeshed_gets_an_atlas(runs, tmp_path):
    pytest.importorskip("xatlas", reason="xatlas is not installed: pip install xatlas")
    out = tmp_path / "sphere.glb"
    export_run(runs["flare_sphere"], out, texture_size=64)
    scene = trimesh.load(out, process=False)
    (geom,) = scene.geometry.values()
    g, deltas = _gltf_target_deltas(out)
    assert g.asset.extras["uv"] == "atlas"
    uv = np.asarray(geom.visual.uv)
    assert uv.min() >= 0 and uv.max() <= 1 and len(deltas) == len(g.meshes[0].extras["targetNames"])
    assert geom.faces.shape == (320, 3)
    with pytest.raises(UserError, match="remeshed"):
        export_run(runs["flare_sphere"], tmp_path / "y.glb", uv="head")


def test_default_destination_and_report(runs, tmp_path):
    from headavatar.report import write_report

    run = tmp_path / "run"
    shutil.copytree(runs["fa"], run)
    files = export_run(run)
    assert files == [run / "export" / "canonical.ply"]
    export_run(run, frames="0,1")
    assert sorted(p.name for p in (run / "export" / "ply_0_1").iterdir()) == ["frame_000000.ply", "frame_000001.ply", "frames.json"]
    page = write_report(run).read_text()
    assert "<h2>Exports</h2>" in page and "href='export/canonical.ply'" in page and "href='export/ply_0_1/'>ply_0_1/</a> (2 frames)" in page


def test_eval_refine_tracking_refused_before_work_for_a_run_without_it(tmp_path_factory, tmp_path, capsys):
    # a FLARE run has no test-time-refinement protocol: the CLI says so before any evaluation
    from headavatar.cli.main import main

    runs = shared_runs(tmp_path_factory)
    run = tmp_path / "flare"
    shutil.copytree(runs["flare"], run)
    assert main(["eval", str(run), "--no-video", "--no-lpips", "--device", "cpu", "--refine-tracking", "5"]) == 2
    assert "--refine-tracking is not available for FLARE" in capsys.readouterr().err
    assert not (run / "eval" / "metrics.json").exists()
