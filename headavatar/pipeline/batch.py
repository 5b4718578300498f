"""`headavatar batch`: the make pipeline for many inputs, as Ray tasks, or one after another without Ray.

    OUT/
      NAME/            one make folder per input (layout.py), NAME = the video's stem or the subject folder's name
      summary.csv      one row per subject: status, error, held-out metrics, stage times, links
      summary.html     the same with a thumbnail per subject

With Ray, each subject is tracked by a task on CPU workers (``--cpus-per-job`` cores, no GPU), then
trained, evaluated, exported and reported by one of a pool of long-lived GPU workers (Ray actors),
each holding ``--gpus-per-job`` of a GPU (a fraction lets several small trainings share one card;
Ray packs them).  A worker takes the next tracked subject as soon as it is free, so Python, torch,
the CUDA context and the rasteriser's compiled kernels are set up once per worker, not per subject
(that start cost about 12 s a subject on an H100).  Without GPUs the stages after tracking are
plain tasks (Ray reuses their processes).  Tasks and workers hand each other
nothing but small dicts: everything else goes through OUT, which must be on a path every worker
sees (a shared filesystem, mounted at the same place on every machine).  Each task is the same
``make`` call the command runs, limited to its stages, so a subject finished by either engine is
the same folder, and a re-run skips what is complete.  A subject that fails is recorded (its
error.json, the summary) and the others go on.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from headavatar.errors import UserError
from headavatar.pipeline.layout import STAGES, Layout
from headavatar.pipeline.make import check_storage, classify_input, make
from headavatar.pipeline.progress import ProgressDisplay

INSTALL_RAY = "pip install 'headavatar[scale]'"
TRACK_STAGES = ("track",)
GPU_STAGES = ("train", "eval", "export", "report")
DEFAULT_GPUS_PER_JOB = 0.25  # a fast FlashAvatar training uses ~1.5 GB and a fraction of an H100's compute
DEFAULT_CPUS_PER_JOB = 2
METRIC_KEYS = ("psnr", "ssim", "lpips_vgg", "lpips_alex", "mae")


@dataclass
class Job:
    """One subject: what a worker needs to run its stages (paths absolute on the shared filesystem)."""

    name: str
    input: str
    kind: str
    out: str
    method: str = "flashavatar"
    head_model: str = "ict"
    budget: str = "fast"
    size: int = 512
    overrides: dict = field(default_factory=dict)
    device: str = "auto"
    threads: int | None = None
    storage: str | None = None  # None: what the subject's make.json says, else frames


def resolve_inputs(inputs) -> list[tuple[Path, str, str]]:
    """(path, kind, name) per input, checked up front: every unusable input is named in one error."""
    if not inputs:
        raise UserError("batch needs at least one input: video files or tracked subject folders")
    found, bad, names = [], [], {}
    for raw in inputs:
        p = Path(raw)
        try:
            kind = classify_input(p)
        except UserError as e:
            bad.append(str(e))
            continue
        name = p.stem if kind == "video" else p.resolve().name
        if name in names:
            bad.append(f"{raw} and {names[name]} would both be written to OUT/{name}; rename one")
            continue
        names[name] = raw
        found.append((p, kind, name))
    if bad:
        raise UserError(f"{len(bad)} of {len(inputs)} inputs cannot be used: " + "; ".join(bad))
    return found


def make_jobs(inputs, out, method="flashavatar", head_model="ict", budget="fast", size=512, overrides=None, device="auto",
              threads=None, storage=None) -> list[Job]:
    from headavatar.methods import get_method
    from headavatar.pipeline.make import typed_overrides
    from headavatar.pipeline.recipe import choose_recipe, parse_budget

    get_method(method)
    budget = str(parse_budget(budget))
    typed = typed_overrides(method, overrides)
    choose_recipe(method, "cpu", budget, typed)  # e.g. FLARE with a time budget: refused before any work
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    check_storage(storage)  # before any subject starts
    return [Job(name, str(p.resolve()), kind, str(out / name), method, head_model, budget, size, typed, device, threads, storage)
            for p, kind, name in resolve_inputs(inputs)]


# --------------------------------------------------------------------------- one subject
def run_job(job: Job | dict, stages: tuple = STAGES, device: str | None = None) -> dict:
    """Run ``stages`` of one subject; never raises for the subject's own failure: returns
    {"name", "status": done | partial | failed, "stage", "error", ...} and keeps error.json."""
    job = Job(**job) if isinstance(job, dict) else job
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    layout = Layout(job.out)
    layout.root.mkdir(parents=True, exist_ok=True)
    log = _FileLog(layout.log)
    log(f"=== {', '.join(stages)} on {socket.gethostname()} (pid {os.getpid()})")
    until = stages[-1]
    t0 = time.perf_counter()
    try:
        res = make(job.input, job.out, method=job.method, head_model=job.head_model, budget=job.budget, device=device or job.device,
                   size=job.size, storage=job.storage, overrides=job.overrides or None, until=until, stages=stages, progress=False, log=log)
    except Exception as e:  # the subject's failure is reported; the batch goes on
        stage = getattr(e, "headavatar_stage", None) or "setup"
        msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        log(f"FAILED at {stage}: {msg}")
        if not isinstance(e, UserError):
            log(traceback.format_exc())
        from headavatar.utils.io import write_json

        write_json(layout.error, {"stage": stage, "error": msg, "host": socket.gethostname(),
                                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        return {"name": job.name, "status": "failed", "stage": stage, "error": msg, "seconds": time.perf_counter() - t0}
    if until == STAGES[-1]:
        layout.error.unlink(missing_ok=True)
    return {"name": job.name, "status": "done" if until == STAGES[-1] else "partial", "seconds": time.perf_counter() - t0,
            "psnr": (res.get("eval") or {}).get("metrics", {}).get("psnr")}


class _FileLog:
    """Appends what the pipeline says for one subject to OUT/NAME/make.log."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {line}\n")


