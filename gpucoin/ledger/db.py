"""Database plumbing of the ledger: URLs, engines, transactions, bulk inserts, retries.

SQLite (the default): WAL mode, STRICT tables, and every write transaction starts with ``BEGIN
IMMEDIATE`` (the write lock up front, so two writers never both read a balance and then both
write); reads use a plain deferred ``BEGIN``. That is SQLAlchemy's recipe for SQLite
transactions: sqlite3's own implicit BEGIN is off (``isolation_level = None``) and the engine's
``begin`` event emits ours.

PostgreSQL (``postgresql+psycopg://...``; ``postgresql://`` is read as that): READ COMMITTED;
a write first locks the ``chain_head`` row (``SELECT ... FOR UPDATE``), then the rows it touches,
each set in name order, so writers serialize on the head and always lock in one order (no
deadlock). A statement after the head lock sees every commit made before it was granted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Table, event, insert
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from gpucoin.exceptions import LedgerError, SignatureError
from gpucoin.ledger.rules import canonical_json

WRITE = "gpucoin_write"
"""Connection execution option that makes the SQLite ``begin`` hook emit BEGIN IMMEDIATE."""

SQLITE_BUSY_TIMEOUT_S = 60.0
"""Seconds a SQLite connection waits for another writer's lock before giving up."""

MAX_ATTEMPTS = 3
"""Tries of a write that lost a uniqueness race on a server database (a retry sees the winner)."""

MAX_BATCH = 10_000
"""Most operations (or messages) one batch may hold: bounds a transaction's size and lock time."""


def now_us() -> int:
    """Wall-clock time in µs since the Unix epoch."""
    return time.time_ns() // 1000


def hex_bytes(value: Any, n_bytes: int | None, what: str) -> str:
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


def nonce_text(message: Any) -> str | None:
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


def retryable(exc: Exception) -> bool:
    """Whether a failed write transaction may simply be tried again (it lost a race, nothing was written)."""
    if isinstance(exc, IntegrityError):
        return True
    return getattr(getattr(exc, "orig", None), "sqlstate", None) in _RETRY_SQLSTATES


def typed_text(typed: Any) -> str:
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


COPY_MIN_ROWS = 32
"""From this many rows on, an insert on PostgreSQL goes through COPY (one statement, no per-row round trip)."""


def insert_rows(s: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` (dicts of column values, all with the same keys) into ``table`` in the session's transaction.

    On PostgreSQL a large batch is streamed with ``COPY ... FROM STDIN`` (psycopg's copy), which
    the server applies as one statement; otherwise (SQLite, or a few rows) an executemany INSERT.
    """
    if not rows:
        return
    conn = s.connection()
    if conn.dialect.name != "postgresql" or len(rows) < COPY_MIN_ROWS:
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


def install_sqlite_hooks(engine: Engine) -> None:
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
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE) else "BEGIN")


def normalize_url(url: str) -> str:
    """The SQLAlchemy URL to open: ``postgresql://`` and ``postgres://`` mean psycopg 3.

    Raises:
        LedgerError: for text that is not a database URL, or a backend other than SQLite or PostgreSQL.
    """
    if not isinstance(url, str) or not url:
        raise LedgerError(f"ledger URL must be text like sqlite:///path or postgresql://host/db, got {url!r}")
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    try:
        backend = make_url(url).get_backend_name()
    except Exception:
        raise LedgerError(f"not a database URL: {url!r} (expected sqlite:///path or postgresql://host/db)") from None
    if backend not in ("sqlite", "postgresql"):
        raise LedgerError(f"ledger backend {backend!r} is not supported; use sqlite or postgresql")
    return url


@contextmanager
def session(engine: Engine, *, write: bool) -> Iterator[Session]:
    """One session in one transaction, committed on success and rolled back on any error.

    ``write`` makes SQLite begin with ``BEGIN IMMEDIATE`` (the write lock before any read).
    """
    with engine.connect() as conn:
        if write:
            conn.execution_options(**{WRITE: True})
        with Session(bind=conn, expire_on_commit=False) as s:
            with s.begin():
                yield s


def in_(s: Session, column: Any, values: Any) -> Any:
    """``column IN values`` for a WHERE clause; on PostgreSQL ``column = ANY(:array)``, one bound
    array instead of one parameter per value (psycopg splits a query text with hundreds of
    placeholders on every execution)."""
    values = list(values)
    if s.connection().dialect.name == "postgresql":
        from sqlalchemy import any_, bindparam
        from sqlalchemy.dialects.postgresql import ARRAY

        return column == any_(bindparam(None, values, type_=ARRAY(column.type)))
    return column.in_(values)
