"""Which intervals get replayed: a draw with the coordinator's secret seed, after the receipts arrive.

The draw for an interval is HMAC-SHA256(secret, the interval's receipt digests) read as a
number in [0, 1): workers cannot predict it when they commit, and anyone given the secret
afterwards can re-check every draw.
"""

from __future__ import annotations

import hashlib
import hmac


def draw(secret: bytes, receipt_digests: list[str]) -> float:
    """Uniform number in [0, 1) fixed by the secret and the receipts (53 bits of the HMAC)."""
    if len(secret) < 16:
        raise ValueError(f"the sampling secret must be at least 16 bytes, got {len(secret)}")
    mac = hmac.new(secret, "|".join(receipt_digests).encode(), hashlib.sha256).digest()
    return (int.from_bytes(mac[:8], "big") >> 11) / float(1 << 53)


def is_checked(secret: bytes, receipt_digests: list[str], probability: float) -> bool:
    """True if the interval whose ranks signed ``receipt_digests`` is to be replayed."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    return draw(secret, receipt_digests) < probability
