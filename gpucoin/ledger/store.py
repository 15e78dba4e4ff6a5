"""``Ledger``: the SQL ledger of signed messages and double-entry transfers (SPEC.md, Money).

One ``post`` (or one ``post_batch``) is one database transaction: every transfer of every
operation is authorized by the signed message it cites (``gpucoin.ledger.authorize``) and
applied under the money rules (``gpucoin.ledger.state``), checked on the rows read inside that
transaction, or nothing is. A ledger holds one market: its first message is the market's
Genesis (``init_genesis``), which fixes the EIP-712 domain, the policy and the epoch clock.

    db       engines, transactions, bulk inserts (SQLite and PostgreSQL specifics)
    market   the stored binding: domain, Genesis, policy
    record   checking, admitting and storing signed messages
    post     authorizing and posting operations
    audit    re-checking everything from genesis
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, or_
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import aliased
from sqlmodel import Session, create_engine, select

from gpucoin.exceptions import GpucoinError, LedgerError, NoGenesis, SignatureError, UnknownAccount
from gpucoin.ledger import db, migrate
from gpucoin.ledger.accounts import BURNED, ISSUANCE, TREASURY, is_valid_account, wallet_account
from gpucoin.ledger.admission import GENESIS, Admission
from gpucoin.ledger.epochs import epoch_at, epoch_end_s
from gpucoin.ledger.facts import Charge, GenesisInfo, Msg
from gpucoin.ledger.market import Binding, read_binding
from gpucoin.ledger.models import (
    AccountRow,
    EpochCloseRow,
    IntervalChargeRow,
    MarketRow,
    MessageRow,
    OperationRow,
    PolicyRow,
    SlashRow,
    TransferRow,
    UnbondingRow,
    VerificationReportRow,
)
from gpucoin.ledger.plans import plan_genesis
from gpucoin.ledger.post import apply_batch, charge_of, ledger_time_us, lock_head
from gpucoin.ledger.record import Checked, check_message, check_messages, insert_messages, new_messages
from gpucoin.ledger.rules import SLASH_CODES, canonical_json, operation_hash
from gpucoin.ledger.transfer import Code, Operation, Transfer
from gpucoin.policy.model import Policy, policy_hash
from gpucoin.policy.model import canonical_json as policy_json
from gpucoin.policy.tokenomics import Reward, distribute_emission
from gpucoin.verify.sampling import VerificationRecord
from gpucoin.wallet.messages import Domain

MAX_BATCH = db.MAX_BATCH
"""Most operations (or messages) one batch may hold: bounds a transaction's size and lock time."""

_AFTER_STORED = 1 << 62
"""A message id above any stored one: where the messages of the batch being written sort."""

GENESIS_OP_ID = "genesis"
"""Operation id of the Genesis's allocations."""


