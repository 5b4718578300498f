"""Config conventions: Literal choices checked at build and override, one --set parser, readable field help."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from headavatar.config import apply_overrides, field_help, from_dict, parse_set, to_dict
from headavatar.errors import UserError
from headavatar.methods.avatar import DemoSettings
from headavatar.methods.flare.config import FlareConfig
from headavatar.methods.flashavatar.config import FlashAvatarConfig
from headavatar.pipeline.recipe import Budget, Recipe
from headavatar.tracking.fit import FitConfig
from headavatar.tracking.gaze import GazeConfig
from headavatar.tracking.landmarks import ValidityConfig

CONFIGS = (FlashAvatarConfig, FlareConfig, FitConfig, GazeConfig, ValidityConfig, Recipe, Budget, DemoSettings)


def test_parse_set():
    assert parse_set(["a=1", " b = x=y "]) == {"a": "1", "b": "x=y"}
    assert parse_set(None) == {}
    for bad in ("novalue", "=3"):
        with pytest.raises(UserError, match="KEY=VALUE"):
            parse_set([bad])


@pytest.mark.parametrize("cls", CONFIGS[:2])
def test_literal_fields_are_checked_everywhere(cls):
    lit = {n: typing.get_args(t) for n, t in typing.get_type_hints(cls).items() if typing.get_origin(t) is typing.Literal}
    assert lit, "the method config has choice fields"
    name, allowed = next(iter(lit.items()))
    for build in (lambda: cls(**{name: "nope"}), lambda: apply_overrides(cls(), [f"{name}=nope"]),
                  lambda: from_dict(cls, {**to_dict(cls()), name: "nope"})):
        with pytest.raises(UserError) as e:
            build()
        assert name in str(e.value) and all(str(a) in str(e.value) for a in allowed)
    assert getattr(apply_overrides(cls(), [f"{name}={allowed[-1]}"]), name) == allowed[-1]


def test_from_dict_maps_old_keys():
    d = {**to_dict(FlareConfig()), "old_knob": 3, "iters_old": 7}
    cfg = from_dict(FlareConfig, d, renamed={"old_knob": None, "iters_old": "iterations"})
    assert cfg.iterations == 7
    with pytest.raises(UserError, match="old_knob"):
        from_dict(FlareConfig, d)


@pytest.mark.parametrize("cls", CONFIGS)
def test_field_help_reads_the_comments(cls):
    helps = field_help(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    assert set(helps) <= set(names)
    assert set(helps) == set(names), f"fields without help: {sorted(set(names) - set(helps))}"
    assert all(h for h in helps.values())
    if cls is FlareConfig:
        assert "head-fixed" in helps["light_frame"]  # a comment block above the field


def test_options_command_lists_fields_with_help(capsys):
    from headavatar.cli.main import main

    assert main(["options", "flare"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(dataclasses.fields(FlareConfig))
    with pytest.raises(UserError, match="name is 'slow'; allowed values: fast, best, seconds"):
        Budget("slow")
    row = next(x for x in out if x.startswith("light_frame = "))
    assert "auto | world | head" in row and "head-fixed" in row
