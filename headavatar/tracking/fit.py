"""Fit a head model to 2D landmark tracks: one identity, per-frame expression and pose, one focal length.

Works for any ``HeadModel`` (ict, procedural, flame).  Cameras and poses
(see headavatar.camera for the conventions):

* every frame has the same camera: at the world origin, ``R = diag(1,-1,-1)``,
  ``t = 0``, i.e. looking down world -z with image up = world +y.  The head
  model faces +z, so a frontal head needs no rotation and the per-frame root
  rotation stays small (smooth, safe to interpolate); the head pose
  (``joint_rotations[:, 0]`` + ``translation``) carries all the motion.
  FlashAvatar and the other methods only see the posed mesh and the camera,
  so either split works for them.
* ``K`` has one focal length for the clip (square pixels) and the principal
  point at the image centre (``cx = W/2``, pixel centres at +0.5).

The objective, over all valid frames at once: robust (pseudo-Huber)
landmark reprojection, temporal smoothness of pose and expression between
consecutive valid frames, and priors on identity, expression (L2, plus L1
for sparsity where the model declares an expression range) and focal
length.  Smoothness weights are in pixel equivalents (how far a parameter
change moves the landmarks) and pixels are measured at a 512-pixel
reference size, so the weights mean the same for every head model and
resolution.

It is minimised coarse to fine: a closed-form scaled-orthographic pose per
frame, a rigid stage (pose only, zero expression, mean identity: the
"before" error), then everything.  Each stage is Levenberg-Marquardt
(Gauss-Newton curvature, exact gradients from autograd, projected Newton
for the expression range).  First-order methods (Adam) needed hundreds of
steps and still stopped short (about 1 px on noiseless data, where this
reaches 0.02 px in ~15 steps); the Newton system is cheap because of its
structure: per-frame blocks, coupled only to neighbouring frames
(smoothness) and to the shared identity and focal length, solved by
preconditioned conjugate gradients with a Schur complement for the shared
block.

Only the vertices the landmark embedding touches are evaluated (~70-200 rows
of the bases, ``LandmarkModel``), with the joints' rest positions as linear
functions of identity and expression.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from headavatar.camera import fov_to_focal
from headavatar.errors import UserError
from headavatar.headmodels.base import HeadModel
from headavatar.headmodels.skinning import blend_shapes, blend_transforms, pose_correctives, transform_points
from headavatar.subjects.format import Tracking
from headavatar.utils.rotations import (
    axis_angle_to_matrix,
    matrix_to_axis_angle,
    matrix_to_quaternion,
    quaternion_to_axis_angle,
)

# World-to-camera rotation of the fixed camera: OpenCV axes looking down world -z.
CAMERA_R = np.diag([1.0, -1.0, -1.0]).astype(np.float32)
REFERENCE_SIZE = 512.0


@dataclass
class FitConfig:
    """Options of ``fit_tracking``.  Weights are relative to the landmark term, a mean
    over landmarks and frames of robust squared errors in pixels at 512 px."""

    fov_deg: float = 22.0  # initial field of view across the larger image side
    optimize_focal: bool = True  # fit the focal length (else it stays at fov_deg)
    focal_prior: float = 5.0  # weight on (log f - log f_init)^2
    fov_range_deg: tuple[float, float] = (8.0, 60.0)  # the focal length stays inside this field-of-view range
    rigid_iters: int = 8  # Gauss-Newton iterations of the rigid stage
    iters: int = 25  # Gauss-Newton iterations of the full stage (it stops earlier once converged)
    tol: float = 1e-4  # converged when an iteration lowers the objective by less than this fraction
    huber_px: float = 3.0  # robust loss scale (pixels at 512)
    w_smooth_pose: float = 0.01  # on squared frame-to-frame pose changes, in pixel equivalents
    w_smooth_expr: float = 0.005  # on squared frame-to-frame expression changes, in pixel equivalents
    w_shape: float = 0.002  # on |shape / prior std|^2 (sum over modes)
    w_expr_l2: float = 0.02  # on sum of expression^2, per frame
    w_expr_l1: float = 0.02  # on sum of |expression|, per frame (sparsity; models with an expression range only)
    w_jaw: float = 10.0  # on |jaw rotation|^2 (rad^2), for models with a "jaw" joint
    fit_jaw: bool = True  # fit the jaw rotation for models with a "jaw" joint
    max_shape: int | None = 50  # fit only the first identity modes (None: all); later ICT modes move landmarks by < 0.5 mm
    cg_iters: int = 10  # conjugate-gradient iterations per Gauss-Newton step (at most)
    device: str | None = None  # default: the model's device
    progress: bool = False  # show a progress bar


# --------------------------------------------------------------------------- landmark sub-model
def _embedding(model: HeadModel, embedding) -> tuple[torch.Tensor, torch.Tensor]:
    if embedding is None:
        return model.landmark_faces, model.landmark_bary
    if isinstance(embedding, dict):
        faces, bary = embedding["faces"], embedding["bary"]
    else:
        faces, bary = embedding
    faces = torch.as_tensor(np.asarray(faces), dtype=torch.int64, device=model.faces.device)
    bary = torch.as_tensor(np.asarray(bary), dtype=torch.float32, device=model.faces.device)
    if faces.dim() != 1 or bary.shape != (faces.shape[0], 3):
        raise UserError(f"a landmark embedding needs faces [L] and barycentric weights [L,3] (got {tuple(faces.shape)} and {tuple(bary.shape)})")
    if len(faces) and (int(faces.min()) < 0 or int(faces.max()) >= model.faces.shape[0]):
        raise UserError("the landmark embedding names faces the head model does not have")
    return faces, bary


class LandmarkModel:
    """The part of a head model that moves a set of embedded points, evaluated cheaply.

    Holds the rows of the model's bases for the vertices the embedding touches
    and the joints' rest positions as linear functions of identity and
    expression (regressed from the shaped mesh, as HeadModel.forward does); the
    deformation is HeadModel.forward's (blendshapes, pose correctives, LBS,
    translation, post-skinning extras) restricted to those rows.  For a
    rigid (one-joint) model the barycentric blend commutes with the pose, so
    the bases are blended to the L points once, up front.
    """

    def __init__(self, model: HeadModel, embedding=None):
        faces, bary = _embedding(model, embedding)
        tri = model.faces[faces]  # [L,3]
        # Zero-weight corners are redirected to the heaviest corner, so only touched vertices are kept.
        heavy = tri.gather(1, bary.argmax(1, keepdim=True)).expand(-1, 3)
        tri = torch.where(bary != 0, tri, heavy)
        used, local = torch.unique(tri, return_inverse=True)
        L, U = faces.shape[0], len(used)
        # blend matrix: points = Wb @ vertices
        Wb = torch.zeros(L, U, dtype=bary.dtype, device=bary.device)
        Wb.index_put_((torch.arange(L, device=bary.device)[:, None].expand(-1, 3), local.reshape(L, 3)), bary, accumulate=True)
        self.num_joints = model.num_joints
        self.parents = model.parents
        self.global_transforms = model.global_transforms
        self.rigid = model.num_joints == 1 and not model.post_basis
        # rigid: blend the bases to the points now; otherwise keep vertex rows and blend after skinning
        R = Wb if self.rigid else None

        def rows(x):  # [V,3,K] -> [P*3,K] for the kept vertices; rigid: blended to the points, coordinate-major
            x = x[used]
            if R is not None:
                x = torch.einsum("lu,uck->clk", R, x)  # [3,L,K]: each coordinate a contiguous block
            return x.reshape(x.shape[0] * x.shape[1], x.shape[-1]).contiguous()

        self.template = rows(model.template[..., None])[:, 0]  # [P*3]
        self.shape_rows = rows(model.shape_basis)  # [P*3,S]
        self.expr_rows = rows(model.expr_basis)  # [P*3,E]
        self.P = L if self.rigid else U
        self.skin_weights = model.skin_weights[used]
        self.joints_template = model.joint_regressor @ model.template  # [J,3]
        J3 = 3 * model.num_joints
        self.joints_shape = torch.einsum("jv,vcs->jcs", model.joint_regressor, model.shape_basis).reshape(J3, model.num_shape)  # [J*3,S]
        self.joints_expr = torch.einsum("jv,vce->jce", model.joint_regressor, model.expr_basis).reshape(J3, model.num_expression)  # [J*3,E]
        self.pose_basis = None
        if model.pose_basis is not None and model.num_joints > 1:
            cols = (used[:, None] * 3 + torch.arange(3, device=used.device)).reshape(-1)
            self.pose_basis = model.pose_basis[:, cols]
        self.post_basis = {k: b[used] for k, b in model.post_basis.items()}
        self.blend = Wb
        self.num_points = L
        # bases blended to the points (exact for rigid models; for skinned ones they feed only the
        # Gauss-Newton curvature, which tolerates the approximation)
        self.expr_points = torch.einsum("lu,uce->lce", Wb, model.expr_basis[used])  # [L,3,E]
        self.shape_points = torch.einsum("lu,ucs->lcs", Wb, model.shape_basis[used])  # [L,3,S]
        self.expr_sensitivity = self.expr_points.norm(dim=1).pow(2).mean(0).sqrt()  # [E] RMS point motion per unit

    def rest_joints(self, shape: torch.Tensor | None = None, expression: torch.Tensor | None = None) -> torch.Tensor:
        """[B,J,3] rest joint positions, regressed from the shaped mesh as HeadModel.forward does
        (``shape`` [S] or [B,S], ``expression`` [B,E]; both None: the template's, B=1)."""
        J = self.num_joints
        j = self.joints_template.reshape(1, -1)
        if shape is not None and shape.shape[-1]:
            j = j + shape @ self.joints_shape[:, : shape.shape[-1]].T
        if expression is not None and expression.shape[-1]:
            j = j + expression @ self.joints_expr[:, : expression.shape[-1]].T
        return j.reshape(j.shape[0] if j.dim() == 2 else 1, J, 3)

    def rest(self, shape=None, expression=None, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Unposed points or vertices [B,P,3] and rest joints [B,J,3] (``shape`` [S] or [B,S])."""
        v = self.template
        if shape is not None and shape.shape[-1]:
            v = v + shape @ self.shape_rows[:, : shape.shape[-1]].T  # [P*3] or [B,P*3]
        if expression is not None and expression.shape[-1]:
            v = v + expression @ self.expr_rows[:, : expression.shape[-1]].T
        B = max(batch, v.shape[0] if v.dim() == 2 else 1)
        v = v.expand(B, -1) if v.dim() == 1 else v
        # rigid rows are stored coordinate-major: hand out a [B,P,3] view of that storage
        v = v.reshape(B, 3, self.P).transpose(1, 2) if self.rigid else v.reshape(B, self.P, 3)
        return v, self.rest_joints(shape, expression).expand(B, -1, -1)

    def pose(self, v, joints, joint_rotations=None, translation=None, extras=None, frames: bool = False):
        """Posed points [B,L,3] from ``rest`` output, axis-angle rotations [B,J,3] and translation [B,3].

        ``frames``: also return each point's linear map from rest to posed position [B,L,3,3]
        (the blend of its vertices' skinning rotations)."""
        B = v.shape[0]
        if joint_rotations is None:
            joint_rotations = v.new_zeros(B, self.num_joints, 3)
        if self.rigid:
            # rotate about the root, element-wise (batched matmuls of many tiny matrices are slow on CPU)
            vc = v.transpose(1, 2)  # [B,3,L]
            p = joints[:, 0]  # [B,3]
            R = _aa_to_matrix(joint_rotations[:, 0])  # [B,3,3]
            t = p + translation if translation is not None else p
            out = (R[..., None] * (vc - p[..., None])[:, None]).sum(2) + t[..., None]  # [B,3,L]
            return (out.transpose(1, 2), R[:, None].expand(-1, self.num_points, -1, -1)) if frames else out.transpose(1, 2)
        rots = _aa_to_matrix(joint_rotations)
        if self.pose_basis is not None:
            v = v + pose_correctives(rots, self.pose_basis)
        G = self.global_transforms(rots, joints)
        T = blend_transforms(self.skin_weights, G)  # linear blend of the joints' transforms
        v = transform_points(T, v)
        if extras:
            for k, basis in self.post_basis.items():
                if k in extras:
                    v = v + blend_shapes(basis, extras[k])
        if translation is not None:
            v = v + translation[:, None]
        if frames:
            return self.blend @ v, torch.einsum("lu,buij->blij", self.blend, T[..., :3])
        return self.blend @ v

    def __call__(self, shape=None, expression=None, joint_rotations=None, translation=None, extras=None) -> torch.Tensor:
        """Posed points [B,L,3] in world space (same arguments as HeadModel.forward; ``shape`` may be [S])."""
        B = next((x.shape[0] for x in (expression, joint_rotations, translation) if x is not None), 1)
        v, joints = self.rest(shape, expression, B)
        return self.pose(v, joints, joint_rotations, translation, extras)


def model_landmarks(model: HeadModel, params, embedding=None) -> torch.Tensor:
    """Posed landmark positions [N,L,3] (world space, metres) for per-frame parameters.

    ``params``: a ``Tracking`` or a dict like ``Tracking.params`` gives
    (shape [S] or [N,S], expression [N,E], joint_rotations [N,J,3],
    translation [N,3], extras); ``embedding``: (faces [L], bary [L,3]),
    default the model's 68 landmarks.
    """
    if isinstance(params, Tracking):
        params = params.params(np.arange(params.num_frames), device=model.template.device)
    dev = model.template.device
    f = lambda x: None if x is None else torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32, device=dev)  # noqa: E731
    expression, rots, trans = f(params.get("expression")), f(params.get("joint_rotations")), f(params.get("translation"))
    n = next((x.shape[0] for x in (expression, rots, trans) if x is not None), 1)
    shape = f(params.get("shape"))
    if shape is not None and shape.dim() == 1:
        shape = shape[None].expand(n, -1)
    extras = {k: f(v) for k, v in (params.get("extras") or {}).items()} or None
    with torch.no_grad():
        return LandmarkModel(model, embedding)(shape, expression, rots, trans, extras)


# --------------------------------------------------------------------------- helpers
def _aa_to_matrix(aa: torch.Tensor) -> torch.Tensor:
    """Axis-angle [B,3] -> [B,3,3] (Rodrigues), built element-wise: R = cos t I + sin t/t [w]x + (1-cos t)/t^2 w w^T."""
    t2 = (aa * aa).sum(-1)
    t = t2.clamp_min(1e-12).sqrt()
    small = t2 < 1e-8
    a = torch.where(small, 1 - t2 / 6, torch.sin(t) / t)
    b = torch.where(small, 0.5 - t2 / 24, (1 - torch.cos(t)) / t2.clamp_min(1e-12))
    c = 1 - b * t2
    x, y, z = aa.unbind(-1)
    return torch.stack([
        c + b * x * x, b * x * y - a * z, b * x * z + a * y,
        b * x * y + a * z, c + b * y * y, b * y * z - a * x,
        b * x * z - a * y, b * y * z + a * x, c + b * z * z,
    ], -1).reshape(aa.shape[:-1] + (3, 3))


def _robust(e2: torch.Tensor, delta: float) -> torch.Tensor:
    """Pseudo-Huber on squared distances: ~e^2/2 for small errors, ~delta*e for large ones."""
    return delta * delta * (torch.sqrt(1 + e2 / (delta * delta)) - 1)


def _closed_form_pose(X: torch.Tensor, uv: torch.Tensor, w: torch.Tensor, f: float, cx: float, cy: float):
    """Scaled-orthographic pose per frame.  X [L,3] model points, uv [M,L,2], w [L].

    Returns the camera-frame rotation Q [M,3,3] and the camera position of the
    points' weighted centroid [M,3].
    """
    wn = w / w.sum()
    mu = (wn[:, None] * X).sum(0)
    Xc = X - mu
    n = torch.stack([(uv[..., 0] - cx) / f, (uv[..., 1] - cy) / f], -1)  # normalised image coordinates
    nbar = (wn[None, :, None] * n).sum(1)
    nc = n - nbar[:, None]
    # least squares A [M,2,3]: nc ~ A Xc
    G = (Xc * wn[:, None]).T @ Xc  # [3,3]
    B = torch.einsum("mlc,l,ld->mcd", nc, wn, Xc)  # [M,2,3]
    A = B @ torch.linalg.inv(G)
    U_, S_, Vh = torch.linalg.svd(A, full_matrices=False)  # [M,2,2],[M,2],[M,2,3]
    R2 = U_ @ Vh
    r3 = torch.cross(R2[:, 0], R2[:, 1], dim=-1)
    Q = torch.cat([R2, r3[:, None]], 1)
    z = 1.0 / S_.mean(-1).clamp_min(1e-6)
    centre = torch.stack([nbar[:, 0] * z, nbar[:, 1] * z, z], -1)
    return Q, centre


def _rigid_jacobians(v, joints, x, logf, rc, scale):
    """Closed-form residual derivatives of a rigid (one-joint) model.

    Camera point Xc = Rc R(a) (v - p) + z (cx', cy', 1); returns d r / d(pose: a, cxy, log z)
    [M,L,2,6], d r / d v [M,L,2,3], d r / d joints [M,L,2,1,3] and d r / d log f [M,L,2].
    """
    R = _aa_to_matrix(x[:, 0:3])  # [M,3,3]
    q = torch.einsum("mij,mlj->mli", R, v - joints[:, None, 0])  # R (v - p), world axes
    z = x[:, 5:6].exp()
    pc = torch.cat([x[:, 3:5] * z, z], -1)
    P, uvc = _projection_jacobian(q * rc + pc[:, None], logf.exp(), scale)
    Jv = P @ (rc[:, None] * R)[:, None]  # [M,L,2,3]
    return P @ _root_and_camera_columns(q, x[:, 0:3], x, rc), Jv, -Jv[..., None, :], uvc


def _projection_jacobian(Xc, f, scale):
    """d(scaled pixel)/d(camera point) [M,L,2,3] and the scaled pixel offsets from the centre [M,L,2]."""
    inv = 1.0 / Xc[..., 2].clamp_min(1e-4)
    zero, one = torch.zeros_like(inv), torch.ones_like(inv)
    P = (f * scale * inv)[..., None, None] * torch.stack([
        torch.stack([one, zero, -Xc[..., 0] * inv], -1),
        torch.stack([zero, one, -Xc[..., 1] * inv], -1),
    ], -2)
    return P, torch.stack([f * Xc[..., 0] * inv, f * Xc[..., 1] * inv], -1) * scale


def _root_and_camera_columns(q, a, x, rc):
    """d Xc / d(root axis-angle a, cxy, log z) [M,L,3,6] for posed points whose offset from the
    posed root pivot is q (world axes): the root's rotation left-multiplies everything below it,
    so d(R w)/da_k = Jl[:, k] x (R w)."""
    Jl = _left_jacobian(a)
    z = x[:, 5:6].exp()
    pc = torch.cat([x[:, 3:5] * z, z], -1)
    cols = [torch.cross(Jl[:, None, :, k].expand_as(q), q, dim=-1) * rc for k in range(3)]
    ex = torch.zeros_like(q)
    ex[..., 0] = z
    ey = torch.zeros_like(q)
    ey[..., 1] = z
    return torch.stack(cols + [ex, ey, pc[:, None].expand_as(q)], -1)


def _left_jacobian(a: torch.Tensor) -> torch.Tensor:
    """SO(3) left Jacobian [B,3,3] of axis-angle a [B,3]: R(a + da) ~ exp([Jl da]x) R(a)."""
    t2 = (a * a).sum(-1)
    small = t2 < 1e-8
    t = t2.clamp_min(1e-12).sqrt()
    b = torch.where(small, 0.5 - t2 / 24, (1 - torch.cos(t)) / t2.clamp_min(1e-12))
    c = torch.where(small, 1.0 / 6 - t2 / 120, (t - torch.sin(t)) / (t2 * t).clamp_min(1e-12))
    ax = torch.zeros(a.shape[0], 3, 3, device=a.device, dtype=a.dtype)
    ax[:, 0, 1], ax[:, 0, 2], ax[:, 1, 2] = -a[:, 2], a[:, 1], -a[:, 0]
    ax = ax - ax.transpose(1, 2)
    return torch.eye(3, device=a.device, dtype=a.dtype) + b[:, None, None] * ax + c[:, None, None] * (ax @ ax)


def _skinned_jacobians(lmodel, rotations, v, joints, x, logf, rc, scale, fitted_joints):
    """Closed-form residual derivatives of a skinned model, for the Gauss-Newton curvature only
    (gradients come from autograd and stay exact).

    Rotating joint k by da turns everything it carries (its own and its descendants' skinning
    shares) about the posed joint by R_parent Jl(a_k) da.  Pose correctives and the rest
    joints other than the root are held fixed here (weak dependencies: they only slow
    convergence a little).
    """
    M = x.shape[0]
    z = x[:, 5:6].exp()
    pc = torch.cat([x[:, 3:5] * z, z], -1)
    rv = rotations(x)
    X, Tl = lmodel.pose(v, joints, rv, pc * rc - joints[:, 0], frames=True)
    P, uvc = _projection_jacobian(X * rc, logf.exp(), scale)
    cols = [P @ _root_and_camera_columns(X - pc[:, None] * rc, x[:, 0:3], x, rc)]
    if fitted_joints:
        rots = _aa_to_matrix(rv)
        G = lmodel.global_transforms(rots, joints)  # [M,J,4,4], rest -> posed (before translation)
        if lmodel.pose_basis is not None:
            v = v + pose_correctives(rots, lmodel.pose_basis)
        for k in fitted_joints:
            desc = [j for j in range(lmodel.num_joints) if _is_descendant(lmodel.parents, j, k)]
            o = (G[:, k, :3, :3] @ joints[:, k, :, None])[..., 0] + G[:, k, :3, 3]  # posed joint k
            carried = sum(lmodel.skin_weights[None, :, j, None] * ((G[:, j, None, :3, :3] @ v[..., None])[..., 0] + G[:, j, None, :3, 3] - o[:, None])
                          for j in desc)
            carried = lmodel.blend @ carried  # [M,L,3]
            parent = G[:, lmodel.parents[k], :3, :3] if lmodel.parents[k] >= 0 else torch.eye(3, device=x.device).expand(M, 3, 3)
            axes = parent @ _left_jacobian(rv[:, k])  # world axis of each coordinate's rotation
            dX = torch.stack([torch.cross(axes[:, None, :, i].expand_as(carried), carried, dim=-1) * rc for i in range(3)], -1)
            cols.append(P @ dX)
    Jv = P @ (rc[:, None] * Tl)
    Jj = torch.zeros(*Jv.shape[:-1], joints.shape[1], 3, dtype=Jv.dtype, device=Jv.device)
    Jj[..., 0, :] = -Jv  # the root pivot (exact for points bound to the root alone)
    return torch.cat(cols, -1), Jv, Jj, uvc


def _is_descendant(parents: list[int], j: int, k: int) -> bool:
    while j >= 0:
        if j == k:
            return True
        j = parents[j]
    return False


def _spd_inverse(A: torch.Tensor) -> torch.Tensor:
    """Inverse of (a batch of) symmetric positive semi-definite matrices, with as little diagonal
    jitter as makes Cholesky succeed (float32 Schur complements of nearly flat directions can
    come out slightly indefinite)."""
    A = 0.5 * (A + A.transpose(-1, -2))
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    scale = torch.diagonal(A, dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-12)[..., None, None]
    for k in range(8):
        jitter = 0.0 if k == 0 else scale * 10.0 ** (k - 8)
        L, info = torch.linalg.cholesky_ex(A + jitter * eye)
        if not bool(info.any()):
            return torch.cholesky_inverse(L)
    return torch.linalg.pinv(A, hermitian=True)


def _pcg(matvec, precond, bx, by, iters: int):
    """Preconditioned conjugate gradients on a pair of blocks (per-frame x, shared y or None)."""
    xx = torch.zeros_like(bx)
    xy = torch.zeros_like(by) if by is not None else None
    rx, ry = bx.clone(), (by.clone() if by is not None else None)
    dot = lambda ax, ay, bx_, by_: (ax * bx_).sum() + ((ay * by_).sum() if ay is not None else 0.0)  # noqa: E731
    zx, zy = precond(rx, ry)
    px, py = zx.clone(), (zy.clone() if zy is not None else None)
    rz = dot(rx, ry, zx, zy)
    r0 = float(rz)
    for _ in range(iters):
        qx, qy = matvec(px, py)
        alpha = rz / dot(px, py, qx, qy).clamp_min(1e-30)
        xx = xx + alpha * px
        rx = rx - alpha * qx
        if xy is not None:
            xy = xy + alpha * py
            ry = ry - alpha * qy
        zx, zy = precond(rx, ry)
        rz_new = dot(rx, ry, zx, zy)
        if float(rz_new) <= 1e-8 * r0:
            break
        beta = rz_new / rz
        px = zx + beta * px
        if py is not None:
            py = zy + beta * py
        rz = rz_new
    return xx, xy


def _interp_missing(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Linear interpolation along axis 0 over invalid rows (held constant past the ends)."""
    idx = np.flatnonzero(valid)
    out = x.copy()
    flat = x.reshape(len(x), -1)
    res = out.reshape(len(x), -1)
    t = np.arange(len(x))
    for k in range(flat.shape[1]):
        res[:, k] = np.interp(t, idx, flat[idx, k])
    return res.reshape(x.shape)


def _interp_rotations(aa: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Axis-angle [N,K,3]: invalid frames by normalised quaternion interpolation of their neighbours."""
    q = matrix_to_quaternion(axis_angle_to_matrix(torch.as_tensor(aa, dtype=torch.float64))).numpy()
    idx = np.flatnonzero(valid)
    # keep consecutive valid quaternions in one hemisphere so the blend takes the short way
    for a, b in zip(idx[:-1], idx[1:]):
        s = np.sign((q[a] * q[b]).sum(-1, keepdims=True))
        q[b] *= np.where(s == 0, 1, s)
    qi = _interp_missing(q, valid)
    qi /= np.linalg.norm(qi, axis=-1, keepdims=True).clip(1e-12)
    out = quaternion_to_axis_angle(torch.as_tensor(qi)).numpy().astype(np.float32)
    out[valid] = aa[valid]
    return out


def _check_inputs(model, landmarks2d, image_size, valid, weights, L_embed):
    lm = np.asarray(landmarks2d, dtype=np.float64)
    if lm.ndim != 3 or lm.shape[-1] != 2:
        raise UserError(f"landmarks must be an array [frames, points, 2] in pixels (got shape {lm.shape})")
    N, L = lm.shape[:2]
    if N == 0:
        raise UserError("no frames to fit")
    if L != L_embed:
        raise UserError(f"{L} landmarks per frame, but the embedding of head model '{model.name}' has {L_embed} points")
    try:
        H, W = (int(s) for s in image_size)
    except (TypeError, ValueError):
        raise UserError(f"image_size must be (height, width), got {image_size!r}") from None
    if H <= 0 or W <= 0:
        raise UserError(f"image_size must be positive, got {image_size!r}")
    v = np.ones(N, bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    if v.shape != (N,):
        raise UserError(f"valid must have one flag per frame ({N}), got {np.shape(valid)}")
    v = v & np.isfinite(lm).all((1, 2))  # a frame with a missing point cannot be used
    if not v.any():
        raise UserError("no frame has usable landmarks: the face was not found in any frame")
    if weights is None:
        w = np.ones(L)
    else:
        w = np.asarray(weights, np.float64).reshape(-1)
        if w.shape != (L,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise UserError(f"landmark weights must be {L} non-negative numbers, not all zero")
    return lm, N, L, H, W, v, w


# --------------------------------------------------------------------------- the fitter
def fit_tracking(
    model: HeadModel,
    landmarks2d,
    image_size: tuple[int, int],
    valid=None,
    embedding=None,
    weights=None,
    config: FitConfig | None = None,
) -> tuple[Tracking, dict]:
    """Fit ``model`` to landmark tracks [N,L,2] (pixels, headavatar.camera convention).

    Returns the ``Tracking`` (valid = input validity, invalid frames get
    interpolated parameters) and a report dict with per-frame reprojection
    errors before (rigid fit only) and after, their medians, the focal
    length and timings.
    """
    cfg = config or FitConfig()
    # The tensors here are tiny ([frames, ~70, 3]): extra threads only add synchronisation,
    # which costs a lot on a busy machine.  Restored on exit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(model, landmarks2d, image_size, valid, embedding, weights, cfg)
    finally:
        torch.set_num_threads(threads)


def _fit(model, landmarks2d, image_size, valid, embedding, weights, cfg: FitConfig) -> tuple[Tracking, dict]:
    t_start = time.perf_counter()
    dev = torch.device(cfg.device) if cfg.device else model.template.device
    model = model.to(dev) if cfg.device else model
    lmodel = LandmarkModel(model, embedding)
    lm_np, N, L, H, W, valid_np, w_np = _check_inputs(model, landmarks2d, image_size, valid, weights, lmodel.num_points)
    p = _Problem(model, lmodel, lm_np, L, valid_np, w_np, H, W, cfg, dev)
    x, y = p.start()

    stats: dict[str, int] = {}
    x, y, _ = _solve(p, x, y, True, cfg.rigid_iters, "fit: rigid", stats)
    err_before = p.errors(x, y, True)
    x, y, final_loss = _solve(p, x, y, False, cfg.iters, "fit: all", stats)
    err_after = p.errors(x, y, False)

    tracking = _assemble(p, model, x, y, N, lm_np, valid_np)
    f = p.focal(y)
    per_before = np.full(N, np.nan)
    per_before[p.vidx] = err_before
    per_after = np.full(N, np.nan)
    per_after[p.vidx] = err_after
    report = {
        "error_px_before": float(np.median(err_before)),
        "error_px": float(np.median(err_after)),
        "per_frame_error_px_before": per_before,
        "per_frame_error_px": per_after,
        "focal_px": f,
        "focal_px_init": float(p.f_init),
        "fov_deg": float(math.degrees(2 * math.atan(0.5 * max(H, W) / f))),
        "num_frames": N,
        "num_valid": p.M,
        "final_loss": final_loss,
        "iterations": {"rigid": stats.get("fit: rigid", 0), "all": stats.get("fit: all", 0)},
        "time_s": time.perf_counter() - t_start,
    }
    return tracking, report


class _Problem:
    """The fitting problem of one clip: the valid frames' landmarks, the layout of the unknowns,
    their bounds, the priors and smoothness weights, and the objective with its Jacobians.

    Unknowns: per valid frame x = [rot 3 | cxy 2 | log z 1 | expression E | jaw 3], shared
    y = [shape S | log f].
    """

    def __init__(self, model: HeadModel, lmodel: LandmarkModel, lm_np, L: int, valid_np, w_np, H: int, W: int, cfg: FitConfig, dev):
        self.cfg, self.dev, self.lmodel = cfg, dev, lmodel
        self.vidx = np.flatnonzero(valid_np)
        self.M = len(self.vidx)
        self.L = L
        self.dt = torch.float32
        self.uv = torch.as_tensor(lm_np[self.vidx], dtype=self.dt, device=dev)
        self.w = torch.as_tensor(w_np, dtype=self.dt, device=dev)
        self.cx, self.cy = W / 2.0, H / 2.0
        self.scale = REFERENCE_SIZE / max(H, W)  # pixels -> pixels at the reference size
        self.f_init = fov_to_focal(math.radians(cfg.fov_deg), max(H, W))
        self.logf_lo, self.logf_hi = (math.log(fov_to_focal(math.radians(a), max(H, W))) for a in (cfg.fov_range_deg[1], cfg.fov_range_deg[0]))
        self.E, self.J = model.num_expression, model.num_joints
        self.S = model.num_shape if cfg.max_shape is None else min(model.num_shape, int(cfg.max_shape))
        self.shape_std = float(model.meta.get("shape_prior_std", 1.0))
        self.e_range = model.meta.get("expression_range")
        self.jaw = model.joint_names.index("jaw") if (cfg.fit_jaw and "jaw" in model.joint_names and self.J > 1) else None
        self.rc = torch.as_tensor(np.diag(CAMERA_R).copy(), device=dev)  # the camera rotation is diagonal
        self.i_e = 6
        self.i_jaw = 6 + self.E
        self.d = 6 + self.E + (3 if self.jaw is not None else 0)

    # ------------------------------------------------------------------ set-up
    def start(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The starting point (closed-form rigid pose, zero expression and identity, the initial
        focal) and, from its pixel sensitivities, the bounds, priors and smoothness weights."""
        rot0, pc, px_rot, px_expr = self._rigid_init()
        x, y = self._unknowns(rot0, pc)
        self._weights(px_rot, px_expr, y)
        return x, y

    def _rigid_init(self):
        """Closed-form rigid pose from the template's landmarks, and the pixel sensitivities (at
        the reference size) that weigh priors and smoothness in pixels."""
        lmodel, uv, w, dev = self.lmodel, self.uv, self.w, self.dev
        with torch.no_grad():
            X0 = lmodel(None, None, None, None)[0]  # [L,3] rest landmarks, identity 0
            pivot0 = lmodel.rest_joints(None)[0, 0]
            Q, centre = _closed_form_pose(X0, uv, w, self.f_init, self.cx, self.cy)
            mu = (w[:, None] * X0).sum(0) / w.sum()
            pc = centre + Q @ (pivot0 - mu)  # the pivot in camera coordinates
            rot0 = matrix_to_axis_angle(torch.as_tensor(CAMERA_R, device=dev) @ Q)  # the camera rotation is its own inverse
            px_per_m = self.f_init * self.scale / float(pc[:, 2].median().clamp_min(1e-3))
            px_rot = px_per_m * float((X0 - pivot0).norm(dim=-1).pow(2).mean().sqrt())
            px_expr = lmodel.expr_sensitivity * px_per_m
        return rot0, pc, px_rot, px_expr

    def _unknowns(self, rot0, pc):
        """x and y at the start, and their bounds (depth, expression range, field of view)."""
        M, d, S, E, i_e, dev = self.M, self.d, self.S, self.E, self.i_e, self.dev
        x = torch.zeros(M, d, device=dev)
        x[:, 0:3] = rot0
        x[:, 3:5] = pc[:, :2] / pc[:, 2:3]
        x[:, 5] = pc[:, 2].log()
        y = torch.zeros(S + 1, device=dev)
        y[S] = math.log(self.f_init)
        lo = torch.full((d,), -math.inf, device=dev)
        hi = torch.full((d,), math.inf, device=dev)
        lo[5], hi[5] = math.log(0.05), math.log(20.0)
        if self.e_range is not None and E:
            lo[i_e : i_e + E], hi[i_e : i_e + E] = float(self.e_range[0]), float(self.e_range[1])
        y_lo = torch.full((S + 1,), -math.inf, device=dev)
        y_hi = torch.full((S + 1,), math.inf, device=dev)
        y_lo[S], y_hi[S] = self.logf_lo, self.logf_hi
        self.lo, self.hi, self.y_lo, self.y_hi = lo, hi, y_lo, y_hi
        return x, y

    def _weights(self, px_rot, px_expr, y) -> None:
        """Smoothness (per coordinate, pixel equivalents^2), quadratic and L1 priors, the data weight
        per landmark, and the frame-pair weights of the smoothness term."""
        cfg, M, d, S, E, i_e, i_jaw, dev = self.cfg, self.M, self.d, self.S, self.E, self.i_e, self.i_jaw, self.dev
        smooth = torch.zeros(d, device=dev)
        smooth[0:3] = cfg.w_smooth_pose * px_rot**2
        smooth[3:5] = cfg.w_smooth_pose * (self.f_init * self.scale) ** 2
        smooth[5] = cfg.w_smooth_pose * px_rot**2
        prior_x = torch.zeros(d, device=dev)
        l1_x = torch.zeros(d, device=dev)
        if E:
            smooth[i_e : i_e + E] = cfg.w_smooth_expr * px_expr**2
            prior_x[i_e : i_e + E] = cfg.w_expr_l2
            if self.e_range is not None:
                l1_x[i_e : i_e + E] = cfg.w_expr_l1
        if self.jaw is not None:
            smooth[i_jaw:] = cfg.w_smooth_pose * px_rot**2
            prior_x[i_jaw:] = cfg.w_jaw
        pair_w = torch.as_tensor(1.0 / np.maximum(np.diff(self.vidx), 1), dtype=self.dt, device=dev) if M > 1 else torch.zeros(0, device=dev)
        prior_y = torch.zeros(S + 1, device=dev)
        prior_y[:S] = cfg.w_shape / self.shape_std**2
        prior_y[S] = cfg.focal_prior
        self.smooth, self.prior_x, self.l1_x, self.pair_w, self.prior_y = smooth, prior_x, l1_x, pair_w, prior_y
        self.y_ref = y.clone()
        self.cw = self.w / (self.w.sum() * M)  # data weight per landmark
        nb = torch.zeros(M, device=dev)  # summed pair weights of each frame's neighbours
        if M > 1:
            nb[1:] += pair_w
            nb[:-1] += pair_w
        self.nb = nb

    # --------------------------------------------------------------- the model
    def rotations(self, xb: torch.Tensor) -> torch.Tensor:
        parts = [xb[:, None, 0:3]]
        for j in range(1, self.J):
            parts.append(xb[:, None, self.i_jaw : self.i_jaw + 3] if j == self.jaw else xb.new_zeros(xb.shape[0], 1, 3))
        return torch.cat(parts, 1)

    def project(self, v, joints, xb, logf, target):
        """Scaled pixel residuals [B,L,2] of posed points (the pose function the Jacobians go through)."""
        cx, cy, scale = self.cx, self.cy, self.scale
        z = xb[:, 5:6].exp()
        pc = torch.cat([xb[:, 3:5] * z, z], -1)
        trans = pc * self.rc - joints[:, 0]  # puts the posed pivot at camera point pc
        X = self.lmodel.pose(v, joints, self.rotations(xb), trans)
        f = logf.exp()
        f = f[:, None] if f.dim() else f
        zc = (-X[..., 2]).clamp_min(1e-4)
        return torch.stack([(f * X[..., 0] / zc + cx - target[..., 0]) * scale, (f * -X[..., 1] / zc + cy - target[..., 1]) * scale], -1)

    def residuals(self, x, y, rigid):
        S, E = self.S, self.E
        shape = None if rigid or S == 0 else y[:S]
        expr = None if rigid or E == 0 else x[:, self.i_e : self.i_e + E]
        v, joints = self.lmodel.rest(shape, expr, self.M)
        return self.project(v, joints, x, y[S], self.uv), v, joints

    def objective(self, x, y, rigid, parts: bool = False):
        """The fitting objective (and, with ``parts``, the residuals and rest points it came from)."""
        M = self.M
        e, v, joints = self.residuals(x, y, rigid)
        F = (_robust(e.pow(2).sum(-1), self.cfg.huber_px) * self.cw).sum()
        if M > 1:
            dx = x[1:] - x[:-1]
            F = F + ((dx * dx * self.smooth).sum(-1) * self.pair_w).sum() / M
        F = F + ((x * x * self.prior_x).sum() + (x.abs() * self.l1_x).sum()) / M
        if not rigid:
            F = F + ((y - self.y_ref).pow(2) * self.prior_y).sum()
        return (F, e, v, joints) if parts else F

    def jacobians(self, v, joints, x, y, free_y: bool):
        """Gauss-Newton Jacobians of the scaled residuals: [M,L,2,d] per frame, [M,L,2,S+1] shared.

        Derivatives with respect to the pose, each rest point and each rest joint;
        blendshape columns follow by the chain rule through the point-level bases.
        Rigid models: closed form; skinned models: closed form except the non-root
        joints' rotations (``_skinned_jacobians``).
        """
        lmodel, M, L, d, S, E, i_e, i_jaw, jaw = self.lmodel, self.M, self.L, self.d, self.S, self.E, self.i_e, self.i_jaw, self.jaw
        if lmodel.rigid:
            Jpose, Jv, Jj, Jf = _rigid_jacobians(v, joints, x, y[S], self.rc, self.scale)
        else:
            Jpose, Jv, Jj, Jf = _skinned_jacobians(lmodel, self.rotations, v, joints, x, y[S], self.rc, self.scale, [jaw] if jaw is not None else [])
        Jx = x.new_zeros(M, L, 2, d)
        Jx[..., 0:6] = Jpose[..., 0:6]
        if jaw is not None:
            Jx[..., i_jaw:] = Jpose[..., 6:9]
        if E:
            Jx[..., i_e : i_e + E] = torch.einsum("mlcd,lde->mlce", Jv, lmodel.expr_points) + Jj.flatten(-2) @ lmodel.joints_expr
        Jy = None
        if free_y:
            Jy = x.new_zeros(M, L, 2, S + 1)
            if S:
                Jy[..., :S] = torch.einsum("mlcd,lds->mlcs", Jv, lmodel.shape_points[..., :S]) + Jj.flatten(-2) @ lmodel.joints_shape[:, :S]
            Jy[..., S] = Jf
        return Jx, Jy

    def laplacian(self, p):
        """(Smoothness Hessian / (2/M smooth)) @ p, frame-wise: sum over pairs of w (p_m - p_neighbour)."""
        out = p * self.nb[:, None]
        if self.M > 1:
            out[1:] -= self.pair_w[:, None] * p[:-1]
            out[:-1] -= self.pair_w[:, None] * p[1:]
        return out

    def errors(self, x, y, rigid) -> np.ndarray:
        """Mean reprojection error per valid frame, in pixels of the input images."""
        with torch.no_grad():
            e, _, _ = self.residuals(x, y, rigid)
            return (e / self.scale).norm(dim=-1).mean(-1).cpu().numpy()

    def focal(self, y) -> float:
        return float(y[self.S].exp())


def _solve(p: _Problem, x, y, rigid: bool, iters: int, desc: str, stats: dict):
    """Levenberg-Marquardt.  Exact gradients (autograd); Gauss-Newton curvature with robust
    (IRLS) weights; the Newton system (per-frame blocks coupled by smoothness between
    neighbouring frames and by the shared identity / focal) solved by conjugate gradients,
    preconditioned with the per-frame blocks and the shared block's Schur complement;
    bounds by an active set."""
    cfg, d, S, M, dev = p.cfg, p.d, p.S, p.M, p.dev
    free_x = torch.ones(d, dtype=torch.bool, device=dev)
    if rigid:
        free_x[6:] = False
    free_y = not rigid and (S > 0 or cfg.optimize_focal)
    yfree = torch.ones(S + 1, dtype=torch.bool, device=dev)
    if not cfg.optimize_focal:
        yfree[S] = False
    lam = 1e-3
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=iters, desc=desc, unit="it", leave=False)
    F = float("nan")
    sm = 2 * p.smooth / M  # smoothness Hessian scale per coordinate
    done = 0
    for _ in range(iters):
        done += 1
        xg = x.clone().requires_grad_(True)
        yg = y.clone().requires_grad_(free_y)
        F_t, e, v, joints = p.objective(xg, yg, rigid, parts=True)
        grads = torch.autograd.grad(F_t, [xg, yg] if free_y else [xg])
        F = float(F_t.detach())
        gx = grads[0] * free_x
        gy = grads[1] * yfree if free_y else None
        with torch.no_grad():
            system = _gauss_newton_system(p, e, v, joints, x, y, free_y)
            x, y, lam, improved = _damped_step(p, system, x, y, gx, gy, F, rigid, lam, free_x, free_y, yfree, sm)
        if bar is not None:
            bar.update(1)
        if improved < cfg.tol:
            break  # converged (or no step decreases the objective any more)
    if bar is not None:
        bar.close()
    stats[desc] = done
    return x, y, F


def _gauss_newton_system(p: _Problem, e, v, joints, x, y, free_y: bool):
    """The IRLS-weighted Gauss-Newton blocks: per-frame A [M,d,d] (with the quadratic priors),
    frame-to-shared B [M,d,S+1] and shared C [S+1,S+1] (None without free shared unknowns)."""
    M, L, d, S = p.M, p.L, p.d, p.S
    Jx, Jy = p.jacobians(v.detach(), joints.detach(), x, y, free_y)
    e2 = e.detach().pow(2).sum(-1)
    sw = (p.cw / torch.sqrt(1 + e2 / p.cfg.huber_px**2)).sqrt()[..., None, None]  # IRLS weight
    Jx = (Jx * sw).reshape(M, 2 * L, d)
    A = Jx.transpose(1, 2) @ Jx + torch.diag_embed((2 * p.prior_x / M).expand(M, d))  # [M,d,d]
    B = C = None
    if free_y:
        Jy = (Jy * sw).reshape(M, 2 * L, S + 1)
        B = Jx.transpose(1, 2) @ Jy  # [M,d,S+1]
        Jy2 = Jy.reshape(M * 2 * L, S + 1)
        C = Jy2.T @ Jy2 + torch.diag(2 * p.prior_y)
    return A, B, C


def _damped_step(p: _Problem, system, x, y, gx, gy, F: float, rigid: bool, lam: float, free_x, free_y: bool, yfree, sm):
    """One accepted Levenberg-Marquardt step (damping raised until one decreases the objective):
    the new x, y, damping, and the relative decrease (0 when no step helped)."""
    A, B, C = system
    M, d, S, dev, dt = p.M, p.d, p.S, p.dev, p.dt
    lo, hi, y_lo, y_hi, nb = p.lo, p.hi, p.y_lo, p.y_hi, p.nb
    # projected Newton (Bertsekas): coordinates within eps of a bound that the gradient
    # pushes against leave the Newton system and take a diagonal step onto the bound
    eps = (0.02 * (hi - lo)).nan_to_num(0.0, posinf=0.0)
    active = free_x[None] & (((x <= lo + eps) & (gx > 0)) | ((x >= hi - eps) & (gx < 0)))
    fxf = (free_x[None].expand(M, d) & ~active).to(dt)
    diag_step = -gx / torch.diagonal(A, dim1=1, dim2=2).clamp_min(1e-12) * active
    fyf = (yfree & ~(((y <= y_lo) & (gy > 0)) | ((y >= y_hi) & (gy < 0)))).to(dt) if free_y else None
    improved = 0.0
    for _attempt in range(8):
        # damped system restricted to the free coordinates (frozen ones: identity rows)
        Ad = A + lam * torch.diag_embed(torch.diagonal(A, dim1=1, dim2=2)) + 1e-9 * torch.eye(d, device=dev)
        Ad = Ad * (fxf[:, :, None] * fxf[:, None, :]) + torch.diag_embed(1 - fxf)
        Dsm = sm * nb[:, None] * fxf  # the smoothness Hessian's diagonal
        # explicit inverses: applying them is element-wise work, far cheaper on CPU
        # than batched triangular solves of many small systems
        Ainv = _spd_inverse(Ad + torch.diag_embed(Dsm))
        if free_y:
            Bf = B * fxf[:, :, None] * fyf[None, None, :]
            Cd = C + lam * torch.diag(torch.diagonal(C)) + 1e-9 * torch.eye(S + 1, device=dev)
            Cd = Cd * (fyf[:, None] * fyf[None, :]) + torch.diag(1 - fyf)
            AiB = Ainv @ Bf  # [M,d,S+1]
            Sinv = _spd_inverse(Cd - Bf.reshape(-1, S + 1).T @ AiB.reshape(-1, S + 1))

        def matvec(px, py):
            ox = (Ad * px[:, None, :]).sum(-1) + sm * p.laplacian(px) * fxf
            if not free_y:
                return ox, None
            ox = ox + Bf.reshape(-1, S + 1).matmul(py).reshape(M, d)
            oy = Cd @ py + Bf.reshape(-1, S + 1).T.matmul(px.reshape(-1))
            return ox, oy

        def precond(rx, ry):
            zx = (Ainv * rx[:, None, :]).sum(-1)
            if not free_y:
                return zx, None
            zy = Sinv @ (ry - Bf.reshape(-1, S + 1).T.matmul(zx.reshape(-1)))
            return zx - AiB.reshape(-1, S + 1).matmul(zy).reshape(M, d), zy

        dxs, dy = _pcg(matvec, precond, -(gx * fxf), -(gy * fyf) if free_y else None, p.cfg.cg_iters)
        # backtracking along the projected path: cheaper than re-solving with more damping
        accepted = False
        for k in range(4):
            a = 0.5**k
            x_new = torch.minimum(torch.maximum(x + a * (dxs * fxf + diag_step), lo), hi)
            y_new = torch.minimum(torch.maximum(y + a * dy * fyf, y_lo), y_hi) if free_y else y
            F_new = float(p.objective(x_new, y_new, rigid))
            if F_new <= F:
                accepted = True
                break
        if accepted:
            improved = (F - F_new) / max(F, 1e-12)
            x, y = x_new, y_new
            lam = max(lam / 3.0, 1e-7) if k == 0 else lam * 2.0
            break
        lam *= 10.0
    return x, y, lam, improved


def _assemble(p: _Problem, model: HeadModel, x, y, N: int, lm_np, valid_np) -> Tracking:
    """The per-frame tracking from the fitted unknowns (invalid frames interpolated)."""
    S, E, J, L, vidx = p.S, p.E, p.J, p.L, p.vidx
    with torch.no_grad():
        shape = y[:S]
        z = x[:, 5:6].exp()
        pc = torch.cat([x[:, 3:5] * z, z], -1)
        trans = pc * p.rc - p.lmodel.rest_joints(shape if S else None, x[:, p.i_e : p.i_e + E] if E else None)[:, 0]
        f = p.focal(y)
    rots = np.zeros((N, J, 3), np.float32)
    rots[vidx] = p.rotations(x).cpu().numpy()
    trans_np = np.zeros((N, 3), np.float32)
    trans_np[vidx] = trans.cpu().numpy()
    expr_np = np.zeros((N, E), np.float32)
    expr_np[vidx] = x[:, p.i_e : p.i_e + E].cpu().numpy()
    if p.M < N:
        rots = _interp_rotations(rots, valid_np)
        trans_np = _interp_missing(trans_np, valid_np)
        expr_np = _interp_missing(expr_np, valid_np)
    shape_full = np.zeros(model.num_shape, np.float32)
    shape_full[:S] = shape.cpu().numpy()
    K = np.array([[f, 0, p.cx], [0, f, p.cy], [0, 0, 1]], np.float32)
    return Tracking(
        shape=shape_full,
        expression=expr_np,
        joint_rotations=rots,
        translation=trans_np,
        K=np.repeat(K[None], N, 0),
        R=np.repeat(CAMERA_R[None], N, 0),
        t=np.zeros((N, 3), np.float32),
        extras={k: np.zeros((N, n), np.float32) for k, n in model.extras_sizes().items()},
        valid=valid_np.copy(),
        landmarks2d=np.where(valid_np[:, None, None], lm_np, np.nan).astype(np.float32) if L == 68 else None,
    )
