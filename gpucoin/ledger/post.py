"""Posting operations: idempotent ids, authorization, the money rules, the hash chain, in one transaction.

``apply_batch`` runs inside the caller's write transaction. It locks the chain head (which
serializes writers and fixes the lock order), sorts out operation ids already posted (same
content: their original ids; other content: ``ConflictError``), loads what the rules of the new
operations read (``load_facts``: the cited messages and the index rows behind them;
``load_state``: the balances, escrows and unbonding entries, locked in name order), runs each
operation through ``gpucoin.ledger.authorize.authorize_operation`` and writes the transfer rows,
the operations, the new state and the index rows of what they settled.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, update
from sqlmodel import Session, select

from gpucoin.exceptions import ConflictError, LedgerError
from gpucoin.ledger.accounts import BURNED, ISSUANCE, account_kind
from gpucoin.ledger.authorize import accounts_read, authorize_operation
from gpucoin.ledger.db import in_, insert_rows
from gpucoin.ledger.epochs import epoch_at
from gpucoin.ledger.facts import Charge, Effect, Facts, GenesisInfo, Msg, Slash, VoidCharge
from gpucoin.ledger.market import msg_of
from gpucoin.ledger.models import (
    AccountRow,
    ChainHead,
    EpochCloseRow,
    EscrowRow,
    IntervalChargeRow,
    JobOrderRow,
    MessageRow,
    OperationRow,
    RewindRow,
    SlashRow,
    TransferRow,
    UnbondingRow,
    VerificationReportRow,
    VoidChargeRow,
    WorkReceiptRow,
)
from gpucoin.ledger.rules import chain_hash
from gpucoin.ledger.state import Escrow, LedgerState, touched_accounts
from gpucoin.ledger.transfer import Code, Operation
from gpucoin.policy.tokenomics import SettledInterval
from gpucoin.wallet.messages import loads_json


def apply_batch(
    s: Session,
    ops: list[Operation],
    contents: list[str],
    genesis: GenesisInfo | None,
    now_us: int,
    known: dict[str, tuple[int, Msg]] | None = None,
) -> list[list[int]]:
    """Post ``ops`` (with their content hashes) in the write transaction of ``s``.

    Args:
        genesis: the market's Genesis, read in this transaction (None: the ledger has none, and
            every new operation is refused).
        now_us: the ledger's time (µs, ``ledger_time_us``): each transfer's ``created_at``, from
            which its epoch follows.
        known: messages recorded in this transaction (``load_facts``), so they are not read back.

    Returns:
        The transfer ids of each operation, in the order given.

    Raises:
        ConflictError: an operation id posted before with other content.
        As ``authorize_operation``, prefixed with the refused operation's id.
    """
    # The chain head first, always: this serializes writers and fixes the lock order.
    head = lock_head(s)
    stored = {
        o.op_id: o for o in s.exec(select(OperationRow).where(OperationRow.op_id.in_({op.op_id for op in ops}))).all()
    }
    results: list[list[int] | None] = [None] * len(ops)
    fresh: dict[str, int] = {}  # op id -> index of the new operation in this batch
    for i, (op, content) in enumerate(zip(ops, contents, strict=True)):
        prior = stored.get(op.op_id)
        prior_content = prior.content_hash if prior is not None else None
        if prior is None and op.op_id in fresh:
            prior_content = contents[fresh[op.op_id]]
        if prior_content is not None:
            if prior_content != content:
                raise ConflictError(
                    f"operation {op.op_id!r} was posted with different content "
                    f"(hash {prior_content[:16]}...; now {len(op.transfers)} transfers, hash {content[:16]}...)"
                )
            if prior is not None:  # posted before: its original ids
                results[i] = list(range(prior.first_transfer_id, prior.first_transfer_id + prior.n_transfers))
            continue
        fresh[op.op_id] = i
    new_ops = [ops[i] for i in sorted(fresh.values())]
    if new_ops:
        if genesis is None:
            raise LedgerError("this ledger has no Genesis yet: it posts no transfer (Ledger.init_genesis)")
        tokenomics = genesis.policy.tokenomics
        facts = load_facts(
            s, new_ops, genesis, epoch_at(now_us, genesis.start_s, tokenomics.epoch_length_s), known or {}
        )
        reads = {ISSUANCE, BURNED}.union(*(accounts_read(m, facts) for m in facts.messages.values()))
        state, before = load_state(s, set().union(reads, *(touched_accounts(op.transfers) for op in new_ops)))
        next_id, prev = head.last_transfer_id + 1, head.last_hash
        op_rows: list[dict[str, Any]] = []
        transfer_rows: list[dict[str, Any]] = []
        index: dict[type, list[dict[str, Any]]] = {
            IntervalChargeRow: [],
            VoidChargeRow: [],
            SlashRow: [],
            EpochCloseRow: [],
        }
        created: dict[str, str] = {}
        for op in new_ops:
            had = set(state.escrows)
            try:
                state, effects, used = authorize_operation(state, facts, op.transfers)
            except LedgerError as exc:
                raise type(exc)(f"operation {op.op_id!r}: {exc}") from None
            facts.apply(effects, used)
            for e in effects:
                table, row = index_row(e, op.op_id)
                index[table].append(row)
            created.update({a: op.op_id for a in set(state.escrows) - had})
            first = next_id
            for seq, t in enumerate(op.transfers):
                fields = dict(
                    id=next_id,
                    op_id=op.op_id,
                    seq=seq,
                    debit=t.debit,
                    credit=t.credit,
                    amount=t.amount,
                    code=Code(t.code).value,
                    digest=t.digest.lower(),
                    created_at=now_us,
                )
                row_hash = chain_hash(prev, **fields)
                transfer_rows.append({**fields, "prev_hash": prev, "row_hash": row_hash})
                prev = row_hash
                next_id += 1
            op_rows.append(
                dict(
                    op_id=op.op_id,
                    content_hash=contents[fresh[op.op_id]],
                    memo=op.memo,
                    first_transfer_id=first,
                    n_transfers=len(op.transfers),
                    created_at=now_us,
                    epoch=facts.now_epoch,
                    unbonding_epochs=genesis.policy.bonding.unbonding_epochs,
                )
            )
            results[fresh[op.op_id]] = list(range(first, next_id))
        insert_rows(s, OperationRow.__table__, op_rows)
        insert_rows(s, TransferRow.__table__, transfer_rows)
        for table, rows in index.items():
            insert_rows(s, table.__table__, rows)
        write_state(s, state, before, created)
        head.last_transfer_id = next_id - 1
        head.last_hash = prev
        s.add(head)
    for i, op in enumerate(ops):  # repeats of an id new in this batch
        if results[i] is None:
            results[i] = results[fresh[op.op_id]]
    return [list(r) for r in results if r is not None]


def lock_head(s: Session) -> ChainHead:
    """Lock the chain head row (``SELECT ... FOR UPDATE``): every write takes it first, so writers
    serialize and messages are admitted against what the writers before them stored (SQLite's
    ``BEGIN IMMEDIATE`` already holds the whole database)."""
    return s.exec(select(ChainHead).where(ChainHead.id == 1).with_for_update()).one()


def ledger_time_us(s: Session, now_us: int) -> int:
    """The ledger's time for a write at clock time ``now_us`` (µs): after the newest stored
    transfer's ``created_at`` and the newest message's ``recorded_at``, so times along the chain and
    along the messages never run backwards, a message is always recorded no later than any
    operation posted after it (the audit checks both), whichever writer's clock was read first,
    and what a later write recorded is never taken by the audit for something an earlier
    operation could read (a Rewind recorded after a charge of the interval it supersedes)."""
    head = s.exec(select(ChainHead.last_transfer_id).where(ChainHead.id == 1)).first()
    last = s.exec(select(TransferRow.created_at).where(TransferRow.id == head)).first() if head else None
    last_message = s.exec(select(func.max(MessageRow.id))).one()
    recorded = (
        s.exec(select(MessageRow.recorded_at).where(MessageRow.id == last_message)).first() if last_message else None
    )
    return max(now_us, -1 if last is None else last + 1, -1 if recorded is None else recorded + 1)


def index_row(effect: Effect, op_id: str) -> tuple[type, dict[str, Any]]:
    """The index table and row that record one effect of operation ``op_id``."""
    if isinstance(effect, VoidCharge):
        return VoidChargeRow, dict(
            settlement=effect.settlement,
            job_id=effect.job_id,
            step_start=effect.step_start,
            attempt=effect.attempt,
            epoch=effect.epoch,
            payment=effect.payment,
            op_id=op_id,
        )
    if isinstance(effect, Charge):
        iv = effect.interval
        return IntervalChargeRow, dict(
            settlement=effect.settlement,
            job_id=effect.job_id,
            step_start=effect.step_start,
            attempt=effect.attempt,
            epoch=effect.epoch,
            payment=iv.payment_ugpc,
            verifier=iv.verifier,
            receipts=json.dumps(list(iv.receipt_digests)),
            workers=json.dumps(list(iv.workers)),
            op_id=op_id,
        )
    if isinstance(effect, Slash):
        return SlashRow, dict(receipt=effect.receipt, settlement=effect.settlement, report=effect.report, op_id=op_id)
    return EpochCloseRow, dict(
        epoch=effect.epoch,
        digest=effect.digest,
        emission=effect.emission,
        minted=effect.minted,
        payments=effect.payments,
        op_id=op_id,
    )


def charge_of(row: Any) -> Charge:
    """The ``Charge`` an ``interval_charge`` row records."""
    interval = SettledInterval(
        tuple(loads_json(row.receipts)), tuple(loads_json(row.workers)), row.verifier, int(row.payment)
    )
    return Charge(row.settlement, row.job_id, int(row.step_start), int(row.attempt), int(row.epoch), interval)


class _Messages:
    """Recorded messages by digest, read once each: those of the batch (already parsed) first."""

    def __init__(self, s: Session, known: dict[str, tuple[int, Msg]]) -> None:
        self.s = s
        self.found: dict[str, tuple[int, Msg]] = dict(known)  # digest -> (message id, Msg)

    def load(self, digests: Iterable[str]) -> None:
        """Read the messages of ``digests`` not read yet (unknown digests stay missing)."""
        wanted = sorted(set(digests) - set(self.found))
        if not wanted:
            return
        t = MessageRow.__table__
        rows = self.s.execute(
            select(t.c.id, t.c.digest, t.c.primary_type, t.c.signer, t.c.typed_data).where(
                in_(self.s, t.c.digest, wanted)
            )
        ).all()
        for row in rows:
            self.found[row.digest] = (int(row.id), msg_of(row))

    def get(self, digest: str) -> Msg | None:
        hit = self.found.get(digest)
        return None if hit is None else hit[1]

    def of_type(self, kind: str) -> list[Msg]:
        return [m for _, m in self.found.values() if m.type == kind]


def load_facts(
    s: Session, ops: list[Operation], genesis: GenesisInfo, now_epoch: int, known: dict[str, tuple[int, Msg]]
) -> Facts:
    """What the authorization rules of ``ops`` read, from the database (inside the write transaction).

    The cited messages; a Settlement's subject and, for a report, its receipt; every receipt of
    the intervals those belong to (in every attempt) and every report of them; the jobs'
    JobOrders and Rewinds (which tell each receipt's attempt); which cited
    digests already authorized an operation; the charges and slashes of those intervals and
    receipts; and, for an EpochClose, every charge of its epoch and the closed epochs.

    Args:
        known: the messages recorded in this transaction, by digest: (message id, Msg); not read again.
    """
    facts = Facts(genesis, now_epoch)
    cited = {t.digest.lower() for op in ops for t in op.transfers}
    msgs = _Messages(s, known)
    msgs.load(cited)
    subjects = {m["subject"] for m in msgs.of_type("Settlement") if m.digest in cited}
    msgs.load(subjects)
    msgs.load({m["receiptDigest"] for m in msgs.of_type("VerificationReport") if m.digest in subjects})
    receipts = msgs.of_type("WorkReceipt")
    intervals = sorted({(m["jobId"], m["stepStart"]) for m in receipts})
    jobs = sorted({m["jobId"] for _, m in msgs.found.values() if "jobId" in m.fields})
    if intervals:
        wanted = set(intervals)
        wr, vr = WorkReceiptRow.__table__, VerificationReportRow.__table__
        # (job, step) pairs as two ANY lists, the pairs picked in Python: one array per column
        receipt_digests = {
            r.digest
            for r in s.execute(
                select(wr.c.digest, wr.c.job_id, wr.c.step_start).where(
                    in_(s, wr.c.job_id, jobs), in_(s, wr.c.step_start, sorted({st for _, st in wanted}))
                )
            ).all()
            if (r.job_id, int(r.step_start)) in wanted
        }
        reports = set(
            s.execute(select(vr.c.digest).where(in_(s, vr.c.receipt_digest, sorted(receipt_digests)))).scalars()
        )
        jo, rw = JobOrderRow.__table__, RewindRow.__table__
        orders = set(s.execute(select(jo.c.digest).where(in_(s, jo.c.job_id, jobs))).scalars())
        rewinds = set(s.execute(select(rw.c.digest).where(in_(s, rw.c.job_id, jobs))).scalars())
        msgs.load(receipt_digests | reports | orders | rewinds)
        ic = IntervalChargeRow.__table__
        for row in s.execute(
            select(ic).where(in_(s, ic.c.job_id, jobs), in_(s, ic.c.step_start, sorted({st for _, st in wanted})))
        ).all():
            if (row.job_id, int(row.step_start)) in wanted:
                charge = charge_of(row)
                facts.charges[charge.key] = charge
        vc = VoidChargeRow.__table__
        for row in s.execute(
            select(vc).where(in_(s, vc.c.job_id, jobs), in_(s, vc.c.step_start, sorted({st for _, st in wanted})))
        ).all():
            if (row.job_id, int(row.step_start)) in wanted:
                void = VoidCharge(
                    row.settlement, row.job_id, int(row.step_start), int(row.attempt), int(row.epoch), int(row.payment)
                )
                facts.void_charges[void.key] = void
        sl = SlashRow.__table__
        facts.slashed.update(
            s.execute(select(sl.c.receipt).where(in_(s, sl.c.receipt, sorted(receipt_digests | reports)))).scalars()
        )
    for _, m in sorted(msgs.found.values(), key=lambda found: found[0]):  # recording order: reports keep theirs
        facts.add_message(m)
    tr = TransferRow.__table__
    facts.used.update(s.execute(select(tr.c.digest).where(in_(s, tr.c.digest, sorted(cited))).distinct()).scalars())
    closing = sorted({m["epoch"] for m in msgs.of_type("EpochClose") if m.digest in cited})
    if closing:
        ic = IntervalChargeRow.__table__
        for row in s.execute(select(ic).where(ic.c.epoch.in_(closing))).all():
            facts.epoch_charges.setdefault(int(row.epoch), []).append(charge_of(row))
        ec = EpochCloseRow.__table__
        facts.closed.update(s.execute(select(ec.c.epoch).where(ec.c.epoch.in_(closing))).scalars())
        last = s.execute(select(func.max(ec.c.epoch))).scalar()
        facts.last_closed = -1 if last is None else int(last)
    return facts


def load_state(s: Session, names: set[str]) -> tuple[LedgerState, LedgerState]:
    """Lock and read every account, escrow and unbonding row of ``names``, each set in name order.

    Returns the state to apply operations to and a copy of it as read (to diff on write).
    """
    ordered = sorted(names)
    escrows = [n for n in ordered if account_kind(n) == "escrow"]
    unbonding = [n for n in ordered if account_kind(n) == "unbonding"]
    state = LedgerState()
    for r in s.exec(
        select(AccountRow).where(AccountRow.name.in_(ordered)).order_by(AccountRow.name).with_for_update()
    ).all():
        state.balances[r.name] = int(r.balance)
    if escrows:
        for r in s.exec(
            select(EscrowRow).where(EscrowRow.account.in_(escrows)).order_by(EscrowRow.account).with_for_update()
        ).all():
            state.escrows[r.account] = Escrow(source=r.source, amount=int(r.amount), phase=r.phase)
    if unbonding:
        for r in s.exec(
            select(UnbondingRow)
            .where(UnbondingRow.account.in_(unbonding))
            .order_by(UnbondingRow.account, UnbondingRow.mature_epoch)
            .with_for_update()
        ).all():
            state.unbonding.setdefault(r.account, {})[int(r.mature_epoch)] = int(r.amount)
    return state, state.copy()


def write_state(s: Session, state: LedgerState, before: LedgerState, created: dict[str, str]) -> None:
    """Write what changed between ``before`` and ``state`` (balances, escrows, unbonding)."""
    changed = [(n, v) for n, v in state.balances.items() if before.balances.get(n) != v]
    updates = [{"n": n, "b": v} for n, v in changed if n in before.balances]
    inserts = [{"name": n, "balance": v} for n, v in changed if n not in before.balances]
    table = AccountRow.__table__
    if updates:
        s.execute(update(table).where(table.c.name == bindparam("n")).values(balance=bindparam("b")), updates)
    if inserts:
        s.execute(insert(table), inserts)
    esc_new = [
        dict(account=a, source=e.source, amount=e.amount, phase=e.phase, op_id=created[a])
        for a, e in state.escrows.items()
        if a not in before.escrows
    ]
    esc_changed = [
        {"a": a, "p": e.phase} for a, e in state.escrows.items() if a in before.escrows and before.escrows[a] != e
    ]
    etable = EscrowRow.__table__
    if esc_new:
        s.execute(insert(etable), esc_new)
    if esc_changed:
        s.execute(update(etable).where(etable.c.account == bindparam("a")).values(phase=bindparam("p")), esc_changed)
    touched = [a for a, e in state.unbonding.items() if before.unbonding.get(a) != e]
    if touched:
        utable = UnbondingRow.__table__
        s.execute(delete(utable).where(utable.c.account.in_(touched)))
        rows = [
            dict(account=a, mature_epoch=epoch, amount=amount)
            for a in touched
            for epoch, amount in sorted(state.unbonding[a].items())
            if amount > 0
        ]
        if rows:
            s.execute(insert(utable), rows)