def _track_task(job: dict) -> dict:
    return run_job(job, TRACK_STAGES, device="cpu")


def _gpu_task(job: dict, tracked: dict | None, device: str) -> dict:
    if tracked is not None and tracked["status"] == "failed":
        return tracked
    return run_job(job, GPU_STAGES, device=device)


class _GpuWorker:
    """A Ray actor that runs the GPU stages of one subject after another in one process.

    Ray sets CUDA_VISIBLE_DEVICES when it places the actor and the actor keeps that share of a GPU
    for its whole life, so every subject it runs sees only the GPU Ray gave it."""

    def run(self, job: dict, device: str) -> dict:
        import gc

        import torch

        r = run_job(job, GPU_STAGES, device=device)
        r["worker_pid"] = os.getpid()
        gc.collect()  # the run's model and frames go before the next subject's arrive
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        return r


def _pool_size(nodes: list[dict], jobs: int, gpj: float, cpj: int, keep_cpus: int) -> int:
    """How many GPU workers fit the cluster: per node, its GPU shares and its CPUs (less ``keep_cpus``
    left for tracking tasks, so tracking never waits behind idle workers), at most one per job."""
    slots = 0
    for n in nodes:
        by_gpu = int(n.get("GPU", 0) / gpj + 1e-9)
        by_cpu = int(max(0, n.get("CPU", 0) - keep_cpus) // cpj)
        slots += min(by_gpu, by_cpu)
    return max(1, min(jobs, slots))


# ------------------------------------------------------------------------------- engines
def run_sequential(jobs: list[Job], display: ProgressDisplay | None = None, say=print) -> list[dict]:
    results = []
    for job in jobs:
        r = run_job(job)
        say(_result_line(r))
        results.append(r)
    return results


def run_ray(jobs: list[Job], address: str | None = None, gpus_per_job: float | None = None, cpus_per_job: int | None = None,
            num_cpus: int | None = None, num_gpus: int | None = None, connect_timeout: float = 30.0, ray_options: dict | None = None,
            say=print) -> tuple[list[dict], dict]:
    """The jobs as Ray tasks; returns (results, a description of the resources used)."""
    import ray

    connect_ray(address, num_cpus, num_gpus, connect_timeout, ray_options)
    try:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        max_gpu = max((n.get("GPU", 0) for n in nodes), default=0)
        max_cpu = max((n.get("CPU", 0) for n in nodes), default=0)
        gpj = (DEFAULT_GPUS_PER_JOB if max_gpu else 0.0) if gpus_per_job is None else float(gpus_per_job)
        cpj = int(cpus_per_job or min(DEFAULT_CPUS_PER_JOB, max(1, int(max_cpu))))
        if gpj < 0 or cpj < 1:
            raise UserError("--gpus-per-job must be >= 0 and --cpus-per-job >= 1")
        if gpj > 0 and max_gpu == 0:
            raise UserError("the Ray cluster has no GPUs; pass --gpus-per-job 0 to train on CPUs")
        if gpj > max_gpu:
            raise UserError(f"--gpus-per-job {gpj:g} is more than any node has ({max_gpu:g} GPUs)")
        if gpj > 1 and gpj != int(gpj):
            raise UserError("--gpus-per-job above 1 must be a whole number")
        if cpj > max_cpu:
            raise UserError(f"--cpus-per-job {cpj} is more than any node has ({max_cpu:g} CPUs)")
        device = "cuda" if gpj > 0 else "cpu"
        # an explicit --device wins (e.g. GPU shares reserved on a test cluster whose workers train on the CPU)
        device = next((j.device for j in jobs if j.device not in (None, "auto")), device)
        track = ray.remote(_track_task).options(num_cpus=cpj, num_gpus=0, max_retries=0)
        for job in jobs:
            job.threads = cpj
        if gpj > 0:
            results, workers = _run_pool(ray, jobs, track, nodes, gpj, cpj, device, say)
        else:
            gpu = ray.remote(_gpu_task).options(num_cpus=cpj, num_gpus=0, max_retries=0)
            refs = {}
            for job in jobs:
                d = asdict(job)
                t = track.remote(d) if _needs_tracking(job) else None
                refs[gpu.remote(d, t, device)] = job
            results, workers = _gather(ray, refs, say), None
        used = {"engine": "ray", "address": address or "local", "gpus_per_job": gpj, "cpus_per_job": cpj,
                "cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}}
        if workers is not None:
            used["gpu_workers"] = workers
        return results, used
    finally:
        ray.shutdown()


def _failed(job: Job, e: Exception) -> dict:
    """The worker itself died (killed, out of memory): the subject fails (its error.json says so, as
    for a failure inside a stage), the batch goes on."""
    from headavatar.utils.io import write_json

    msg = f"the worker process died: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    layout = Layout(job.out)
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        write_json(layout.error, {"stage": "worker", "error": msg, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        _FileLog(layout.log)(f"FAILED: {msg}")
    except OSError:  # best effort: the returned row still reports the failure in the summary
        pass
    return {"name": job.name, "status": "failed", "stage": "worker", "error": msg}


def _gather(ray, refs: dict, say) -> list[dict]:
    results, pending = [], list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=None)
        for ref in ready:
            try:
                r = ray.get(ref)
            except Exception as e:
                r = _failed(refs[ref], e)
            say(_result_line(r))
            results.append(r)
    return results


def _run_pool(ray, jobs: list[Job], track, nodes: list[dict], gpj: float, cpj: int, device: str, say) -> tuple[list[dict], int]:
    """Tracking as tasks; each tracked subject goes to the next free GPU worker."""
    from collections import deque

    needs = {j.name: _needs_tracking(j) for j in jobs}
    size = _pool_size(nodes, len(jobs), gpj, cpj, keep_cpus=cpj if any(needs.values()) else 0)
    worker_cls = ray.remote(_GpuWorker).options(num_cpus=cpj, num_gpus=gpj, max_restarts=0, max_task_retries=0)
    idle = [worker_cls.remote() for _ in range(size)]
    started = size
    tracking = {track.remote(asdict(j)): j for j in jobs if needs[j.name]}
    queue = deque(j for j in jobs if not needs[j.name])
    running: dict = {}
    results = []

    def finish(r: dict) -> None:
        say(_result_line(r))
        results.append(r)

    while tracking or queue or running:
        while idle and queue:
            w, job = idle.pop(), queue.popleft()
            running[w.run.remote(asdict(job), device)] = (w, job)
        ready, _ = ray.wait([*tracking, *running], num_returns=1, timeout=None)
        ref = ready[0]
        if ref in tracking:
            job = tracking.pop(ref)
            try:
                r = ray.get(ref)
            except Exception as e:
                r = _failed(job, e)
            if r["status"] == "failed":
                finish(r)
            else:
                queue.append(job)
            continue
        w, job = running.pop(ref)
        try:
            finish(ray.get(ref))
            idle.append(w)
        except Exception as e:  # the worker is gone with its subject: a fresh one takes its place
            finish(_failed(job, e))
            idle.append(worker_cls.remote())
            started += 1
    return results, started


def _needs_tracking(job: Job) -> bool:
    """Whether the subject still has to be tracked (else no CPU task is started for it)."""
    from headavatar.pipeline.stages import valid_track

    layout = Layout(job.out)
    marker = layout.read_marker("track")
    if not marker or marker.get("upstream") is not None:
        return True

    class _Ctx:  # the only thing valid_track reads
        pass

    ctx = _Ctx()
    ctx.layout = layout
    try:
        return not valid_track(ctx, marker)
    except Exception:
        return True


def connect_ray(address: str | None, num_cpus=None, num_gpus=None, timeout: float = 30.0, options: dict | None = None) -> None:
    """Start a local Ray (address None) or join the cluster at ``address``; a cluster that does not
    answer is a UserError within about ``timeout`` seconds, not a hang."""
    import ray

    env = {k: v for k, v in os.environ.items() if k.startswith("HEADAVATAR_")}  # head-model and weight locations
    kw = {"log_to_driver": False, "logging_level": logging.ERROR, "runtime_env": {"env_vars": env} if env else None}
    if address in (None, "", "local"):
        kw.update(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, object_store_memory=200 * 1024**2)
        kw.update(options or {})
        ray.init(**kw)
        return
    if address != "auto":
        _check_reachable(address, min(timeout, 5.0))
    _check_answers(address, timeout)
    try:
        ray.init(address=address, **kw)
    except Exception as e:
        raise UserError(f"could not join the Ray cluster at {address}: {str(e).splitlines()[0][:200]}") from None


def _host_port(address: str) -> tuple[str, int]:
    a = address
    client = a.startswith("ray://")
    if "://" in a:
        a = a.split("://", 1)[1]
    host, _, port = a.rpartition(":")
    if not host:
        host, port = port, ""
    try:
        return host.strip("[]"), int(port) if port else (10001 if client else 6379)
    except ValueError:
        raise UserError(f"--address {address} is not HOST:PORT (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001)") from None


def _check_reachable(address: str, timeout: float) -> None:
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError | socket.timeout) else (e.strerror or type(e).__name__)
        raise UserError(f"no Ray cluster answers at {address} ({why}); start one there with 'ray start --head', "
                        "or leave out --address to run a local Ray") from None


def _check_answers(address: str, timeout: float) -> None:
    """Join once in a child process that is killed after ``timeout``: Ray itself keeps retrying a
    server that accepts connections but is not Ray (or a head that is still starting) for minutes."""
    code = "import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); ray.shutdown()"
    try:
        p = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"the server at {address} did not answer as a Ray cluster within {timeout:g} s; check the address "
                        "('ray status' on the head node prints it), or leave out --address to run a local Ray") from None
    if p.returncode != 0:
        last = [ln for ln in (p.stderr or "").splitlines() if ln.strip()]
        raise UserError(f"could not join the Ray cluster at {address}: {last[-1][:200] if last else 'exit code ' + str(p.returncode)}")


# ------------------------------------------------------------------------------- summary
def collect(out, names: list[str]) -> list[dict]:
    """One row per subject, read back from its folder (so it is the same whichever engine ran it)."""
    rows = []
    for name in names:
        layout = Layout(Path(out) / name)
        plan = _read_json(layout.plan) or {}
        markers = {s: layout.read_marker(s) for s in STAGES}
        err = _read_json(layout.error)
        row = {"subject": name, "status": "failed" if err else ("done" if markers["report"] else "incomplete"),
               "failed_stage": (err or {}).get("stage", ""), "error": (err or {}).get("error", ""),
               "input": (plan.get("input") or {}).get("name", ""), "method": plan.get("method", ""), "budget": plan.get("budget", "")}
        tr = (markers["track"] or {}).get("outputs", {})
        row["frames"] = tr.get("num_frames", "")
        row["test_frames"] = tr.get("test_frames", "")
        trn = markers["train"] or {}
        row["iterations"] = trn.get("outputs", {}).get("step", "")
        row["device"] = trn.get("device", "")
        ev = (markers["eval"] or {}).get("outputs", {})
        for k in METRIC_KEYS:
            v = (ev.get("metrics") or {}).get(k)
            row[k] = round(v, 4) if isinstance(v, (int, float)) else ""
        total = 0.0
        for s in STAGES:
            sec = (markers[s] or {}).get("seconds")
            row[f"{s}_s"] = round(sec, 1) if sec is not None else ""
            total += sec or 0.0
        row["total_s"] = round(total, 1)
        rep = (markers["report"] or {}).get("outputs", {})
        row["report"] = f"{name}/{rep['report']}" if rep.get("report") else ""
        row["thumbnail"] = f"{name}/{rep['thumbnail']}" if rep.get("thumbnail") else ""
        rows.append(row)
    return rows


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_summary(out, rows: list[dict], info: dict) -> tuple[Path, Path]:
    from headavatar.utils.io import atomic_path

    out = Path(out)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else ["subject"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    with atomic_path(out / "summary.csv") as tmp:
        tmp.write_text(buf.getvalue())
    with atomic_path(out / "summary.html") as tmp:
        tmp.write_text(_summary_html(rows, info))
    return out / "summary.csv", out / "summary.html"


def _summary_html(rows: list[dict], info: dict) -> str:
    esc = html.escape
    done = sum(r["status"] == "done" for r in rows)
    failed = [r for r in rows if r["status"] == "failed"]
    metric_cols = [k for k in METRIC_KEYS if any(r.get(k) != "" for r in rows)]
    head = ["", "subject", "status", "frames (held out)", "iterations", *metric_cols, *(f"{s} s" for s in STAGES), "total s"]
    body = []
    for r in rows:
        thumb = f"<img src='{esc(r['thumbnail'])}' height='80'>" if r["thumbnail"] else ""
        name = f"<a href='{esc(r['report'])}'>{esc(r['subject'])}</a>" if r["report"] else esc(r["subject"])
        status = esc(r["status"]) if r["status"] != "failed" else f"<span class='bad'>failed at {esc(r['failed_stage'])}</span>"
        cells = [thumb, name, status, f"{r['frames']} ({r['test_frames']})" if r["frames"] != "" else "", r["iterations"],
                 *(r[k] for k in metric_cols), *(r[f"{s}_s"] for s in STAGES), r["total_s"]]
        body.append("<tr>" + "".join(f"<td>{c if isinstance(c, str) and c.startswith('<') else esc(str(c))}</td>" for c in cells) + "</tr>")
        if r["status"] == "failed":
            body.append(f"<tr><td></td><td colspan='{len(head) - 1}' class='bad'>{esc(r['error'])}</td></tr>")
    meta = ", ".join(f"{esc(str(k))}: {esc(json.dumps(v) if isinstance(v, dict) else str(v))}" for k, v in info.items())
    return ("<!doctype html><html><head><meta charset='utf-8'><title>headavatar batch</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
            ".bad{color:#b00}</style></head><body>"
            f"<h1>headavatar batch: {done} of {len(rows)} subjects done" + (f", {len(failed)} failed" if failed else "") + "</h1>"
            f"<p>{meta}</p><p>Metrics: held-out frames (each subject's eval/metrics.json); times: seconds of the run that completed "
            "each stage (a stage skipped on a re-run keeps its first time).</p>"
            "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" + "".join(body) + "</table></body></html>")


def _result_line(r: dict) -> str:
    if r["status"] == "failed":
        return f"{r['name']}: FAILED at {r.get('stage')}: {r.get('error')}"
    psnr = r.get("psnr")
    return f"{r['name']}: {r['status']} in {r.get('seconds', 0):.0f} s" + (f", held-out PSNR {psnr:.2f} dB" if psnr is not None else "")


# ---------------------------------------------------------------------------------- entry
def batch(inputs, out, method="flashavatar", head_model="ict", budget="fast", size=512, overrides=None, device="auto",
          storage: str | None = None, address: str | None = None, gpus_per_job: float | None = None, cpus_per_job: int | None = None, engine: str = "auto",
          num_cpus: int | None = None, num_gpus: int | None = None, connect_timeout: float = 30.0, ray_options: dict | None = None,
          progress: bool = True, say=print) -> dict:
    """Run the make pipeline for every input into OUT/NAME; write OUT/summary.csv and summary.html.

    ``engine``: auto (Ray when installed, else one after another), ray, or sequential.
    Returns {"rows", "failed", "seconds", "info", "summary": (csv, html)}.
    """
    jobs = make_jobs(inputs, out, method, head_model, budget, size, overrides, device, storage=storage)
    out = Path(out)
    if engine not in ("auto", "ray", "sequential"):
        raise UserError(f"unknown engine '{engine}'; use auto, ray or sequential")
    if engine == "sequential" and address:
        raise UserError("--address joins a Ray cluster; it cannot be combined with --sequential")
    has_ray = _ray_installed()
    if engine == "ray" or address:
        if not has_ray:
            raise UserError(f"{'--address' if address else 'the Ray engine'} needs Ray, which is not installed: {INSTALL_RAY}")
        use_ray = True
    else:
        use_ray = engine == "auto" and has_ray
        if engine == "auto" and not has_ray:
            say(f"Ray is not installed: running the {len(jobs)} subjects one after another (to run them in parallel: {INSTALL_RAY})")
    out.mkdir(parents=True, exist_ok=True)
    names = [j.name for j in jobs]
    total = len(jobs) * len(STAGES)
    display = ProgressDisplay(total, desc=f"batch {len(jobs)} subjects", enabled=progress)
    display.begin("", lambda: (_stages_done(out, names), ""), absolute=True)
    write = display.write if progress else say
    t0 = time.perf_counter()
    try:
        if use_ray:
            results, info = run_ray(jobs, address, gpus_per_job, cpus_per_job, num_cpus, num_gpus, connect_timeout, ray_options, say=write)
        else:
            if cpus_per_job:
                import torch

                torch.set_num_threads(int(cpus_per_job))
            results, info = run_sequential(jobs, display, say=write), {"engine": "sequential", "device": device}
    finally:
        display.close()
    wall = time.perf_counter() - t0
    info = {**info, "subjects": len(jobs), "wall_s": round(wall, 1), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    rows = collect(out, names)
    paths = write_summary(out, rows, info)
    failed = [r for r in rows if r["status"] != "done"]
    say(f"{len(rows) - len(failed)} of {len(rows)} subjects done in {wall:.0f} s ({info['engine']}); summary: {paths[1]}")
    for r in failed:
        say(f"  {r['subject']}: {r['status']}" + (f" at {r['failed_stage']}: {r['error']}" if r["error"] else ""))
    return {"rows": rows, "failed": [r["subject"] for r in failed], "seconds": wall, "info": info, "summary": paths, "results": results}


def _stages_done(out: Path, names: list[str]) -> float:
    return float(sum(Layout(out / n).marker_path(s).is_file() for n in names for s in STAGES))


def _ray_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None
