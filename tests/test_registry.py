"""The one registry style: registering, lazy built-ins, checks, and one-line errors that list the choices."""

import sys
import types

import pytest

from headavatar.errors import UserError
from headavatar.registry import Registry


def test_register_get_and_errors():
    reg = Registry("widget", hint="use --widget")
    reg.register("a", entry=1)

    @reg.register("b")
    def make_b():
        return 2

    class C:
        name = "c"

    assert reg.register(entry=C) is C  # a class may carry its own name
    assert reg.get("a") == 1 and reg.get("b") is make_b and reg.get("c") is C
    assert reg.available() == ["a", "b", "c"] and "b" in reg and "z" not in reg
    with pytest.raises(UserError, match=r"unknown widget 'z'; choose one of: a, b, c \(use --widget\)"):
        reg.get("z")
    with pytest.raises(TypeError, match="needs a name"):
        reg.register(entry=object())


def test_builtins_are_imported_on_first_use(monkeypatch):
    mod = types.ModuleType("headavatar_test_widget")
    reg = Registry("widget", builtins={"lazy": mod.__name__, "gone": "headavatar_test_no_such_module", "silent": "json"})

    def fake_import(name):
        assert name == mod.__name__
        reg.register("lazy", entry="the entry")
        sys.modules[name] = mod
        return mod

    monkeypatch.setattr("importlib.import_module", fake_import)
    assert reg.available() == ["gone", "lazy", "silent"]  # listed without importing
    assert reg.get("lazy") == "the entry"
    monkeypatch.undo()
    with pytest.raises(UserError, match="widget 'gone' is not available in this version"):
        reg.get("gone")
    with pytest.raises(RuntimeError, match="did not register"):
        reg.get("silent")


def test_checks_run_before_the_entry_is_used():
    state = {"ok": False}
    reg = Registry("backend", builtins={"fast": "headavatar_test_never_imported"},
                   checks={"fast": lambda: (state["ok"], "no accelerator")})
    with pytest.raises(UserError, match="backend 'fast' is unavailable: no accelerator"):
        reg.get("fast")  # refused before its module is imported
    reg.register("slow", entry="s", check=lambda: (True, "ok"))
    assert reg.get("slow") == "s"


def test_the_project_registries():
    from headavatar.headmodels import HEAD_MODELS, load_head_model
    from headavatar.methods import METHODS, get_method
    from headavatar.render.mesh import MESH_BACKENDS, get_mesh_backend

    assert {"flashavatar", "flare"} <= set(METHODS.available()) and get_method("flare").name == "flare"
    assert {"procedural", "flame", "ict"} <= set(HEAD_MODELS.available())
    assert {"torch", "nvdiffrast"} <= set(MESH_BACKENDS.available()) and get_mesh_backend("torch").name == "torch"
    with pytest.raises(UserError, match="unknown head model 'nope'; choose one of: flame, ict, procedural"):
        load_head_model("nope")
    with pytest.raises(UserError, match="unknown mesh backend 'gl'"):
        get_mesh_backend("gl")


def test_gaussian_backends_on_the_registry():
    import torch

    from headavatar.render.gaussians import GAUSSIAN_BACKENDS, RenderOutput, register_backend, render_gaussians, select_backend

    assert {"torch", "triton", "gsplat"} <= set(GAUSSIAN_BACKENDS.available())
    with pytest.raises(UserError, match="unknown Gaussian backend 'tpu'.*torch"):
        select_backend("tpu", "cpu")
    calls = []

    @register_backend("toy_flat")
    def _toy(means, quats, scales, opacities, colors, viewmats, Ks, width, height, *, sh_degree=None, backgrounds=None, **kw):
        calls.append(kw)
        B = means.shape[0]
        z = torch.zeros(B, height, width, 1)
        return RenderOutput(torch.full((B, height, width, 3), 0.5), z, z, torch.zeros(B, means.shape[1], dtype=torch.int32))

    try:
        out = render_gaussians(torch.zeros(1, 2, 3), torch.ones(1, 2, 4), torch.ones(1, 2, 3), torch.ones(1, 2), torch.ones(1, 2, 3),
                               torch.eye(4)[None], torch.eye(3)[None], 4, 3, backend="toy_flat", chunk=2)
        assert out.rgb.shape == (1, 3, 4, 3) and calls == [{"chunk": 2}]
    finally:
        GAUSSIAN_BACKENDS._entries.pop("toy_flat")


class ToyMeanAbs:
    """A metric protocol written outside the package (no PSNR, no LPIPS); tests register it for a while."""

    name = "toy_mae"
    lpips_nets = ()

    def describe(self, background=None):
        return "toy: mean absolute error"

    def check(self, background, exclude):
        pass

    def compute(self, p, g, m, exclude, background, models):
        return {"mae": (p - g).abs().flatten(1).mean(1)}


def test_metric_protocols_on_the_registry():
    import torch

    from headavatar.cli.main import build_parser
    from headavatar.metrics.protocols import METRIC_PROTOCOLS, PROTOCOLS, evaluate_frames

    assert set(PROTOCOLS) <= set(METRIC_PROTOCOLS.available())
    METRIC_PROTOCOLS.register(entry=ToyMeanAbs)

    try:
        pred, gt = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.25)
        rows = evaluate_frames(pred, gt, torch.ones(2, 4, 4), "toy_mae", lpips=False)
        assert [r["mae"] for r in rows] == [0.25, 0.25] and rows[0]["protocol"].startswith("toy: mean absolute error")
        # `eval --protocol` offers what the registry holds, the registered toy included
        for name in (*PROTOCOLS, "toy_mae"):
            assert build_parser().parse_args(["eval", "run", "--protocol", name]).protocol == name
        assert "toy_mae" in build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
    finally:
        METRIC_PROTOCOLS._entries.pop("toy_mae")
    with pytest.raises(UserError, match="unknown evaluation protocol 'toy_mae'"):
        evaluate_frames(pred, gt, torch.ones(2, 4, 4), "toy_mae", lpips=False)
    with pytest.raises(UserError, match="invalid choice: 'toy_mae'"):
        build_parser().parse_args(["eval", "run", "--protocol", "toy_mae"])


def test_eval_scores_a_registered_protocol(tmp_path_factory, capsys):
    """`headavatar eval --protocol NAME` scores a run under a protocol added through the registry alone."""
    import json
    import shutil

    from avatar_runs import shared_runs
    from headavatar.cli.main import main
    from headavatar.metrics.protocols import METRIC_PROTOCOLS

    runs = shared_runs(tmp_path_factory)
    run = tmp_path_factory.mktemp("toy_eval") / "fa"
    shutil.copytree(runs["fa"], run)  # shared runs are read-only

    METRIC_PROTOCOLS.register(entry=ToyMeanAbs)
    try:
        assert main(["eval", str(run), "--protocol", "toy_mae", "--no-video", "--no-lpips"]) == 0
    finally:
        METRIC_PROTOCOLS._entries.pop("toy_mae")
    res = json.loads((run / "eval" / "metrics_toy_mae.json").read_text())
    assert res["protocol"].startswith("toy: mean absolute error")
    assert 0 < res["metrics"]["mean"]["mae"] < 1 and set(res["per_frame"][0]) >= {"frame", "mae"}
    assert "protocol: toy: mean absolute error" in capsys.readouterr().out
