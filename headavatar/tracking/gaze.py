"""Per-frame eye gaze from MediaPipe's iris landmarks, for head models with eyeballs.

After the fit, each eyeball's centre and the head's rotation at the eye are
known in camera space (the posed eyeball vertices, aligned to their rest
positions by Kabsch).  The iris centre's camera ray meets the sphere on which
the model's pupil turns (radius: the pupil's distance from the eyeball
centre, ``meta["eyeballs"][eye]["pupil_distance"]``); the direction from
the centre to that point, brought into the head's frame and taken relative
to the eye's rest direction, is the gaze (headmodels/gaze.py: yaw, pitch per
eye).  Rendering the model with that gaze puts its pupil on the iris
landmark again (tests/test_tracking.py checks the round trip).

Closed or nearly closed eyes (eyelid gap below ``min_aperture`` of the eye's
width) and lost frames carry no iris: their gaze is interpolated from the
neighbouring frames.  MediaPipe's iris points jitter by about a pixel, which
is several degrees on a small eye, so the angles are smoothed over time
(Gaussian, ``smooth_frames``) and clamped to ``max_angle``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from headavatar.headmodels.gaze import EYES, GAZE_DIM, direction_to_angles, eyeballs, supports_gaze

# MediaPipe indices per eye (subject's right first): iris centre, upper and lower lid middle, eye corners.
IRIS_CENTRE = {"right": 468, "left": 473}
LIDS = {"right": (159, 145), "left": (386, 374)}
CORNERS = {"right": (33, 133), "left": (263, 362)}


@dataclass
class GazeConfig:
    min_aperture: float = 0.12  # lid gap / eye width below which the iris is not trusted (a blink)
    max_angle: float = 0.6  # radians (~35 degrees): farther is a tracking error
    smooth_frames: float = 1.0  # Gaussian sigma in frames (0: none)


def iris_observations(points478: np.ndarray, cfg: GazeConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[N,478,>=2] MediaPipe points -> iris centres [N,2,2] (pixels; right, left) and usable [N,2] bool."""
    cfg = cfg or GazeConfig()
    p = np.asarray(points478, np.float64)[..., :2]
    iris = np.stack([p[:, IRIS_CENTRE[e]] for e in EYES], 1)
    ok = []
    for e in EYES:
        gap = np.linalg.norm(p[:, LIDS[e][0]] - p[:, LIDS[e][1]], axis=-1)
        width = np.linalg.norm(p[:, CORNERS[e][0]] - p[:, CORNERS[e][1]], axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ok.append(np.nan_to_num(gap / width) > cfg.min_aperture)
    ok = np.stack(ok, 1) & np.isfinite(iris).all(-1)
    return iris.astype(np.float32), ok


def _eye_embedding(model, eye: str):
    """(faces, bary) putting one point on each vertex of the eyeball (bary weight 1 on that corner)."""
    idx = np.asarray(eyeballs(model)[eye]["vertices"])
    faces = model.faces.cpu().numpy()
    first = np.full(model.num_vertices, -1, np.int64)
    corner = np.zeros(model.num_vertices, np.int64)
    for c in (2, 1, 0):  # the last write wins: prefer corner 0
        first[faces[:, c]] = np.arange(len(faces))
        corner[faces[:, c]] = c
    f = first[idx]
    keep = f >= 0
    bary = np.zeros((keep.sum(), 3), np.float32)
    bary[np.arange(keep.sum()), corner[idx][keep]] = 1.0
    return f[keep], bary


def _kabsch(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Rotations [N,3,3] with Y - mean(Y) ~ R (X - mean(X)); X, Y [N,K,3]."""
    Xc, Yc = X - X.mean(1, keepdim=True), Y - Y.mean(1, keepdim=True)
    U, _, Vt = torch.linalg.svd(Xc.transpose(1, 2) @ Yc)
    d = torch.sign(torch.det(Vt.transpose(1, 2) @ U.transpose(1, 2)))
    D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    return Vt.transpose(1, 2) @ D @ U.transpose(1, 2)


def eye_frames(model, tracking) -> tuple[torch.Tensor, torch.Tensor]:
    """Posed eyeball centres [N,2,3] (world) and the head's rotation at each eye [N,2,3,3] (rest -> world)."""
    from headavatar.tracking.fit import LandmarkModel

    n = tracking.num_frames
    p = tracking.params(np.arange(n), device=model.template.device)
    extras = {k: v for k, v in p.extras.items() if k != "gaze"}  # the eyes' own rotation is what we look for
    centres, rots = [], []
    with torch.no_grad():
        for e in EYES:
            lm = LandmarkModel(model, _eye_embedding(model, e))
            posed = lm(p.shape, p.expression, p.joint_rotations, p.translation, extras)
            rest = lm(p.shape, p.expression, torch.zeros_like(p.joint_rotations), None, None)
            R = _kabsch(rest, posed)
            off = torch.as_tensor(eyeballs(model)[e]["centre_offset"], dtype=posed.dtype)
            centres.append(posed.mean(1) + (R @ off[:, None])[..., 0])
            rots.append(R)
    return torch.stack(centres, 1), torch.stack(rots, 1)


def estimate_gaze(model, tracking, iris: np.ndarray, usable: np.ndarray | None = None, cfg: GazeConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gaze [N,4] (headmodels/gaze.py layout) and which eyes were observed [N,2], from iris centres [N,2,2] px.

    ``usable`` [N,2]: the observations to trust (default: finite ones on valid frames); the rest are
    interpolated over time.  Returns zeros for a model without eyeballs."""
    cfg = cfg or GazeConfig()
    n = tracking.num_frames
    if not supports_gaze(model):
        return np.zeros((n, GAZE_DIM), np.float32), np.zeros((n, 2), bool)
    iris = np.asarray(iris, np.float64)
    ok = np.isfinite(iris).all(-1) & np.asarray(tracking.valid, bool)[:, None]
    if usable is not None:
        ok &= np.asarray(usable, bool)
    centre, R_eye = eye_frames(model, tracking)
    centre, R_eye = centre.double(), R_eye.double()
    K = torch.as_tensor(tracking.K, dtype=torch.float64)
    Rc = torch.as_tensor(tracking.R, dtype=torch.float64)
    tc = torch.as_tensor(tracking.t, dtype=torch.float64)
    uv1 = torch.cat([torch.as_tensor(np.nan_to_num(iris)), torch.ones(n, 2, 1, dtype=torch.float64)], -1)  # [N,2,3]
    d_cam = torch.linalg.solve(K[:, None], uv1[..., None])[..., 0]
    d = (Rc.transpose(1, 2)[:, None] @ d_cam[..., None])[..., 0]  # ray directions in world [N,2,3]
    d = d / d.norm(dim=-1, keepdim=True)
    o = -(Rc.transpose(1, 2) @ tc[..., None])[..., 0][:, None]  # camera centre in world [N,1,3]
    eb = eyeballs(model)
    r = torch.tensor([eb[e]["pupil_distance"] for e in EYES], dtype=torch.float64)
    oc = centre - o
    b = (d * oc).sum(-1)  # distance along the ray to the point nearest the centre
    disc = b * b - (oc * oc).sum(-1) + r * r
    s = b - disc.clamp_min(0).sqrt()  # the near intersection; a ray that misses: the nearest point
    g = o + s[..., None] * d - centre
    g_head = (R_eye.transpose(-1, -2) @ g[..., None])[..., 0]
    ang = direction_to_angles(g_head)
    rest = torch.stack([direction_to_angles(torch.as_tensor(eb[e]["rest_direction"], dtype=torch.float64)) for e in EYES])
    gaze = (ang - rest).numpy()  # [N,2,2]
    ok &= np.isfinite(gaze).all(-1) & (np.abs(gaze) <= cfg.max_angle).all(-1)
    out = np.zeros_like(gaze)
    t = np.arange(n)
    for k in range(len(EYES)):
        idx = np.flatnonzero(ok[:, k])
        if len(idx) == 0:
            continue
        for c in range(2):
            out[:, k, c] = np.interp(t, idx, gaze[idx, k, c])
    if cfg.smooth_frames > 0 and n > 2:
        out = _gaussian_smooth(out, cfg.smooth_frames)
    return np.clip(out, -cfg.max_angle, cfg.max_angle).reshape(n, GAZE_DIM).astype(np.float32), ok


def _gaussian_smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    r = max(1, int(round(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.concatenate([np.repeat(x[:1], r, 0), x, np.repeat(x[-1:], r, 0)], 0)
    return sum(w * pad[i : i + len(x)] for i, w in enumerate(k))
