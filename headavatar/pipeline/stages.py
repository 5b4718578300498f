"""The five stages of `headavatar make`, each a thin call of the library function its own command
calls (track_video, train_method, evaluate_run, export_run, write_report), plus a check that a
finished stage's outputs are still there and a probe for the progress display.

Each stage: ``run(ctx) -> outputs`` (stored in its marker), ``valid(ctx, marker) -> bool``,
``probe(ctx) -> (fraction, text)``.
"""

from __future__ import annotations

import html
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from headavatar.errors import UserError
from headavatar.pipeline.layout import Layout
from headavatar.pipeline.recipe import Recipe, choose_recipe, lpips_available


@dataclass
class StageContext:
    layout: Layout
    method: str
    head_model: str
    budget: str
    size: int  # tracking frame size
    input_path: Path
    input_kind: str  # video | subject
    device: str  # resolved: cpu, cuda, cuda:N
    overrides: dict = field(default_factory=dict)
    head_overrides: dict | None = None  # e.g. {"dir": FLAME folder} on this machine
    log: Callable[[str], None] = print
    upstream: str | None = None  # id of the marker of the stage before the running one
    markers: dict = field(default_factory=dict)  # stage -> its (valid) marker, filled as the pipeline goes
    expected_frames: int | None = None
    storage: str = "frames"  # a tracked video's frames: frames or compact (video chunks)

    def recipe(self) -> Recipe:
        return choose_recipe(self.method, self.device, self.budget, self.overrides)


# --------------------------------------------------------------------------------- track
def run_track(ctx: StageContext) -> dict:
    from headavatar.subjects.format import Subject

    dst = ctx.layout.subject
    if ctx.input_kind == "subject" and _same_path(ctx.input_path, dst):
        subj = Subject.open(dst)  # the subject already lives in OUT
    else:
        if dst.exists():  # left by an interrupted track stage (no marker): start it again
            shutil.rmtree(dst)
        if ctx.input_kind == "video":
            from headavatar.tracking.pipeline import track_video

            head = ctx.head_model
            flame_dir = (ctx.head_overrides or {}).get("dir") if head == "flame" else None
            subj = track_video(ctx.input_path, dst, head_model=head, size=ctx.size, flame_dir=flame_dir, progress=False, storage=ctx.storage)
        else:
            subj = link_subject(ctx.input_path, dst)
    return {"num_frames": subj.num_frames, "train_frames": len(subj.split.get("train", [])),
            "test_frames": len(subj.split.get("test", [])), "image_size": [subj.height, subj.width],
            "head_model": subj.head_model_spec.get("name")}


def valid_track(ctx: StageContext, marker: dict) -> bool:
    from headavatar.subjects.format import Subject

    try:
        subj = Subject.open(ctx.layout.subject)
    except UserError:
        return False
    return subj.num_frames == marker["outputs"].get("num_frames")


def probe_track(ctx: StageContext) -> tuple[float, str]:
    frames = ctx.layout.subject / "frames"
    if ctx.input_kind != "video" or not frames.is_dir():
        return 0.0, ""
    n = sum(1 for _ in os.scandir(frames))
    total = ctx.expected_frames
    return (0.9 * n / total if total else 0.0), f"{n} frames" + (f" of ~{total}" if total else "")


