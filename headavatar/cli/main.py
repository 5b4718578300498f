"""The `headavatar` command: a thin layer over the library (handlers import lazily so --help is instant)."""

from __future__ import annotations

import argparse
import sys

from headavatar import __version__
from headavatar.constants import DEFAULT_FPS
from headavatar.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not a usage dump
        raise UserError(f"{self.prog}: {message} (see '{self.prog} --help')")


class _MetricProtocolNames:
    """``--protocol`` choices: the names in the metric-protocol registry, read when argparse first asks
    (a value to check, or ``eval --help``), so building the parser imports no torch and a protocol
    registered through ``METRIC_PROTOCOLS`` is a valid choice."""

    def _names(self) -> list[str]:
        from headavatar.metrics.protocols import METRIC_PROTOCOLS

        return METRIC_PROTOCOLS.available()

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def _add_common_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iterations", type=int, help="training iterations (default: the method's paper setting)")
    p.add_argument("--resolution", type=int, help="image size for training (long side, pixels); default: the subject's")
    p.add_argument("--batch-size", type=int, help="frames per training step")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--backend", default=None, help="rasterizer backend: auto (default), torch, triton, gsplat")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config option (repeatable), e.g. --set lr_mlp=5e-5; 'headavatar options METHOD' lists them")
    _add_flame_dir(p)


def _add_no_lpips(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-lpips", action="store_true",
                   help="no LPIPS: train without its loss term and evaluate without it (automatic, with a note, when its weights are not installed)")


