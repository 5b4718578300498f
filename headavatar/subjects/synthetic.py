"""The synthetic demo subject: the procedural head, animated and rendered with exact tracking.

``make_synthetic_subject(out_dir, ...)`` writes a subject in the native format
(docs/SUBJECT_FORMAT.md): RGB frames composited over a mid-grey backdrop, an
antialiased alpha matte, a parsing map and tracking.npz holding the exact
parameters every frame was rendered with.  Everything is deterministic for a
given seed.  docs/SYNTHETIC.md describes the choices.

``render_synthetic_frames(...)`` is the reusable renderer behind it (the
project mesh renderer: rasterise -> interpolate uv/normals -> texture lookup ->
shading), so another lighting (e.g. FLARE's relighting test under an
environment map) can re-render the same subject:

    subject = Subject.open(path)
    model = subject.head_model()
    tex = procedural_textures(model, **subject.meta["synthetic"]["texture"])
    rgb, alpha, parsing = render_synthetic_frames(model, tex, subject.tracking, None,
                                                  SHLighting(coeffs, frame="world"))

Shading happens in linear RGB: ``albedo * lighting.diffuse(n) + specular *
lighting.specular(n, v, roughness)``, clamped to [0, 1], then sRGB-encoded.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from headavatar.camera import Cameras, fov_to_focal, intrinsics, look_at
from headavatar.constants import DEFAULT_FPS, TEST_FRACTION
from headavatar.errors import UserError
from headavatar.headmodels.params import FrameParams
from headavatar.lighting.color import linear_to_srgb
from headavatar.subjects.format import Subject, SubjectWriter, Tracking, default_split
from headavatar.utils.rotations import axis_angle_to_matrix, matrix_to_axis_angle

BACKGROUND = 0.5  # the studio backdrop grey, in the saved (sRGB) image
NUM_LABELS = 10


# =================================================================== lighting
class Lighting(Protocol):
    """What the renderer needs from a lighting.

    ``frame`` is "head" (normals and view directions are given in the head's frame:
    the light turns with the head) or "world".  ``diffuse(n)`` returns the diffuse
    shading D(n) = irradiance / pi, so ``albedo * D`` is the outgoing radiance of a
    Lambertian surface; ``specular(n, v, roughness)`` the radiance reflected towards
    ``v`` per unit specular intensity (or None for none).  n, v: [...,3] unit vectors
    (v points from the surface to the camera); roughness [...,1]; results [...,3] linear RGB.
    """

    frame: str

    def diffuse(self, n: torch.Tensor) -> torch.Tensor: ...

    def specular(self, n: torch.Tensor, v: torch.Tensor, roughness: torch.Tensor) -> torch.Tensor | None: ...


def _unit(v) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=torch.float32)
    return v / v.norm()


@dataclass
class StudioLighting:
    """Directional lights with a soft (wrapped) falloff plus a sky/ground ambient term.

    ``lights``: (direction towards the light, linear RGB intensity) pairs.  The default
    is a warm key from the subject's upper right, a cool fill from the left and a soft
    ambient: a plain studio look with no hard terminator (``wrap`` softens it).
    """

    frame: str = "head"
    lights: tuple = (
        ((-0.45, 0.55, 0.70), (0.78, 0.74, 0.70)),
        ((0.60, 0.05, 0.80), (0.24, 0.26, 0.29)),
    )
    sky: tuple = (0.24, 0.25, 0.27)
    ground: tuple = (0.13, 0.12, 0.115)
    wrap: float = 0.3
    specular_scale: float = 0.35

    def __post_init__(self) -> None:
        if self.frame not in ("head", "world"):
            raise UserError(f"lighting frame must be 'head' or 'world', not {self.frame!r}")

    def _dirs(self, like: torch.Tensor):
        return [(_unit(d).to(like), torch.as_tensor(c, dtype=like.dtype, device=like.device)) for d, c in self.lights]

    def diffuse(self, n: torch.Tensor) -> torch.Tensor:
        out = 0.0
        for d, c in self._dirs(n):
            out = out + ((n @ d + self.wrap) / (1 + self.wrap)).clamp_min(0)[..., None] * c
        t = 0.5 * (1 + n[..., 1:2])  # hemispherical ambient: sky above, ground below
        sky = torch.as_tensor(self.sky, dtype=n.dtype, device=n.device)
        ground = torch.as_tensor(self.ground, dtype=n.dtype, device=n.device)
        return out + t * sky + (1 - t) * ground

    def specular(self, n: torch.Tensor, v: torch.Tensor, roughness: torch.Tensor) -> torch.Tensor:
        # normalised Blinn-Phong with an exponent from the roughness (GGX-like mapping)
        a2 = (roughness.clamp(0.05, 1.0) ** 4)
        shin = (2.0 / a2 - 2.0).clamp(1.0, 2000.0)
        out = 0.0
        for d, c in self._dirs(n):
            h = torch.nn.functional.normalize(v + d, dim=-1)
            nh = (n * h).sum(-1, keepdim=True).clamp_min(0)
            nl = (n @ d).clamp_min(0)[..., None]
            out = out + ((shin + 8) / (8 * math.pi)) * nh.pow(shin) * nl * c
        return self.specular_scale * out


# real spherical harmonics up to band 2 (the usual 9 coefficients)
def sh9_basis(d: torch.Tensor) -> torch.Tensor:
    """[...,3] unit directions -> [...,9] real SH basis Y_00, Y_1-1, Y_10, Y_11, Y_2-2 .. Y_22."""
    x, y, z = d.unbind(-1)
    return torch.stack(
        [
            torch.full_like(x, 0.282095),
            0.488603 * y, 0.488603 * z, 0.488603 * x,
            1.092548 * x * y, 1.092548 * y * z, 0.315392 * (3 * z * z - 1), 1.092548 * x * z, 0.546274 * (x * x - y * y),
        ],
        -1,
    )


@dataclass
class SHLighting:
    """Distant lighting given as 9 SH coefficients per colour channel of the radiance L(w).

    Diffuse uses the exact band-limited irradiance of Ramamoorthi & Hanrahan (2001);
    specular evaluates the radiance in the mirror direction with bands damped by the
    roughness (a cheap stand-in for a prefiltered environment map).
    """

    coeffs: torch.Tensor  # [9,3]
    frame: str = "world"
    specular_scale: float = 1.0

    def __post_init__(self) -> None:
        self.coeffs = torch.as_tensor(self.coeffs, dtype=torch.float32).reshape(9, 3)
        if self.frame not in ("head", "world"):
            raise UserError(f"lighting frame must be 'head' or 'world', not {self.frame!r}")

    _BAND = (0, 1, 1, 1, 2, 2, 2, 2, 2)

    def diffuse(self, n: torch.Tensor) -> torch.Tensor:
        A = torch.tensor([math.pi, 2 * math.pi / 3, math.pi / 4], dtype=n.dtype, device=n.device)[list(self._BAND)]
        return (sh9_basis(n) * A) @ self.coeffs.to(n) / math.pi

    def specular(self, n: torch.Tensor, v: torch.Tensor, roughness: torch.Tensor) -> torch.Tensor:
        r = 2 * (n * v).sum(-1, keepdim=True) * n - v
        band = torch.tensor(self._BAND, dtype=n.dtype, device=n.device)
        damp = torch.exp(-0.5 * band * (band + 1) * roughness.clamp_min(0.02) ** 2 * 4)
        return self.specular_scale * ((sh9_basis(r) * damp) @ self.coeffs.to(n)).clamp_min(0)


@dataclass
class FunctionLighting:
    """Lighting from callables: ``diffuse_fn(n) -> [...,3]``, optional ``specular_fn(n, v, roughness)``."""

    diffuse_fn: Callable[[torch.Tensor], torch.Tensor]
    specular_fn: Callable | None = None
    frame: str = "world"

    def diffuse(self, n):
        return self.diffuse_fn(n)

    def specular(self, n, v, roughness):
        return None if self.specular_fn is None else self.specular_fn(n, v, roughness)


def lighting_spec(light) -> dict | None:
    """A JSON description of a StudioLighting or SHLighting (None for other lightings): subjects record
    their capture light with it, so relighting can calibrate exposure against it (docs/RELIGHTING.md)."""
    if isinstance(light, StudioLighting):
        return {"type": "StudioLighting", "frame": light.frame, "lights": [[list(map(float, d)), list(map(float, c))] for d, c in light.lights],
                "sky": list(map(float, light.sky)), "ground": list(map(float, light.ground)), "wrap": float(light.wrap),
                "specular_scale": float(light.specular_scale)}
    if isinstance(light, SHLighting):
        return {"type": "SHLighting", "frame": light.frame, "coeffs": light.coeffs.tolist(), "specular_scale": float(light.specular_scale)}
    return None


def lighting_from_spec(spec: dict) -> Lighting:
    kind = spec.get("type")
    args = {k: v for k, v in spec.items() if k != "type"}
    if kind == "StudioLighting":
        args["lights"] = tuple((tuple(d), tuple(c)) for d, c in args.get("lights", ()))
        for k in ("sky", "ground"):
            if k in args:
                args[k] = tuple(args[k])
        return StudioLighting(**args)
    if kind == "SHLighting":
        return SHLighting(**args)
    raise UserError(f"unknown lighting type {kind!r} in the subject's metadata (known: StudioLighting, SHLighting)")


def capture_lighting(synthetic_meta: dict | None) -> Lighting | None:
    """The lighting a synthetic subject was rendered under, from its metadata (None when unknown)."""
    meta = synthetic_meta or {}
    if meta.get("lighting_spec"):
        return lighting_from_spec(meta["lighting_spec"])
    if meta.get("lighting") in ("head", "world"):  # the default studio light, by name (subjects made before lighting_spec)
        return StudioLighting(frame=meta["lighting"])
    return None


def make_lighting(lighting) -> Lighting:
    """"head" / "world" -> the default StudioLighting in that frame; lighting objects pass through."""
    if isinstance(lighting, str):
        if lighting not in ("head", "world"):
            raise UserError(f"lighting must be 'head', 'world' or a lighting object, not {lighting!r}")
        return StudioLighting(frame=lighting)
    if not (hasattr(lighting, "diffuse") and hasattr(lighting, "frame")):
        raise UserError(f"lighting must be 'head', 'world' or an object with .frame and .diffuse(n); got {type(lighting).__name__}")
    return lighting


# ===================================================================== camera
FOV_Y_DEG = 22.0
CAMERA_DISTANCE = 1.0  # metres: the 0.25 m head and neck fill about 64% of the frame height
CAMERA_TARGET = (0.0, 0.0, 0.0)


def synthetic_camera(height: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K, R, t (float32) of the fixed demo camera: on +z, looking at the head, fov 22 degrees."""
    width = height if width is None else width
    f = fov_to_focal(math.radians(FOV_Y_DEG), height)
    K = intrinsics(f, f, width / 2.0, height / 2.0)
    R, t = look_at(torch.tensor([0.0, 0.0, CAMERA_DISTANCE]), torch.tensor(CAMERA_TARGET))
    return K.numpy().astype(np.float32), R[0].numpy().astype(np.float32), t[0].numpy().astype(np.float32)


