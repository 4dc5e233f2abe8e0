"""Flags generated from the stage config dataclasses: each one reaches its field, and the
dataclass as read from its source (for a fast ``--help``) is the dataclass Python builds."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from latentaudit.cli import (
    _engine,
    attribute,
    build_parser,
    circuit,
    explain,
    finetune,
    monitor,
    sample,
    steer,
)
from latentaudit.cli._options import Config, config_fields

COMMANDS = {  # command line without options, its Config
    "attribute": (["attribute", "--model", "m", "--sae", "s", "--data", "d", "--out", "o"],
                  attribute.CONFIG),
    "explain": (["explain", "--from", "run"], explain.CONFIG),
    "circuit": (["circuit", "--from", "run", "--upstream-sae", "up"], circuit.CONFIG),
    "steer": (["steer"], steer.CONFIG),
    "sample": (["sample", "--model", "m", "--prompts", "p", "--out", "o"], sample.CONFIG),
    "engine": (["sample", "--model", "m", "--prompts", "p", "--out", "o"], _engine.CONFIG),
    "monitor": (["monitor", "evaluate", "--completions", "c", "--out", "o"], monitor.EVALUATE),
    "finetune": (["finetune", "--model", "m", "--data", "d", "--out", "o"], finetune.CONFIG),
}

SPECIAL = {  # [class.]field: (words after the flag, its value), where the rules cannot guess
    "methods": (["random,attribution"], ("random", "attribution")),
    "directions": (["toward"], ("toward",)),
    "strengths": (["1,2.5"], (1.0, 2.5)),
    "stop": (["a\\n", "b\\tc"], ("a\n", "b\tc")),
    "engine": (["ray"], "ray"),
    "EvalConfig.top_k": (["5", "7"], (5, 7)),
    "ray_address": (["host:1", "--engine", "ray"], "host:1"),
}
ALSO = {"ray_address": {"engine": "ray"}}
"""Fields another field's words set too."""


def other_value(cls: type, f: dataclasses.Field) -> tuple[list[str], object]:
    """Words after the flag and the value they stand for: never the field's default."""
    for name in (f"{cls.__name__}.{f.name}", f.name):
        if name in SPECIAL:
            return SPECIAL[name]
    kind, default = f.type.removesuffix(" | None"), f.default
    if "choices" in f.metadata:
        value = next(c for c in f.metadata["choices"] if c != default)
        return [value], value
    if kind == "int":
        value = (default or 1) + 1
        return [str(value)], value
    if kind == "float":
        value = 0.5 if default == 0 else default * 0.9 if default <= 1 else default * 2
        return [repr(value)], value
    assert kind == "str", f"add {f.name} to SPECIAL"
    return [f"x-{f.name}"], f"x-{f.name}"


def flag_words(f: dataclasses.Field) -> list[str]:
    name = f.name.replace("_", "-")
    return [f"--no-{name}" if f.default is True else f"--{name}"] if f.type == "bool" else \
        [f"--{name}"]


def real_class(config: Config):
    return getattr(importlib.import_module(config.module), config.name)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_generated_flag_reaches_its_field(command):
    base, config = COMMANDS[command]
    parser = build_parser()
    cls = real_class(config)
    assert config.build(parser.parse_args(base)) == cls()
    for f in dataclasses.fields(cls):
        words, value = ([], not f.default) if f.type == "bool" else other_value(cls, f)
        assert value != f.default
        got = config.build(parser.parse_args([*base, *flag_words(f), *words]))
        assert getattr(got, f.name) == value, f.name
        assert got == cls(**{f.name: value, **ALSO.get(f.name, {})}), f.name


@pytest.mark.parametrize("command", ["attribute", "explain", "steer", "sample"])
def test_batch_size_auto_is_zero(command):
    base, config = COMMANDS[command]
    assert config.build(build_parser().parse_args([*base, "--batch-size", "auto"])).batch_size == 0


@pytest.mark.parametrize("command", COMMANDS)
def test_the_fields_read_from_source_are_the_dataclass_fields(command):
    config = COMMANDS[command][1]
    read = config_fields(config.source, config.name)
    real = dataclasses.fields(real_class(config))
    assert list(read) == [f.name for f in real]
    for f in real:
        assert (read[f.name].annotation, read[f.name].default) == (f.type, f.default), f.name
        assert read[f.name].choices == (tuple(f.metadata["choices"]) if "choices" in f.metadata
                                        else None), f.name
