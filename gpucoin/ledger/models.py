"""The ledger's SQL tables (sqlmodel), portable between SQLite and PostgreSQL.

Money columns are BIGINT (µGPC); on SQLite every table is STRICT, because a plain SQLite
INTEGER column silently stores an overflowing value as REAL (SPEC.md, Money). STRICT tables
accept only the type names INTEGER/TEXT/..., so BIGINT renders as INTEGER on SQLite (the same
64-bit storage) and every string is TEXT. CHECK constraints repeat the rules the code enforces,
so a write that bypasses the code is refused by the database too.

    message      every signed EIP-712 message, unique by digest and by (signer, nonce)
    operation    one client-chosen operation id per post(), with the hash of its content
    transfer     the append-only, hash-chained double-entry transfers
    account      the running balance of every account the transfers touched
    escrow       each job's escrow: the pending hold of its budget, posted or voided
    unbonding    stake on its way out of a bond, by the epoch it matures
    chain_head   one row: the last transfer id and hash (locking it serializes posts)
    market       at most one row: the EIP-712 domain, the Genesis and the policy of the market
    policy       each policy named by hash (canonical JSON), so the rules can be re-applied
    job_order    the one JobOrder of each job id
    work_receipt each admitted WorkReceipt's job, rank and step range (contiguous per rank)
    node_registration, assignment, verification_report
                 the admitted NodeRegistrations, Assignments and VerificationReports
    interval_charge  each interval a Settlement charged, with its epoch (what emission reads)
    void_charge  each void interval of an unvetted job's package a Settlement charged and burned
    slash        each receipt whose worker a Settlement slashed
    epoch_close  each closed epoch and what its EpochClose minted
    head_job     the head service's jobs: state, placement, progress (mutable; no money)

The schema is created and upgraded by the Alembic migrations in ``gpucoin/ledger/migrations``
(``gpucoin.ledger.migrate``); these classes are the ORM's view of it and must match the head
revision (a test compares them). Every table but account, escrow, unbonding and chain_head is
append-only: triggers refuse UPDATE and DELETE on them.
"""

from __future__ import annotations

from typing import Optional

from sqlalchemy import BigInteger, CheckConstraint, Column, ForeignKey, Integer, Text, UniqueConstraint
from sqlalchemy.dialects import sqlite
from sqlmodel import Field, SQLModel

from gpucoin.ledger.accounts import ISSUANCE

BIGINT = BigInteger().with_variant(sqlite.INTEGER(), "sqlite")
"""A signed 64-bit integer column: BIGINT on PostgreSQL, INTEGER (also 64-bit) in a STRICT SQLite table."""

_STRICT = {"sqlite_strict": True}


class MessageRow(SQLModel, table=True):
    """A signed EIP-712 message as stored.

    Attributes:
        id: row number, in order of recording.
        digest: 0x + 64 lower-case hex digits, the EIP-712 digest (unique).
        primary_type: the EIP-712 primary type (JobOrder, WorkReceipt, Settlement, ...).
        signer: checksum address the signature recovers to.
        nonce: the message's ``nonce`` field as decimal text (a uint256 may exceed BIGINT),
            or None if the type has no nonce; (signer, nonce) is unique.
        signature: 0x-hex of the 65-byte signature (r, s, v).
        typed_data: the full typed data (types, primaryType, domain, message) as canonical JSON.
        recorded_at: µs since the Unix epoch.
    """

    __tablename__ = "message"
    __table_args__ = (UniqueConstraint("signer", "nonce", name="uq_message_signer_nonce"), _STRICT)

    id: Optional[int] = Field(default=None, sa_column=Column(BIGINT, primary_key=True, autoincrement=True))
    digest: str = Field(sa_column=Column(Text, nullable=False, unique=True))
    primary_type: str = Field(sa_column=Column(Text, nullable=False, index=True))
    signer: str = Field(sa_column=Column(Text, nullable=False))
    nonce: Optional[str] = Field(default=None, sa_column=Column(Text, nullable=True))
    signature: str = Field(sa_column=Column(Text, nullable=False))
    typed_data: str = Field(sa_column=Column(Text, nullable=False))
    recorded_at: int = Field(sa_column=Column(BIGINT, nullable=False))


