"""Eye gaze for head models with separate eyeball meshes (ICT-FaceKit).

Gaze is a per-frame model input, ``extras["gaze"]`` [B,4] = (right yaw,
right pitch, left yaw, left pitch) in radians ("right" is the subject's
right eye), relative to the eye's rest direction and in the head's own frame
(+z forward, +y up; yaw turns towards +x, the subject's left; pitch up).
Zero is the rest pose, so a subject tracked without gaze looks as before.

A model that can express gaze declares its eyeballs in
``meta["eyeballs"]``: per eye the vertex indices, the rest centre and
radius (metres) and the rest viewing direction.  ``HeadModel.forward``
rotates those vertices about their centre before skinning; a model without
them ignores the input.  The centre follows identity and expression as the
mean of the eyeball's vertices plus a fixed offset (the kept front cap's
mean is not the sphere's centre).
"""

from __future__ import annotations

import numpy as np
import torch

GAZE_KEY = "gaze"
EYES = ("right", "left")
GAZE_DIM = 2 * len(EYES)


def _on(entry: dict, key: str, device, dtype=None) -> torch.Tensor:
    """``entry[key]`` as a tensor on ``device``, made once per device (no host-to-device copy per forward)."""
    cache = entry.setdefault("_tensors", {})
    k = (key, str(device), dtype)
    if k not in cache:
        cache[k] = torch.as_tensor(np.asarray(entry[key]), device=device, dtype=dtype)
    return cache[k]


def eyeballs(model) -> dict | None:
    e = model.meta.get("eyeballs") if model.meta else None
    return e if e and all(k in e for k in EYES) else None


def supports_gaze(model) -> bool:
    return eyeballs(model) is not None


def eyeball_spec(template: np.ndarray, vertices: np.ndarray, centre: np.ndarray, radius: float) -> dict:
    """meta entry of one eyeball: its kept vertices, sphere centre and radius, rest direction (template metres)."""
    vertices = np.asarray(vertices, np.int64)
    mean = template[vertices].mean(0)
    fwd = mean - centre
    fwd = fwd / max(np.linalg.norm(fwd), 1e-12)
    # the pupil: the front-most point of the eyeball along its rest direction (what an iris landmark sees)
    pupil = float(((template[vertices] - centre) @ fwd).max())
    return {"vertices": vertices, "centre_offset": (np.asarray(centre) - mean).astype(np.float32),
            "radius": float(radius), "pupil_distance": pupil, "rest_direction": fwd.astype(np.float32)}


def direction_to_angles(d: torch.Tensor) -> torch.Tensor:
    """Unit directions [...,3] -> (yaw, pitch) [...,2]: yaw = atan2(x, z), pitch = asin(y)."""
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.stack([torch.atan2(d[..., 0], d[..., 2]), torch.asin(d[..., 1].clamp(-1, 1))], -1)


def angles_to_matrix(yaw: torch.Tensor, pitch: torch.Tensor) -> torch.Tensor:
    """R_y(yaw) R_x(-pitch) [...,3,3]: takes +z to the direction of (yaw, pitch)."""
    cy, sy, cp, sp = torch.cos(yaw), torch.sin(yaw), torch.cos(pitch), torch.sin(pitch)
    z, o = torch.zeros_like(yaw), torch.ones_like(yaw)
    Ry = torch.stack([cy, z, sy, z, o, z, -sy, z, cy], -1).reshape(yaw.shape + (3, 3))
    Rx = torch.stack([o, z, z, z, cp, sp, z, -sp, cp], -1).reshape(yaw.shape + (3, 3))
    return Ry @ Rx


def eye_rotation(model, gaze: torch.Tensor) -> torch.Tensor:
    """[B,4] gaze -> [B,2,3,3] rotations of the (right, left) eyeballs in the head's rest frame.

    R = A(rest + gaze) A(rest)^T with A(yaw, pitch) = R_y(yaw) R_x(-pitch): it takes the eye's
    rest direction to the direction (rest yaw + yaw, rest pitch + pitch), and gaze 0 is I."""
    eb = eyeballs(model)
    g = gaze.reshape(gaze.shape[0], len(EYES), 2)
    rest = torch.stack([direction_to_angles(_on(eb[e], "rest_direction", gaze.device, gaze.dtype)) for e in EYES])  # [2,2]
    A = angles_to_matrix(g[..., 0] + rest[:, 0], g[..., 1] + rest[:, 1])
    A0 = angles_to_matrix(rest[:, 0], rest[:, 1])
    return A @ A0.transpose(-1, -2)


def eye_centres(model, v: torch.Tensor) -> torch.Tensor:
    """Eyeball centres [B,2,3] of unposed (or rigidly posed, with ``rotate``) vertices [B,V,3]."""
    eb = eyeballs(model)
    out = []
    for e in EYES:
        idx = _on(eb[e], "vertices", v.device)
        out.append(v[:, idx].mean(1) + _on(eb[e], "centre_offset", v.device, v.dtype))
    return torch.stack(out, 1)


def rotate_eyes(model, v_shaped: torch.Tensor, gaze: torch.Tensor | None) -> torch.Tensor:
    """Unposed vertices [B,V,3] with each eyeball turned by ``gaze`` [B,4] about its centre.

    Returns ``v_shaped`` unchanged when the model has no eyeballs or no gaze is given."""
    if gaze is None or not supports_gaze(model):
        return v_shaped
    eb = eyeballs(model)
    B = v_shaped.shape[0]
    gaze = gaze.to(v_shaped.dtype).expand(B, -1) if gaze.shape[0] == 1 else gaze
    R = eye_rotation(model, gaze)
    c = eye_centres(model, v_shaped)
    v = v_shaped.clone()
    for k, e in enumerate(EYES):
        idx = _on(eb[e], "vertices", v.device)
        local = v_shaped[:, idx] - c[:, k, None]
        v[:, idx] = c[:, k, None] + local @ R[:, k].transpose(-1, -2)
    return v
