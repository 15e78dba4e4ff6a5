"""The coordinator's mailbox for one job: workers push receipts and progress, the driver polls."""

from __future__ import annotations

import collections

import numpy as np

MAX_EVENTS = 100_000


class JobInbox:
    """Ray actor (created with ``num_cpus=0`` on the head node) that buffers a job's events.

    Events are tuples: ``("started", step)``, ``("progress", step, loss, lr)`` and
    ``("receipt", rank, receipt_json, sketches (K, B) float64, losses [K])``.
    """

    def __init__(self) -> None:
        self._events: collections.deque = collections.deque(maxlen=MAX_EVENTS)
        self._stop_reason: str | None = None

    def stop(self, reason: str) -> None:
        """Ask the ranks to stop at their next interval boundary (e.g. after a proven fraud)."""
        self._stop_reason = reason

    def stop_reason(self) -> str | None:
        """Why the ranks should stop, or None to go on."""
        return self._stop_reason

    def started(self, step: int) -> None:
        """Rank 0 is about to run optimizer step ``step`` (0-based) for the first time in this run."""
        self._events.append(("started", int(step)))

    def progress(self, step: int, loss: float, lr: float) -> None:
        """Rank 0 reports it finished optimizer step ``step`` (1-based) with this loss (nats/char)."""
        self._events.append(("progress", int(step), float(loss), float(lr)))

    def submit_receipt(self, rank: int, receipt_json: str, sketches: np.ndarray, losses: list[float]) -> None:
        """A rank hands in its signed WorkReceipt for an interval and the sketches it commits to."""
        self._events.append(
            ("receipt", int(rank), receipt_json, np.asarray(sketches, dtype=np.float64), [float(x) for x in losses])
        )

    def poll(self, max_events: int = 1000) -> list[tuple]:
        """Remove and return up to ``max_events`` events in arrival order."""
        out = []
        while self._events and len(out) < max_events:
            out.append(self._events.popleft())
        return out
