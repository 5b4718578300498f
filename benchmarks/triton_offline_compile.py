"""Compile the Triton rasteriser's tile kernels (and the fused FlashAvatar MLP) for sm_90 without a GPU; report registers/spills.

For each forward/backward tile-program setting (chunk, warps, and the backward's selectable
variants one_reduce / last_index / packed_grads / skip_empty) the kernel is compiled to a cubin with
Triton's own ptxas (target GPUTarget("cuda", 90, 32): an H100), and the cubin's resource usage
is read with ``cuobjdump --dump-resource-usage`` (the one Triton ships, else one on PATH).
Without cuobjdump, the spill count that ptxas prints is not available and only the
compiled kernel's metadata is shown.  No GPU is needed: this checks that every variant
compiles and how many registers it asks for; it says nothing about speed.

    python benchmarks/triton_offline_compile.py [--out compile.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from headavatar.render.gaussians import triton_backend as tb

TARGET = GPUTarget("cuda", 90, 32)
# pointer arguments, all float32 except the int32 index buffers
_I32_PTRS = {"rect_ptr", "ids_sorted_ptr", "order_ptr", "ranges_ptr", "ovf_ptr", "last_ptr", "count_ptr", "radii_ptr"}
_I32 = {"G", "N", "W", "H", "TX", "TPI", "TXn", "TYn", "sb", "sn", "sk", "sc", "K"}
# forward: (chunk, warps, split channels, LAST, PREFETCH); backward: (chunk, warps, one_reduce, LAST, PACK, SKIP, PREFETCH)
FWD = [(8, 4, True, False, True), (8, 4, True, False, False), (8, 4, True, True, True), (16, 4, True, False, True),
       (8, 8, True, False, True), (8, 4, False, False, True)]
BWD = [(8, 4, False, False, False, False), (8, 4, True, False, False, False), (8, 4, False, True, False, False),
       (8, 4, False, False, True, False), (8, 4, False, False, False, True), (8, 4, True, False, True, False),
       (8, 4, False, True, True, False), (8, 4, False, True, True, True), (8, 4, True, True, True, False),
       (4, 4, False, False, False, False), (4, 4, False, True, True, False), (16, 4, False, True, True, False),
       (4, 8, False, False, False, False), (8, 8, False, True, True, False)]
BWD = [(*row, False) for row in BWD] + [(8, 4, True, True, True, False, True), (8, 4, False, False, False, False, True)]
# the one-pair-at-a-time forward (seq_chunk): (pairs per reduction, warps, LAST)
SEQ = [(8, 4, False), (16, 4, False), (8, 4, True)]


def _signature(fn, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if name in _I32_PTRS else "*fp32"
        elif name in _I32:
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig


def _cuobjdump() -> str | None:
    own = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(own) if own.exists() else shutil.which("cuobjdump")


def compile_one(fn, constexprs, num_warps, tool, signature=None):
    ck = triton.compile(ASTSource(fn=fn, signature=signature or _signature(fn, constexprs), constexprs=constexprs),
                        target=TARGET, options={"num_warps": num_warps})
    row = {"kernel": fn.__name__, "num_warps": num_warps, **constexprs}
    meta = ck.metadata
    row["shared_bytes"] = getattr(meta, "shared", None)
    if tool is None:
        row["n_regs"] = getattr(ck, "n_regs", None)
        row["n_spills"] = getattr(ck, "n_spills", None)
        return row
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", res)
    if m:
        row.update(regs=int(m.group(1)), stack_bytes=int(m.group(2)), local_bytes=int(m.group(4)))
    else:
        row["cuobjdump"] = res.strip()[-300:]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    tool = _cuobjdump()
    print(f"triton {triton.__version__}, target sm_90, cuobjdump: {tool or 'not found (metadata only)'}", flush=True)
    rows = []
    for ch, nw, split, last, pre in FWD:
        cx = dict(DP=4, CH=ch, TS=tb.TILE, SPLIT=split, LAST=last, PREFETCH=pre)
        rows.append(compile_one(tb._raster_fwd_kernel, cx, nw, tool))
        print(rows[-1], flush=True)
    for ch, nw, one, last, pack, skip, pre in BWD:
        cx = dict(DP=4, CH=ch, TS=tb.TILE, SPLIT=True, ONE_REDUCE=one, LAST=last, PACK=pack, SKIP=skip, PREFETCH=pre)
        rows.append(compile_one(tb._raster_bwd_kernel, cx, nw, tool))
        print(rows[-1], flush=True)
    for ch, nw, last in SEQ:
        rows.append(compile_one(tb._raster_fwd_seq_kernel, dict(CH=ch, TS=tb.TILE, LAST=last), nw, tool))
        print(rows[-1], flush=True)
    # the per-Gaussian kernels (projection, SH degree 3), forward and backward: that they compile
    for fn, cx in ((tb._project_fwd_kernel, dict(BLOCK=128, TS=tb.TILE)), (tb._project_bwd_kernel, dict(BLOCK=128)),
                   (tb._sh_fwd_kernel, dict(DEG=3, BLOCK=128)), (tb._sh_bwd_kernel, dict(DEG=3, BLOCK=128))):
        rows.append(compile_one(fn, cx, 4, tool))
        print(rows[-1], flush=True)
    # the FlashAvatar MLP as one kernel (mlp_triton.py) at the paper's size: width 256, 5 hidden layers
    from headavatar.methods.flashavatar import mlp_triton as mt

    # and with the Gaussians' assembly (the kernel of fuse_frame="triton"), shell Gaussians on
    for fn in (mt._mlp_kernel, mt._gaussians_kernel):
        for dt, prec in (("bf16", "tf32"), ("fp32", "ieee")):
            for block_m, nw in ((64, 8), (64, 4), (128, 8)):
                if fn is mt._gaussians_kernel and (dt == "fp32" or nw == 4):
                    continue
                cx = dict(W=256, P_PAD=64, L=5, OUT_PAD=mt.OUT_PAD, BLOCK_M=block_m, HAS_GROUP=True, PREC=prec)
                cx.update(N_OUT=10) if fn is mt._mlp_kernel else cx.update(SHELL=True)
                sig = {n: ("constexpr" if n in cx else f"*{dt}" if n in ("pe_w_ptr", "hid_w_ptr", "out_w_ptr")
                           else "*i64" if n == "group_ptr" else "*i32" if n == "fv_ptr" else "*fp32" if n.endswith("_ptr")
                           else "fp32" if n == "offset_scale" else "i32")
                       for n in fn.arg_names}
                rows.append({**compile_one(fn, cx, nw, tool, sig), "dtype": dt})
                print(rows[-1], flush=True)
    # the head model's chain (FLAME's five joints, one lane per frame) and skinning kernels (skinning_triton.py)
    from headavatar.headmodels import skinning_triton as st

    for fn, cx, nw in ((st._chain_kernel, dict(J=5, BLOCK=32), 1), (st._chain_kernel, dict(J=5, BLOCK=128), 4),
                       (st._lbs_kernel, dict(J=5, BLOCK=256), 4)):
        sig = {n: ("constexpr" if n in cx else "*i32" if n == "parents_ptr" else "*fp32" if n.endswith("_ptr") else "i32")
               for n in fn.arg_names}
        rows.append(compile_one(fn, cx, nw, tool, sig))
        print(rows[-1], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
