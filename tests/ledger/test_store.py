"""The SQL ledger on SQLite and on PostgreSQL: idempotency, atomicity, the schema, the audit.

Messages are real EIP-712 messages signed with ``gpucoin.wallet.messages`` by fixed dev keys.
Every test taking ``ledger`` runs on both backends (``tests/ledger/conftest.py``).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Session

from gpucoin.exceptions import (
    ConflictError,
    InsufficientFunds,
    LedgerError,
    SignatureError,
    Unauthorized,
    UnknownAccount,
)
from gpucoin.ledger import BURNED, ISSUANCE, Code, Ledger, Operation, Transfer
from gpucoin.ledger.accounts import escrow_account
from gpucoin.ledger.db import COPY_MIN_ROWS as _COPY_MIN_ROWS
from gpucoin.ledger.db import insert_rows as _insert_rows
from gpucoin.ledger.models import MessageRow
from gpucoin.ledger.record import check_messages
from gpucoin.wallet.messages import SignedMessage, sign
from tests.ledger.helpers import (
    CONSUMER,
    COORDINATOR,
    DOMAIN,
    ESCROW,
    GPC,
    JOB,
    PACKAGE,
    POLICY,
    VERIFIER,
    WORKER,
    Signer,
    avail,
    bonded,
    fund,
    normal_history,
    open_market,
    raw_sql,
    record,
    tamper,
)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "ledger.db"


@pytest.fixture
def sqlite_ledger(db: Path) -> Ledger:
    led = open_market(f"sqlite:///{db}")
    yield led
    led.close()


@pytest.fixture
def s() -> Signer:
    return Signer()


def raw(db: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection that bypasses the Ledger (autocommit)."""
    return sqlite3.connect(db, isolation_level=None)


# -- schema --------------------------------------------------------------------------------


def test_schema_is_created_strict_and_in_wal_mode(sqlite_ledger: Ledger, db: Path) -> None:
    con = raw(db)
    strict = dict(con.execute("SELECT name, strict FROM pragma_table_list WHERE schema = 'main'").fetchall())
    for table in ("message", "operation", "transfer", "account", "escrow", "unbonding", "chain_head"):
        assert strict[table] == 1, table
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # opening the same file again finds the schema and keeps the data
    led2 = Ledger(f"sqlite:///{db}")
    assert led2.balances() == {} and led2.audit() == [] and led2.genesis == sqlite_ledger.genesis
    led2.close()


def test_strict_tables_refuse_real_and_overflowing_values_written_with_plain_sql(
    sqlite_ledger: Ledger, db: Path
) -> None:
    con = raw(db)
    for value in ("1e30", str(2**63), "1.5"):
        with pytest.raises(sqlite3.Error, match="REAL"):
            con.execute(f"INSERT INTO account (name, balance) VALUES ('system:treasury', {value})")
    assert con.execute("SELECT COUNT(*) FROM account").fetchone()[0] == 0
    # the same SQL on a table without STRICT silently stores a REAL: that is what STRICT prevents
    con.execute("CREATE TABLE loose (balance INTEGER NOT NULL)")
    con.execute(f"INSERT INTO loose VALUES ({2**63})")
    assert con.execute("SELECT typeof(balance) FROM loose").fetchone()[0] == "real"


def test_writes_begin_immediate_and_reads_begin_deferred(sqlite_ledger: Ledger, s: Signer) -> None:
    ledger = sqlite_ledger
    seen: list[str] = []
    event.listen(ledger.engine, "before_cursor_execute", lambda c, cur, stmt, *a: seen.append(stmt))
    fund(ledger, s, CONSUMER, 5, "op")
    assert "BEGIN IMMEDIATE" in seen
    seen.clear()
    ledger.balances()
    assert "BEGIN" in seen and "BEGIN IMMEDIATE" not in seen


# -- messages ------------------------------------------------------------------------------


def test_record_message_is_idempotent_by_digest(ledger: Ledger, s: Signer) -> None:
    m = s.faucet(CONSUMER, 5)
    ledger.record_message(m)
    ledger.record_message(m)
    rows = ledger.messages()
    assert len(rows) == 2 and rows[0].primary_type == "Genesis"  # a ledger's first message
    assert rows[1].digest == m.digest and rows[1].signer == COORDINATOR.address and rows[1].nonce == "1"
    assert ledger.messages("Faucet") == rows[1:] and ledger.messages("JobOrder") == []


