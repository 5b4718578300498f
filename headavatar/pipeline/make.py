"""`headavatar make`: video (or tracked subject) -> track -> train -> eval -> export -> report, in one
folder, each stage skipped when it is already complete and valid (layout.py says how that is known).

An interrupted stage is done again from its start, except training, which continues from its last
checkpoint (the same resume as `headavatar train --resume`).  The settings are chosen for the
device each stage runs on (recipe.py), so a folder tracked on a laptop can be trained elsewhere:
`headavatar make -o OUT` carries on with what make.json recorded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from headavatar.errors import UserError
from headavatar.pipeline.layout import ERROR, LOG, STAGES, Layout
from headavatar.pipeline.progress import ProgressDisplay
from headavatar.pipeline.recipe import choose_recipe, parse_budget
from headavatar.pipeline.stages import STAGE_TABLE, StageContext

STORAGES = ("frames", "compact")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
PLAN_VERSION = 1
# options whose change makes an existing OUT a different job (device is not one: stages may run on different machines)
_PLAN_KEYS = ("input", "method", "head_model", "budget", "size", "overrides")


def check_storage(storage: str | None) -> str | None:
    """``storage`` itself (None passes: make.json or the default decides), or a UserError."""
    if storage is not None and storage not in STORAGES:
        raise UserError(f"storage must be one of {', '.join(STORAGES)}, got '{storage}'")
    return storage


def classify_input(path) -> str:
    """'video' or 'subject'; a UserError saying what is wrong otherwise (checked before any work)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"input {p} does not exist")
    if p.is_dir():
        meta = p / "subject.json"
        if not meta.is_file():
            raise UserError(f"{p} is a folder but not a tracked subject (no subject.json); pass a video file or a subject folder made by 'headavatar track'")
        if not os.access(meta, os.R_OK) or not os.access(p, os.R_OK | os.X_OK):
            raise UserError(f"subject folder {p} is not readable (permissions)")
        return "subject"
    if p.suffix.lower() not in VIDEO_SUFFIXES:
        raise UserError(f"{p} is neither a video ({', '.join(VIDEO_SUFFIXES)}) nor a subject folder")
    if not os.access(p, os.R_OK):
        raise UserError(f"video {p} is not readable (permissions)")
    return "video"


def input_record(path, kind: str) -> dict:
    """What make.json keeps of the input: its name and kind (never an absolute path), a video's size."""
    p = Path(path)
    rec = {"name": p.name, "kind": kind}
    if kind == "video":
        rec["bytes"] = p.stat().st_size
    return rec


def typed_overrides(method: str, overrides: dict | list | None) -> dict:
    """--set values converted to the config's types (and unknown keys refused) before any work."""
    from headavatar.config import apply_overrides, parse_set
    from headavatar.methods import get_method

    if not overrides:
        return {}
    if isinstance(overrides, list):
        overrides = parse_set(overrides)
    cfg = apply_overrides(get_method(method).config_cls(), {k.strip(): v for k, v in overrides.items()})
    return {k.strip(): getattr(cfg, k.strip()) if "." not in k else v for k, v in overrides.items()}


def _check_plan(layout: Layout, plan: dict) -> None:
    from headavatar.utils.io import read_json, write_json

    if layout.plan.is_file():
        old = read_json(layout.plan)
        diffs = [k for k in _PLAN_KEYS if k != "input" and old.get(k) != plan.get(k)]
        oi, ni = old.get("input", {}), plan.get("input", {})
        if (oi.get("name"), oi.get("kind")) != (ni.get("name"), ni.get("kind")) or (oi.get("bytes") and ni.get("bytes") and oi["bytes"] != ni["bytes"]):
            diffs.insert(0, "input")
        if diffs:
            said = ", ".join(f"{k} {_show(old.get(k))} (now {_show(plan.get(k))})" for k in diffs)
            raise UserError(f"{layout.root} was made with other options: {said}; "
                            f"use the same options, another -o folder, or delete {layout.root} to start over")
        return
    ours = {"stages", LOG, ERROR}  # what batch may have written before the first make call
    if layout.root.exists() and any(p for p in layout.root.iterdir() if not p.name.startswith(".") and p.name not in ours):
        raise UserError(f"{layout.root} exists and is not a 'headavatar make' folder; choose another -o folder")
    write_json(layout.plan, {"version": PLAN_VERSION, **plan})


