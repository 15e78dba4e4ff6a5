"""Which signed messages the ledger admits, beyond a valid signature (pure: no database, no I/O).

``Ledger.record_messages`` first checks each message on its own (canonical typed data, digest,
low-s signature, signer = the message's own signer field: ``gpucoin.ledger.audit``), then runs
``Admission.admit`` on it with what the ledger already holds. The rules (docs/protocol.md,
Replay rules):

- **domain**: a ledger bound to a market (``Ledger(url, domain=...)``) admits only messages
  signed in that market's EIP-712 domain: same name, version, chainId and verifyingContract;
- **coordinator**: in a bound ledger, a Settlement's ``coordinator`` and a Faucet's signer must
  be the domain's ``verifyingContract`` (the coordinator's settlement address): nobody else may
  attest what moved or mint dev funds;
- **deadline**: a JobOrder or NodeRegistration whose ``deadline`` (unix seconds) is before the
  ledger's clock is refused;
- **one order per job**: a second JobOrder for a ``jobId`` that already has one is refused;
- **known parties**: a WorkReceipt must name a job with a recorded JobOrder and a worker with a
  recorded NodeRegistration;
- **contiguous receipts**: per (job, rank), receipts cover the steps 0, 1, 2, ... without overlap
  or gap, each naming the digest of the one before as ``previousReceipt`` (the first names
  ``ZERO_BYTES32`` and starts at step 0), and ``stepEnd > stepStart``.

(signer, nonce) uniqueness is the database's (``uq_message_signer_nonce``), reported as
``NonceReused``. The state is only what these rules read, loaded for the messages of one batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpucoin.exceptions import ConflictError, DomainMismatch, MessageExpired, ReceiptOutOfOrder, UnknownParty
from gpucoin.wallet.messages import ZERO_BYTES32

# The EIP-712 primary types the ledger's rules name (gpucoin.wallet.messages.MESSAGE_TYPES).
JOB_ORDER = "JobOrder"
NODE_REGISTRATION = "NodeRegistration"
WORK_RECEIPT = "WorkReceipt"
SETTLEMENT = "Settlement"
FAUCET = "Faucet"

COORDINATOR_TYPES = frozenset({SETTLEMENT, FAUCET})
"""Primary types only the market's coordinator (the domain's verifyingContract) may sign."""

DEADLINE_TYPES = frozenset({JOB_ORDER, NODE_REGISTRATION})
"""Primary types whose ``deadline`` field (unix seconds) the ledger enforces on recording."""


@dataclass(frozen=True)
class ReceiptHead:
    """The latest admitted WorkReceipt of one (job, rank).

    Attributes:
        step_end: its ``stepEnd`` (exclusive): the next receipt of the rank starts here.
        digest: its EIP-712 digest (0x + 64 hex): the next receipt's ``previousReceipt``.
    """

    step_end: int
    digest: str


@dataclass
class Admission:
    """What the admission rules read, for the messages of one batch, updated as each is admitted.

    Attributes:
        domain: the market's domain (``Domain.as_dict()``), or None for a ledger bound to none.
        now_s: the ledger's clock, unix seconds.
        jobs: job id -> digest of its recorded JobOrder (at least those the batch names).
        nodes: checksum addresses with a recorded NodeRegistration (at least those the batch names).
        receipt_heads: (job id, rank) -> the rank's latest receipt (at least those the batch names).
        receipts: (job id, rank, stepStart) -> (stepEnd, digest) of each receipt admitted by this
            object (the audit compares them with the ``work_receipt`` rows).
    """

    domain: Mapping[str, Any] | None
    now_s: int
    jobs: dict[str, str] = field(default_factory=dict)
    nodes: set[str] = field(default_factory=set)
    receipt_heads: dict[tuple[str, int], ReceiptHead] = field(default_factory=dict)
    receipts: dict[tuple[str, int, int], tuple[int, str]] = field(default_factory=dict)

    def check_domain(self, primary_type: str, domain: Mapping[str, Any], digest: str) -> None:
        """Refuse a message signed in another domain than the market's (no-op when unbound).

        Raises:
            DomainMismatch: naming the fields that differ.
        """
        if self.domain is None or dict(domain) == dict(self.domain):
            return
        diff = sorted(k for k in set(domain) | set(self.domain) if domain.get(k) != self.domain.get(k))
        got = ", ".join(f"{k}={domain.get(k)!r}" for k in diff)
        want = ", ".join(f"{k}={self.domain.get(k)!r}" for k in diff)
        raise DomainMismatch(
            f"{primary_type} {digest} is signed for another market ({got}); this ledger's domain has {want}"
        )

    def admit(
        self, primary_type: str, domain: Mapping[str, Any], message: Mapping[str, Any], digest: str, signer: str
    ) -> None:
        """Check one verified message against the rules, then count it as recorded.

        Args:
            primary_type / domain / message: the message's canonical typed data parts.
            digest: its EIP-712 digest, 0x + 64 lower-case hex.
            signer: the checksum address its signature recovers to.

        Raises:
            DomainMismatch: signed in another market's domain (names the differing fields).
            UnknownParty: in a bound ledger, a Settlement or Faucet not by the coordinator.
            MessageExpired: a JobOrder or NodeRegistration past its deadline.
            UnknownParty: a receipt for a job or worker the ledger does not know.
            ConflictError: a second JobOrder for a job.
            ReceiptOutOfOrder: a receipt that overlaps, leaves a gap, is empty or does not chain
                to its rank's previous receipt.
        """
        what = f"{primary_type} {digest}"
        self.check_domain(primary_type, domain, digest)
        if self.domain is not None and primary_type in COORDINATOR_TYPES:
            coordinator = self.domain["verifyingContract"]
            if signer != coordinator:
                raise UnknownParty(
                    f"{what} is signed by {signer}, not by this market's coordinator {coordinator} "
                    "(the domain's verifyingContract)"
                )
        if primary_type in DEADLINE_TYPES and message["deadline"] < self.now_s:
            late = self.now_s - message["deadline"]
            raise MessageExpired(f"{what}: its deadline {message['deadline']} passed {late} s ago (now {self.now_s})")
        if primary_type == JOB_ORDER:
            if message["jobId"] in self.jobs:
                raise ConflictError(
                    f"{what}: job {message['jobId']!r} already has a JobOrder ({self.jobs[message['jobId']]})"
                )
            self.jobs[message["jobId"]] = digest
        elif primary_type == NODE_REGISTRATION:
            self.nodes.add(message["provider"])
        elif primary_type == WORK_RECEIPT:
            self._admit_receipt(message, digest, what)

    def _admit_receipt(self, m: Mapping[str, Any], digest: str, what: str) -> None:
        job, rank, start, end = m["jobId"], m["rank"], m["stepStart"], m["stepEnd"]
        if job not in self.jobs:
            raise UnknownParty(f"{what}: no JobOrder for job {job!r} is recorded")
        if m["worker"] not in self.nodes:
            raise UnknownParty(f"{what}: worker {m['worker']} has no recorded NodeRegistration")
        if end <= start:
            raise ReceiptOutOfOrder(f"{what}: steps {start}-{end} are empty (stepEnd must exceed stepStart)")
        head = self.receipt_heads.get((job, rank))
        expected_start, expected_prev = (head.step_end, head.digest) if head else (0, ZERO_BYTES32)
        where = f"job {job!r} rank {rank}"
        if start != expected_start:
            kind = "overlaps" if start < expected_start else "leaves a gap after"
            covered = f"steps 0-{expected_start}" if head else "no steps yet"
            raise ReceiptOutOfOrder(
                f"{what}: steps {start}-{end} {kind} what {where} has receipts for ({covered}); "
                f"the next must start at step {expected_start}"
            )
        if m["previousReceipt"] != expected_prev:
            raise ReceiptOutOfOrder(
                f"{what}: previousReceipt {m['previousReceipt']} is not {where}'s latest receipt {expected_prev}"
            )
        self.receipt_heads[(job, rank)] = ReceiptHead(end, digest)
        self.receipts[(job, rank, start)] = (end, digest)