def test_a_second_message_with_the_same_signer_and_nonce_is_a_conflict(ledger: Ledger, s: Signer) -> None:
    ledger.record_message(s(COORDINATOR, "Faucet", recipient=CONSUMER.address, amount=5, nonce=7))
    with pytest.raises(ConflictError, match="nonce 7"):
        ledger.record_message(s(COORDINATOR, "Faucet", recipient=CONSUMER.address, amount=6, nonce=7))
    # another signer may use the same nonce
    ledger.record_message(
        s(
            WORKER,
            "NodeRegistration",
            provider=WORKER.address,
            nodeId="n1",
            resources="cpu=1",
            askPerWorkerHour=1,
            stake=0,
            deadline=2**40,
            nonce=7,
        )
    )
    assert len(ledger.messages()) == 3


def test_a_bad_signature_or_an_impersonation_is_refused(ledger: Ledger, s: Signer) -> None:
    m = s.faucet(CONSUMER, 5)
    forged = SignedMessage(m.primary_type, m.domain, m.message, m.digest, m.signature, CONSUMER.address)
    with pytest.raises(SignatureError, match="recovers"):
        ledger.record_message(forged)
    # a JobOrder naming Consumer as its consumer but signed by Worker's key
    order = sign(
        WORKER,
        "JobOrder",
        DOMAIN,
        dict(
            consumer=CONSUMER.address,
            jobId=JOB,
            specHash="0x" + "dd" * 32,
            packageHash=PACKAGE,
            workers=1,
            bidPerWorkerHour=1,
            budget=1,
            nonce=1,
            deadline=2**40,
        ),
    )
    with pytest.raises(SignatureError, match="consumer"):
        ledger.record_message(order)
    assert [m.primary_type for m in ledger.messages()] == ["Genesis"]


# -- post ----------------------------------------------------------------------------------


def test_a_retry_with_identical_content_returns_the_original_ids(ledger: Ledger, s: Signer) -> None:
    fund(ledger, s, CONSUMER, 300, "fund")
    a, b = s.order(100, "job-a"), s.order(200, "job-b")
    record(ledger, a, b)
    ops = [
        Transfer(avail(CONSUMER), escrow_account("job-a"), 100, Code.ESCROW, a.digest),
        Transfer(avail(CONSUMER), escrow_account("job-b"), 200, Code.ESCROW, b.digest.upper().replace("0X", "0x")),
    ]
    ids = ledger.post("op-1", ops, memo="hello")
    assert ids == [2, 3]
    assert ledger.post("op-1", ops, memo="hello") == ids
    assert ledger.post("op-1", tuple(ops), memo="hello") == ids
    assert ledger.balance(avail(CONSUMER)) == 0
    assert len(ledger.transfers()) == 3
    assert ledger.audit() == []


def test_the_same_op_id_with_different_content_is_a_conflict(ledger: Ledger, s: Signer) -> None:
    m = s.faucet(CONSUMER, 300)
    ledger.record_message(m)
    t = Transfer(ISSUANCE, avail(CONSUMER), 300, Code.FAUCET, m.digest)
    ledger.post("op-1", [t])
    with pytest.raises(ConflictError, match="op-1"):
        ledger.post("op-1", [Transfer(ISSUANCE, avail(CONSUMER), 301, Code.FAUCET, m.digest)])
    with pytest.raises(ConflictError):
        ledger.post("op-1", [t], memo="different memo")
    with pytest.raises(ConflictError):
        ledger.post("op-1", [t, t])
    assert ledger.balance(avail(CONSUMER)) == 300 and len(ledger.transfers()) == 1


def test_an_operation_is_all_or_nothing(ledger: Ledger, s: Signer) -> None:
    fund(ledger, s, CONSUMER, 100, "fund")
    order = s(
        CONSUMER,
        "JobOrder",
        consumer=CONSUMER.address,
        jobId=JOB,
        specHash="0x" + "dd" * 32,
        packageHash=PACKAGE,
        workers=1,
        bidPerWorkerHour=1,
        budget=60,
        deadline=2**40,
    )
    other = s(
        CONSUMER,
        "JobOrder",
        consumer=CONSUMER.address,
        jobId="job-2",
        specHash="0x" + "ee" * 32,
        packageHash=PACKAGE,
        workers=1,
        bidPerWorkerHour=1,
        budget=41,
        deadline=2**40,
    )
    ledger.record_messages([order, other])
    before = (ledger.balances(), ledger.transfers(), ledger.totals())
    # the first transfer alone is affordable; the second is not, so neither may land
    with pytest.raises(InsufficientFunds, match="short by 1"):
        ledger.post(
            "escrow",
            [
                Transfer(avail(CONSUMER), ESCROW, 60, Code.ESCROW, order.digest),
                Transfer(avail(CONSUMER), "job:job-2:escrow", 41, Code.ESCROW, other.digest),
            ],
        )
    assert (ledger.balances(), ledger.transfers(), ledger.totals()) == before
    assert ledger.operation("escrow") is None
    # the refused op_id is free; the chain goes on from the last committed row
    assert ledger.post("escrow", [Transfer(avail(CONSUMER), ESCROW, 60, Code.ESCROW, order.digest)]) == [2]
    assert ledger.audit() == []


