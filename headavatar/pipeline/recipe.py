"""Training settings chosen for the device found: the small CPU recipe or the paper's model on CUDA.

A *budget* says how long to train: ``fast`` (a quick avatar), ``best`` (the longer recipe) or a
number of seconds (FlashAvatar only: its recipe runs until the time is up).  A time budget is
wall-clock: several trainings sharing one GPU each get fewer iterations out of it, so `batch`
runs that are to be compared should use ``fast`` or ``best`` (fixed iteration counts).

Where the numbers come from (docs/BENCHMARKS.md, docs/SCALING.md):

* CPU: the demo's small FlashAvatar (UV 64, MLP width 128, 128² images, no LPIPS term), which
  reaches its held-out PSNR plateau in about 1,500 iterations on the synthetic subject; the
  FLARE demo's small networks (800 steps at 128²).
* CUDA, FlashAvatar: the paper's model at 512² (UV 128, MLP 6×256, SH 3).  ``fast`` is batch 8
  for 4,000 iterations: batch 8 is where the time-to-quality curve was measured on an H100
  (81–83 it/s, within 0.3 dB of the 150-s value by about 3,000 iterations), so about 50 s
  alone on one H100.  ``best`` is the paper's schedule: 150,000 iterations at batch 1, with the
  LPIPS term from iteration 15,000 when its weights are installed.
* CUDA, FLARE: the reference recipe at 512² (1,500 + 1,000 steps, batch 4, about 250 s on an
  H100); ``fast`` halves both stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from headavatar.config import check_choices
from headavatar.errors import UserError

BUDGETS = ("fast", "best")


@dataclass
class Budget:
    name: Literal["fast", "best", "seconds"]  # a preset, or a time limit given in seconds
    seconds: float = 0.0  # for name == "seconds"

    def __post_init__(self):
        check_choices(self, "budget")

    def __str__(self) -> str:
        return f"{self.seconds:g}s" if self.name == "seconds" else self.name


def parse_budget(text) -> Budget:
    """fast | best | a number of seconds (e.g. 300 or 300s)."""
    if isinstance(text, Budget):
        return text
    s = str(text).strip().lower()
    if s in BUDGETS:
        return Budget(s)
    try:
        sec = float(s[:-1] if s.endswith("s") else s)
    except ValueError:
        raise UserError(f"--budget must be fast, best or a number of seconds, got '{text}'") from None
    if not sec > 0:
        raise UserError(f"--budget in seconds must be positive, got '{text}'")
    return Budget("seconds", sec)


@dataclass
class Recipe:
    """What the train, eval and export stages use on one device."""

    method: str  # a registered method name
    device: str  # the device string handed to the library: cpu, cuda, cuda:N
    budget: str  # the budget as the user gave it (str(Budget)): fast, best or e.g. 300s
    overrides: dict  # training config overrides (iterations included)
    eval_batch: int  # frames per batch when scoring the held-out frames
    texture_size: int  # FLARE glb maps
    notes: list[str] = field(default_factory=list)  # why the recipe differs from the defaults, shown to the user

    def describe(self) -> str:
        o = self.overrides
        parts = [self.method, self.device, f"budget {self.budget}"]
        if o.get("resolution"):
            parts.append(f"{o['resolution']}²")
        if o.get("batch_size"):
            parts.append(f"batch {o['batch_size']}")
        if o.get("max_seconds"):
            parts.append(f"{o['max_seconds']:g} s")
        else:
            parts.append(f"{o.get('iterations')} iterations")
        return ", ".join(parts)


# ---------------------------------------------------------------------------- FlashAvatar
_FA_CPU = {"resolution": 128, "uv_resolution": 64, "mlp_width": 128, "lpips_weight": 0.0, "zero_init_deform": True,
           "sh_increase_every": 250, "checkpoint_every": 250, "preview_every": 250, "log_every": 50, "eval_every": 250}
_FA_CPU_ITERATIONS = {"fast": 500, "best": 1500}
_FA_CUDA = {"resolution": 512, "zero_init_deform": True, "checkpoint_every": 1000, "preview_every": 1000, "log_every": 100,
            "eval_every": 1000, "eval_frames": 16}
_FA_CUDA_BUDGET = {"fast": {"iterations": 4000, "batch_size": 8, "lpips_weight": 0.0},
                   "best": {"iterations": 150_000, "batch_size": 1, "checkpoint_every": 5000, "eval_every": 5000, "preview_every": 5000}}
_LONG = 10_000_000  # iterations under a time budget: the clock stops training first

# -------------------------------------------------------------------------------- FLARE
_FLARE_CUDA_BUDGET = {"fast": {"iterations": 1250, "stage2_iterations": 500}, "best": {"iterations": 2500, "stage2_iterations": 1000}}
_FLARE_CPU_ITERATIONS = {"fast": (400, 160), "best": (800, 320)}


def lpips_available() -> bool:
    """Whether the LPIPS weights (VGG and AlexNet) are installed; both the metric and FLARE's VGG term read them."""
    from headavatar.metrics.lpips import find_weights

    try:
        find_weights("vgg")
        find_weights("alex")
    except UserError:
        return False
    return True


def choose_recipe(method: str, device: str, budget: Budget | str, overrides: dict | None = None) -> Recipe:
    """Settings for ``method`` on ``device`` (already resolved: cpu / cuda[:N]) within ``budget``;
    ``overrides`` (the user's --set) are applied last."""
    budget = parse_budget(budget)
    cuda = str(device).startswith("cuda")
    notes: list[str] = []
    if method == "flashavatar":
        if cuda:
            o = {**_FA_CUDA, **(_FA_CUDA_BUDGET["fast" if budget.name == "seconds" else budget.name])}
            if budget.name == "best" and not lpips_available():
                o["lpips_weight"] = 0.0
                notes.append("LPIPS weights not installed: the LPIPS training term is off")
        else:
            o = {**_FA_CPU, "iterations": _FA_CPU_ITERATIONS.get(budget.name, 0)}
        if budget.name == "seconds":
            o.update(iterations=_LONG, max_seconds=budget.seconds, lpips_weight=0.0)
        eval_batch = 16 if cuda else 4
    elif method == "flare":
        if budget.name == "seconds":
            raise UserError("FLARE trains for a fixed number of steps: use --budget fast or best")
        if cuda:
            o = {"resolution": 512, **_FLARE_CUDA_BUDGET[budget.name]}
        else:
            from headavatar.methods.flare.demo import DEMO_SETTINGS

            it, it2 = _FLARE_CPU_ITERATIONS[budget.name]
            o = {**DEMO_SETTINGS["full"]["overrides"], "resolution": 128, "iterations": it, "stage2_iterations": it2}
        if not lpips_available():
            o["w_perceptual"] = 0.0
            notes.append("VGG weights (LPIPS) not installed: the perceptual term is off")
        eval_batch = 8 if cuda else 2
    else:
        raise UserError(f"no make recipe for method '{method}'; choose flashavatar or flare")
    o["device"] = str(device)
    o.update(overrides or {})
    return Recipe(method, str(device), str(budget), o, eval_batch, 1024 if cuda else 512, notes)