def link_subject(src: Path, dst: Path):
    """A tracked subject into OUT/subject: files hard-linked where the filesystem allows (no extra
    disk), else copied; subject.json last, so an interrupted copy is never taken for a subject."""
    from headavatar.subjects.format import Subject

    Subject.open(src)  # a broken subject fails here, before anything is written
    src = Path(src)
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir() or rel.as_posix() == "subject.json" or any(p.startswith(".") for p in rel.parts):
            continue  # folders come with their files; dot-files are interrupted writes
        _link_or_copy(path, dst / rel)
    _link_or_copy(src / "subject.json", dst / "subject.json")
    return Subject.open(dst)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _same_path(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


# --------------------------------------------------------------------------------- train
def run_train(ctx: StageContext) -> dict:
    from headavatar.methods import train_method
    from headavatar.methods.run import RunDir

    L = ctx.layout
    recipe = ctx.recipe()
    run = RunDir(L.run, ctx.head_overrides)
    started = L.read_started("train")
    resume = bool(started and started.get("upstream") == ctx.upstream and run.exists() and run.checkpoints())
    if resume:
        ctx.log(f"      continuing the interrupted training from iteration {run.checkpoints()[-1][0]}")
        # the run keeps the settings it was started with; only the device is this machine's
        train_method(ctx.method, L.subject, L.run, {"iterations": started["overrides"]["iterations"], "device": recipe.device},
                     resume=True, progress=False, head_overrides=ctx.head_overrides)
        described = started.get("recipe", "")
    else:
        if L.run.exists():  # a run of an older subject, or killed before its first checkpoint
            shutil.rmtree(L.run)
        for note in recipe.notes:
            ctx.log(f"      note: {note}")
        L.write_started("train", {"upstream": ctx.upstream, "recipe": recipe.describe(), "overrides": recipe.overrides})
        train_method(ctx.method, L.subject, L.run, recipe.overrides, progress=False, head_overrides=ctx.head_overrides)
        described = recipe.describe()
    ckpts = run.checkpoints()
    if not ckpts:
        raise UserError(f"training in {L.run} ended without a checkpoint")
    return {"step": ckpts[-1][0], "recipe": described, "device": recipe.device}


def valid_train(ctx: StageContext, marker: dict) -> bool:
    from headavatar.methods.run import RunDir

    run = RunDir(ctx.layout.run)
    try:
        info = run.read_info()
    except UserError:
        return False
    ckpts = run.checkpoints()
    return info.get("method") == ctx.method and bool(ckpts) and ckpts[-1][0] == marker["outputs"].get("step")


def probe_train(ctx: StageContext) -> tuple[float, str]:
    started = ctx.layout.read_started("train") or {}
    o = started.get("overrides", {})
    row = _last_curve_row(ctx.layout.run / "curves.jsonl")
    if not row:
        return 0.0, "starting"
    step, t = row.get("step", 0), row.get("time", 0.0)
    frac = step / o["iterations"] if o.get("iterations") else 0.0
    if o.get("max_seconds"):
        frac = max(frac, t / o["max_seconds"])
    text = f"it {step}" + (f"/{o['iterations']}" if o.get("iterations", 0) < 10_000_000 else "")
    if row.get("train_psnr") is not None:
        text += f", train PSNR {row['train_psnr']:.1f}"
    if row.get("test_psnr") is not None:
        text += f", held-out {row['test_psnr']:.1f}"
    return frac, text


def _last_curve_row(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue  # a line being written, or cut by the seek
    return None


# ---------------------------------------------------------------------------------- eval
def run_eval(ctx: StageContext) -> dict:
    from headavatar.methods.evaluate import evaluate_run

    recipe = ctx.recipe()
    # the side-by-side video needs ffmpeg (imageio-ffmpeg, a dependency, but absent from some bare GPU images)
    video = importlib.util.find_spec("imageio_ffmpeg") is not None
    if not video:
        ctx.log("      note: imageio-ffmpeg is not installed: no side-by-side video (pip install imageio-ffmpeg)")
    res = evaluate_run(ctx.layout.run, device=ctx.device, batch_size=recipe.eval_batch, video=video, progress=False,
                       lpips=lpips_available(), head_overrides=ctx.head_overrides)
    return {"num_frames": res["num_frames"], "protocol": res["protocol"], "checkpoint_step": res["checkpoint_step"],
            "metrics": res["metrics"]["mean"], "render_fps": res["render_fps"]}


def valid_eval(ctx: StageContext, marker: dict) -> bool:
    try:
        m = json.loads((ctx.layout.run / "eval" / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    train = ctx.markers.get("train") or {}
    return m.get("checkpoint_step") == marker["outputs"].get("checkpoint_step") == train.get("outputs", {}).get("step")


# -------------------------------------------------------------------------------- export
def run_export(ctx: StageContext) -> dict:
    from headavatar.export import export_run

    recipe = ctx.recipe()
    files = export_run(ctx.layout.run, device=ctx.device, texture_size=recipe.texture_size, head_overrides=ctx.head_overrides)
    return {"files": {ctx.layout.rel(p): Path(p).stat().st_size for p in files}}


def valid_export(ctx: StageContext, marker: dict) -> bool:
    files = marker["outputs"].get("files") or {}
    return bool(files) and all(_size(ctx.layout.root / rel) == size for rel, size in files.items())


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


# -------------------------------------------------------------------------------- report
def run_report(ctx: StageContext) -> dict:
    from headavatar.report import write_report

    L = ctx.layout
    thumb = write_thumbnail(L)
    rows = "".join(f"<tr><td>{html.escape(s)}</td><td>{m.get('seconds', 0):.1f}</td><td>{html.escape(m.get('finished', ''))}</td></tr>"
                   for s, m in ctx.markers.items())
    train = (ctx.markers.get("train") or {}).get("outputs", {})
    body = (f"<p>Made by <code>headavatar make</code> from <code>{html.escape(ctx.input_path.name)}</code>; "
            f"training: {html.escape(train.get('recipe', ''))}.</p>"
            f"<table><tr><th>stage</th><th>seconds</th><th>finished (UTC)</th></tr>{rows}</table>")
    report = write_report(L.run, title=f"headavatar make: {ctx.layout.root.name}", extra_sections=[("Pipeline", body)])
    return {"report": L.rel(report), "thumbnail": L.rel(thumb) if thumb else None}


def valid_report(ctx: StageContext, marker: dict) -> bool:
    out = marker["outputs"]
    return (ctx.layout.root / out.get("report", "-")).is_file() and (out.get("thumbnail") is None or (ctx.layout.root / out["thumbnail"]).is_file())


def write_thumbnail(layout: Layout, height: int = 160) -> Path | None:
    """OUT/thumbnail.jpg: the middle held-out frame of the eval video (ground truth | render)."""
    import numpy as np
    from PIL import Image

    from headavatar.utils.io import write_image

    frame = None
    video = layout.run / "eval" / "side_by_side.mp4"
    if video.is_file():
        import imageio.v2 as imageio

        want = max(0, int(_eval_frames(layout)) // 2)
        with imageio.get_reader(str(video), format="FFMPEG") as r:
            for i, f in enumerate(r):  # streamed: only the wanted frame is kept
                frame = f
                if i >= want:
                    break
    if frame is None:
        previews = sorted((layout.run / "previews").glob("*.jpg"))
        if not previews:
            return None
        frame = np.asarray(Image.open(previews[-1]).convert("RGB"))
    h, w = frame.shape[:2]
    img = Image.fromarray(frame).resize((max(1, round(w * height / h)), height), Image.LANCZOS)
    write_image(layout.thumbnail, np.asarray(img))
    return layout.thumbnail


def _eval_frames(layout: Layout) -> int:
    try:
        return int(json.loads((layout.run / "eval" / "metrics.json").read_text())["num_frames"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], dict]
    valid: Callable[[StageContext, dict], bool]
    probe: Callable[[StageContext], tuple[float, str]] | None = None


STAGE_TABLE = {
    "track": Stage("track", run_track, valid_track, probe_track),
    "train": Stage("train", run_train, valid_train, probe_train),
    "eval": Stage("eval", run_eval, valid_eval),
    "export": Stage("export", run_export, valid_export),
    "report": Stage("report", run_report, valid_report),
}