# ================================================================== animation
def _eased_keys(times: np.ndarray, keys_t: np.ndarray, keys_v: np.ndarray) -> np.ndarray:
    """Piecewise cosine-eased interpolation of key values (smooth, no overshoot)."""
    i = np.clip(np.searchsorted(keys_t, times, side="right") - 1, 0, len(keys_t) - 2)
    t = np.clip((times - keys_t[i]) / (keys_t[i + 1] - keys_t[i]), 0, 1)
    w = 0.5 - 0.5 * np.cos(np.pi * t)
    return keys_v[i] * (1 - w) + keys_v[i + 1] * w


def _random_keys(rng, duration: float, gap: tuple[float, float]):
    ts = [-rng.uniform(0, gap[1])]
    while ts[-1] < duration + gap[1]:
        ts.append(ts[-1] + rng.uniform(*gap))
    return np.array(ts)


def _channel(rng, times, duration, p_zero=0.45, hi=0.8, gap=(0.5, 1.4)):
    kt = _random_keys(rng, duration, gap)
    kv = np.where(rng.uniform(size=len(kt)) < p_zero, 0.0, rng.uniform(0.1, hi, len(kt)))
    return _eased_keys(times, kt, kv)


def _signed_channel(rng, times, duration, hi=0.8, gap=(0.6, 1.6)):
    kt = _random_keys(rng, duration, gap)
    kv = np.where(rng.uniform(size=len(kt)) < 0.35, 0.0, rng.uniform(-hi, hi, len(kt)))
    return _eased_keys(times, kt, kv)


