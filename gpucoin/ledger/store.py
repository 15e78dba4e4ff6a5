"""``Ledger``: the SQL ledger of signed messages and double-entry transfers (SPEC.md, Money).

One ``post`` is one database transaction: every transfer of an operation is applied, with the
running balances checked inside that transaction, or none is. On SQLite the database runs in
WAL mode and every write transaction starts with ``BEGIN IMMEDIATE`` (taking the write lock up
front, so two writers never both read a balance and then both write); reads use a plain
deferred ``BEGIN``. That is SQLAlchemy's recipe for SQLite transactions: sqlite3's own implicit
BEGIN is switched off (``isolation_level = None``) and the engine's ``begin`` event emits ours.
On any other engine the write path is plain SQL: the ``chain_head`` row is locked with
``SELECT ... FOR UPDATE`` first, which serializes posts the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from eth_utils import is_address, to_checksum_address
from sqlalchemy import event, func, or_
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, create_engine, select

from gpucoin.exceptions import ConflictError, LedgerError, SignatureError, UnknownAccount
from gpucoin.ledger.accounts import BURNED, ISSUANCE, TREASURY, is_valid_account
from gpucoin.ledger.audit import run_audit, verify_message
from gpucoin.ledger.models import LEDGER_TABLES, AccountRow, ChainHead, MessageRow, OperationRow, TransferRow
from gpucoin.ledger.rules import GENESIS_HASH, SLASH_CODES, apply_transfers, canonical_json, chain_hash, operation_hash
from gpucoin.ledger.transfer import Code, Transfer

_WRITE = "gpucoin_write"
"""Connection execution option that makes the SQLite ``begin`` hook emit BEGIN IMMEDIATE."""

_SQLITE_BUSY_TIMEOUT_S = 30.0
"""Seconds a SQLite connection waits for another writer's lock before giving up."""

_MAX_ATTEMPTS = 2
"""Tries of a write that lost a uniqueness race on a server database (the retry then sees the winner)."""

MAX_OP_ID_LEN = 256
"""Longest operation id accepted, in characters."""


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