class OperationRow(SQLModel, table=True):
    """One ``Ledger.post`` call, keyed by its client-chosen operation id.

    Attributes:
        op_id: the operation id (unique); a retry with the same content returns the same rows.
        content_hash: ``rules.operation_hash`` of its transfers and memo (64 hex digits).
        memo: free text given by the poster.
        first_transfer_id: id of its first transfer row; its rows are consecutive.
        n_transfers: how many transfer rows it wrote (>= 1).
        created_at: µs since the Unix epoch.
        epoch: the ledger's emission epoch when it was posted (None: posted before Genesis
            messages existed, when the poster chose it).
        unbonding_epochs: the policy's unbonding period in force for its UNBOND transfers, in epochs.
    """

    __tablename__ = "operation"
    __table_args__ = (CheckConstraint("n_transfers >= 1", name="ck_operation_n_transfers"), _STRICT)

    op_id: str = Field(sa_column=Column(Text, primary_key=True))
    content_hash: str = Field(sa_column=Column(Text, nullable=False))
    memo: str = Field(default="", sa_column=Column(Text, nullable=False))
    first_transfer_id: int = Field(sa_column=Column(BIGINT, nullable=False))
    n_transfers: int = Field(sa_column=Column(Integer, nullable=False))
    created_at: int = Field(sa_column=Column(BIGINT, nullable=False))
    epoch: Optional[int] = Field(default=None, sa_column=Column(BIGINT, nullable=True))
    unbonding_epochs: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))


class TransferRow(SQLModel, table=True):
    """One double-entry transfer as stored (append-only; a correction is a reversing transfer).

    Attributes:
        id: position in the ledger, 1, 2, 3, ... with no gaps.
        op_id: the operation that wrote it; seq: its index inside that operation (0-based).
        debit, credit: account names; amount: µGPC in [1, 2**63 - 1].
        code: ``Code`` value (why); digest: the authorizing signed message (0x-hex, lower case).
        created_at: µs since the Unix epoch.
        prev_hash: ``row_hash`` of the row before (``rules.GENESIS_HASH`` for id 1).
        row_hash: ``rules.chain_hash(prev_hash, ...)`` of this row.
    """

    __tablename__ = "transfer"
    __table_args__ = (
        CheckConstraint("amount > 0", name="ck_transfer_amount_positive"),
        CheckConstraint("debit <> credit", name="ck_transfer_two_accounts"),
        UniqueConstraint("op_id", "seq", name="uq_transfer_op_seq"),
        _STRICT,
    )

    id: int = Field(sa_column=Column(BIGINT, primary_key=True, autoincrement=False))
    op_id: str = Field(sa_column=Column(Text, ForeignKey("operation.op_id"), nullable=False))
    seq: int = Field(sa_column=Column(Integer, nullable=False))
    debit: str = Field(sa_column=Column(Text, nullable=False, index=True))
    credit: str = Field(sa_column=Column(Text, nullable=False, index=True))
    amount: int = Field(sa_column=Column(BIGINT, nullable=False))
    code: str = Field(sa_column=Column(Text, nullable=False, index=True))
    digest: str = Field(sa_column=Column(Text, ForeignKey("message.digest"), nullable=False, index=True))
    created_at: int = Field(sa_column=Column(BIGINT, nullable=False))
    prev_hash: str = Field(sa_column=Column(Text, nullable=False))
    row_hash: str = Field(sa_column=Column(Text, nullable=False))


class AccountRow(SQLModel, table=True):
    """The running balance of one account (µGPC), updated in the same transaction as its transfers.

    Always recomputable from the transfer rows; ``audit`` compares the two.
    """

    __tablename__ = "account"
    __table_args__ = (
        CheckConstraint(f"balance >= 0 OR name = '{ISSUANCE}'", name="ck_account_not_negative"),
        _STRICT,
    )

    name: str = Field(sa_column=Column(Text, primary_key=True))
    balance: int = Field(default=0, sa_column=Column(BIGINT, nullable=False))