def _show(v) -> str:
    return v["name"] if isinstance(v, dict) and "name" in v else str(v)


def read_plan(out) -> dict | None:
    from headavatar.utils.io import read_json

    layout = Layout(out)
    return read_json(layout.plan) if layout.plan.is_file() else None


def make(input=None, out=None, method: str | None = None, head_model: str | None = None, budget=None, device: str = "auto",
         size: int | None = None, storage: str | None = None, overrides: dict | list | None = None, until: str | None = None, stages: tuple | None = None,
         head_overrides: dict | None = None, progress: bool = True, log: Callable[[str], None] | None = None,
         hooks: Callable[[str, str], None] | None = None) -> dict:
    """Run the pipeline into ``out``; returns a summary dict (stages, times, held-out metrics, files).

    ``input``: a video or a tracked subject folder; may be None when ``out`` already has make.json.
    ``method``/``head_model``/``budget``/``size``/``overrides``: None = what make.json says, else
    flashavatar / ict / fast / 512 / none.  ``storage``: how a tracked video's frames are stored,
    frames or compact (None = what make.json says, else frames); not part of what makes OUT a
    different job (the same frames either way).  ``until``: stop after this stage.  ``stages``: the
    stages this call may run (an earlier one that is not complete is an error; batch uses it to run
    tracking and training on different workers).  ``hooks(event, stage)`` with event "start" /
    "done" is called around each stage that runs (tests use it to interrupt the pipeline).
    """
    from headavatar.methods import get_method
    from headavatar.utils.device import resolve_device

    if out is None:
        raise UserError("make needs an output folder (-o OUT)")
    layout = Layout(out)
    old = read_plan(out) if layout.plan.is_file() else None
    if input is None and old is None:
        raise UserError(f"make needs an input video or subject folder ({layout.root} holds no earlier make to continue)")
    method = method or (old or {}).get("method") or "flashavatar"
    head_model = head_model or (old or {}).get("head_model") or "ict"
    budget = str(parse_budget(budget if budget is not None else (old or {}).get("budget", "fast")))
    size = int(size or (old or {}).get("size") or 512)
    storage = check_storage(storage or (old or {}).get("storage") or "frames")
    get_method(method)  # an unknown method fails here, before any work
    overrides = typed_overrides(method, overrides) if overrides else ((old or {}).get("overrides") or {}) if overrides is None else {}
    dev = str(resolve_device(device))
    choose_recipe(method, dev, budget, overrides)  # e.g. FLARE with a time budget fails now
    if until is not None and until not in STAGES:
        raise UserError(f"--until must be one of {', '.join(STAGES)}, got '{until}'")
    todo = STAGES[: STAGES.index(until) + 1] if until else STAGES

    if input is not None:
        input = Path(input)
        track_marker = layout.read_marker("track")
        if input.exists() or track_marker is None:
            kind = classify_input(input)
            rec = input_record(input, kind)
        else:  # tracked already (elsewhere, perhaps): the input itself need not be here
            rec = dict((old or {}).get("input") or {})
            if rec.get("name") != input.name:
                raise UserError(f"input {input} does not exist")
            kind = rec["kind"]
    else:
        rec = dict(old["input"])
        kind = rec["kind"]
        input = Path(rec["name"])  # only its name is known: fine while the track stage is complete
    plan = {"input": rec, "method": method, "head_model": head_model, "budget": budget, "size": size, "overrides": overrides,
            "storage": storage}
    layout.root.mkdir(parents=True, exist_ok=True)
    _check_plan(layout, plan)

    display = ProgressDisplay(len(todo), desc=f"make {layout.root.name}", enabled=progress)
    say = log or display.write
    ctx = StageContext(layout, method, head_model, budget, size, input, kind, dev, overrides, head_overrides, say, storage=storage)
    result = {"name": layout.root.name, "out": str(layout.root), "status": "running", "device": dev, "stages": {}}
    t_all = time.perf_counter()
    try:
        upstream = None
        for k, name in enumerate(todo, 1):
            stage = STAGE_TABLE[name]
            ctx.upstream = upstream
            marker = layout.read_marker(name)
            if marker and marker.get("upstream") == upstream and _valid(stage, ctx, marker):
                ctx.markers[name] = marker
                upstream = marker["id"]
                result["stages"][name] = {"seconds": marker.get("seconds"), "ran": False}
                say(f"[{k}/{len(todo)}] {name}: complete ({marker.get('seconds', 0):.1f} s, {marker.get('finished', '?')}), skipped")
                display.end()
                continue
            if stages is not None and name not in stages:
                raise UserError(f"stage '{name}' of {layout.root} is not complete, and this call may only run {', '.join(stages)}")
            layout.drop_marker(name)
            if name == "track":
                if not input.exists():
                    raise UserError(f"input {input} does not exist (needed to track: {layout.root} has no complete subject)")
                if kind == "video":
                    ctx.expected_frames = _expected_frames(input)
            say(f"[{k}/{len(todo)}] {name}: " + _stage_line(name, ctx))
            if hooks:
                hooks("start", name)
            display.begin(name, (lambda s=stage: s.probe(ctx)) if stage.probe else None)
            t0 = time.perf_counter()
            try:
                outputs = stage.run(ctx)
            except BaseException as e:
                e.headavatar_stage = name  # batch reports which stage failed
                raise
            dt = time.perf_counter() - t0
            marker = layout.write_marker(name, upstream, dt, outputs, device=dev)
            ctx.markers[name] = marker
            upstream = marker["id"]
            result["stages"][name] = {"seconds": round(dt, 3), "ran": True}
            display.end()
            if hooks:
                hooks("done", name)
    finally:
        display.close()
    result["status"] = "done" if len(todo) == len(STAGES) else f"until {todo[-1]}"
    result["seconds"] = round(time.perf_counter() - t_all, 3)
    for name in ("track", "train", "eval", "export", "report"):
        if name in ctx.markers:
            result[name] = ctx.markers[name]["outputs"]
    _print_end(result, layout, say, hint=stages is None)
    return result