def _head_motion(rng, times, n_train, limit_deg: float) -> np.ndarray:
    """Smooth sway covering +-limit: two sinusoids, scaled so the training frames reach the limit."""
    f1, f2 = rng.uniform(0.12, 0.25), rng.uniform(0.3, 0.55)
    p1, p2 = rng.uniform(0, 2 * np.pi, 2)
    s = np.sin(2 * np.pi * f1 * times + p1) + 0.35 * np.sin(2 * np.pi * f2 * times + p2)
    peak = np.abs(s[: max(n_train, 1)]).max()
    s = s / max(peak, 1e-6)
    return np.radians(limit_deg) * np.clip(s, -1, 1)  # held-out frames stay inside the trained range


def _euler_to_axis_angle(yaw, pitch, roll) -> np.ndarray:
    """R = Ry(yaw) Rx(pitch) Rz(roll) as axis-angle, [N,3]."""
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    z = torch.zeros(len(yaw), dtype=torch.float64)
    Ry = axis_angle_to_matrix(torch.stack([z, t(yaw), z], -1))
    Rx = axis_angle_to_matrix(torch.stack([t(pitch), z, z], -1))
    Rz = axis_angle_to_matrix(torch.stack([z, z, t(roll)], -1))
    return matrix_to_axis_angle(Ry @ Rx @ Rz).numpy()


