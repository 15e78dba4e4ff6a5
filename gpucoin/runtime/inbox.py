"""The coordinator's mailbox for one job, on the head: ranks hand in receipts and progress, the coordinator polls.

Every caller is a rank running the submitter's code, so everything that arrives is screened
before it is kept (docs/security.md, Flooding the head): a receipt must be small, of the right
shape, and signed by the worker the market placed on the rank it names, for this job; each rank
has its own bounded queue, and a full queue refuses the newcomer, never evicts what is already
there, so no rank can push another rank's receipt out. Progress (display only) keeps one slot.
Arrival times are stamped here, on the head's clock: the meter never takes a time from a rank.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass

import numpy as np

MAX_RECEIPT_JSON_CHARS = 8192
"""A signed WorkReceipt as JSON is about 1.5 kB; anything longer is refused unparsed."""
MAX_PENDING_PER_RANK = 4
"""Receipts one rank may have waiting for the coordinator; a rank that is that far ahead is told
``busy`` and waits (``runtime.worker``)."""


@dataclass(frozen=True)
class InboxConfig:
    """What the inbox checks a receipt against.

    Attributes:
        job_id: the job; domain: the EIP-712 domain (``Domain.as_dict()``);
        rank_worker: the provider address placed on each rank (its Assignment);
        steps_per_interval: K (most rows of a sketch and losses per receipt; the last interval may
        be shorter); buckets: B (sketch width);
        total_steps: the job's steps (bounds a progress report).
    """

    job_id: str
    domain: dict
    rank_worker: tuple[str, ...]
    steps_per_interval: int
    buckets: int
    total_steps: int


@dataclass(frozen=True)
class ReceiptEvent:
    """A screened receipt: ``sketches`` (steps, B) float64, ``losses`` [steps] nats/char, ``arrived_s`` head clock."""

    rank: int
    receipt_json: str
    sketches: np.ndarray
    losses: tuple[float, ...]
    arrived_s: float


@dataclass(frozen=True)
class ProgressEvent:
    """Rank 0 finished optimizer step ``step`` (1-based) with this loss (nats/char) and learning rate."""

    step: int
    loss: float
    lr: float


@dataclass(frozen=True)
class InboxReply:
    """The inbox's answer to a submission: ``accepted``, or the ``reason`` it was refused (nothing
    kept); ``busy`` when the only reason is that the rank's queue is full: the coordinator has
    not taken its earlier receipts yet, and the same submission may be tried again later."""

    accepted: bool
    reason: str = ""
    busy: bool = False


class JobInbox:
    """Screens and buffers one job's events, in the head service's process (the API hands it
    what the ranks post; ``coordinator.run.JobRun`` polls it)."""

    def __init__(self, config: InboxConfig) -> None:
        from gpucoin.wallet.messages import Domain

        self._config = config
        self._domain = Domain.from_dict(config.domain)
        self._receipts = [collections.deque() for _ in config.rank_worker]
        self._progress: ProgressEvent | None = None
        self._stop_reason: str | None = None
        self.refused = 0

    def stop(self, reason: str) -> None:
        """Ask the ranks to stop at their next interval boundary (e.g. after a proven fraud)."""
        self._stop_reason = str(reason)[:500]

    def stop_reason(self) -> str | None:
        """Why the ranks should stop, or None to go on."""
        return self._stop_reason

    def progress(self, step: int, loss: float, lr: float) -> None:
        """Rank 0 reports it finished optimizer step ``step``; only the latest report is kept."""
        if not (_is_int(step) and 1 <= step <= self._config.total_steps):
            return
        if not all(isinstance(x, float | int) and math.isfinite(x) for x in (loss, lr)):
            return
        self._progress = ProgressEvent(int(step), float(loss), float(lr))

    def submit_receipt(self, rank: int, receipt_json: str, sketches: np.ndarray, losses: list[float]) -> InboxReply:
        """A rank hands in its signed WorkReceipt for an interval, the sketches it commits to and its losses.

        Returns:
            ``InboxReply(True)`` once queued for the coordinator (which applies the full receipt
            rules); otherwise why it was refused, and nothing of it is kept.
        """
        problem = self._screen(rank, receipt_json, sketches, losses)
        if problem is None and len(self._receipts[rank]) >= MAX_PENDING_PER_RANK:
            self.refused += 1
            return InboxReply(False, f"rank {rank} already has {MAX_PENDING_PER_RANK} receipts waiting", busy=True)
        if problem is not None:
            self.refused += 1
            return InboxReply(False, problem)
        self._receipts[rank].append(
            ReceiptEvent(rank, receipt_json, sketches, tuple(float(x) for x in losses), time.monotonic())
        )
        return InboxReply(True)

    def poll(self) -> list[ReceiptEvent | ProgressEvent]:
        """Remove and return what is waiting: the latest progress, then receipts in arrival order
        (at most ``MAX_PENDING_PER_RANK`` per rank)."""
        out: list = [self._progress] if self._progress is not None else []
        self._progress = None
        receipts = [ev for q in self._receipts for ev in q]
        for q in self._receipts:
            q.clear()
        return out + sorted(receipts, key=lambda ev: ev.arrived_s)

    def _screen(self, rank, receipt_json, sketches, losses) -> str | None:
        """Why a submission is refused before anything of it is kept, or None."""
        from gpucoin.coordinator.receipts import ReceiptRejected, check_signed
        from gpucoin.exceptions import SignatureError
        from gpucoin.wallet.messages import SignedMessage

        cfg = self._config
        if not (_is_int(rank) and 0 <= rank < len(cfg.rank_worker)):
            return f"no rank {rank!r} in a job of {len(cfg.rank_worker)} ranks"
        if not isinstance(receipt_json, str) or len(receipt_json) > MAX_RECEIPT_JSON_CHARS:
            return f"rank {rank}: a receipt must be a JSON string of at most {MAX_RECEIPT_JSON_CHARS} characters"
        k, b = cfg.steps_per_interval, cfg.buckets
        if not (
            isinstance(sketches, np.ndarray)
            and sketches.dtype == np.float64
            and sketches.ndim == 2
            and 1 <= sketches.shape[0] <= k
            and sketches.shape[1] == b
        ):
            return f"rank {rank}: sketches must be a (steps <= {k}, {b}) float64 array"
        if not (isinstance(losses, list | tuple) and len(losses) == sketches.shape[0]):
            return f"rank {rank}: losses must be a list of {sketches.shape[0]} numbers, one per step"
        if not all(isinstance(x, float | int) and not isinstance(x, bool) for x in losses):
            return f"rank {rank}: losses must be numbers"
        try:
            receipt = SignedMessage.from_json(receipt_json)
            check_signed(receipt, job_id=cfg.job_id, rank=rank, worker=cfg.rank_worker[rank], domain=self._domain)
        except ReceiptRejected as e:
            return " ".join(str(e).split())[:300]
        except (SignatureError, ValueError, KeyError, TypeError) as e:
            return f"rank {rank}: {' '.join(str(e).split())[:300]}"
        return None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
