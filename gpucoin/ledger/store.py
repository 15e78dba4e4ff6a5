"""``Ledger``: the SQL ledger of signed messages and double-entry transfers (SPEC.md, Money).

One ``post`` (or one ``post_batch``) is one database transaction: every transfer of every
operation is applied, with the money rules of ``gpucoin.ledger.state`` checked on the rows read
inside that transaction, or nothing is. The schema comes from the Alembic migrations
(``gpucoin.ledger.migrate``), applied when a ``Ledger`` is opened.

SQLite (the default): WAL mode, STRICT tables, and every write transaction starts with ``BEGIN
IMMEDIATE`` (the write lock up front, so two writers never both read a balance and then both
write); reads use a plain deferred ``BEGIN``. That is SQLAlchemy's recipe for SQLite
transactions: sqlite3's own implicit BEGIN is off (``isolation_level = None``) and the engine's
``begin`` event emits ours.

PostgreSQL (``postgresql+psycopg://...``; ``postgresql://`` is read as that): READ COMMITTED;
a write first locks the ``chain_head`` row (``SELECT ... FOR UPDATE``), then the account, escrow
and unbonding rows it touches, each set in name order, so writers serialize on the head and
always lock in one order (no deadlock). A statement after the head lock sees every commit made
before it was granted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from eth_utils import is_address
from sqlalchemy import Table, and_, bindparam, delete, event, func, insert, or_, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session, create_engine, select

from gpucoin.exceptions import (
    ConflictError,
    GpucoinError,
    LedgerError,
    NonceReused,
    RuleViolation,
    SignatureError,
    UnknownAccount,
)
from gpucoin.ledger import migrate
from gpucoin.ledger.admission import JOB_ORDER, NODE_REGISTRATION, SETTLEMENT, WORK_RECEIPT, Admission, ReceiptHead
from gpucoin.ledger.accounts import BURNED, ISSUANCE, TREASURY, account_kind, is_valid_account
from gpucoin.ledger.audit import run_audit, verify_typed_message
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
from gpucoin.ledger.rules import MINT_CODES, SLASH_CODES, canonical_json, chain_hash, operation_hash
from gpucoin.ledger.state import Escrow, LedgerState, apply_operation, touched_accounts
from gpucoin.ledger.transfer import Code, Operation, Transfer
from gpucoin.wallet.messages import Domain, SignedMessage, checksum_address

_WRITE = "gpucoin_write"
"""Connection execution option that makes the SQLite ``begin`` hook emit BEGIN IMMEDIATE."""

_SQLITE_BUSY_TIMEOUT_S = 60.0
"""Seconds a SQLite connection waits for another writer's lock before giving up."""

_MAX_ATTEMPTS = 3
"""Tries of a write that lost a uniqueness race on a server database (a retry sees the winner)."""

MAX_BATCH = 10_000
"""Most operations (or messages) one batch may hold: bounds a transaction's size and lock time."""


def _now_us() -> int:
    """Wall-clock time in µs since the Unix epoch."""
    return time.time_ns() // 1000


def _hex(value: Any, n_bytes: int | None, what: str) -> str:
    """Normalize bytes or hex text to lower-case 0x-hex, optionally of exactly ``n_bytes`` bytes.

    Raises:
        SignatureError: if it is neither, or has the wrong length.
    """
    if hasattr(value, "hex") and not isinstance(value, str):  # bytes, HexBytes
        raw = bytes(value)
    elif isinstance(value, str):
        s = value[2:] if value[:2] in ("0x", "0X") else value
        try:
            raw = bytes.fromhex(s)
        except ValueError:
            raise SignatureError(f"{what} is not hex: {value!r}") from None
    else:
        raise SignatureError(f"{what} must be bytes or 0x-hex text, got {type(value).__name__}")
    if n_bytes is not None and len(raw) != n_bytes:
        raise SignatureError(f"{what} must be {n_bytes} bytes, got {len(raw)}")
    return "0x" + raw.hex()


def _nonce_text(message: Any) -> str | None:
    """The ``nonce`` field of an EIP-712 message body as decimal text, or None if it has none.

    Raises:
        SignatureError: for a nonce that is not a non-negative integer.
    """
    if not isinstance(message, dict) or "nonce" not in message:
        return None
    raw = message["nonce"]
    try:
        n = int(raw, 0) if isinstance(raw, str) else raw
    except ValueError:
        raise SignatureError(f"nonce is not an integer: {raw!r}") from None
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise SignatureError(f"nonce must be a non-negative integer, got {raw!r}")
    return str(n)


