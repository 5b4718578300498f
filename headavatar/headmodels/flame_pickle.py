"""Reading FLAME's Python-2 era pickles without chumpy, under numpy 2, without running foreign code.

``generic_model.pkl`` was written by Python 2 with chumpy ``Ch`` objects (for
``shapedirs`` and sometimes other arrays) and a scipy sparse ``J_regressor``.
chumpy does not import under numpy >= 1.24, and unpickling a user's file with
the stock ``pickle`` would run whatever callables it names.  ``RestrictedUnpickler``
therefore resolves only an allow-list of globals:

* numpy's array/dtype/scalar reconstructors (under their numpy 1 and 2 names),
* any ``chumpy.*`` class -> ``_ChumpyStub``: chumpy pickles ``Ch.__getstate__()``,
  i.e. the instance ``__dict__`` minus its weak references, and a plain ``Ch``
  keeps its value in ``'x'``; the stub keeps that state and is turned into the
  array afterwards,
* any ``scipy.sparse.*`` matrix class -> ``_SparseStub``, turned into a dense
  array from its ``data/indices/indptr`` (or ``row/col``) state, so the result
  does not depend on scipy's private pickle layout across versions,
* a few builtins (set, frozenset, object, OrderedDict, copyreg's reconstructor),
* for DECA-style ``landmark_embedding.npy`` files, torch tensors pickled with
  the plain pickle protocol (their storage bytes are re-read with
  ``torch.load(weights_only=True)``).

Anything else raises ``ForeignPickleError`` naming the global, which callers
turn into a UserError that says which file is not what it should be.
"""

from __future__ import annotations

import _compat_pickle
import copyreg
import io
import os
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np


class ForeignPickleError(pickle.UnpicklingError):
    """The pickle references a global outside the allow-list."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module = module
        self.name = name


class _ChumpyStub:
    """Stands in for any chumpy class; keeps the pickled state."""

    def __init__(self, *args, **kwargs):
        self._state: dict = {}
        self._cls = type(self).__name__

    def __setstate__(self, state):
        self._state = state if isinstance(state, dict) else {"state": state}


class _SparseStub:
    """Stands in for a scipy.sparse matrix class; keeps the pickled state."""

    fmt = ""

    def __init__(self, *args, **kwargs):
        self._state: dict = {}

    def __setstate__(self, state):
        self._state = state if isinstance(state, dict) else {}


def _make_stub(base: type, module: str, name: str) -> type:
    # One class per pickled name, so the conversion knows e.g. which sparse format it was.
    cls = type(name, (base,), {"__module__": "headavatar.headmodels.flame_pickle", "_source": f"{module}.{name}"})
    if base is _SparseStub:
        cls.fmt = name.split("_")[0].lower()  # csc_matrix -> csc, coo_array -> coo
    return cls


def _np_globals() -> dict[tuple[str, str], Any]:
    from numpy._core import multiarray as ma

    out: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")] = ma._reconstruct
        out[(mod, "scalar")] = ma.scalar
    out[("numpy", "ndarray")] = np.ndarray
    out[("numpy", "dtype")] = np.dtype
    out[("numpy", "matrix")] = np.matrix
    out[("numpy.matrixlib.defmatrix", "matrix")] = np.matrix
    out[("numpy.core.numeric", "_frombuffer")] = _frombuffer
    out[("numpy._core.numeric", "_frombuffer")] = _frombuffer
    for name in dir(np.dtypes):
        if name.endswith("DType"):
            out[("numpy.dtypes", name)] = getattr(np.dtypes, name)
    return out


def _frombuffer(buf, dtype, shape, order):
    # numpy's protocol-5 array reconstructor; copy so the result owns its memory
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Python 3 pickles bytes at protocol <= 2 as _codecs.encode(text, 'latin1'); nothing else is allowed
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591", "utf8", "ascii"):
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed")
    return obj.encode(encoding, errors)


_BUILTINS = {
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "object"): object,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("collections", "OrderedDict"): OrderedDict,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,
}


def _torch_storage_from_bytes(b: bytes):
    """torch.storage._load_from_bytes, but through torch's weights-only loader; None if that fails."""
    try:
        import torch

        return torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - an unreadable tensor only matters if its key is needed
        return None


def _torch_rebuild_tensor(storage, *args):
    if storage is None:
        return None
    from torch._utils import _rebuild_tensor_v2

    return _rebuild_tensor_v2(storage, *args)


