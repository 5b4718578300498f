"""`headavatar demo` (the default method): settings sized for a 2-core CPU (docs/FLASHAVATAR.md, docs/DEMO.md)."""

from __future__ import annotations

from headavatar.methods.avatar import DemoSettings

# full demo and --quick smoke run.  400 frames: with the 150 tried first, held-out PSNR
# stalled about 4 dB under the training PSNR (too few expressions to generalise from).
# No shell Gaussians: the synthetic head's hair is painted on its mesh, so there is nothing off
# the surface to cover (with the default 2 layers the full demo gives 30.41 dB instead of 31.63).
DEMO_SETTINGS = {
    "full": DemoSettings(frames=400, image_size=128, overrides={"iterations": 1500, "uv_resolution": 64, "mlp_width": 128, "lpips_weight": 0.0,
                                                                "zero_init_deform": True, "sh_increase_every": 250, "shell_layers": 0,
                                                                "checkpoint_every": 250, "preview_every": 250, "log_every": 50, "eval_every": 250}),
    "quick": DemoSettings(frames=24, image_size=64, overrides={"iterations": 40, "uv_resolution": 32, "mlp_width": 64, "lpips_weight": 0.0,
                                                               "zero_init_deform": True, "shell_layers": 0,
                                                               "checkpoint_every": 20, "preview_every": 20, "log_every": 10, "eval_every": 20}),
}
