"""Ablation (issue 14): does keeping the MLP's condition inside the range of the training frames help
held-out frames?  Evaluates a trained FlashAvatar run on its held-out frames with the condition
vector as tracked ("off"), clamped per entry to the training frames' [min, max] ("clamp"), and
clamped to the training mean +- z standard deviations ("z2", "z1.5").  Writes eval/metrics_cond_MODE.json
and prints one JSON line per run.  Measurement code only: the trained model is not changed.

    python benchmarks/condition_range.py RUN [RUN ...] [--device cuda] [--modes off,clamp,z2]
"""

from __future__ import annotations

import argparse
import json

import torch


def clamp_fn(mode: str, cond_train: torch.Tensor):
    lo, hi = cond_train.min(0).values, cond_train.max(0).values
    mu, sd = cond_train.mean(0), cond_train.std(0)
    if mode == "off":
        return None
    if mode == "clamp":
        return lambda c: torch.maximum(torch.minimum(c, hi), lo)
    if mode.startswith("z"):
        z = float(mode[1:])
        return lambda c: torch.maximum(torch.minimum(c, mu + z * sd), mu - z * sd)
    raise SystemExit(f"unknown mode {mode}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="off,clamp,z2")
    ap.add_argument("--no-lpips", dest="lpips", action="store_false")
    args = ap.parse_args(argv)
    from headavatar.methods import load_avatar
    from headavatar.methods.evaluate import evaluate_run
    from headavatar.methods.flashavatar import model as fa_model

    orig = fa_model.FlashAvatarModel.frame_inputs
    for run in args.runs:
        av = load_avatar(run, args.device)
        trk, split = av.subject.tracking, av.subject.split
        with torch.no_grad():
            c_train, _ = av.model.frame_inputs(trk.params(split["train"], device=av.device))
            c_test, _ = av.model.frame_inputs(trk.params(split["test"], device=av.device))
        lo, hi = c_train.min(0).values, c_train.max(0).values
        row = {"run": run, "condition_dim": c_train.shape[1],
               "held_out_entries_outside_train_range": ((c_test < lo) | (c_test > hi)).float().mean().item()}
        del av
        for mode in args.modes.split(","):
            fn = clamp_fn(mode, c_train)

            def frame_inputs(self, params, grad=False, _fn=fn):
                c, v = orig(self, params, grad)
                return (c if _fn is None else _fn(c)), v

            fa_model.FlashAvatarModel.frame_inputs = frame_inputs
            try:
                r = evaluate_run(run, device=args.device, split="test", video=False, progress=False, lpips=args.lpips, protocol="flashavatar",
                                 out_name=f"metrics_cond_{mode}.json", announce=False)
            finally:
                fa_model.FlashAvatarModel.frame_inputs = orig
            row[mode] = r["metrics"]["mean"]
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
