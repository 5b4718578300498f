"""Triangle-mesh rendering in the rasterize / interpolate / antialias style (as nvdiffrast).

Backends implement ``MeshBackend``:
  * ``torch``      -- pure PyTorch z-buffer + differentiable perspective-correct
                      barycentrics + analytic edge antialiasing; the reference (CPU and CUDA).
  * ``nvdiffrast`` -- used when the user has nvdiffrast installed (optional; NVIDIA licence).

Conventions (see headavatar.camera): clip coordinates from ``Cameras.to_clip``;
row 0 of every buffer is the *top* image row (NDC y = -1); pixel centres at +0.5.

``rasterize(clip [B,V,4], faces [F,3] int, (H,W))`` -> ``rast [B,H,W,4]``:
    (u, v, z/w, triangle_id + 1) with 0 in the last channel where empty; u, v are the
    perspective-correct barycentric weights of vertices 1 and 2 (vertex 0 gets 1-u-v),
    differentiable with respect to ``clip``.
``interpolate(attr [B,V,C] or [V,C], rast, faces)`` -> [B,H,W,C] (0 where empty).
``antialias(color [B,H,W,C], rast, clip, faces, topology=None)`` -> [B,H,W,C]: blends across
    silhouette edges by the analytic coverage of the edge, which gives gradients
    to vertex positions at silhouettes. ``topology``: the mesh's edge table
    (``torch_ref.edge_topology(faces)``) when the caller keeps it; a backend may ignore it.

A backend registers a factory ``(device) -> MeshBackend`` in ``MESH_BACKENDS`` (see
headavatar/registry.py); ``get_mesh_backend`` resolves ``auto`` and builds one.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from headavatar.registry import Registry


class MeshBackend(Protocol):
    name: str

    def rasterize(self, clip: torch.Tensor, faces: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor: ...

    def interpolate(self, attr: torch.Tensor, rast: torch.Tensor, faces: torch.Tensor) -> torch.Tensor: ...

    def antialias(self, color: torch.Tensor, rast: torch.Tensor, clip: torch.Tensor, faces: torch.Tensor,
                  topology: torch.Tensor | None = None) -> torch.Tensor: ...


def nvdiffrast_available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import nvdiffrast.torch  # noqa: F401
    except Exception as e:
        return False, f"nvdiffrast is not installed ({type(e).__name__})"
    return True, "ok"


# name -> factory(device) -> MeshBackend; each backend's module registers it when imported
MESH_BACKENDS: Registry[Callable[[torch.device], MeshBackend]] = Registry(
    "mesh backend",
    builtins={"torch": "headavatar.render.mesh.torch_ref", "nvdiffrast": "headavatar.render.mesh.nvdiffrast_backend"},
    checks={"nvdiffrast": nvdiffrast_available},
    hint="--mesh-backend auto picks nvdiffrast on CUDA when it is installed, else torch",
)


def get_mesh_backend(name: str = "auto", device: torch.device | str = "cpu") -> MeshBackend:
    """A mesh backend for ``device``: ``auto`` is nvdiffrast on CUDA when it is installed, else torch."""
    device = torch.device(device)
    if name == "auto":
        name = "nvdiffrast" if device.type == "cuda" and nvdiffrast_available()[0] else "torch"
    return MESH_BACKENDS.get(name)(device)