def _valid(stage, ctx, marker) -> bool:
    try:
        return bool(stage.valid(ctx, marker))
    except Exception:  # a damaged output: the stage runs again
        return False


def _expected_frames(video: Path) -> int | None:
    try:
        from headavatar.tracking.video import probe_video

        return probe_video(video).estimated_frames()
    except Exception:  # only for the progress display; track_video reports a bad video itself
        return None


def _stage_line(name: str, ctx: StageContext) -> str:
    if name == "track":
        if ctx.input_kind == "video":
            return f"tracking {ctx.input_path.name} ({ctx.head_model} head model, {ctx.size}²)"
        return f"taking the tracked subject {ctx.input_path.name} (linked or copied into {ctx.layout.subject.name}/)"
    if name == "train":
        return f"training {ctx.recipe().describe()}"
    if name == "eval":
        return "scoring the held-out frames"
    if name == "export":
        return "exporting the avatar"
    return "writing the report"


def _print_end(result: dict, layout: Layout, say, hint: bool = True) -> None:
    times = ", ".join(f"{n} {s['seconds']:.1f} s" + ("" if s["ran"] else " (earlier)") for n, s in result["stages"].items())
    say(f"stage times: {times}")
    if "report" in result:
        say(f"report: {layout.root / result['report']['report']}")
    if "export" in result:
        say("exported: " + ", ".join(str(layout.root / f) for f in result["export"]["files"]))
    if result["status"] != "done" and hint:
        say(f"stopped after the {result['status'][6:]} stage; carry on with: headavatar make -o {layout.root}")
    ev = result.get("eval")
    if ev:
        m = ev["metrics"]
        extra = ", ".join(f"{k.upper()} {v:.4f}" for k, v in m.items() if k != "psnr" and v is not None)
        say(f"held-out ({ev['num_frames']} frames, {str(ev['protocol']).split(':')[0]} protocol): {extra}")
        say(f"held-out PSNR: {m['psnr']:.2f} dB")
