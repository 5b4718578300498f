"""Shared set-up of the Triton kernel tests (rasteriser, fused MLP, skinning).

Triton decides between compiling and interpreting when it (and each kernel) is first imported: on a
machine without CUDA the interpreter (TRITON_INTERPRET=1) must be switched on before that, so each
such test module calls ``triton_device()`` before importing anything that imports Triton.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch


def triton_device() -> tuple[str, str]:
    """(device the kernels run on, reason to skip them or "")."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if importlib.util.find_spec("triton") is None:
        return dev, "triton is not installed (pip install triton to run these)"
    if dev == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            return dev, "triton was imported before this module without TRITON_INTERPRET=1; run this file on its own"
        os.environ["TRITON_INTERPRET"] = "1"
    return dev, ""
