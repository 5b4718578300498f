"""What `headavatar demo --method flare` needs beyond training: settings sized for a 2-core CPU and
the relighting step (relit video under the built-in sky, intrinsic images, and the relit PSNR
against the synthetic subject's ground truth).

headavatar/demo.py owns the demo; it asks the method (FlareMethod.demo_settings / demo_extras), which
reads ``DEMO_SETTINGS`` and runs ``demo_relight_step``.
"""

from __future__ import annotations

from pathlib import Path

# (frames, image_size, overrides) for the full demo and --quick.  The subject must be the
# FlashAvatar demo's (frames, size, seed 0) so both methods are scored on the same held-out frames;
# the figures in docs/FLARE.md were measured on its 150-frame version (it now has 400).
# Smaller than the paper (docs/FLARE.md, "The demo's settings"): batch 2, 64-wide MLPs, 8 hash
# levels (finer ones are below a pixel at 128²), 2,048 vertices for the albedo term, no VGG term.
DEMO_SETTINGS = {
    "full": {
        "frames": 400,
        "image_size": 128,
        "overrides": {
            "iterations": 800, "stage2_iterations": 320, "batch_size": 2, "material_width": 64, "deformer_width": 64,
            "hash_levels": 8, "hash_log2_size": 16, "albedo_samples": 2048, "w_perceptual": 0.0, "lut_size": 64,
            "checkpoint_every": 150, "preview_every": 150, "log_every": 25, "eval_every": 150, "eval_frames": 8,
        },
    },
    "quick": {
        "frames": 24,
        "image_size": 64,
        "overrides": {
            "iterations": 30, "stage2_iterations": 10, "batch_size": 2, "material_width": 32, "deformer_width": 32,
            "hash_levels": 4, "hash_log2_size": 12, "albedo_samples": 1024, "w_perceptual": 0.0, "lut_size": 32, "remesh_backend": "builtin",
            "checkpoint_every": 10, "preview_every": 10, "log_every": 5, "eval_every": 10, "eval_frames": 4,
        },
    },
}


def demo_relight(run_dir, device="auto", quick: bool = False, progress: bool = True) -> dict:
    """Relight the demo run under the built-in procedural sky (turning once over the clip) and score it.

    Writes RUN_DIR/relit_sky.mp4, relit_sky_intrinsics.mp4, relit_sky_intrinsics/*.png and
    RUN_DIR/relight_eval/metrics.json; returns {"video", "intrinsics_video", "relit_psnr": {...}}.
    """
    from headavatar.methods.flare.relight import evaluate_relighting, relight_run

    run_dir = Path(run_dir)
    env_size = 32 if quick else 128
    out = relight_run(run_dir, "sky", run_dir / "relit_sky.mp4", device=device, env_size=env_size, spin=360.0, progress=progress)
    ev = evaluate_relighting(run_dir, "sky", device=device, frames="test", env_size=env_size, supersample=1 if quick else 2,
                             max_frames=4 if quick else None)
    return {"video": out["video"], "intrinsics_video": out.get("intrinsics_video"), "relit_psnr": ev["mean"], "albedo_scale": ev["albedo_scale"],
            "exposure_scale": ev["exposure_scale"]}


def demo_relight_step(run_dir, device="auto", quick: bool = False, log=print) -> list[tuple[str, str]]:
    """The demo's relighting step: runs ``demo_relight``, prints the relit PSNR, returns the report's section."""
    log("      relighting under the built-in procedural sky")
    rel = demo_relight(run_dir, device=device, quick=quick)
    rp = rel["relit_psnr"]
    log("      relit PSNR (dB): " + ", ".join(f"{name} {rp[key]:.2f}" for name, key in
                                           (("uncalibrated", "psnr_raw"), ("calibrated to the capture light", "psnr_calibrated"),
                                            ("albedo-aligned", "psnr_albedo_aligned")) if key in rp))
    rows = "".join(f"<tr><td>{k}</td><td>{v:.4f}</td></tr>" for k, v in rp.items() if isinstance(v, (int, float)))
    return [("Relighting (held-out frames under a new light, against ground truth)",
             f"<p>Video: <a href='relit_sky.mp4'>relit_sky.mp4</a>; intrinsic images: <a href='relit_sky_intrinsics.mp4'>relit_sky_intrinsics.mp4</a></p>"
             "<p>raw: the learnt materials as they are; calibrated: exposure calibrated against the subject's recorded capture light "
             "(what <code>headavatar relight</code> does); albedo_aligned: albedo scale fitted to the true albedo (docs/RELIGHTING.md).</p>"
             f"<table>{rows}</table>")]
