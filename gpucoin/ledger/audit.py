"""Re-check a whole ledger from genesis (``gpucoin ledger audit``; SPEC.md, Money and Signed messages).

``run_audit`` reads every stored message and every transfer row in one read transaction and
reports, as text naming the row or account, everything that does not hold. It applies the very
rules ``Ledger`` applies when it writes, so a ledger rewritten with plain SQL (hash chain
recomputed, append-only triggers dropped) is caught by the same rule that would have refused the
write:

- messages (``_Messages``): every digest recomputes and every signature recovers its signer
  (``gpucoin.ledger.authenticity``); their recording times never run backwards nor into the
  future; replayed in recording order through the admission rules (``gpucoin.ledger.admission``:
  the Genesis first, the market's domain, who signs what, deadlines against the time each was
  recorded, assignments, contiguous receipts, references);
- transfers (``_Chain``): ids run 1, 2, 3, ... and each row chains to the one before, times never
  run backwards nor into the future (beyond ``MAX_CLOCK_SKEW_US``), and the chain head names the
  last row;
- operations (``_Replay``): each still matches its content hash, and replayed in order through
  ``gpucoin.ledger.authorize.authorize_operation`` in the epoch its time falls in, seeing only the
  messages recorded by then, every transfer is authorized by the message it cites and keeps the
  money rules; every coordinator decision (Settlement, EpochClose, Faucet, a Genesis's
  allocations) authorized an operation;
- balances: recomputed from the transfers they equal the stored ones, sum to zero, leave no
  account but issuance below zero, and supply = minted - burned <= the policy's hard cap;
- derived rows: escrows, unbonding entries and every index table (job_order, work_receipt, rewind,
  node_registration, assignment, verification_report, interval_charge, void_charge, slash, epoch_close) are
  exactly what the replays produce.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session, select

from gpucoin.exceptions import GpucoinError
from gpucoin.ledger.accounts import BURNED, ISSUANCE, is_valid_account
from gpucoin.ledger.admission import GENESIS, Admission, ReceiptKey
from gpucoin.ledger.authenticity import verify_message
from gpucoin.ledger.authorize import authorize_operation
from gpucoin.ledger.epochs import epoch_at
from gpucoin.ledger.facts import Facts, GenesisInfo, Msg
from gpucoin.ledger.market import Binding, read_binding
from gpucoin.ledger.models import (
    AccountRow,
    AssignmentRow,
    ChainHead,
    EpochCloseRow,
    EscrowRow,
    IntervalChargeRow,
    JobOrderRow,
    MessageRow,
    NodeRegistrationRow,
    OperationRow,
    RewindRow,
    SlashRow,
    TransferRow,
    UnbondingRow,
    VerificationReportRow,
    VoidChargeRow,
    WorkReceiptRow,
)
from gpucoin.ledger.post import index_row
from gpucoin.ledger.rules import (
    GENESIS_HASH,
    INT64_MAX,
    chain_hash,
    check_balances,
    operation_hash_of_fields,
    supply_of,
)
from gpucoin.ledger.state import Escrow, LedgerState, apply_in_place
from gpucoin.ledger.transfer import Code, Transfer
from gpucoin.wallet.messages import validate_message

_BATCH = 5000
"""Rows fetched from the database at a time while streaming a table."""

MAX_CLOCK_SKEW_US = 5_000_000
"""How far (µs) a writer's clock may run ahead of the auditor's before a row counts as stamped in
the future: 5 s, far more than NTP-synchronized hosts drift, and half the shortest epoch shipped
(a row stamped later could claim an epoch that has not begun)."""


def run_audit(session: Session, *, now_us: int, hard_cap_ugpc: int | None = None) -> list[str]:
    """Re-check the ledger behind ``session`` from genesis (see the module docstring).

    Args:
        session: a session whose transaction gives one consistent view of the ledger.
        now_us: the auditor's clock (µs): no transfer may be stamped after it.
        hard_cap_ugpc: a cap on supply to check besides the policy's (None: the policy's only).

    Returns:
        One line per problem, each naming the message, transfer row, operation or account;
        an empty list means the ledger is sound. Reading stops at nothing: every row is read.
    """
    problems: list[str] = []
    try:
        binding = read_binding(session.connection())
    except GpucoinError as exc:
        problems.append(f"market: {exc}")
        binding = None
    genesis = binding.genesis if binding is not None else None
    messages = _Messages(binding, problems, now_us)
    for m in session.exec(select(MessageRow).order_by(MessageRow.id).execution_options(yield_per=_BATCH)):
        messages.check(m)
    if genesis is None and (messages.count or session.exec(select(TransferRow.id).limit(1)).first() is not None):
        problems.append(
            "market: the ledger has no Genesis (it was written before Genesis messages existed, or its "
            "market row was removed): no transfer can be authorized; start a new ledger"
        )
    operations = {op.op_id: op for op in session.exec(select(OperationRow).execution_options(yield_per=_BATCH))}
    replay = _Replay(genesis, messages.facts, messages.admitted, problems)
    chain = _Chain(now_us, operations, replay.operation, problems)
    for t in session.exec(select(TransferRow).order_by(TransferRow.id).execution_options(yield_per=_BATCH)):
        chain.row(t)
    chain.finish(session.get(ChainHead, 1))
    _check_balances(session, chain, genesis, hard_cap_ugpc, problems)
    problems.extend(_compare_state(session, replay.state))
    if genesis is not None:  # without a Genesis there were no rules to produce these rows
        problems.extend(replay.unused_decisions())
        problems.extend(_compare_admission(session, messages.admission))
        problems.extend(_compare_effects(session, replay.rows))
    return problems


@dataclass
class _Messages:
    """Authenticity and admission of every message, in recording order; the facts the rules read."""

    binding: Binding | None
    problems: list[str]
    now_us: int
    admission: Admission = field(default_factory=lambda: Admission(domain=None, now_s=0, empty=True))
    facts: Facts = field(init=False)
    count: int = 0
    last_time: int = 0
    admitted: list[tuple[int, Msg]] = field(default_factory=list)
    """(recorded_at µs, message) of every admitted message, in recording order: the replay of the
    operations hands them to the facts as its time reaches theirs."""

    def __post_init__(self) -> None:
        self.facts = Facts(self.binding.genesis if self.binding is not None else None, now_epoch=-1)

    def check(self, m: MessageRow) -> None:
        self.count += 1
        where = f"message #{m.id} ({m.primary_type} {m.digest})"
        if not self.last_time <= m.recorded_at <= self.now_us + MAX_CLOCK_SKEW_US:
            self.problems.append(
                f"{where}: recorded at {m.recorded_at} µs, before the message before it ({self.last_time} µs) "
                f"or in the future (now {self.now_us} µs)"
            )
        self.last_time = max(self.last_time, m.recorded_at)
        typed, problem = verify_message(m)
        if problem is not None or typed is None:
            self.problems.append(f"{where}: {problem}")
            return
        genesis = self.facts.genesis
        if genesis is None:
            return  # nothing to admit it against; run_audit reports the missing Genesis once
        fields = validate_message(m.primary_type, typed["message"])
        self.admission.now_s = m.recorded_at // 1_000_000
        try:
            if m.primary_type == GENESIS:
                if m.digest != genesis.digest or m.id != self.binding.first_message_id:
                    raise GpucoinError(
                        f"the market's Genesis is {genesis.digest}, recorded as message #{self.binding.first_message_id}"
                    )
                self.admission.admit_genesis(typed["domain"], fields, m.digest, genesis.policy)
            else:
                self.admission.admit(m.primary_type, typed["domain"], fields, m.digest, m.signer)
        except GpucoinError as exc:
            self.problems.append(f"{where}: not admissible: {exc}")
            return
        self.admitted.append((m.recorded_at, Msg(m.digest, m.primary_type, m.signer, fields)))


@dataclass
class _Replay:
    """Every operation, in order, through the authorization and money rules (``authorize_operation``)."""

    genesis: GenesisInfo | None
    facts: Facts
    admitted: list[tuple[int, Msg]]
    problems: list[str]
    state: LedgerState = field(default_factory=LedgerState)
    rows: dict[type, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    seen: int = 0

    def known_until(self, time_us: int) -> None:
        """Hand the facts every admitted message recorded no later than ``time_us``: an operation
        may rely only on what was recorded when it was posted (``post.ledger_time_us``)."""
        while self.seen < len(self.admitted) and self.admitted[self.seen][0] <= time_us:
            self.facts.add_message(self.admitted[self.seen][1])
            self.seen += 1

    def unused_decisions(self) -> list[str]:
        """Coordinator decisions that authorized no operation. A Settlement, an EpochClose, a Faucet
        or a Genesis with allocations is recorded in the transaction that posts its operation, so
        one left unused is what remains of an operation removed from the chain."""
        self.known_until(1 << 62)
        out = []
        for _, m in self.admitted:
            decision = m.type in ("Settlement", "EpochClose", "Faucet") or (m.type == GENESIS and m["allocations"])
            if decision and m.digest not in self.facts.used:
                out.append(
                    f"message {m.type} {m.digest}: recorded, but authorized no operation (was its operation removed?)"
                )
        return out

    def operation(self, op: OperationRow, rows: list[TransferRow]) -> None:
        """Check and replay operation ``op`` whose transfer rows are ``rows`` (in seq order)."""
        where = f"operation {op.op_id!r} (transfers #{rows[0].id}-#{rows[-1].id})"
        try:
            content = operation_hash_of_fields([[r.debit, r.credit, r.amount, r.code, r.digest] for r in rows], op.memo)
        except TypeError as exc:
            content = f"<not computable: {exc}>"
        if content != op.content_hash:
            self.problems.append(f"{where}: rows no longer match the posted content hash")
        try:
            transfers = [Transfer(r.debit, r.credit, r.amount, Code(r.code), r.digest) for r in rows]
        except Exception as exc:  # a row no Transfer can hold is a finding, named by _Chain too
            self.problems.append(f"{where}: not replayable ({type(exc).__name__}: {exc})")
            return
        if self.genesis is None:  # no rules to authorize by: keep the money rules at least
            try:
                apply_in_place(self.state, transfers, epoch=op.epoch, unbonding_epochs=op.unbonding_epochs)
            except Exception as exc:  # any refusal is a finding: the stored rows break a rule
                self.problems.append(f"{where}: replay breaks the money rules ({type(exc).__name__}: {exc})")
            return
        g = self.genesis
        self.known_until(rows[0].created_at)
        self.facts.now_epoch = epoch_at(rows[0].created_at, g.start_s, g.policy.tokenomics.epoch_length_s)
        if op.epoch != self.facts.now_epoch or op.unbonding_epochs != g.policy.bonding.unbonding_epochs:
            self.problems.append(
                f"{where}: stored epoch {op.epoch} and unbonding period {op.unbonding_epochs}; its time says "
                f"epoch {self.facts.now_epoch} and the policy {g.policy.bonding.unbonding_epochs}"
            )
        names = {t.debit for t in transfers} | {t.credit for t in transfers} | {ISSUANCE, BURNED}
        names |= {
            a
            for m in (self.facts.messages.get(t.digest) for t in transfers)
            if m is not None
            for a in _reads(m, self.facts)
        }
        try:
            part, effects, used = authorize_operation(self.state.subset(names), self.facts, transfers)
        except Exception as exc:  # any refusal is a finding: the stored rows were not authorized
            self.problems.append(f"{where}: not authorized ({type(exc).__name__}: {exc})")
            return
        self.state.merge(part)
        self.facts.apply(effects, used)
        for e in effects:
            table, row = index_row(e, op.op_id)
            self.rows[table].append(row)


def _reads(msg: Msg, facts: Facts) -> set[str]:
    from gpucoin.ledger.authorize import accounts_read

    return accounts_read(msg, facts)


@dataclass
class _Chain:
    """Ids, the hash chain, times and per-row checks of every transfer row, streamed in id order.

    Calls ``on_operation(op, rows)`` once all rows of an operation are in (an operation's rows
    are consecutive, so memory stays O(operations), not O(transfers)), and recomputes balances.
    """

    now_us: int
    operations: dict[str, OperationRow]
    on_operation: Callable[[OperationRow, list[TransferRow]], None]
    problems: list[str]
    balances: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    minted: int = 0
    prev_hash: str = GENESIS_HASH
    last_id: int = 0
    last_time: int = 0
    chain_ok: bool = True
    pending: dict[str, list[TransferRow]] = field(default_factory=lambda: defaultdict(list))
    done: set[str] = field(default_factory=set)

    def row(self, t: TransferRow) -> None:
        where = f"transfer #{t.id} (op {t.op_id!r} seq {t.seq})"
        if t.id != self.last_id + 1:
            self.problems.append(f"{where}: follows transfer #{self.last_id}; ids must run without gaps")
        self.last_id = t.id
        if not self.last_time <= t.created_at <= self.now_us + MAX_CLOCK_SKEW_US:
            self.problems.append(
                f"{where}: created at {t.created_at} µs, before the row before it ({self.last_time} µs) "
                f"or in the future (now {self.now_us} µs)"
            )
        self.last_time = max(self.last_time, t.created_at)
        amount_ok = isinstance(t.amount, int) and not isinstance(t.amount, bool) and 1 <= t.amount <= INT64_MAX
        if not amount_ok:
            self.problems.append(f"{where}: amount {t.amount!r} is not an integer of µGPC in [1, {INT64_MAX}]")
        self._chain(t, where)
        for acct in (t.debit, t.credit):
            if not is_valid_account(acct):
                self.problems.append(f"{where}: {acct!r} is not a ledger account")
        if t.code not in {c.value for c in Code}:
            self.problems.append(f"{where}: unknown code {t.code!r}")
        op = self.operations.get(t.op_id)
        if op is None:
            self.problems.append(f"{where}: operation {t.op_id!r} is not stored")
        elif t.op_id in self.done:
            self.problems.append(f"{where}: operation {t.op_id!r} already has its {op.n_transfers} rows")
        else:
            self.pending[t.op_id].append(t)
            if len(self.pending[t.op_id]) == op.n_transfers:
                rows = sorted(self.pending.pop(t.op_id), key=lambda r: r.seq)
                self.done.add(t.op_id)
                if [r.seq for r in rows] != list(range(op.n_transfers)):
                    self.problems.append(f"operation {op.op_id!r}: its rows have seq {[r.seq for r in rows]}")
                else:
                    self.on_operation(op, rows)
        if amount_ok:
            self.balances[t.debit] -= t.amount
            self.balances[t.credit] += t.amount
            if t.debit == ISSUANCE:
                self.minted += t.amount

    def _chain(self, t: TransferRow, where: str) -> None:
        if self.chain_ok:
            try:
                expected = chain_hash(
                    self.prev_hash,
                    id=t.id,
                    op_id=t.op_id,
                    seq=t.seq,
                    debit=t.debit,
                    credit=t.credit,
                    amount=t.amount,
                    code=t.code,
                    digest=t.digest,
                    created_at=t.created_at,
                )
            except (TypeError, ValueError) as exc:
                expected = f"<not computable: {exc}>"
            if t.prev_hash != self.prev_hash or t.row_hash != expected:
                self.problems.append(
                    f"{where}: first row that does not chain (prev_hash {t.prev_hash[:16]}..., expected "
                    f"{self.prev_hash[:16]}...; row_hash {t.row_hash[:16]}..., recomputed {expected[:16]}...)"
                )
                self.chain_ok = False
        self.prev_hash = t.row_hash

    def finish(self, head: ChainHead | None) -> None:
        if head is None:
            self.problems.append("chain head: missing")
        elif head.last_transfer_id != self.last_id or head.last_hash != self.prev_hash:
            self.problems.append(
                f"chain head: names transfer #{head.last_transfer_id} ({head.last_hash[:16]}...), "
                f"but the last row is #{self.last_id} ({self.prev_hash[:16]}...)"
            )
        for op_id in sorted(set(self.operations) - self.done):
            op = self.operations[op_id]
            self.problems.append(
                f"operation {op_id!r}: has {len(self.pending.get(op_id, []))} transfer rows, posted with {op.n_transfers}"
            )


def _check_balances(
    session: Session, chain: _Chain, genesis: GenesisInfo | None, hard_cap: int | None, problems: list[str]
) -> None:
    """Recomputed balances against the stored ones, and the invariants of SPEC.md (Money)."""
    stored = {a.name: a.balance for a in session.exec(select(AccountRow).execution_options(yield_per=_BATCH))}
    balances = chain.balances
    for acct in sorted(set(stored) | set(balances)):
        if stored.get(acct, 0) != balances.get(acct, 0):
            problems.append(
                f"account {acct}: stored balance {stored.get(acct, 0)} µGPC, recomputed from transfers {balances.get(acct, 0)} µGPC"
            )
    problems.extend(f"recomputed {p}" for p in check_balances(dict(balances)))
    supply = supply_of(balances)
    burned = balances.get(BURNED, 0)
    if supply != chain.minted - burned:
        problems.append(
            f"supply {supply} µGPC != minted {chain.minted} - burned {burned} = {chain.minted - burned} µGPC "
            f"(something was credited back to {ISSUANCE})"
        )
    caps = [c for c in (hard_cap, genesis.policy.tokenomics.hard_cap_ugpc if genesis else None) if c is not None]
    if caps and supply > min(caps):
        problems.append(f"supply {supply} µGPC is above the hard cap {min(caps)} µGPC")


def _compare_state(session: Session, replayed: LedgerState) -> list[str]:
    """Stored escrow and unbonding rows against what replaying every operation produced."""
    problems: list[str] = []
    stored_escrows = {
        r.account: Escrow(source=r.source, amount=r.amount, phase=r.phase) for r in session.exec(select(EscrowRow))
    }
    for acct in sorted(set(stored_escrows) | set(replayed.escrows)):
        if stored_escrows.get(acct) != replayed.escrows.get(acct):
            problems.append(
                f"escrow {acct}: stored {stored_escrows.get(acct)}, replayed from transfers {replayed.escrows.get(acct)}"
            )
    stored_unbonding: dict[str, dict[int, int]] = defaultdict(dict)
    for r in session.exec(select(UnbondingRow)):
        stored_unbonding[r.account][r.mature_epoch] = r.amount
    for acct in sorted(set(stored_unbonding) | set(replayed.unbonding)):
        want = {e: v for e, v in replayed.unbonding.get(acct, {}).items() if v}
        if stored_unbonding.get(acct, {}) != want:
            problems.append(
                f"unbonding {acct}: stored {dict(stored_unbonding.get(acct, {}))} by maturity epoch, "
                f"replayed from transfers {want}"
            )
    return problems


def _diff(
    table: str, stored: dict[Any, Any], replayed: dict[Any, Any], label: Callable[[Any], str] = repr
) -> list[str]:
    """Rows of ``table`` (key -> values) that differ from what the replay produced, each named by ``label(key)``."""
    out: list[str] = []
    for key in sorted(set(stored) | set(replayed), key=repr):
        where = f"{table} {label(key)}"
        if key not in replayed:
            out.append(f"{where}: stored, but nothing admitted or settled produces it")
        elif key not in stored:
            out.append(f"{where}: missing")
        elif stored[key] != replayed[key]:
            out.append(f"{where}: stored {stored[key]}, the replay gives {replayed[key]}")
    return out


def _compare_admission(session: Session, a: Admission) -> list[str]:
    """The index rows the admission rules keep, against the admission replay."""
    problems = _diff("job_order", dict(session.exec(select(JobOrderRow.job_id, JobOrderRow.digest)).all()), a.jobs)
    stored_receipts = {
        ReceiptKey(r.job_id, int(r.rank), int(r.step_start), int(r.attempt)): (int(r.step_end), r.digest)
        for r in session.exec(select(WorkReceiptRow).execution_options(yield_per=_BATCH))
    }
    problems += _diff(
        "work_receipt",
        stored_receipts,
        a.receipts,
        lambda k: f"(job {k.job_id!r}, rank {k.rank}, step {k.step_start}, attempt {k.attempt})",
    )
    problems += _diff(
        "rewind",
        {r.digest: (r.job_id, int(r.attempt), int(r.to_step)) for r in session.exec(select(RewindRow))},
        a.rewound,
    )
    problems += _diff(
        "node_registration",
        {r.digest: (r.provider, r.node_id) for r in session.exec(select(NodeRegistrationRow))},
        a.registered,
    )
    problems += _diff(
        "assignment",
        {
            r.digest: (r.job_id, int(r.rank), r.provider, r.node_id, int(r.from_step))
            for r in session.exec(select(AssignmentRow))
        },
        a.assigned,
    )
    problems += _diff(
        "verification_report",
        {r.digest: (r.receipt_digest, r.verifier, r.verdict) for r in session.exec(select(VerificationReportRow))},
        a.reported,
    )
    return problems


def _compare_effects(session: Session, replayed: dict[type, list[dict[str, Any]]]) -> list[str]:
    """interval_charge, void_charge, slash and epoch_close rows against the effects of the replayed operations."""
    problems: list[str] = []
    for table, key in (
        (IntervalChargeRow, "settlement"),
        (VoidChargeRow, "settlement"),
        (SlashRow, "receipt"),
        (EpochCloseRow, "epoch"),
    ):
        columns = [c.name for c in table.__table__.columns]
        stored = {getattr(r, key): tuple(getattr(r, c) for c in columns) for r in session.exec(select(table))}
        want = {row[key]: tuple(row[c] for c in columns) for row in replayed.get(table, [])}
        problems += _diff(table.__tablename__, stored, want)
    return problems