class EscrowRow(SQLModel, table=True):
    """A job's escrow as a two-phase transfer (``gpucoin.ledger.state.Escrow``).

    Attributes:
        account: the escrow account, ``job:<job id>:escrow``.
        source: the wallet ``available`` account its budget came from.
        amount: µGPC held when it was created.
        phase: ``pending``, ``posted`` (fully spent) or ``voided`` (remainder refunded).
        op_id: the operation that created it.
    """

    __tablename__ = "escrow"
    __table_args__ = (
        CheckConstraint("amount > 0", name="ck_escrow_amount_positive"),
        CheckConstraint("phase IN ('pending', 'posted', 'voided')", name="ck_escrow_phase"),
        _STRICT,
    )

    account: str = Field(sa_column=Column(Text, primary_key=True))
    source: str = Field(sa_column=Column(Text, nullable=False))
    amount: int = Field(sa_column=Column(BIGINT, nullable=False))
    phase: str = Field(sa_column=Column(Text, nullable=False))
    op_id: str = Field(sa_column=Column(Text, ForeignKey("operation.op_id"), nullable=False))


class UnbondingRow(SQLModel, table=True):
    """Stake of one wallet still unbonding, per maturity epoch (µGPC); rows sum to the account's balance.

    Attributes:
        account: the wallet's ``unbonding`` account.
        mature_epoch: the first epoch at which this stake may be withdrawn.
        amount: µGPC maturing then (> 0; a row reaching 0 is deleted).
    """

    __tablename__ = "unbonding"
    __table_args__ = (CheckConstraint("amount > 0", name="ck_unbonding_amount_positive"), _STRICT)

    account: str = Field(sa_column=Column(Text, primary_key=True))
    mature_epoch: int = Field(sa_column=Column(BIGINT, primary_key=True, autoincrement=False))
    amount: int = Field(sa_column=Column(BIGINT, nullable=False))


class ChainHead(SQLModel, table=True):
    """The single row (id 1) naming the last transfer: locking it serializes writers on any engine.

    Attributes:
        last_transfer_id: id of the newest transfer row, 0 when there is none.
        last_hash: its ``row_hash``, ``rules.GENESIS_HASH`` when there is none.
    """

    __tablename__ = "chain_head"
    __table_args__ = (CheckConstraint("id = 1", name="ck_chain_head_single_row"), _STRICT)

    id: int = Field(default=1, sa_column=Column(Integer, primary_key=True, autoincrement=False))
    last_transfer_id: int = Field(default=0, sa_column=Column(BIGINT, nullable=False))
    last_hash: str = Field(sa_column=Column(Text, nullable=False))


class MarketRow(SQLModel, table=True):
    """The market a ledger belongs to: the single row (id 1), written with its Genesis.

    Attributes:
        domain: the EIP-712 domain (name, version, chainId, verifyingContract) as canonical JSON;
            every message recorded afterwards must be signed in it.
        bound_at: µs since the Unix epoch.
        first_message_id: the first message id recorded under the domain (the Genesis's; a
            ledger bound before Genesis messages existed may have older messages).
        genesis_digest: the Genesis message's digest (None: a ledger bound before they existed).
        policy_hash: the Genesis's ``policyHash``, a key of ``policy``.
    """

    __tablename__ = "market"
    __table_args__ = (CheckConstraint("id = 1", name="ck_market_single_row"), _STRICT)

    id: int = Field(default=1, sa_column=Column(Integer, primary_key=True, autoincrement=False))
    domain: str = Field(sa_column=Column(Text, nullable=False))
    bound_at: int = Field(sa_column=Column(BIGINT, nullable=False))
    first_message_id: int = Field(sa_column=Column(BIGINT, nullable=False))
    genesis_digest: Optional[str] = Field(default=None, sa_column=Column(Text, nullable=True))
    policy_hash: Optional[str] = Field(default=None, sa_column=Column(Text, nullable=True))


class PolicyRow(SQLModel, table=True):
    """An incentive policy the ledger applies, by its hash.

    Attributes:
        hash: ``gpucoin.policy.model.policy_hash`` of it (0x + 64 hex).
        body: its canonical JSON (``gpucoin.policy.model.canonical_json``), which hashes to ``hash``.
    """

    __tablename__ = "policy"
    __table_args__ = (_STRICT,)

    hash: str = Field(sa_column=Column(Text, primary_key=True))
    body: str = Field(sa_column=Column(Text, nullable=False))


