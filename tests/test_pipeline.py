"""`headavatar make` and `headavatar batch` (headavatar/pipeline/): resumable stages, failures that stay
with their subject, the Ray and the sequential engines, bad input.  Tiny subjects and trainings on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from headavatar.errors import UserError
from headavatar.pipeline.batch import batch
from headavatar.pipeline.layout import STAGES, Layout
from headavatar.pipeline.make import make

REPO = Path(__file__).resolve().parents[1]
# a training of a few seconds: small model, 64² frames, no held-out curve, no previews
TINY = {"iterations": 10, "uv_resolution": 32, "mlp_width": 64, "resolution": 64, "checkpoint_every": 5, "eval_every": 0,
        "preview_every": 0, "log_every": 5}
has_ray = importlib.util.find_spec("ray") is not None
can_track = importlib.util.find_spec("mediapipe") is not None and importlib.util.find_spec("av") is not None


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    from headavatar.subjects.synthetic import make_synthetic_subject

    root = tmp_path_factory.mktemp("pipe") / "synth"
    make_synthetic_subject(root, num_frames=16, resolution=64, seed=0, progress=False)
    return root


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    """Two tiny videos of the synthetic head (the procedural head model tracks them)."""
    from headavatar.subjects.format import Subject
    from headavatar.subjects.synthetic import make_synthetic_subject
    from headavatar.utils.video import write_video

    root = tmp_path_factory.mktemp("vids")
    out = []
    for seed, name in ((0, "alice"), (1, "bob")):
        make_synthetic_subject(root / f"s{seed}", num_frames=20, resolution=96, seed=seed, progress=False)
        s = Subject.open(root / f"s{seed}")
        write_video(root / f"{name}.mp4", [s.load_frame(i)["image"] for i in range(s.num_frames)], fps=10)
        out.append(root / f"{name}.mp4")
    return out


def _markers(out: Path) -> dict:
    return {s: Layout(out).read_marker(s) for s in STAGES}


def _make(subject, out, **kw):
    kw.setdefault("overrides", dict(TINY))
    return make(subject, out, device="cpu", progress=False, log=lambda line: None, **kw)


# ------------------------------------------------------------------------------------ make
def test_make_runs_every_stage_then_skips_them_and_the_folder_moves(subject, tmp_path, capsys):
    out = tmp_path / "m"
    res = make(subject, out, device="cpu", overrides=dict(TINY), progress=False)
    assert res["status"] == "done" and all(res["stages"][s]["ran"] for s in STAGES)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"held-out PSNR: {res['eval']['metrics']['psnr']:.2f} dB"
    for f in ("subject/subject.json", "run/run.json", "run/eval/metrics.json", "run/export/canonical.ply", "run/report.html", "thumbnail.jpg"):
        assert (out / f).stat().st_size > 0, f
    assert json.loads((out / "run" / "run.json").read_text())["subject"] == "../subject"  # no absolute path in the run
    assert (out / "run" / "eval" / "metrics.json").read_text().count(str(tmp_path)) == 0
    assert "Pipeline" in (out / "run" / "report.html").read_text()
    first = _markers(out)
    assert first["train"]["outputs"]["step"] == TINY["iterations"]

    # moved to another place (as to another machine): everything is still complete; nothing reruns
    moved = tmp_path / "elsewhere" / "m2"
    moved.parent.mkdir()
    shutil.move(str(out), moved)
    again = make(None, moved, device="cpu", progress=False, log=lambda line: None)
    assert not any(again["stages"][s]["ran"] for s in STAGES)
    assert {s: m["id"] for s, m in _markers(moved).items()} == {s: m["id"] for s, m in first.items()}
    assert again["eval"]["metrics"]["psnr"] == res["eval"]["metrics"]["psnr"]

    # a damaged output makes its stage (and only the stages after it) run again
    (moved / "run" / "export" / "canonical.ply").write_bytes(b"truncated")
    third = _make(subject, moved)
    assert [s for s in STAGES if third["stages"][s]["ran"]] == ["export", "report"]


def test_make_resumes_after_an_interruption_at_each_stage(subject, tmp_path):
    """Interrupted as each stage starts, then just after each stage finished: a re-run never redoes a finished stage."""
    out = tmp_path / "m"
    ids: dict[str, str] = {}
    for stop in STAGES:
        for event in ("start", "done"):
            def hook(ev, stage, stop=stop, event=event):
                if (ev, stage) == (event, stop):
                    raise KeyboardInterrupt(f"simulated kill at {event} of {stop}")

            with pytest.raises(KeyboardInterrupt):
                _make(subject, out, hooks=hook)
            done = STAGES[: STAGES.index(stop) + (event == "done")]
            markers = _markers(out)
            assert [s for s in STAGES if markers[s]] == list(done), (stop, event)
            for s in done:  # finished stages keep their marker: they were not redone
                ids.setdefault(s, markers[s]["id"])
                assert markers[s]["id"] == ids[s], (s, stop, event)
    res = _make(subject, out)
    assert res["status"] == "done" and not any(res["stages"][s]["ran"] for s in STAGES)


def test_make_continues_an_interrupted_training_from_its_checkpoint(subject, tmp_path, monkeypatch):
    from headavatar.methods.run import RunDir

    out = tmp_path / "m"
    real_save = RunDir.save_checkpoint

    def save_then_die(self, step, state, keep=2):
        real_save(self, step, state, keep)
        raise RuntimeError(f"simulated kill after the checkpoint of step {step}")

    monkeypatch.setattr(RunDir, "save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="step 5"):
        _make(subject, out)
    monkeypatch.setattr(RunDir, "save_checkpoint", real_save)
    assert _markers(out)["track"] and not _markers(out)["train"]
    track_id = _markers(out)["track"]["id"]
    lines: list[str] = []
    res = make(subject, out, device="cpu", overrides=dict(TINY), progress=False, log=lines.append)
    assert res["status"] == "done" and not res["stages"]["track"]["ran"] and res["stages"]["train"]["ran"]
    assert any("continuing the interrupted training from iteration 5" in ln for ln in lines)
    assert _markers(out)["track"]["id"] == track_id and res["train"]["step"] == TINY["iterations"]
    steps = [r["step"] for r in RunDir(out / "run").read_curves()]
    assert steps == sorted(set(steps)) and steps[-1] == TINY["iterations"]  # the curve goes on, not over again


def test_make_interrupted_inside_a_stage_does_not_take_its_partial_outputs(subject, tmp_path, monkeypatch):
    """Killed half-way through copying the subject, and in eval after metrics.json but before its video."""
    import headavatar.methods.evaluate as evaluate
    import headavatar.pipeline.stages as stages

    out = tmp_path / "m"
    real_copy, copied = stages._link_or_copy, []

    def copy_then_die(src, dst):
        if len(copied) == 10:
            raise KeyboardInterrupt("simulated kill while copying the subject")
        copied.append(dst)
        real_copy(src, dst)

    monkeypatch.setattr(stages, "_link_or_copy", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        _make(subject, out)
    assert (out / "subject").is_dir() and not (out / "subject" / "subject.json").exists() and not _markers(out)["track"]
    monkeypatch.setattr(stages, "_link_or_copy", real_copy)

    def no_video(*a, **k):
        raise KeyboardInterrupt("simulated kill while writing the eval video")

    monkeypatch.setattr(evaluate, "write_video", no_video)
    with pytest.raises(KeyboardInterrupt):
        _make(subject, out)
    assert (out / "run" / "eval" / "metrics.json").is_file() and not _markers(out)["eval"]  # written, but not complete
    monkeypatch.undo()
    res = _make(subject, out)
    assert [s for s in STAGES if res["stages"][s]["ran"]] == ["eval", "export", "report"]
    assert (out / "run" / "eval" / "side_by_side.mp4").is_file()


def test_make_killed_for_real_during_training_resumes(subject, tmp_path):
    """SIGKILL of the `headavatar make` process once training has written a checkpoint."""
    out = tmp_path / "m"
    sets = {**TINY, "iterations": 60}
    cmd = [sys.executable, "-m", "headavatar.cli.main", "make", str(subject), "-o", str(out), "--device", "cpu", "--quiet"]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((out / "run" / "checkpoints").glob("ckpt_*.pt")):
            assert proc.poll() is None, "make ended before it was killed"
            time.sleep(0.2)
        assert list((out / "run" / "checkpoints").glob("ckpt_*.pt")), "no checkpoint within 2 minutes"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    from headavatar.methods.run import RunDir

    killed_at = RunDir(out / "run").checkpoints()[-1][0]
    assert killed_at < 60 and _markers(out)["track"] and not _markers(out)["train"]
    lines: list[str] = []
    res = make(None, out, device="cpu", progress=False, log=lines.append, until="train")
    assert res["stages"]["track"]["ran"] is False and any(f"from iteration {killed_at}" in ln for ln in lines)
    assert res["train"]["step"] == 60


@pytest.mark.skipif(not can_track, reason="tracking needs mediapipe and PyAV (pip install 'headavatar[track]')")
def test_make_tracks_into_compact_storage_and_keeps_that_choice(videos, tmp_path):
    """--storage compact: the tracked subject holds video chunks and no per-frame files, training and
    evaluation read it, and a continued make (no --storage) keeps the choice recorded in make.json."""
    from headavatar.subjects.format import Subject

    out = tmp_path / "m"
    make(videos[0], out, head_model="procedural", size=64, storage="compact", overrides=dict(TINY), until="track", device="cpu",
         progress=False, log=lambda line: None)
    subj = Subject.open(out / "subject")
    assert subj.chunked and list((out / "subject" / "chunks").glob("*_rgb.mkv"))
    assert not (out / "subject" / "frames").exists()
    assert json.loads((out / "make.json").read_text())["storage"] == "compact"
    make(None, out, until="eval", device="cpu", progress=False, log=lambda line: None)
    assert json.loads((out / "make.json").read_text())["storage"] == "compact"
    assert json.loads((out / "run" / "eval" / "metrics.json").read_text())["metrics"]["mean"]["psnr"] > 10
    with pytest.raises(UserError, match="storage must be one of frames, compact"):
        make(videos[0], tmp_path / "m2", storage="zip", device="cpu", progress=False)


def test_make_refuses_bad_input_before_any_work(subject, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="does not exist"):
        _make(tmp_path / "missing.mp4", tmp_path / "o1")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="neither a video"):
        _make(tmp_path / "notes.txt", tmp_path / "o2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a tracked subject"):
        _make(tmp_path / "empty", tmp_path / "o3")
    with pytest.raises(UserError, match="unknown method"):
        _make(subject, tmp_path / "o4", method="nerf")
    with pytest.raises(UserError, match="budget"):
        _make(subject, tmp_path / "o5", budget="soon")
    with pytest.raises(UserError, match="FLARE trains for a fixed number"):
        _make(subject, tmp_path / "o6", method="flare", budget="60", overrides=None)
    with pytest.raises(UserError, match="unknown option"):
        _make(subject, tmp_path / "o7", overrides={"itterations": 3})
    with pytest.raises(UserError, match="needs an input"):
        _make(None, tmp_path / "o8")
    (tmp_path / "o9").mkdir()
    (tmp_path / "o9" / "precious.txt").write_text("mine")
    with pytest.raises(UserError, match="not a 'headavatar make' folder"):
        _make(subject, tmp_path / "o9")
    assert time.perf_counter() - t0 < 30
    for o in ("o1", "o2", "o3", "o4", "o5", "o6", "o7"):
        assert not (tmp_path / o / "stages").exists()


def test_make_refuses_other_options_on_an_existing_folder(subject, tmp_path):
    out = tmp_path / "m"
    _make(subject, out, until="track")
    with pytest.raises(UserError, match="budget fast .now best."):
        _make(subject, out, budget="best")
    other = tmp_path / "other"
    shutil.copytree(subject, other)
    with pytest.raises(UserError, match=r"input synth \(now other\)"):
        _make(other, out)


def test_cli_make_and_batch_errors_are_one_line(tmp_path, capsys):
    from headavatar.cli.main import main as cli

    assert cli(["batch", "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "at least one input" in err
    assert cli(["make", str(tmp_path / "nope.mp4"), "-o", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err


# ----------------------------------------------------------------------------------- batch
def _corrupt_subject(root: Path, good: Path) -> Path:
    shutil.copytree(good, root)
    (root / "tracking.npz").write_bytes(b"not an npz")
    return root


def test_batch_sequential_finishes_the_others_and_reports_the_bad_one(subject, tmp_path, monkeypatch):
    import headavatar.pipeline.batch as B

    monkeypatch.setattr(B, "_ray_installed", lambda: False)
    a, b = tmp_path / "in" / "a", tmp_path / "in" / "b"
    shutil.copytree(subject, a)
    shutil.copytree(subject, b)
    bad = _corrupt_subject(tmp_path / "in" / "broken", subject)
    said: list[str] = []
    res = batch([a, bad, b], tmp_path / "out", overrides=dict(TINY), device="cpu", progress=False, say=said.append)
    assert any("Ray is not installed" in s and "headavatar[scale]" in s for s in said)
    assert res["failed"] == ["broken"] and res["info"]["engine"] == "sequential"
    rows = {r["subject"]: r for r in res["rows"]}
    assert rows["a"]["status"] == rows["b"]["status"] == "done" and rows["broken"]["status"] == "failed"
    assert rows["broken"]["failed_stage"] == "track" and "tracking.npz" in rows["broken"]["error"]
    assert rows["a"]["psnr"] == rows["b"]["psnr"] != ""  # same subject, same seed
    csv_text = (tmp_path / "out" / "summary.csv").read_text()
    html = (tmp_path / "out" / "summary.html").read_text()
    assert csv_text.splitlines()[0].startswith("subject,status,failed_stage,error") and len(csv_text.splitlines()) == 4
    assert "a/thumbnail.jpg" in html and "failed at track" in html and "2 of 3 subjects done" in html
    assert (tmp_path / "out" / "a" / "thumbnail.jpg").is_file() and (tmp_path / "out" / "broken" / "error.json").is_file()
    ids = {s: m["id"] for s, m in _markers(tmp_path / "out" / "a").items()}

    # the subject mended, the same batch again: only it runs, the others are skipped
    shutil.rmtree(bad)
    shutil.copytree(subject, bad)
    res2 = batch([a, bad, b], tmp_path / "out", overrides=dict(TINY), device="cpu", progress=False, say=said.append)
    assert res2["failed"] == [] and not (tmp_path / "out" / "broken" / "error.json").exists()
    assert {s: m["id"] for s, m in _markers(tmp_path / "out" / "a").items()} == ids


def test_batch_refuses_bad_inputs_up_front(subject, tmp_path):
    with pytest.raises(UserError, match="at least one input"):
        batch([], tmp_path / "o", progress=False)
    with pytest.raises(UserError, match=r"2 of 3 inputs cannot be used: .*nope1.mp4 does not exist.*nope2 does not exist"):
        batch([subject, tmp_path / "nope1.mp4", tmp_path / "nope2"], tmp_path / "o", progress=False)
    twin = tmp_path / "x" / subject.name
    shutil.copytree(subject, twin)
    with pytest.raises(UserError, match="would both be written"):
        batch([subject, twin], tmp_path / "o", progress=False)
    with pytest.raises(UserError, match="cannot be combined with --sequential"):
        batch([subject], tmp_path / "o", address="127.0.0.1:1", engine="sequential", progress=False)
    assert not (tmp_path / "o").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not has_ray, reason="Ray is not installed (pip install 'headavatar[scale]')")
def test_batch_ray_address_that_does_not_answer_is_a_clear_error_in_bounded_time(subject, tmp_path):
    # nothing listens: refused at once
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="no Ray cluster answers at 127.0.0.1:.*ray start --head"):
        batch([subject], tmp_path / "o", address=f"127.0.0.1:{_free_port()}", progress=False)
    assert time.perf_counter() - t0 < 10
    # something listens but is not Ray (Ray alone would retry for minutes): given up after the timeout
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        conns = []
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass
        for c in conns:
            c.close()

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(UserError, match="did not answer as a Ray cluster within 4 s|could not join the Ray cluster"):
            batch([subject], tmp_path / "o", address=f"127.0.0.1:{srv.getsockname()[1]}", connect_timeout=4, progress=False)
        assert time.perf_counter() - t0 < 20
    finally:
        stop.set()
        th.join()
        srv.close()


@pytest.mark.slow
@pytest.mark.skipif(not has_ray, reason="Ray is not installed (pip install 'headavatar[scale]')")
@pytest.mark.skipif(not can_track, reason="tracking needs mediapipe and PyAV (the [track] extra)")
def test_batch_on_local_ray_matches_the_sequential_run(videos, tmp_path):
    """Two tiny synthetic videos and a corrupt one: tracked on CPU tasks, trained on others, the bad one
    reported; the folders equal those of the run without Ray, file for file, with the same held-out figures."""
    bad = tmp_path / "corrupt.mp4"
    # Fixed bytes: random noise is sometimes taken for an audio format (no video stream), a different path.
    bad.write_bytes(random.Random(7).randbytes(4000))
    inputs = [*videos, bad]
    kw = dict(head_model="procedural", size=64, overrides=dict(TINY), progress=False, say=lambda s: None)
    ray_res = batch(inputs, tmp_path / "ray", engine="ray", num_cpus=2, cpus_per_job=1, gpus_per_job=0,
                    ray_options={"object_store_memory": 80 * 1024**2}, **kw)
    seq_res = batch(inputs, tmp_path / "seq", engine="sequential", device="cpu", **kw)
    assert ray_res["info"]["engine"] == "ray" and seq_res["info"]["engine"] == "sequential"
    assert ray_res["failed"] == seq_res["failed"] == ["corrupt"]
    assert "not a readable video" in {r["subject"]: r for r in ray_res["rows"]}["corrupt"]["error"]

    def files(root: Path) -> list[str]:
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    assert files(tmp_path / "ray") == files(tmp_path / "seq")
    for name in ("alice", "bob"):
        a = json.loads((tmp_path / "ray" / name / "run" / "eval" / "metrics.json").read_text())["metrics"]["mean"]
        b = json.loads((tmp_path / "seq" / name / "run" / "eval" / "metrics.json").read_text())["metrics"]["mean"]
        assert a["psnr"] == pytest.approx(b["psnr"], abs=0.05), name
        assert json.loads((tmp_path / "ray" / name / "stages" / "track.json").read_text())["device"] == "cpu"


@pytest.mark.slow
@pytest.mark.skipif(not has_ray, reason="Ray is not installed (pip install 'headavatar[scale]')")
def test_batch_gpu_shares_run_on_a_pool_of_long_lived_workers(subject, tmp_path):
    """With GPU shares, the stages after tracking go to long-lived Ray workers: one worker process
    takes subject after subject (its start is paid once), and the folders and figures equal the
    sequential run's.  The local cluster declares a GPU; --device cpu trains on the CPU under it."""
    import shutil

    inputs = []
    for name in ("ann", "ben", "cal"):
        shutil.copytree(subject, tmp_path / "in" / name)
        inputs.append(tmp_path / "in" / name)
    kw = dict(head_model="procedural", size=64, overrides=dict(TINY), device="cpu", progress=False, say=lambda s: None)
    res = batch(inputs, tmp_path / "ray", engine="ray", num_cpus=2, num_gpus=1, cpus_per_job=1, gpus_per_job=0.5,
                ray_options={"object_store_memory": 80 * 1024**2}, **kw)
    assert res["failed"] == [] and res["info"]["gpu_workers"] == 1  # 2 CPUs: one for tracking, one worker
    pids = {r["worker_pid"] for r in res["results"]}
    assert len(pids) == 1 and os.getpid() not in pids
    seq = batch(inputs, tmp_path / "seq", engine="sequential", **kw)
    assert seq["failed"] == []
    for name in ("ann", "ben", "cal"):
        a = json.loads((tmp_path / "ray" / name / "run" / "eval" / "metrics.json").read_text())["metrics"]["mean"]
        b = json.loads((tmp_path / "seq" / name / "run" / "eval" / "metrics.json").read_text())["metrics"]["mean"]
        assert a["psnr"] == pytest.approx(b["psnr"], abs=0.05), name


