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
