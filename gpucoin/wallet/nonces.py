"""Nonces for signed messages: strictly increasing per signing process."""

from __future__ import annotations

import threading
import time


class NonceSource:
    """Strictly increasing nonces (nanoseconds since the Unix epoch, bumped by one on ties).

    Time-based so a restarted signer does not reuse nonces it signed before (the ledger refuses a
    second message with the same signer and nonce); thread-safe.
    """

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        """A nonce larger than every one handed out before by this source."""
        with self._lock:
            self._last = max(self._last + 1, time.time_ns())
            return self._last