class JobOrderRow(SQLModel, table=True):
    """The JobOrder of one job id (a job has exactly one).

    Attributes:
        job_id: the order's ``jobId``.
        digest: the order message's digest.
    """

    __tablename__ = "job_order"
    __table_args__ = (_STRICT,)

    job_id: str = Field(sa_column=Column(Text, primary_key=True))
    digest: str = Field(sa_column=Column(Text, ForeignKey("message.digest"), nullable=False, unique=True))


class WorkReceiptRow(SQLModel, table=True):
    """One admitted WorkReceipt's place in its rank's sequence (``gpucoin.ledger.admission``).

    Attributes:
        digest: the receipt message's digest.
        job_id / rank: whose receipt it is.
        step_start / step_end: the optimizer steps it covers, ``step_end`` exclusive; per
            (job_id, rank) the live rows tile 0, 1, 2, ... without overlap or gap.
        attempt: how many Rewinds of its job were recorded before it (``rewind``): a Rewind
            supersedes the rows from its ``to_step`` on, and the rank trains those steps again.
    """

    __tablename__ = "work_receipt"
    __table_args__ = (
        UniqueConstraint("job_id", "rank", "step_start", "attempt", name="uq_work_receipt_rank_start"),
        CheckConstraint("step_end > step_start AND step_start >= 0", name="ck_work_receipt_steps"),
        _STRICT,
    )

    digest: str = Field(sa_column=Column(Text, ForeignKey("message.digest"), primary_key=True))
    job_id: str = Field(sa_column=Column(Text, nullable=False))
    rank: int = Field(sa_column=Column(BIGINT, nullable=False))
    step_start: int = Field(sa_column=Column(BIGINT, nullable=False))
    step_end: int = Field(sa_column=Column(BIGINT, nullable=False))
    attempt: int = Field(sa_column=Column(BIGINT, nullable=False, server_default="0"))


class RewindRow(SQLModel, table=True):
    """One admitted Rewind: job ``job_id`` trains again from ``to_step``; its receipts from there
    on, recorded before it, are superseded (``gpucoin.ledger.admission.superseded``).

    Attributes:
        digest: the Rewind message's digest.
        job_id: the job.
        attempt: how many Rewinds of the job were recorded before it, plus one (the receipts
            recorded after it, until the next, carry this attempt).
        to_step: the step its ranks go on from.
    """

    __tablename__ = "rewind"
    __table_args__ = (
        UniqueConstraint("job_id", "attempt", name="uq_rewind_job_attempt"),
        CheckConstraint("attempt > 0 AND to_step >= 0", name="ck_rewind_attempt"),
        _STRICT,
    )

    digest: str = Field(sa_column=Column(Text, ForeignKey("message.digest"), primary_key=True))
    job_id: str = Field(sa_column=Column(Text, nullable=False))
    attempt: int = Field(sa_column=Column(BIGINT, nullable=False))
    to_step: int = Field(sa_column=Column(BIGINT, nullable=False))


class NodeRegistrationRow(SQLModel, table=True):
    """One admitted NodeRegistration: ``provider`` offers the Ray node ``node_id``."""

    __tablename__ = "node_registration"
    __table_args__ = (_STRICT,)

    digest: str = Field(sa_column=Column(Text, ForeignKey("message.digest"), primary_key=True))
    provider: str = Field(sa_column=Column(Text, nullable=False, index=True))
    node_id: str = Field(sa_column=Column(Text, nullable=False))


class AssignmentRow(SQLModel, table=True):
    """One admitted Assignment: ``provider``'s node ``node_id`` holds ``rank`` of ``job_id`` from ``from_step``."""

    __tablename__ = "assignment"
    __table_args__ = (_STRICT,)

    digest: str = Field(sa_column=Column(Text, ForeignKey("message.digest"), primary_key=True))
    job_id: str = Field(sa_column=Column(Text, nullable=False, index=True))
    rank: int = Field(sa_column=Column(BIGINT, nullable=False))
    provider: str = Field(sa_column=Column(Text, nullable=False))
    node_id: str = Field(sa_column=Column(Text, nullable=False))
    from_step: int = Field(sa_column=Column(BIGINT, nullable=False))


