"""Re-check a whole ledger from genesis (``gpucoin ledger audit``; SPEC.md, Money and Signed messages).

``run_audit`` reads every stored message and every transfer row in one read transaction and
reports, as text naming the row or account, everything that does not hold:

- every message's digest recomputes from its stored typed data and its signature recovers to
  its stored signer (``gpucoin.wallet.messages``);
- transfer ids run 1, 2, 3, ... and each row chains to the one before (the first row that does
  not is named), and the chain head names the last row;
- every operation's stored content hash matches its transfer rows and memo;
- every transfer's digest names a stored message, and every MINT_* transfer's digest is a
  Settlement whose ``subject`` is a stored WorkReceipt;
- the balances recomputed from the transfers equal the stored balances, sum to zero, leave no
  account but issuance below zero, and supply = minted - burned (<= the hard cap if given);
- every operation, replayed in order through ``gpucoin.ledger.state.apply_operation``, keeps the
  money rules (shapes, escrow pending/post/void, unbonding maturity), and the escrows and
  unbonding entries that replay ends with equal the stored ``escrow`` and ``unbonding`` rows;
- every message, replayed in recording order through ``gpucoin.ledger.admission`` (the ledger's
  bound domain, deadlines against the time it was recorded, known job and worker, contiguous
  receipts per rank), was admissible, and the ``job_order`` and ``work_receipt`` rows are exactly
  what that replay indexes.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from eth_utils import to_checksum_address
from sqlmodel import Session, select

from gpucoin.exceptions import GpucoinError
from gpucoin.ledger.accounts import BURNED, ISSUANCE, is_valid_account
from gpucoin.ledger.admission import SETTLEMENT, WORK_RECEIPT, Admission
from gpucoin.ledger.models import (
    AccountRow,
    ChainHead,
    EscrowRow,
    JobOrderRow,
    MarketRow,
    MessageRow,
    OperationRow,
    TransferRow,
    UnbondingRow,
    WorkReceiptRow,
)
from gpucoin.ledger.rules import (
    GENESIS_HASH,
    INT64_MAX,
    MINT_CODES,
    chain_hash,
    check_balances,
    operation_hash_of_fields,
    supply_of,
)
from gpucoin.ledger.state import Escrow, LedgerState, apply_in_place
from gpucoin.ledger.transfer import Code, Transfer

_BATCH = 5000
"""Rows fetched from the database at a time while streaming a table."""


def _hex_text(value: Any) -> str:
    """Lower-case 0x-hex of bytes or hex text (as canonical JSON stores bytes)."""
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    s = str(value).lower()
    return s if s.startswith("0x") else "0x" + s


def verify_message(row: MessageRow) -> tuple[dict[str, Any] | None, str | None]:
    """Check one stored message against its own typed data.

    Parses the stored canonical JSON and runs ``verify_typed_message`` on it with the row's columns.

    Returns:
        (the parsed typed data, or None if it is not a JSON object; the problem, or None if it holds).
    """
    try:
        typed = json.loads(row.typed_data)
    except (TypeError, ValueError) as exc:
        return None, f"typed data is not JSON ({exc})"
    problem = verify_typed_message(
        typed,
        primary_type=row.primary_type,
        nonce=row.nonce,
        digest=row.digest,
        signature=row.signature,
        signer=row.signer,
    )
    return (typed if isinstance(typed, dict) else None), problem


def verify_typed_message(
    typed: Any, *, primary_type: str, nonce: str | None, digest: str, signature: str, signer: str
) -> str | None:
    """Check parsed typed data against the columns stored beside it; None if it holds, else the problem.

    Checks: the digest recomputes (EIP-712, ``gpucoin.wallet.messages.recover_typed``); the
    signature (65 bytes, 0x-hex) recovers to ``signer`` (a checksum address; high-s signatures are
    refused); the message's own signer field (``SIGNER_FIELD``, e.g. ``JobOrder.consumer``) is
    that signer; ``primary_type`` and ``nonce`` (decimal text, or None) match the typed data.
    """
    from gpucoin.wallet.messages import SIGNER_FIELD, recover_typed

    if not isinstance(typed, dict):
        return "typed data is not a JSON object"
    if typed.get("primaryType") != primary_type:
        return f"primary type {primary_type!r} but the typed data says {typed.get('primaryType')!r}"
    body = typed.get("message")
    if isinstance(body, dict) and "nonce" in body:
        raw = body["nonce"]
        try:
            in_body = str(int(raw, 0) if isinstance(raw, str) else int(raw))
        except (TypeError, ValueError):
            return f"nonce {raw!r} is not an integer"
        if in_body != nonce:
            return f"stored nonce {nonce!r} but the typed data says {in_body}"
    elif nonce is not None:
        return f"stored nonce {nonce!r} but the typed data has none"
    try:
        recomputed, recovered = recover_typed(typed, signature)
    except Exception as exc:  # malformed typed data or signature is a finding, not a crash
        return f"digest or signature does not check ({type(exc).__name__}: {exc})"
    if recomputed != digest.lower():
        return f"digest recomputes to {recomputed}, stored {digest}"
    if recovered != signer:
        return f"signature recovers to {recovered}, stored signer {signer}"
    field = SIGNER_FIELD.get(primary_type)
    if field is not None and (not isinstance(body, dict) or body.get(field) != recovered):
        claimed = body.get(field) if isinstance(body, dict) else None
        return f"{primary_type}.{field} is {claimed} but the message was signed by {recovered}"
    return None


def _operation_problem(op: OperationRow, rows: list[list[Any]]) -> str | None:
    """None if ``rows`` ([seq, debit, credit, amount, code, digest] each) are still exactly what
    operation ``op`` was posted with (seq 0..n-1 and its content hash), else the problem."""
    rows = sorted(rows, key=lambda r: r[0])
    last = op.first_transfer_id + op.n_transfers - 1
    where = f"operation {op.op_id!r} (transfers #{op.first_transfer_id}-#{last})"
    if [r[0] for r in rows] != list(range(op.n_transfers)):
        return f"{where}: its rows have seq {[r[0] for r in rows]}, expected 0-{op.n_transfers - 1}"
    try:
        recomputed = operation_hash_of_fields([r[1:] for r in rows], op.memo)
    except TypeError as exc:
        return f"{where}: content hash not computable ({exc})"
    if recomputed != op.content_hash:
        return f"{where}: rows no longer match the posted content hash"
    return None


def _replay(state: LedgerState, op: OperationRow, rows: list[list[Any]]) -> str | None:
    """Apply operation ``op`` (its rows: [seq, debit, credit, amount, code, digest]) to ``state``
    under the money rules; None if it keeps them, else the problem (``state`` is then unchanged)."""
    try:
        transfers = [Transfer(r[1], r[2], r[3], Code(r[4]), r[5]) for r in sorted(rows, key=lambda r: r[0])]
        apply_in_place(state, transfers, epoch=op.epoch, unbonding_epochs=op.unbonding_epochs)
    except Exception as exc:  # any refusal is a finding: the stored rows break a rule
        return f"operation {op.op_id!r}: replay breaks the money rules ({type(exc).__name__}: {exc})"
    return None


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


def run_audit(session: Session, hard_cap_ugpc: int | None = None) -> list[str]:
    """Re-check the ledger behind ``session`` from genesis (see the module docstring).

    Args:
        session: a session whose transaction gives one consistent view of the ledger.
        hard_cap_ugpc: the policy's hard cap on supply in µGPC, or None to skip that check.

    Returns:
        One line per problem, each naming the message, transfer row, operation or account;
        an empty list means the ledger is sound. Reading stops at nothing: every row is read.
    """
    problems: list[str] = []

    # Messages: authenticity, and what MINT_* transfers need to find.
    message_types: dict[str, str] = {}
    receipts: set[str] = set()
    settlement_subjects: dict[str, str | None] = {}
    market = session.get(MarketRow, 1)
    bound = json.loads(market.domain) if market is not None else None
    admission = Admission(domain=None, now_s=0)
    for m in session.exec(select(MessageRow).order_by(MessageRow.id).execution_options(yield_per=_BATCH)):
        typed, problem = verify_message(m)
        if problem is not None:
            problems.append(f"message #{m.id} ({m.primary_type} {m.digest}): {problem}")
        else:
            admission.now_s = m.recorded_at // 1_000_000
            # held to the market's domain from the first message recorded after the ledger was bound
            admission.domain = bound if market is not None and m.id >= market.first_message_id else None
            try:
                admission.admit(m.primary_type, typed["domain"], typed["message"], m.digest, m.signer)
            except GpucoinError as exc:
                problems.append(f"message #{m.id} ({m.primary_type} {m.digest}): not admissible: {exc}")
        message_types[m.digest] = m.primary_type
        if m.primary_type == WORK_RECEIPT:
            receipts.add(m.digest.lower())
        elif m.primary_type == SETTLEMENT:
            try:
                settlement_subjects[m.digest] = _hex_text(typed["message"]["subject"])  # type: ignore[index]
            except (TypeError, KeyError):
                settlement_subjects[m.digest] = None

    operations = {
        op.op_id: op for op in session.exec(select(OperationRow).execution_options(yield_per=_BATCH))
    }
    # An operation's rows are consecutive, so each is checked (and forgotten) once all its rows
    # are in: memory stays O(operations), not O(transfers).
    op_rows: dict[str, list[list[Any]]] = defaultdict(list)
    ops_checked: set[str] = set()

    # Transfers: ids, chain, per-row rules, recomputed balances.
    balances: dict[str, int] = defaultdict(int)
    replayed = LedgerState()
    minted = 0
    prev_hash = GENESIS_HASH
    last_id = 0
    chain_ok = True
    for t in session.exec(select(TransferRow).order_by(TransferRow.id).execution_options(yield_per=_BATCH)):
        where = f"transfer #{t.id} (op {t.op_id!r} seq {t.seq})"
        if t.id != last_id + 1:
            problems.append(f"{where}: follows transfer #{last_id}; ids must run without gaps")
        last_id = t.id
        amount_ok = isinstance(t.amount, int) and not isinstance(t.amount, bool) and 1 <= t.amount <= INT64_MAX
        if not amount_ok:
            problems.append(f"{where}: amount {t.amount!r} is not an integer of µGPC in [1, {INT64_MAX}]")
        if chain_ok:
            try:
                expected = chain_hash(
                    prev_hash,
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
            if t.prev_hash != prev_hash or t.row_hash != expected:
                problems.append(
                    f"{where}: first row that does not chain (prev_hash {t.prev_hash[:16]}..., "
                    f"expected {prev_hash[:16]}...; row_hash {t.row_hash[:16]}..., recomputed {expected[:16]}...)"
                )
                chain_ok = False
        prev_hash = t.row_hash
        for acct in (t.debit, t.credit):
            if not is_valid_account(acct):
                problems.append(f"{where}: {acct!r} is not a ledger account")
        try:
            code = Code(t.code)
        except ValueError:
            problems.append(f"{where}: unknown code {t.code!r}")
            code = None
        if t.digest not in message_types:
            problems.append(f"{where}: digest {t.digest} names no stored message")
        elif code in MINT_CODES:
            if message_types[t.digest] != SETTLEMENT:
                problems.append(f"{where}: {code.value} authorized by a {message_types[t.digest]}, not a Settlement")
            else:
                subject = settlement_subjects.get(t.digest)
                if subject is None or subject not in receipts:
                    problems.append(
                        f"{where}: {code.value} Settlement {t.digest} has subject {subject}, no stored WorkReceipt"
                    )
        if t.op_id not in operations:
            problems.append(f"{where}: operation {t.op_id!r} is not stored")
        elif t.op_id in ops_checked:
            problems.append(f"{where}: operation {t.op_id!r} already has its {operations[t.op_id].n_transfers} rows")
        else:
            op_rows[t.op_id].append([t.seq, t.debit, t.credit, t.amount, t.code, t.digest])
            if len(op_rows[t.op_id]) == operations[t.op_id].n_transfers:
                rows = op_rows.pop(t.op_id)
                problem = _operation_problem(operations[t.op_id], rows)
                if problem is not None:
                    problems.append(problem)
                problem = _replay(replayed, operations[t.op_id], rows)
                if problem is not None:
                    problems.append(problem)
                ops_checked.add(t.op_id)
        if amount_ok:
            balances[t.debit] -= t.amount
            balances[t.credit] += t.amount
            if t.debit == ISSUANCE:
                minted += t.amount

    head = session.get(ChainHead, 1)
    if head is None:
        problems.append("chain head: missing")
    elif head.last_transfer_id != last_id or head.last_hash != prev_hash:
        problems.append(
            f"chain head: names transfer #{head.last_transfer_id} ({head.last_hash[:16]}...), "
            f"but the last row is #{last_id} ({prev_hash[:16]}...)"
        )

    for op_id in sorted(set(operations) - ops_checked):
        op = operations[op_id]
        problems.append(
            f"operation {op_id!r}: has {len(op_rows.get(op_id, []))} transfer rows, posted with {op.n_transfers}"
        )

    # Balances: recomputed vs stored, and the invariants.
    stored = {a.name: a.balance for a in session.exec(select(AccountRow).execution_options(yield_per=_BATCH))}
    for acct in sorted(set(stored) | set(balances)):
        if stored.get(acct, 0) != balances.get(acct, 0):
            problems.append(
                f"account {acct}: stored balance {stored.get(acct, 0)} µGPC, "
                f"recomputed from transfers {balances.get(acct, 0)} µGPC"
            )
    problems.extend(f"recomputed {p}" for p in check_balances(dict(balances)))
    problems.extend(_compare_state(session, replayed))
    problems.extend(_compare_index(session, admission))
    supply = supply_of(balances)
    burned = balances.get(BURNED, 0)
    if supply != minted - burned:
        problems.append(
            f"supply {supply} µGPC != minted {minted} - burned {burned} = {minted - burned} µGPC "
            f"(something was credited back to {ISSUANCE})"
        )
    if hard_cap_ugpc is not None and supply > hard_cap_ugpc:
        problems.append(f"supply {supply} µGPC is above the hard cap {hard_cap_ugpc} µGPC")
    return problems


def _compare_index(session: Session, admission: Admission) -> list[str]:
    """Differences between the stored job_order / work_receipt rows and the admission replay."""
    problems: list[str] = []
    jobs = {r.job_id: r.digest for r in session.exec(select(JobOrderRow))}
    for job in sorted(set(jobs) | set(admission.jobs)):
        if job not in admission.jobs:
            problems.append(f"job_order {job!r}: stored, but no admitted JobOrder names it")
        elif job not in jobs:
            problems.append(f"job_order {job!r}: missing")
        elif jobs[job] != admission.jobs[job]:
            problems.append(f"job_order {job!r}: names {jobs[job]}, but its JobOrder is {admission.jobs[job]}")
    stored = {
        (r.job_id, int(r.rank), int(r.step_start)): (int(r.step_end), r.digest)
        for r in session.exec(select(WorkReceiptRow).execution_options(yield_per=_BATCH))
    }
    for key in sorted(set(stored) ^ set(admission.receipts)):
        where = f"work_receipt (job {key[0]!r}, rank {key[1]}, step {key[2]})"
        problems.append(f"{where}: " + ("stored, but no admitted WorkReceipt" if key in stored else "missing"))
    for key in sorted(set(stored) & set(admission.receipts)):
        if stored[key] != admission.receipts[key]:
            problems.append(
                f"work_receipt (job {key[0]!r}, rank {key[1]}, step {key[2]}): stored (end, digest) {stored[key]}, "
                f"the receipt says {admission.receipts[key]}"
            )
    return problems
