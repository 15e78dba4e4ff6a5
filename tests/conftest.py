"""Shared test helpers: job specs written into a private copy of the main job's package; the
hypothesis profile.

Hypothesis runs derandomized by default (profile ``ci``): the same examples on every run, so a
red ``make test`` always reproduces. ``HYPOTHESIS_PROFILE=explore`` draws fresh examples and
prints the seed and blob of a failure to reproduce it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]
JOB_PACKAGE = REPO / "jobs" / "shakespeare_char"
EXCERPT = REPO / "tests" / "data" / "shakespeare_excerpt.txt"

TINY_MODEL = {
    "n_layer: 4": "n_layer: 2",
    "n_head: 4": "n_head: 2",
    "n_embd: 128": "n_embd: 64",
    "block_size: 128": "block_size: 64",
    "micro_batch_size: 32": "micro_batch_size: 16",
}


def write_spec(directory: Path, edits: dict[str, str] | None = None, extra: str = "", excerpt: bool = True) -> Path:
    """Copy the main job's package into ``directory`` and write a job.yaml there with text ``edits``.

    Returns the new spec's path. The copy keeps tests from writing into the repository.
    """
    pkg = directory / "shakespeare_char"
    if not pkg.exists():
        shutil.copytree(JOB_PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
    text = (JOB_PACKAGE / "job.yaml").read_text()
    if excerpt:
        text = text.replace("source: pypi", f"source: {EXCERPT}")
    for old, new in (edits or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path = pkg / "job.yaml"
    path.write_text(text + extra)
    return path


def plant_stale_build_lock(op: str = "deepspeed_shm_comm") -> Path:
    """A ``lock`` in the build directory of DeepSpeed's ``op`` in the torch extension cache the
    nodes use (the node user's when root), as a build killed part way leaves it: no process holds
    it, and torch's builder would wait on it forever."""
    import sys

    import torch

    from gpucoin.cluster.build_cache import build_root
    from gpucoin.cluster.node_user import chown_tree, ensure_node_user, switching_users

    user = ensure_node_user() if switching_users() else None
    env = user.env() if user else os.environ
    root = build_root(env, user.home if user else Path.home())
    accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    folder = (
        root
        if env.get("TORCH_EXTENSIONS_DIR")
        else root / f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}_{accel}"
    )
    build = folder / op
    top = next(p for p in [build, *build.parents] if p.parent.exists())  # the first level we create
    build.mkdir(parents=True, exist_ok=True)
    (build / "lock").touch()
    if user is not None:
        chown_tree(top, user)
    return build / "lock"


def exact_double(text: str) -> int:
    """A ``json.loads`` ``parse_int`` that reads an integer as JavaScript's ``JSON.parse`` would (a
    double) and fails on one that would be rounded."""
    if int(text) != int(float(text)):
        raise AssertionError(f"JSON.parse would read {text} as {int(float(text))}")
    return int(text)