class VerificationReportRow(SQLModel, table=True):
    """One admitted VerificationReport: ``verifier``'s ``verdict`` (pass or fail) on ``receipt_digest``."""

    __tablename__ = "verification_report"
    __table_args__ = (_STRICT,)

    digest: str = Field(sa_column=Column(Text, ForeignKey("message.digest"), primary_key=True))
    receipt_digest: str = Field(sa_column=Column(Text, nullable=False, index=True))
    verifier: str = Field(sa_column=Column(Text, nullable=False))
    verdict: str = Field(sa_column=Column(Text, nullable=False))


class IntervalChargeRow(SQLModel, table=True):
    """An interval a Settlement charged to its job's escrow, counted in ``epoch``'s emission.

    Attributes:
        settlement: the Settlement's digest.
        job_id / step_start / attempt: the interval (unique: an interval is charged once), its
            receipts' attempt (``WorkReceiptRow.attempt``) telling a re-run after a Rewind apart.
        epoch: the ledger's epoch when it was charged.
        payment: µGPC charged (the Settlement's ``paid``).
        verifier: the verifier whose passing reports it was checked by, None if unchecked.
        receipts / workers: JSON lists of its receipts' digests and their workers, rank order.
        op_id: the operation that charged it.
    """

    __tablename__ = "interval_charge"
    __table_args__ = (
        UniqueConstraint("job_id", "step_start", "attempt", name="uq_interval_charge_interval"),
        CheckConstraint("payment > 0", name="ck_interval_charge_payment_positive"),
        _STRICT,
    )

    settlement: str = Field(sa_column=Column(Text, ForeignKey("message.digest"), primary_key=True))
    job_id: str = Field(sa_column=Column(Text, nullable=False))
    step_start: int = Field(sa_column=Column(BIGINT, nullable=False))
    attempt: int = Field(sa_column=Column(BIGINT, nullable=False, server_default="0"))
    epoch: int = Field(sa_column=Column(BIGINT, nullable=False, index=True))
    payment: int = Field(sa_column=Column(BIGINT, nullable=False))
    verifier: Optional[str] = Field(default=None, sa_column=Column(Text, nullable=True))
    receipts: str = Field(sa_column=Column(Text, nullable=False))
    workers: str = Field(sa_column=Column(Text, nullable=False))
    op_id: str = Field(sa_column=Column(Text, ForeignKey("operation.op_id"), nullable=False))


class VoidChargeRow(SQLModel, table=True):
    """A void interval of a job whose package is not vetted, charged to its escrow and burned.

    Attributes:
        settlement: the Settlement's digest (its subject: a void VerificationReport).
        job_id / step_start / attempt: the interval (unique, and never also in ``interval_charge``).
        epoch: the ledger's epoch when it was charged (it earns no emission).
        payment: µGPC charged and burned (the Settlement's ``paid``).
        op_id: the operation that charged it.
    """

    __tablename__ = "void_charge"
    __table_args__ = (
        UniqueConstraint("job_id", "step_start", "attempt", name="uq_void_charge_interval"),
        CheckConstraint("payment > 0", name="ck_void_charge_payment_positive"),
        _STRICT,
    )

    settlement: str = Field(sa_column=Column(Text, ForeignKey("message.digest"), primary_key=True))
    job_id: str = Field(sa_column=Column(Text, nullable=False))
    step_start: int = Field(sa_column=Column(BIGINT, nullable=False))
    attempt: int = Field(sa_column=Column(BIGINT, nullable=False, server_default="0"))
    epoch: int = Field(sa_column=Column(BIGINT, nullable=False))
    payment: int = Field(sa_column=Column(BIGINT, nullable=False))
    op_id: str = Field(sa_column=Column(Text, ForeignKey("operation.op_id"), nullable=False))


class SlashRow(SQLModel, table=True):
    """A slash: the signer of ``receipt`` lost stake by ``settlement`` on the evidence of ``report``.

    ``receipt`` is a WorkReceipt (its worker cheated; ``report`` failed it) or a VerificationReport
    a re-check showed false (its verifier is slashed; ``report`` is the first that showed it,
    ``verify.recheck``): one slash per signed message either way."""

    __tablename__ = "slash"
    __table_args__ = (_STRICT,)

    receipt: str = Field(sa_column=Column(Text, primary_key=True))
    settlement: str = Field(sa_column=Column(Text, ForeignKey("message.digest"), nullable=False, unique=True))
    report: str = Field(sa_column=Column(Text, nullable=False))
    op_id: str = Field(sa_column=Column(Text, ForeignKey("operation.op_id"), nullable=False))


