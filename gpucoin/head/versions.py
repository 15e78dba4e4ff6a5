"""The versions a joining node must share with its head, and the check ``gpucoin join`` makes.

Ray refuses mixed versions in one cluster only at some boundaries and fails obscurely at others;
Python objects that Ray pickles between nodes and DeepSpeed's collectives need the same releases
too. So a node refuses a head whose versions differ from its own, naming both.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

from gpucoin.exceptions import HeadError
from gpucoin.head.records import Versions


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def versions() -> Versions:
    """This process's versions (from package metadata, without importing torch or DeepSpeed)."""
    from gpucoin import __version__

    v = sys.version_info
    return Versions(
        gpucoin=__version__,
        python=f"{v.major}.{v.minor}.{v.micro}",
        ray=_version("ray"),
        torch=_version("torch"),
        deepspeed=_version("deepspeed"),
    )


def check_same(head: Versions, here: Versions) -> None:
    """Refuse a head whose Python, Ray, torch, DeepSpeed or gpucoin version differs from this host's.

    Raises:
        HeadError: naming every difference with both versions.
    """
    diffs = [
        f"{name} {getattr(head, name)} on the head, {getattr(here, name)} here"
        for name in ("python", "ray", "torch", "deepspeed", "gpucoin")
        if getattr(head, name) != getattr(here, name)
    ]
    if diffs:
        raise HeadError("this host cannot join that head: " + "; ".join(diffs) + " (install the head's versions)")