def make_synthetic_animation(model, num_frames: int, fps: float = DEFAULT_FPS, seed: int = 0, test_fraction: float = TEST_FRACTION) -> dict[str, np.ndarray]:
    """Deterministic per-frame parameters: expressions, blinks, talking, gaze and head sway.

    Returns float32 arrays: shape [S], expression [N,E], joint_rotations [N,J,3], translation [N,3].
    """
    rng = np.random.default_rng(np.random.PCG64([int(seed), 1234]))
    N = int(num_frames)
    times = np.arange(N) / float(fps)
    dur = N / float(fps)
    n_train = N - max(1, int(round(N * test_fraction)))
    names = list(model.expression_names)
    E = np.zeros((N, len(names)))

    def put(name, values, add=False):
        if name in names:
            k = names.index(name)
            E[:, k] = E[:, k] + values if add else values

    # slowly varying expressions, several at once; opposite pairs come from one signed signal
    for pos, neg in (("smile", "frown"), ("brow_raise", "brow_lower"), ("mouth_left", "mouth_right")):
        s = _signed_channel(rng, times, dur)
        put(pos, np.clip(s, 0, None))
        put(neg, np.clip(-s, 0, None) * (0.6 if pos == "mouth_left" else 1.0))
    for name in ("brow_inner_up", "squint", "cheek_puff", "nose_wrinkle"):
        put(name, _channel(rng, times, dur, p_zero=0.6, hi=0.6))

    # talking: speech bursts at syllable rate with pauses; jaw opening and mouth shapes
    jaw = np.zeros(N)
    shapes = {k: np.zeros(N) for k in ("lips_part", "mouth_pucker", "lip_funnel", "lip_stretch")}
    t = -rng.uniform(0, 1.0)
    talking = bool(rng.uniform() < 0.7)
    while t < dur:
        seg = rng.uniform(1.0, 3.0) if talking else rng.uniform(0.4, 1.2)
        if talking:
            order = list(rng.permutation(list(shapes)))
            offset = int(rng.integers(len(order)))
            rate = rng.uniform(3.5, 5.0)
            n_syl = max(1, int(seg * rate))
            for k in range(n_syl):
                t0 = t + k / rate
                m = (times >= t0) & (times < t0 + 1 / rate)
                env = np.sin(np.pi * (times[m] - t0) * rate) ** 2
                jaw[m] = rng.uniform(0.04, 0.26) * env
                shape = order[(k + offset) % len(order)]  # cycle, so every mouth shape appears
                shapes[shape][m] = np.maximum(shapes[shape][m], rng.uniform(0.2, 0.7) * env)
        t += seg
        talking = not talking
    for k, v in shapes.items():
        put(k, v, add=True)

    # blinks: 3-5 frame events every 1.5-4 s, both eyes, sometimes a wink
    t = rng.uniform(0.3, 2.0)
    while t < dur:
        i0 = int(round(t * fps))
        length = int(rng.integers(3, 6))
        prof = np.sin(np.linspace(0, np.pi, length + 2)[1:-1])
        prof = np.clip(prof / prof.max() * 1.15, 0, 1)  # fully shut at the middle frame(s)
        eyes = ("blink_L", "blink_R") if rng.uniform() > 0.2 else (rng.choice(["blink_L", "blink_R"]),)
        for name in eyes:
            if name in names:
                k = names.index(name)
                seg = E[i0 : i0 + length, k]
                E[i0 : i0 + length, k] = np.maximum(seg, prof[: len(seg)])
        t += rng.uniform(1.5, 4.0)
    E = np.clip(E, 0, 1)
    nonblink = [k for k, n in enumerate(names) if not n.startswith("blink")]
    E[:, nonblink] = np.clip(E[:, nonblink], 0, 0.8)

    # gaze: holds with quick saccades, both eyes together
    kt = _random_keys(rng, dur, (0.4, 2.0))
    yaw_k = rng.uniform(-15, 15, len(kt))
    pit_k = rng.uniform(-10, 10, len(kt))
    i = np.clip(np.searchsorted(kt, times, side="right") - 1, 0, len(kt) - 2)
    w = np.clip((times - kt[i]) / 0.1, 0, 1)  # 0.1 s saccade
    w = w * w * (3 - 2 * w)
    prev = np.maximum(i - 1, 0)
    gyaw = np.radians(yaw_k[prev] * (1 - w) + yaw_k[i] * w)
    gpit = np.radians(pit_k[prev] * (1 - w) + pit_k[i] * w)
    eye_aa = _euler_to_axis_angle(gyaw, gpit, np.zeros(N))

    J = model.num_joints
    rots = np.zeros((N, J, 3))
    rots[:, 0] = _euler_to_axis_angle(_head_motion(rng, times, n_train, 30.0), _head_motion(rng, times, n_train, 15.0), _head_motion(rng, times, n_train, 10.0))
    if "jaw" in model.joint_names:
        rots[:, model.joint_index("jaw"), 0] = jaw
    for name in ("eye_left", "eye_right"):
        if name in model.joint_names:
            rots[:, model.joint_index(name)] = eye_aa
    trans = np.stack([0.006 * np.sin(2 * np.pi * rng.uniform(0.1, 0.3) * times + rng.uniform(0, 6)) for _ in range(3)], -1) * np.array([1.0, 0.7, 1.0])
    shape = np.clip(rng.normal(0, 0.7, model.num_shape), -1.5, 1.5)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return {"shape": f32(shape), "expression": f32(E), "joint_rotations": f32(rots), "translation": f32(trans)}