class EpochCloseRow(SQLModel, table=True):
    """A closed epoch: its EpochClose ``digest`` minted ``minted`` of ``emission`` µGPC, pro rata
    to ``payments`` µGPC charged in it."""

    __tablename__ = "epoch_close"
    __table_args__ = (_STRICT,)

    epoch: int = Field(sa_column=Column(BIGINT, primary_key=True, autoincrement=False))
    digest: str = Field(sa_column=Column(Text, ForeignKey("message.digest"), nullable=False, unique=True))
    emission: int = Field(sa_column=Column(BIGINT, nullable=False))
    minted: int = Field(sa_column=Column(BIGINT, nullable=False))
    payments: int = Field(sa_column=Column(BIGINT, nullable=False))
    op_id: str = Field(sa_column=Column(Text, ForeignKey("operation.op_id"), nullable=False))


class HeadJobRow(SQLModel, table=True):
    """The head service's own record of one job it runs (``gpucoin.head.jobs``): mutable, unlike
    the ledger's tables, because a job's state moves; the money is never here.

    Attributes:
        job_id: the JobOrder's ``jobId`` (its order is in ``job_order``).
        state: ``head.records.JobState`` value.
        consumer: the order's signer.
        spec_json: the job spec the order's ``specHash`` names, as JSON.
        submitted_ms: when the head took the order (unix ms): ties in the queue go to the earlier.
        node_ids: JSON list of the Ray node id per rank, once placed.
        verifier_node: the Ray node id that replays its intervals, once placed.
        price: the clearing price (µGPC per worker-hour), once placed.
        package_uri: the job package's URI in Ray's GCS (what a replay's runtime env names).
        step: the newest optimizer step rank 0 reported (display only).
        reason: why it waits, or why it stopped.
        summary_json: the final ``JobSummary`` as JSON, once ended.
    """

    __tablename__ = "head_job"
    __table_args__ = (
        CheckConstraint("state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name="ck_head_job_state"),
        _STRICT,
    )

    job_id: str = Field(sa_column=Column(Text, ForeignKey("job_order.job_id"), primary_key=True))
    state: str = Field(sa_column=Column(Text, nullable=False))
    consumer: str = Field(sa_column=Column(Text, nullable=False))
    spec_json: str = Field(sa_column=Column(Text, nullable=False))
    submitted_ms: int = Field(sa_column=Column(BIGINT, nullable=False))
    node_ids: Optional[str] = Field(default=None, sa_column=Column(Text, nullable=True))
    verifier_node: Optional[str] = Field(default=None, sa_column=Column(Text, nullable=True))
    price: Optional[int] = Field(default=None, sa_column=Column(BIGINT, nullable=True))
    package_uri: Optional[str] = Field(default=None, sa_column=Column(Text, nullable=True))
    step: int = Field(default=0, sa_column=Column(BIGINT, nullable=False))
    reason: Optional[str] = Field(default=None, sa_column=Column(Text, nullable=True))
    summary_json: Optional[str] = Field(default=None, sa_column=Column(Text, nullable=True))


LEDGER_TABLES = [
    SQLModel.metadata.tables[name]
    for name in (
        "message",
        "operation",
        "transfer",
        "account",
        "escrow",
        "unbonding",
        "chain_head",
        "market",
        "job_order",
        "work_receipt",
        "rewind",
        "policy",
        "node_registration",
        "assignment",
        "verification_report",
        "interval_charge",
        "slash",
        "epoch_close",
        "void_charge",
        "head_job",
    )
]
"""The ledger's tables, in creation order."""

APPEND_ONLY_TABLES = (
    "message",
    "operation",
    "transfer",
    "market",
    "job_order",
    "work_receipt",
    "rewind",
    "policy",
    "node_registration",
    "assignment",
    "verification_report",
    "interval_charge",
    "slash",
    "epoch_close",
    "void_charge",
)
"""Tables whose rows are never updated or deleted (a trigger refuses it)."""
