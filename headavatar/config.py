"""Typed dataclass configs: to/from dicts, and ``key=value`` overrides with type checks.

Conventions for every config dataclass of the package:

* a field with a fixed set of values is typed ``typing.Literal[...]``; :func:`check_choices`
  refuses any other value (called from ``__post_init__``, :func:`from_dict` and
  :func:`apply_overrides`) with a message naming the field and the allowed values;
* a field's help is the comment on its line (or the comment lines right above it);
  :func:`field_help` reads it for ``--help`` texts and docs;
* ``--set KEY=VALUE`` strings are parsed here only (:func:`parse_set`).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, TypeVar

from headavatar.errors import UserError

T = TypeVar("T")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict, where: str = "config", renamed: dict[str, str | None] | None = None) -> T:
    """Build ``cls`` from a dict, recursing into nested dataclasses; unknown keys are an error.

    ``renamed`` maps keys that older files may hold: to a field's new name, or to None for a
    removed field (dropped, so a run.json written before the removal still loads).
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if renamed:
        data = {renamed.get(k, k): v for k, v in data.items() if not (k in renamed and renamed[k] is None)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{where}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in data.items():
        t = hints[k]
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            v = from_dict(t, v, f"{where}.{k}")
        kwargs[k] = v
    return check_choices(cls(**kwargs), where)


def parse_set(items: list[str] | None) -> dict[str, str]:
    """``["key=value", ...]`` (the ``--set`` flags) -> ``{key: value}``, values still strings."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE, got '{item}'")
        out[key.strip()] = value.strip()
    return out


def check_choices(cfg: T, where: str = "config") -> T:
    """Raise UserError when a ``Literal``-typed field of ``cfg`` holds a value outside its choices, or the
    config's own ``check_values()`` (if it has one) finds a value out of range."""
    for name, t in typing.get_type_hints(type(cfg)).items():
        allowed = _literal_choices(t)
        if allowed is not None and getattr(cfg, name, None) not in allowed:
            shown = ", ".join("None" if a is None else str(a) for a in allowed)
            raise UserError(f"{where}: {name} is {getattr(cfg, name)!r}; allowed values: {shown}")
    check_values = getattr(cfg, "check_values", None)  # a config's own range checks, after every change
    if callable(check_values):
        check_values()
    return cfg


def _literal_choices(t) -> tuple | None:
    """The allowed values of ``Literal[...]`` or ``Literal[...] | None``; None for other types."""
    if typing.get_origin(t) is typing.Literal:
        return typing.get_args(t)
    args = typing.get_args(t)
    if args and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and typing.get_origin(inner[0]) is typing.Literal:
            return typing.get_args(inner[0]) + (None,)
    return None


def field_help(cls) -> dict[str, str]:
    """Each field's help text: the comment on its line, else the comment lines right above it."""
    import inspect
    import io
    import tokenize

    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = src.splitlines()
    out = {}
    for i, line in enumerate(lines, 1):
        name = line.strip().split(":", 1)[0]
        if name not in names or line[: len(line) - len(line.lstrip())] != " " * 4:
            continue
        if i in comments:
            out[name] = comments[i]
            continue
        above, j = [], i - 1
        while j in comments and lines[j - 1].strip().startswith("#") and not lines[j - 1].strip().startswith("# ---"):
            above.insert(0, comments[j])
            j -= 1
        if above:
            out[name] = " ".join(above)
    return out


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
    choices = _literal_choices(t)
    if choices is not None:
        if value.lower() in ("none", "null") and None in choices:
            return None
        for c in choices:
            if c is not None and str(c) == value:
                return c
        shown = ", ".join("None" if c is None else str(c) for c in choices)
        raise UserError(f"option {key}: '{value}' is not allowed; allowed values: {shown}")
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
            if origin is list:
                return type(parsed)(_coerce(str(x), inner, key) for x in parsed)
            per_item = args and args[-1] is not Ellipsis  # tuple[float, float] vs tuple[float, ...]
            return tuple(_coerce(str(x), args[min(i, len(args) - 1)] if per_item else inner, key) for i, x in enumerate(parsed))
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
        overrides = parse_set(overrides)
    cfg = dataclasses.replace(cfg)
    for key, value in overrides.items():
        _set(cfg, key.split("."), value, key)
    return check_choices(cfg)


def _set(obj, parts: list[str], value, full_key: str) -> None:
    hints = typing.get_type_hints(type(obj))
    name = parts[0]
    if name not in hints:
        valid = ", ".join(sorted(f.name for f in dataclasses.fields(obj)))
        raise UserError(f"unknown option '{full_key}'; valid options: {valid}")
    if len(parts) > 1:
        child = dataclasses.replace(getattr(obj, name))
        _set(child, parts[1:], value, full_key)
        setattr(obj, name, check_choices(child))
        return
    t = hints[name]
    if isinstance(value, str) and t is not str:
        value = _coerce(value, t, full_key)
    setattr(obj, name, value)
