"""Which intervals get replayed: a draw with the coordinator's secret seed, after the receipts arrive.

The draw for an interval is HMAC-SHA256(secret, the interval's receipt digests) read as a
number in [0, 1): workers cannot predict it when they commit, and anyone given the secret
afterwards can re-check every draw. It is compared with the largest check probability of the
interval's nodes, each from that node's verification record (``check_probability``), which the
ledger keeps across jobs (``Ledger.verification_records``).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from gpucoin.policy.model import VerificationPolicy


@dataclass(frozen=True)
class VerificationRecord:
    """A node's verification record: the ledger's signed VerificationReports on the WorkReceipts
    its provider signed, over every job it ran.

    Attributes:
        passed: reports with verdict ``pass``.
        other: reports with verdict ``fail`` (its replay convicted it) or ``void`` (it could not
            tell who computed wrongly).
        clean_streak: ``pass`` reports after its newest ``fail`` or ``void`` (all of them if none).

    Raises:
        ValueError: a negative count, or a streak longer than the passes.
    """

    passed: int = 0
    other: int = 0
    clean_streak: int = 0

    def __post_init__(self) -> None:
        if min(self.passed, self.other, self.clean_streak) < 0 or self.clean_streak > self.passed:
            raise ValueError(
                f"not a verification record: passed = {self.passed}, other = {self.other}, "
                f"clean_streak = {self.clean_streak}"
            )


def check_probability(verification: VerificationPolicy, record: VerificationRecord) -> float:
    """Probability that one interval of a node with ``record`` is drawn for replay (BOINC-style
    adaptive replication: D. Anderson, "BOINC: A Platform for Volunteer Computing", J. Grid
    Computing 18, 2020: "adaptive replication").

    ``new_node_check_probability`` until the node has passed ``new_node_intervals`` checks in a
    row since its newest report that was not a pass (a new node, or one that just failed), then
    the policy's floor ``check_probability`` (SPEC.md, Verification step 3). Checking a node
    more costs it nothing: only the network pays for the replays.
    """
    if record.clean_streak < verification.new_node_intervals:
        return verification.new_node_check_probability
    return verification.check_probability


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