class Ledger:
    """The gpucoin ledger on SQLite or PostgreSQL.

    Holds signed EIP-712 messages and the hash-chained double-entry transfers they authorize,
    with a running balance per account, each job's escrow and each wallet's unbonding stake.
    Amounts are int µGPC everywhere.

    Args:
        url: an SQLAlchemy URL: ``"sqlite:////home/x/.gpucoin/local/ledger.db"`` (the file and
            its directory are created if missing) or ``"postgresql://user@host/db"``. The schema
            is created or upgraded to the newest migration.
        domain: the market's EIP-712 domain (a ``gpucoin.wallet.messages.Domain`` or its dict)
            the caller expects; a ledger of another market is refused. None: any.
        clock: returns the time in unix seconds: deadlines, ``recorded_at``, ``created_at`` and
            so the epoch of every operation follow it.

    Raises:
        LedgerError: for a bad URL, a database that cannot be opened or migrated, or a
            ``domain`` other than the one the ledger's Genesis was signed in.
    """

    def __init__(
        self,
        url: str,
        *,
        domain: Domain | Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        wanted = (
            None if domain is None else (domain if isinstance(domain, Domain) else Domain.from_dict(domain)).as_dict()
        )
        self._clock = clock
        url = db.normalize_url(url)
        parsed = make_url(url)
        self.url = url
        self._is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {}
        if self._is_sqlite:
            kwargs["connect_args"] = {"timeout": db.SQLITE_BUSY_TIMEOUT_S}
            path = parsed.database
            if path and path != ":memory:" and not path.startswith("file:"):
                Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs["pool_pre_ping"] = True
            # psycopg's own executemany (pipeline mode, one parsed statement) instead of SQLAlchemy
            # rendering a fresh many-VALUES INSERT per batch that psycopg then re-parses.
            kwargs["use_insertmanyvalues"] = False
        self._engine: Engine = create_engine(url, **kwargs)
        if self._is_sqlite:
            db.install_sqlite_hooks(self._engine)
        try:
            with self._engine.connect() as conn:
                conn.execution_options(**{db.WRITE: True})
                with conn.begin():
                    migrate.upgrade(conn)
                    self._binding = read_binding(conn)
        except GpucoinError:
            self._engine.dispose()
            raise
        except Exception as exc:
            self._engine.dispose()
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            where = parsed.render_as_string(hide_password=True)
            raise LedgerError(
                f"cannot open the ledger at {where}: {reason[-1] if reason else type(exc).__name__}"
            ) from exc
        if wanted is not None and self._binding is not None and self._binding.domain != wanted:
            self._engine.dispose()
            raise LedgerError(
                f"this ledger belongs to the market with EIP-712 domain {self._binding.domain}, not {wanted}"
            )

    # -- plumbing -------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for tools and tests; writes should go through ``post``)."""
        return self._engine

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return "sqlite" if self._is_sqlite else "postgresql"

    def _session(self, *, write: bool) -> Any:
        return db.session(self._engine, write=write)

    def _now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    def close(self) -> None:
        """Release every pooled database connection; the object is unusable afterwards."""
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the market -----------------------------------------------------------------------

    def _current_binding(self, conn: Any = None) -> Binding | None:
        """The market binding, re-read (another process may have recorded the Genesis since)."""
        if self._binding is None or self._binding.genesis is None:
            if conn is not None:
                self._binding = read_binding(conn, lock=True)
            else:
                with self._engine.connect() as c, c.begin():
                    self._binding = read_binding(c)
        return self._binding

    @property
    def genesis(self) -> GenesisInfo | None:
        """The market's Genesis and policy (None: the ledger has no Genesis yet)."""
        binding = self._current_binding()
        return None if binding is None else binding.genesis

    def _require_genesis(self) -> GenesisInfo:
        genesis = self.genesis
        if genesis is None:
            raise NoGenesis("this ledger has no Genesis yet (Ledger.init_genesis)")
        return genesis

    @property
    def policy(self) -> Policy:
        """The incentive policy the market's Genesis names.

        Raises:
            NoGenesis: the ledger has no Genesis yet.
        """
        return self._require_genesis().policy

    @property
    def domain(self) -> Domain | None:
        """The EIP-712 domain of the market (None: no Genesis yet)."""
        binding = self._current_binding()
        return None if binding is None else Domain.from_dict(binding.domain)

    def current_epoch(self) -> int:
        """The emission epoch the ledger's time is in now (a Settlement must name it): its clock,
        never before the newest row's time (``post.ledger_time_us``), as a post now would see it.

        Raises:
            NoGenesis: the ledger has no Genesis yet.
        """
        g = self._require_genesis()
        with self._session(write=False) as s:
            now_us = ledger_time_us(s, self._now_us())
        return epoch_at(now_us, g.start_s, g.policy.tokenomics.epoch_length_s)

    def epoch_end_s(self, epoch: int) -> int:
        """Unix second at which ``epoch`` ends (an EpochClose is admitted from then on)."""
        g = self._require_genesis()
        return epoch_end_s(epoch, g.start_s, g.policy.tokenomics.epoch_length_s)

    def epoch_charges(self, epoch: int) -> list[Charge]:
        """Every interval charged in ``epoch``, across all jobs (what closing it distributes)."""
        with self._session(write=False) as s:
            rows = s.exec(select(IntervalChargeRow).where(IntervalChargeRow.epoch == epoch)).all()
        return [charge_of(r) for r in rows]

    def closable_epochs(self) -> list[int]:
        """Epochs that ended, had intervals charged and are not closed yet, after the last closed one."""
        now = self.current_epoch()
        with self._session(write=False) as s:
            last = s.exec(select(func.max(EpochCloseRow.epoch))).one()
            q = select(IntervalChargeRow.epoch).distinct().where(IntervalChargeRow.epoch < now)
            if last is not None:
                q = q.where(IntervalChargeRow.epoch > last)
            return sorted(int(e) for e in s.exec(q).all())

    def epoch_close(self, epoch: int) -> EpochCloseRow | None:
        """The close of ``epoch`` (what its EpochClose minted), None while it is open."""
        with self._session(write=False) as s:
            return s.get(EpochCloseRow, epoch)

    def epoch_rewards(self, epoch: int) -> list[Reward]:
        """What the close of ``epoch`` minted, per receipt and role (empty while it is open).

        Recomputed from the close's emission and the epoch's charges with ``distribute_emission``,
        the function the close was checked by; the MINT_* transfers name only the EpochClose.
        """
        close = self.epoch_close(epoch)
        if close is None:
            return []
        intervals = [c.interval for c in self.epoch_charges(epoch)]
        return distribute_emission(int(close.emission), intervals, self.policy.tokenomics)

    def init_genesis(self, genesis: Any, policy: Policy) -> None:
        """Record the market's Genesis as the ledger's first message, with the policy it names, and
        mint its allocations (operation ``"genesis"``), in one transaction. Again with the same
        Genesis: a no-op.

        Args:
            genesis: the signed Genesis (a ``SignedMessage``), signed by its ``coordinator``.
            policy: the policy whose ``policy_hash`` the Genesis names.

        Raises:
            SignatureError: the message does not check, or is not a Genesis.
            NoGenesis: the ledger already holds other messages, or another Genesis.
            LedgerError: the policy's hash is not the Genesis's ``policyHash``.
            As ``Admission.admit_genesis``.
        """
        checked = check_message(genesis)
        row, typed = checked
        if row["primary_type"] != GENESIS:
            raise SignatureError(f"init_genesis takes a Genesis, got a {row['primary_type']}")
        m = typed["message"]
        if policy_hash(policy) != m["policyHash"]:
            raise LedgerError(
                f"the Genesis names policy {m['policyHash']}, the policy given hashes to {policy_hash(policy)}"
            )
        plan = plan_genesis(m["allocations"], row["digest"])
        for attempt in range(db.MAX_ATTEMPTS):
            try:
                with self._session(write=True) as s:
                    self._binding = self._record_genesis(s, checked, policy, plan)
                    return
            except (IntegrityError, OperationalError) as exc:
                if not db.retryable(exc) or attempt + 1 == db.MAX_ATTEMPTS:
                    raise LedgerError(f"the database refused the Genesis: {exc.orig}") from None

    def _record_genesis(self, s: Session, checked: Checked, policy: Policy, plan: list[Transfer]) -> Binding:
        row, typed = checked
        conn = s.connection()
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({migrate.PG_LOCK_KEY})")
        bound = read_binding(conn)
        if bound is not None and bound.genesis is not None:
            if bound.genesis.digest == row["digest"]:
                return bound
            raise NoGenesis(f"this ledger already has the Genesis {bound.genesis.digest}; refused {row['digest']}")
        now_us = self._now_us()
        empty = s.exec(select(func.count()).select_from(MessageRow)).one() == 0 and bound is None
        Admission(domain=None, now_s=now_us // 1_000_000, empty=empty).admit_genesis(
            typed["domain"], typed["message"], row["digest"], policy
        )
        h = policy_hash(policy)
        if s.get(PolicyRow, h) is None:
            db.insert_rows(s, PolicyRow.__table__, [{"hash": h, "body": policy_json(policy)}])
        db.insert_rows(s, MessageRow.__table__, [{**row, "recorded_at": now_us}])
        first = s.exec(select(MessageRow.id).where(MessageRow.digest == row["digest"])).one()
        s.execute(
            insert(MarketRow.__table__).values(
                id=1,
                domain=canonical_json(typed["domain"]),
                bound_at=now_us,
                first_message_id=first,
                genesis_digest=row["digest"],
                policy_hash=h,
            )
        )
        info = GenesisInfo.of(Msg(row["digest"], GENESIS, row["signer"], typed["message"]), policy)
        if plan:
            ops = [Operation(GENESIS_OP_ID, tuple(plan), "genesis allocations")]
            apply_batch(s, ops, [operation_hash(plan, ops[0].memo)], info, now_us)
        return Binding(dict(typed["domain"]), int(first), info)

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
            As ``record_messages``.
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
            NoGenesis: the ledger has no Genesis yet, or the message is a Genesis.
            NonceReused: if a message reuses a (signer, nonce) of a different stored message.
            ConflictError: a second JobOrder for one job; an Assignment that goes back.
            UnknownParty: a message naming a job, node, provider or message the ledger does not
                know, a receipt from a provider its rank is not assigned to, a message only the
                coordinator or the admin may sign signed by someone else.
            ReceiptOutOfOrder: a WorkReceipt whose steps overlap, leave a gap or do not chain.
            LedgerError: for more than ``MAX_BATCH`` messages.
        """
        rows = check_messages(signed)
        if not rows:
            return 0
        return self._write(rows, [], [])[0]

    def _write(
        self, rows: dict[str, Checked], ops: list[Operation], contents: list[str]
    ) -> tuple[int, list[list[int]]]:
        """Record the checked messages ``rows``, then apply ``ops``, in one write transaction.

        Retried (at most ``db.MAX_ATTEMPTS`` times) when it lost a race: another writer stored the
        same digest, nonce, job or receipt step between our check and insert, or the server broke
        a deadlock between two such inserts (PostgreSQL; SQLite's BEGIN IMMEDIATE rules both out).
        The retry reads again and sees the winner.

        Returns:
            (how many messages were new, the transfer ids of each operation).
        """
        for attempt in range(db.MAX_ATTEMPTS):
            try:
                with self._session(write=True) as s:
                    lock_head(s)
                    binding = self._current_binding(s.connection())
                    now_us = ledger_time_us(s, self._now_us())
                    new = new_messages(s, rows) if rows else []
                    n_new = insert_messages(s, new, binding, now_us) if new else 0
                    genesis = binding.genesis if binding is not None else None
                    # what was just recorded need not be read back: after every stored message, in order
                    known = {
                        r["digest"]: (
                            _AFTER_STORED + i,
                            Msg(r["digest"], r["primary_type"], r["signer"], typed["message"]),
                        )
                        for i, (r, typed) in enumerate(new)
                    }
                    return n_new, (apply_batch(s, ops, contents, genesis, now_us, known) if ops else [])
            except (IntegrityError, OperationalError) as exc:
                if not db.retryable(exc):
                    raise LedgerError(f"the database refused the write: {exc.orig}") from None
                if attempt + 1 == db.MAX_ATTEMPTS:
                    raise LedgerError(
                        f"the write was refused, concurrent writes kept conflicting: {exc.orig}"
                    ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def post(self, op_id: str, transfers: Sequence[Transfer], memo: str = "") -> list[int]:
        """Apply the transfers of one operation in one database transaction, all or nothing.

        Args:
            op_id: the client-chosen operation id (1-256 characters); makes the post idempotent.
            transfers: applied in order; each debit is checked against the running balance, and
                each must be authorized by the recorded message it cites (``gpucoin.ledger.authorize``).
            memo: free text stored with the operation (part of its content).

        Returns:
            The ids of the transfer rows, in the order of ``transfers``. A retry with the same
            op_id, transfers and memo returns the original ids and changes nothing.

        Raises:
            ConflictError: if ``op_id`` was already posted with different transfers or memo.
            Unauthorized: a transfer its cited message does not authorize (``StaleEpoch``: a
                Settlement of another epoch than the current one).
            RuleViolation: a transfer the money rules forbid (``gpucoin.ledger.state``).
            LedgerError: if a transfer's digest names no recorded message, the ledger has no
                Genesis, or the operation is empty or malformed (nothing is written).
            InsufficientFunds: if an account other than ``system:issuance`` would go below zero.
            BalanceOverflow: if a balance would leave the signed 64-bit range.
        """
        return self.post_batch([Operation(op_id, tuple(transfers), memo)])[0]

    def post_batch(self, operations: Sequence[Operation], *, messages: Sequence[Any] = ()) -> list[list[int]]:
        """Apply many operations, in order, in one database transaction: all of them or none.

        Each operation keeps its own id and idempotency (one already posted with the same content
        returns its original ids), and each is checked against the state the ones before it left.

        Args:
            operations: the operations, applied in this order.
            messages: signed messages to record first in the same transaction (as
                ``record_messages``: checked before it begins, already stored ones skipped), e.g.
                the JobOrder and Settlements the operations' transfers name. If the batch is
                refused, none of them is stored either.

        Returns:
            The transfer ids of each operation, in the order given.

        Raises:
            As ``post`` and ``record_messages``, naming the operation or message that was refused;
            then nothing of the batch is written. LedgerError for more than ``MAX_BATCH``
            operations or messages.
        """
        ops = list(operations)
        rows = check_messages(messages)
        if not ops and not rows:
            return []
        if len(ops) > MAX_BATCH:
            raise LedgerError(f"{len(ops)} operations in one batch; at most {MAX_BATCH}")
        for op in ops:
            if not isinstance(op, Operation):
                raise LedgerError(f"expected an Operation, got {type(op).__name__}")
        contents = [operation_hash(op.transfers, op.memo) for op in ops]
        return self._write(rows, ops, contents)[1]

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

    def unbonding(self, address: str) -> dict[int, int]:
        """The wallet's stake still unbonding, µGPC by the epoch it matures (may be withdrawn from).

        Raises:
            UnknownAccount: ``address`` is no address.
        """
        account = wallet_account(address, "unbonding")
        with self._session(write=False) as s:
            rows = s.exec(select(UnbondingRow).where(UnbondingRow.account == account)).all()
        return {int(r.mature_epoch): int(r.amount) for r in rows}

    def market_counts(self) -> dict[str, Any]:
        """Counts for the head's status and metrics, in one read transaction.

        Returns:
            ``verdicts``: admitted VerificationReports by verdict (``pass``, ``fail``...);
            ``messages``: stored messages by primary type; ``bonded``: µGPC in all bonded accounts.
        """
        with self._session(write=False) as s:
            verdicts = s.exec(
                select(VerificationReportRow.verdict, func.count()).group_by(VerificationReportRow.verdict)
            ).all()
            kinds = s.exec(select(MessageRow.primary_type, func.count()).group_by(MessageRow.primary_type)).all()
            bonded = s.exec(select(func.sum(AccountRow.balance)).where(AccountRow.name.like("wallet:%:bonded"))).one()
        return {
            "verdicts": {v: int(n) for v, n in verdicts},
            "messages": {t: int(n) for t, n in kinds},
            "bonded": int(bonded or 0),
        }

    def verification_records(self, addresses: Iterable[str]) -> dict[str, VerificationRecord]:
        """Each address's record as a worker: the admitted VerificationReports on the WorkReceipts
        it signed, over every job, in the order they were recorded (one read transaction); a
        report it signed itself on its own receipt counts for nothing. Counted per checked
        receipt: a provider holding k ranks of a job gains k per checked interval.

        Args:
            addresses: checksum addresses (each is in the answer; a node never checked has an
                empty record).

        Returns:
            address -> ``verify.sampling.VerificationRecord``.
        """
        wanted = sorted(set(addresses))
        receipt, report = aliased(MessageRow), aliased(MessageRow)
        worker, is_pass = receipt.signer.label("worker"), VerificationReportRow.verdict == "pass"

        def reports(*columns: Any) -> Any:  # reports on the receipts of ``wanted``, as ``columns``
            return (
                select(worker, *columns)
                .select_from(VerificationReportRow)
                .join(receipt, receipt.digest == VerificationReportRow.receipt_digest)
                .join(report, report.digest == VerificationReportRow.digest)
                .where(receipt.signer.in_(wanted), VerificationReportRow.verifier != receipt.signer)
                .group_by(worker)
            )

        newest_other = reports(func.max(report.id).label("last")).where(~is_pass).subquery()
        with self._session(write=False) as s:
            counts = s.exec(reports(is_pass.label("pass"), func.count()).group_by(is_pass)).all()
            streaks = dict(
                s.exec(
                    reports(func.count())
                    .outerjoin(newest_other, newest_other.c.worker == receipt.signer)
                    .where(is_pass, report.id > func.coalesce(newest_other.c.last, -1))
                ).all()
            )
        passed = {w: int(n) for w, p, n in counts if p}
        other = {w: int(n) for w, p, n in counts if not p}
        return {
            a: VerificationRecord(passed=passed.get(a, 0), other=other.get(a, 0), clean_streak=int(streaks.get(a, 0)))
            for a in wanted
        }

    def proven_frauds(self, addresses: Iterable[str]) -> dict[str, int]:
        """How many times each address was slashed, over every job (one read transaction): for a
        WorkReceipt it signed as a worker, or for a VerificationReport it signed as a verifier
        that a re-check showed false (``verify.recheck``); the slashed party is the signer of the
        message each ``slash`` row names.

        Args:
            addresses: checksum addresses (each is in the answer, 0 if never slashed).
        """
        wanted = sorted(set(addresses))
        with self._session(write=False) as s:
            counts = dict(
                s.exec(
                    select(MessageRow.signer, func.count())
                    .select_from(SlashRow)
                    .join(MessageRow, MessageRow.digest == SlashRow.receipt)
                    .where(MessageRow.signer.in_(wanted))
                    .group_by(MessageRow.signer)
                ).all()
            )
        return {a: int(counts.get(a, 0)) for a in wanted}

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

        Args:
            hard_cap_ugpc: a cap on supply to check besides the policy's own (None: the policy's).

        Returns:
            One problem per line, each naming the row or account; empty means the ledger is sound.
        """
        from gpucoin.ledger.audit import run_audit

        with self._session(write=False) as s:
            return run_audit(s, now_us=self._now_us(), hard_cap_ugpc=hard_cap_ugpc)
