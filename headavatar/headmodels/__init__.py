"""Head models behind one interface (see base.py) and a registry to find them by name.

A head model is referred to by a *spec*: a dict with a ``name`` and the
options its loader takes, e.g. ``{"name": "procedural"}``,
``{"name": "flame", "dir": "/path/to/FLAME2020"}``, ``{"name": "ict", "path": "ict.npz"}``.
Subjects store the spec (without absolute paths that only make sense on one
machine) together with the model's fingerprint.
"""

from __future__ import annotations

from typing import Callable

from headavatar.headmodels.base import REQUIRED_REGIONS, HeadModel
from headavatar.registry import Registry

# name -> builder(**options) -> HeadModel; the built-ins register themselves when imported
HEAD_MODELS: Registry[Callable[..., HeadModel]] = Registry(
    "head model", builtins={n: f"headavatar.headmodels.{n}" for n in ("procedural", "flame", "ict")}
)


def register_head_model(name: str):
    """Decorator: register a builder ``(**options) -> HeadModel`` under ``name``."""
    return HEAD_MODELS.register(name)


def available_head_models() -> list[str]:
    return HEAD_MODELS.available()


def load_head_model(spec: dict | str | None = None, **overrides) -> HeadModel:
    """Build a head model from a spec (dict or bare name); the default is procedural."""
    if spec is None:
        spec = {"name": "procedural"}
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = {**spec, **{k: v for k, v in overrides.items() if v is not None}}
    build = HEAD_MODELS.get(spec.get("name"))
    opts = {k: v for k, v in spec.items() if k not in ("name", "fingerprint")}
    model = build(**opts)
    model.validate()
    return model


__all__ = ["HEAD_MODELS", "HeadModel", "REQUIRED_REGIONS", "load_head_model", "register_head_model", "available_head_models"]