def test_a_digest_that_names_no_recorded_message_is_refused(ledger: Ledger, s: Signer) -> None:
    m = s.faucet(CONSUMER, 5)  # signed but never recorded
    with pytest.raises(LedgerError, match=m.digest):
        ledger.post("op", [Transfer(ISSUANCE, avail(CONSUMER), 5, Code.FAUCET, m.digest)])
    assert ledger.balances() == {} and ledger.transfers() == []


def test_no_mint_takes_the_supply_past_the_hard_cap(ledger: Ledger, s: Signer) -> None:
    cap = POLICY.tokenomics.hard_cap_ugpc
    fund(ledger, s, CONSUMER, cap - 1, "big")
    fund(ledger, s, WORKER, 1, "to-the-cap")
    m = s.faucet(CONSUMER, 1)
    with pytest.raises(Unauthorized, match="above the hard cap"):
        ledger.post_batch(
            [Operation("one-more", (Transfer(ISSUANCE, avail(CONSUMER), 1, Code.FAUCET, m.digest),))], messages=[m]
        )
    assert ledger.totals()["supply"] == cap and ledger.message(m.digest) is None
    assert ledger.audit() == []
    # recorded on its own, a coordinator's decision that authorized nothing is what the audit names
    ledger.record_message(m)
    assert [p for p in ledger.audit() if "authorized no operation" in p] == [
        f"message Faucet {m.digest}: recorded, but authorized no operation (was its operation removed?)"
    ]


def test_malformed_posts_are_refused(ledger: Ledger) -> None:
    with pytest.raises(LedgerError):
        ledger.post("", [])
    with pytest.raises(LedgerError):
        ledger.post("op", [])
    with pytest.raises(LedgerError):
        ledger.post("op", [("a", "b", 1)])  # type: ignore[list-item]
    t = Transfer(ISSUANCE, avail(CONSUMER), 1, Code.FAUCET, "0x" + "11" * 32)
    for memo in ("\ud800", "a\x00b", "x" * 1025):  # not UTF-8, not storable in PostgreSQL text, too long
        with pytest.raises(LedgerError, match="memo"):
            ledger.post("op", [t], memo=memo)
    with pytest.raises(UnknownAccount):
        ledger.balance("wallet:nobody")
    assert ledger.balance(avail(VERIFIER)) == 0


def test_concurrent_writers_in_threads_serialize(ledger_url: str, s: Signer) -> None:
    ledgers = [open_market(ledger_url), Ledger(ledger_url)]
    msgs = [s.faucet(CONSUMER, 1) for _ in range(40)]
    for m in msgs:
        ledgers[0].record_message(m)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(k, len(msgs), 2):
                ledgers[k].post(f"op-{i}", [Transfer(ISSUANCE, avail(CONSUMER), 1, Code.FAUCET, msgs[i].digest)])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert ledgers[1].balance(avail(CONSUMER)) == 40
    assert [t.id for t in ledgers[1].transfers()] == list(range(1, 41))
    assert ledgers[1].audit() == []
    for led in ledgers:
        led.close()


# -- reads and totals ----------------------------------------------------------------------


EMISSION = POLICY.tokenomics.initial_emission_ugpc  # epoch 0 of the local policy: one interval gets it all
WORKER_REWARD = EMISSION * POLICY.tokenomics.worker_share_bps // 10_000
VERIFIER_REWARD = EMISSION * POLICY.tokenomics.verifier_share_bps // 10_000


