"""A third method added through the public registry and the Avatar protocol alone (tests/toy_method/):
the demo, the exporter and the viewer handle it without a line of theirs naming it."""

from __future__ import annotations

import json
import threading
import urllib.request

import numpy as np
import pytest
import torch
import toy_method  # registers the method (headavatar.methods.register_method)

from headavatar.cli.main import main as cli
from headavatar.errors import UserError
from headavatar.export import export_run
from headavatar.export.frames import frame_params
from headavatar.export.ply import read_gaussian_ply
from headavatar.methods import available_methods, load_avatar
from headavatar.methods.avatar import Avatar, GaussianAvatar, MeshAvatar
from headavatar.viewer import ViewerScene, ViewState, open_viewer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "demo"
    assert cli(["demo", "--method", toy_method.NAME, "--quick", "-o", str(out), "--device", "cpu"]) == 0
    return out


def test_demo_runs_the_whole_job(demo, capsys):
    assert toy_method.NAME in available_methods()
    run = demo / "run"
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["method"] == toy_method.NAME and metrics["num_frames"] > 0
    assert 5 < metrics["metrics"]["mean"]["psnr"] < 60
    for f in ("report.html", "render_all.mp4", "export/canonical.ply"):
        assert (run / f).stat().st_size > 0, f
    html = (run / "report.html").read_text()
    assert "Toy method" in html and "canonical.ply" in html  # the method's own demo section and the export


def test_export_through_the_protocol(demo, tmp_path):
    run = demo / "run"
    avatar = load_avatar(run, "cpu")
    assert isinstance(avatar, Avatar) and isinstance(avatar, GaussianAvatar) and not isinstance(avatar, MeshAvatar)
    files = export_run(run, tmp_path / "seq", frames="1,3")
    assert [p.name for p in files] == ["frame_000001.ply", "frame_000003.ply", "frames.json"]
    back = read_gaussian_ply(tmp_path / "seq" / "frame_000003.ply")
    want = avatar.gaussians(frame_params(avatar, 3))
    np.testing.assert_allclose(back["means"], want["means"][0].numpy(), atol=1e-6)
    np.testing.assert_allclose(back["sh"][:, 0], want["colors"][0, :, 0].numpy(), atol=1e-6)
    with pytest.raises(UserError, match="this is a toy run .* use --format ply"):
        export_run(run, tmp_path / "x.glb")


def test_viewer_through_the_protocol(demo):
    run = demo / "run"
    avatar = load_avatar(run, "cpu")
    scene = ViewerScene(avatar, size=32)
    assert scene.info()["method"] == toy_method.NAME and scene.info()["lights"] == []
    img = scene.render(ViewState(frame=2, az=20))
    assert img.shape == (32, 32, 3)
    own = avatar.render(frame_params(avatar, 2), avatar.subject.tracking.cameras([2], avatar.subject.height, avatar.subject.width).resized(32, 32))
    assert torch.allclose(scene.render(ViewState(frame=2)), own["rgb"][0], atol=1e-5)
    assert (own["rgb"][0] - avatar.background).abs().sum(-1).gt(0.1).any()  # the head is drawn
    server = open_viewer(run, port=0, device="cpu", size=32)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(server.url + "render?f=-1&az=30", timeout=60) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg" and r.read(3) == b"\xff\xd8\xff"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_inference_does_not_import_training_code(tmp_path_factory):
    """Loading, rendering, exporting and relighting a run of either built-in method leaves the training modules unloaded."""
    import subprocess
    import sys

    from avatar_runs import shared_runs

    runs = shared_runs(tmp_path_factory)
    out = tmp_path_factory.mktemp("no_train")
    code = f"""
import sys
from headavatar.export import export_run
from headavatar.lighting import load_light
from headavatar.methods import load_avatar
from headavatar.export.frames import frame_params
for name, fmt in (("fa", "ply"), ("flare", "glb")):
    a = load_avatar({str(runs['fa'].parent)!r} + "/" + name, "cpu")
    tr = a.subject.tracking
    a.render(frame_params(a, 0), tr.cameras([0], a.subject.height, a.subject.width).resized(*a.size))
    export_run({str(runs['fa'].parent)!r} + "/" + name, {str(out)!r} + "/x." + fmt, texture_size=16)
a.relight(frame_params(a, 0), tr.cameras([0], a.subject.height, a.subject.width).resized(*a.size), load_light("sky", 8))
print(sorted(m for m in sys.modules if m.startswith("headavatar.methods") and m.endswith(".train")))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_builtin_avatars_keep_the_protocol(tmp_path_factory):
    """What each built-in method declares is what its avatar offers (export and viewer rely on the declaration)."""
    from avatar_runs import shared_runs
    from headavatar.methods import get_method
    from headavatar.methods.avatar import CAPABILITIES, GAUSSIANS, MESH, RELIGHT, RelightableAvatar

    runs = shared_runs(tmp_path_factory)
    kinds = {GAUSSIANS: GaussianAvatar, MESH: MeshAvatar, RELIGHT: RelightableAvatar}
    for name in ("fa", "flare"):
        a = load_avatar(runs[name], "cpu")
        assert isinstance(a, Avatar)
        assert get_method(a.method).capabilities == a.capabilities and a.capabilities <= set(CAPABILITIES)
        for cap, proto in kinds.items():
            assert (cap in a.capabilities) == isinstance(a, proto), (name, cap)
