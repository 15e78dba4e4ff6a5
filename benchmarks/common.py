"""What the benchmarks share: the ECC backend they must measure with, a clock, a text table."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from eth_account import Account

import gpucoin.wallet.messages as gpucoin_messages


def ecc_environment(packages: Sequence[str] = ()) -> dict[str, Any]:
    """Versions and the eth-keys ECC backend; RuntimeError unless both sides use coincurve.

    eth-account signs and recovers through ``eth_keys.keys``, whose backend is
    ``eth_keys.backends.get_backend()``: the class named by ``$ECC_BACKEND_CLASS`` or else
    ``CoinCurveECCBackend`` when coincurve imports. gpucoin's ``sign`` signs with the account's
    eth-keys key object (the same backend) and its recovery calls coincurve directly
    (``gpucoin.wallet.messages._coincurve``), falling back to eth-keys without it.
    """
    try:
        import coincurve
    except ImportError as exc:
        raise RuntimeError(
            f"coincurve is not importable ({exc}); install it: pip install 'coincurve>=21,<22'"
        ) from None
    from importlib.metadata import version

    import eth_keys
    from eth_keys.backends import get_backend_class, get_default_backend_class

    sig = Account._keys.Signature(vrs=(0, 1, 1))  # the backend object eth-account's own recovery uses
    used = type(sig.backend)
    key_api = type(eth_keys.KeyAPI().backend)
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "eth_account": version("eth-account"),
        "eth_keys": version("eth-keys"),
        "eth_hash": version("eth-hash"),
        "coincurve": version("coincurve"),
        "coincurve_module": getattr(coincurve, "__file__", "?"),
        "eth_keys_backend": f"{used.__module__}.{used.__qualname__}",
        "eth_keys_KeyAPI_backend": f"{key_api.__module__}.{key_api.__qualname__}",
        "eth_keys_default_backend_class": get_default_backend_class(),
        "ECC_BACKEND_CLASS": os.environ.get("ECC_BACKEND_CLASS"),
        "gpucoin_recovers_with": "coincurve" if gpucoin_messages._coincurve is not None else "eth_keys",
        **{name: version(name) for name in packages},
    }
    if used.__name__ != "CoinCurveECCBackend" or get_backend_class().__name__ != "CoinCurveECCBackend":
        raise RuntimeError(
            f"eth-keys signs and recovers with {env['eth_keys_backend']}, not CoinCurveECCBackend "
            f"(ECC_BACKEND_CLASS={env['ECC_BACKEND_CLASS']!r}); the baseline would be the slow pure-Python one"
        )
    if gpucoin_messages._coincurve is None:
        raise RuntimeError("gpucoin.wallet.messages did not import coincurve; it would recover with eth-keys instead")
    return env


def clock(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, this process's CPU seconds, result) of one call of ``fn``."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    t1, c1 = time.perf_counter(), time.process_time()
    return t1 - t0, c1 - c0, out


def print_rows(
    headers: Sequence[str], rows: Sequence[Sequence[str]], groups: Sequence[Any] | None = None, out: Any = sys.stdout
) -> None:
    """Print an aligned text table: first column left-aligned, the others right-aligned.

    ``groups``, if given, holds one key per row; a blank line separates rows whose keys differ.
    """
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells))

    print(line(headers), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for i, row in enumerate(rows):
        if groups is not None and i > 0 and groups[i] != groups[i - 1]:
            print(file=out)
        print(line(row), file=out)
