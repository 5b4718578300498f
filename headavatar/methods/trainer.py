"""One training loop for every method: the skeleton both recipes used to write themselves.

The trainer owns seeding, resume (checkpoint, RNG, curves), the logging cadence,
previews, atomic checkpoints, saving on Ctrl-C, held-out evaluation, the time
limit and the divergence policy.  A method supplies a ``TrainingRecipe``: its
state, one optimisation step, and a few hooks (stage switches and remeshing are
the recipe's concern, done at the start of its ``step``).

Divergence policy (one for all methods).  At every log step the mean loss must
be finite and the recipe's own ``health`` check must pass (FLARE: the light has
not collapsed); a checkpoint is never written from a non-finite state.  On a
problem training goes back to the last checkpoint (or the start, with another
seed) with halved learning rates, at most ``max_recoveries`` times; past that it
stops with the recipe's ``diverged_message`` (a TrainingDiverged error, one line).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from headavatar.errors import TrainingDiverged, UserError
from headavatar.log import get_logger
from headavatar.methods.run import RunDir
from headavatar.utils.io import write_image
from headavatar.utils.video import to_uint8

_log = get_logger(__name__)

TIME_CHECK_EVERY = 10  # iterations between clock reads for max_seconds


@dataclass
class StepOutput:
    """What one step reports: the loss (detached), the training PSNR, and further per-step numbers
    averaged over the log interval into the curves (e.g. the loss terms), tensors or floats."""

    loss: torch.Tensor
    psnr: torch.Tensor
    extras: dict = field(default_factory=dict)


@dataclass
class LoopSettings:
    """The cadence fields of a method's config (preview_every, eval_every and max_seconds are optional: 0 = off)."""

    iterations: int
    seed: int
    log_every: int
    checkpoint_every: int
    preview_every: int = 0
    eval_every: int = 0
    max_seconds: float = 0.0

    @classmethod
    def of(cls, cfg) -> "LoopSettings":
        s = cls(cfg.iterations, cfg.seed, cfg.log_every, cfg.checkpoint_every, int(getattr(cfg, "preview_every", 0) or 0),
                int(getattr(cfg, "eval_every", 0) or 0), float(getattr(cfg, "max_seconds", 0.0) or 0.0))
        if s.iterations < 1:
            raise UserError("--iterations must be at least 1")
        for name in ("log_every", "checkpoint_every"):
            if getattr(s, name) < 1:
                raise UserError(f"{name} must be at least 1")
        return s


class TrainingRecipe(Protocol):
    """What a method gives the trainer.  Calls, in order: ``build``; then ``load_state_dict`` (resume)
    or ``run_info`` (fresh run); ``prepare``; then ``step`` once per iteration, with the hooks around it."""

    name: str  # the method's registry name (run.json, progress bar)
    cfg: object  # the method's config (LoopSettings.of reads the cadence from it)
    subject_dir: Path
    device: torch.device
    max_recoveries: int  # restarts with halved learning rates before giving up (0: stop at once)

    def build(self) -> None:
        """Model and optimisers, freshly initialised (the global RNG is seeded just before)."""

    def run_info(self) -> dict:
        """Extra run.json entries of a fresh run."""

    def load_state_dict(self, state: dict, lr_scale: float) -> None:
        """Restore a checkpoint (rebuilding what must be rebuilt); optimiser rates become the config's x ``lr_scale``."""

    def prepare(self, start: int, resumed: bool) -> None:
        """Data from step ``start`` and whatever the steps need (loss networks, held-out frames)."""

    def step(self, it: int) -> StepOutput:
        """One optimisation step (1-based); stage switches and remeshing happen here, before the step."""

    def state_dict(self) -> dict:
        """The method's part of a checkpoint (may write side files that must exist before it)."""

    def curve_row(self, it: int, means: dict, elapsed: float) -> dict:
        """One curves.jsonl row from the interval's means (``loss``, ``train_psnr``, the extras)."""

    def health(self, row: dict) -> str | None:
        """A method-specific problem in a logged row (None: fine); non-finite loss is checked by the trainer."""

    def finite(self) -> bool:
        """Whether the model's state is finite (checked before every checkpoint)."""

    def log_now(self, it: int) -> bool:
        """Extra log steps besides the cadence (e.g. the end of a stage)."""

    def evaluate_heldout(self) -> float | None:
        """Mean held-out PSNR for the curves, or None when there is no held-out sample."""

    def preview(self) -> torch.Tensor:
        """[H,W',3] in [0,1]: ground truth | render of the last step."""

    def reset(self, lr_scale: float) -> None:
        """A fresh model (recovery without a checkpoint; the RNG is re-seeded before)."""

    def restart_data(self, start: int) -> None:
        """The data stream again from step ``start`` (after a recovery)."""

    def diverged_message(self, it: int, problem: str) -> str:
        """The one-line error when training cannot go on."""


