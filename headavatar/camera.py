"""The one camera convention used inside headavatar.

* World space = the head model's space: metres, +y up, the face looking
  towards +z, +x towards the subject's left.
* Cameras are OpenCV pinhole cameras: ``x_cam = R @ x_world + t`` (world to
  camera), camera axes +x right, +y down, +z forward (depth > 0 in front).
* Intrinsics ``K`` are in pixels.  Pixel (i, j) (column i, row j) covers
  ``[i, i+1) x [j, j+1)``; its centre is at ``(i + 0.5, j + 0.5)``.  A centred
  camera therefore has ``cx = W / 2``.  (This is the convention of gsplat and
  nvdiffrast; OpenCV puts pixel centres at integers: see ``opencv_K_to_internal``.)
* Clip space for mesh rasterisation (``clip_matrix``): ``x_ndc = 2u/W - 1``,
  ``y_ndc = 2v/H - 1`` with ``(u, v)`` pixel coordinates, so NDC y = -1 is
  the *top* image row and row 0 of a rasterised buffer is the top of the
  image.  ``z_ndc`` maps [near, far] to [-1, 1]; ``w = depth``.

Converters from other conventions (OpenGL/NeRF c2w, the references' formats)
live at the edges (see the subject importers) and call the helpers below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# OpenGL camera axes (x right, y up, z backward) <-> OpenCV (x right, y down, z forward)
GL_TO_CV = torch.diag(torch.tensor([1.0, -1.0, -1.0]))


@dataclass
class Cameras:
    """A batch of pinhole cameras. K, R: [B,3,3]; t: [B,3]; image size (H, W)."""

    K: torch.Tensor
    R: torch.Tensor
    t: torch.Tensor
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.K.dim() == 2:
            self.K = self.K[None]
        if self.R.dim() == 2:
            self.R = self.R[None]
        if self.t.dim() == 1:
            self.t = self.t[None]

    def __len__(self) -> int:
        return self.R.shape[0]

    def to(self, device=None, dtype=None) -> "Cameras":
        return Cameras(self.K.to(device, dtype), self.R.to(device, dtype), self.t.to(device, dtype), self.height, self.width)

    def __getitem__(self, idx) -> "Cameras":
        return Cameras(self.K[idx], self.R[idx], self.t[idx], self.height, self.width)

    @property
    def viewmats(self) -> torch.Tensor:
        """[B,4,4] world-to-camera matrices (the form gsplat takes)."""
        B = self.R.shape[0]
        M = torch.zeros(B, 4, 4, dtype=self.R.dtype, device=self.R.device)
        M[:, :3, :3] = self.R
        M[:, :3, 3] = self.t
        M[:, 3, 3] = 1
        return M

    @property
    def centers(self) -> torch.Tensor:
        """[B,3] camera centres in world space (-R^T t)."""
        return -(self.R.transpose(-1, -2) @ self.t[..., None])[..., 0]

    def world_to_camera(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B,N,3] -> [B,N,3] camera coordinates."""
        return x @ self.R.transpose(-1, -2) + self.t[:, None, :]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B,N,3] world points -> [B,N,2] pixel coordinates (u, v)."""
        xc = self.world_to_camera(x)
        z = xc[..., 2:3].clamp_min(1e-8)
        uv1 = (xc / z) @ self.K.transpose(-1, -2)
        return uv1[..., :2]

    def resized(self, height: int, width: int) -> "Cameras":
        """The same cameras for an image resized to (height, width)."""
        sx, sy = width / self.width, height / self.height
        K = self.K.clone()
        K[:, 0, :] *= sx
        K[:, 1, :] *= sy
        return Cameras(K, self.R, self.t, height, width)

    def clip_matrix(self, near: float = 0.01, far: float = 100.0) -> torch.Tensor:
        """[B,4,4] mapping world points to clip space (see module docstring)."""
        K = self.K
        H, W = self.height, self.width
        B = K.shape[0]
        P = torch.zeros(B, 4, 4, dtype=K.dtype, device=K.device)
        P[:, 0, 0] = 2 * K[:, 0, 0] / W
        P[:, 0, 1] = 2 * K[:, 0, 1] / W
        P[:, 0, 2] = 2 * K[:, 0, 2] / W - 1
        P[:, 1, 1] = 2 * K[:, 1, 1] / H
        P[:, 1, 2] = 2 * K[:, 1, 2] / H - 1
        P[:, 2, 2] = (far + near) / (far - near)
        P[:, 2, 3] = -2 * far * near / (far - near)
        P[:, 3, 2] = 1
        return P @ self.viewmats

    def to_clip(self, x: torch.Tensor, near: float = 0.01, far: float = 100.0) -> torch.Tensor:
        """x: [B,N,3] -> homogeneous clip coordinates [B,N,4]."""
        xh = torch.cat([x, torch.ones_like(x[..., :1])], -1)
        return xh @ self.clip_matrix(near, far).transpose(-1, -2)


def intrinsics(fx: float, fy: float, cx: float, cy: float) -> torch.Tensor:
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def fov_to_focal(fov_rad: float, size: int) -> float:
    import math

    return 0.5 * size / math.tan(0.5 * fov_rad)


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """World-to-camera (R, t) of an OpenCV camera at ``eye`` looking at ``target``.

    eye, target: [B,3] (or [3]); ``up`` is world +y by default.
    """
    eye = eye.reshape(-1, 3).to(torch.float32)
    target = target.reshape(-1, 3).to(eye)
    if up is None:
        up = torch.tensor([0.0, 1.0, 0.0]).to(eye).expand_as(eye)
    z = torch.nn.functional.normalize(target - eye, dim=-1)  # forward
    x = torch.nn.functional.normalize(torch.cross(z, up.reshape(-1, 3).expand_as(z), dim=-1), dim=-1)  # right
    # y = z x x points down, as OpenCV wants
    y = torch.cross(z, x, dim=-1)
    R = torch.stack([x, y, z], dim=-2)
    t = -(R @ eye[..., None])[..., 0]
    return R, t


def opencv_K_to_internal(K: torch.Tensor) -> torch.Tensor:
    """OpenCV puts pixel centres at integer coordinates; ours at +0.5."""
    K = K.clone()
    K[..., 0, 2] += 0.5
    K[..., 1, 2] += 0.5
    return K


def internal_K_to_opencv(K: torch.Tensor) -> torch.Tensor:
    K = K.clone()
    K[..., 0, 2] -= 0.5
    K[..., 1, 2] -= 0.5
    return K


def opengl_c2w_to_w2c(c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NeRF/OpenGL camera-to-world [...,4,4] or [...,3,4] -> OpenCV (R, t) world-to-camera."""
    Rc2w = c2w[..., :3, :3] @ GL_TO_CV.to(c2w)
    tc2w = c2w[..., :3, 3]
    R = Rc2w.transpose(-1, -2)
    t = -(R @ tc2w[..., None])[..., 0]
    return R, t
