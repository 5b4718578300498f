"""A whole FlashAvatar frame, fused (``fuse_frame="compile"`` or ``"triton"``) against unfused, on a GPU.

Builds the avatar of ``gaussian_parity.py --avatar``: a synthetic subject at 512^2, the default
FlashAvatarConfig (paper size, random weights: 3 training steps with the triton backend), loaded
as a FlashAvatarAvatar.  For each batch size and each ``fuse_frame`` mode it times
``FlashAvatarAvatar.render`` (the whole frame replayed as one CUDA graph: head model, MLP,
Gaussian assembly, SH colours, triton rasteriser, plus the output clone) and the
pre-rasterisation part alone replayed from its own graph; it records the first call of each
(compile + capture: the issue's "first use ready in under 30 s"), whether the frame was really
captured, and the largest pixel difference of the fused frame from the unfused one.  Prints a
JSON (and writes it with ``--out``).

    python benchmarks/avatar_frame.py --out avatar_frame.json [--batches 1,16,64]
    python benchmarks/avatar_frame.py --smoke      # the script end to end on the CPU, tiny sizes (not a measurement)

Exit status 0, or 2 when the machine cannot run it (no CUDA or no Triton, without --smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gaussian_parity import _opt_value, cuda_time, use_triton_options  # noqa: E402  (CUDA-event median on the GPU, wall clock on the CPU)

from headavatar.config import parse_set  # noqa: E402
from headavatar.errors import UserError  # noqa: E402
from headavatar.render.gaussians import triton_available  # noqa: E402
from headavatar.utils.cudagraph import CudaGraphed  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def build_avatar(args, dev):
    """The avatar of gaussian_parity.py's avatar_frame (its FlashAvatarAvatar part)."""
    from headavatar.methods import load_avatar, train_method
    from headavatar.subjects.synthetic import make_synthetic_subject

    root = Path(tempfile.mkdtemp())
    make_synthetic_subject(root / "subject", num_frames=8, resolution=args.res, seed=0, progress=False, device=dev)
    train_method("flashavatar", root / "subject", root / "run",
                 {"iterations": 3, "device": str(dev), "backend": args.backend, "lpips_weight": 0.0,
                  "preview_every": 0, "num_workers": 0, **args.avatar_cfg}, progress=False)
    return load_avatar(root / "run", dev)


def run(args) -> dict:
    dev = torch.device(args.device)
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "compile_mode": args.compile_mode,
              # a warm inductor cache makes the first call faster than on a fresh machine
              "inductor_cache_existed": args.cache_existed}
    t0 = time.perf_counter()
    av = build_avatar(args, dev)
    av.fuse_compile_mode = args.compile_mode
    report["setup_seconds"] = time.perf_counter() - t0
    report["num_gaussians"] = av.model.num_gaussians
    report["config"] = {"uv_resolution": av.cfg.uv_resolution, "mlp_width": av.cfg.mlp_width,
                        "shell_layers": av.cfg.shell_layers, "resolution": list(av.size),
                        "neck_anchor": getattr(av.model, "torso_w", None) is not None, "set": args.set}
    tr = av.subject.tracking.on_device(dev)
    with torch.no_grad():  # the graphs and the compiled code are for inference
        report["frames"] = time_frames(args, av, tr, dev)
    report["seconds"] = time.perf_counter() - t0
    return report


