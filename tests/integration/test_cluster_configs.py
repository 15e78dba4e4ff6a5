"""The Ray cluster-launcher configs pass Ray's own validator, and every gpucoin command line in them
parses with gpucoin's own CLI: a renamed option or a typo fails here, not on someone's cluster."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from gpucoin import __version__
from gpucoin.cli.main import cli

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "cluster_configs").glob("*.yaml"))
SHELL = {
    "$(hostname -I | awk '{print $1}')": "10.0.0.9",
    "$RAY_HEAD_IP": "10.0.0.1",
}


def _gpucoin_commands(config: dict, key: str) -> list[list[str]]:
    """The argument lists of the ``gpucoin`` calls in ``config[key]``, shell substitutions filled in."""
    out = []
    for line in config.get(key, []):
        for a, b in SHELL.items():
            line = line.replace(a, b)
        line = re.sub(r"\$\(~/gpucoin-venv/bin/gpucoin wallet show [^)]*\)", "0x" + "ab" * 20, line)
        for part in re.split(r"&&|\|\|", line):
            words = shlex.split(part)
            words = [w for w in words if not re.match(r"^[A-Z_]+=", w)]  # VAR=value prefixes
            if words and words[0].endswith("/gpucoin"):
                out.append(words[1:])
    return out


def _parse(args: list[str]) -> click.Context:
    """The context ``gpucoin ARGS`` would run with (``ARGS[0]`` a command), without running it."""
    parent = click.Context(cli, info_name="gpucoin")
    cmd = cli.get_command(parent, args[0])
    assert cmd is not None, f"no command gpucoin {args[0]}"
    return cmd.make_context(args[0], list(args[1:]), parent=parent)


def test_there_is_an_on_prem_and_a_cloud_config() -> None:
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in CONFIGS}
    assert {"local", "aws"} <= providers


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_ray_validates_the_config(path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load(path.read_text())))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_the_head_runs_gpucoin_up_and_the_workers_gpucoin_join(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    head = _gpucoin_commands(config, "head_start_ray_commands")
    workers = _gpucoin_commands(config, "worker_start_ray_commands")
    assert "up" in [c[0] for c in head] and "join" in [c[0] for c in workers]
    for args in head + workers:
        _parse(args)  # raises on an unknown option or a bad value
    join = _parse(next(c for c in workers if c[0] == "join"))
    assert join.params["token_file"] is not None, "the token comes from a file, never an argument"
    up = _parse(next(c for c in head if c[0] == "up"))
    assert str(up.params["api_port"]) in join.params["address"]
    setup = " ".join(config["setup_commands"])
    assert f"gpucoin=={__version__}" in setup and "torch==2.13.0" in setup
    text = path.read_text()
    assert "ray start" not in text, "Ray is started by gpucoin up / join, with the token"