class Ledger:
    """The gpucoin ledger on an SQL database (SQLite now; PostgreSQL through the same code).

    Holds signed EIP-712 messages and the hash-chained double-entry transfers they authorize,
    with a running balance per account. Amounts are int µGPC everywhere.

    Args:
        url: an SQLAlchemy URL, e.g. ``"sqlite:////home/x/.gpucoin/local/ledger.db"``; the
            schema (and, for a SQLite file, its directory) is created if missing.
    """

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.url = url
        self._is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {}
        if self._is_sqlite:
            kwargs["connect_args"] = {"timeout": _SQLITE_BUSY_TIMEOUT_S}
            db = parsed.database
            if db and db != ":memory:" and not db.startswith("file:"):
                Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._engine: Engine = create_engine(url, **kwargs)
        if self._is_sqlite:
            _install_sqlite_hooks(self._engine)
        with self._engine.connect() as conn:
            conn.execution_options(**{_WRITE: True})
            with conn.begin():
                SQLModel.metadata.create_all(conn, tables=LEDGER_TABLES)
        try:
            with self._session(write=True) as s:
                if s.get(ChainHead, 1) is None:
                    s.add(ChainHead(id=1, last_transfer_id=0, last_hash=GENESIS_HASH))
        except IntegrityError:
            pass  # another process created the head row first (a server database)

    # -- plumbing -------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for tools and tests; writes should go through ``post``)."""
        return self._engine

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
        typed = signed.typed_data()
        text = canonical_json(typed)
        digest = _hex(signed.digest, 32, "digest")
        signature = _hex(signed.signature, 65, "signature")
        if not (isinstance(signed.signer, str) and is_address(signed.signer)):
            raise SignatureError(f"signer is not an address: {signed.signer!r}")
        signer = to_checksum_address(signed.signer)
        primary_type = str(signed.primary_type)
        nonce = _nonce_text(typed.get("message"))
        fields = dict(
            digest=digest,
            primary_type=primary_type,
            signer=signer,
            nonce=nonce,
            signature=signature,
            typed_data=text,
            recorded_at=_now_us(),
        )
        problem = verify_message(MessageRow(**fields))
        if problem is not None:
            raise SignatureError(f"message {digest} refused: {problem}")
        for attempt in range(_MAX_ATTEMPTS):
            try:
                with self._session(write=True) as s:
                    if s.exec(select(MessageRow.id).where(MessageRow.digest == digest)).first() is not None:
                        return
                    if nonce is not None:
                        other = s.exec(
                            select(MessageRow).where(MessageRow.signer == signer, MessageRow.nonce == nonce)
                        ).first()
                        if other is not None:
                            raise ConflictError(
                                f"{signer} already used nonce {nonce} in message #{other.id} "
                                f"({other.primary_type} {other.digest}); refused {primary_type} {digest}"
                            )
                    s.add(MessageRow(**fields))
                return
            except IntegrityError:
                # Another writer recorded the same digest or nonce between our check and insert
                # (a server database; SQLite's BEGIN IMMEDIATE rules it out); the retry sees it.
                if attempt + 1 == _MAX_ATTEMPTS:
                    raise LedgerError(f"message {digest} could not be recorded: a concurrent write kept conflicting")

    def post(self, op_id: str, transfers: Sequence[Transfer], memo: str = "") -> list[int]:
        """Apply the transfers of one operation in one database transaction, all or nothing.

        Args:
            op_id: the client-chosen operation id (1-256 characters); makes the post idempotent.
            transfers: applied in order; each debit is checked against the running balance.
            memo: free text stored with the operation (part of its content).

        Returns:
            The ids of the transfer rows, in the order of ``transfers``. A retry with the same
            op_id, transfers and memo returns the original ids and changes nothing.

        Raises:
            ConflictError: if ``op_id`` was already posted with different transfers or memo.
            LedgerError: if a transfer's digest names no recorded message, the operation is
                empty or malformed (nothing is written).
            InsufficientFunds: if an account other than ``system:issuance`` would go below zero.
            BalanceOverflow: if a balance would leave the signed 64-bit range.
        """
        if not isinstance(op_id, str) or not 1 <= len(op_id) <= MAX_OP_ID_LEN or not op_id.isprintable():
            raise LedgerError(f"operation id must be 1-{MAX_OP_ID_LEN} printable characters, got {op_id!r}")
        if not isinstance(memo, str):
            raise LedgerError(f"memo must be text, got {type(memo).__name__}")
        transfers = list(transfers)
        if not transfers:
            raise LedgerError(f"operation {op_id!r} has no transfers")
        for i, t in enumerate(transfers):
            if not isinstance(t, Transfer):
                raise LedgerError(f"transfer #{i} is a {type(t).__name__}, not a Transfer")
        content = operation_hash(transfers, memo)
        for attempt in range(_MAX_ATTEMPTS):
            try:
                return self._post_once(op_id, transfers, memo, content)
            except IntegrityError as exc:
                if attempt + 1 == _MAX_ATTEMPTS:
                    raise LedgerError(f"operation {op_id!r} refused by the database: {exc.orig}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _post_once(self, op_id: str, transfers: list[Transfer], memo: str, content: str) -> list[int]:
        """One attempt of ``post`` in one write transaction (see ``post``)."""
        with self._session(write=True) as s:
            # Lock the chain head first, always: on a server database this serializes posts and
            # gives every writer the same lock order (no deadlock).
            head = s.exec(select(ChainHead).where(ChainHead.id == 1).with_for_update()).one()
            op = s.get(OperationRow, op_id)
            if op is not None:
                if op.content_hash != content:
                    raise ConflictError(
                        f"operation {op_id!r} was posted with different content "
                        f"({op.n_transfers} transfers, hash {op.content_hash[:16]}...; now {len(transfers)} "
                        f"transfers, hash {content[:16]}...)"
                    )
                return list(
                    s.exec(select(TransferRow.id).where(TransferRow.op_id == op_id).order_by(TransferRow.seq)).all()
                )
            digests = sorted({t.digest.lower() for t in transfers})
            found = set(s.exec(select(MessageRow.digest).where(MessageRow.digest.in_(digests))).all())
            missing = [d for d in digests if d not in found]
            if missing:
                raise LedgerError(
                    f"operation {op_id!r}: {len(missing)} digest(s) name no recorded message: {', '.join(missing)}"
                )
            names = sorted({t.debit for t in transfers} | {t.credit for t in transfers})
            rows = {
                r.name: r
                for r in s.exec(select(AccountRow).where(AccountRow.name.in_(names)).with_for_update()).all()
            }
            new = apply_transfers({n: r.balance for n, r in rows.items()}, transfers)

            now = _now_us()
            first_id = head.last_transfer_id + 1
            s.add(
                OperationRow(
                    op_id=op_id,
                    content_hash=content,
                    memo=memo,
                    first_transfer_id=first_id,
                    n_transfers=len(transfers),
                    created_at=now,
                )
            )
            s.flush()  # the operation row first: the transfer rows reference it
            prev = head.last_hash
            ids: list[int] = []
            for seq, t in enumerate(transfers):
                fields = dict(
                    id=first_id + seq,
                    op_id=op_id,
                    seq=seq,
                    debit=t.debit,
                    credit=t.credit,
                    amount=t.amount,
                    code=Code(t.code).value,
                    digest=t.digest.lower(),
                    created_at=now,
                )
                row_hash = chain_hash(prev, **fields)
                s.add(TransferRow(**fields, prev_hash=prev, row_hash=row_hash))
                ids.append(fields["id"])
                prev = row_hash
            for name in names:
                if name in rows:
                    rows[name].balance = new[name]
                    s.add(rows[name])
                else:
                    s.add(AccountRow(name=name, balance=new[name]))
            head.last_transfer_id = ids[-1]
            head.last_hash = prev
            s.add(head)
        return ids

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

    def audit(self, hard_cap_ugpc: int | None = None) -> list[str]:
        """Re-check the whole ledger from genesis; see ``gpucoin.ledger.audit.run_audit``.

        Returns:
            One problem per line, each naming the row or account; empty means the ledger is sound.
        """
        with self._session(write=False) as s:
            return run_audit(s, hard_cap_ugpc=hard_cap_ugpc)