def why_not_captured(fn, *args) -> str:
    """The error CudaGraphed swallowed when it fell back to eager (warm-up, then capture, as it does)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(torch.cuda.CUDAGraph(), capture_error_mode="thread_local"):
            fn(*args)
    except Exception as e:
        torch.cuda.synchronize()
        return f"{type(e).__name__}: {e}"[:500]
    return "captured on a second try"


def time_frames(args, av, tr, dev) -> dict:
    rows = {}
    for B in args.batches:
        idx = torch.arange(B, device=dev) % av.subject.num_frames
        params, cams = tr.params(idx), tr.cameras(idx, av.subject.height, av.subject.width).resized(*av.size)
        row, ref = {}, None
        for mode in args.modes:
            av.fuse_frame = mode  # fresh graphs (and, for "compile", a compile for this batch size)
            r = {}
            _sync(dev)
            t = time.perf_counter()
            out = av.render(params, cams)
            _sync(dev)
            r["first_call_s"] = time.perf_counter() - t  # compile + warm-up + capture
            r["graphed"] = bool(av._graphed_frame._graphs)  # False: capture failed, the frame ran eagerly
            if dev.type == "cuda" and not r["graphed"]:
                r["capture_error"] = why_not_captured(av._frame, params, cams.K, cams.R, cams.t, av.background,
                                                      (cams.height, cams.width))
            r["frame_ms"] = cuda_time(lambda: av.render(params, cams), args.reps(B))["median_ms"]
            r["frames_per_s"] = B / r["frame_ms"] * 1e3
            pre = CudaGraphed(av._pre_raster)
            pre(params, cams.viewmats)
            r["pre_raster_graphed"] = bool(pre._graphs)
            r["pre_raster_graph_ms"] = cuda_time(lambda: pre(params, cams.viewmats), args.reps(B))["median_ms"]
            if ref is None:
                ref = out["rgb"]
            else:
                r["max_abs_diff_vs_" + args.modes[0]] = (out["rgb"] - ref).abs().max().item()
            row[mode] = r
            print(f"[avatar_frame] B={B} fuse_frame={mode}: {r}", file=sys.stderr, flush=True)
        rows[B] = row
    av.fuse_frame = "off"
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--modes", default="off,triton,compile",
                   help="fuse_frame modes, the first is the reference (triton on the CPU: with TRITON_INTERPRET=1)")
    p.add_argument("--compile-mode", default="default", choices=("default", "max-autotune-no-cudagraphs"))
    p.add_argument("--res", type=int, default=512)
    p.add_argument("--shell-layers", type=int, default=None,
                   help="FlashAvatarConfig.shell_layers (default: the config's, as gaussian_parity.py --avatar)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another FlashAvatarConfig field of the avatar (repeatable), e.g. neck_anchor=train_mean")
    p.add_argument("--triton-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a render_triton option for every triton render of the run (repeatable), e.g. seq_chunk=16")
    p.add_argument("--smoke", action="store_true", help="end to end on the CPU at tiny sizes (not a measurement)")
    args = p.parse_args(argv)
    try:
        use_triton_options({k: _opt_value(v) for k, v in (o.split("=", 1) for o in args.triton_opt)})
    except ValueError:
        p.error("--triton-opt takes KEY=VALUE")
    import getpass

    # inductor's cache dir (its default path), checked before torch._inductor is imported: the import creates it
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}")
    args.cache_existed = Path(cache).exists()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.modes = args.modes.split(",")
    args.avatar_cfg = {} if args.shell_layers is None else {"shell_layers": args.shell_layers}
    try:  # the CLI's own --set parsing; train_method types the values
        args.avatar_cfg.update(parse_set(args.set))
    except UserError as e:
        p.error(str(e))
    if args.smoke:
        args.device, args.backend, args.res = "cpu", "torch", 32
        args.batches = args.batches[:2]
        args.avatar_cfg.update({"uv_resolution": 16, "mlp_width": 64})  # 64: the fused MLP's smallest width
        args.reps = lambda B: 1
    else:
        ok, why = triton_available()
        if not torch.cuda.is_available() or not ok:
            print(f"cannot run: {'no CUDA device' if not torch.cuda.is_available() else why}", file=sys.stderr)
            return 2
        args.device, args.backend = "cuda", "triton"
        args.reps = lambda B: max(20, 400 // B)
    # one compile per batch size and mode switch; dynamo's default limit would quietly fall back to eager
    import torch._dynamo as dynamo  # after the cache check: the import creates inductor's cache dir

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(64, getattr(dynamo.config, name)))
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
