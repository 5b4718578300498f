"""`headavatar batch` against the same stages one after another, on N tracked subjects (issues 16, 17).

Sub-commands:

  prepare SUBJECT... -o DIR [--max-frames N]
      here, before carrying: copies of tracked subjects (optionally their first N frames, the last
      15 % held out) small enough to travel to the GPU machine (64 MiB a call).
  pack-ray -o .whl
      here: Ray for the GPU machine's Python 3.12, which has no Ray and no network.  The cp312
      wheel is about 79 MB, over the carry limit, so this keeps what a local Ray needs (no Java
      jars, no dashboard source maps) as ray-VERSION-stripped.tar.xz (about 30 MiB) plus the
      wheels of its dependencies (about 3 MB).  `run` unpacks it into /tmp/site when Ray is missing.
  run --subjects DIR --jobs N --modes sequential,ray[,pool] --out FILE.json
      on the GPU machine: N jobs (the prepared subjects, copied round-robin), each mode in a fresh
      folder; wall time, subjects per hour, per-subject held-out PSNR and stage times, GPU
      utilisation and memory per device (nvidia-smi sampled every 0.5 s); JSON and a table.
      Modes: sequential = `headavatar batch --sequential` (the stages one after another, one
      process); ray = `headavatar batch` on a local Ray (fractional GPUs per job); pool = the same
      jobs on a local process pool of --workers processes (jobs spread over the visible GPUs) for
      when Ray cannot be carried.
      --mps: the modes run under CUDA MPS (a private nvidia-cuda-mps-control daemon started before
      anything touches CUDA, stopped at the end), so the workers' kernels run side by side instead
      of time-sliced; the baseline belongs in a run without it: --baseline SEQ.json takes the
      sequential figures of such a run (same machine) for the time ratio and the PSNR comparison.
  table FILE.json...
      the Markdown table of one or more result files (e.g. modes measured in separate calls).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------------- prepare
def prepare(subjects: list[str], out: str, max_frames: int | None) -> None:
    import numpy as np

    from headavatar.pipeline.stages import link_subject
    from headavatar.subjects.format import Subject, default_split
    from headavatar.utils.io import write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for src in map(Path, subjects):
        subj = Subject.open(src)
        dst = out / src.name
        if dst.exists():
            shutil.rmtree(dst)
        n = subj.num_frames if not max_frames else min(max_frames, subj.num_frames)
        if n < subj.num_frames and subj.chunked:  # whole chunks only: the first n frames, n a multiple of the chunk length
            cf = int(subj.meta["storage"]["chunk_frames"])
            n = max(cf, n // cf * cf)
        if n == subj.num_frames:
            link_subject(src, dst)
        elif subj.chunked:
            (dst / "chunks").mkdir(parents=True, exist_ok=True)
            for start in range(0, n, cf):
                for kind in ("rgb", "masks"):
                    shutil.copy2(src / "chunks" / f"{start:06d}_{kind}.mkv", dst / "chunks" / f"{start:06d}_{kind}.mkv")
        else:
            for i in range(n):
                for p in (subj.frame_path(i), subj.alpha_path(i), subj.parsing_path(i)):
                    if p.is_file():
                        (dst / p.parent.name).mkdir(parents=True, exist_ok=True)
                        shutil.copy2(p, dst / p.parent.name / p.name)
        if n < subj.num_frames:
            subj.tracking.subset(list(range(n))).save(dst / "tracking.npz")
            meta = dict(subj.meta, num_frames=n, split=default_split(n, valid=np.asarray(subj.tracking.valid[:n])))
            write_json(dst / "subject.json", meta)  # last: the subject is complete once it is there
        Subject.open(dst)
        size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
        print(f"{dst}: {n} frames, {size / 2**20:.1f} MiB")


# -------------------------------------------------------------------------------- pack-ray
# each is installed there only when the image lacks it (protobuf and packaging usually come with it)
RAY_DEPS = ["click", "filelock", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "attrs", "msgpack", "pyyaml",
            "requests", "idna", "urllib3", "certifi", "charset-normalizer", "protobuf", "packaging"]
_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]


def pack_ray(out: str, version: str | None, wheel: str | None = None) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plat = [a for p in _PLATFORMS for a in ("--platform", p)]
    base = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", *plat]
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:  # else a cp312 Ray wheel downloaded before
            subprocess.run([*base, "-d", tmp, f"ray=={version}" if version else "ray"], check=True)
        wheel = Path(wheel) if wheel else next(Path(tmp).glob("ray-*.whl"))
        print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB (over the 64 MiB carry limit)")
        ex = Path(tmp) / "x"
        subprocess.run(["unzip", "-q", str(wheel), "-d", str(ex)], check=True)
        shutil.rmtree(ex / "ray" / "jars", ignore_errors=True)  # the Java worker: not used from Python
        for m in (ex / "ray" / "dashboard").rglob("*.map"):
            m.unlink()
        name = wheel.name.split("-")[1]
        pack = out / f"ray-{name}-stripped.tar.xz"
        subprocess.run(f"tar -C {ex} -cf - . | xz -T0 -6 > {pack}", shell=True, check=True)
        print(f"{pack}: {pack.stat().st_size / 2**20:.1f} MiB")
    subprocess.run([*base, "-d", str(out), *RAY_DEPS], check=True)
    deps = sum(p.stat().st_size for p in out.glob("*.whl") if not p.name.startswith("gsplat"))
    print(f"dependency wheels: {deps / 2**20:.1f} MiB")


def ensure_ray(pack_dir: Path | None) -> bool:
    """Import Ray, unpacking a carried pack (pack-ray) into /tmp/site first when it is missing."""
    try:
        import ray  # noqa: F401

        return True
    except ImportError:
        pass
    packs = sorted(pack_dir.glob("ray-*-stripped.tar.xz")) if pack_dir and pack_dir.is_dir() else []
    if not packs:
        return False
    site = Path("/tmp/site")
    site.mkdir(parents=True, exist_ok=True)
    if not (site / "ray").is_dir():
        with tarfile.open(packs[-1]) as t:
            try:
                t.extractall(site, filter="data")
            except TypeError:  # a Python without extraction filters
                t.extractall(site)
    missing = []
    for whl in sorted(pack_dir.glob("*.whl")):
        mod = {"pyyaml": "yaml", "rpds_py": "rpds", "protobuf": "google.protobuf"}
        key = whl.name.split("-")[0].lower()
        if key == "gsplat":
            continue
        if subprocess.run([sys.executable, "-c", f"import {mod.get(key, key)}"], capture_output=True).returncode != 0:
            missing.append(str(whl))
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(site), *missing], check=True)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"  # Ray's workers too
    import ray  # noqa: F401

    return True


# ------------------------------------------------------------------------------------- run
class GpuSampler:
    """nvidia-smi every 0.5 s: utilisation (%) and memory used (MiB) per GPU."""

    def __init__(self):
        self.samples: dict[int, list[tuple[float, float]]] = {}
        self.proc = None
        self.thread = None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "500"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                i, u, m = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.setdefault(int(i), []).append((u, m))

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.thread.join(timeout=2)

    def summary(self) -> dict:
        return {str(i): {"mean_util_pct": round(sum(u for u, _ in s) / len(s), 1), "busy_frac": round(sum(u > 0 for u, _ in s) / len(s), 3),
                         "max_mem_mib": max(m for _, m in s), "samples": len(s)} for i, s in sorted(self.samples.items()) if s}


class Mps:
    """A private CUDA MPS control daemon for this run (pipe and log folders under ``work``).

    Started before this process or its workers create a CUDA context: every context made while it
    runs, here and in spawned workers or Ray's (they inherit the environment), is an MPS client."""

    def __init__(self, work: Path):
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(work / "mps_pipe"), "CUDA_MPS_LOG_DIRECTORY": str(work / "mps_log")}
        self.exe = None

    def __enter__(self):
        self.exe = shutil.which("nvidia-cuda-mps-control")
        if self.exe is None:
            raise SystemExit("--mps: nvidia-cuda-mps-control is not on PATH (it comes with the NVIDIA driver)")
        for d in self.env.values():
            Path(d).mkdir(parents=True, exist_ok=True)
        os.environ.update(self.env)
        subprocess.run([self.exe, "-d"], check=True, env=os.environ)
        print(f"MPS control daemon started (pipe {self.env['CUDA_MPS_PIPE_DIRECTORY']})", flush=True)
        return self

    def __exit__(self, *exc):
        if self.exe is not None:
            subprocess.run([self.exe], input="quit\n", text=True, env=os.environ, check=False)
            time.sleep(1)  # the daemon ends asynchronously; its server goes with it
            for k in self.env:
                os.environ.pop(k, None)


