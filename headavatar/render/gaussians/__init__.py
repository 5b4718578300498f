"""Gaussian-splat rendering behind one function, ``render_gaussians``.

Backends:
  * ``torch``  -- pure PyTorch (CPU and CUDA, autograd); the reference.
  * ``triton`` -- our tile rasteriser in Triton (CUDA; Triton ships with PyTorch's CUDA
    wheels and compiles at run time, no nvcc); no host synchronisation, so a frame
    can be captured in a CUDA graph.  On the CPU it runs only under Triton's
    interpreter (``TRITON_INTERPRET=1``), for tests.
  * ``gsplat`` -- gsplat's CUDA kernels (optional dependency, CUDA only).
``backend="auto"`` on CUDA tensors picks gsplat when it is installed (measured faster
than triton for batches of 16 and more, docs/BENCHMARKS.md), else triton when Triton is
importable (the pip-only path: PyTorch's CUDA wheels bring it), else torch.

Inputs (B = batch of frames, each with its own Gaussians and one camera):
  means     [B,N,3]  world positions (metres)
  quats     [B,N,4]  rotations, (w,x,y,z), any norm (normalised inside)
  scales    [B,N,3]  standard deviations along the rotated axes (linear, > 0)
  opacities [B,N]    in [0,1]
  colors    [B,N,3] plain RGB, or [B,N,K,3] SH coefficients with K = (sh_degree+1)^2
  viewmats  [B,4,4]  world-to-camera (OpenCV, headavatar.camera)
  Ks        [B,3,3]  pixel intrinsics, pixel centres at +0.5
  width, height
  sh_degree  None for plain colours, else the degree to evaluate (<= sqrt(K)-1)
  backgrounds [B,3] or None (black)
Returns ``RenderOutput(rgb [B,H,W,3], alpha [B,H,W,1], depth [B,H,W,1], radii [B,N])``.

Semantics shared by all backends (they are checked against each other):
  * EWA projection with a 0.3 px^2 low-pass added to the 2D covariance (3DGS);
  * Gaussians with depth < near (0.01) are culled;
  * per pixel, front-to-back compositing sorted by camera-space depth of the
    Gaussian centre, alpha_i = min(0.99, o_i * exp(-0.5 d^T S^-1 d)),
    contributions with alpha_i < 1/255 skipped, colour = sum T_i alpha_i c_i
    + T_final * background;
  * SH colours: c = max(SH(dir) + 0.5, 0), dir = normalize(mean - camera centre).
"""

from __future__ import annotations

import os
from typing import Callable, Protocol

import torch

from headavatar.errors import UserError
from headavatar.registry import Registry


class RenderOutput:
    """rgb [B,H,W,3], alpha [B,H,W,1], depth [B,H,W,1] (alpha-weighted mean camera z; 0 where
    empty), radii [B,N] int32 screen radius in pixels (0 = culled).

    ``radii`` may be given as a function and is then computed on first access: a
    backend that has to derive it (gsplat) costs nothing extra for callers that
    never look at it (training, rendering).
    """

    __slots__ = ("rgb", "alpha", "depth", "_radii")

    def __init__(self, rgb: torch.Tensor, alpha: torch.Tensor, depth: torch.Tensor,
                 radii: torch.Tensor | Callable[[], torch.Tensor]):
        self.rgb, self.alpha, self.depth, self._radii = rgb, alpha, depth, radii

    @property
    def radii(self) -> torch.Tensor:
        if callable(self._radii):
            self._radii = self._radii()
        return self._radii


class GaussianBackend(Protocol):
    """What a Gaussian rasteriser registers: a function with ``render_gaussians``'s inputs (module
    docstring) that returns a ``RenderOutput``.  ``**kw`` carries backend-specific tuning options
    (e.g. triton's ``chunk``)."""

    def __call__(self, means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor, colors: torch.Tensor,
                 viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int, *, sh_degree: int | None = None,
                 backgrounds: torch.Tensor | None = None, **kw) -> RenderOutput: ...


# Device-dependent availability (CUDA, Triton's interpreter) is checked by ``select_backend``, which
# knows the device; the registry holds the entries and imports a built-in on first use.
GAUSSIAN_BACKENDS: Registry[GaussianBackend] = Registry(
    "Gaussian backend",
    builtins={"torch": "headavatar.render.gaussians.torch_ref", "gsplat": "headavatar.render.gaussians.gsplat_backend",
              "triton": "headavatar.render.gaussians.triton_backend"},
    hint="--backend auto picks gsplat, then triton on CUDA, else torch",
)


def register_backend(name: str):
    """Decorator: register a Gaussian rasteriser under ``name`` (see ``GaussianBackend``)."""
    return GAUSSIAN_BACKENDS.register(name)


def gsplat_available() -> tuple[bool, str]:
    """(available, reason) for the gsplat backend on this machine."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import gsplat  # noqa: F401
    except Exception as e:  # ImportError or a broken install
        return False, f"gsplat is not importable ({type(e).__name__}: {e}); pip install gsplat"
    return True, "ok"


def triton_available(device: torch.device | str = "cuda") -> tuple[bool, str]:
    """(available, reason) for the triton backend on ``device`` (CPU: interpreter only)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
    elif os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False, "the triton backend needs a CUDA device (or TRITON_INTERPRET=1 for slow CPU checks)"
    try:
        import triton  # noqa: F401
    except Exception as e:
        return False, f"triton is not importable ({type(e).__name__}: {e}); it comes with PyTorch's CUDA wheels"
    return True, "ok"


def select_backend(name: str, device: torch.device | str) -> str:
    """Resolve 'auto'/'torch'/'triton'/'gsplat' to a usable backend name, or raise UserError."""
    device = torch.device(device)
    if name == "auto":
        # gsplat first where a user installed it: on an H100 (docs/BENCHMARKS.md, issue 15) our
        # Triton rasteriser matches it at batch 1 but its backward is slower at batch 16+
        if device.type == "cuda" and gsplat_available()[0]:
            return "gsplat"
        if device.type == "cuda" and triton_available(device)[0]:
            return "triton"
        return "torch"
    if name == "torch":
        return name
    if name == "triton":
        ok, why = triton_available(device)
        if not ok:
            raise UserError(f"--backend triton unavailable: {why}; use --backend torch (or auto)")
        return name
    if name == "gsplat":
        if device.type != "cuda":
            raise UserError("the gsplat backend needs a CUDA device; use --backend torch (or auto) on the CPU")
        ok, why = gsplat_available()
        if not ok:
            raise UserError(f"--backend gsplat unavailable: {why}")
        return name
    if name in GAUSSIAN_BACKENDS:  # a backend registered by a user: its own checks run when it is called
        return name
    raise UserError(f"unknown Gaussian backend '{name}'; choose auto or one of: {', '.join(GAUSSIAN_BACKENDS.available())}")


def render_gaussians(means, quats, scales, opacities, colors, viewmats, Ks, width: int, height: int,
                     sh_degree: int | None = None, backgrounds=None, backend: str = "auto", **kw) -> RenderOutput:
    name = select_backend(backend, means.device)
    return GAUSSIAN_BACKENDS.get(name)(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                                       sh_degree=sh_degree, backgrounds=backgrounds, **kw)
