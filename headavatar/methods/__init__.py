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

from pathlib import Path
from typing import TYPE_CHECKING, Any

from headavatar.registry import Registry

if TYPE_CHECKING:
    from headavatar.methods.avatar import MethodProtocol

METHODS: Registry[type[MethodProtocol]] = Registry(
    "method", builtins={"flashavatar": "headavatar.methods.flashavatar", "flare": "headavatar.methods.flare"}
)


def register_method(cls):
    """Class decorator: register a method under its ``name``."""
    return METHODS.register(entry=cls)


def get_method(name: str) -> type[MethodProtocol]:
    return METHODS.get(name)


def available_methods() -> list[str]:
    return METHODS.available()


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
