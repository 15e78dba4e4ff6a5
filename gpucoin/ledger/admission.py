"""Which signed messages the ledger admits, beyond a valid signature (pure: no database, no I/O).

``Ledger.record_messages`` first checks each message on its own (canonical typed data, digest,
low-s signature, signer = the message's own signer field: ``gpucoin.ledger.audit``), then runs
``Admission.admit`` on it with what the ledger already holds. The rules (docs/protocol.md,
Acceptance rules):

- **genesis first**: a ledger admits nothing before its Genesis, and the Genesis only as its first
  message (``Ledger.init_genesis``), signed by its ``coordinator``, who must be the domain's
  ``verifyingContract``, in the domain's ``chainId``, with ``startTime`` not in the future,
  allocations to distinct recipients of at least 1 µGPC each and within the policy's hard cap;
- **domain**: every later message is signed in the Genesis's EIP-712 domain;
- **who signs**: a Settlement, Faucet, Assignment or EpochClose by the market's coordinator; a
  PolicyChange by the Genesis's admin; a Faucet only in a dev market;
- **deadline**: a JobOrder or NodeRegistration whose ``deadline`` (unix seconds) is before the
  ledger's clock is refused;
- **one order per job**: a second JobOrder for a ``jobId`` that already has one is refused;
- **assignments**: an Assignment names a job with a JobOrder, a rank below its ``workers``, a
  provider that registered the node it names, and as ``fromStep`` the rank's first step without
  a receipt (0 at first; a replacement or a resume takes over from there);
- **receipts**: a WorkReceipt's worker is the provider of its rank's latest Assignment, which
  starts no later than the receipt; per (job, rank), the live receipts cover the steps 0, 1, 2, ...
  without overlap or gap, each naming the digest of the one before as ``previousReceipt`` (the
  first names ``ZERO_BYTES32``), and ``stepEnd > stepStart``;
- **rewinds**: a coordinator-signed Rewind of a job with a JobOrder, to ``toStep`` = 0 or a step
  where every rank's live receipts end, supersedes each live receipt from ``toStep`` on (at least
  one): the ranks go on from there. A receipt's ``attempt`` is how many Rewinds of its job were
  recorded before it; it is superseded by a later Rewind whose ``toStep`` is at most its
  ``stepStart`` (``superseded``), and live otherwise;
- **references**: a VerificationReport names a recorded WorkReceipt; a Settlement's ``subject`` is
  a recorded WorkReceipt, VerificationReport or JobOrder of the Settlement's job; an Unbond or
  Withdraw comes from a registered provider.

(signer, nonce) uniqueness is the database's (``uq_message_signer_nonce``), reported as
``NonceReused``. The state is only what these rules read, loaded for the messages of one batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpucoin.exceptions import (
    ConflictError,
    DomainMismatch,
    MessageExpired,
    NoGenesis,
    ReceiptOutOfOrder,
    UnknownParty,
)
from gpucoin.policy.model import Policy
from gpucoin.wallet.messages import ZERO_BYTES32

# The EIP-712 primary types the ledger's rules name (gpucoin.wallet.messages.MESSAGE_TYPES).
GENESIS = "Genesis"
JOB_ORDER = "JobOrder"
NODE_REGISTRATION = "NodeRegistration"
ASSIGNMENT = "Assignment"
WORK_RECEIPT = "WorkReceipt"
VERIFICATION_REPORT = "VerificationReport"
SETTLEMENT = "Settlement"
EPOCH_CLOSE = "EpochClose"
FAUCET = "Faucet"
POLICY_CHANGE = "PolicyChange"
UNBOND = "Unbond"
WITHDRAW = "Withdraw"

REWIND = "Rewind"

COORDINATOR_TYPES = frozenset({GENESIS, SETTLEMENT, FAUCET, ASSIGNMENT, EPOCH_CLOSE, REWIND})
"""Primary types only the market's coordinator (the domain's verifyingContract) may sign."""

DEADLINE_TYPES = frozenset({JOB_ORDER, NODE_REGISTRATION})
"""Primary types whose ``deadline`` field (unix seconds) the ledger enforces on recording."""

SUBJECT_TYPES = frozenset({WORK_RECEIPT, VERIFICATION_REPORT, JOB_ORDER})
"""What a Settlement may settle (docs/protocol.md, Settlement)."""


def superseded(attempt: int, step_start: int, rewind_steps: list[int]) -> bool:
    """Whether a receipt is superseded by a Rewind of its job (pure; the ledger's one rule for it).

    Args:
        attempt: how many Rewinds of the job were recorded before the receipt.
        step_start: the receipt's ``stepStart``.
        rewind_steps: the ``toStep`` of each Rewind of the job recorded so far, in recording order.

    Returns:
        True if a Rewind recorded after the receipt goes back to its first step or earlier.
    """
    return any(to_step <= step_start for to_step in rewind_steps[attempt:])


@dataclass(frozen=True)
class ReceiptHead:
    """The latest live WorkReceipt of one (job, rank).

    Attributes:
        step_end: its ``stepEnd`` (exclusive): the next receipt of the rank starts here.
        digest: its EIP-712 digest (0x + 64 hex): the next receipt's ``previousReceipt``.
    """

    step_end: int
    digest: str


@dataclass(frozen=True)
class ReceiptKey:
    """Where one admitted WorkReceipt sits: its job, rank, first step and attempt (the number of
    Rewinds of its job recorded before it)."""

    job_id: str
    rank: int
    step_start: int
    attempt: int


@dataclass(frozen=True)
class AssignmentHead:
    """The latest Assignment of one (job, rank): ``provider`` holds the rank from ``from_step``."""

    provider: str
    node_id: str
    from_step: int
    digest: str


@dataclass(frozen=True)
class Known:
    """A recorded message another message refers to: its primary type and the job it belongs to."""

    type: str
    job_id: str | None


@dataclass
class Admission:
    """What the admission rules read, for the messages of one batch, updated as each is admitted.

    Attributes:
        domain: the market's domain (``Domain.as_dict()`` of its Genesis), None before the Genesis.
        now_s: the ledger's clock, unix seconds.
        genesis: the Genesis's message fields, None before it.
        empty: whether no message at all is recorded yet (the Genesis must come first).
        jobs: job id -> digest of its recorded JobOrder (at least those the batch names).
        workers: job id -> its JobOrder's ``workers`` (same keys as ``jobs``).
        nodes: provider -> node ids it registered (at least the providers the batch names).
        assignments: (job id, rank) -> its latest Assignment (at least those the batch names).
        receipt_heads: (job id, rank) -> the rank's latest receipt (at least those the batch names).
        known: digest -> type and job of recorded messages the batch refers to.
        rewind_steps: job id -> ``toStep`` of each of its Rewinds, in recording order (at least
            for the jobs the batch's receipts, assignments and rewinds name).
        ends: (job id, rank, stepEnd) -> (attempt, stepStart, digest) of the recorded receipts a
            Rewind of the batch may go back to (those ending at its ``toStep``), and of each one
            admitted by this object.
        receipts: ``ReceiptKey`` -> (stepEnd, digest) of each receipt admitted by this object
            (the audit compares them with the ``work_receipt`` rows).
        rewound: digest -> (job id, attempt it starts, toStep) of each Rewind admitted.
        assigned: digest -> (job, rank, provider, node id, fromStep) of each Assignment admitted.
        registered: digest -> (provider, node id) of each NodeRegistration admitted.
        reported: digest -> (receipt digest, verifier, verdict) of each VerificationReport admitted.
    """

    domain: Mapping[str, Any] | None
    now_s: int
    genesis: Mapping[str, Any] | None = None
    empty: bool = False
    jobs: dict[str, str] = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, set[str]] = field(default_factory=dict)
    assignments: dict[tuple[str, int], AssignmentHead] = field(default_factory=dict)
    receipt_heads: dict[tuple[str, int], ReceiptHead] = field(default_factory=dict)
    known: dict[str, Known] = field(default_factory=dict)
    rewind_steps: dict[str, list[int]] = field(default_factory=dict)
    ends: dict[tuple[str, int, int], list[tuple[int, int, str]]] = field(default_factory=dict)
    receipts: dict[ReceiptKey, tuple[int, str]] = field(default_factory=dict)
    rewound: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    assigned: dict[str, tuple[str, int, str, str, int]] = field(default_factory=dict)
    registered: dict[str, tuple[str, str]] = field(default_factory=dict)
    reported: dict[str, tuple[str, str, str]] = field(default_factory=dict)

    def check_domain(self, primary_type: str, domain: Mapping[str, Any], digest: str) -> None:
        """Refuse a message signed in another domain than the market's (no-op before the Genesis).

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

    def admit_genesis(self, domain: Mapping[str, Any], message: Mapping[str, Any], digest: str, policy: Policy) -> None:
        """Check a Genesis offered with the policy it names, then count it as recorded.

        Raises:
            NoGenesis: the ledger already holds messages (a Genesis comes first, once).
            UnknownParty: its coordinator is not the domain's verifyingContract.
            DomainMismatch: its chainId is not the domain's.
            ConflictError: a startTime in the future, allocations to one recipient twice or of
                0 µGPC, or allocations above the policy's hard cap.
        """
        what = f"Genesis {digest}"
        if not self.empty or self.genesis is not None:
            raise NoGenesis(f"{what}: a Genesis is a ledger's first message; this ledger already holds messages")
        if message["coordinator"] != domain["verifyingContract"]:
            raise UnknownParty(
                f"{what}: its coordinator {message['coordinator']} is not the domain's verifyingContract "
                f"{domain['verifyingContract']}"
            )
        if message["chainId"] != domain["chainId"]:
            raise DomainMismatch(f"{what}: chainId {message['chainId']} differs from its domain's {domain['chainId']}")
        if message["startTime"] > self.now_s:
            raise ConflictError(f"{what}: startTime {message['startTime']} is in the future (now {self.now_s})")
        recipients = [a["recipient"] for a in message["allocations"]]
        if len(set(recipients)) != len(recipients):
            raise ConflictError(f"{what}: allocates to one recipient twice")
        if any(a["amount"] == 0 for a in message["allocations"]):
            raise ConflictError(f"{what}: an allocation of 0 µGPC")
        total = sum(a["amount"] for a in message["allocations"])
        if total > policy.tokenomics.hard_cap_ugpc:
            raise ConflictError(
                f"{what}: allocates {total} µGPC, above the policy's hard cap {policy.tokenomics.hard_cap_ugpc}"
            )
        self.genesis, self.domain, self.empty = dict(message), dict(domain), False

    def admit(
        self, primary_type: str, domain: Mapping[str, Any], message: Mapping[str, Any], digest: str, signer: str
    ) -> None:
        """Check one verified message (not a Genesis: ``admit_genesis``) against the rules, then
        count it as recorded.

        Args:
            primary_type / domain / message: the message's canonical typed data parts.
            digest: its EIP-712 digest, 0x + 64 lower-case hex.
            signer: the checksum address its signature recovers to.

        Raises:
            NoGenesis: the ledger has no Genesis yet, or the message is a Genesis.
            DomainMismatch: signed in another market's domain (names the differing fields).
            UnknownParty: a coordinator message not by the coordinator, a PolicyChange not by the
                admin, a Faucet in a market that is not dev; a receipt, assignment, report,
                settlement, unbond or withdrawal naming a job, node, provider or message the
                ledger does not know, or a receipt from another provider than its rank's.
            MessageExpired: a JobOrder or NodeRegistration past its deadline.
            ConflictError: a second JobOrder for a job; an Assignment whose ``fromStep`` is not
                its rank's first step without a receipt; a Rewind to a step where some rank's
                live receipts do not end, or that supersedes nothing.
            ReceiptOutOfOrder: a receipt that overlaps, leaves a gap, is empty or does not chain
                to its rank's previous receipt.
        """
        what = f"{primary_type} {digest}"
        if primary_type == GENESIS:
            raise NoGenesis(f"{what}: a Genesis is recorded only as a ledger's first message, by Ledger.init_genesis")
        if self.genesis is None or self.domain is None:
            raise NoGenesis(f"{what}: this ledger has no Genesis yet, so it admits no message")
        self.check_domain(primary_type, domain, digest)
        if primary_type in COORDINATOR_TYPES and signer != self.genesis["coordinator"]:
            raise UnknownParty(
                f"{what} is signed by {signer}, not by this market's coordinator {self.genesis['coordinator']} "
                "(the domain's verifyingContract)"
            )
        if primary_type == POLICY_CHANGE and signer != self.genesis["admin"]:
            raise UnknownParty(f"{what} is signed by {signer}, not by this market's admin {self.genesis['admin']}")
        if primary_type == FAUCET and not self.genesis["dev"]:
            raise UnknownParty(f"{what}: this market's Genesis is not dev; it has no faucet")
        if primary_type in DEADLINE_TYPES and message["deadline"] < self.now_s:
            late = self.now_s - message["deadline"]
            raise MessageExpired(f"{what}: its deadline {message['deadline']} passed {late} s ago (now {self.now_s})")
        if primary_type == JOB_ORDER:
            if message["jobId"] in self.jobs:
                raise ConflictError(
                    f"{what}: job {message['jobId']!r} already has a JobOrder ({self.jobs[message['jobId']]})"
                )
            self.jobs[message["jobId"]] = digest
            self.workers[message["jobId"]] = message["workers"]
        elif primary_type == NODE_REGISTRATION:
            self.nodes.setdefault(message["provider"], set()).add(message["nodeId"])
            self.registered[digest] = (message["provider"], message["nodeId"])
        elif primary_type == ASSIGNMENT:
            self._admit_assignment(message, digest, what)
        elif primary_type == WORK_RECEIPT:
            self._admit_receipt(message, digest, what)
        elif primary_type == REWIND:
            self._admit_rewind(message, digest, what)
        elif primary_type == VERIFICATION_REPORT:
            receipt = self.known.get(message["receiptDigest"])
            if receipt is None or receipt.type != WORK_RECEIPT:
                raise UnknownParty(f"{what}: receiptDigest {message['receiptDigest']} is no recorded WorkReceipt")
            self.reported[digest] = (message["receiptDigest"], message["verifier"], message["verdict"])
            self.known[digest] = Known(VERIFICATION_REPORT, receipt.job_id)
            return
        elif primary_type == SETTLEMENT:
            subject = self.known.get(message["subject"])
            if subject is None or subject.type not in SUBJECT_TYPES:
                raise UnknownParty(
                    f"{what}: subject {message['subject']} is no recorded {', '.join(sorted(SUBJECT_TYPES))}"
                )
            if subject.job_id != message["jobId"]:
                raise UnknownParty(f"{what}: names job {message['jobId']!r}, its subject is of job {subject.job_id!r}")
        elif primary_type in (UNBOND, WITHDRAW):
            if message["provider"] not in self.nodes:
                raise UnknownParty(f"{what}: provider {message['provider']} has no recorded NodeRegistration")
        self.known[digest] = Known(primary_type, message.get("jobId"))

    def _admit_assignment(self, m: Mapping[str, Any], digest: str, what: str) -> None:
        job, rank, provider = m["jobId"], m["rank"], m["provider"]
        if job not in self.jobs:
            raise UnknownParty(f"{what}: no JobOrder for job {job!r} is recorded")
        if rank >= self.workers[job]:
            raise UnknownParty(f"{what}: rank {rank} of job {job!r}, which has {self.workers[job]} ranks")
        if m["nodeId"] not in self.nodes.get(provider, set()):
            raise UnknownParty(f"{what}: provider {provider} has no recorded NodeRegistration of node {m['nodeId']!r}")
        head = self.receipt_heads.get((job, rank))
        following = head.step_end if head is not None else 0
        if m["fromStep"] != following:
            raise ConflictError(
                f"{what}: job {job!r} rank {rank} has receipts up to step {following}; an assignment holds "
                f"the rank from there (got step {m['fromStep']}: it would "
                f"{'reassign receipted steps' if m['fromStep'] < following else 'leave steps nobody may receipt'})"
            )
        self.assignments[(job, rank)] = AssignmentHead(provider, m["nodeId"], m["fromStep"], digest)
        self.assigned[digest] = (job, rank, provider, m["nodeId"], m["fromStep"])

    def _admit_receipt(self, m: Mapping[str, Any], digest: str, what: str) -> None:
        job, rank, start, end = m["jobId"], m["rank"], m["stepStart"], m["stepEnd"]
        if job not in self.jobs:
            raise UnknownParty(f"{what}: no JobOrder for job {job!r} is recorded")
        assignment = self.assignments.get((job, rank))
        if assignment is None:
            raise UnknownParty(f"{what}: job {job!r} rank {rank} has no recorded Assignment")
        if assignment.provider != m["worker"] or assignment.from_step > start:
            raise UnknownParty(
                f"{what}: job {job!r} rank {rank} is assigned to {assignment.provider} from step "
                f"{assignment.from_step} (Assignment {assignment.digest}); the receipt is {m['worker']}'s "
                f"from step {start}"
            )
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
        attempt = len(self.rewind_steps.get(job, []))
        self.receipt_heads[(job, rank)] = ReceiptHead(end, digest)
        self.receipts[ReceiptKey(job, rank, start, attempt)] = (end, digest)
        self.ends.setdefault((job, rank, end), []).append((attempt, start, digest))
        self.known[digest] = Known(WORK_RECEIPT, job)

    def _admit_rewind(self, m: Mapping[str, Any], digest: str, what: str) -> None:
        job, to_step = m["jobId"], m["toStep"]
        if job not in self.jobs:
            raise UnknownParty(f"{what}: no JobOrder for job {job!r} is recorded")
        steps = self.rewind_steps.setdefault(job, [])
        heads: dict[int, ReceiptHead | None] = {}
        for rank in range(self.workers[job]):
            if to_step == 0:
                heads[rank] = None
                continue
            live = [(a, d) for a, st, d in self.ends.get((job, rank, to_step), []) if not superseded(a, st, steps)]
            if not live:
                raise ConflictError(
                    f"{what}: job {job!r} rank {rank} has no live receipt ending at step {to_step}; "
                    "a rewind goes back to 0 or to a step where every rank's receipts end"
                )
            heads[rank] = ReceiptHead(to_step, live[-1][1])
        ahead = [r for r in heads if (h := self.receipt_heads.get((job, r))) is not None and h.step_end > to_step]
        if not ahead:
            raise ConflictError(
                f"{what}: no rank of job {job!r} has a live receipt past step {to_step}; it supersedes nothing"
            )
        steps.append(to_step)
        for rank, head in heads.items():
            if head is None:
                self.receipt_heads.pop((job, rank), None)
            else:
                self.receipt_heads[(job, rank)] = head
        self.rewound[digest] = (job, len(steps), to_step)

    def references(self, primary_type: str, message: Mapping[str, Any]) -> list[str]:
        """Digests of recorded messages this message refers to (what a loader must put in ``known``)."""
        if primary_type == VERIFICATION_REPORT:
            return [message["receiptDigest"]]
        if primary_type == SETTLEMENT:
            return [message["subject"]]
        return []