class RestrictedUnpickler(pickle.Unpickler):
    """See the module docstring for what it resolves."""

    def __init__(self, file, allow_torch: bool = False):
        super().__init__(file, encoding="latin1", fix_imports=True)
        self._globals = {**_np_globals(), **_BUILTINS}
        self._allow_torch = allow_torch
        self._stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        # Python 2 names (__builtin__, copy_reg); the stock find_class maps them, an override must too
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in self._globals:
            return self._globals[key]
        if module == "chumpy" or module.startswith("chumpy."):
            return self._stubs.setdefault(key, _make_stub(_ChumpyStub, module, name))
        if (module == "scipy.sparse" or module.startswith("scipy.sparse.")) and name.split("_")[0] in ("csc", "csr", "coo"):
            return self._stubs.setdefault(key, _make_stub(_SparseStub, module, name))
        if self._allow_torch:
            if key == ("torch._utils", "_rebuild_tensor_v2"):
                return _torch_rebuild_tensor
            if key == ("torch.storage", "_load_from_bytes"):
                return _torch_storage_from_bytes
        raise ForeignPickleError(module, name)


def to_array(obj: Any, what: str = "value") -> Any:
    """Turn stubs (recursively in dicts/lists) into numpy arrays; leave other values alone."""
    if isinstance(obj, _ChumpyStub):
        st = getattr(obj, "_state", {})
        if "x" in st:
            return np.asarray(to_array(st["x"], what))
        raise ValueError(f"{what} is a chumpy {type(obj).__name__} expression, not a plain array (no 'x' in its state)")
    if isinstance(obj, _SparseStub):
        return _sparse_to_dense(obj, what)
    if isinstance(obj, np.matrix):
        return np.asarray(obj)
    if isinstance(obj, dict):
        return {k: to_array(v, f"{what}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_array(v, what) for v in obj)
    try:
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return obj


def _sparse_to_dense(obj: _SparseStub, what: str) -> np.ndarray:
    st = getattr(obj, "_state", {})
    shape = st.get("_shape", st.get("shape"))
    if shape is None:
        raise ValueError(f"{what} is a sparse matrix without a shape")
    shape = tuple(int(s) for s in shape)
    fmt = obj.fmt
    if fmt == "coo":
        if "coords" in st:
            row, col = (np.asarray(c) for c in st["coords"])
        else:
            row, col = np.asarray(st["row"]), np.asarray(st["col"])
        out = np.zeros(shape, dtype=np.float64)
        np.add.at(out, (row, col), np.asarray(st["data"], dtype=np.float64))
        return out
    data = np.asarray(st["data"], dtype=np.float64)
    indices = np.asarray(st["indices"], dtype=np.int64)
    indptr = np.asarray(st["indptr"], dtype=np.int64)
    out = np.zeros(shape, dtype=np.float64)
    major = shape[1] if fmt == "csc" else shape[0]
    if len(indptr) != major + 1:
        raise ValueError(f"{what}: sparse {fmt} matrix with an inconsistent index pointer")
    counts = np.diff(indptr)
    majors = np.repeat(np.arange(major), counts)
    if fmt == "csc":
        np.add.at(out, (indices, majors), data)
    else:
        np.add.at(out, (majors, indices), data)
    return out


def load_pickle(path: str | os.PathLike, allow_torch: bool = False) -> Any:
    """Unpickle ``path`` with the restricted unpickler and convert stubs to arrays.

    Raises ``ForeignPickleError`` for a disallowed global, ``pickle.UnpicklingError``
    / ``EOFError`` / ``ValueError`` for a damaged file.
    """
    with open(path, "rb") as f:
        obj = RestrictedUnpickler(f, allow_torch=allow_torch).load()
    return to_array(obj, Path(path).name)


def load_npy_object(path: str | os.PathLike) -> Any:
    """Read a ``.npy`` file; object arrays (pickled dicts, as DECA's landmark embedding) go
    through the restricted unpickler instead of ``np.load(allow_pickle=True)``.

    A 0-d object array is unwrapped (``arr[()]``).
    """
    from numpy.lib import format as npf

    with open(path, "rb") as f:
        version = npf.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npf.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = npf.read_array_header_2_0(f)
        if not dtype.hasobject:
            f.seek(0)
            return np.load(f, allow_pickle=False)
        obj = RestrictedUnpickler(f, allow_torch=True).load()
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj[()]
    return to_array(obj, Path(path).name)