_RETRY_SQLSTATES = frozenset({"40P01", "40001"})
"""PostgreSQL deadlock_detected and serialization_failure: the transaction was rolled back; retry it."""


def _retryable(exc: Exception) -> bool:
    """Whether a failed write transaction may simply be tried again (it lost a race, nothing was written)."""
    if isinstance(exc, IntegrityError):
        return True
    return getattr(getattr(exc, "orig", None), "sqlstate", None) in _RETRY_SQLSTATES


def _typed_text(typed: Any) -> str:
    """The canonical JSON text of typed data (``rules.canonical_json``), stored and then verified.

    Typed data from ``typed_data()`` is already plain JSON (dicts, lists, str, int), for which
    ``json.dumps`` with canonical_json's settings gives the same text without canonical_json's walk
    over every value (the hot path of recording a message). Anything else takes canonical_json's
    conversions; a float passes here but never verifies (every EIP-712 field is int or text).
    """
    try:
        return json.dumps(typed, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return canonical_json(typed)


_COPY_MIN_ROWS = 32
"""From this many rows on, an insert on PostgreSQL goes through COPY (one statement, no per-row round trip)."""


def _insert_rows(s: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` (dicts of column values, all with the same keys) into ``table`` in the session's transaction.

    On PostgreSQL a large batch is streamed with ``COPY ... FROM STDIN`` (psycopg's copy), which
    the server applies as one statement; otherwise (SQLite, or a few rows) an executemany INSERT.
    """
    if not rows:
        return
    conn = s.connection()
    if conn.dialect.name != "postgresql" or len(rows) < _COPY_MIN_ROWS:
        s.execute(insert(table), rows)
        return
    cols = list(rows[0])
    statement = f"COPY {table.name} ({', '.join(cols)}) FROM STDIN"
    cur = conn.connection.dbapi_connection.cursor()
    try:
        with cur.copy(statement) as copy:
            for r in rows:
                copy.write_row([r[c] for c in cols])
    except conn.dialect.dbapi.IntegrityError as exc:
        # As SQLAlchemy would wrap it, so callers' retry on a lost uniqueness race sees it.
        raise IntegrityError(statement, None, exc) from exc
    finally:
        cur.close()


def _bound_domain(s: Session) -> dict[str, Any] | None:
    """The domain the ledger is bound to, read in the write transaction of ``s`` (None: unbound).

    On PostgreSQL it first takes the migration's advisory lock in shared mode, so a binding in
    progress (``_bind_market`` runs under that lock, exclusive) is either committed and seen, or
    waits until this transaction ends.
    """
    conn = s.connection()
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock_shared({migrate.PG_LOCK_KEY})")
    return _read_domain(conn)


def _read_domain(conn: Any) -> dict[str, Any] | None:
    """The domain stored in the ``market`` row, None if the ledger is bound to none."""
    table = MarketRow.__table__
    row = conn.execute(select(table.c.domain).where(table.c.id == 1)).first()
    return None if row is None else json.loads(row[0])


def _bind_market(conn: Any, wanted: dict[str, Any] | None) -> dict[str, Any] | None:
    """The domain the ledger behind ``conn`` is bound to, binding it to ``wanted`` if it is to none.

    Raises:
        LedgerError: if it is bound to a domain other than ``wanted``.
    """
    bound = _read_domain(conn)
    if bound is None:
        if wanted is not None:
            last = conn.execute(select(func.max(MessageRow.__table__.c.id))).scalar()
            conn.execute(
                insert(MarketRow.__table__).values(
                    id=1, domain=canonical_json(wanted), bound_at=_now_us(), first_message_id=(last or 0) + 1
                )
            )
        return wanted
    if wanted is not None and wanted != bound:
        raise LedgerError(f"this ledger belongs to the market with EIP-712 domain {bound}, not {wanted}")
    return bound


def _install_sqlite_hooks(engine: Engine) -> None:
    """WAL, foreign keys, and SQLAlchemy-controlled BEGIN / BEGIN IMMEDIATE on every SQLite connection."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Stop sqlite3 from issuing its own BEGIN (it skips SELECTs and DDL); _on_begin does it.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")  # an in-memory database stays "memory"
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=FULL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")


def normalize_url(url: str) -> str:
    """The SQLAlchemy URL to open: ``postgresql://`` and ``postgres://`` mean psycopg 3.

    Raises:
        LedgerError: for text that is not a database URL, or a backend other than SQLite or PostgreSQL.
    """
    if not isinstance(url, str) or not url:
        raise LedgerError(f"ledger URL must be text like sqlite:///path or postgresql://host/db, got {url!r}")
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    try:
        backend = make_url(url).get_backend_name()
    except Exception:
        raise LedgerError(f"not a database URL: {url!r} (expected sqlite:///path or postgresql://host/db)") from None
    if backend not in ("sqlite", "postgresql"):
        raise LedgerError(f"ledger backend {backend!r} is not supported; use sqlite or postgresql")
    return url


class _Checked(NamedTuple):
    """A signed message checked before any transaction."""

    row: dict[str, Any]
    """Its ``message`` row, all but ``recorded_at`` (set when it is inserted)."""
    typed: dict[str, Any]
    """Its typed data, as stored (parsed from ``row["typed_data"]``)."""


class Ledger:
    """The gpucoin ledger on SQLite or PostgreSQL.

    Holds signed EIP-712 messages and the hash-chained double-entry transfers they authorize,
    with a running balance per account, each job's escrow and each wallet's unbonding stake.
    Amounts are int µGPC everywhere.

    Args:
        url: an SQLAlchemy URL: ``"sqlite:////home/x/.gpucoin/local/ledger.db"`` (the file and
            its directory are created if missing) or ``"postgresql://user@host/db"``. The schema
            is created or upgraded to the newest migration.
        unbonding_epochs: the policy's unbonding period (``bonding.unbonding_epochs``): stake an
            UNBOND posted in epoch e may be withdrawn from epoch e + unbonding_epochs.
        domain: the market's EIP-712 domain (a ``gpucoin.wallet.messages.Domain`` or its dict).
            The first ledger opened with one is bound to it for good; afterwards only messages
            signed in it are recorded. None: use the domain the ledger is bound to, if any.
        clock: returns the time in unix seconds (deadlines are checked against it).

    Raises:
        LedgerError: for a bad URL, a database that cannot be opened or migrated, or a
            ``domain`` other than the one the ledger is bound to.
    """

    def __init__(
        self,
        url: str,
        *,
        unbonding_epochs: int = 0,
        domain: Domain | Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(unbonding_epochs, bool) or not isinstance(unbonding_epochs, int) or unbonding_epochs < 0:
            raise LedgerError(f"unbonding_epochs must be a non-negative integer, got {unbonding_epochs!r}")
        wanted = None if domain is None else (domain if isinstance(domain, Domain) else Domain.from_dict(domain)).as_dict()
        self._clock = clock
        url = normalize_url(url)
        parsed = make_url(url)
        self.url = url
        self.unbonding_epochs = unbonding_epochs
        self._is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {}
        if self._is_sqlite:
            kwargs["connect_args"] = {"timeout": _SQLITE_BUSY_TIMEOUT_S}
            db = parsed.database
            if db and db != ":memory:" and not db.startswith("file:"):
                Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs["pool_pre_ping"] = True
            # psycopg's own executemany (pipeline mode, one parsed statement) instead of SQLAlchemy
            # rendering a fresh many-VALUES INSERT per batch that psycopg then re-parses.
            kwargs["use_insertmanyvalues"] = False
        self._engine: Engine = create_engine(url, **kwargs)
        if self._is_sqlite:
            _install_sqlite_hooks(self._engine)
        try:
            with self._engine.connect() as conn:
                conn.execution_options(**{_WRITE: True})
                with conn.begin():
                    migrate.upgrade(conn)
                    self._domain = _bind_market(conn, wanted)
        except GpucoinError:
            self._engine.dispose()
            raise
        except Exception as exc:
            self._engine.dispose()
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            where = parsed.render_as_string(hide_password=True)
            raise LedgerError(f"cannot open the ledger at {where}: {reason[-1] if reason else type(exc).__name__}") from exc

    # -- plumbing -------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for tools and tests; writes should go through ``post``)."""
        return self._engine

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return "sqlite" if self._is_sqlite else "postgresql"

    @contextmanager
    def _session(self, *, write: bool) -> Iterator[Session]:
        """One session in one transaction, committed on success and rolled back on any error."""
        with self._engine.connect() as conn:
            if write:
                conn.execution_options(**{_WRITE: True})
            with Session(bind=conn, expire_on_commit=False) as s:
                with s.begin():
                    yield s

    def close(self) -> None:
        """Release every pooled database connection; the object is unusable afterwards."""
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ---------------------------------------------------------------------------

    def record_message(self, signed: Any) -> None:
        """Store a signed EIP-712 message after checking it; recording it again is a no-op.

        Args:
            signed: a ``gpucoin.wallet.messages.SignedMessage`` (attributes ``primary_type``,
                ``digest``, ``signature``, ``signer`` and method ``typed_data() -> dict``).

        The typed data is stored as canonical JSON, and the check runs on that stored text: its
        digest must recompute to ``signed.digest``, the signature must recover ``signed.signer`` (low s
        only), and the message's own signer field (e.g. ``JobOrder.consumer``) must be that signer.

        Raises:
            SignatureError: if the digest, signature or primary type does not check.
            ConflictError: if a different message of the same signer already used its ``nonce``.
        """
        self.record_messages([signed])

    def record_messages(self, signed: Sequence[Any]) -> int:
        """Check and store many signed messages in one transaction (see ``record_message``).

        All are checked before anything is written; if any is refused, none is stored.

        Returns:
            How many were new (a message already stored, or repeated in ``signed``, is skipped).

        Raises:
            SignatureError: naming the first message that does not check (malformed, digest,
                high s, signer); DomainMismatch (another market's domain) and MessageExpired
                (past its deadline) are SignatureErrors too.
            NonceReused: if a message reuses a (signer, nonce) of a different stored message.
            ConflictError: a second JobOrder for one job.
            UnknownParty: a WorkReceipt for an unknown job or worker; in a bound ledger, a
                Settlement or Faucet not signed by the market's coordinator.
            ReceiptOutOfOrder: a WorkReceipt whose steps overlap, leave a gap or do not chain.
            LedgerError: for more than ``MAX_BATCH`` messages.
        """
        rows = self._message_rows(signed)
        if not rows:
            return 0
        return self._write(rows, [], [])[0]

    def _write(
        self, rows: dict[str, _Checked], ops: list[Operation], contents: list[str]
    ) -> tuple[int, list[list[int]]]:
        """Record the checked messages ``rows``, then apply ``ops``, in one write transaction.

        Retried (at most ``_MAX_ATTEMPTS`` times) when it lost a race: another writer stored the
        same digest, nonce, job or receipt step between our check and insert, or the server broke
        a deadlock between two such inserts (PostgreSQL; SQLite's BEGIN IMMEDIATE rules both out).
        The retry reads again and sees the winner.

        Returns:
            (how many messages were new, the transfer ids of each operation).
        """
        for attempt in range(_MAX_ATTEMPTS):
            try:
                with self._session(write=True) as s:
                    n_new = self._insert_messages(s, rows) if rows else 0
                    return n_new, (self._apply_batch(s, ops, contents) if ops else [])
            except (IntegrityError, OperationalError) as exc:
                if not _retryable(exc):
                    raise LedgerError(f"the database refused the write: {exc.orig}") from None
                if attempt + 1 == _MAX_ATTEMPTS:
                    raise LedgerError(f"the write was refused, concurrent writes kept conflicting: {exc.orig}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _message_rows(self, signed: Sequence[Any]) -> dict[str, _Checked]:
        """The checked messages of ``signed`` by digest (repeats dropped), before any transaction.

        Raises:
            SignatureError: naming the first message that does not check.
            LedgerError: for more than ``MAX_BATCH`` messages.
        """
        if len(signed) > MAX_BATCH:
            raise LedgerError(f"{len(signed)} messages in one batch; at most {MAX_BATCH}")
        rows: dict[str, _Checked] = {}
        for m in signed:
            checked = self._message_fields(m)
            rows.setdefault(checked.row["digest"], checked)
        return rows

    @staticmethod
    def _message_fields(signed: Any) -> _Checked:
        """One signed message's row and typed data, after checking it on its canonical stored text."""
        typed = signed.typed_data()
        digest = _hex(signed.digest, 32, "digest")
        if not (isinstance(signed.signer, str) and is_address(signed.signer)):
            raise SignatureError(f"signer is not an address: {signed.signer!r}")
        fields = dict(
            digest=digest,
            primary_type=str(signed.primary_type),
            signer=checksum_address(signed.signer),
            nonce=_nonce_text(typed.get("message")),
            signature=_hex(signed.signature, 65, "signature"),
            typed_data=_typed_text(typed),
        )
        # Checked on the text as stored, so what the audit later re-verifies is what passed here.
        # typed_data() of a SignedMessage is built of fresh dicts, lists, str and int only, which
        # JSON round-trips exactly: parsing the text back would give an equal object.
        stored = typed if type(signed) is SignedMessage else json.loads(fields["typed_data"])
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
        return _Checked(fields, stored)

    def _insert_messages(self, s: Session, rows: dict[str, _Checked]) -> int:
        """Insert the messages of ``rows`` (by digest) not stored yet, in order, after the
        replay and admission rules (``gpucoin.ledger.admission``) accepted every one of them."""
        stored = set(s.exec(select(MessageRow.digest).where(MessageRow.digest.in_(list(rows)))).all())
        new = [r for d, r in rows.items() if d not in stored]
        if not new:
            return 0
        if self._domain is None:
            self._domain = _bound_domain(s)  # another process may have bound the ledger since we opened it
        now_us = int(self._clock() * 1_000_000)
        admission = self._admission(s, new, now_us // 1_000_000)
        for r, typed in new:  # the domain before anything else: a message for another market is not a replay here
            admission.check_domain(r["primary_type"], typed["domain"], r["digest"])
        self._check_nonces(s, [r for r, _ in new])
        job_rows: list[dict[str, Any]] = []
        receipt_rows: list[dict[str, Any]] = []
        for r, typed in new:
            admission.admit(r["primary_type"], typed["domain"], typed["message"], r["digest"], r["signer"])
            m = typed["message"]
            if r["primary_type"] == JOB_ORDER:
                job_rows.append({"job_id": m["jobId"], "digest": r["digest"]})
            elif r["primary_type"] == WORK_RECEIPT:
                receipt_rows.append(
                    {"digest": r["digest"], "job_id": m["jobId"], "rank": m["rank"],
                     "step_start": m["stepStart"], "step_end": m["stepEnd"]}
                )
        # recorded_at is the admission's clock: the audit re-checks deadlines against it
        _insert_rows(s, MessageRow.__table__, [{**r, "recorded_at": now_us} for r, _ in new])
        _insert_rows(s, JobOrderRow.__table__, job_rows)
        _insert_rows(s, WorkReceiptRow.__table__, receipt_rows)
        return len(new)

    @staticmethod
    def _check_nonces(s: Session, new: list[dict[str, Any]]) -> None:
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

    def _admission(self, s: Session, new: list[_Checked], now_s: int) -> Admission:
        """The admission state the messages of ``new`` need, read inside the write transaction."""
        jobs: set[str] = set()
        workers: set[str] = set()
        ranks: set[tuple[str, int]] = set()
        for r, typed in new:
            m = typed["message"]
            if r["primary_type"] == JOB_ORDER:
                jobs.add(m["jobId"])
            elif r["primary_type"] == WORK_RECEIPT:
                jobs.add(m["jobId"])
                workers.add(m["worker"])
                ranks.add((m["jobId"], m["rank"]))
        admission = Admission(domain=self._domain, now_s=now_s)
        if jobs:
            admission.jobs.update(
                s.exec(select(JobOrderRow.job_id, JobOrderRow.digest).where(JobOrderRow.job_id.in_(sorted(jobs)))).all()
            )
        if workers:
            admission.nodes.update(
                s.exec(
                    select(MessageRow.signer)
                    .where(MessageRow.signer.in_(sorted(workers)), MessageRow.primary_type == NODE_REGISTRATION)
                    .distinct()
                ).all()
            )
        if ranks:
            latest = (
                select(WorkReceiptRow.job_id, WorkReceiptRow.rank, func.max(WorkReceiptRow.step_start).label("start"))
                .where(WorkReceiptRow.job_id.in_(sorted({j for j, _ in ranks})))
                .group_by(WorkReceiptRow.job_id, WorkReceiptRow.rank)
                .subquery()
            )
            for row in s.exec(
                select(WorkReceiptRow).join(
                    latest,
                    and_(
                        WorkReceiptRow.job_id == latest.c.job_id,
                        WorkReceiptRow.rank == latest.c.rank,
                        WorkReceiptRow.step_start == latest.c.start,
                    ),
                )
            ).all():
                admission.receipt_heads[(row.job_id, int(row.rank))] = ReceiptHead(int(row.step_end), row.digest)
        return admission

    def post(
        self, op_id: str, transfers: Sequence[Transfer], memo: str = "", *, epoch: int | None = None
    ) -> list[int]:
        """Apply the transfers of one operation in one database transaction, all or nothing.

        Args:
            op_id: the client-chosen operation id (1-256 characters); makes the post idempotent.
            transfers: applied in order; each debit is checked against the running balance.
            memo: free text stored with the operation (part of its content).
            epoch: the current emission epoch; required for UNBOND and WITHDRAW transfers.

        Returns:
            The ids of the transfer rows, in the order of ``transfers``. A retry with the same
            op_id, transfers and memo returns the original ids and changes nothing.

        Raises:
            ConflictError: if ``op_id`` was already posted with different transfers or memo.
            RuleViolation: a transfer the money rules forbid (``gpucoin.ledger.state``).
            LedgerError: if a transfer's digest names no recorded message, the operation is
                empty or malformed (nothing is written).
            InsufficientFunds: if an account other than ``system:issuance`` would go below zero.
            BalanceOverflow: if a balance would leave the signed 64-bit range.
        """
        return self.post_batch([Operation(op_id, tuple(transfers), memo, epoch)])[0]

    def post_batch(self, operations: Sequence[Operation], *, messages: Sequence[Any] = ()) -> list[list[int]]:
        """Apply many operations, in order, in one database transaction: all of them or none.

        Each operation keeps its own id and idempotency (one already posted with the same content
        returns its original ids), and each is checked against the state the ones before it left.

        Args:
            operations: the operations, applied in this order.
            messages: signed messages to record first in the same transaction (as
                ``record_messages``: checked before it begins, already stored ones skipped), e.g.
                the WorkReceipts and Settlements the operations' transfers name. If the batch is
                refused, none of them is stored either.

        Returns:
            The transfer ids of each operation, in the order given.

        Raises:
            As ``post`` and ``record_messages``, naming the operation or message that was refused;
            then nothing of the batch is written. LedgerError for more than ``MAX_BATCH``
            operations or messages.
        """
        ops = list(operations)
        rows = self._message_rows(messages)
        if not ops and not rows:
            return []
        if len(ops) > MAX_BATCH:
            raise LedgerError(f"{len(ops)} operations in one batch; at most {MAX_BATCH}")
        for op in ops:
            if not isinstance(op, Operation):
                raise LedgerError(f"expected an Operation, got {type(op).__name__}")
        contents = [operation_hash(op.transfers, op.memo) for op in ops]
        return self._write(rows, ops, contents)[1]

    def _apply_batch(self, s: Session, ops: list[Operation], contents: list[str]) -> list[list[int]]:
        """One attempt of ``post_batch`` inside the write transaction of ``s``."""
        # The chain head first, always: this serializes writers and fixes the lock order.
        head = s.exec(select(ChainHead).where(ChainHead.id == 1).with_for_update()).one()
        stored = {
            o.op_id: o
            for o in s.exec(select(OperationRow).where(OperationRow.op_id.in_({op.op_id for op in ops}))).all()
        }
        results: list[list[int] | None] = [None] * len(ops)
        fresh: dict[str, int] = {}  # op id -> index of the new operation in this batch
        for i, (op, content) in enumerate(zip(ops, contents)):
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
            self._check_digests(s, new_ops)
            state, before = self._load_state(s, new_ops)
            now = _now_us()
            next_id = head.last_transfer_id + 1
            prev = head.last_hash
            op_rows: list[dict[str, Any]] = []
            transfer_rows: list[dict[str, Any]] = []
            created: dict[str, str] = {}
            for op in new_ops:
                had = set(state.escrows)
                try:
                    state = apply_operation(
                        state, op.transfers, epoch=op.epoch, unbonding_epochs=self.unbonding_epochs
                    )
                except LedgerError as exc:
                    raise type(exc)(f"operation {op.op_id!r}: {exc}") from None
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
                        created_at=now,
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
                        created_at=now,
                        epoch=op.epoch,
                        unbonding_epochs=self.unbonding_epochs,
                    )
                )
                results[fresh[op.op_id]] = list(range(first, next_id))
            _insert_rows(s, OperationRow.__table__, op_rows)
            _insert_rows(s, TransferRow.__table__, transfer_rows)
            self._write_state(s, state, before, created)
            head.last_transfer_id = next_id - 1
            head.last_hash = prev
            s.add(head)
        for i, op in enumerate(ops):  # repeats of an id new in this batch
            if results[i] is None:
                results[i] = results[fresh[op.op_id]]
        return [list(r) for r in results if r is not None]

    @staticmethod
    def _check_digests(s: Session, ops: list[Operation]) -> None:
        """Refuse the batch if a transfer's digest names no recorded message, or a mint is unbacked.

        A MINT_* transfer must name a Settlement whose ``subject`` is a recorded WorkReceipt (the
        rule ``gpucoin ledger audit`` checks from genesis, enforced here so nothing the audit
        would reject is ever written).

        Raises:
            LedgerError: for a digest that names no recorded message.
            RuleViolation: for a mint not backed by a settled receipt.
        """
        digests = sorted({t.digest.lower() for op in ops for t in op.transfers})
        found = dict(
            s.exec(select(MessageRow.digest, MessageRow.primary_type).where(MessageRow.digest.in_(digests))).all()
        )
        for op in ops:
            missing = sorted({t.digest.lower() for t in op.transfers} - set(found))
            if missing:
                raise LedgerError(
                    f"operation {op.op_id!r}: {len(missing)} digest(s) name no recorded message: {', '.join(missing)}"
                )
        mints = [(op, i, t) for op in ops for i, t in enumerate(op.transfers) if Code(t.code) in MINT_CODES]
        if not mints:
            return
        backing = sorted({t.digest.lower() for _, _, t in mints if found[t.digest.lower()] == SETTLEMENT})
        subjects: dict[str, str | None] = {}
        for digest, text in s.exec(
            select(MessageRow.digest, MessageRow.typed_data).where(MessageRow.digest.in_(backing))
        ).all():
            subject = json.loads(text).get("message", {}).get("subject")
            subjects[digest] = subject.lower() if isinstance(subject, str) else None
        wanted = sorted({v for v in subjects.values() if v is not None})
        receipts = set(
            s.exec(
                select(MessageRow.digest).where(MessageRow.digest.in_(wanted), MessageRow.primary_type == WORK_RECEIPT)
            ).all()
        ) if wanted else set()
        for op, i, t in mints:
            d = t.digest.lower()
            where = f"operation {op.op_id!r}: transfer #{i} ({Code(t.code).value})"
            if found[d] != SETTLEMENT:
                raise RuleViolation(f"{where} is authorized by a {found[d]}; a mint needs a Settlement")
            if subjects.get(d) not in receipts:
                raise RuleViolation(
                    f"{where}: its Settlement {d} settles {subjects.get(d)}, which is no recorded WorkReceipt"
                )

    @staticmethod
    def _load_state(s: Session, ops: list[Operation]) -> tuple[LedgerState, LedgerState]:
        """Lock and read every account, escrow and unbonding row the operations touch, in name order.

        Returns the state to apply the operations to and a copy of it as read (to diff on write).
        """
        names = sorted(set().union(*(touched_accounts(op.transfers) for op in ops)))
        escrows = [n for n in names if account_kind(n) == "escrow"]
        unbonding = [n for n in names if account_kind(n) == "unbonding"]
        state = LedgerState()
        for r in s.exec(
            select(AccountRow).where(AccountRow.name.in_(names)).order_by(AccountRow.name).with_for_update()
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

    @staticmethod
    def _write_state(s: Session, state: LedgerState, before: LedgerState, created: dict[str, str]) -> None:
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
            {"a": a, "p": e.phase}
            for a, e in state.escrows.items()
            if a in before.escrows and before.escrows[a] != e
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

    # -- reads ----------------------------------------------------------------------------

    def balance(self, account: str) -> int:
        """Balance of ``account`` in µGPC (0 for a well-formed account no transfer has touched).

        Raises:
            UnknownAccount: for a name of no known account form (see ``gpucoin.ledger.accounts``).
        """
        if not isinstance(account, str) or not is_valid_account(account):
            raise UnknownAccount(f"not a ledger account: {account!r}")
        with self._session(write=False) as s:
            value = s.exec(select(AccountRow.balance).where(AccountRow.name == account)).first()
        return 0 if value is None else int(value)

    def balances(self, prefix: str | None = None) -> dict[str, int]:
        """Balances in µGPC of every account ever touched whose name starts with ``prefix``, by name."""
        q = select(AccountRow).order_by(AccountRow.name)
        if prefix:
            q = q.where(AccountRow.name.startswith(prefix, autoescape=True))
        with self._session(write=False) as s:
            return {r.name: int(r.balance) for r in s.exec(q).all()}

    def transfers(self, account: str | None = None, limit: int | None = None) -> list[TransferRow]:
        """Transfer rows in ledger order (ascending id), optionally only those touching ``account``.

        Args:
            account: keep rows whose debit or credit is this account.
            limit: keep only the newest ``limit`` rows (still returned oldest first).

        Raises:
            LedgerError: for a negative or non-integer limit.
        """
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise LedgerError(f"limit must be a non-negative integer, got {limit!r}")
        q = select(TransferRow)
        if account is not None:
            q = q.where(or_(TransferRow.debit == account, TransferRow.credit == account))
        if limit is not None:
            q = q.order_by(TransferRow.id.desc()).limit(limit)
        else:
            q = q.order_by(TransferRow.id)
        with self._session(write=False) as s:
            rows = list(s.exec(q).all())
        if limit is not None:
            rows.reverse()
        return rows

    def messages(self, primary_type: str | None = None) -> list[MessageRow]:
        """Stored signed messages in order of recording, optionally of one EIP-712 primary type."""
        q = select(MessageRow).order_by(MessageRow.id)
        if primary_type is not None:
            q = q.where(MessageRow.primary_type == primary_type)
        with self._session(write=False) as s:
            return list(s.exec(q).all())

    def message(self, digest: str) -> MessageRow | None:
        """The stored message with this digest (0x-hex, any case), or None."""
        with self._session(write=False) as s:
            return s.exec(select(MessageRow).where(MessageRow.digest == digest.lower())).first()

    def operation(self, op_id: str) -> OperationRow | None:
        """The stored operation with this id, or None."""
        with self._session(write=False) as s:
            return s.get(OperationRow, op_id)

    def totals(self) -> dict[str, int]:
        """Money totals from the ledger, all in µGPC.

        Returns:
            ``minted``: everything ever debited from ``system:issuance``;
            ``burned``: the balance of ``system:burned``;
            ``slashed``: the sum of SLASH and WHISTLEBLOWER transfers;
            ``refunded``: the sum of REFUND transfers;
            ``supply``: minted - burned;
            ``treasury``: the balance of ``system:treasury``.
        """
        with self._session(write=False) as s:
            minted = s.exec(select(func.sum(TransferRow.amount)).where(TransferRow.debit == ISSUANCE)).one()
            by_code = {
                code: int(total)
                for code, total in s.exec(
                    select(TransferRow.code, func.sum(TransferRow.amount)).group_by(TransferRow.code)
                ).all()
            }
            stored = {
                r.name: int(r.balance)
                for r in s.exec(select(AccountRow).where(AccountRow.name.in_([BURNED, TREASURY]))).all()
            }
        minted = int(minted or 0)
        burned = stored.get(BURNED, 0)
        return {
            "minted": minted,
            "burned": burned,
            "slashed": sum(by_code.get(c.value, 0) for c in SLASH_CODES),
            "refunded": by_code.get(Code.REFUND.value, 0),
            "supply": minted - burned,
            "treasury": stored.get(TREASURY, 0),
        }

    def export(self) -> Iterator[dict[str, Any]]:
        """Every message, operation and transfer as JSON-ready records (``gpucoin.ledger.export``).

        A generator: iterate it to the end (or close it) to end its read transaction.
        """
        from gpucoin.ledger.export import iter_export

        with self._engine.connect() as conn:
            revision = migrate.current_revision(conn)
        with self._session(write=False) as s:
            yield from iter_export(s, revision)

    def audit(self, hard_cap_ugpc: int | None = None) -> list[str]:
        """Re-check the whole ledger from genesis; see ``gpucoin.ledger.audit.run_audit``.

        Returns:
            One problem per line, each naming the row or account; empty means the ledger is sound.
        """
        with self._session(write=False) as s:
            return run_audit(s, hard_cap_ugpc=hard_cap_ugpc)
