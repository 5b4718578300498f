"""`headavatar view RUN_DIR`: a local web viewer that renders the trained avatar live (docs/VIEWER.md).

The browser page sends the view (camera orbit, frame, expression and head-pose
sliders, environment map) and shows the JPEG that the trained model renders
for it in this process.  No network access and no client download: the page
is three small static files served by the standard library's HTTP server.
"""

from __future__ import annotations

from pathlib import Path

from headavatar.viewer.scene import ViewerScene, ViewState, orbit_camera
from headavatar.viewer.server import ViewerServer, make_server


def open_viewer(run_dir, host: str = "127.0.0.1", port: int = 8080, device="auto", size: int | None = None,
                envmaps: list[str | Path] | None = None, head_overrides: dict | None = None, verbose: bool = False) -> ViewerServer:
    """Load the run and bind the server (not yet serving): ``server.serve_forever()`` in any thread, ``server.shutdown()`` to stop.

    The port is checked first, so a taken port fails before the avatar is loaded.
    """
    from headavatar.methods import load_avatar

    server = make_server(None, host, port, verbose)
    try:
        avatar = load_avatar(run_dir, device, head_overrides)
        server.scene = ViewerScene(avatar, envmaps=envmaps, size=size)
    except BaseException:
        server.server_close()
        raise
    return server


def serve(run_dir, host: str = "127.0.0.1", port: int = 8080, device="auto", size: int | None = None,
          envmaps: list[str | Path] | None = None, head_overrides: dict | None = None, verbose: bool = False, log=print) -> None:
    """Run the viewer until Ctrl-C."""
    server = open_viewer(run_dir, host, port, device, size, envmaps, head_overrides, verbose)
    try:
        log(f"headavatar viewer: {server.url}  ({server.scene.avatar.method}, {server.scene.tracking.num_frames} frames, "
            f"rendering on {server.scene.avatar.device}; Ctrl-C to stop)")
        if host not in ("127.0.0.1", "localhost", "::1"):
            log(f"note: listening on {host}: anyone who can reach this machine can open the viewer")
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


__all__ = ["open_viewer", "serve", "make_server", "ViewerServer", "ViewerScene", "ViewState", "orbit_camera"]
