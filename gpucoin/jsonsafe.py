"""JSON that JavaScript reads exactly: integers beyond 2**53 - 1 are written as decimal strings.

JavaScript's ``JSON.parse`` turns every number into an IEEE-754 double, which holds integers
exactly only up to ``Number.MAX_SAFE_INTEGER`` = 2**53 - 1 (ECMA-262, 21.1.2.6). gpucoin's
uint64 fields (nonces, most of all) are often larger: a client reading them with plain
``JSON.parse`` gets them wrong, and every EIP-712 digest over them with it. So every JSON text
gpucoin hands out (signed messages, ``gpucoin ledger export``, the summary) writes an integer
above 2**53 - 1 (or below -(2**53 - 1)) as its decimal string and any other integer as a JSON
number; EIP-712 libraries (ethers.js, eth-account) take decimal strings for uint fields.
``gpucoin.wallet.messages`` reads both back (``parse_uint_text``).
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_SAFE_INTEGER = 2**53 - 1
"""The largest integer a JavaScript number holds exactly (``Number.MAX_SAFE_INTEGER``)."""

_DECIMAL = re.compile(r"^[1-9][0-9]{0,77}$")
"""A canonical unsigned decimal: no sign, no leading zero, no space, at most 78 digits (2**256 has 78)."""


def js_safe(obj: Any) -> Any:
    """``obj`` with every int of magnitude above ``MAX_SAFE_INTEGER`` replaced by its decimal string.

    Walks dicts, lists and tuples (tuples become lists); bools and other values pass unchanged.
    """
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        return str(obj) if abs(obj) > MAX_SAFE_INTEGER else obj
    if isinstance(obj, dict):
        return {k: js_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [js_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps(js_safe(obj), **kwargs)``."""
    return json.dumps(js_safe(obj), **kwargs)


def parse_uint_text(value: str) -> int | None:
    """The integer of ``value`` if it is the decimal string ``js_safe`` writes for a uint
    (canonical digits, above ``MAX_SAFE_INTEGER``), else None.

    A string for an integer at or below ``MAX_SAFE_INTEGER`` is not that form: such integers are
    written as JSON numbers, so each value has one form.
    """
    if not _DECIMAL.match(value):
        return None
    n = int(value)
    return n if n > MAX_SAFE_INTEGER else None
