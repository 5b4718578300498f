"""How many operations the avatar frame issues before rasterisation, and which function issues them.

On the GPU the shipped frame is replayed as one CUDA graph, in which every operation is a node that
costs launch time whatever its size; at batch 1 most of them are tiny, so their number, not their
arithmetic, sets the pre-rasterisation time.  This counts them on the CPU (no GPU needed): one
``_pre_raster`` call of the avatar of ``avatar_frame.py`` (synthetic subject, default
FlashAvatarConfig plus ``--set`` overrides) under a ``TorchDispatchMode``, view operations (which
launch nothing) left out, each operation attributed to the innermost headavatar function on the stack.

    python benchmarks/frame_ops.py [--set KEY=VALUE ...] [--fuse-frame off|triton] [--whole-frame] [--top 20] [--out ops.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import traceback
import types
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

PACKAGE = "/headavatar/"


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.by_function: collections.Counter = collections.Counter()
        self.by_op: collections.Counter = collections.Counter()
        self.paused = False  # inside a Triton launch (the interpreter's own tensor copies are not the frame's)

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not self.paused:
            frames = [f for f in traceback.extract_stack() if PACKAGE in f.filename.replace("\\", "/")]
            where = f"{frames[-1].filename.replace(chr(92), '/').split(PACKAGE)[-1]}:{frames[-1].name}" if frames else "(outside headavatar)"
            self.by_function[where] += 1
            self.by_op[str(func.overloadpacket)] += 1
        return out


def _count_triton_launches(counter: _Counter):
    """Count each launch of the frame's own Triton kernels (no torch dispatch sees them) as one operation."""
    from headavatar.headmodels import skinning_triton
    from headavatar.methods.flashavatar import mlp_triton
    from headavatar.render.gaussians import triton_backend

    raster = tuple(n for n in dir(triton_backend) if n.startswith("_") and n.endswith("_kernel"))
    kernels = [(mod, name, getattr(mod, name)) for mod, names in ((mlp_triton, ("_mlp_kernel", "_gaussians_kernel")),
                                                                  (skinning_triton, ("_chain_kernel", "_lbs_kernel")),
                                                                  (triton_backend, raster))
               for name in names]

    class _Launch:
        def __init__(self, where, name, kernel):
            self.where, self.name, self.kernel = where, name, kernel

        def __getitem__(self, grid):
            def launch(*a, **k):
                counter.by_function[self.where] += 1
                counter.by_op["triton:" + self.name] += 1
                counter.paused = True  # the interpreter's own tensor copies are not the frame's
                try:
                    return self.kernel[grid](*a, **k)
                finally:
                    counter.paused = False
            return launch

    for mod, name, kernel in kernels:
        where = mod.__name__.replace("headavatar.", "").replace(".", "/") + ".py:" + name
        setattr(mod, name, _Launch(where, name, kernel))
    return lambda: [setattr(mod, name, kernel) for mod, name, kernel in kernels]


def count_ops(fn, *args) -> dict:
    """``fn(*args)`` once under no_grad, counting the non-view operations it dispatches (and the fused
    MLP's Triton launches, one operation each)."""
    with torch.no_grad():
        fn(*args)  # any lazy set-up (constant tables, caches) happens before the counted call, as before a capture
        counter = _Counter()
        restore = _count_triton_launches(counter) if "triton" in sys.modules else (lambda: None)
        try:
            with counter:
                fn(*args)
        finally:
            restore()
    return {"total": sum(counter.by_function.values()), "by_function": dict(counter.by_function.most_common()),
            "by_op": dict(counter.by_op.most_common())}


def frame_ops(avatar, frames=(0,), whole: bool = False) -> dict:
    """The counts of one pre-rasterisation call of ``avatar`` on its subject's frames ``frames``; ``whole``:
    of the whole frame as the GPU replays it (``FlashAvatarAvatar._frame``: the Triton rasteriser too)."""
    tr = avatar.subject.tracking
    idx = torch.tensor(list(frames))
    params = tr.params(idx)
    cams = tr.cameras(idx, avatar.subject.height, avatar.subject.width).resized(*avatar.size)
    if whole:
        hw = (cams.height, cams.width)
        return count_ops(lambda p: avatar._frame(p, cams.K, cams.R, cams.t, avatar.background, hw), params)
    return count_ops(avatar._pre_raster, params, cams.viewmats)


def main(argv=None) -> int:
    from headavatar.config import parse_set
    from headavatar.errors import UserError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="FlashAvatarConfig override of the avatar (repeatable)")
    p.add_argument("--res", type=int, default=64, help="the synthetic subject's size (the count does not depend on it)")
    p.add_argument("--top", type=int, default=20, help="functions listed")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--fuse-frame", default="off", choices=("off", "triton"),
                   help="the avatar's fuse_frame mode (triton: the fused kernels, run by Triton's interpreter here)")
    p.add_argument("--whole-frame", action="store_true",
                   help="count the whole frame the GPU replays, the Triton rasteriser included (run by the interpreter here)")
    args = p.parse_args(argv)
    if args.fuse_frame == "triton" or args.whole_frame:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
    try:
        overrides = parse_set(args.set)
    except UserError as e:
        print(f"frame_ops: error: {e}", file=sys.stderr)
        return 2
    import avatar_frame

    ns = types.SimpleNamespace(res=args.res, backend="torch", avatar_cfg={"uv_resolution": 32, "mlp_width": 64, **overrides})
    avatar = avatar_frame.build_avatar(ns, torch.device("cpu"))
    avatar.fuse_frame = args.fuse_frame
    res = {"config": overrides, "fuse_frame": args.fuse_frame, "whole_frame": args.whole_frame,
           **frame_ops(avatar, whole=args.whole_frame)}
    print(f"{'whole-frame' if args.whole_frame else 'pre-rasterisation'} operations per frame (views not counted): {res['total']}"
          f", of which {res['by_op'].get('aten.empty', 0)} allocations (no graph node)")
    for where, n in list(res["by_function"].items())[: args.top]:
        print(f"{n:5d}  {where}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
