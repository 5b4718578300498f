"""benchmarks/real_video.py, the real-video protocol, on a tiny synthetic set on the CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("real_video", REPO / "benchmarks" / "real_video.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_protocol_on_tiny_synthetic_subjects(tmp_path):
    from headavatar.subjects.synthetic import make_synthetic_subject

    videos = tmp_path / "videos"
    videos.mkdir()
    subjects = tmp_path / "tracked"
    for k, stem in enumerate(("clip_a", "clip_b")):
        (videos / f"{stem}.mp4").write_bytes(b"")  # the subjects are reused: the videos are not read
        make_synthetic_subject(subjects / stem, num_frames=8, resolution=32, seed=k, progress=False)
    work = tmp_path / "work"
    args = [str(videos), "-o", str(work), "--subjects", str(subjects), "--iterations", "3", "--batch-size", "2", "--resolution", "32",
            "--device", "cpu", "--no-lpips", "--concurrent", "2", "--label", "tiny", "--set", "uv_resolution=16", "--set", "mlp_width=16"]
    rv = _module()
    assert rv.main(args) == 0
    res = json.loads((work / "results_tiny.json").read_text())
    assert [r["video"] for r in res["videos"]] == ["clip_a.mp4", "clip_b.mp4"]
    for r in res["videos"]:
        assert r["iterations"] == 3 and r["test_frames"] >= 1 and r["train_frames"] >= 1
        assert 0 < r["psnr"] < 60 and 0 < r["train_psnr"] < 60 and abs(r["gap_db"] - (r["train_psnr"] - r["psnr"])) < 1e-9
    assert abs(res["mean"]["psnr"] - sum(r["psnr"] for r in res["videos"]) / 2) < 1e-9
    assert "| **mean** |" in (work / "results_tiny.md").read_text()
    assert res["protocol"]["set"] == ["uv_resolution=16", "mlp_width=16"]
    # a finished video is not run again; an empty folder is a clear error
    mtime = (work / "runs" / "tiny" / "clip_a.json").stat().st_mtime
    assert rv.main(args) == 0 and (work / "runs" / "tiny" / "clip_a.json").stat().st_mtime == mtime
    (tmp_path / "empty").mkdir()
    assert rv.main([str(tmp_path / "empty"), "-o", str(work), "--no-lpips"]) == 2
    # no video folder at all (a GPU machine given only the tracked subjects): one job per subject
    # (and the second, separately labelled protocol: test-time refinement of the held-out tracking)
    # and two training seeds per video: each cell the mean over them, with their spread
    args2 = [str(tmp_path / "no_videos"), *args[1:3], "--subjects", str(subjects), *args[5:-6], "--label", "subj", *args[-4:], "--refine-tracking", "2",
             "--seeds", "2"]
    assert rv.main(args2) == 0
    res2 = json.loads((work / "results_subj.json").read_text())
    assert [r["video"] for r in res2["videos"]] == ["clip_a", "clip_b"]
    assert [(r["video"], r["seed"]) for r in res2["runs"]] == [("clip_a", 0), ("clip_a", 1), ("clip_b", 0), ("clip_b", 1)]
    for r in res2["videos"]:
        assert r["refined_steps"] == 2 and 0 < r["refined_psnr"] < 60 and r["psnr"] != r["refined_psnr"]
        own = [x for x in res2["runs"] if x["video"] == r["video"]]
        assert own[0]["psnr"] != own[1]["psnr"]  # the seeds differ
        assert r["seeds"] == 2 and abs(r["psnr"] - (own[0]["psnr"] + own[1]["psnr"]) / 2) < 1e-9
        assert abs(r["psnr_sd"] - abs(own[0]["psnr"] - own[1]["psnr"]) / 2 ** 0.5) < 1e-9
    assert (work / "runs" / "subj" / "clip_b.seed1" / "checkpoints").is_dir()
    md = (work / "results_subj.md").read_text()
    assert "over 2 training seeds" in md and f"{res2['videos'][0]['psnr']:.2f} ± {res2['videos'][0]['psnr_sd']:.2f}" in md
    assert md.index("| **mean** |") < md.index("Test-time refinement protocol (2 steps")  # fixed tracking first
    with pytest.raises(SystemExit):  # the seeds are the protocol's to set
        rv.parse([*args2, "--set", "seed=3"])


def test_progress_line_says_when_no_step_has_come(tmp_path):
    mod = _module()
    run = tmp_path / "run"
    assert mod.progress_line("clip", run, 125.4, 7000) == "clip: 125 s, no training step logged yet"  # no run folder yet
    run.mkdir()
    (run / "curves.jsonl").write_text(json.dumps({"step": 600, "train_psnr": 24.5}) + "\n" + '{"step": 7')  # the last line half written
    assert mod.progress_line("clip", run, 60.0, 7000) == "clip: 60 s, step 600/7000, train PSNR 24.50 dB"


def test_missing_lpips_weights_stop_the_protocol_before_any_work(tmp_path, monkeypatch, capsys):
    # the protocol reports LPIPS-VGG: without the weights it says so at once instead of after training
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "clip.mp4").write_bytes(b"")
    (tmp_path / "no_weights").mkdir()
    monkeypatch.setenv("HEADAVATAR_LPIPS_WEIGHTS", str(tmp_path / "no_weights"))
    work = tmp_path / "work"
    assert _module().main([str(tmp_path / "videos"), "-o", str(work)]) == 2
    err = capsys.readouterr().err
    assert "LPIPS cannot be scored" in err and "--no-lpips" in err and len(err.strip().splitlines()) == 1
    assert not work.exists()


def test_split_views_hold_out_as_many_frames_elsewhere(tmp_path):
    """benchmarks/split_views.py: the diagnostic views keep the tail's count, spread it, and open as subjects."""
    import numpy as np

    from headavatar.subjects.format import Subject
    from headavatar.subjects.synthetic import make_synthetic_subject

    spec = importlib.util.spec_from_file_location("split_views", REPO / "benchmarks" / "split_views.py")
    sv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sv)

    valid = np.ones(100, bool)
    valid[3] = False
    blocks = sv.split_for(100, 15, "blocks:4", valid)
    assert len(blocks["test"]) == 15 and 3 not in blocks["train"] + blocks["test"]
    assert not set(blocks["train"]) & set(blocks["test"])
    t = np.array(blocks["test"])
    runs = np.split(t, np.where(np.diff(t) > 1)[0] + 1)
    assert [len(r) for r in runs] == [4, 4, 4, 3] and runs[0][0] > 0 and runs[-1][-1] < 99  # evenly spread, none at the ends
    assert sv.split_for(100, 15, "tail", valid)["test"] == list(range(85, 100))
    assert sv.split_for(100, 15, "every:7", valid)["test"] == list(range(3 + 7, 100, 7))  # frame 3 is invalid
    with pytest.raises(SystemExit):
        sv.split_for(100, 15, "random", valid)

    src = tmp_path / "subj"
    make_synthetic_subject(src, num_frames=20, resolution=32, seed=0, progress=False)
    before = (src / "subject.json").read_text()
    info = sv.make_view(src, tmp_path / "views" / "subj", "blocks:2")
    view = Subject.open(tmp_path / "views" / "subj")
    orig = Subject.open(src)
    assert info["test"] == len(orig.split["test"]) == len(view.split["test"])
    assert view.split["test"] != orig.split["test"] and view.num_frames == orig.num_frames
    assert (src / "subject.json").read_text() == before  # the subject itself is untouched
    assert np.array_equal(view.tracking.valid, orig.tracking.valid)
