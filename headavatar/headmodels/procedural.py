"""The procedural head model: a license-free head built entirely in code.

It is the project's embedded default head model (``load_head_model()``), used
by the synthetic demo subject and by tests.  Everything is computed from the
formulas below; there is no data file and no randomness, so two builds give
bit-identical arrays.

World space follows headavatar.camera: metres, +y up, the face looking +z,
+x towards the subject's left.  The origin sits between the ears, a few
centimetres above the root joint (the head's centre of rotation).

Parts (vertex ranges in ``model.meta["parts"]``):

* ``head``: one lat-long style grid from the crown (a pole) down to an open
  neck rim (the ``boundary`` region).  Rows follow a front and a back
  sagittal profile; columns are denser at the front so the face gets most
  vertices and, because the UVs are the grid indices, most texels.  Facial
  features (nose, brows, lips, chin, eye sockets, cheeks, ears) are smooth
  displacements.  The mouth is a slit: the grid row on the lip line is
  duplicated between the mouth corners (upper and lower lip rows coincide at
  rest) so that opening the jaw opens a hole.
* ``eyeball_left`` / ``eyeball_right``: spherical caps (front 100 degrees),
  rigid to their eye joints, sitting in smooth eye sockets.
* ``lid_*``: upper and lower eyelid shells, slightly larger spheres around
  each eyeball; the eye opening is the gap between their margins.  A blink
  swings the upper lid down past the lower lid's margin.
* ``mouth``: a dark bowl (half ellipsoid) behind the lips, normals pointing
  into the cavity, its lower half following the jaw.
* ``teeth_upper`` / ``teeth_lower``: curved strips behind the lips; the
  lower one is rigid to the jaw.

Identity (shape) modes are exact central differences of the generator with
respect to its named parameters, so every mode moves all parts coherently
(the eyes stay round, the sockets follow the eyes).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from headavatar.constants import LABEL_IDS
from headavatar.headmodels import register_head_model
from headavatar.headmodels.base import HeadModel

JOINT_NAMES = ["root", "neck", "jaw", "eye_left", "eye_right"]
PARENTS = [-1, 0, 1, 1, 1]

SHAPE_NAMES = [
    "head_width", "head_length", "face_length", "nose_size", "nose_length",
    "jaw_width", "chin", "cheek_fullness", "brow_height", "eye_spacing",
]
# generator parameter nudged by each shape mode, and the step that one unit of the mode means
_SHAPE_STEPS = {
    "head_width": 0.05,  # relative width of the skull (about 4 mm a side)
    "head_length": 0.05,  # relative depth of the back of the head
    "face_length": 0.06,  # relative stretch of the face below the eyes
    "nose_size": 0.15,  # relative nose height and width
    "nose_length": 0.003,  # metres of extra tip projection
    "jaw_width": 0.06,  # relative width of the lower face
    "chin": 0.004,  # metres forward/down
    "cheek_fullness": 1.2,  # relative cheek volume
    "brow_height": 0.006,  # metres the brow ridge moves up
    "eye_spacing": 0.002,  # metres per eye, outwards
}
_DEFAULT_PARAMS = {
    "head_width": 1.0, "head_length": 1.0, "face_length": 1.0, "nose_size": 1.0, "nose_length": 0.0,
    "jaw_width": 1.0, "chin": 0.0, "cheek_fullness": 1.0, "brow_height": 0.0, "eye_spacing": 0.0,
}

EXPRESSION_NAMES = [
    "smile", "frown", "brow_raise", "brow_lower", "brow_inner_up", "blink_L", "blink_R", "squint",
    "mouth_pucker", "lip_stretch", "lip_funnel", "lips_part", "cheek_puff", "nose_wrinkle",
    "mouth_left", "mouth_right",
]

# Sagittal profiles, one row per knot, from the crown (pole) to the neck rim:
# front (z, y), back (z, y), half width at the side, flatness exponent of the front half.
_PROFILE = np.array([
    [-0.005, 0.126, -0.005, 0.126, 0.000, 1.00],
    [0.020, 0.1245, -0.030, 0.1235, 0.030, 1.00],
    [0.045, 0.116, -0.055, 0.114, 0.050, 1.00],
    [0.075, 0.094, -0.088, 0.090, 0.068, 0.95],
    [0.088, 0.067, -0.102, 0.060, 0.075, 0.85],
    [0.091, 0.047, -0.106, 0.036, 0.076, 0.80],
    [0.089, 0.030, -0.104, 0.016, 0.075, 0.78],
    [0.090, 0.006, -0.098, -0.004, 0.072, 0.78],
    [0.091, -0.012, -0.092, -0.017, 0.069, 0.78],
    [0.092, -0.028, -0.085, -0.029, 0.066, 0.80],
    [0.090, -0.045, -0.078, -0.039, 0.062, 0.85],
    [0.086, -0.060, -0.071, -0.049, 0.058, 0.90],
    [0.071, -0.076, -0.064, -0.058, 0.055, 0.95],
    [0.048, -0.085, -0.059, -0.068, 0.052, 1.00],
    [0.040, -0.097, -0.056, -0.085, 0.051, 1.00],
    [0.043, -0.121, -0.058, -0.121, 0.053, 1.00],
])
_MOUTH_KNOT = 9  # the lip line is the row through this knot
MOUTH_Y = -0.028
MOUTH_HALF_WIDTH = 0.0245
EYE_RADIUS = 0.012
_EYE_Y = 0.033
_EYE_X = 0.032
_LID_R_UP = EYE_RADIUS + 0.0012
_LID_R_LO = EYE_RADIUS + 0.0006
_EYE_CAP_DEG = 100.0

# UV atlas charts: (u0, v0, u1, v1) rectangles or (cu, cv, r) discs
_UV_HEAD = (0.004, 0.285, 0.996, 0.996)
_UV_EYE = {"right": (0.066, 0.14, 0.062), "left": (0.196, 0.14, 0.062)}
_UV_MOUTH = (0.33, 0.14, 0.066)
_UV_LIDS = {
    "upper_right": (0.41, 0.165, 0.57, 0.275), "upper_left": (0.59, 0.165, 0.75, 0.275),
    "lower_right": (0.41, 0.035, 0.57, 0.125), "lower_left": (0.59, 0.035, 0.75, 0.125),
}
_UV_TEETH = {"upper": (0.765, 0.150, 0.995, 0.205), "lower": (0.765, 0.080, 0.995, 0.135)}


# ----------------------------------------------------------------- helpers
def _smoothstep(e0, e1, x):
    t = np.clip((np.asarray(x, dtype=np.float64) - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _pchip(xk: np.ndarray, yk: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Monotone cubic interpolation (Fritsch-Carlson); xk increasing, yk [K] or [K,D]."""
    xk = np.asarray(xk, np.float64)
    yk = np.asarray(yk, np.float64)
    squeeze = yk.ndim == 1
    if squeeze:
        yk = yk[:, None]
    h = np.diff(xk)[:, None]
    delta = np.diff(yk, axis=0) / h
    d = np.zeros_like(yk)
    # interior slopes: weighted harmonic mean where the secant slopes agree in sign, else flat
    w1 = 2 * h[1:] + h[:-1]
    w2 = h[1:] + 2 * h[:-1]
    same = delta[:-1] * delta[1:] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        hm = (w1 + w2) / (w1 / delta[:-1] + w2 / delta[1:])
    d[1:-1] = np.where(same, hm, 0.0)
    d[0] = delta[0]
    d[-1] = delta[-1]
    x = np.clip(np.asarray(x, np.float64), xk[0], xk[-1])
    i = np.clip(np.searchsorted(xk, x, side="right") - 1, 0, len(xk) - 2)
    hh = h[i, 0][..., None]
    t = ((x - xk[i]) / h[i, 0])[..., None]
    h00 = (1 + 2 * t) * (1 - t) ** 2
    h10 = t * (1 - t) ** 2
    h01 = t * t * (3 - 2 * t)
    h11 = t * t * (t - 1)
    out = h00 * yk[i] + h10 * hh * d[i] + h01 * yk[i + 1] + h11 * hh * d[i + 1]
    return out[..., 0] if squeeze else out


