"""The web viewer: view states, HTTP API, errors, and the page drawn by a real headless Chromium."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from avatar_runs import shared_runs
from headavatar.errors import UserError
from headavatar.viewer import ViewerScene, ViewState, make_server, open_viewer, orbit_camera

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)  # read-only


@pytest.fixture(scope="module")
def viewer(runs):
    """The FlashAvatar viewer serving on a free port from a background thread."""
    server = open_viewer(runs["fa"], port=0, device="cpu", size=96)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


def _get(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.status, dict(r.headers), r.read()


def test_orbit_camera():
    R = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
    t = torch.tensor([0.0, 0.0, 1.0])
    target = torch.tensor([0.0, 0.05, 0.0])
    R0, t0 = orbit_camera(R, t, target, 0, 0, 1)
    assert torch.allclose(R0, R) and torch.allclose(t0, t)
    for az, el, zoom in ((40, 0, 1), (0, 30, 1), (-70, -20, 0.5)):
        R2, t2 = orbit_camera(R, t, target, az, el, zoom)
        assert torch.allclose(R2 @ R2.T, torch.eye(3), atol=1e-6)
        # the target stays where the camera saw it, at the zoomed distance
        assert torch.allclose(R2 @ target + t2, zoom * (R @ target + t), atol=1e-6)
    C_up = -orbit_camera(R, t, target, 0, 30, 1)[0].T @ orbit_camera(R, t, target, 0, 30, 1)[1]
    assert C_up[1] > 0.4  # positive elevation looks from above


def test_view_state_parsing():
    st = ViewState.from_query({"f": "3", "az": "10", "x": "0:0.5,2:-1", "s": "64", "light": "sky"})
    assert (st.frame, st.az, st.expression, st.size, st.light) == (3, 10.0, {0: 0.5, 2: -1.0}, 64, "sky")
    for bad in ({"az": "left"}, {"el": "95"}, {"x": "1"}, {"s": "5"}, {"zoom": "nan"}):
        with pytest.raises(ValueError):
            ViewState.from_query(bad)


def test_http_api(viewer, runs):
    base = viewer.url
    status, headers, body = _get(base)
    page = body.decode()
    assert status == 200 and "viewer.js" in page and 'src="/render?f=0&amp;s=96"' in page
    info = json.loads(_get(base + "api/info")[2])
    assert info["method"] == "flashavatar" and info["num_frames"] == 8 and info["size"] == 96 and info["lights"] == []
    assert [e["name"] for e in info["expressions"]][:2] == ["smile", "frown"] and info["has_jaw"]
    for asset in ("viewer.js", "viewer.css"):
        assert _get(base + asset)[0] == 200
    # a rendered frame is the avatar's own render of that view
    status, headers, body = _get(base + "render?f=2&az=25&el=10&s=96")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and float(headers["X-Render-Ms"]) > 0
    got = np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(float)
    want = viewer.scene.render(ViewState(frame=2, az=25, el=10, size=96)).numpy() * 255
    assert got.shape == (96, 96, 3) and np.abs(got - want).mean() < 3
    # sliders change the picture; the canonical pose renders
    moved = viewer.scene.render(ViewState(frame=2, az=25, el=10, size=96, yaw=30, jaw=15, expression={0: 1.0})).numpy() * 255
    assert np.abs(moved - want).mean() > 1
    assert _get(base + "render?f=-1&s=48")[0] == 200
    for query, msg in (("f=99", "unknown frame index 99"), ("x=40:1", "expression index 40 out of range"), ("az=left", "'az' must be a number"),
                       ("light=sky", "only avatars that can be relit")):
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(base + "render?" + query)
        assert e.value.code == 400 and msg in e.value.read().decode()
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(base + "nothing-here")
    assert e.value.code == 404


def test_port_in_use_and_bad_options(runs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is already in use"):
            open_viewer(runs["fa"], port=port, device="cpu")
    with pytest.raises(UserError, match="--port must lie between"):
        make_server(None, port=70000)
    with pytest.raises(UserError, match="relights avatars that can be relit"):
        open_viewer(runs["fa"], port=0, device="cpu", envmaps=["sky.hdr"])


def test_flare_scene(runs):
    from headavatar.methods import load_avatar

    scene = ViewerScene(load_avatar(runs["flare"], "cpu"), size=48, env_size=8)
    info = scene.info()
    assert info["method"] == "flare" and info["lights"] == ["sky"]
    own = scene.render(ViewState(frame=1, size=48))
    lit = scene.render(ViewState(frame=1, size=48, light="sky"))
    assert own.shape == lit.shape == (48, 48, 3) and (own - lit).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="unknown environment 'studio'"):
        scene.render(ViewState(frame=1, size=48, light="studio"))


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Chromium at /usr/bin/chromium (Debian: apt-get install chromium)")
def test_page_draws_the_avatar_in_chromium(viewer, tmp_path):
    shot = tmp_path / "viewer.png"
    width, height, panel = 1000, 700, 320  # panel: the controls' width in viewer.css
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", f"--window-size={width},{height}", "--virtual-time-budget=5000", viewer.url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"Chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    img = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert img.shape == (height, width, 3)
    # the frame fills the viewport (object-fit: contain): a square image, centred vertically
    vw = width - panel
    side = min(vw, height)
    top, left = (height - side) // 2, (vw - side) // 2
    shown = img[top : top + side, left : left + side]
    scene = viewer.scene
    own = scene.render(ViewState(frame=0, size=scene.default_size))
    want = np.asarray(Image.fromarray((own.numpy() * 255).round().astype(np.uint8)).resize((side, side), Image.BILINEAR)).astype(float)
    assert np.abs(shown - want).mean() < 6, "the page does not show the avatar's render"
    bg = scene.avatar.background.numpy() * 255
    head = np.abs(want - bg).sum(-1) > 30
    assert head.mean() > 0.05, "the avatar covers too little of the frame for this check to mean anything"
    assert np.abs(shown[head] - bg).sum(-1).mean() > 30, "the avatar is not drawn where the model renders it"
    far = np.abs(want - bg).sum(-1) < 3
    assert np.abs(shown[far] - bg).mean() < 4  # and away from it, the background (the status line overlays a corner)
    panel_px = img[:, vw + 20 :]
    assert panel_px.mean() < 90  # the dark control panel is laid out beside the frame
