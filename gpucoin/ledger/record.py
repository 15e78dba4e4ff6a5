"""Recording signed messages: check each on its own, then admit and store a batch in one transaction.

``check_messages`` runs before any transaction: canonical typed data, digest, low-s signature,
signer = the message's own signer field (``gpucoin.ledger.audit.verify_typed_message``, the
check the audit repeats). ``insert_messages`` runs inside the caller's write transaction: it loads
what the admission rules read for the batch (``gpucoin.ledger.admission``), refuses a reused
nonce, admits each message in order, and stores it with the index rows the rules keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from eth_utils import is_address
from sqlalchemy import and_, func, or_
from sqlmodel import Session, select

from gpucoin.exceptions import LedgerError, NonceReused, SignatureError
from gpucoin.ledger.admission import (
    ASSIGNMENT,
    JOB_ORDER,
    NODE_REGISTRATION,
    REWIND,
    UNBOND,
    VERIFICATION_REPORT,
    WITHDRAW,
    WORK_RECEIPT,
    Admission,
    AssignmentHead,
    Known,
    ReceiptHead,
    superseded,
)
from gpucoin.ledger.authenticity import verify_typed_message
from gpucoin.ledger.db import MAX_BATCH, hex_bytes, insert_rows, nonce_text, typed_text
from gpucoin.ledger.market import Binding
from gpucoin.ledger.models import (
    AssignmentRow,
    JobOrderRow,
    MessageRow,
    NodeRegistrationRow,
    RewindRow,
    VerificationReportRow,
    WorkReceiptRow,
)
from gpucoin.wallet.messages import SignedMessage, checksum_address, loads_json


class Checked(NamedTuple):
    """A signed message checked before any transaction."""

    row: dict[str, Any]
    """Its ``message`` row, all but ``recorded_at`` (set when it is inserted)."""
    typed: dict[str, Any]
    """Its typed data, as stored (parsed from ``row["typed_data"]``)."""


def check_message(signed: Any) -> Checked:
    """One signed message's row and typed data, after checking it on its canonical stored text.

    Args:
        signed: a ``SignedMessage`` (``SignedMessage.from_json`` parses one from untrusted text).

    Raises:
        SignatureError: if it is not a SignedMessage, or the digest, signature, signer or primary
            type does not check.
    """
    if not isinstance(signed, SignedMessage):  # what it builds must be bounded and canonical: ours only
        raise SignatureError(f"a signed message must be a SignedMessage, got {type(signed).__name__}")
    typed = signed.typed_data()
    digest = hex_bytes(signed.digest, 32, "digest")
    if not (isinstance(signed.signer, str) and is_address(signed.signer)):
        raise SignatureError(f"signer is not an address: {signed.signer!r}")
    fields = dict(
        digest=digest,
        primary_type=str(signed.primary_type),
        signer=checksum_address(signed.signer),
        nonce=nonce_text(typed.get("message")),
        signature=hex_bytes(signed.signature, 65, "signature"),
        typed_data=typed_text(typed),
    )
    # Checked on the text as stored, so what the audit later re-verifies is what passed here.
    # typed_data() of a SignedMessage is built of fresh dicts, lists, str, int and bool only,
    # which JSON round-trips exactly: parsing the text back would give an equal object.
    stored = typed
    problem = verify_typed_message(
        stored,
        primary_type=fields["primary_type"],
        nonce=fields["nonce"],
        digest=digest,
        signature=fields["signature"],
        signer=fields["signer"],
    )
    if problem is not None:
        raise SignatureError(f"message {digest} refused: {problem}")
    return Checked(fields, stored)


def check_messages(signed: Sequence[Any]) -> dict[str, Checked]:
    """The checked messages of ``signed`` by digest (repeats dropped), before any transaction.

    Raises:
        SignatureError: naming the first message that does not check.
        LedgerError: for more than ``MAX_BATCH`` messages.
    """
    if len(signed) > MAX_BATCH:
        raise LedgerError(f"{len(signed)} messages in one batch; at most {MAX_BATCH}")
    rows: dict[str, Checked] = {}
    for m in signed:
        checked = check_message(m)
        rows.setdefault(checked.row["digest"], checked)
    return rows


def new_messages(s: Session, rows: dict[str, Checked]) -> list[Checked]:
    """The messages of ``rows`` not stored yet, in the order given."""
    stored = set(s.exec(select(MessageRow.digest).where(MessageRow.digest.in_(list(rows)))).all())
    return [r for d, r in rows.items() if d not in stored]


def insert_messages(s: Session, new: list[Checked], binding: Binding | None, now_us: int) -> int:
    """Admit and store ``new`` (messages not stored yet), in order, in the transaction of ``s``.

    Args:
        binding: the market the ledger belongs to, read in this transaction (None: no Genesis yet).
        now_us: the ledger's clock (µs): deadlines are checked against it and it is stored as
            each message's ``recorded_at``, against which the audit checks them again.

    Returns:
        How many were stored.

    Raises:
        As ``Admission.admit`` and ``check_nonces``; then nothing is stored.
    """
    if not new:
        return 0
    admission = load_admission(s, new, binding, now_us // 1_000_000)
    for r, typed in new:  # the domain before anything else: a message for another market is not a replay here
        admission.check_domain(r["primary_type"], typed["domain"], r["digest"])
    check_nonces(s, [r for r, _ in new])
    for r, typed in new:
        admission.admit(r["primary_type"], typed["domain"], typed["message"], r["digest"], r["signer"])
    insert_rows(s, MessageRow.__table__, [{**r, "recorded_at": now_us} for r, _ in new])
    insert_index_rows(s, admission, {r["digest"] for r, _ in new})
    return len(new)


def insert_index_rows(s: Session, admission: Admission, digests: set[str]) -> None:
    """Store the index rows of the admitted messages ``digests`` (job_order, work_receipt, ...)."""
    insert_rows(
        s, JobOrderRow.__table__, [{"job_id": j, "digest": d} for j, d in admission.jobs.items() if d in digests]
    )
    insert_rows(
        s,
        WorkReceiptRow.__table__,
        [
            {
                "digest": d,
                "job_id": k.job_id,
                "rank": k.rank,
                "step_start": k.step_start,
                "step_end": end,
                "attempt": k.attempt,
            }
            for k, (end, d) in admission.receipts.items()
            if d in digests
        ],
    )
    insert_rows(
        s,
        RewindRow.__table__,
        [
            {"digest": d, "job_id": j, "attempt": a, "to_step": t}
            for d, (j, a, t) in admission.rewound.items()
            if d in digests
        ],
    )
    insert_rows(
        s,
        NodeRegistrationRow.__table__,
        [{"digest": d, "provider": p, "node_id": n} for d, (p, n) in admission.registered.items() if d in digests],
    )
    insert_rows(
        s,
        AssignmentRow.__table__,
        [
            {"digest": d, "job_id": j, "rank": r, "provider": p, "node_id": n, "from_step": f}
            for d, (j, r, p, n, f) in admission.assigned.items()
            if d in digests
        ],
    )
    insert_rows(
        s,
        VerificationReportRow.__table__,
        [
            {"digest": d, "receipt_digest": rc, "verifier": v, "verdict": x}
            for d, (rc, v, x) in admission.reported.items()
            if d in digests
        ],
    )


def check_nonces(s: Session, new: list[dict[str, Any]]) -> None:
    """Refuse a (signer, nonce) used twice in ``new`` or already used by a stored message.

    Raises:
        NonceReused: naming both messages.
    """
    seen: dict[tuple[str, str], str] = {}
    by_signer: dict[str, list[str]] = {}
    for r in new:
        if r["nonce"] is not None:
            key = (r["signer"], r["nonce"])
            if key in seen:
                raise NonceReused(
                    f"{r['signer']} used nonce {r['nonce']} in two messages ({seen[key]} and {r['digest']})"
                )
            seen[key] = r["digest"]
            by_signer.setdefault(r["signer"], []).append(r["nonce"])
    if not by_signer:
        return
    # One (signer = ? AND nonce IN (...)) per signer: both backends answer it from the
    # unique (signer, nonce) index, where a row-value IN of many pairs is planned poorly.
    other = s.exec(
        select(MessageRow)
        .where(or_(*(and_(MessageRow.signer == k, MessageRow.nonce.in_(v)) for k, v in by_signer.items())))
        .limit(1)
    ).first()
    if other is not None:
        refused = seen[(other.signer, other.nonce)]
        raise NonceReused(
            f"{other.signer} already used nonce {other.nonce} in message #{other.id} "
            f"({other.primary_type} {other.digest}); refused {refused} (a replay)"
        )


def load_admission(s: Session, new: list[Checked], binding: Binding | None, now_s: int) -> Admission:
    """The admission state the messages of ``new`` need, read inside the write transaction."""
    genesis = binding.genesis if binding is not None else None
    admission = Admission(domain=binding.domain if genesis is not None else None, now_s=now_s)
    if genesis is not None:
        admission.genesis = {"coordinator": genesis.coordinator, "admin": genesis.admin, "dev": genesis.dev}
    jobs: set[str] = set()
    providers: set[str] = set()
    ranks: set[tuple[str, int]] = set()
    refs: set[str] = set()
    rewinds: set[tuple[str, int]] = set()
    for r, typed in new:
        m, kind = typed["message"], r["primary_type"]
        if kind in (JOB_ORDER, WORK_RECEIPT, ASSIGNMENT, REWIND):
            jobs.add(m["jobId"])
        if kind in (WORK_RECEIPT, ASSIGNMENT):
            ranks.add((m["jobId"], m["rank"]))
        if kind == REWIND:
            rewinds.add((m["jobId"], m["toStep"]))
        if kind in (ASSIGNMENT, UNBOND, WITHDRAW, NODE_REGISTRATION):
            providers.add(m["provider"])
        refs.update(admission.references(kind, m))
    if jobs:
        orders = s.exec(
            select(JobOrderRow.job_id, MessageRow.digest, MessageRow.typed_data)
            .join(MessageRow, MessageRow.digest == JobOrderRow.digest)
            .where(JobOrderRow.job_id.in_(sorted(jobs)))
        ).all()
        for job, digest, text in orders:
            admission.jobs[job] = digest
            admission.workers[job] = loads_json(text)["message"]["workers"]
    if providers:
        for provider, node in s.exec(
            select(NodeRegistrationRow.provider, NodeRegistrationRow.node_id).where(
                NodeRegistrationRow.provider.in_(sorted(providers))
            )
        ).all():
            admission.nodes.setdefault(provider, set()).add(node)
    if ranks or rewinds:  # a Rewind reads every rank's head of its job
        _load_rank_heads(s, admission, sorted({j for j, _ in ranks | rewinds}))
    if rewinds:
        _load_ends(s, admission, rewinds)
    if refs:
        _load_known(s, admission, sorted(refs))
    return admission


def _load_ends(s: Session, admission: Admission, pairs: set[tuple[str, int]]) -> None:
    """Into ``admission.ends``: the recorded receipts of each (job, step) of ``pairs`` that end there."""
    loaded = {(j, st) for (j, _, st) in admission.ends}
    wanted = pairs - loaded
    if not wanted:
        return
    rows = s.exec(
        select(WorkReceiptRow).where(
            WorkReceiptRow.job_id.in_(sorted({j for j, _ in wanted})),
            WorkReceiptRow.step_end.in_(sorted({st for _, st in wanted})),
        )
    ).all()
    for row in sorted(rows, key=lambda r: int(r.attempt)):
        if (row.job_id, int(row.step_end)) in wanted:
            admission.ends.setdefault((row.job_id, int(row.rank), int(row.step_end)), []).append(
                (int(row.attempt), int(row.step_start), row.digest)
            )


def _load_rank_heads(s: Session, admission: Admission, jobs: list[str]) -> None:
    """The Rewinds of ``jobs``, and the latest Assignment and live receipt of every rank of them.

    A rank's latest live receipt is its newest of the job's current attempt or, if it has none
    yet, the live one ending where the last Rewind went back to (none for step 0)."""
    for row in s.exec(select(RewindRow).where(RewindRow.job_id.in_(jobs)).order_by(RewindRow.attempt)).all():
        admission.rewind_steps.setdefault(row.job_id, []).append(int(row.to_step))
    for row in s.exec(
        select(AssignmentRow)
        .join(MessageRow, MessageRow.digest == AssignmentRow.digest)
        .where(AssignmentRow.job_id.in_(jobs))
        .order_by(MessageRow.id)
    ).all():  # in recording order: the last one per rank wins
        admission.assignments[(row.job_id, int(row.rank))] = AssignmentHead(
            row.provider, row.node_id, int(row.from_step), row.digest
        )
    latest = (
        select(
            WorkReceiptRow.job_id,
            WorkReceiptRow.rank,
            WorkReceiptRow.attempt,
            func.max(WorkReceiptRow.step_start).label("start"),
        )
        .where(WorkReceiptRow.job_id.in_(jobs))
        .group_by(WorkReceiptRow.job_id, WorkReceiptRow.rank, WorkReceiptRow.attempt)
        .subquery()
    )
    for row in s.exec(
        select(WorkReceiptRow).join(
            latest,
            and_(
                WorkReceiptRow.job_id == latest.c.job_id,
                WorkReceiptRow.rank == latest.c.rank,
                WorkReceiptRow.attempt == latest.c.attempt,
                WorkReceiptRow.step_start == latest.c.start,
            ),
        )
    ).all():
        if int(row.attempt) == len(admission.rewind_steps.get(row.job_id, [])):
            admission.receipt_heads[(row.job_id, int(row.rank))] = ReceiptHead(int(row.step_end), row.digest)
    back = {(j, steps[-1]) for j, steps in admission.rewind_steps.items() if steps and steps[-1] > 0}
    if back:
        _load_ends(s, admission, back)
    for job, to_step in back:
        for (j, rank, end), found in admission.ends.items():
            if (j, end) != (job, to_step) or (job, rank) in admission.receipt_heads:
                continue
            live = [d for a, st, d in found if not superseded(a, st, admission.rewind_steps[job])]
            if live:
                admission.receipt_heads[(job, rank)] = ReceiptHead(to_step, live[-1])


def _load_known(s: Session, admission: Admission, digests: list[str]) -> None:
    """Type and job of the recorded messages ``digests`` (a report's job is its receipt's)."""
    rows = s.exec(
        select(MessageRow.digest, MessageRow.primary_type, MessageRow.typed_data).where(MessageRow.digest.in_(digests))
    ).all()
    receipt_of: dict[str, str] = {}
    for digest, kind, text in rows:
        message = loads_json(text)["message"]
        if kind == VERIFICATION_REPORT:
            receipt_of[digest] = message["receiptDigest"]
        else:
            admission.known[digest] = Known(kind, message.get("jobId"))
    if receipt_of:
        jobs = dict(
            s.exec(
                select(WorkReceiptRow.digest, WorkReceiptRow.job_id).where(
                    WorkReceiptRow.digest.in_(sorted(set(receipt_of.values())))
                )
            ).all()
        )
        for digest, receipt in receipt_of.items():
            admission.known[digest] = Known(VERIFICATION_REPORT, jobs.get(receipt))