def _add_flame_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flame-dir", help="folder with your FLAME files (FLAME subjects only; also $HEADAVATAR_FLAME_DIR)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="headavatar", description="Monocular video -> animatable 3D head avatar (FlashAvatar, FLARE).")
    p.add_argument("--version", action="version", version=f"headavatar {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    d = sub.add_parser("demo", help="synthetic subject -> train -> eval -> video + report, end to end")
    d.add_argument("-o", "--output", default="headavatar_demo", help="output folder (default: ./headavatar_demo)")
    d.add_argument("--method", default="flashavatar", help="flashavatar (default) or flare")
    d.add_argument("--frames", type=int, help="number of synthetic frames")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="a tiny, fast run (smoke test), not the quality setting")
    _add_common_train(d)
    _add_no_lpips(d)
    d.add_argument("--overwrite", action="store_true", help="make the demo's subject and run again (only the files the demo writes are replaced)")

    op = sub.add_parser("options", help="list a method's config options (the keys of --set): type, default, meaning")
    op.add_argument("method", nargs="?", default="flashavatar", help="flashavatar (default), flare, or another registered method")

    s = sub.add_parser("synth", help="write the built-in synthetic subject (procedural head) to a folder")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--frames", type=int, default=120)
    s.add_argument("--resolution", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")

    t = sub.add_parser("train", help="train an avatar on a subject folder")
    t.add_argument("subject", help="subject folder (native format)")
    t.add_argument("-o", "--output", required=True, help="run folder to create (or continue with --resume)")
    t.add_argument("--method", default="flashavatar", help="flashavatar (default) or flare")
    t.add_argument("--resume", action="store_true", help="continue the run in -o from its last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_common_train(t)
    _add_no_lpips(t)

    e = sub.add_parser("eval", help="score a run on its held-out frames (writes RUN_DIR/eval/metrics.json)")
    e.add_argument("run", help="run folder")
    e.add_argument("--split", default="test", help="test (default) or train")
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--no-video", action="store_true", help="skip the side-by-side video")
    e.add_argument("--no-lpips", action="store_true", help="skip LPIPS (skipped with a note anyway when its weights are not installed)")
    e.add_argument("--protocol", choices=_MetricProtocolNames(), metavar="NAME",
                   help="scoring protocol: %(choices)s (default: the method's own; docs/METRICS.md)")
    e.add_argument("--refine-tracking", nargs="?", type=int, const=-1, default=None, metavar="STEPS",
                   help="also score a second, separately labelled protocol: the avatar frozen, each held-out frame's tracking optimised "
                        "against that frame for STEPS steps (FlashAvatar; default: the run's test_refine_steps); writes eval/metrics_refined.json")
    _add_flame_dir(e)

    r = sub.add_parser("render", help="render a run's sequence, or another subject's tracking (reenactment)")
    r.add_argument("run", help="run folder")
    r.add_argument("-o", "--output", required=True, help="output video (.mp4)")
    r.add_argument("--tracking", help="another subject folder whose tracking drives the avatar (reenactment)")
    r.add_argument("--frames", default="all", help="all (default), train or test (own sequence only)")
    r.add_argument("--side-by-side", action="store_true", help="ground truth | render (own sequence only)")
    r.add_argument("--device", default="auto")
    r.add_argument("--batch-size", type=int, default=4)
    _add_flame_dir(r)

    im = sub.add_parser("import", help="import data prepared for the reference methods into a native subject")
    isub = im.add_subparsers(dest="format", metavar="FORMAT", parser_class=_Parser)
    fa = isub.add_parser("flashavatar", help="FlashAvatar layout (imgs/, alpha/, parsing/) + metrical-tracker checkpoints")
    fa.add_argument("dataset", help="dataset/<id> folder with imgs/, alpha/, parsing/")
    fa.add_argument("--tracker-dir", required=True, help="metrical-tracker output checkpoint folder (*.frame)")
    fa.add_argument("--flame-dir", required=True, help="folder with generic_model.pkl, FLAME_masks.pkl, head_template_mesh.obj")
    fa.add_argument("-o", "--output", required=True, help="subject folder to write")
    fa.add_argument("--test-frames", type=float, default=500, help="held-out frames: a count (default 500, the reference) or a fraction < 1")
    fa.add_argument("--frame-offset", type=int, help="image index = tracker index + offset (default: detected, else 1)")
    fa.add_argument("--principal-point", default="tracker", choices=["tracker", "opencv"], help="how the tracker's K is to be read")
    fa.add_argument("--fps", type=float, default=DEFAULT_FPS)
    fa.add_argument("--overwrite", action="store_true")
    ia = isub.add_parser("imavatar", help="IMavatar / FLARE layout (image/, mask/, semantic/, flame_params.json per sequence)")
    ia.add_argument("root", help="subject root holding one folder per sequence")
    ia.add_argument("--flame-dir", required=True, help="folder with generic_model.pkl, FLAME_masks.pkl, head_template_mesh.obj")
    ia.add_argument("-o", "--output", required=True, help="subject folder to write")
    ia.add_argument("--train", help="comma-separated training sequence names (default: all but --test)")
    ia.add_argument("--test", help="comma-separated held-out sequence names (default: the last sequence)")
    ia.add_argument("--max-landmark-error", type=float, help="refuse the import if the camera check's mean landmark error exceeds this (pixels)")
    ia.add_argument("--fps", type=float, default=DEFAULT_FPS)
    ia.add_argument("--overwrite", action="store_true")

    hm = sub.add_parser("head-model", help="head-model tools")
    hsub = hm.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    ic = hsub.add_parser("import-ict", help="convert your ICT-FaceKit checkout (FaceXModel/) into headavatar's npz")
    ic.add_argument("dir", help="ICT-FaceKit checkout or its FaceXModel/ folder")
    ic.add_argument("-o", "--output", required=True, help="npz file to write (e.g. ict_facekit_light.npz)")
    info = hsub.add_parser("info", help="print a head model's sizes, regions and condition vector")
    info.add_argument("name", nargs="?", default="procedural", help="procedural (default), ict or flame")
    info.add_argument("--path", help="ict: the npz file")
    _add_flame_dir(info)

    tk = sub.add_parser("track", help="video -> subject: landmarks, matte, parsing, head-model fitting")
    tk.add_argument("video")
    tk.add_argument("-o", "--output", required=True, help="subject folder to write")
    tk.add_argument("--head-model", default="ict", help="ict (default), flame or procedural")
    tk.add_argument("--size", type=int, default=512, help="output frame size (square crop), default 512")
    tk.add_argument("--matte", default="auto", choices=["auto", "selfie", "rvm"], help="matting: auto (RVM if installed, else selfie)")
    tk.add_argument("--max-frames", type=int)
    tk.add_argument("--start", type=float, default=0.0, help="start time in seconds")
    tk.add_argument("--duration", type=float, help="seconds to track")
    tk.add_argument("--ict-path", help="the ICT-FaceKit npz (default: $HEADAVATAR_ICT_NPZ, else the copy shipped with headavatar)")
    _add_flame_dir(tk)
    tk.add_argument("--storage", default="frames", choices=["frames", "compact"],
                    help="frames: an image file per frame (default); compact: video chunks, ~6x smaller")
    tk.add_argument("--overwrite", action="store_true")
    tk.add_argument("--strict", action="store_true", help="refuse a video whose decoded length disagrees with its header (default: a warning)")
    tk.add_argument("--verbose", action="store_true", help="show the log lines of MediaPipe/TensorFlow Lite (silenced by default)")

    _add_subject_tools(sub)

    x = sub.add_parser("export", help="write a trained avatar to standard files: .ply (FlashAvatar), .glb / .obj (FLARE)")
    x.add_argument("run", help="run folder")
    x.add_argument("-o", "--output", help="file to write, or folder for several frames (default: RUN_DIR/export/)")
    x.add_argument("--format", help="ply (FlashAvatar), glb or obj (FLARE); default: from -o's suffix, else ply / glb")
    x.add_argument("--frame", default="canonical", help="canonical (default: neutral pose), a frame index, all, train, test, or a list like 0,10,20")
    x.add_argument("--texture-size", type=int, default=1024, help="FLARE: size of the baked maps in pixels")
    x.add_argument("--uv", default="auto", choices=["auto", "head", "atlas"], help="FLARE: UV layout")
    x.add_argument("--no-morph-targets", action="store_true", help="FLARE glb: leave out the expression morph targets")
    x.add_argument("--device", default="auto")
    _add_flame_dir(x)

    from headavatar.cli.relight_cmd import add_relight_arguments

    rl = sub.add_parser("relight", help="relight a FLARE run under an HDR environment map (+ intrinsic images)")
    add_relight_arguments(rl)
    _add_flame_dir(rl)

    v = sub.add_parser("view", help="local web viewer that renders the avatar live (orbit, play, sliders, environment maps)")
    v.add_argument("run", help="run folder")
    v.add_argument("--port", type=int, default=8080, help="port (0 picks a free one)")
    v.add_argument("--host", default="127.0.0.1", help="0.0.0.0 lets other machines in")
    v.add_argument("--device", default="auto")
    v.add_argument("--size", type=int, help="render size, long side (default: training size)")
    v.add_argument("--envmap", action="append", default=[], metavar="HDR", help="FLARE: .hdr/.exr map to offer (repeatable)")
    v.add_argument("--verbose", action="store_true")
    _add_flame_dir(v)

    _add_pipeline_parsers(sub)
    return p


STORAGE_HELP = ("how a video's tracked frames are stored: frames (a file per frame, default) or compact (video chunks, "
                "~6x smaller: for moving subjects to a cluster; docs/SUBJECT_FORMAT.md); a continued make keeps its first choice")


def _add_pipeline_parsers(sub) -> None:
    """`make` and `batch` (headavatar/pipeline/)."""
    budget = "fast (default), best, or a number of seconds (FlashAvatar); settings follow the device (docs/SCALING.md)"
    mk = sub.add_parser("make", help="video or tracked subject -> track, train, eval, export, report in one folder (resumable)")
    mk.add_argument("input", nargs="?", help="video file or tracked subject folder (may be left out to continue -o OUT)")
    mk.add_argument("-o", "--output", required=True, help="folder for everything (subject/, run/, stages/; docs/SCALING.md)")
    mk.add_argument("--method", help="flashavatar (default) or flare")
    mk.add_argument("--head-model", help="for tracking a video: ict (default), flame or procedural")
    mk.add_argument("--budget", help=budget)
    mk.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    mk.add_argument("--size", type=int, help="tracked frame size for a video (default 512)")
    mk.add_argument("--storage", choices=["frames", "compact"], help=STORAGE_HELP)
    mk.add_argument("--until", choices=["track", "train", "eval", "export", "report"], help="stop after this stage (e.g. track here, train elsewhere)")
    mk.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", help="override a training option (repeatable)")
    mk.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_flame_dir(mk)

    b = sub.add_parser("batch", help="make for many videos or subjects: Ray tasks (local or a cluster), else one after another")
    b.add_argument("inputs", nargs="*", help="video files and/or tracked subject folders")
    b.add_argument("-o", "--output", required=True, help="folder: one make folder per input, summary.csv, summary.html")
    b.add_argument("--method", default="flashavatar", help="flashavatar (default) or flare")
    b.add_argument("--head-model", default="ict", help="for tracking videos: ict (default), flame or procedural")
    b.add_argument("--budget", default="fast", help=budget)
    b.add_argument("--size", type=int, default=512, help="tracked frame size for videos (default 512)")
    b.add_argument("--storage", choices=["frames", "compact"], help=STORAGE_HELP)
    b.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", help="override a training option (repeatable)")
    b.add_argument("--address", help="join this Ray cluster (HOST:PORT, ray://HOST:PORT or auto) instead of starting a local Ray")
    b.add_argument("--gpus-per-job", type=float, help="GPU share of one training (default 0.25 where there are GPUs: 4 share a GPU; 0 = train on CPUs)")
    b.add_argument("--cpus-per-job", type=int, help="CPU cores of one job (default 2)")
    b.add_argument("--num-cpus", type=int, help="local Ray: cores to use (default: all)")
    b.add_argument("--num-gpus", type=int, help="local Ray: GPUs to use (default: all visible)")
    b.add_argument("--sequential", action="store_true", help="one subject after another, without Ray")
    b.add_argument("--device", default="auto", help="without Ray: auto (default), cpu, cuda")
    b.add_argument("--quiet", action="store_true", help="no progress bar")


def _overrides(args) -> dict:
    o = {}
    for flag, key in (("iterations", "iterations"), ("resolution", "resolution"), ("batch_size", "batch_size"), ("device", "device"), ("backend", "backend")):
        v = getattr(args, flag, None)
        if v is not None:
            o[key] = v
    from headavatar.config import parse_set

    o.update(parse_set(getattr(args, "set", None)))
    return o


def _head_overrides(args) -> dict | None:
    return {"dir": args.flame_dir} if getattr(args, "flame_dir", None) else None


_VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp"}


def cmd_train(args) -> int:
    from pathlib import Path

    from headavatar.methods import train_method
    from headavatar.subjects.format import Subject

    src = Path(args.subject)
    if src.is_file() and src.suffix.lower() in _VIDEO_SUFFIXES:
        raise UserError(f"{src} is a video; make a subject from it first: 'headavatar track {src} -o SUBJECT_DIR', "
                        f"then 'headavatar train SUBJECT_DIR -o {args.output}'")
    Subject.open(args.subject)  # fail fast on a bad subject, before creating the run folder
    train_method(args.method, args.subject, args.output, _overrides(args), resume=args.resume, progress=not args.quiet,
                 head_overrides=_head_overrides(args), lpips=not args.no_lpips)
    print(f"trained {args.method} -> {args.output}")
    return 0


def cmd_eval(args) -> int:
    from headavatar.methods.evaluate import evaluate_run

    method = None
    if args.refine_tracking is not None:  # checked before the fixed-tracking evaluation, not after it
        from headavatar.methods import get_method
        from headavatar.methods.run import RunDir

        method = get_method(RunDir(args.run).read_info()["method"])
        if not hasattr(method, "evaluate_refined"):  # an optional part of the method protocol (methods/avatar.py)
            raise UserError(f"--refine-tracking is not available for {method.describe}s ({args.run})")
        if args.refine_tracking < -1:
            raise UserError("--refine-tracking STEPS must be 0 or more")
    res = evaluate_run(args.run, device=args.device, split=args.split, batch_size=args.batch_size, video=not args.no_video, lpips=not args.no_lpips,
                       head_overrides=_head_overrides(args), protocol=args.protocol)
    m = res["metrics"]["mean"]
    parts = [f"{k} {v:.4f}" for k, v in m.items()]
    print(f"{res['num_frames']} {args.split} frames: " + ", ".join(parts))
    print(f"protocol: {res['protocol']}")
    if method is not None:  # reported after, never instead of, the fixed-tracking figure
        ref = method().evaluate_refined(args.run, steps=None if args.refine_tracking < 0 else args.refine_tracking, device=args.device, split=args.split,
                                       batch_size=args.batch_size, lpips=not args.no_lpips, head_overrides=_head_overrides(args))
        parts = [f"{k} {v:.4f}" for k, v in ref["metrics"]["mean"].items()]
        print(f"test-time refined tracking ({ref['refine_steps']} steps, eval/metrics_refined.json): " + ", ".join(parts))
    return 0


def cmd_render(args) -> int:
    from pathlib import Path

    from headavatar.methods.render import render_run
    from headavatar.utils.io import ensure_writable

    ensure_writable(Path(args.output).parent)
    n = render_run(args.run, args.output, driver_dir=args.tracking, device=args.device, frames=args.frames, batch_size=args.batch_size,
                   side_by_side=args.side_by_side, head_overrides=_head_overrides(args))
    print(f"wrote {n} frames to {args.output}")
    return 0


def cmd_synth(args) -> int:
    from headavatar.subjects.synthetic import make_synthetic_subject

    subj = make_synthetic_subject(args.output, num_frames=args.frames, resolution=args.resolution, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote synthetic subject ({subj.num_frames} frames, {subj.width}x{subj.height}) to {args.output}")
    return 0


def cmd_demo(args) -> int:
    from headavatar.demo import run_demo

    return run_demo(args, _overrides(args))


def cmd_import(args) -> int:
    if args.format == "flashavatar":
        from headavatar.subjects.importers.flashavatar import import_flashavatar

        test = int(args.test_frames) if args.test_frames >= 1 else args.test_frames
        subj = import_flashavatar(args.dataset, args.tracker_dir, args.flame_dir, args.output, test_frames=test, frame_offset=args.frame_offset,
                                  principal_point=args.principal_point, fps=args.fps, overwrite=args.overwrite)
    elif args.format == "imavatar":
        from headavatar.subjects.importers.imavatar import import_imavatar

        subj = import_imavatar(args.root, args.flame_dir, args.output, train=args.train, test=args.test, fps=args.fps,
                               overwrite=args.overwrite, max_landmark_error=args.max_landmark_error)
    else:
        raise UserError("import needs a format: flashavatar or imavatar (see 'headavatar import --help')")
    print(f"wrote subject {args.output}: {subj.num_frames} frames ({len(subj.split['train'])} train, {len(subj.split.get('test', []))} test)")
    print(f"train it with: headavatar train {args.output} -o RUN_DIR --flame-dir {args.flame_dir}")
    return 0


def cmd_head_model(args) -> int:
    if args.action == "import-ict":
        from headavatar.headmodels.ict_import import convert_ict_folder

        info = convert_ict_folder(args.dir, args.output)
        print(f"wrote {args.output}: " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "path"))
        return 0
    if args.action == "info":
        from headavatar.headmodels import load_head_model

        spec = {"name": args.name}
        if args.path:
            spec["path"] = args.path
        if args.flame_dir:
            spec["dir"] = args.flame_dir
        m = load_head_model(spec)
        print(f"{m.name}: {m.num_vertices} vertices, {m.faces.shape[0]} faces, {m.uvs.shape[0]} uvs")
        print(f"shape {m.num_shape}, expression {m.num_expression}, joints {m.joint_names}")
        print("condition vector: " + " + ".join(f"{n}({k})" for n, k in m.condition_layout()) + f" = {m.condition_dim}")
        print("regions: " + ", ".join(f"{k}({len(v)})" for k, v in m.regions.items()))
        return 0
    raise UserError("head-model needs an action: import-ict or info (see 'headavatar head-model --help')")


def cmd_track(args) -> int:
    from headavatar.tracking.pipeline import track_video

    head = args.head_model
    if head == "ict" and args.ict_path:
        head = {"name": "ict", "path": args.ict_path}
    from headavatar.utils.io import ensure_writable
    from headavatar.utils.quiet import quiet_native_logs

    ensure_writable(args.output)
    with quiet_native_logs(enabled=not args.verbose):
        subj = track_video(args.video, args.output, head_model=head, size=args.size, matte=args.matte, max_frames=args.max_frames,
                           start=args.start, duration=args.duration, flame_dir=args.flame_dir, overwrite=args.overwrite, strict=args.strict,
                           storage=args.storage)
    print(f"wrote subject {args.output}: {subj.num_frames} frames; check {args.output}/tracking_overlay.mp4")
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from headavatar.export import EXPORT_DIR, export_run
    from headavatar.utils.io import ensure_writable, removed_on_failure

    target = Path(args.output) if args.output else Path(args.run) / EXPORT_DIR
    ensure_writable(target if not target.suffix else target.parent)
    with removed_on_failure(target):  # a sequence folder or file this command started is not left half-written
        files = export_run(args.run, args.output, args.format, frames=args.frame, device=args.device, texture_size=args.texture_size,
                           uv=args.uv, morph_targets=not args.no_morph_targets, head_overrides=_head_overrides(args))
    print("wrote " + ", ".join(map(str, files[:2])) + (f" and {len(files) - 2} more" if len(files) > 2 else ""))
    return 0


def cmd_relight(args) -> int:
    from headavatar.cli.relight_cmd import relight_command

    return relight_command(args)


def cmd_options(args) -> int:
    import dataclasses
    import typing

    from headavatar.config import field_help
    from headavatar.methods import get_method

    cls = get_method(args.method).config_cls
    helps, hints = field_help(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        t = hints[f.name]
        shown = " | ".join(map(str, typing.get_args(t))) if typing.get_origin(t) is typing.Literal else getattr(t, "__name__", str(t))
        print(f"{f.name} = {default!r}  [{shown}]  {helps.get(f.name, '')}".rstrip())
    return 0


def cmd_view(args) -> int:
    from headavatar.viewer import serve

    serve(args.run, host=args.host, port=args.port, device=args.device, size=args.size, envmaps=args.envmap,
          head_overrides=_head_overrides(args), verbose=args.verbose)
    return 0


def _add_subject_tools(sub) -> None:
    from headavatar.cli.subject_cmd import add_subject_parser

    add_subject_parser(sub)


def cmd_subject(args) -> int:
    from headavatar.cli.subject_cmd import cmd_subject as run

    return run(args)


def cmd_make(args) -> int:
    from headavatar.pipeline.make import make

    make(args.input, args.output, method=args.method, head_model=args.head_model, budget=args.budget, device=args.device,
         size=args.size, storage=args.storage, overrides=args.set, until=args.until, head_overrides=_head_overrides(args), progress=not args.quiet)
    return 0


def cmd_batch(args) -> int:
    from headavatar.pipeline.batch import batch

    res = batch(args.inputs, args.output, method=args.method, head_model=args.head_model, budget=args.budget, size=args.size,
                storage=args.storage, overrides=args.set, device=args.device, address=args.address, gpus_per_job=args.gpus_per_job,
                cpus_per_job=args.cpus_per_job, engine="sequential" if args.sequential else "auto", num_cpus=args.num_cpus,
                num_gpus=args.num_gpus, progress=not args.quiet)
    return 1 if res["failed"] else 0


COMMANDS = {"subject": cmd_subject, "train": cmd_train, "eval": cmd_eval, "render": cmd_render, "synth": cmd_synth, "demo": cmd_demo,
            "import": cmd_import, "head-model": cmd_head_model, "track": cmd_track, "export": cmd_export, "view": cmd_view, "relight": cmd_relight,
            "options": cmd_options}
COMMANDS.update({"make": cmd_make, "batch": cmd_batch})  # headavatar/pipeline/


def _end_progress_bars() -> None:
    """Close progress bars an error left open, so the error starts a line of its own."""
    tqdm_mod = sys.modules.get("tqdm")
    if tqdm_mod is None:
        return
    for bar in list(getattr(tqdm_mod.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # a bar half torn down already
            pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 2
        from headavatar.log import configure

        configure("quiet" if getattr(args, "quiet", False) else "verbose" if getattr(args, "verbose", False) else "normal")
        return int(COMMANDS[args.command](args) or 0)
    except UserError as e:
        _end_progress_bars()
        print(f"headavatar: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        # a destination that cannot be written (read-only, no permission, full) anywhere not
        # already turned into a WriteError: one line naming the user's path, never a temporary
        import errno

        from headavatar.utils.io import user_path, write_error

        if not e.filename:
            raise
        if e.errno in (errno.EACCES, errno.EPERM):  # may be a read as well as a write: do not claim which
            _end_progress_bars()
            print(f"headavatar: error: {user_path(e.filename)}: permission denied; choose a location you may use", file=sys.stderr)
            return 2
        err = write_error(e.filename, e)
        if err is None:
            raise
        _end_progress_bars()
        print(f"headavatar: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("headavatar: interrupted (a training run resumes from its last checkpoint with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
