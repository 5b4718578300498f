"""Typed dataclass configs: to/from dicts, and ``key=value`` overrides with type checks."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, TypeVar

from headavatar.errors import UserError

T = TypeVar("T")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build ``cls`` from a dict, recursing into nested dataclasses; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{where}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in data.items():
        t = hints[k]
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            v = from_dict(t, v, f"{where}.{k}")
        kwargs[k] = v
    return cls(**kwargs)


def _coerce(value: str, t, key: str):
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"bad value for {key}: {value}")
    try:
        if t is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if t is int:
            f = float(value)  # accepts "15e3" as well as "15000"
            if not f.is_integer():
                raise ValueError(value)
            return int(f)
        if t is float:
            return float(value)
        if t is str:
            return value
        if origin in (list, tuple):
            parsed = json.loads(value) if value.strip().startswith("[") else [x for x in value.split(",") if x]
            inner = args[0] if args else str
            return type(parsed)(_coerce(str(x), inner, key) for x in parsed) if origin is list else tuple(_coerce(str(x), args[min(i, len(args) - 1)] if args and args[-1] is not Ellipsis else inner, key) for i, x in enumerate(parsed))
    except (ValueError, json.JSONDecodeError):
        pass
    else:
        return json.loads(value)
    raise UserError(f"option {key}: '{value}' is not a valid {getattr(t, '__name__', t)}")


def apply_overrides(cfg: T, overrides: dict[str, Any] | list[str] | None) -> T:
    """Return a copy of ``cfg`` with overrides applied.

    ``overrides`` is a dict (values already typed, or strings) or a list of
    ``key=value`` strings; dotted keys reach into nested dataclasses.
    """
    if not overrides:
        return cfg
    if isinstance(overrides, list):
        d = {}
        for item in overrides:
            if "=" not in item:
                raise UserError(f"--set expects key=value, got '{item}'")
            k, v = item.split("=", 1)
            d[k.strip()] = v.strip()
        overrides = d
    cfg = dataclasses.replace(cfg)
    for key, value in overrides.items():
        _set(cfg, key.split("."), value, key)
    return cfg


def _set(obj, parts: list[str], value, full_key: str) -> None:
    hints = typing.get_type_hints(type(obj))
    name = parts[0]
    if name not in hints:
        valid = ", ".join(sorted(f.name for f in dataclasses.fields(obj)))
        raise UserError(f"unknown option '{full_key}'; valid options: {valid}")
    if len(parts) > 1:
        child = dataclasses.replace(getattr(obj, name))
        _set(child, parts[1:], value, full_key)
        setattr(obj, name, child)
        return
    t = hints[name]
    if isinstance(value, str) and t is not str:
        value = _coerce(value, t, full_key)
    setattr(obj, name, value)
