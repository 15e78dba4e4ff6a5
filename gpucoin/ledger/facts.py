"""What the ledger's authorization rules read, as plain records (pure: no database, no I/O).

``Ledger.post`` loads a ``Facts`` for the operations of one batch (only the messages and index
rows they need) inside its write transaction; ``gpucoin ledger audit`` builds one for the whole
ledger and keeps it up to date while it replays every operation. The rules
(``gpucoin.ledger.authorize``) cannot tell the two apart, so both apply the same rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpucoin.ledger.admission import superseded
from gpucoin.policy.model import Policy
from gpucoin.policy.tokenomics import SettledInterval


@dataclass(frozen=True)
class Msg:
    """One recorded signed message as the rules read it.

    Attributes:
        digest: its EIP-712 digest (0x + 64 lower-case hex).
        type: its primary type (``JobOrder``, ``Settlement``, ...).
        signer: the checksum address its signature recovers to.
        fields: its canonical message fields (``gpucoin.wallet.messages.validate_message``).
    """

    digest: str
    type: str
    signer: str
    fields: Mapping[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]


@dataclass(frozen=True)
class GenesisInfo:
    """The market's Genesis and the policy it names.

    Attributes:
        digest: the Genesis message's digest.
        coordinator: the coordinator's address (the domain's verifyingContract).
        admin: the address whose PolicyChange messages count.
        dev: whether this is a dev market (only a dev market admits Faucet messages).
        start_s: unix second at which epoch 0 starts.
        policy: the incentive policy the Genesis names by hash.
        policy_hash: that hash (0x + 64 hex, ``gpucoin.policy.model.policy_hash``).
    """

    digest: str
    coordinator: str
    admin: str
    dev: bool
    start_s: int
    policy: Policy
    policy_hash: str

    @classmethod
    def of(cls, genesis: Msg, policy: Policy) -> GenesisInfo:
        """The info of a recorded Genesis and the policy stored under its ``policyHash``."""
        m = genesis.fields
        return cls(genesis.digest, m["coordinator"], m["admin"], m["dev"], m["startTime"], policy, m["policyHash"])


@dataclass(frozen=True)
class Charge:
    """A Settlement charged an interval to its job's escrow (it counts in ``epoch``'s emission).

    Attributes:
        settlement: the Settlement's digest.
        job_id / step_start / attempt: the interval (its receipts' job, first step and attempt:
            how many Rewinds of the job were recorded before them).
        epoch: the epoch it was charged in.
        interval: its receipts, workers, verifier and payment, as the emission reads them.
    """

    settlement: str
    job_id: str
    step_start: int
    attempt: int
    epoch: int
    interval: SettledInterval

    @property
    def key(self) -> tuple[str, int, int]:
        """(job id, stepStart, attempt): an interval is charged once."""
        return (self.job_id, self.step_start, self.attempt)


@dataclass(frozen=True)
class VoidCharge:
    """A Settlement charged a void interval of a job whose package is not vetted, and burned it
    (it earns no emission; the interval counts as charged).

    Attributes:
        settlement: the Settlement's digest.
        job_id / step_start / attempt: the interval (as ``Charge``).
        epoch: the epoch it was charged in.
        payment: µGPC charged and burned.
    """

    settlement: str
    job_id: str
    step_start: int
    attempt: int
    epoch: int
    payment: int

    @property
    def key(self) -> tuple[str, int, int]:
        """(job id, stepStart, attempt), as ``Charge.key``."""
        return (self.job_id, self.step_start, self.attempt)


@dataclass(frozen=True)
class Slash:
    """A Settlement slashed the signer of ``receipt`` on the evidence of ``report``: the worker of
    a WorkReceipt on a failing report, or the verifier of a VerificationReport (``receipt`` is
    then that report's digest) on the first report that showed it false (``verify.recheck``)."""

    settlement: str
    receipt: str
    report: str


@dataclass(frozen=True)
class Close:
    """An EpochClose minted ``epoch``'s emission (µGPC ``emission`` allowed, ``minted`` paid out,
    pro rata to ``payments`` µGPC charged in it)."""

    digest: str
    epoch: int
    emission: int
    minted: int
    payments: int


Effect = Charge | VoidCharge | Slash | Close
"""What an authorized operation adds to the facts besides the digests it used."""


@dataclass
class Facts:
    """Everything the authorization rules read besides balances (those are a ``LedgerState``).

    Attributes:
        genesis: the market's Genesis, or None for a ledger that has none yet.
        now_epoch: the epoch the ledger's clock is in (the operation's time).
        messages: digest -> recorded message, at least every one the rules of a batch look at.
        orders: job id -> digest of its JobOrder.
        rewinds: job id -> ``toStep`` of each recorded Rewind of it, in recording order (every
            one, for the jobs whose receipts the rules read).
        attempts: receipt digest -> its attempt (how many Rewinds of its job came before it).
        interval_receipts: (job id, stepStart, attempt) -> {rank: receipt digest} of recorded
            WorkReceipts.
        reports: receipt digest -> digests of the VerificationReports naming it, in recording order.
        used: digests of messages that already authorized an operation (each authorizes one).
        charges: (job id, stepStart, attempt) -> the Charge of that interval (an interval is
            charged once).
        void_charges: (job id, stepStart, attempt) -> the VoidCharge of that interval (once, and never also a Charge).
        slashed: digests of receipts whose worker, and of reports whose verifier, was slashed for
            them (one slash per message).
        epoch_charges: epoch -> the Charges counted in it (at least for the epochs a batch closes).
        closed: epochs already closed.
        last_closed: the newest closed epoch, -1 if none.
    """

    genesis: GenesisInfo | None
    now_epoch: int
    messages: dict[str, Msg] = field(default_factory=dict)
    orders: dict[str, str] = field(default_factory=dict)
    rewinds: dict[str, list[int]] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    interval_receipts: dict[tuple[str, int, int], dict[int, str]] = field(default_factory=dict)
    reports: dict[str, list[str]] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    charges: dict[tuple[str, int, int], Charge] = field(default_factory=dict)
    void_charges: dict[tuple[str, int, int], VoidCharge] = field(default_factory=dict)
    slashed: set[str] = field(default_factory=set)
    epoch_charges: dict[int, list[Charge]] = field(default_factory=dict)
    closed: set[int] = field(default_factory=set)
    last_closed: int = -1

    def add_message(self, msg: Msg) -> None:
        """Index a recorded message (the audit calls this for every message, in recording order)."""
        self.messages[msg.digest] = msg
        m = msg.fields
        if msg.type == "JobOrder":
            self.orders.setdefault(m["jobId"], msg.digest)
        elif msg.type == "WorkReceipt":
            attempt = self.attempts.setdefault(msg.digest, len(self.rewinds.get(m["jobId"], [])))
            key = (m["jobId"], m["stepStart"], attempt)
            self.interval_receipts.setdefault(key, {}).setdefault(m["rank"], msg.digest)
        elif msg.type == "Rewind":
            self.rewinds.setdefault(m["jobId"], []).append(m["toStep"])
        elif msg.type == "VerificationReport":
            self.reports.setdefault(m["receiptDigest"], []).append(msg.digest)

    def interval_of(self, receipt: Msg) -> tuple[str, int, int]:
        """(job id, stepStart, attempt) of an indexed WorkReceipt: the interval it belongs to."""
        return (receipt["jobId"], receipt["stepStart"], self.attempts[receipt.digest])

    def superseded(self, receipt: Msg) -> bool:
        """Whether a Rewind indexed so far supersedes the indexed WorkReceipt ``receipt``."""
        job, start, attempt = self.interval_of(receipt)
        return superseded(attempt, start, self.rewinds.get(job, []))

    def apply(self, effects: list[Effect], digests: set[str]) -> None:
        """Count an authorized operation: the digests it used and what it settled."""
        self.used |= digests
        for e in effects:
            if isinstance(e, Charge):
                self.charges[e.key] = e
                self.epoch_charges.setdefault(e.epoch, []).append(e)
            elif isinstance(e, VoidCharge):
                self.void_charges[e.key] = e
            elif isinstance(e, Slash):
                self.slashed.add(e.receipt)
            else:
                self.closed.add(e.epoch)
                self.last_closed = max(self.last_closed, e.epoch)
