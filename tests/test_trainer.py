"""The one training loop (headavatar/methods/trainer.py) with a tiny recipe of its own, and the
resume of a checkpoint loaded onto an accelerator (the CPU RNG state must come back on the CPU)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from headavatar.errors import TrainingDiverged
from headavatar.methods.run import RunDir
from headavatar.methods.trainer import StepOutput, Trainer


@dataclass
class LineCfg:
    iterations: int = 12
    seed: int = 0
    log_every: int = 2
    checkpoint_every: int = 4
    preview_every: int = 0
    eval_every: int = 0
    max_seconds: float = 0.0


class LineRecipe:
    """Fit y = 3x with one weight; ``poison`` makes the loss NaN at the given iterations (first pass only)."""

    name = "line"

    def __init__(self, cfg, subject_dir: Path, max_recoveries: int = 0, poison=()):
        self.cfg, self.subject_dir, self.device, self.max_recoveries = cfg, subject_dir, torch.device("cpu"), max_recoveries
        self.poison, self.poisoned, self.calls = set(poison), set(), []

    def build(self):
        self.w = torch.nn.Parameter(torch.randn(()))
        self.opt = torch.optim.SGD([self.w], lr=0.1)

    def reset(self, lr_scale):
        self.build()
        self.opt.param_groups[0]["lr"] *= lr_scale

    def run_info(self):
        return {"toy": True}

    def load_state_dict(self, state, lr_scale):
        self.calls.append(("load", int(state["step"]), lr_scale))
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.opt.param_groups[0]["lr"] = 0.1 * lr_scale

    def state_dict(self):
        return {"w": self.w.detach().clone()}

    def prepare(self, start, resumed):
        torch.randn(3)  # as a loss network's initialisation draws from the RNG before its weights load
        self.calls.append(("prepare", start, resumed))

    def restart_data(self, start):
        self.calls.append(("restart", start))

    def step(self, it):
        x = torch.rand(8)
        loss = ((self.w * x - 3 * x) ** 2).mean()
        if it in self.poison and it not in self.poisoned:
            self.poisoned.add(it)
            loss = loss * float("nan")
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return StepOutput(loss.detach(), -10 * torch.log10(loss.detach().clamp_min(1e-12)), {"w": self.w.detach().clone()})

    def curve_row(self, it, means, elapsed):
        return {"step": it, **means, "time": elapsed}

    def health(self, row):
        return None

    def finite(self):
        return bool(torch.isfinite(self.w))

    def log_now(self, it):
        return False

    def evaluate_heldout(self):
        return None

    def preview(self):
        return torch.zeros(2, 4, 3)

    def diverged_message(self, it, problem):
        return f"line diverged at {it} ({problem})"


def _rows(run: Path):
    return [json.loads(x) for x in (run / "curves.jsonl").read_text().splitlines()]


def test_trainer_logs_checkpoints_and_resumes_like_one_run(tmp_path):
    whole = tmp_path / "whole"
    Trainer(LineRecipe(LineCfg(), tmp_path), RunDir(whole), progress=False).fit()
    assert [r["step"] for r in _rows(whole)] == [2, 4, 6, 8, 10, 12]
    assert [s for s, _ in RunDir(whole).checkpoints()] == [8, 12]
    assert json.loads((whole / "run.json").read_text())["toy"] is True

    part = tmp_path / "part"
    Trainer(LineRecipe(LineCfg(iterations=8), tmp_path), RunDir(part), progress=False).fit()
    r = LineRecipe(LineCfg(), tmp_path)
    Trainer(r, RunDir(part), progress=False).fit(resume=True)
    assert ("load", 8, 1.0) in r.calls and ("prepare", 8, True) in r.calls
    # the RNG of the data (torch.rand) came back with the checkpoint: the resumed run is the uninterrupted one
    assert _rows(part) == [dict(x, time=y["time"]) for x, y in zip(_rows(whole), _rows(part))]
    assert torch.equal(RunDir(part).load_checkpoint()[1]["w"], RunDir(whole).load_checkpoint()[1]["w"])
    # already trained: nothing to do, said once
    Trainer(LineRecipe(LineCfg(), tmp_path), RunDir(part), progress=False).fit(resume=True)
    assert RunDir(part).checkpoints()[-1][0] == 12


def test_divergence_restarts_with_halved_rates_then_stops(tmp_path):
    run = tmp_path / "nan"
    r = LineRecipe(LineCfg(), tmp_path, max_recoveries=1, poison={6})
    Trainer(r, RunDir(run), progress=False).fit()
    assert ("load", 4, 0.5) in r.calls and ("restart", 4) in r.calls
    state = RunDir(run).load_checkpoint()[1]
    assert state["recoveries"] == 1 and state["lr_scale"] == 0.5
    assert [x["step"] for x in _rows(run)] == [2, 4, 6, 8, 10, 12]

    # no recoveries allowed: the recipe's one-line message, and the checkpoints before it stay
    stop = tmp_path / "stop"
    with pytest.raises(TrainingDiverged, match=r"line diverged at 6 \(the loss became nan\)"):
        Trainer(LineRecipe(LineCfg(), tmp_path, poison={5}), RunDir(stop), progress=False).fit()
    assert [s for s, _ in RunDir(stop).checkpoints()] == [4]


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    class Interrupted(LineRecipe):
        def step(self, it):
            if it == 7:
                raise KeyboardInterrupt
            return super().step(it)

    run = tmp_path / "int"
    with pytest.raises(KeyboardInterrupt):
        Trainer(Interrupted(LineCfg(), tmp_path), RunDir(run), progress=False).fit()
    assert RunDir(run).checkpoints()[-1][0] == 6


class _OnAccelerator:
    """Stands for a CUDA tensor on a CPU-only machine: not a CPU ByteTensor (torch.set_rng_state refuses it),
    but ``.cpu()`` gives the saved state, as a tensor mapped onto a GPU does."""

    def __init__(self, t):
        self.t = t

    def cpu(self):
        return self.t


@pytest.mark.parametrize("asked", [12, 20])  # already done, and going on
def test_resume_restores_the_cpu_rng_from_a_checkpoint_mapped_to_a_device(tmp_path, monkeypatch, asked):
    run = tmp_path / "run"
    Trainer(LineRecipe(LineCfg(), tmp_path), RunDir(run), progress=False).fit()
    saved = RunDir(run).load_checkpoint()[1]["rng"]
    real = RunDir.load_checkpoint

    def on_device(self, map_location="cpu"):
        step, state = real(self, map_location)
        return step, {**state, "rng": _OnAccelerator(state["rng"])}

    monkeypatch.setattr(RunDir, "load_checkpoint", on_device)
    with pytest.raises(TypeError):  # what the unfixed resume did with it
        torch.set_rng_state(_OnAccelerator(saved))
    torch.manual_seed(123)
    out = RunDir(run).resume(asked, "cpu", progress=False)
    assert (out is None) == (asked == 12)
    assert torch.equal(torch.get_rng_state(), saved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a checkpoint loaded with map_location=cuda")
def test_resume_on_cuda(tmp_path):
    # the trainer's own resume on CUDA: the CPU and the CUDA generators come back from the GPU-mapped checkpoint
    class OnCuda(LineRecipe):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.device = torch.device("cuda")

        def step(self, it):
            torch.randn(4, device="cuda")  # a draw from the CUDA generator
            return super().step(it)

    whole, part = tmp_path / "whole", tmp_path / "part"
    Trainer(OnCuda(LineCfg(), tmp_path), RunDir(whole), progress=False).fit()
    Trainer(OnCuda(LineCfg(iterations=8), tmp_path), RunDir(part), progress=False).fit()
    assert "cuda_rng" in RunDir(part).load_checkpoint()[1]
    torch.cuda.manual_seed(99)
    Trainer(OnCuda(LineCfg(), tmp_path), RunDir(part), progress=False).fit(resume=True)
    assert torch.equal(torch.cuda.get_rng_state(), RunDir(whole).load_checkpoint()[1]["cuda_rng"])
    Trainer(OnCuda(LineCfg(), tmp_path), RunDir(part), progress=False).fit(resume=True)  # already done: no TypeError

    run = tmp_path / "run"
    Trainer(LineRecipe(LineCfg(), tmp_path), RunDir(run), progress=False).fit()
    saved = RunDir(run).load_checkpoint()[1]["rng"]
    for asked in (12, 16):
        torch.manual_seed(123)
        out = RunDir(run).resume(asked, torch.device("cuda"), progress=False)
        assert (out is None) == (asked == 12)
        assert torch.equal(torch.get_rng_state(), saved)


@pytest.mark.parametrize("poison_at", [3, 7])  # before the first checkpoint (a fresh start), after it (back to it)
def test_flashavatar_recipe_recovers_when_allowed(tmp_path, monkeypatch, poison_at):
    """FlashAvatar stops at the first divergence (max_recoveries = 0); its recipe still restarts
    correctly when a caller allows recoveries: fresh model or the checkpoint, learning rates halved."""
    import headavatar.methods.flashavatar.train as fa_train
    from headavatar.config import apply_overrides
    from headavatar.methods.flashavatar.config import FlashAvatarConfig
    from headavatar.subjects.synthetic import make_synthetic_subject

    subj = tmp_path / "s"
    make_synthetic_subject(subj, num_frames=6, resolution=32, progress=False)
    real, calls = fa_train.huber, {"n": 0}

    def once(pred, gt, delta):
        calls["n"] += 1
        out = real(pred, gt, delta)
        return out * float("nan") if calls["n"] == 2 * poison_at - 1 else out  # two huber terms per step

    monkeypatch.setattr(fa_train, "huber", once)
    cfg = apply_overrides(FlashAvatarConfig(), {"iterations": 8, "uv_resolution": 16, "mlp_width": 16, "resolution": 32, "lpips_weight": 0.0,
                                                "log_every": 1, "checkpoint_every": 5, "preview_every": 0, "device": "cpu"})
    run = RunDir(tmp_path / "run")
    recipe = fa_train.FlashAvatarRecipe(subj, run, cfg)
    recipe.max_recoveries = 1
    Trainer(recipe, run, progress=False).fit()
    state = run.load_checkpoint()[1]
    assert state["step"] == 8 and state["recoveries"] == 1 and state["lr_scale"] == 0.5
    assert [g["lr"] for g in recipe.opt.param_groups][0] == pytest.approx(0.5 * cfg.lr_mlp)
    assert [r["step"] for r in _rows(tmp_path / "run")] == list(range(1, 9))
