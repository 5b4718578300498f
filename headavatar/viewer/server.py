"""The viewer's HTTP server: the Python standard library's threading HTTP server, nothing to download.

Routes:
  GET /              the page (static/index.html with the avatar's description and the first frame's URL filled in)
  GET /viewer.js, /viewer.css
  GET /api/info      JSON: method, frames, fps, expression names and ranges, lights
  GET /render?...    image/jpeg of a view state (headavatar.viewer.scene); header X-Render-Ms
Anything else is 404; a malformed view state is 400 with a one-line reason.
"""

from __future__ import annotations

import errno
import html
import json
import logging
import socket
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qsl, urlencode, urlsplit

from headavatar.errors import UserError
from headavatar.log import get_logger
from headavatar.viewer.scene import BadRequest, ViewerScene, ViewState

_log = get_logger(__name__)

_STATIC = {"/viewer.js": ("viewer.js", "text/javascript; charset=utf-8"), "/viewer.css": ("viewer.css", "text/css; charset=utf-8")}


def _static_text(name: str) -> str:
    return resources.files("headavatar.viewer").joinpath("static", name).read_text(encoding="utf-8")


def initial_frame(scene: ViewerScene, page_query: dict[str, str]) -> int:
    """The frame the page opens on: ``/?f=N`` (-1 = canonical), else the tracked frame 0."""
    try:
        f = int(page_query.get("f", 0))
    except ValueError:
        return 0
    return f if -1 <= f < scene.tracking.num_frames else 0


def page_html(scene: ViewerScene, page_query: dict[str, str] | None = None) -> str:
    """The page, opening on ``/?f=N`` and playing with ``/?play=1``; its first frame is seen by the tracking camera."""
    q = page_query or {}
    info = dict(scene.info(), start={"frame": initial_frame(scene, q), "play": q.get("play") in ("1", "true", "yes")})
    page = _static_text("index.html")
    # a '</' inside the JSON would close the <script> element; '<\/' is the same string to JSON
    info_json = json.dumps(info).replace("</", "<\\/")
    return (page.replace("{{TITLE}}", html.escape(f"headavatar · {info['subject']} · {info['method']}"))
                .replace("{{INFO_JSON}}", info_json)
                .replace("{{FIRST_FRAME}}", html.escape("/render?" + urlencode({"f": info["start"]["frame"], "s": scene.default_size}))))


class ViewerHandler(BaseHTTPRequestHandler):
    server: "ViewerServer"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        url = urlsplit(self.path)
        scene = self.server.scene
        try:
            if url.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, page_html(scene, dict(parse_qsl(url.query))).encode(), "text/html; charset=utf-8")
            elif url.path in _STATIC:
                name, ctype = _STATIC[url.path]
                self._send(HTTPStatus.OK, _static_text(name).encode(), ctype)
            elif url.path == "/api/info":
                self._send(HTTPStatus.OK, json.dumps(scene.info()).encode(), "application/json")
            elif url.path == "/render":
                state = ViewState.from_query(dict(parse_qsl(url.query, keep_blank_values=True)))
                jpeg, ms = scene.render_jpeg(state)
                self._send(HTTPStatus.OK, jpeg, "image/jpeg", {"X-Render-Ms": f"{ms:.1f}", "Cache-Control": "no-store"})
            elif url.path == "/favicon.ico":
                self._send(HTTPStatus.NO_CONTENT, b"", "text/plain")
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
        except (BadRequest, UserError) as e:
            self._send(HTTPStatus.BAD_REQUEST, (str(e) + "\n").encode(), "text/plain; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page moved on (a newer frame was asked for) before this one was sent

    def _send(self, status: HTTPStatus, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's signature)
        # one line per request: shown with `view --verbose`, else only at the logger's verbose level
        _log.log(logging.INFO if self.server.verbose else logging.DEBUG, "viewer: %s", format % args)


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck browser connection never keeps the process alive

    def __init__(self, address, scene: ViewerScene, verbose: bool = False):
        self.scene = scene
        self.verbose = verbose
        super().__init__(address, ViewerHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"


def make_server(scene: ViewerScene, host: str = "127.0.0.1", port: int = 8080, verbose: bool = False) -> ViewerServer:
    """Bind the viewer to host:port (port 0: any free port); a taken port is a UserError."""
    if not 0 <= int(port) <= 65535:
        raise UserError(f"--port must lie between 0 and 65535 (got {port})")
    cls = ViewerServer
    if ":" in host:
        cls = type("ViewerServer6", (ViewerServer,), {"address_family": socket.AF_INET6})
    try:
        return cls((host, int(port)), scene, verbose)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use; pass another --port (0 picks a free one)") from None
        if e.errno == errno.EACCES:
            raise UserError(f"no permission to listen on port {port}; use a port above 1023") from None
        if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"cannot listen on host {host!r}: {e.strerror or e}; use 127.0.0.1 (this machine) or 0.0.0.0 (the network)") from None
        raise
