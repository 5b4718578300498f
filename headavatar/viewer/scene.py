"""What the viewer shows: a view state (frame, orbit, sliders, light) -> a frame rendered by the trained model.

Rendering happens here, in Python, through the avatar's own renderer (the
Avatar protocol of headavatar.methods.avatar: ``render``, ``render_gaussians``
for avatars made of Gaussians, ``relight`` for relightable ones): the browser
only displays JPEGs, so what it shows is exactly what the model renders, on
CPU and GPU alike.

The view state, as the page sends it (all optional):

  f      tracked frame index, or -1 for the canonical pose (headavatar.export.frames)
  az,el  orbit of the camera about the head, degrees (0, 0 = the tracking camera)
  zoom   camera distance factor (1 = the tracking camera's)
  yaw, pitch, roll   head rotation added to the frame's, degrees (head axes: +y up, +z forward)
  jaw    jaw opening added, degrees (head models with a "jaw" joint)
  x      expression offsets added to the frame's: "index:value,index:value"
  light  "" (the avatar's own light) or the name of an environment map (relightable avatars)
  s      long side of the image in pixels
"""

from __future__ import annotations

import io
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from headavatar.camera import Cameras
from headavatar.errors import UserError
from headavatar.headmodels.params import FrameParams
from headavatar.methods.avatar import GAUSSIANS, RELIGHT
from headavatar.utils.rotations import axis_angle_to_matrix, matrix_to_axis_angle

MIN_SIZE, MAX_SIZE = 32, 2048
BUILTIN_LIGHTS = ("sky",)  # relightable avatars: environments that need no file


class BadRequest(ValueError):
    """A malformed view state (the server answers 400 with the message)."""


@dataclass
class ViewState:
    frame: int = 0
    az: float = 0.0
    el: float = 0.0
    zoom: float = 1.0
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    jaw: float = 0.0
    expression: dict[int, float] = field(default_factory=dict)
    light: str = ""
    size: int | None = None

    @classmethod
    def from_query(cls, q: dict[str, str]) -> "ViewState":
        def num(key, default, lo=-1e6, hi=1e6):
            if key not in q or q[key] == "":
                return default
            try:
                v = float(q[key])
            except ValueError:
                raise BadRequest(f"'{key}' must be a number (got {q[key]!r})") from None
            if not math.isfinite(v) or not lo <= v <= hi:
                raise BadRequest(f"'{key}' must lie in [{lo}, {hi}] (got {q[key]})")
            return v

        st = cls()
        st.frame = int(num("f", 0))
        st.az, st.el = num("az", 0.0, -1e4, 1e4), num("el", 0.0, -89.0, 89.0)
        st.zoom = num("zoom", 1.0, 0.05, 20.0)
        st.yaw, st.pitch, st.roll = (num(k, 0.0, -180.0, 180.0) for k in ("yaw", "pitch", "roll"))
        st.jaw = num("jaw", 0.0, -90.0, 90.0)
        st.light = q.get("light", "")
        if q.get("s"):
            st.size = int(num("s", 0, MIN_SIZE, MAX_SIZE))
        for item in filter(None, q.get("x", "").split(",")):
            k, sep, v = item.partition(":")
            try:
                st.expression[int(k)] = float(v) if sep else float("nan")
            except ValueError:
                raise BadRequest(f"'x' must be index:value pairs (got {item!r})") from None
            if not math.isfinite(st.expression[int(k)]):
                raise BadRequest(f"'x' must be index:value pairs (got {item!r})")
        return st


def _rot(axis: str, deg: float) -> torch.Tensor:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    if axis == "x":
        return torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float32)
    if axis == "y":
        return torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=torch.float32)
    return torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float32)


def _axis_rotation(axis: torch.Tensor, deg: float) -> torch.Tensor:
    return axis_angle_to_matrix(torch.nn.functional.normalize(axis, dim=0) * math.radians(deg))


