"""Amounts of GPC as integers of µGPC (1 GPC = 10**6 µGPC); never floats.

The CLI takes GPC as decimal text with at most 6 decimals (``"1.5"`` -> 1_500_000 µGPC);
everything inside gpucoin passes ``int`` µGPC. Amounts are stored as SQL BIGINT, so they
must fit a signed 64-bit integer.
"""

from __future__ import annotations

import re

from gpucoin.exceptions import AmountError

MICRO_PER_GPC = 10**6
"""µGPC in one GPC."""

MAX_AMOUNT_UGPC = 2**63 - 1
"""Largest amount a BIGINT column holds, in µGPC."""

_GPC_TEXT = re.compile(r"^(\d+)(?:\.(\d+))?$")


def parse_gpc(text: str | int) -> int:
    """Parse a non-negative GPC amount written in decimal into µGPC.

    ``"1.5"`` -> 1_500_000, ``"200"`` -> 200_000_000, ``"0.000001"`` -> 1.

    Raises:
        AmountError: for a sign, an exponent, more than 6 decimals, anything but digits and
            one dot, or a result above 2**63 - 1 µGPC.
    """
    if isinstance(text, bool):
        raise AmountError(f"not an amount of GPC: {text!r}")
    if isinstance(text, int):
        text = str(text)
    if not isinstance(text, str):
        raise AmountError(f"not an amount of GPC: {text!r} (write it as decimal text, e.g. 1.5)")
    s = text.strip()
    m = _GPC_TEXT.match(s)
    if m is None:
        raise AmountError(f"not an amount of GPC: {text!r} (expected e.g. 1.5; no sign, no exponent)")
    whole, frac = m.group(1), m.group(2) or ""
    if len(frac) > 6:
        raise AmountError(f"{text!r} has {len(frac)} decimals; GPC has at most 6 (1 µGPC = 0.000001 GPC)")
    micro = int(whole) * MICRO_PER_GPC + int(frac.ljust(6, "0") or "0")
    return check_amount(micro)


def check_amount(micro: int, *, allow_zero: bool = True) -> int:
    """Return ``micro`` if it is an int of µGPC in [0, 2**63 - 1] (or (0, ...] without zero).

    Raises:
        AmountError: for a float, a bool, a negative number or one above 2**63 - 1.
    """
    if isinstance(micro, bool) or not isinstance(micro, int):
        raise AmountError(f"amount must be an integer of µGPC, got {micro!r}")
    if micro < 0 or (micro == 0 and not allow_zero):
        raise AmountError(f"amount must be {'>= 0' if allow_zero else '> 0'} µGPC, got {micro}")
    if micro > MAX_AMOUNT_UGPC:
        raise AmountError(f"amount {micro} µGPC exceeds the int64 limit {MAX_AMOUNT_UGPC}")
    return micro


def format_gpc(micro: int) -> str:
    """Render µGPC as GPC with 6 decimals, e.g. 1_500_000 -> ``"1.500000"``; negatives keep the sign."""
    sign = "-" if micro < 0 else ""
    q, r = divmod(abs(int(micro)), MICRO_PER_GPC)
    return f"{sign}{q}.{r:06d}"
