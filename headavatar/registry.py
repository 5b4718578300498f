"""One registry style for everything found by name: methods, head models, render backends, metric protocols.

A ``Registry`` maps a name to an entry (a class, a factory, a function). Built-in
entries are declared by the module that registers them and imported only when first
asked for, so a name costs nothing until used and an optional dependency missing for
one entry never breaks the others::

    BACKENDS = Registry("mesh backend", builtins={"torch": "headavatar.render.mesh.torch_ref"},
                        hint="use --mesh-backend")
    # in headavatar/render/mesh/torch_ref.py
    @BACKENDS.register("torch")
    def make(device): ...
    BACKENDS.get("torch")        # imports torch_ref, returns make
    BACKENDS.get("tpu")          # UserError: unknown mesh backend 'tpu'; choose one of: torch (use --mesh-backend)

An entry may carry a ``check`` (``() -> (ok, why)``) that ``get`` runs first, so an
entry that cannot work on this machine (no CUDA, a package not installed) is a one-line
UserError before any of its code is imported.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from headavatar.errors import UserError

T = TypeVar("T")
Check = Callable[[], "tuple[bool, str]"]


class Registry(Generic[T]):
    """Named entries of one kind, with lazily imported built-ins.

    ``kind``: what an entry is, for messages ("method", "head model", ...).
    ``builtins``: name -> module path whose import registers that name.
    ``checks``: name -> ``() -> (ok, why)`` run by ``get`` before importing or returning the entry.
    ``hint``: appended to the error messages, e.g. which flag chooses the entry.
    """

    def __init__(self, kind: str, builtins: dict[str, str] | None = None, checks: dict[str, Check] | None = None, hint: str = ""):
        self.kind = kind
        self.hint = hint
        self._builtins = dict(builtins or {})
        self._checks = dict(checks or {})
        self._entries: dict[str, T] = {}

    # ---------------------------------------------------------------- registering
    def register(self, name: str | None = None, entry: T | None = None, *, check: Check | None = None):
        """Register ``entry`` under ``name``; without ``entry`` a decorator.

        Without a name the entry's ``name`` attribute is used (classes that carry their
        own name, as methods do). Registering a name again replaces the entry, so a
        user's version of a built-in wins.
        """
        def add(obj: T) -> T:
            key = name if name is not None else getattr(obj, "name", None)
            if not isinstance(key, str) or not key:
                raise TypeError(f"a {self.kind} needs a name: pass one to register() or give {obj!r} a 'name' attribute")
            self._entries[key] = obj
            if check is not None:
                self._checks[key] = check
            return obj

        return add if entry is None else add(entry)

    # -------------------------------------------------------------------- finding
    def get(self, name: str) -> T:
        """The entry for ``name``, importing its built-in module on first use; a UserError when
        the name is unknown, its module is missing from this install, or its check fails."""
        if name in self._checks:
            ok, why = self._checks[name]()
            if not ok:
                raise UserError(f"{self.kind} '{name}' is unavailable: {why}{self._hint()}")
        if name not in self._entries and name in self._builtins:
            self._import(name)
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.available())}{self._hint()}")
        return self._entries[name]

    def available(self) -> list[str]:
        """Every known name (built-in or registered), sorted; imports nothing."""
        return sorted(set(self._builtins) | set(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._builtins or name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.available())

    # ------------------------------------------------------------------- internals
    def _import(self, name: str) -> None:
        module = self._builtins[name]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            # the built-in's own module is absent (a trimmed install): a user-facing gap;
            # a dependency missing inside it is a real ImportError and keeps its traceback
            if e.name and (module == e.name or module.startswith(e.name + ".")):
                raise UserError(f"{self.kind} '{name}' is not available in this version of headavatar") from None
            raise
        if name not in self._entries:
            raise RuntimeError(f"{module} did not register the {self.kind} '{name}' it is declared for")

    def _hint(self) -> str:
        return f" ({self.hint})" if self.hint else ""

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, available={self.available()})"