def make_inputs(subject_dir: Path, jobs: int, work: Path) -> list[Path]:
    from headavatar.pipeline.stages import link_subject

    srcs = sorted(p for p in subject_dir.iterdir() if (p / "subject.json").is_file())
    if not srcs:
        raise SystemExit(f"no subjects in {subject_dir}")
    inputs = []
    for k in range(jobs):
        src = srcs[k % len(srcs)]
        dst = work / "inputs" / f"{src.name}__{k:02d}"
        if not (dst / "subject.json").is_file():
            link_subject(src, dst)
        inputs.append(dst)
    return inputs


def run_pool(inputs, out: Path, workers: int, common: dict) -> dict:
    """The jobs on a local process pool (spawned processes; job k on GPU k % visible GPUs)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    import torch

    from headavatar.pipeline.batch import collect, make_jobs, run_job, write_summary

    jobs = make_jobs(inputs, out, **common)
    ngpu = torch.cuda.device_count()
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // workers)
    results = []
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        futs = []
        for k, job in enumerate(jobs):
            job.threads = threads
            dev = f"cuda:{k % ngpu}" if ngpu else "cpu"
            futs.append(ex.submit(run_job, job, device=dev))
        for f in cf.as_completed(futs):
            results.append(f.result())
    rows = collect(out, [j.name for j in jobs])
    write_summary(out, rows, {"engine": "pool", "workers": workers})
    return {"rows": rows, "failed": [r["subject"] for r in rows if r["status"] != "done"], "info": {"engine": "pool", "workers": workers, "gpus": ngpu}}


def run(args) -> None:
    import contextlib

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    with Mps(work) if args.mps else contextlib.nullcontext():  # before anything below touches CUDA
        _run(args, work)


def _run(args, work: Path) -> None:
    import importlib.util

    from headavatar.config import parse_set
    from headavatar.pipeline.batch import batch

    missing = [m for m in ("numpy", "scipy", "PIL", "tqdm", "matplotlib", "imageio", "imageio_ffmpeg", "pytorch_msssim", "gsplat")
               if importlib.util.find_spec(m) is None]
    if missing:  # a bare GPU image: the report (matplotlib) or the eval video (imageio_ffmpeg) would be missing
        print(f"note: not installed here: {', '.join(missing)}", flush=True)
    inputs = make_inputs(Path(args.subjects), args.jobs, work)
    overrides = parse_set(args.set) or None
    common = dict(method=args.method, budget=args.budget, overrides=overrides)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv), "jobs": args.jobs,
              "subjects": sorted({p.name.split("__")[0] for p in inputs}), "budget": args.budget, "overrides": overrides,
              "commit": _git_commit(), "device": _gpu_names(), "cpus": os.cpu_count(), "mps": bool(args.mps), "modes": {}}
    if "ray" in modes and not ensure_ray(Path(args.ray_pack)):
        print("Ray is not installed and no pack-ray pack was carried: skipping the ray mode")
        modes.remove("ray")
    for mode in modes:
        out = work / mode
        if out.exists() and not args.keep:
            shutil.rmtree(out)
        print(f"=== {mode}: {args.jobs} jobs ({time.strftime('%T')})", flush=True)
        t0 = time.perf_counter()
        with GpuSampler() as gpu:
            if mode == "sequential":
                res = batch(inputs, out, engine="sequential", device=args.device, progress=False, **common)
            elif mode == "ray":
                res = batch(inputs, out, engine="ray", gpus_per_job=args.gpus_per_job, cpus_per_job=args.cpus_per_job,
                            num_gpus=args.num_gpus, progress=False, **common)
            elif mode == "pool":
                res = run_pool(inputs, out, args.workers, common)
            else:
                raise SystemExit(f"unknown mode {mode}")
        wall = time.perf_counter() - t0
        _free_gpu()  # the sequential mode trained in this process: give its cached memory back before the next mode
        done = [r for r in res["rows"] if r["status"] == "done"]
        result["modes"][mode] = {
            "wall_s": round(wall, 1), "done": len(done), "failed": res["failed"], "subjects_per_hour": round(3600 * len(done) / wall, 1),
            "engine": res["info"], "gpu": gpu.summary(),
            "per_subject": [{k: r[k] for k in ("subject", "status", "frames", "test_frames", "iterations", "psnr", "ssim", "train_s", "eval_s",
                                               "export_s", "report_s", "total_s", "error")} for r in res["rows"]],
        }
        print(f"{mode}: {wall:.1f} s, {len(done)}/{args.jobs} done", flush=True)
        _write(args.out, result)
    _compare(result, _baseline(args.baseline, result))
    _write(args.out, result)
    print(table([result]))


def _baseline(path: str | None, result: dict) -> dict | None:
    """The sequential mode of another result file (--baseline), checked to be the same job set."""
    if not path:
        return None
    base = json.loads(Path(path).read_text())
    seq = base.get("modes", {}).get("sequential")
    if seq is None:
        raise SystemExit(f"--baseline {path}: no sequential mode in it")
    if (base["jobs"], base["subjects"], base.get("overrides"), base["budget"]) != (result["jobs"], result["subjects"], result["overrides"], result["budget"]):
        raise SystemExit(f"--baseline {path}: not the same jobs (count, subjects, budget, --set) as this run")
    if base.get("device") != result["device"]:
        print(f"warning: the baseline ran on {base.get('device')}, this run on {result['device']}", flush=True)
    return dict(seq, source=str(path))


def _free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _compare(result: dict, baseline: dict | None = None) -> None:
    modes = result["modes"]
    seq = modes.get("sequential") or baseline
    if seq is None:
        return
    if "sequential" not in modes:
        result["baseline"] = {"source": baseline["source"], "wall_s": baseline["wall_s"]}
    base = {r["subject"]: r["psnr"] for r in seq["per_subject"]}
    for name, m in modes.items():
        if name == "sequential":
            continue
        diffs = [r["psnr"] - base[r["subject"]] for r in m["per_subject"] if r["psnr"] != "" and base.get(r["subject"]) not in (None, "")]
        m["vs_sequential"] = {"time_ratio": round(m["wall_s"] / seq["wall_s"], 3), "target_time_ratio": 0.5,
                              "psnr_diff_mean": round(sum(diffs) / len(diffs), 3) if diffs else None,
                              "psnr_diff_max_abs": round(max(map(abs, diffs)), 3) if diffs else None}


def table(results: list[dict]) -> str:
    lines = ["| mode | device | jobs | wall s | subjects/h | time vs sequential | held-out PSNR mean (min–max) "
             "| Δ PSNR vs sequential, max abs | GPU util mean % (per GPU) | GPU mem max MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for mode, m in res["modes"].items():
            ps = [r["psnr"] for r in m["per_subject"] if r["psnr"] != ""]
            vs = m.get("vs_sequential", {})
            g = m.get("gpu", {})
            lines.append(f"| {mode} | {', '.join(res.get('device') or ['cpu'])} | {res['jobs']} | {m['wall_s']} | {m['subjects_per_hour']} | "
                         f"{vs.get('time_ratio', '–')} | " + (f"{sum(ps) / len(ps):.2f} ({min(ps):.2f}–{max(ps):.2f})" if ps else "–") +
                         f" | {vs.get('psnr_diff_max_abs', '–')} | {' / '.join(str(v['mean_util_pct']) for v in g.values()) or '–'} | "
                         f"{' / '.join(str(int(v['max_mem_mib'])) for v in g.values()) or '–'} |")
    lines.append("")
    lines.append("| mode | subject | frames (held out) | iterations | PSNR | train s | eval s | export s | report s |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for res in results:
        for mode, m in res["modes"].items():
            for r in m["per_subject"]:
                lines.append(f"| {mode} | {r['subject']} | {r['frames']} ({r['test_frames']}) | {r['iterations']} | {r['psnr']} | {r['train_s']} | "
                             f"{r['eval_s']} | {r['export_s']} | {r['report_s']} |")
    return "\n".join(lines)


def _write(path, obj) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, p)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def _gpu_names() -> list[str]:
    try:
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("subjects", nargs="+")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--max-frames", type=int)
    k = sub.add_parser("pack-ray")
    k.add_argument("-o", "--out", default=".whl")
    k.add_argument("--version")
    k.add_argument("--wheel", help="a cp312 Ray wheel already downloaded")
    r = sub.add_parser("run")
    r.add_argument("--subjects", required=True, help="folder of prepared subjects")
    r.add_argument("--jobs", type=int, default=8)
    r.add_argument("--modes", default="sequential,ray")
    r.add_argument("--out", default="batch_scaling.json")
    r.add_argument("--work", default="/tmp/batch_scaling")
    r.add_argument("--method", default="flashavatar")
    r.add_argument("--budget", default="fast")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--device", default="auto", help="sequential mode")
    r.add_argument("--gpus-per-job", type=float, default=None)
    r.add_argument("--cpus-per-job", type=int, default=None)
    r.add_argument("--num-gpus", type=int, default=None, help="ray mode: GPUs the local Ray may use (default: all visible)")
    r.add_argument("--workers", type=int, default=4, help="pool mode: processes")
    r.add_argument("--ray-pack", default=".whl", help="folder with pack-ray's output, used when Ray is not installed")
    r.add_argument("--keep", action="store_true", help="keep earlier mode folders (resume instead of re-measure)")
    r.add_argument("--mps", action="store_true", help="run the modes under CUDA MPS (a private daemon for this run)")
    r.add_argument("--baseline", help="result JSON of a run with the sequential mode, for the time ratio of this one")
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.subjects, a.out, a.max_frames)
    elif a.cmd == "pack-ray":
        pack_ray(a.out, a.version, a.wheel)
    elif a.cmd == "run":
        run(a)
    else:
        print(table([json.loads(Path(f).read_text()) for f in a.files]))


if __name__ == "__main__":
    main()