def test_totals_and_reads_on_a_normal_history(ledger: Ledger, s: Signer) -> None:
    normal_history(ledger, s)
    minted = 1600 * GPC + WORKER_REWARD + VERIFIER_REWARD
    # burned: 90 % of the 10 GPC charge, and 200 of the 250 GPC slashed (half the 500 GPC bond; 50 to the verifier)
    assert ledger.totals() == {
        "minted": minted,
        "burned": 209 * GPC,
        "slashed": 250 * GPC,
        "refunded": 190 * GPC,
        "supply": minted - 209 * GPC,
        "treasury": 1 * GPC,
    }
    bal = ledger.balances()
    assert sum(bal.values()) == 0
    assert bal[avail(CONSUMER)] == 990 * GPC and bal[ESCROW] == 0
    assert bal[bonded(WORKER)] == 250 * GPC and bal[avail(VERIFIER)] == 50 * GPC + VERIFIER_REWARD
    assert ledger.balances(prefix=f"wallet:{WORKER.address}") == {
        avail(WORKER): 100 * GPC + WORKER_REWARD,
        bonded(WORKER): 250 * GPC,
    }
    assert ledger.balances(prefix="job:") == {ESCROW: 0}
    esc = ledger.transfers(ESCROW)
    assert [t.code for t in esc] == ["escrow", "burn", "treasury", "refund"]
    assert [t.code for t in ledger.transfers(ESCROW, limit=2)] == ["treasury", "refund"]
    assert ledger.transfers(limit=0) == []
    assert ledger.operation("settle-1").memo == "interval 0-10"


# -- audit ---------------------------------------------------------------------------------


def test_audit_is_clean_on_a_normal_history(ledger: Ledger, s: Signer) -> None:
    normal_history(ledger, s)
    supply = ledger.totals()["supply"]
    assert ledger.audit() == []
    assert ledger.audit(hard_cap_ugpc=supply) == []
    problems = ledger.audit(hard_cap_ugpc=1000 * GPC)
    assert len(problems) == 1 and "hard cap" in problems[0] and str(supply) in problems[0]


def test_transfers_messages_and_operations_are_append_only(ledger: Ledger, s: Signer) -> None:
    normal_history(ledger, s)
    for sql in (
        "UPDATE transfer SET amount = amount + 1 WHERE id = 4",
        "DELETE FROM transfer WHERE id = 11",
        "UPDATE message SET signer = 'x' WHERE id = 1",
        "DELETE FROM operation WHERE op_id = 'refund-1'",
    ):
        with pytest.raises(DBAPIError, match="append-only"):
            raw_sql(ledger, sql)
    assert ledger.audit() == []


def test_audit_names_the_row_whose_amount_was_changed_with_plain_sql(ledger: Ledger, s: Signer) -> None:
    normal_history(ledger, s)
    tamper(ledger, "UPDATE transfer SET amount = amount + 1 WHERE id = 4")
    problems = ledger.audit()
    assert any(p.startswith("transfer #4 ") and "does not chain" in p for p in problems), problems
    assert any("operation 'escrow-1'" in p for p in problems), problems
    assert any(p.startswith(f"account {avail(CONSUMER)}: stored balance") for p in problems), problems
    assert not any(p.startswith("transfer #5 ") for p in problems), problems


def test_audit_notices_a_deleted_last_row(ledger: Ledger, s: Signer) -> None:
    normal_history(ledger, s)
    tamper(ledger, "DELETE FROM transfer WHERE id = 11")
    problems = ledger.audit()
    assert any(p.startswith("chain head: names transfer #11") for p in problems), problems
    assert any(p.startswith("operation 'refund-1'") and "0 transfer rows" in p for p in problems), problems


def test_audit_fails_on_a_negative_user_account(ledger: Ledger, s: Signer) -> None:
    normal_history(ledger, s)
    digest = ledger.transfers(limit=1)[0].digest
    # A row written behind the ledger's back that overdraws the verifier (the account table's
    # CHECK keeps the stored balance from going negative, so only the transfers show it).
    raw_sql(
        ledger,
        "INSERT INTO transfer (id, op_id, seq, debit, credit, amount, code, digest, created_at, prev_hash, row_hash)"
        f" VALUES (12, 'refund-1', 1, '{avail(VERIFIER)}', '{BURNED}', {100 * GPC}, 'burn', '{digest}', 0, '', '')",
    )
    with pytest.raises(DBAPIError, match="(?i)check"):
        raw_sql(ledger, f"UPDATE account SET balance = -1 WHERE name = '{avail(VERIFIER)}'")
    problems = ledger.audit()
    assert any(avail(VERIFIER) in p and "below zero" in p for p in problems), problems
    assert any(p.startswith("transfer #12 ") and "does not chain" in p for p in problems), problems


