"""Avatar methods (flashavatar, flare) found through a registry.

A method is a class (``MethodProtocol`` in avatar.py) with:
  name: str
  config_cls: a dataclass whose defaults reproduce the paper
  capabilities, describe: what its avatars can give (Gaussians, a mesh, relighting) and a phrase for messages
  train(subject_dir, run_dir, cfg, resume, progress) -> None
  load(run_dir, device) -> an Avatar (the protocol in avatar.py) for eval/render/export/viewer
  demo_settings(quick), demo_extras(...): what `headavatar demo` needs
Registered with ``@register_method``; nothing outside the method's folder names it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from headavatar.errors import UserError

_METHODS: dict[str, type] = {}
_BUILTIN = {"flashavatar": "headavatar.methods.flashavatar", "flare": "headavatar.methods.flare"}


def register_method(cls):
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str):
    if name not in _METHODS and name in _BUILTIN:
        try:
            importlib.import_module(_BUILTIN[name])
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith(_BUILTIN[name]):
                raise UserError(f"method '{name}' is not available in this version of headavatar") from None
            raise
    if name not in _METHODS:
        raise UserError(f"unknown method '{name}'; choose one of: {', '.join(available_methods())}")
    return _METHODS[name]


def available_methods() -> list[str]:
    return sorted(set(_BUILTIN) | set(_METHODS))


def train_method(method: str, subject_dir, run_dir, overrides: dict[str, Any] | list[str] | None = None,
                 resume: bool = False, progress: bool = True, head_overrides: dict | None = None) -> Path:
    """Train ``method`` on a subject into ``run_dir``; returns run_dir. The Python twin of `headavatar train`.

    ``head_overrides``: options for building the subject's head model here, e.g. {"dir": FLAME folder}.
    """
    from headavatar.config import apply_overrides
    from headavatar.methods.run import RunDir

    cls = get_method(method)
    run = RunDir(run_dir, head_overrides)
    if resume:
        cfg = run.load_config(cls)
        cfg = apply_overrides(cfg, overrides)
    else:
        run.ensure_fresh()
        cfg = apply_overrides(cls.config_cls(), overrides)
    cls().train(Path(subject_dir), run, cfg, resume=resume, progress=progress)
    return Path(run_dir)


def load_avatar(run_dir, device="cpu", head_overrides: dict | None = None):
    """Open a trained run of any method."""
    from headavatar.methods.run import RunDir

    run = RunDir(run_dir, head_overrides)
    info = run.read_info()
    return get_method(info["method"])().load(run, device)
