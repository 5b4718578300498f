"""Avatar methods (flashavatar, flare) found through a registry.

A method is a class implementing ``Method`` (below), registered with ``@register_method``
in its package ``headavatar/methods/<name>/__init__.py``; built-ins are imported on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol

from headavatar.registry import Registry


class Method(Protocol):
    """What a training method provides; ``get_method(name)`` returns the class."""

    name: ClassVar[str]
    config_cls: ClassVar[type]  # a dataclass whose defaults reproduce the paper

    def train(self, subject_dir: Path, run, cfg, resume: bool = False, progress: bool = True) -> None:
        """Train on the subject in ``subject_dir`` into ``run`` (a RunDir), resuming when asked."""

    def load(self, run, device="cpu"):
        """Open a trained run (a RunDir) for eval/render/export/view."""


METHODS: Registry[type[Method]] = Registry(
    "method", builtins={"flashavatar": "headavatar.methods.flashavatar", "flare": "headavatar.methods.flare"}
)


def register_method(cls):
    """Class decorator: register a method under its ``name``."""
    return METHODS.register(entry=cls)


def get_method(name: str) -> type[Method]:
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