def test_audit_checks_signatures_and_what_authorizes_a_mint(ledger: Ledger, s: Signer) -> None:
    history = normal_history(ledger, s)
    m = ledger.messages("Faucet")[0]  # a Faucet of the history, which authorized its grant
    before = (ledger.balances(), ledger.transfers())
    # post refuses a mint authorized by anything but the EpochClose of its epoch ...
    with pytest.raises(Unauthorized, match="cites a Faucet, which authorizes faucet"):
        ledger.post("bad-mint", [Transfer(ISSUANCE, avail(WORKER), 7, Code.MINT_WORKER, m.digest)])
    with pytest.raises(Unauthorized, match="cites a Settlement, which authorizes"):
        ledger.post("bad-mint", [Transfer(ISSUANCE, avail(WORKER), 7, Code.MINT_VERIFIER, history["st1"].digest)])
    assert (ledger.balances(), ledger.transfers()) == before
    # ... and the audit names such a row written with plain SQL
    mint = next(t for t in ledger.transfers() if t.code == Code.MINT_WORKER.value)
    tamper(ledger, "UPDATE transfer SET digest = :d WHERE id = :id", {"d": m.digest, "id": mint.id})
    problems = ledger.audit()
    assert any("epoch-close" in p and "cites a Faucet" in p for p in problems), problems
    tamper(ledger, "UPDATE transfer SET digest = :d WHERE id = :id", {"d": mint.digest, "id": mint.id})
    assert ledger.audit() == []
    # a stored signature altered with plain SQL
    row = ledger.messages("Faucet")[0]
    sig = row.signature[:10] + ("0" if row.signature[10] != "0" else "1") + row.signature[11:]
    tamper(ledger, "UPDATE message SET signature = :sig WHERE id = :id", {"sig": sig, "id": row.id})
    problems = ledger.audit()
    assert any(p.startswith(f"message #{row.id} ") for p in problems), problems


def test_post_batch_records_its_messages_in_the_same_transaction(ledger: Ledger, s: Signer) -> None:
    # More rows than _COPY_MIN_ROWS, so PostgreSQL takes the COPY path for messages and transfers.
    n = _COPY_MIN_ROWS + 8
    grants = [s.faucet(CONSUMER, 10 + i) for i in range(n)]
    ops = [
        Operation(f"grant-{i}", (Transfer(ISSUANCE, avail(CONSUMER), 10 + i, Code.FAUCET, m.digest),))
        for i, m in enumerate(grants)
    ]
    assert ledger.post_batch(ops, messages=grants) == [[i + 1] for i in range(n)]
    assert len(ledger.messages("Faucet")) == n
    assert ledger.balance(avail(CONSUMER)) == sum(10 + i for i in range(n))
    # a retry of the whole call changes nothing and returns the same ids
    assert ledger.post_batch(ops, messages=grants) == [[i + 1] for i in range(n)]
    assert ledger.audit() == []

    # one refused operation: neither its messages nor any operation of the batch is stored
    more = [s.faucet(WORKER, 5) for _ in range(n)]
    spend = s(
        CONSUMER,
        "JobOrder",
        consumer=CONSUMER.address,
        jobId=JOB,
        specHash="0x" + "dd" * 32,
        packageHash=PACKAGE,
        workers=1,
        bidPerWorkerHour=1,
        budget=10**9,
        deadline=2**40,
    )
    bad = [
        Operation(f"w-{i}", (Transfer(ISSUANCE, avail(WORKER), 5, Code.FAUCET, m.digest),)) for i, m in enumerate(more)
    ]
    bad.append(Operation("too-much", (Transfer(avail(CONSUMER), ESCROW, 10**9, Code.ESCROW, spend.digest),)))
    before = (ledger.balances(), len(ledger.transfers()), len(ledger.messages()))
    with pytest.raises(InsufficientFunds, match="too-much"):
        ledger.post_batch(bad, messages=[*more, spend])
    assert (ledger.balances(), len(ledger.transfers()), len(ledger.messages())) == before
    assert ledger.message(spend.digest) is None and ledger.operation("w-0") is None
    assert ledger.audit() == []


def test_a_duplicate_bulk_insert_is_an_integrity_error_on_both_backends(ledger: Ledger, s: Signer) -> None:
    # The store retries a write that lost a uniqueness race only if it sees SQLAlchemy's
    # IntegrityError; PostgreSQL's COPY path must raise that too, not the driver's own error.
    checked = check_messages([s.faucet(CONSUMER, 1) for _ in range(_COPY_MIN_ROWS)])
    rows = [{**c.row, "recorded_at": 1} for c in checked.values()]
    with Session(ledger.engine) as session, session.begin():
        _insert_rows(session, MessageRow.__table__, rows)
    with pytest.raises(IntegrityError):
        with Session(ledger.engine) as session, session.begin():
            _insert_rows(session, MessageRow.__table__, rows)
    assert len(ledger.messages("Faucet")) == _COPY_MIN_ROWS
