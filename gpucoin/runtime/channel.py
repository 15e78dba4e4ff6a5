"""How a job's ranks and its verifier reach the head.

A rank asks whether to stop, reports progress, hands in its signed receipts with their sketches
and puts its checkpoint files into the job's store; a verifier reads that store. Both go through
a ``JobChannel``; ``HttpChannel`` is the head service's API (``gpucoin.head.api``,
``/v1/jobs/{id}/...``): no gpucoin actor runs on the head node, and the head holds the inbox and
the store in its own process. It is small and picklable: Ray ships it to the ranks inside the
training config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from gpucoin.runtime.inbox import InboxReply

HTTP_RETRY_S = 120.0
"""How long a rank keeps retrying a head it cannot reach (a restarting head service) before it fails."""


class JobChannel(Protocol):
    """What a rank or a verifier asks of the head for one job."""

    def stop_reason(self) -> str | None: ...
    def progress(self, step: int, loss: float, lr: float) -> None: ...
    def submit_receipt(self, rank: int, receipt_json: str, sketches: np.ndarray, losses: list[float]) -> InboxReply: ...
    def put(self, data: bytes) -> str: ...
    def get(self, digest: str) -> bytes: ...
    def has(self, digests: list[str]) -> list[bool]: ...


@dataclass(frozen=True)
class HttpChannel:
    """The head service's API for job ``job_id`` at ``api_url``.

    Calls that fail to reach the head are retried for ``retry_s`` seconds (a head service that
    restarts comes back with the same inbox state from its database); a head that answers with a
    refusal is not retried. Objects are raw bytes named by their SHA-256 (the head checks both).
    """

    api_url: str
    job_id: str
    retry_s: float = HTTP_RETRY_S

    def _client(self):
        from gpucoin.head.client import HeadClient

        return HeadClient(self.api_url, retry_s=self.retry_s)

    def stop_reason(self) -> str | None:
        return self._client().job_stop_reason(self.job_id)

    def progress(self, step: int, loss: float, lr: float) -> None:
        from gpucoin.exceptions import HeadError
        from gpucoin.head.client import HeadClient

        try:
            HeadClient(self.api_url, retry_s=0.0).job_progress(self.job_id, step, loss, lr)
        except HeadError:
            pass  # display only: not worth a retry

    def submit_receipt(self, rank: int, receipt_json: str, sketches: np.ndarray, losses: list[float]) -> InboxReply:
        return self._client().job_receipt(self.job_id, rank, receipt_json, sketches, losses)

    def put(self, data: bytes) -> str:
        return self._client().job_put(self.job_id, data)

    def get(self, digest: str) -> bytes:
        return self._client().job_get(self.job_id, digest)

    def has(self, digests: list[str]) -> list[bool]:
        return self._client().job_has(self.job_id, digests)
