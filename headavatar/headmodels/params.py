"""``FrameParams``: a batch of frames' head-model parameters, the one type they travel in.

Produced by the subject's tracking (``Tracking.params`` on the host,
``Tracking.on_device(...).params`` from device-resident arrays) and by
``FrameParams.neutral``; consumed by the head models (``HeadModel.forward``)
and by every method's render.

For one release a ``FrameParams`` also answers the dict-style reads of the
hand-built dicts it replaces (``p["expression"]``, ``p.get("extras")``), and
``FrameParams.of`` turns such a dict into one: code outside this package that
still builds dicts keeps working.  New code uses the attributes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

_FIELDS = ("shape", "expression", "joint_rotations", "translation", "extras")


@dataclass
class FrameParams:
    """B frames: ``shape`` [B,S], ``expression`` [B,E], ``joint_rotations`` [B,J,3] (axis-angle, root first),
    ``translation`` [B,3] or None, ``extras`` name -> [B,K] (e.g. FLAME eyelids, gaze)."""

    shape: torch.Tensor | None  # None: the head model's mean identity
    expression: torch.Tensor
    joint_rotations: torch.Tensor
    translation: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    # ------------------------------------------------------------ construction
    @classmethod
    def of(cls, p: "FrameParams | dict") -> "FrameParams":
        """A FrameParams from one, or from a dict with the same keys (the older form)."""
        if isinstance(p, cls):
            return p
        return cls(p.get("shape"), p["expression"], p["joint_rotations"], p.get("translation"), dict(p.get("extras") or {}))

    @classmethod
    def neutral(cls, head, batch: int = 1, device=None, extras: dict[str, int] | None = None,
                shape: torch.Tensor | None = None) -> "FrameParams":
        """For ``head`` (a HeadModel; not imported here, base.py imports this module): rest pose, zero
        expression and translation, zero extras (``extras``: name -> size; default the head model's
        post-skinning extras).  ``shape`` [S] keeps an identity (default: the mean one)."""
        dev = head.template.device if device is None else torch.device(device)
        z = lambda *s: torch.zeros(*s, device=dev)  # noqa: E731
        sizes = head.extras_sizes() if extras is None else extras
        ident = z(batch, head.num_shape) if shape is None else shape.to(dev, torch.float32)[None].expand(batch, -1)
        return cls(ident, z(batch, head.num_expression), z(batch, head.num_joints, 3), z(batch, 3), {k: z(batch, n) for k, n in sizes.items()})

    # ------------------------------------------------------------------ sizes
    @property
    def batch_size(self) -> int:
        return int(self.expression.shape[0])

    def __len__(self) -> int:
        return self.batch_size

    @property
    def device(self) -> torch.device:
        return self.expression.device

    # ------------------------------------------------------------ operations
    def to(self, device, non_blocking: bool = False) -> "FrameParams":
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return FrameParams(mv(self.shape), mv(self.expression), mv(self.joint_rotations), mv(self.translation),
                           {k: mv(v) for k, v in self.extras.items()})

    def map(self, fn) -> "FrameParams":
        """``fn`` applied to every tensor (e.g. ``lambda t: t.detach().clone()``)."""
        f = lambda t: None if t is None else fn(t)  # noqa: E731
        return FrameParams(f(self.shape), f(self.expression), f(self.joint_rotations), f(self.translation), {k: f(v) for k, v in self.extras.items()})

    def clone(self) -> "FrameParams":
        return self.map(torch.clone)

    def replace(self, **changes) -> "FrameParams":
        return dataclasses.replace(self, **changes)

    def select(self, idx) -> "FrameParams":
        """Frames ``idx`` (an int keeps the batch dimension, a slice or index tensor picks several)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        return self.map(lambda t: t[idx])

    @staticmethod
    def cat(items: list["FrameParams"]) -> "FrameParams":
        first = items[0]
        c = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
        return FrameParams(c([p.shape for p in items]), c([p.expression for p in items]), c([p.joint_rotations for p in items]),
                           c([p.translation for p in items]), {k: torch.cat([p.extras[k] for p in items]) for k in first.extras})

    # --------------------------------------------- the dict-style reads (one release)
    def __getitem__(self, key):
        """``p[i]`` / ``p[a:b]`` / ``p[tensor]``: those frames (as ``select``).  ``p["expression"]``: the field
        (transitional, for code written against the dicts this type replaces)."""
        if isinstance(key, str):
            if key not in _FIELDS:
                raise KeyError(key)
            return getattr(self, key)
        return self.select(key)

    def get(self, key: str, default=None):
        """Transitional, as ``p["key"]``."""
        return getattr(self, key) if key in _FIELDS else default

    def keys(self) -> tuple[str, ...]:
        """Transitional: ``{**p}`` / ``dict(p)`` give the older dict."""
        return _FIELDS

    def items(self):
        """Transitional, as the older dict's (``translation`` left out when None)."""
        return [(k, getattr(self, k)) for k in _FIELDS if k in self]

    def __contains__(self, key: str) -> bool:
        """Transitional, as the older dict's."""
        return key in _FIELDS and (key != "translation" or self.translation is not None)
