"""Head models behind one interface (see base.py) and a registry to find them by name.

A head model is referred to by a *spec*: a dict with a ``name`` and the
options its loader takes, e.g. ``{"name": "procedural"}``,
``{"name": "flame", "dir": "/path/to/FLAME2020"}``, ``{"name": "ict", "path": "ict.npz"}``.
Subjects store the spec (without absolute paths that only make sense on one
machine) together with the model's fingerprint.
"""

from __future__ import annotations

from typing import Callable

from headavatar.errors import UserError
from headavatar.headmodels.base import REQUIRED_REGIONS, HeadModel

_REGISTRY: dict[str, Callable[..., HeadModel]] = {}


def register_head_model(name: str):
    def deco(fn: Callable[..., HeadModel]):
        _REGISTRY[name] = fn
        return fn

    return deco


def available_head_models() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def load_head_model(spec: dict | str | None = None, **overrides) -> HeadModel:
    """Build a head model from a spec (dict or bare name); the default is procedural."""
    _import_builtin()
    if spec is None:
        spec = {"name": "procedural"}
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = {**spec, **{k: v for k, v in overrides.items() if v is not None}}
    name = spec.get("name")
    if name not in _REGISTRY:
        raise UserError(f"unknown head model '{name}'; choose one of: {', '.join(sorted(_REGISTRY))}")
    opts = {k: v for k, v in spec.items() if k not in ("name", "fingerprint")}
    model = _REGISTRY[name](**opts)
    model.validate()
    return model


def _import_builtin() -> None:
    # Import for their registration side effect; optional models that fail to
    # import (missing optional dependency) are simply not registered.
    import importlib

    for mod in ("procedural", "flame", "ict"):
        try:
            importlib.import_module(f"headavatar.headmodels.{mod}")
        except ModuleNotFoundError as e:
            if not e.name or not e.name.startswith("headavatar.headmodels"):
                raise


__all__ = ["HeadModel", "REQUIRED_REGIONS", "load_head_model", "register_head_model", "available_head_models"]