class _Sums:
    """Per-log-interval accumulators kept on the device (one host sync per log step)."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)
        self.psnr = torch.zeros((), device=device)
        self.extras: dict = {}
        self.n = 0

    def add(self, out: StepOutput) -> None:
        self.loss += out.loss
        self.psnr += out.psnr
        for k, v in out.extras.items():
            self.extras[k] = self.extras.get(k, 0.0) + (v.detach() if isinstance(v, torch.Tensor) else v)
        self.n += 1

    def means(self) -> dict:
        n = max(self.n, 1)
        return {"loss": (self.loss / n).item(), "train_psnr": (self.psnr / n).item(), **{k: float(v / n) for k, v in self.extras.items()}}


class Trainer:
    """Runs a ``TrainingRecipe`` into a run folder (``fit``)."""

    def __init__(self, recipe: TrainingRecipe, run: RunDir, progress: bool = True):
        self.recipe = recipe
        self.run = run
        self.progress = progress
        self.loop = LoopSettings.of(recipe.cfg)
        self.lr_scale = 1.0
        self.recoveries = 0

    def fit(self, resume: bool = False) -> None:
        # on the CPU, multithreaded scatter-adds (index_add in mesh and hash-grid backwards) sum in
        # a varying order: deterministic kernels make a CPU run repeat to the bit (FLARE's demo gave
        # 33.17 and 33.34 dB on the same code without); CUDA keeps its fast kernels
        previous = torch.are_deterministic_algorithms_enabled()
        if self.recipe.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        elif self.recipe.device.type == "cuda" and torch.cuda.is_initialized():
            # gpu_peak_gb is this run's, also in a process that trains several (batch's workers); in a
            # fresh process there is nothing to reset, and for "cuda:N" the call would fail before CUDA's init
            torch.cuda.reset_peak_memory_stats(self.recipe.device)
        try:
            self._fit(resume)
        finally:
            torch.use_deterministic_algorithms(previous)

    def _fit(self, resume: bool) -> None:
        r, run, loop = self.recipe, self.run, self.loop
        torch.manual_seed(loop.seed)
        np.random.seed(loop.seed)
        r.build()
        start, elapsed = 0, 0.0
        if resume:
            resumed = run.resume(loop.iterations, r.device, self.progress)
            if resumed is None:
                return
            start, state, elapsed = resumed
            self.lr_scale = float(state.get("lr_scale", 1.0))
            self.recoveries = int(state.get("recoveries", 0))
            r.load_state_dict(state, self.lr_scale)
        else:
            run.write_info(r.name, r.subject_dir, r.cfg, r.run_info())
        r.prepare(start, resume)
        if resume:
            # prepare may draw from the RNG (a loss network's initialisation before its weights load):
            # the steps continue from the checkpoint's state, as the uninterrupted run did
            torch.set_rng_state(state["rng"].cpu())
            if "cuda_rng" in state and r.device.type == "cuda":  # random draws on the GPU (e.g. jitter) too
                torch.cuda.set_rng_state(state["cuda_rng"].cpu(), r.device)
        self._loop(start, elapsed)

    # ------------------------------------------------------------------ the loop
    def _loop(self, start: int, elapsed: float) -> None:
        r, loop = self.recipe, self.loop
        pbar = tqdm(total=loop.iterations, initial=start, disable=not self.progress, desc=f"train {r.name}", unit="it", dynamic_ncols=True)
        t0 = time.perf_counter() - elapsed
        sums = _Sums(r.device)
        it = done = start  # done: the last step whose update finished (what Ctrl-C saves)
        try:
            while it < loop.iterations:
                it += 1
                sums.add(r.step(it))
                done = it
                pbar.update(1)

                out_of_time = loop.max_seconds > 0 and it % TIME_CHECK_EVERY == 0 and time.perf_counter() - t0 >= loop.max_seconds
                last = it == loop.iterations or out_of_time
                if it % loop.log_every == 0 or last or r.log_now(it):
                    row = r.curve_row(it, sums.means(), time.perf_counter() - t0)
                    problem = f"the loss became {row['loss']}" if not math.isfinite(row["loss"]) else r.health(row)
                    if problem:
                        it = done = self._recover(problem, it)
                        pbar.n = it
                        pbar.refresh()
                        sums = _Sums(r.device)
                        continue
                    if r.device.type == "cuda":  # what a user sizes the GPU by (the allocator's high-water mark, no sync)
                        row["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated(r.device) / 2**30, 3)
                    if loop.eval_every > 0 and (it % loop.eval_every == 0 or last):
                        heldout = r.evaluate_heldout()
                        if heldout is not None:
                            row["test_psnr"] = heldout
                    self.run.append_curve(row)
                    pbar.set_postfix(loss=f"{row['loss']:.4f}", psnr=f"{row['train_psnr']:.2f}")
                    sums = _Sums(r.device)
                if loop.preview_every and (it % loop.preview_every == 0 or last):
                    write_image(self.run.root / "previews" / f"{it:07d}.jpg", to_uint8(r.preview()))
                if it % loop.checkpoint_every == 0 or last:
                    # never checkpoint a diverged model: recovery goes back to checkpoints
                    if (sums.n and not bool(torch.isfinite(sums.loss))) or not r.finite():
                        it = done = self._recover("the loss or the model became non-finite", it)
                        pbar.n = it
                        pbar.refresh()
                        sums = _Sums(r.device)
                        continue
                    self._save(it, time.perf_counter() - t0)
                if out_of_time:
                    break
        except KeyboardInterrupt:
            # keep what was learned; the run resumes from here with --resume
            if done > start:
                self._save(done, time.perf_counter() - t0)
            raise
        finally:
            pbar.close()

    def _save(self, it: int, elapsed: float) -> None:
        state = {**self.recipe.state_dict(), "rng": torch.get_rng_state(), "step": it, "elapsed": elapsed,
                 "lr_scale": self.lr_scale, "recoveries": self.recoveries}
        if self.recipe.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.recipe.device)
        self.run.save_checkpoint(it, state)

    def _recover(self, problem: str, it: int) -> int:
        """Go back to the last checkpoint (or the start) with halved learning rates; returns the step resumed from."""
        r = self.recipe
        self.recoveries += 1
        if self.recoveries > r.max_recoveries:
            raise TrainingDiverged(r.diverged_message(it, problem))
        self.lr_scale *= 0.5
        _log.warning(f"{problem} at iteration {it}; restarting from the last checkpoint with learning rates x{self.lr_scale:g}")
        if self.run.checkpoints():
            step, state = self.run.load_checkpoint(map_location=r.device)
            r.load_state_dict(state, self.lr_scale)
        else:
            step = 0
            torch.manual_seed(self.loop.seed + self.recoveries)  # a different initialisation
            r.reset(self.lr_scale)
        r.restart_data(step)
        self.run.truncate_curves(step)  # rows logged past it are replaced by the rerun's (as a resume does)
        return step