# =================================================================== renderer
def _as_params(tracking_or_params) -> FrameParams:
    """A Tracking (all its frames), a FrameParams, or a dict of arrays with its keys (``shape`` may be [S])."""
    if isinstance(tracking_or_params, Tracking):
        return tracking_or_params.params(np.arange(tracking_or_params.num_frames))
    p = tracking_or_params
    f = lambda v: None if v is None else torch.as_tensor(v, dtype=torch.float32)  # noqa: E731
    out = FrameParams(f(p.get("shape")), f(p.get("expression")), f(p.get("joint_rotations")), f(p.get("translation")),
                      {k: f(v) for k, v in (p.get("extras") or {}).items()})
    if out.shape is not None and out.shape.dim() == 1:
        out.shape = out.shape[None].expand(out.batch_size, -1)
    return out


def render_synthetic_frames(
    model,
    textures: dict,
    tracking_or_params,
    cameras: Cameras | None = None,
    lighting="head",
    resolution: int | tuple[int, int] | None = None,
    supersample: int = 2,
    backend=None,
    background: float = BACKGROUND,
    device=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render frames of the procedural head: (rgb [N,H,W,3], alpha [N,H,W], parsing [N,H,W]) uint8.

    tracking_or_params: a ``Tracking`` (all its frames) or a ``FrameParams`` (or a dict of arrays with its keys).
    cameras: one per frame (or one for all); None takes them from the Tracking.
    lighting: "head", "world" or a ``Lighting`` object (see the class).
    resolution: output (H, W) or an int; None keeps the cameras' size.
    supersample: render at this many times the resolution and box-filter down (antialiased
    colour and alpha); parsing takes the majority label of each pixel's samples.
    The RGB is composited over a flat ``background`` grey (in sRGB), alpha is the coverage.
    Frames are rendered one at a time, so a frame's pixels never depend on its batch.
    device: where to render (default: CPU); results come back as numpy arrays.
    """
    from headavatar.render.mesh import get_mesh_backend
    from headavatar.render.mesh.ops import texture2d, vertex_normals

    light = make_lighting(lighting)
    params = _as_params(tracking_or_params)
    N = params.batch_size
    if cameras is None:
        if not isinstance(tracking_or_params, Tracking):
            raise UserError("render_synthetic_frames needs cameras when given plain parameters")
        tr = tracking_or_params
        cameras = Cameras(torch.as_tensor(tr.K), torch.as_tensor(tr.R), torch.as_tensor(tr.t), int(round(2 * tr.K[0, 1, 2])), int(round(2 * tr.K[0, 0, 2])))
    if resolution is not None:
        H, W = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        cameras = cameras.resized(H, W)
    H, W = cameras.height, cameras.width
    ss = int(supersample)
    if ss < 1:
        raise UserError(f"supersample must be >= 1 (got {supersample})")
    device = torch.device(device or "cpu")
    model = model.to(device)
    params = params.to(device)
    cams = cameras.resized(H * ss, W * ss).to(device)
    backend = backend or get_mesh_backend("torch")
    faces = model.faces
    tex = torch.cat([torch.as_tensor(textures["albedo"]), torch.as_tensor(textures["roughness"]), torch.as_tensor(textures["specular"])],
                    -1)[None].float().to(device)
    labels = model.face_labels if model.face_labels is not None else torch.ones(faces.shape[0], dtype=torch.int64, device=device)
    labels0 = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), labels.long()])  # index 0 = empty
    root = model.joint_index("root") if "root" in model.joint_names else 0

    rgb_out = np.zeros((N, H, W, 3), np.uint8)
    alpha_out = np.zeros((N, H, W), np.uint8)
    pars_out = np.zeros((N, H, W), np.uint8)
    with torch.no_grad():
        for i in range(N):
            verts = model(params[i])
            cam = cams[i] if len(cams) > 1 else cams
            clip = cam.to_clip(verts)
            rast = backend.rasterize(clip, faces, (H * ss, W * ss))[0].reshape(-1, 4)
            fid = rast[:, 3].long()  # face + 1, 0 where empty
            # shade only the covered samples: interpolate with the rasteriser's
            # perspective-correct barycentrics (what backend.interpolate does, without the
            # full-frame scatter of every attribute)
            pix = (fid > 0).nonzero().squeeze(1)
            f = fid.index_select(0, pix) - 1
            bu, bv = rast[pix, 0:1], rast[pix, 1:2]
            bw = torch.cat([1 - bu - bv, bu, bv], 1)[..., None]  # [P,3,1]

            def interp(attr, idx):
                return (attr[idx[f]] * bw).sum(1)

            uv = interp(model.uvs, model.uv_faces)
            n = torch.nn.functional.normalize(interp(vertex_normals(verts, faces)[0], faces), dim=-1)
            pos = interp(verts[0], faces)
            v = torch.nn.functional.normalize(cam.centers - pos, dim=-1)
            # two-sided: a back face seen through an opening (the neck rim) is lit like a front face
            n = torch.where(((n * v).sum(-1, keepdim=True) < 0), -n, n)
            if light.frame == "head":
                R_root = axis_angle_to_matrix(params.joint_rotations[i, root])
                # row vectors: n_head = R^T n  <=>  n_head^T = n^T R
                n = n @ R_root
                v = v @ R_root
            mat = texture2d(tex, uv[None])[0]
            albedo, rough, spec = mat[:, :3], mat[:, 3:4], mat[:, 4:5]
            col = albedo * light.diffuse(n)
            sp = light.specular(n, v, rough)
            if sp is not None:
                col = col + spec * sp
            # box-filter the supersampled frame: sum the covered samples into their output
            # pixels (premultiplied colour, coverage, label votes); empty samples vote background
            row = torch.div(pix, W * ss, rounding_mode="floor")
            col_i = pix - row * (W * ss)
            out_idx = torch.div(row, ss, rounding_mode="floor") * W + torch.div(col_i, ss, rounding_mode="floor")
            acc = torch.zeros(H * W, 4 + NUM_LABELS, device=device)
            vals = torch.cat([linear_to_srgb(col.clamp(0, 1)), torch.ones_like(col[:, :1]), torch.nn.functional.one_hot(labels0[f + 1], NUM_LABELS).float()], 1)
            acc.index_add_(0, out_idx, vals)
            acc = acc / (ss * ss)
            a_ = acc[:, 3:4]
            acc[:, 4] += 1 - a_[:, 0]  # background votes
            c = acc[:, :3] + background * (1 - a_)
            rgb_out[i] = (c * 255 + 0.5).clamp(0, 255).to(torch.uint8).reshape(H, W, 3).cpu().numpy()
            alpha_out[i] = (a_[:, 0] * 255 + 0.5).clamp(0, 255).to(torch.uint8).reshape(H, W).cpu().numpy()
            pars_out[i] = acc[:, 4:].argmax(-1).to(torch.uint8).reshape(H, W).cpu().numpy()  # majority; ties -> lower label
    return rgb_out, alpha_out, pars_out


# ==================================================================== subject
def make_synthetic_subject(
    out_dir: str | os.PathLike,
    num_frames: int = 120,
    resolution: int = 256,
    seed: int = 0,
    fps: float = DEFAULT_FPS,
    test_fraction: float = TEST_FRACTION,
    overwrite: bool = False,
    lighting="head",
    supersample: int = 2,
    progress: bool = True,
    texture_size: int = 512,
    device=None,
) -> Subject:
    """Render the procedural head into a native subject folder and return it opened.

    Deterministic for a given seed.  The held-out frames are the last ``test_fraction``
    of the clip.  ``lighting``: "head" (lights turn with the head, the default: the
    appearance of a surface point depends only on the expression, as FlashAvatar's
    per-Gaussian colours assume) or "world" (lights fixed in the room).
    """
    if int(resolution) < 32:
        raise UserError(f"resolution must be at least 32 pixels (got {resolution})")
    if int(num_frames) < 2:
        raise UserError(f"a subject needs at least 2 frames (got {num_frames})")
    if not (0.0 < float(test_fraction) < 1.0):
        raise UserError(f"test_fraction must be between 0 and 1 (got {test_fraction})")
    if float(fps) <= 0:
        raise UserError(f"fps must be positive (got {fps})")
    light_name = lighting if isinstance(lighting, str) else type(lighting).__name__
    light = make_lighting(lighting)

    N, S = int(num_frames), int(resolution)
    from headavatar.utils.io import ensure_writable

    out = Path(out_dir)
    if (out / "subject.json").exists() and not overwrite:
        raise UserError(f"{out} already holds a subject; choose another output folder or pass --overwrite")
    ensure_writable(out)
    created = not out.exists()
    try:
        if overwrite:
            clear_subject_files(out)  # a smaller new subject must not inherit the old one's extra frames
        return _write_synthetic(out, N, S, seed, fps, test_fraction, overwrite, light, light_name, supersample, progress, texture_size, device)
    except BaseException:
        if created and out.is_dir():  # nothing half-made is left behind
            shutil.rmtree(out, ignore_errors=True)
        raise


_SUBJECT_FRAME = re.compile(r"^\d{6}\.(png|jpg)$")


def clear_subject_files(out: Path) -> None:
    """Remove what a subject writer owns in ``out`` (subject.json first, then numbered frames,
    alpha and parsing maps, tracking.npz); anything else the user keeps there stays."""
    (out / "subject.json").unlink(missing_ok=True)  # first: the folder stops looking complete
    for sub in ("frames", "alpha", "parsing"):
        d = out / sub
        if d.is_dir():
            for f in d.iterdir():
                if _SUBJECT_FRAME.match(f.name):
                    f.unlink()
    (out / "tracking.npz").unlink(missing_ok=True)


def _write_synthetic(out_dir, N, S, seed, fps, test_fraction, overwrite, light, light_name, supersample, progress, texture_size, device) -> Subject:
    from headavatar.headmodels import load_head_model
    from headavatar.headmodels.procedural_texture import procedural_textures

    writer = SubjectWriter(out_dir, overwrite=overwrite)
    model = load_head_model({"name": "procedural"})
    textures = procedural_textures(model, size=texture_size, seed=seed)
    anim = make_synthetic_animation(model, N, fps=fps, seed=seed, test_fraction=test_fraction)
    K, R, t = synthetic_camera(S, S)
    tracking = Tracking(
        shape=anim["shape"], expression=anim["expression"], joint_rotations=anim["joint_rotations"], translation=anim["translation"],
        K=np.repeat(K[None], N, 0), R=np.repeat(R[None], N, 0), t=np.repeat(t[None], N, 0),
        timestamps=np.arange(N, dtype=np.float64) / float(fps),
    )
    cams = tracking.cameras(np.arange(N), S, S)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=N, desc="rendering synthetic subject", unit="frame")
    for i in range(N):
        rgb, alpha, pars = render_synthetic_frames(model, textures, tracking.subset([i]), cams[i], light, None, supersample, device=device)
        writer.write_frame(i, rgb[0], alpha[0], pars[0])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    split = default_split(N, test_fraction)
    extra = {
        "synthetic": {
            "seed": int(seed), "lighting": light_name, "lighting_spec": lighting_spec(light), "supersample": int(supersample), "background": BACKGROUND,
            "texture": {"size": int(texture_size), "seed": int(seed)},
        }
    }
    return writer.finalize(tracking, {"name": "procedural", "fingerprint": model.fingerprint()}, (S, S), split=split, fps=fps, extra_meta=extra)


__all__ = [
    "make_synthetic_subject", "render_synthetic_frames", "make_synthetic_animation", "synthetic_camera", "capture_lighting", "lighting_spec",
    "lighting_from_spec",
    "StudioLighting", "SHLighting", "FunctionLighting", "Lighting", "make_lighting", "sh9_basis", "BACKGROUND",
]