def _gauss(x, y, cx, cy, sx, sy):
    return np.exp(-(((x - cx) / sx) ** 2) - (((y - cy) / sy) ** 2))


def _softmin0(x, k=0.01):
    """Smooth min(x, 0)."""
    return 0.5 * (x - np.sqrt(x * x + k * k)) + 0.5 * k


# ------------------------------------------------------------- the layout
class _Layout:
    """Everything about the topology that does not depend on the shape parameters."""

    def __init__(self, resolution: float):
        if not (0.25 <= resolution <= 4.0):
            raise ValueError("procedural head: resolution must be in [0.25, 4]")
        self.nc = 2 * max(12, int(round(48 * resolution)))  # head columns (even: symmetric)
        self.nr = max(20, int(round(84 * resolution)))  # head rows below the pole
        self.eye_rings = max(4, int(round(10 * resolution)))
        self.eye_seg = max(8, int(round(24 * resolution)))
        self.lid_rows = max(3, int(round(6 * resolution)))
        self.lid_cols = max(6, int(round(16 * resolution)))
        self.mouth_rings = max(3, int(round(7 * resolution)))
        self.mouth_seg = max(8, int(round(20 * resolution)))
        self.teeth_cols = max(6, int(round(16 * resolution)))

        # knot parameter: arc length of the front profile
        seg = np.linalg.norm(np.diff(_PROFILE[:, :2], axis=0), axis=1)
        self.knot_u = np.concatenate([[0.0], np.cumsum(seg)]) / seg.sum()
        self.u_mouth = float(self.knot_u[_MOUTH_KNOT])
        self.u_eye = float(self.knot_u[6])

        # columns: a in [-pi, pi), 0 = front, by a density that favours the face and the eyes
        aa = np.linspace(0.0, math.pi, 2001)
        dens = 0.30 + 0.75 * np.exp(-((aa / 1.0) ** 2)) + 0.35 * np.exp(-(((aa - 0.38) / 0.14) ** 2))
        cum = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]))])
        half = np.interp(np.linspace(0, cum[-1], self.nc // 2 + 1), cum, aa)
        half[0], half[-1] = 0.0, math.pi
        self.col_a = np.concatenate([-half[::-1][:-1], half[:-1]])  # -pi .. pi - step, symmetric

        self.row_u = self._row_params()
        self.mouth_row = int(np.argmin(np.abs(self.row_u - self.u_mouth)))
        self.slit_cols = None  # set once the surface is known (needs the corner x)

    def _row_params(self) -> np.ndarray:
        """Rows placed by arc length along the face centre line, denser at eyes and mouth."""
        uu = np.linspace(0.0, 1.0, 4001)
        pts = _centre_line(uu, self)
        ds = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        ymid = 0.5 * (pts[1:, 1] + pts[:-1, 1])
        dens = (
            0.55
            + 0.55 * _smoothstep(0.075, 0.055, ymid) * _smoothstep(-0.09, -0.07, ymid)  # face
            + 1.3 * np.exp(-(((ymid - _EYE_Y) / 0.011) ** 2))  # eyes
            + 1.5 * np.exp(-(((ymid - MOUTH_Y) / 0.011) ** 2))  # lips
            + 0.5 * np.exp(-(((ymid - 0.002) / 0.01) ** 2))  # nose tip
        )
        cum = np.concatenate([[0.0], np.cumsum(ds * dens)])
        cum /= cum[-1]
        # split the row budget at the lip line so one row lies exactly on it
        cm = np.interp(self.u_mouth, uu, cum)
        n_top = int(round(self.nr * cm))
        top = np.interp(np.linspace(0, cm, n_top + 1), cum, uu)
        bot = np.interp(np.linspace(cm, 1.0, self.nr - n_top + 1), cum, uu)
        rows = np.concatenate([top, bot[1:]])
        rows[n_top] = self.u_mouth
        return rows


def _profile_at(u: np.ndarray, layout: _Layout) -> np.ndarray:
    return _pchip(layout.knot_u, _PROFILE, u)


def _base_surface(a: np.ndarray, u: np.ndarray, layout: _Layout, P: dict, prof: np.ndarray | None = None) -> np.ndarray:
    """Head surface before facial features: rows are closed curves between the two profiles."""
    pr = _profile_at(u, layout) if prof is None else prof
    fz, fy, bz, by, W, q = (pr[..., k] for k in range(6))
    bz = bz * P["head_length"]  # head length scales the back profile
    ca, sa = np.cos(a), np.sin(a)
    zc = 0.5 * (fz + bz)
    D = 0.5 * (fz - bz)
    # a superellipse front half (flatter face) joined C1 to an elliptic back half
    cpow = np.where(ca > 0, np.abs(ca) ** q, ca)
    x = W * sa
    z = zc + D * cpow
    y = by + (fy - by) * 0.5 * (1 + ca)
    return np.stack([x, y, z], -1)


def _centre_line(u: np.ndarray, layout: _Layout) -> np.ndarray:
    a = np.zeros_like(u)
    p = _base_surface(a, u, layout, _DEFAULT_PARAMS)
    p[:, 2] += _front_features(p[:, 0], p[:, 1], np.ones_like(u), _DEFAULT_PARAMS)
    return p


_NOSE_Y = np.array([-0.016, -0.011, -0.007, -0.002, 0.004, 0.012, 0.025, 0.038, 0.047])
_NOSE_HW = np.array([  # ridge height, half width
    [0.0, 0.004, 0.014, 0.021, 0.020, 0.014, 0.007, 0.002, 0.0],
    [0.010, 0.011, 0.011, 0.0105, 0.0095, 0.0085, 0.007, 0.0065, 0.0065],
]).T


def _front_features(x, y, front, P: dict, x_corner: float = MOUTH_HALF_WIDTH, nose_hw: np.ndarray | None = None) -> np.ndarray:
    """Forward (z) displacement of the face: nose, brows, lips, chin, cheeks (eyes: _eye_skin)."""
    ns = P["nose_size"]
    ax = np.abs(x)
    # nose: a ridge whose height and width vary down the face, plus the alar wings
    hw = _pchip(_NOSE_Y, _NOSE_HW, y) if nose_hw is None else nose_hw
    H = hw[..., 0] * ns + P["nose_length"] * np.exp(-(((y - 0.001) / 0.007) ** 2))
    w = hw[..., 1] * math.sqrt(ns)
    dz = H * np.exp(-((x / w) ** 2))
    dz += 0.0055 * ns * _gauss(ax, y, 0.0125, -0.004, 0.0055, 0.0045)
    # brow ridge and glabella
    yb = 0.047 + P["brow_height"]
    dz += 0.0045 * _gauss(ax, y, 0.030, yb, 0.021, 0.008)
    dz += 0.002 * _gauss(x, y, 0.0, 0.045, 0.012, 0.008)
    # cheekbones and cheeks
    dz += 0.0035 * _gauss(ax, y, 0.046, 0.010, 0.016, 0.014)
    dz += 0.003 * P["cheek_fullness"] * _gauss(ax, y, 0.043, -0.018, 0.018, 0.017)
    # muzzle (the convex region around the mouth), lips, philtrum, labiomental fold, chin
    dz += 0.006 * _gauss(x, y, 0.0, MOUTH_Y, 0.028, 0.022)
    lip_x = np.clip(1 - (x / x_corner) ** 2, 0, None) ** 0.6
    dz += 0.0048 * lip_x * np.exp(-(((y - (MOUTH_Y + 0.0048)) / 0.0042) ** 2))
    dz += 0.0058 * lip_x * np.exp(-(((y - (MOUTH_Y - 0.0062)) / 0.0050) ** 2))
    dz -= 0.0010 * np.exp(-((x / 0.0035) ** 2)) * _smoothstep(MOUTH_Y + 0.006, MOUTH_Y + 0.011, y) * _smoothstep(-0.008, -0.013, y)
    dz -= 0.002 * _gauss(x, y, 0.0, MOUTH_Y - 0.017, 0.016, 0.0045)
    dz += (0.0045 + P["chin"]) * _gauss(x, y, 0.0, -0.060 - 0.5 * P["chin"], 0.016, 0.012)
    # temples
    dz -= 0.003 * _gauss(ax, y, 0.066, 0.055, 0.012, 0.018)
    return dz * front


def _eye_skin(x, y, z, eye: dict, front) -> np.ndarray:
    """Skin depth around each eye: over the lid shells outside a crease ellipse, behind them inside.

    Outside the crease the skin is pushed forward (never back) to just in front of the upper
    lid shell, which hides the lid shells' edges (the face recedes fast beside the eye);
    inside it the skin follows the eyeball 1.5 mm behind its surface, so lids and eyeball
    show there.  The crease is where the skin meets the lid shells.
    """
    ex, ey, ez = eye["x"], eye["y"], eye["z"]
    dx = np.abs(x) - ex
    dy = y - (ey + 0.0005)
    q = (dx / 0.0128) ** 2 + (dy / np.where(dy > 0, 0.0098, 0.0088)) ** 2
    d2 = dx * dx + dy * dy
    hug = ez + np.sqrt(np.clip((_LID_R_UP + 0.0009) ** 2 - d2, 0, None))
    inner = ez + np.maximum(np.sqrt(np.clip(EYE_RADIUS**2 - d2, 0, None)) - 0.0015, -0.002)
    k = 0.0008  # smooth max width
    smax = 0.5 * (z + hug + np.sqrt((z - hug) ** 2 + k * k))
    z_out = z + (1 - _smoothstep(1.3, 2.6, q)) * front * (smax - z)
    z_in = np.minimum(z_out, inner)
    # a wide transition above and below the eye (smooth crease), a narrow one at the corners
    lat = dx * dx / (d2 + 1e-12)
    q0 = 0.45 + 0.33 * lat
    t = 1 - np.clip((q - q0) / (1.0 - q0), 0, 1)
    t = t * t * (3 - 2 * t)
    return z_out + t * front * (z_in - z_out)


def _ear_offset(x, y, z, side_mask):
    """Outward (x) bump on each side: a simple ear."""
    return np.sign(x) * 0.007 * side_mask * np.exp(-(((y - 0.016) / 0.021) ** 2) - (((z + 0.006) / 0.016) ** 2))


class _Generator:
    """Evaluates vertex positions of every part for a given parameter dict."""

    def __init__(self, layout: _Layout):
        self.L = layout
        L = layout
        A, U = np.meshgrid(L.col_a, L.row_u[1:], indexing="xy")  # rows below the pole
        self.grid_a = A
        self.grid_u = U
        self.front = _smoothstep(0.15, 0.55, np.cos(A))
        self.side = _smoothstep(0.8, 0.97, np.abs(np.sin(A)))
        # mouth corners: the first columns outside the slit
        base = _base_surface(A[L.mouth_row - 1], U[L.mouth_row - 1], L, _DEFAULT_PARAMS)
        slit = np.abs(base[:, 0]) < MOUTH_HALF_WIDTH
        slit &= np.cos(L.col_a) > 0
        L.slit_cols = np.nonzero(slit)[0]
        outside_x = np.abs(base[~slit & (np.cos(L.col_a) > 0), 0]).min()
        self.x_corner = float(outside_x)  # the corner vertices
        self._eye_start = (0.4, layout.u_eye)
        self._grid_prof = _profile_at(U, L)
        y0 = _base_surface(A, U, L, _DEFAULT_PARAMS, self._grid_prof)[..., 1]
        self._grid_nose = _pchip(_NOSE_Y, _NOSE_HW, y0)

    # eye centre (unwarped) for parameters P
    def eye(self, P: dict) -> dict:
        ex = _EYE_X + P["eye_spacing"]
        # skin depth at the eye centre (without the socket): solve surface(a, u) = (ex, ey) by
        # Newton, all probes of one step in one vectorised call, warm-started from the last solve
        a, u = self._eye_start
        h = 1e-6
        for _ in range(10):
            pa = np.array([a, a + h, a - h, a, a])
            pu = np.array([u, u, u, u + h, u - h])
            xy = self._surface_point(pa, pu, P, with_socket=False)[:, :2]
            f = xy[0] - np.array([ex, _EYE_Y])
            if np.abs(f).max() < 1e-10:
                break
            J = np.stack([(xy[1] - xy[2]) / (2 * h), (xy[3] - xy[4]) / (2 * h)], 1)
            da, du = np.linalg.solve(J, f)
            a, u = a - da, u - du
        self._eye_start = (a, u)
        p = self._surface_point(np.array([a]), np.array([u]), P, with_socket=False)[0]
        ez = p[2] - EYE_RADIUS - 0.0008  # the cornea sits just behind the skin level
        return {"x": ex, "y": _EYE_Y, "z": float(ez)}

    def _surface_point(self, a, u, P, with_socket=True):
        p = _base_surface(a, u, self.L, P)
        front = _smoothstep(0.15, 0.55, np.cos(a))
        p[..., 2] += _front_features(p[..., 0], p[..., 1], front, P, self.x_corner)
        if with_socket:
            p[..., 2] = _eye_skin(p[..., 0], p[..., 1], p[..., 2], self.eye(P), front)
        return p

    def evaluate(self, P: dict) -> dict[str, np.ndarray]:
        L = self.L
        eye = self.eye(P)
        # ---- head grid (profile and nose curves cached: rows' heights do not depend on P)
        p = _base_surface(self.grid_a, self.grid_u, L, P, self._grid_prof)
        p[..., 2] += _front_features(p[..., 0], p[..., 1], self.front, P, self.x_corner, self._grid_nose)
        p[..., 2] = _eye_skin(p[..., 0], p[..., 1], p[..., 2], eye, self.front)
        p[..., 0] += _ear_offset(p[..., 0], p[..., 1], p[..., 2], self.side)
        pole = _base_surface(np.zeros(1), np.zeros(1), L, P)
        parts = {"head": np.concatenate([pole, p.reshape(-1, 3), p[L.mouth_row - 1, L.slit_cols]], 0)}
        # ---- eyes and lids (built for the right eye, mirrored for the left)
        for side, sgn in (("right", -1.0), ("left", 1.0)):
            c = np.array([sgn * eye["x"], eye["y"], eye["z"]])
            parts[f"eyeball_{side}"] = c + _eye_cap_dirs(L) * EYE_RADIUS
            parts[f"lid_upper_{side}"] = c + _lid_points(L, "upper", 0.0)
            parts[f"lid_lower_{side}"] = c + _lid_points(L, "lower", 0.0)
        # ---- mouth interior and teeth, anchored to the lips' depth
        lip_z = float(p[L.mouth_row - 1, L.slit_cols[len(L.slit_cols) // 2], 2])
        parts["mouth"] = _mouth_points(L, lip_z)
        parts["teeth_upper"], parts["teeth_lower"] = _teeth_points(L, lip_z)
        return self._warp(parts, P, eye)

    def _warp(self, parts: dict, P: dict, eye: dict) -> dict:
        """Global proportions (width, length, jaw, face length) applied to every part alike."""

        def warp(v):
            x, y, z = v[..., 0], v[..., 1], v[..., 2]
            kw = P["head_width"] - 1.0
            kj = P["jaw_width"] - 1.0
            m_skull = _smoothstep(-0.03, 0.02, y)
            m_jaw = _smoothstep(-0.11, -0.075, y) * _smoothstep(0.01, -0.03, y)
            x2 = x * (1 + kw * m_skull + kj * m_jaw)
            y2 = y + (P["face_length"] - 1.0) * _softmin0(y - 0.035, 0.01)
            return np.stack([x2, y2, z], -1)

        out = {}
        for name, v in parts.items():
            if name.startswith(("eyeball_", "lid_")):
                side = name.rsplit("_", 1)[1]
                c = np.array([(-1.0 if side == "right" else 1.0) * eye["x"], eye["y"], eye["z"]])
                out[name] = v + (warp(c) - c)  # rigid: the eye must stay round
            else:
                out[name] = warp(v)
        return out


def _eye_cap_rings(L: _Layout) -> np.ndarray:
    # rings up to 90 degrees evenly, then one more ring past the equator
    return np.concatenate([np.linspace(0, 90, L.eye_rings + 1)[1:], [_EYE_CAP_DEG]]) * math.pi / 180


def _eye_cap_dirs(L: _Layout) -> np.ndarray:
    al = _eye_cap_rings(L)
    ps = 2 * math.pi * np.arange(L.eye_seg) / L.eye_seg
    AL, PS = np.meshgrid(al, ps, indexing="ij")
    ring = np.stack([np.sin(AL) * np.cos(PS), np.sin(AL) * np.sin(PS), np.cos(AL)], -1).reshape(-1, 3)
    return np.concatenate([[[0.0, 0.0, 1.0]], ring], 0)


# eyelid shells: elevation beta (up = +), azimuth phi (towards +x) around the eye centre
_LID_PHI = math.radians(72)
_LID_CORNER = math.radians(65)
_BETA_UP_MARGIN = math.radians(20)
_BETA_LO_MARGIN = math.radians(-20)
_BETA_TOP = math.radians(76)
_BETA_BOT = math.radians(-68)


def _lid_margin(kind: str, phi: np.ndarray, closed: float = 0.0) -> np.ndarray:
    t = 1 - (phi / _LID_CORNER) ** 2  # 0 at the corners, negative beyond (lids overlap there)
    lo = _BETA_LO_MARGIN * t
    if kind == "lower":
        return lo
    up = _BETA_UP_MARGIN * t
    shut = lo - math.radians(9)  # closed: below the lower margin everywhere
    return up + closed * (shut - up)


def _lid_params(L: _Layout):
    s = np.linspace(0, 1, L.lid_rows + 1)  # 0 at the hidden edge, 1 at the margin
    phi = np.linspace(-_LID_PHI, _LID_PHI, L.lid_cols + 1)
    return np.meshgrid(s, phi, indexing="ij")


def _lid_points(L: _Layout, kind: str, closed: float, raise_deg: float = 0.0) -> np.ndarray:
    S, PH = _lid_params(L)
    if kind == "upper":
        beta = _BETA_TOP + S * (_lid_margin("upper", PH, closed) - _BETA_TOP)
        # the closed lid sits a little further out so the straight blend path clears the eyeball
        r = _LID_R_UP + 0.0005 * closed * S
    else:
        beta = _BETA_BOT + S * (_lid_margin("lower", PH) + math.radians(raise_deg) - _BETA_BOT)
        r = _LID_R_LO + 0 * S
    d = np.stack([np.cos(beta) * np.sin(PH), np.sin(beta), np.cos(beta) * np.cos(PH)], -1)
    return (r[..., None] * d).reshape(-1, 3)


def _mouth_params(L: _Layout):
    g = np.linspace(0, 1, L.mouth_rings + 1)[1:] * (math.pi / 2)  # from the back pole to the rim
    w = 2 * math.pi * np.arange(L.mouth_seg) / L.mouth_seg
    return np.meshgrid(g, w, indexing="ij")


_MOUTH_AXES = (0.029, 0.021, 0.030)


def _mouth_points(L: _Layout, lip_z: float) -> np.ndarray:
    G, Wg = _mouth_params(L)
    ax, ay, az = _MOUTH_AXES
    cz = lip_z - 0.016
    ring = np.stack([ax * np.sin(G) * np.cos(Wg), MOUTH_Y + ay * np.sin(G) * np.sin(Wg), cz - az * np.cos(G)], -1).reshape(-1, 3)
    return np.concatenate([[[0.0, MOUTH_Y, cz - az]], ring], 0)


def _teeth_points(L: _Layout, lip_z: float):
    R = 0.027
    phi_max = math.asin(0.021 / R)
    phi = np.linspace(-phi_max, phi_max, L.teeth_cols + 1)
    out = []
    for _kind, (y0, y1), back in (("upper", (MOUTH_Y - 0.0004, MOUTH_Y + 0.0085), 0.0035), ("lower", (MOUTH_Y - 0.008, MOUTH_Y + 0.0003), 0.0048)):
        zf = lip_z - back
        ys = np.linspace(y1, y0, 3)
        PH, Y = np.meshgrid(phi, ys, indexing="ij")
        pts = np.stack([R * np.sin(PH), Y, zf - R * (1 - np.cos(PH))], -1)
        out.append(pts.reshape(-1, 3))
    return out[0], out[1]


# ------------------------------------------------------------ topology
def _grid_faces(rows: int, cols: int, index, wrap: bool, mirror_a=None) -> list:
    """Two triangles per quad of an index grid; orientation is fixed by the caller."""
    faces = []
    jmax = cols if wrap else cols - 1
    for i in range(rows - 1):
        for j in range(jmax):
            j1 = (j + 1) % cols
            v00, v01, v10, v11 = index(i, j), index(i, j1), index(i + 1, j), index(i + 1, j1)
            if mirror_a is not None and mirror_a[j]:
                faces += [(v00, v10, v01), (v01, v10, v11)]
            else:
                faces += [(v00, v10, v11), (v00, v11, v01)]
    return faces


def _flip_mask(faces: np.ndarray, verts: np.ndarray, towards: np.ndarray, sign: float) -> np.ndarray:
    """Faces whose normal points towards (sign=+1) / away from (sign=-1) ``towards`` need flipping."""
    p = verts[faces]
    n = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    c = p.mean(1) - towards
    return sign * (n * c).sum(-1) < 0


class _Builder:
    """Concatenates the parts into one mesh with one UV atlas."""

    ORDER = ["head", "eyeball_left", "eyeball_right", "lid_upper_left", "lid_upper_right",
             "lid_lower_left", "lid_lower_right", "mouth", "teeth_upper", "teeth_lower"]

    def __init__(self, L: _Layout):
        self.L = L
        self.parts: dict[str, tuple[int, int]] = {}

    def build(self, verts_by_part: dict) -> None:
        L = self.L
        start = 0
        for name in self.ORDER:
            n = verts_by_part[name].shape[0]
            self.parts[name] = (start, start + n)
            start += n
        V = np.concatenate([verts_by_part[n] for n in self.ORDER], 0)
        faces, uvs, uv_faces, face_part = [], [], [], []

        def add(part, f, uv, uvf, towards=None, sign=1.0):
            f = np.asarray(f, np.int64)
            uvf = np.asarray(uvf, np.int64)
            if towards is not None:
                flip = _flip_mask(f, V, towards, sign)
                f[flip] = f[flip][:, [0, 2, 1]]
                uvf[flip] = uvf[flip][:, [0, 2, 1]]
            uvf = uvf + sum(len(u) for u in uvs)
            faces.append(f)
            uvs.append(np.asarray(uv, np.float64))
            uv_faces.append(uvf)
            face_part.append(np.full(len(f), self.ORDER.index(part), np.int64))

        # ---------- head grid (winding fixed by construction: rows go down, columns towards +x at the front)
        nc, nr = L.nc, L.nr
        h0 = self.parts["head"][0]
        slit_lower = {int(j): h0 + 1 + nr * nc + k for k, j in enumerate(L.slit_cols)}

        def huv(i, j):  # uv index of grid row i >= 1, column 0..nc (column nc = the seam copy)
            return nc + (i - 1) * (nc + 1) + j

        u0, v0, u1, v1 = _UV_HEAD
        pole_uv = np.stack([u0 + (u1 - u0) * (np.arange(nc) + 0.5) / nc, np.full(nc, v1)], 1)
        gu, gv = np.meshgrid(u0 + (u1 - u0) * np.arange(nc + 1) / nc, v1 - (v1 - v0) * np.arange(1, nr + 1) / nr, indexing="xy")
        huvs = np.concatenate([pole_uv, np.stack([gu, gv], -1).reshape(-1, 2)])
        j = np.arange(nc)
        j1 = (j + 1) % nc
        f = [np.stack([np.full(nc, h0), h0 + 1 + j, h0 + 1 + j1], 1)]
        uf = [np.stack([j, huv(1, j), huv(1, j + 1)], 1)]
        mirror = (L.col_a + math.pi / L.nc) >= 0  # mirrored diagonals keep the mesh left/right symmetric
        for i in range(1, nr):
            top = h0 + 1 + (i - 1) * nc + j
            if i == L.mouth_row:  # quads below the lip line use the lower lip copies
                top = top.copy()
                for jj, v in slit_lower.items():
                    top[jj] = v
            v00, v01 = top[j], top[j1]
            v10, v11 = h0 + 1 + i * nc + j, h0 + 1 + i * nc + j1
            t00, t01, t10, t11 = huv(i, j), huv(i, j + 1), huv(i + 1, j), huv(i + 1, j + 1)
            a1 = np.where(mirror[:, None], np.stack([v00, v10, v01], 1), np.stack([v00, v10, v11], 1))
            a2 = np.where(mirror[:, None], np.stack([v01, v10, v11], 1), np.stack([v00, v11, v01], 1))
            b1 = np.where(mirror[:, None], np.stack([t00, t10, t01], 1), np.stack([t00, t10, t11], 1))
            b2 = np.where(mirror[:, None], np.stack([t01, t10, t11], 1), np.stack([t00, t11, t01], 1))
            f += [a1, a2]
            uf += [b1, b2]
        # interleave the two triangles of each quad
        f = np.concatenate([f[0]] + [np.stack([x1, x2], 1).reshape(-1, 3) for x1, x2 in zip(f[1::2], f[2::2])])
        uf = np.concatenate([uf[0]] + [np.stack([x1, x2], 1).reshape(-1, 3) for x1, x2 in zip(uf[1::2], uf[2::2])])
        add("head", f, huvs, uf)

        # ---------- eyeballs: pole fan + rings on a disc chart, normals outwards
        al = _eye_cap_rings(L)
        ns = L.eye_seg
        for side in ("left", "right"):
            b0 = self.parts[f"eyeball_{side}"][0]
            cu, cv, R = _UV_EYE[side]
            uv = [(cu, cv)]
            for k in range(len(al)):
                rr = R * al[k] / al[-1]
                uv += [(cu + rr * math.cos(2 * math.pi * m / ns), cv + rr * math.sin(2 * math.pi * m / ns)) for m in range(ns)]
            f = _fan_rings(len(al), ns)
            add(f"eyeball_{side}", f + b0, uv, f, towards=V[b0] - np.array([0, 0, EYE_RADIUS]))

        # ---------- eyelids: rectangular grids, normals away from the eye centre
        nlr, nlc = L.lid_rows + 1, L.lid_cols + 1
        for kind in ("upper", "lower"):
            for side in ("left", "right"):
                name = f"lid_{kind}_{side}"
                b0 = self.parts[name][0]
                lu0, lv0, lu1, lv1 = _UV_LIDS[f"{kind}_{side}"]
                uv = []
                for i in range(nlr):
                    t = i / (nlr - 1)  # the margin (last row) at the chart's bottom (upper) / top (lower)
                    vv = lv1 - (lv1 - lv0) * t if kind == "upper" else lv0 + (lv1 - lv0) * t
                    uv += [(lu0 + (lu1 - lu0) * j / (nlc - 1), vv) for j in range(nlc)]
                f = np.array(_grid_faces(nlr, nlc, lambda i, j: i * nlc + j, wrap=False))
                eb = self.parts[f"eyeball_{side}"][0]
                add(name, f + b0, uv, f, towards=V[eb] - np.array([0, 0, EYE_RADIUS]))

        # ---------- mouth bowl: back pole + rings, normals into the cavity
        b0, b1 = self.parts["mouth"]
        nm = L.mouth_seg
        cu, cv, R = _UV_MOUTH
        uv = [(cu, cv)]
        for k in range(L.mouth_rings):
            rr = R * (k + 1) / L.mouth_rings
            uv += [(cu + rr * math.cos(2 * math.pi * m / nm), cv + rr * math.sin(2 * math.pi * m / nm)) for m in range(nm)]
        f = _fan_rings(L.mouth_rings, nm)
        centre = np.array([0.0, MOUTH_Y, V[b1 - 1, 2]])  # a point on the rim plane
        add("mouth", f + b0, uv, f, towards=centre, sign=-1.0)

        # ---------- teeth strips: normals out of the dental arch
        nt = L.teeth_cols + 1
        for kind in ("upper", "lower"):
            name = f"teeth_{kind}"
            b0, b1 = self.parts[name]
            tu0, tv0, tu1, tv1 = _UV_TEETH[kind]
            uv = [(tu0 + (tu1 - tu0) * j / (nt - 1), tv1 - (tv1 - tv0) * i / 2) for j in range(nt) for i in range(3)]
            f = np.array(_grid_faces(nt, 3, lambda j, i: j * 3 + i, wrap=False))
            pts = V[b0:b1]
            arch_c = np.array([0.0, pts[:, 1].mean(), pts[:, 2].max() - 0.027])
            add(name, f + b0, uv, f, towards=arch_c)

        self.faces = np.concatenate(faces)
        self.uvs = np.concatenate(uvs)
        self.uv_faces = np.concatenate(uv_faces)
        self.face_part = np.concatenate(face_part)


def _fan_rings(rings: int, seg: int) -> np.ndarray:
    """Faces of a pole (index 0) plus ``rings`` rings of ``seg`` vertices (index 1 + k*seg + m)."""
    idx = lambda k, m: 1 + k * seg + (m % seg)  # noqa: E731
    f = [(0, idx(0, m), idx(0, m + 1)) for m in range(seg)]
    for k in range(rings - 1):
        for m in range(seg):
            f += [(idx(k, m), idx(k + 1, m), idx(k + 1, m + 1)), (idx(k, m), idx(k + 1, m + 1), idx(k, m + 1))]
    return np.array(f, np.int64)


# --------------------------------------------------------- masks, weights
def _hairline(absa: np.ndarray) -> np.ndarray:
    """Height of the hairline around the head (|azimuth| -> y): forehead, temples, sideburns, nape."""
    ak = np.radians([0, 30, 55, 72, 82, 92, 104, 118, 140, 180])
    yk = np.array([0.082, 0.080, 0.066, 0.052, 0.030, 0.040, 0.036, 0.018, -0.015, -0.040])
    return _pchip(ak, yk, absa)


def _brow_mask(x, y, front):
    ax = np.abs(x)
    t = np.clip((ax - 0.012) / 0.045, 0, 1)  # 0 at the inner end, 1 at the outer end
    yc = 0.0465 + 0.0045 * np.sin(np.pi * np.clip(t * 0.9 + 0.1, 0, 1)) - 0.002 * t
    half = 0.0034 - 0.0014 * t
    along = _smoothstep(0.009, 0.013, ax) * (1 - _smoothstep(0.054, 0.059, ax))
    return front * along * (1 - _smoothstep(half - 0.0008, half + 0.0008, np.abs(y - yc)))


def _lip_heights(x, x_corner):
    """Upper and lower vermilion heights at x (0 at the corners), with a cupid's bow dip."""
    r = np.clip(1 - (x / x_corner) ** 2, 0, None)
    up = (0.0078 * r**0.55) * (1 - 0.12 * np.exp(-((x / 0.004) ** 2)))
    lo = 0.0095 * r**0.6
    return up, lo


def _lips_mask(x, y, front, x_corner):
    up, lo = _lip_heights(x, x_corner)
    dy = y - MOUTH_Y
    h = np.where(dy >= 0, up, lo)
    return front * (1 - _smoothstep(h - 0.0007, h + 0.0007, np.abs(dy))) * (np.abs(x) < x_corner + 0.002)


def _expression_bases(model_v: np.ndarray, info: dict) -> np.ndarray:
    """[V,3,E] smooth local displacements (metres) for EXPRESSION_NAMES, weights in [0,1]."""
    V = model_v.shape[0]
    x, y = model_v[:, 0], model_v[:, 1]
    ax, sx = np.abs(x), np.sign(x)
    head = info["is_head"] * info["front"]
    side = info["lip_side"]  # +1 upper lip side, -1 lower, 0 corner / elsewhere
    xc = info["x_corner"]
    g = lambda cx, cy, sxx, syy: head * _gauss(ax, y, cx, cy, sxx, syy)  # noqa: E731  (mirrored pair)
    gm = lambda cx, cy, sxx, syy: head * _gauss(x, y, cx, cy, sxx, syy)  # noqa: E731
    lip_x = np.clip(1 - (x / xc) ** 2, 0, None)
    B = {}
    corner = g(xc, MOUTH_Y, 0.012, 0.010)
    cheek = g(0.040, -0.004, 0.015, 0.013)
    B["smile"] = np.stack([sx * 0.0035 * corner, 0.0045 * corner + 0.002 * cheek, -0.002 * corner + 0.001 * cheek], -1)
    B["frown"] = np.stack([sx * 0.001 * corner, -0.0045 * corner - 0.001 * gm(0, -0.055, 0.012, 0.008), -0.001 * corner], -1)
    brow = g(0.030, 0.050, 0.028, 0.016) * _smoothstep(0.036, 0.046, y)
    brow_soft = g(0.030, 0.052, 0.030, 0.024)
    B["brow_raise"] = np.stack([0 * x, 0.0055 * np.maximum(brow, 0.6 * brow_soft), 0.0005 * brow], -1)
    B["brow_lower"] = np.stack([-sx * 0.002 * brow, -0.0035 * brow, 0.0008 * brow], -1)
    inner = g(0.016, 0.049, 0.011, 0.014) * _smoothstep(0.038, 0.046, y)
    B["brow_inner_up"] = np.stack([0 * x, 0.0045 * inner, 0.0003 * inner], -1)
    for name, key in (("blink_L", "left"), ("blink_R", "right")):
        d = np.zeros((V, 3))
        d[info[f"lid_upper_{key}"]] = info[f"blink_{key}"]
        B[name] = d
    sq = np.zeros((V, 3))
    for key in ("left", "right"):
        sq[info[f"lid_upper_{key}"]] = info[f"squint_upper_{key}"]
        sq[info[f"lid_lower_{key}"]] = info[f"squint_lower_{key}"]
    cheek_up = g(0.034, 0.013, 0.016, 0.008)
    sq[:, 1] += 0.0018 * cheek_up
    sq[:, 2] += 0.0008 * cheek_up
    B["squint"] = sq
    mouth = gm(0, MOUTH_Y, 0.022, 0.014)
    B["mouth_pucker"] = np.stack([-0.3 * x * mouth, 0 * x, 0.006 * mouth], -1)
    B["lip_stretch"] = np.stack([sx * 0.006 * corner, -0.0008 * corner, -0.0025 * corner], -1)
    lips_area = gm(0, MOUTH_Y, 0.03, 0.011) * lip_x
    B["lip_funnel"] = np.stack([-0.12 * x * lips_area, 0.0022 * side * lips_area, 0.0045 * lips_area], -1)
    B["lips_part"] = np.stack([0 * x, 0.003 * side * lips_area, 0.0005 * lips_area], -1)
    puff = g(0.045, -0.02, 0.018, 0.018)
    B["cheek_puff"] = np.stack([sx * 0.006 * puff, 0 * x, 0.0025 * puff], -1)
    wr = g(0.011, 0.006, 0.008, 0.012)
    B["nose_wrinkle"] = np.stack([0 * x, 0.0028 * wr + 0.0012 * gm(0, MOUTH_Y + 0.008, 0.012, 0.006) - 0.0015 * inner, 0.0006 * wr], -1)
    shift = gm(0, MOUTH_Y - 0.002, 0.028, 0.018)
    B["mouth_left"] = np.stack([0.006 * shift, 0.0008 * shift * sx, -0.0015 * shift * np.clip(x / 0.02, -1, 1)], -1)
    B["mouth_right"] = np.stack([-0.006 * shift, -0.0008 * shift * sx, 0.0015 * shift * np.clip(x / 0.02, -1, 1)], -1)
    return np.stack([B[n] for n in EXPRESSION_NAMES], -1)


def _project_front(targets_xy: np.ndarray, V: np.ndarray, faces: np.ndarray, cand: np.ndarray):
    """Front-most (largest z) point of the candidate faces under each target (x, y)."""
    tri = V[faces[cand]]  # [C,3,3]
    p0, e1, e2 = tri[:, 0, :2], tri[:, 1, :2] - tri[:, 0, :2], tri[:, 2, :2] - tri[:, 0, :2]
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    ok = np.abs(det) > 1e-14
    det = np.where(ok, det, 1.0)
    out_f, out_b = [], []
    for t in targets_xy:
        q = t[None] - p0
        b1 = (q[:, 0] * e2[:, 1] - q[:, 1] * e2[:, 0]) / det
        b2 = (e1[:, 0] * q[:, 1] - e1[:, 1] * q[:, 0]) / det
        b0 = 1 - b1 - b2
        inside = ok & (b0 >= -1e-9) & (b1 >= -1e-9) & (b2 >= -1e-9)
        zz = np.where(inside, b0 * tri[:, 0, 2] + b1 * tri[:, 1, 2] + b2 * tri[:, 2, 2], -np.inf)
        k = int(np.argmax(zz))
        if not np.isfinite(zz[k]):
            raise RuntimeError(f"procedural head: landmark target {t} misses the face")
        out_f.append(cand[k])
        out_b.append(np.clip([b0[k], b1[k], b2[k]], 0, 1))
    b = np.array(out_b)
    return np.array(out_f), b / b.sum(1, keepdims=True)


def _nearest_on_faces(target: np.ndarray, V: np.ndarray, faces: np.ndarray, cand: np.ndarray):
    """The candidate face (and barycentrics) nearest a 3D point (by its projected foot, clamped)."""
    tri = V[faces[cand]]
    c = tri.mean(1)
    k = int(np.argmin(np.linalg.norm(c - target, axis=1)))
    a, b, cc = tri[k]
    M = np.stack([b - a, cc - a], 1)
    uv, *_ = np.linalg.lstsq(M, target - a, rcond=None)
    w = np.clip(np.array([1 - uv.sum(), uv[0], uv[1]]), 0, 1)
    return cand[k], w / w.sum()


def _vertex_landmark(v: int, faces: np.ndarray, face_ok: np.ndarray):
    """A face containing vertex v (among face_ok) and barycentrics putting all weight on v."""
    hit = np.nonzero(face_ok & (faces == v).any(1))[0]
    f = int(hit[0])
    w = (faces[f] == v).astype(np.float64)
    return f, w


@register_head_model("procedural")
def build_procedural_head(resolution: float = 1.0) -> HeadModel:
    """Build the procedural head model (deterministic; about 9k vertices at resolution 1).

    ``resolution`` scales the number of rows/columns of every part (0.5 gives a coarse
    model for quick tests).  See the module docstring for the parts and docs/HEAD_MODELS.md.
    """
    L = _Layout(float(resolution))
    gen = _Generator(L)
    parts = gen.evaluate(_DEFAULT_PARAMS)
    bld = _Builder(L)
    bld.build(parts)
    order = bld.ORDER
    V = np.concatenate([parts[n] for n in order], 0)
    F = bld.faces
    nV = V.shape[0]
    rng = {k: np.arange(*v) for k, v in bld.parts.items()}
    h0, h1 = bld.parts["head"]
    nc, nr = L.nc, L.nr

    # ---- identity modes: central differences of the generator in its named parameters
    shape_basis = np.zeros((nV, 3, len(SHAPE_NAMES)))
    for k, name in enumerate(SHAPE_NAMES):
        step = _SHAPE_STEPS[name]
        hi = gen.evaluate({**_DEFAULT_PARAMS, name: _DEFAULT_PARAMS[name] + step})
        lo = gen.evaluate({**_DEFAULT_PARAMS, name: _DEFAULT_PARAMS[name] - step})
        shape_basis[:, :, k] = 0.5 * (np.concatenate([hi[n] for n in order]) - np.concatenate([lo[n] for n in order]))

    # ---- per-vertex bookkeeping on the head grid
    is_head = np.zeros(nV)
    is_head[h0:h1] = 1
    grid_a = np.zeros(nV)
    grid_u = np.zeros(nV)
    grid_a[h0 + 1 : h0 + 1 + nr * nc] = gen.grid_a.reshape(-1)
    grid_u[h0 + 1 : h0 + 1 + nr * nc] = gen.grid_u.reshape(-1)
    slit_upper = h0 + 1 + (L.mouth_row - 1) * nc + L.slit_cols
    slit_lower = h0 + 1 + nr * nc + np.arange(len(L.slit_cols))
    grid_a[slit_lower] = gen.grid_a[L.mouth_row - 1, L.slit_cols]
    grid_u[slit_lower] = L.u_mouth
    front = is_head * _smoothstep(0.15, 0.55, np.cos(grid_a))
    x, y, z = V[:, 0], V[:, 1], V[:, 2]
    xc = gen.x_corner
    mouth_row = h0 + 1 + (L.mouth_row - 1) * nc + np.arange(nc)
    corners = mouth_row[np.abs(np.abs(x[mouth_row]) - xc) < 1e-9]
    lip_side = np.where(is_head > 0, np.sign(y - MOUTH_Y), 0.0) * (np.abs(x) < xc + 0.003)
    lip_side[slit_upper] = 1.0
    lip_side[slit_lower] = -1.0
    lip_side[corners] = 0.0

    # ---- soft masks (also drive the procedural textures)
    hair = is_head * _smoothstep(-0.003, 0.003, y - _hairline(np.abs(grid_a)))
    u13 = L.knot_u[13]
    neck = is_head * _smoothstep(u13 - 0.012, u13 + 0.004, grid_u) * (1 - hair)
    lips = _lips_mask(x, y, front, xc) * (1 - neck)
    brows = _brow_mask(x, y, front) * (1 - hair)
    nose_half_width = 0.0085 + 0.006 * _smoothstep(0.03, 0.0, y)
    nose_m = front * _smoothstep(0.004, 0.0, np.abs(x) - nose_half_width) * _smoothstep(-0.016, -0.012, y) * _smoothstep(0.044, 0.038, y)
    lid_s = np.zeros(nV)  # 0 at a lid's hidden edge, 1 at its margin (for the lash line)
    for k in ("lid_upper_left", "lid_upper_right", "lid_lower_left", "lid_lower_right"):
        lid_s[rng[k]] = _lid_params(L)[0].reshape(-1)
    masks = {"hair": hair, "neck": neck, "lips": lips, "brows": brows, "nose": nose_m, "lid_s": lid_s}

    # ---- skinning
    W = np.zeros((nV, 5))
    r = is_head * (1 - _smoothstep(-0.116, -0.078, y))  # root at the bottom of the neck
    lat = np.clip(np.abs(x) - xc + 0.003, 0, None)
    yb = MOUTH_Y + 0.42 * np.clip(np.abs(x) - xc, 0, None)
    band = 1e-4 + 0.5 * lat
    wj = 1 - _smoothstep(yb - band, yb + band, y)
    wj *= _smoothstep(-0.018, 0.008, z)  # nothing behind the jaw's ramus
    wj *= _smoothstep(-0.104, -0.084, y)  # fades out down the throat
    wj *= is_head
    wj[slit_upper] = 0.0
    wj[slit_lower] = 1.0
    # the mouth bowl's lower half and the lower teeth follow the jaw
    m = rng["mouth"]
    wj[m] = 1 - _smoothstep(MOUTH_Y - 0.006, MOUTH_Y + 0.004, y[m])
    wj[rng["teeth_lower"]] = 1.0
    W[:, 0] = r
    W[:, 1] = (1 - r) * (1 - wj)
    W[:, 2] = (1 - r) * wj
    for side, j in (("left", 3), ("right", 4)):
        W[rng[f"eyeball_{side}"]] = 0
        W[rng[f"eyeball_{side}"], j] = 1.0
    W = np.clip(W, 0, None)
    W /= W.sum(1, keepdims=True)

    # ---- joint regressor: fixed averages over a few vertices (symmetric pairs / rings)
    def mirror(v):
        k = v - h0 - 1
        i, j = divmod(k, nc)
        return h0 + 1 + i * nc + (nc - j) % nc

    def pair_near(target):
        d = np.linalg.norm(V[h0 + 1 : h0 + 1 + nr * nc] - target, axis=1)
        v = h0 + 1 + int(np.argmin(d))
        return [v, mirror(v)]

    Jreg = np.zeros((5, nV))
    Jreg[0, pair_near(np.array([0.075, -0.030, -0.030])) + pair_near(np.array([0.072, -0.040, -0.015]))] = 0.25
    ring = h0 + 1 + (int(np.argmin(np.abs(L.row_u[1:] - L.knot_u[14])))) * nc + np.arange(nc)
    Jreg[1, ring] = 1.0 / nc
    Jreg[2, pair_near(np.array([0.075, 0.000, 0.004])) + pair_near(np.array([0.075, -0.006, 0.004]))] = 0.25
    n_eq = L.eye_rings - 1  # the ring at 90 degrees: its mean is the eyeball centre
    for side, j in (("left", 3), ("right", 4)):
        b0 = bld.parts[f"eyeball_{side}"][0]
        Jreg[j, b0 + 1 + n_eq * L.eye_seg + np.arange(L.eye_seg)] = 1.0 / L.eye_seg

    # ---- expressions
    info = {"is_head": is_head, "front": front, "lip_side": lip_side, "x_corner": xc}
    eye = gen.eye(_DEFAULT_PARAMS)
    for side in ("left", "right"):
        info[f"lid_upper_{side}"] = rng[f"lid_upper_{side}"]
        info[f"lid_lower_{side}"] = rng[f"lid_lower_{side}"]
        info[f"blink_{side}"] = _lid_points(L, "upper", 1.0) - _lid_points(L, "upper", 0.0)
        info[f"squint_upper_{side}"] = _lid_points(L, "upper", 0.22) - _lid_points(L, "upper", 0.0)
        info[f"squint_lower_{side}"] = _lid_points(L, "lower", 0.0, raise_deg=6.0) - _lid_points(L, "lower", 0.0)
    expr_basis = _expression_bases(V, info)

    # ---- labels per face (parsing): from the parts and the mean of the soft masks
    part_of_face = bld.face_part
    fm = {k: v[F].mean(1) for k, v in masks.items()}
    labels = np.full(len(F), LABEL_IDS["skin"], np.int64)
    for part in ("brows", "lips", "neck", "hair"):  # in this order: a later part wins
        labels[fm[part] > 0.5] = LABEL_IDS[part]
    for k, name in enumerate(order):
        if name.startswith("eyeball"):
            labels[part_of_face == k] = LABEL_IDS["eyes"]
        elif name.startswith(("mouth", "teeth")):
            labels[part_of_face == k] = LABEL_IDS["mouth_interior"]
        elif name.startswith("lid"):
            labels[part_of_face == k] = LABEL_IDS["skin"]

    # ---- regions (vertex indices)
    def idx(mask):
        return np.nonzero(mask)[0].astype(np.int64)

    boundary = h0 + 1 + (nr - 1) * nc + np.arange(nc)
    face_region = (front > 0.5) & (hair < 0.5) & (neck < 0.5)
    lids_all = np.concatenate([rng[k] for k in order if k.startswith("lid")])
    face_region[lids_all] = True
    regions = {
        "face": idx(face_region),
        "mouth_interior": np.concatenate([rng["mouth"], rng["teeth_upper"], rng["teeth_lower"]]).astype(np.int64),
        "lips": idx(lips > 0.5),
        "eyes": np.concatenate([rng["eyeball_left"], rng["eyeball_right"]]).astype(np.int64),
        "eye_left": rng["eyeball_left"].astype(np.int64),
        "eye_right": rng["eyeball_right"].astype(np.int64),
        "eyelids": lids_all.astype(np.int64),
        "hair": idx(hair > 0.5),
        "neck": idx(neck > 0.5),
        "boundary": boundary.astype(np.int64),
        "brows": idx(brows > 0.5),
        "nose": idx(nose_m > 0.5),
        "teeth": np.concatenate([rng["teeth_upper"], rng["teeth_lower"]]).astype(np.int64),
    }

    # ---- landmarks (iBUG 68)
    lm_f, lm_b = _landmarks(V, F, L, bld, gen, eye, slit_upper, slit_lower, corners)

    meta = {
        "parts": {k: [int(a), int(b)] for k, (a, b) in bld.parts.items()},
        "masks": {k: v.astype(np.float32) for k, v in masks.items()},
        "face_part": part_of_face,
        "part_names": list(order),
        "slit_upper": slit_upper.astype(np.int64),
        "slit_lower": slit_lower.astype(np.int64),
        "mouth_corners": corners.astype(np.int64),
        "eye_centers": {"left": [eye["x"], eye["y"], eye["z"]], "right": [-eye["x"], eye["y"], eye["z"]]},
        "eye_radius": EYE_RADIUS,
        "mouth_y": MOUTH_Y,
        "shape_names": list(SHAPE_NAMES),
        "expression_range": [0.0, 1.0],
        "resolution": float(resolution),
        "uv_charts": {"head": _UV_HEAD, "eyes": _UV_EYE, "mouth": _UV_MOUTH, "lids": _UV_LIDS, "teeth": _UV_TEETH},
    }
    f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    i64 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.int64)  # noqa: E731
    return HeadModel(
        name="procedural",
        template=f32(V),
        faces=i64(F),
        uvs=f32(bld.uvs),
        uv_faces=i64(bld.uv_faces),
        shape_basis=f32(shape_basis),
        expr_basis=f32(expr_basis),
        expression_names=list(EXPRESSION_NAMES),
        joint_names=list(JOINT_NAMES),
        parents=list(PARENTS),
        joint_regressor=f32(Jreg),
        skin_weights=f32(W),
        regions=regions,
        landmark_faces=i64(lm_f),
        landmark_bary=f32(lm_b),
        condition_joints=["jaw", "eye_left", "eye_right"],
        face_labels=i64(labels),
        meta=meta,
    )


def _landmarks(V, F, L, bld, gen, eye, slit_upper, slit_lower, corners):
    h0, h1 = bld.parts["head"]
    part = bld.face_part
    head_faces = np.nonzero(part == 0)[0]
    front_faces = head_faces[(V[F[head_faces]][:, :, 2].mean(1) > 0.0)]
    xc = gen.x_corner
    targets: dict[int, tuple] = {}
    # jaw line 0..16 from the subject's right (-x) round the chin to the left
    for k in range(17):
        t = k / 16
        targets[k] = ("front", (-0.061 * math.cos(math.pi * t), 0.016 - 0.088 * math.sin(math.pi * t)))
    # brows 17..21 (right, outer -> inner), 22..26 (left, inner -> outer)
    bx = np.linspace(0.052, 0.016, 5)
    for k, xx in enumerate(bx):
        tt = np.clip((xx - 0.012) / 0.045, 0, 1)
        yy = 0.0465 + 0.0045 * math.sin(math.pi * min(tt * 0.9 + 0.1, 1.0)) - 0.002 * tt
        targets[17 + k] = ("front", (-xx, yy))
        targets[26 - k] = ("front", (xx, yy))
    for k, yy in enumerate([0.036, 0.026, 0.015, 0.003]):
        targets[27 + k] = ("front", (0.0, yy))
    for k, xx in enumerate([-0.0105, -0.0055, 0.0, 0.0055, 0.0105]):
        targets[31 + k] = ("front", (xx, -0.0105 if abs(xx) > 0 else -0.0125))
    # eyes: corners and lid margins, on the lid shells
    pc = _LID_CORNER
    eye_pts = {  # index: (eye side, lid, phi)
        36: ("right", "upper", -pc), 37: ("right", "upper", -pc / 3), 38: ("right", "upper", pc / 3), 39: ("right", "upper", pc),
        40: ("right", "lower", pc / 3), 41: ("right", "lower", -pc / 3),
        42: ("left", "upper", -pc), 43: ("left", "upper", -pc / 3), 44: ("left", "upper", pc / 3), 45: ("left", "upper", pc),
        46: ("left", "lower", pc / 3), 47: ("left", "lower", -pc / 3),
    }
    for k, (side, lid, phi) in eye_pts.items():
        c = np.array([(1.0 if side == "left" else -1.0) * eye["x"], eye["y"], eye["z"]])
        beta = float(_lid_margin(lid, np.array(phi)))
        rr = _LID_R_UP if lid == "upper" else _LID_R_LO
        p = c + rr * np.array([math.cos(beta) * math.sin(phi), math.sin(beta), math.cos(beta) * math.cos(phi)])
        targets[k] = ("lid", (p, f"lid_{lid}_{side}"))
    # outer lips
    up_h, lo_h = _lip_heights(np.array([0.6 * xc, 0.25 * xc, 0.0]), xc)
    targets[48] = ("front", (-xc + 0.0005, MOUTH_Y))
    targets[54] = ("front", (xc - 0.0005, MOUTH_Y))
    for k, (xx, hh) in enumerate(zip([-0.6 * xc, -0.25 * xc, 0.0, 0.25 * xc, 0.6 * xc], [up_h[0], up_h[1], up_h[2], up_h[1], up_h[0]])):
        targets[49 + k] = ("front", (xx, MOUTH_Y + hh))
    for k, (xx, hh) in enumerate(zip([0.6 * xc, 0.25 * xc, 0.0, -0.25 * xc, -0.6 * xc], [lo_h[0], lo_h[1], lo_h[2], lo_h[1], lo_h[0]])):
        targets[55 + k] = ("front", (xx, MOUTH_Y - hh))
    # inner lips: on the slit rows themselves
    cx_sorted = corners[np.argsort(V[corners, 0])]
    inner = {60: ("v", int(cx_sorted[0])), 64: ("v", int(cx_sorted[-1]))}

    def slit_vertex(xx, which):
        arr = slit_upper if which == "upper" else slit_lower
        return int(arr[np.argmin(np.abs(V[arr, 0] - xx))])

    for k, xx in zip((61, 62, 63), (-0.5 * xc, 0.0, 0.5 * xc)):
        inner[k] = ("v", slit_vertex(xx, "upper"))
    for k, xx in zip((65, 66, 67), (0.5 * xc, 0.0, -0.5 * xc)):
        inner[k] = ("v", slit_vertex(xx, "lower"))
    lf = np.zeros(68, np.int64)
    lb = np.zeros((68, 3))
    fronts = [(k, t[1]) for k, t in targets.items() if t[0] == "front"]
    f_idx, f_b = _project_front(np.array([p for _, p in fronts]), V, F, front_faces)
    for (k, _), fi, bi in zip(fronts, f_idx, f_b):
        lf[k], lb[k] = fi, bi
    for k, t in targets.items():
        if t[0] == "lid":
            p, name = t[1]
            cand = np.nonzero(part == bld.ORDER.index(name))[0]
            lf[k], lb[k] = _nearest_on_faces(p, V, F, cand)
    head_mask = part == 0
    for k, (_, v) in inner.items():
        lf[k], lb[k] = _vertex_landmark(v, F, head_mask)
    return lf, lb