def orbit_camera(R: torch.Tensor, t: torch.Tensor, target: torch.Tensor, az: float, el: float, zoom: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a world->camera (R [3,3], t [3]) about ``target``: ``az`` about world +y, then ``el`` about the
    camera's right axis; scale its distance by ``zoom``.  az = el = 0, zoom = 1 gives the camera back."""
    C = -R.t() @ t
    rot = _axis_rotation(torch.tensor([0.0, 1.0, 0.0]), az)
    R1 = R @ rot.t()
    rot = _axis_rotation(R1[0], -el) @ rot  # R1[0] = the turned camera's right axis, in world coordinates
    C2 = target + zoom * (rot @ (C - target))
    R2 = R @ rot.t()
    return R2, -R2 @ C2


class ViewerScene:
    """Holds one loaded avatar and renders view states (thread-safe: one render at a time)."""

    def __init__(self, avatar, envmaps: list[str | Path] | None = None, size: int | None = None, jpeg_quality: int = 90,
                 env_size: int | None = None):
        self.avatar = avatar
        # cube-face size of prefiltered environments: prefiltering 128 px faces takes tens of seconds on a CPU
        self.env_size = int(env_size) if env_size else (128 if avatar.device.type == "cuda" else 64)
        self.subject = avatar.subject
        self.tracking = avatar.subject.tracking
        self.lock = threading.Lock()
        H, W = avatar.size
        self.default_size = int(size) if size else max(H, W)
        if not MIN_SIZE <= self.default_size <= MAX_SIZE:
            raise UserError(f"--size must lie between {MIN_SIZE} and {MAX_SIZE} (got {self.default_size})")
        self.jpeg_quality = jpeg_quality
        self.head = avatar.head
        self.jaw_index = self.head.joint_index("jaw") if "jaw" in self.head.joint_names else None
        self.jaw_sign = self._jaw_sign() if self.jaw_index is not None else 0.0
        self.relightable = RELIGHT in avatar.capabilities
        self.env_paths: dict[str, str] = {}
        if envmaps and not self.relightable:
            raise UserError(f"--envmap relights avatars that can be relit; this '{avatar.method}' run cannot (its colours are baked in)")
        for p in envmaps or []:
            p = Path(p)
            if not p.is_file():
                raise UserError(f"environment map {p} does not exist")
            if p.suffix.lower() not in (".hdr", ".exr"):
                raise UserError(f"environment map {p} must be a .hdr or .exr lat-long image")
            self.env_paths[p.stem] = str(p)
        self._lights: dict[str, object] = {}
        self._cache_key = None
        self._cache_gaussians = None
        ranges = np.abs(self.tracking.expression).max(0) if self.tracking.num_frames else np.zeros(0)
        # slider range per coefficient: what the tracking uses, with room to exaggerate
        self.expr_ranges = [float(max(1.0, 1.5 * r)) for r in ranges]

    # ---------------------------------------------------------------- info
    def info(self) -> dict:
        names = list(self.head.expression_names)
        E = self.tracking.expression.shape[1]
        lights = (list(BUILTIN_LIGHTS) + list(self.env_paths)) if self.relightable else []
        return {
            "method": self.avatar.method,
            "subject": self.subject.root.name,
            "run": str(self.avatar.run.root),
            "num_frames": self.tracking.num_frames,
            "fps": self.subject.fps,
            "size": self.default_size,
            "aspect": self.subject.width / self.subject.height,
            "expressions": [{"index": i, "name": names[i] if i < len(names) else f"expression {i}", "range": self.expr_ranges[i]} for i in range(E)],
            "has_jaw": self.jaw_index is not None,
            "lights": lights,
        }

    # ---------------------------------------------------------------- rendering
    def render_jpeg(self, st: ViewState) -> tuple[bytes, float]:
        """(JPEG bytes, milliseconds spent rendering)."""
        from PIL import Image

        from headavatar.utils.video import to_uint8

        with self.lock:
            t0 = time.perf_counter()
            rgb = self.render(st)
            ms = (time.perf_counter() - t0) * 1000
        buf = io.BytesIO()
        Image.fromarray(to_uint8(rgb)).save(buf, format="JPEG", quality=self.jpeg_quality)
        return buf.getvalue(), ms

    @torch.no_grad()
    def render(self, st: ViewState) -> torch.Tensor:
        """[H,W,3] in [0,1] for a view state (raises BadRequest on a bad one)."""
        params, R, t, K = self._frame(st)
        H, W = self._size(st)
        dev = self.avatar.device
        target = self._target(params)
        R2, t2 = orbit_camera(R, t, target, st.az, st.el, st.zoom)
        cams = Cameras(K[None], R2[None], t2[None], self.subject.height, self.subject.width).resized(H, W).to(dev)
        params = self._apply_sliders(params, st)
        if st.light:
            return self._relight(params, cams, st.light)[0]
        if GAUSSIANS in self.avatar.capabilities:
            return self._render_gaussians(params, cams, st)[0]
        return self.avatar.render(params, cams)["rgb"][0]

    def _size(self, st: ViewState) -> tuple[int, int]:
        s = st.size or self.default_size
        h, w = self.subject.height, self.subject.width
        k = s / max(h, w)
        return max(1, round(h * k)), max(1, round(w * k))

    def _frame(self, st: ViewState):
        """Head-model inputs and the (unscaled) tracking camera of the state's frame."""
        from headavatar.export.frames import frame_params, neutral_params

        tr = self.tracking
        n = tr.num_frames
        if st.frame == -1:
            params = neutral_params(self.avatar)
            # the canonical head sits at the origin: keep the first frame's camera, moved with the head
            R = torch.as_tensor(tr.R[0], dtype=torch.float32)
            t = torch.as_tensor(tr.t[0], dtype=torch.float32) + R @ torch.as_tensor(tr.translation[0], dtype=torch.float32)
            return params, R, t, torch.as_tensor(tr.K[0], dtype=torch.float32)
        if not 0 <= st.frame < n:
            raise BadRequest(f"unknown frame index {st.frame}: the subject has {n} frames (0-{n - 1}; -1 = canonical)")
        f = lambda a: torch.as_tensor(a[st.frame], dtype=torch.float32)  # noqa: E731
        return frame_params(self.avatar, st.frame), f(tr.R), f(tr.t), f(tr.K)

    def _target(self, params: FrameParams) -> torch.Tensor:
        """Orbit centre: the centre of the head's bounding box in this frame (before the sliders, so it stays put)."""
        v = self.head(params)[0]
        return (0.5 * (v.min(0).values + v.max(0).values)).float().cpu()

    def _apply_sliders(self, params: FrameParams, st: ViewState) -> FrameParams:
        p = params.clone()
        E = p.expression.shape[1]
        for k, v in st.expression.items():
            if not 0 <= k < E:
                raise BadRequest(f"expression index {k} out of range (0-{E - 1})")
            p.expression[0, k] += v
        if st.yaw or st.pitch or st.roll:
            # the added rotation is in the head's own axes, applied on top of the tracked root rotation
            R0 = axis_angle_to_matrix(p.joint_rotations[0, 0].cpu())
            Radd = _rot("y", st.yaw) @ _rot("x", st.pitch) @ _rot("z", st.roll)
            p.joint_rotations[0, 0] = matrix_to_axis_angle(R0 @ Radd).to(p.joint_rotations)
        if st.jaw and self.jaw_index is not None:
            p.joint_rotations[0, self.jaw_index, 0] += self.jaw_sign * math.radians(st.jaw)
        return p

    def _jaw_sign(self) -> float:
        return self.head.jaw_open_sign() or 1.0

    def _render_gaussians(self, params: FrameParams, cams, st: ViewState) -> torch.Tensor:
        """Avatars made of Gaussians: the Gaussians of a pose are kept, so orbiting only re-rasterises."""
        key = (st.frame, tuple(sorted(st.expression.items())), st.yaw, st.pitch, st.roll, st.jaw)
        if key != self._cache_key:
            self._cache_gaussians = self.avatar.gaussians(params)
            self._cache_key = key
        return self.avatar.render_gaussians(self._cache_gaussians, cams)["rgb"]

    def light(self, name: str):
        if not self.relightable:
            raise BadRequest(f"only avatars that can be relit take a light; this '{self.avatar.method}' run cannot")
        if name not in self._lights:
            if name not in BUILTIN_LIGHTS and name not in self.env_paths:
                raise BadRequest(f"unknown environment '{name}' (have: {', '.join(list(BUILTIN_LIGHTS) + list(self.env_paths))})")
            from headavatar.lighting.envmap import load_light

            self._lights[name] = load_light(self.env_paths.get(name, name), size=self.env_size, device=self.avatar.device)
        return self._lights[name]

    def _relight(self, params: FrameParams, cams, name: str) -> torch.Tensor:
        light = self.light(name)
        return self.avatar.relight(params, cams, light, background=None)["rgb"]
