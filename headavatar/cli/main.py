"""The `headavatar` command: a thin layer over the library (handlers import lazily so --help is instant)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from headavatar import __version__
from headavatar.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not a usage dump
        raise UserError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _add_common_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iterations", type=int, help="training iterations (default: the method's paper setting)")
    p.add_argument("--resolution", type=int, help="image size for training (long side, pixels); default: the subject's")
    p.add_argument("--batch-size", type=int, help="frames per training step")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--backend", default=None, help="rasterizer backend: auto (default), torch, gsplat")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config option (repeatable), e.g. --set lr_mlp=5e-5")


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
    d.add_argument("--overwrite", action="store_true", help="replace an existing demo folder's subject/run")

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

    e = sub.add_parser("eval", help="score a run on its held-out frames (writes RUN_DIR/eval/metrics.json)")
    e.add_argument("run", help="run folder")
    e.add_argument("--split", default="test", help="test (default) or train")
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--no-video", action="store_true", help="skip the side-by-side video")
    e.add_argument("--no-lpips", action="store_true", help="skip LPIPS (if its weights are not installed)")

    r = sub.add_parser("render", help="render a run's sequence, or another subject's tracking (reenactment)")
    r.add_argument("run", help="run folder")
    r.add_argument("-o", "--output", required=True, help="output video (.mp4)")
    r.add_argument("--tracking", help="another subject folder whose tracking drives the avatar (reenactment)")
    r.add_argument("--frames", default="all", help="all (default), train or test (own sequence only)")
    r.add_argument("--side-by-side", action="store_true", help="ground truth | render (own sequence only)")
    r.add_argument("--device", default="auto")
    r.add_argument("--batch-size", type=int, default=4)

    return p


def _overrides(args) -> dict:
    o = {}
    for flag, key in (("iterations", "iterations"), ("resolution", "resolution"), ("batch_size", "batch_size"), ("device", "device"), ("backend", "backend")):
        v = getattr(args, flag, None)
        if v is not None:
            o[key] = v
    for item in getattr(args, "set", []) or []:
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        o[k.strip()] = v.strip()
    return o


def cmd_train(args) -> int:
    from headavatar.methods import train_method
    from headavatar.subjects.format import Subject

    Subject.open(args.subject)  # fail fast on a bad subject, before creating the run folder
    train_method(args.method, args.subject, args.output, _overrides(args), resume=args.resume, progress=not args.quiet)
    print(f"trained {args.method} -> {args.output}")
    return 0


def cmd_eval(args) -> int:
    from headavatar.methods.evaluate import evaluate_run

    res = evaluate_run(args.run, device=args.device, split=args.split, batch_size=args.batch_size, video=not args.no_video, lpips=not args.no_lpips)
    m = res["metrics"]["mean"]
    parts = [f"{k} {v:.4f}" for k, v in m.items()]
    print(f"{res['num_frames']} {args.split} frames: " + ", ".join(parts))
    print(f"wrote {Path(args.run) / 'eval' / 'metrics.json'}")
    return 0


def cmd_render(args) -> int:
    from headavatar.methods.render import render_run

    n = render_run(args.run, args.output, driver_dir=args.tracking, device=args.device, frames=args.frames, batch_size=args.batch_size, side_by_side=args.side_by_side)
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


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "render": cmd_render, "synth": cmd_synth, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 2
        return int(COMMANDS[args.command](args) or 0)
    except UserError as e:
        print(f"headavatar: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("headavatar: interrupted (a training run resumes from its last checkpoint with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
