"""`headavatar demo --quick`: the whole job end to end (subject, training, eval, video, export, report)."""

import json

from headavatar.cli.main import main as cli


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--quick", "-o", str(out), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("held-out PSNR: ") and lines[-1].endswith(" dB")
    run = out / "run"
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert abs(metrics["metrics"]["mean"]["psnr"] - float(lines[-1].split()[2])) < 0.01
    assert {"psnr", "ssim", "lpips_vgg", "lpips_alex"} <= set(metrics["metrics"]["mean"])
    for f in ("report.html", "render_all.mp4", "eval/side_by_side.mp4", "export/canonical.ply"):
        assert (run / f).stat().st_size > 0, f
    html = (run / "report.html").read_text()
    assert "Held-out metrics" in html and "Training curves" in html and "data:image/png;base64" in html and "canonical.ply" in html
    # a second run reuses the subject and the finished run instead of redoing them
    assert cli(["demo", "--quick", "-o", str(out), "--device", "cpu"]) == 0
    assert "reusing the synthetic subject" in capsys.readouterr().out