def test_gpu_worker_pool_size_leaves_cpus_for_tracking():
    from headavatar.pipeline.batch import _pool_size

    node = {"CPU": 16, "GPU": 1}
    assert _pool_size([node], 8, 0.25, 2, keep_cpus=2) == 4  # GPU-bound: four quarters
    assert _pool_size([node], 8, 0.125, 2, keep_cpus=2) == 7  # CPU-bound: two cores stay for tracking
    assert _pool_size([node], 8, 0.125, 2, keep_cpus=0) == 8
    assert _pool_size([node, {"CPU": 32}], 3, 0.25, 2, keep_cpus=2) == 3  # never more than the jobs
    assert _pool_size([{"CPU": 2, "GPU": 1}], 3, 0.5, 2, keep_cpus=2) == 1  # at least one


@pytest.mark.slow
@pytest.mark.skipif(not has_ray, reason="Ray is not installed (pip install 'headavatar[scale]')")
def test_batch_worker_killed_fails_its_subject_and_is_replaced(subject, tmp_path):
    """SIGKILL of the GPU worker in the middle of a subject: that subject is failed (stage 'worker'),
    a fresh worker takes the rest, and they finish."""
    import re
    import shutil
    import signal
    import threading

    inputs = []
    for name in ("ann", "ben", "cal"):
        shutil.copytree(subject, tmp_path / "in" / name)
        inputs.append(tmp_path / "in" / name)
    out = tmp_path / "ray"
    killed = {}

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for log in out.glob("*/make.log"):
                m = re.search(r"=== train, eval, export, report on .* \(pid (\d+)\)", log.read_text())
                if m:
                    os.kill(int(m.group(1)), signal.SIGKILL)
                    killed[log.parent.name] = int(m.group(1))
                    return
            time.sleep(0.02)

    th = threading.Thread(target=killer)
    th.start()
    kw = dict(head_model="procedural", size=64, overrides={**TINY, "iterations": 100, "checkpoint_every": 50}, device="cpu", progress=False, say=lambda s: None)
    res = batch(inputs, out, engine="ray", num_cpus=2, num_gpus=1, cpus_per_job=1, gpus_per_job=0.5,
                ray_options={"object_store_memory": 80 * 1024**2}, **kw)
    th.join()
    assert len(killed) == 1
    (victim,) = killed
    by = {r["name"]: r for r in res["results"]}
    assert by[victim]["status"] == "failed" and by[victim]["stage"] == "worker"
    row = {r["subject"]: r for r in res["rows"]}[victim]
    assert row["status"] == "failed" and row["failed_stage"] == "worker" and "worker process died" in row["error"]
    assert sorted(n for n, r in by.items() if r["status"] == "done") == sorted(set(by) - {victim})
    assert res["info"]["gpu_workers"] == 2  # the first and its replacement
    assert {r["worker_pid"] for r in res["results"] if r["status"] == "done"} != {killed[victim]}
