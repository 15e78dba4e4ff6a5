"""Stateful test of the SQL ledger against an independent in-memory model of the money rules.

Hypothesis drives random operations (faucet and mint, bond, unbond, withdraw, escrow, settle,
refund, slash, whistleblower, multi-transfer operations whose later transfer fails, retries of
an op id with the same and with different content, ``post_batch``) against the real ``Ledger``
and against ``Model`` below, a second implementation of the rules written from SPEC.md and the
docstrings without any of ``gpucoin.ledger.state`` / ``gpucoin.ledger.rules``. After every step
the outcome (the transfer ids, or the exception class) and every balance must agree; at the end
of each example the ledger's audit must be clean and its escrow and unbonding rows, and the
deltas of its totals, must equal the model's.

One database per backend serves the whole run (a fresh one per example would cost a migration
each time), so every example uses its own wallets, job ids, op ids and message nonces and starts
its model from the ledger's current system balances and last transfer id.

Where the model sees several reasons to refuse a transfer (say a refund that is both partial and
larger than the escrow), any of their exception classes is accepted: which check the ledger runs
first is its own business. A batch is checked as the ledger documents it: conflicting op ids
first, then unknown digests, then the operations in order.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlmodel import Session, select

from gpucoin.exceptions import ConflictError, InsufficientFunds, LedgerError, RuleViolation
from gpucoin.ledger import (
    BURNED,
    ISSUANCE,
    TREASURY,
    BalanceOverflow,
    Code,
    Ledger,
    Operation,
    Transfer,
    escrow_account,
    wallet_account,
)
from gpucoin.ledger.models import EscrowRow, UnbondingRow
from tests.ledger.conftest import BACKENDS, make_url
from tests.ledger.helpers import Signer

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
SYSTEM = (ISSUANCE, BURNED, TREASURY)
WALLETS = 3
UNBONDING_CHOICES = (0, 2)
"""Each example posts through a Ledger opened with one of these ``unbonding_epochs``."""

SETTINGS = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# -- the model ------------------------------------------------------------------------------

# code -> (kinds it may debit, kinds it may credit, ownership: "same" wallet, "other" wallet, None)
SHAPES: dict[str, tuple[frozenset[str], frozenset[str], str | None]] = {
    "faucet": (frozenset({"issuance"}), frozenset({"available"}), None),
    "mint_worker": (frozenset({"issuance"}), frozenset({"available"}), None),
    "mint_verifier": (frozenset({"issuance"}), frozenset({"available"}), None),
    "bond": (frozenset({"available"}), frozenset({"bonded"}), "same"),
    "unbond": (frozenset({"bonded"}), frozenset({"unbonding"}), "same"),
    "withdraw": (frozenset({"unbonding"}), frozenset({"available"}), "same"),
    "escrow": (frozenset({"available"}), frozenset({"escrow"}), None),
    "burn": (frozenset({"escrow"}), frozenset({"burned"}), None),
    "treasury": (frozenset({"escrow"}), frozenset({"treasury"}), None),
    "pay": (frozenset({"escrow"}), frozenset({"available"}), None),
    "refund": (frozenset({"escrow"}), frozenset({"available"}), None),
    "slash": (frozenset({"bonded", "unbonding"}), frozenset({"burned"}), None),
    "whistleblower": (frozenset({"bonded", "unbonding"}), frozenset({"available"}), "other"),
}


def kind_of(account: str) -> str:
    """``available``/``bonded``/``unbonding``/``escrow`` or ``issuance``/``burned``/``treasury``."""
    if account.startswith("system:"):
        return account[len("system:"):]
    return account.rsplit(":", 1)[1]


def owner_of(account: str) -> str | None:
    return None if account.startswith("system:") else account.split(":")[1]


def content_of(op: Operation) -> tuple[Any, ...]:
    """What makes two posts of one op id the same operation: memo and transfers (not the epoch)."""
    return (op.memo, tuple((t.debit, t.credit, t.amount, Code(t.code).value, t.digest.lower()) for t in op.transfers))


@dataclass(frozen=True)
class MEscrow:
    source: str
    amount: int
    phase: str  # pending | posted | voided


class Refused(Exception):
    """The model refuses: ``allowed`` are the exception classes the ledger may raise."""

    def __init__(self, reasons: dict[type, str]) -> None:
        super().__init__("; ".join(f"{k.__name__}: {v}" for k, v in reasons.items()))
        self.allowed = frozenset(reasons)


class Model:
    """Balances, escrows, unbonding entries and stored operations of one example (plus the
    system accounts, started from the ledger's values), and the ledger's last transfer id."""

    def __init__(self, balances: dict[str, int], last_id: int) -> None:
        self.balances = dict(balances)
        self.escrows: dict[str, MEscrow] = {}
        self.unbonding: dict[str, dict[int, int]] = {}  # account -> {maturity epoch: µGPC}
        self.ops: dict[str, tuple[tuple[Any, ...], list[int]]] = {}  # op id -> (content, ids)
        self.last_id = last_id
        self.slashed = 0
        self.refunded = 0

    def bal(self, account: str) -> int:
        return self.balances.get(account, 0)

    def matured(self, account: str, epoch: int) -> int:
        return sum(v for e, v in self.unbonding.get(account, {}).items() if e <= epoch)

    @staticmethod
    def _take(entries: dict[int, int], amount: int, *, oldest_first: bool) -> None:
        for e in sorted(entries, reverse=not oldest_first):
            part = min(amount, entries[e])
            entries[e] -= part
            amount -= part
            if not entries[e]:
                del entries[e]
            if not amount:
                return
        raise AssertionError(f"model: unbonding entries short by {amount}")

    def transfer(self, i: int, t: Transfer, epoch: int | None, unbonding_epochs: int) -> None:
        """Apply one transfer in place, or raise Refused (and change nothing) if a rule forbids it."""
        code = Code(t.code).value
        dk, ck = kind_of(t.debit), kind_of(t.credit)
        debits, credits, owner = SHAPES[code]
        same = owner_of(t.debit) == owner_of(t.credit)
        shape_ok = dk in debits and ck in credits and not (owner == "same" and not same) and not (owner == "other" and same)
        why: dict[type, str] = {}
        where = f"#{i} {code} {t.debit} -> {t.credit} {t.amount}"

        def refuse(exc: type, text: str) -> None:
            why.setdefault(exc, f"{where}: {text}")

        if not shape_ok:
            refuse(RuleViolation, "wrong accounts for the code")
        esc = self.escrows.get(t.debit)
        if code == "escrow" and t.credit in self.escrows:
            refuse(RuleViolation, "the job's escrow already exists")
        if dk == "escrow" and (esc is None or esc.phase != "pending"):
            refuse(RuleViolation, f"escrow is {'never created' if esc is None else esc.phase}")
        have = self.bal(t.debit)
        debit_after, credit_after = have - t.amount, self.bal(t.credit) + t.amount
        if debit_after < 0 and t.debit != ISSUANCE:
            refuse(InsufficientFunds, f"has {have}")
        if debit_after < INT64_MIN or credit_after > INT64_MAX:
            refuse(BalanceOverflow, "out of int64")
        if shape_ok and code == "refund" and esc is not None and esc.phase == "pending":
            if t.credit != esc.source:
                refuse(RuleViolation, f"refund must go to {esc.source}")
            if t.amount != have:
                refuse(RuleViolation, f"refund must be the whole remainder {have}")
        if code in ("unbond", "withdraw") and epoch is None:
            refuse(RuleViolation, "needs an epoch")
        if shape_ok and code == "withdraw" and epoch is not None and t.amount > self.matured(t.debit, epoch):
            refuse(RuleViolation, f"only {self.matured(t.debit, epoch)} matured at epoch {epoch}")
        if why:
            raise Refused(why)

        self.balances[t.debit] = debit_after
        self.balances[t.credit] = credit_after
        if code == "escrow":
            self.escrows[t.credit] = MEscrow(t.debit, t.amount, "pending")
        elif dk == "escrow":
            assert esc is not None
            if code == "refund":
                self.escrows[t.debit] = replace(esc, phase="voided")
                self.refunded += t.amount
            elif debit_after == 0:
                self.escrows[t.debit] = replace(esc, phase="posted")
        if code == "unbond":
            assert epoch is not None
            entries = self.unbonding.setdefault(t.credit, {})
            entries[epoch + unbonding_epochs] = entries.get(epoch + unbonding_epochs, 0) + t.amount
        elif code == "withdraw":
            self._take(self.unbonding[t.debit], t.amount, oldest_first=True)
        elif dk == "unbonding":  # slash or whistleblower of stake still unbonding: newest first
            self._take(self.unbonding[t.debit], t.amount, oldest_first=False)
        if code in ("slash", "whistleblower"):
            self.slashed += t.amount


def model_post(
    model: Model, ops: list[Operation], unbonding_epochs: int, recorded: set[str]
) -> tuple[Model, list[list[int]]]:
    """What ``post_batch(ops)`` must do: the new model and the ids returned, or raise Refused."""
    fresh: dict[str, tuple[Any, ...]] = {}
    order: list[Operation] = []
    for op in ops:
        content = content_of(op)
        prior = model.ops[op.op_id][0] if op.op_id in model.ops else fresh.get(op.op_id)
        if prior is not None and prior != content:
            raise Refused({ConflictError: f"op {op.op_id!r} reused with other content"})
        if prior is None:
            fresh[op.op_id] = content
            order.append(op)
    for op in order:
        missing = {t.digest.lower() for t in op.transfers} - recorded
        if missing:
            raise Refused({LedgerError: f"op {op.op_id!r}: digest {sorted(missing)} not recorded"})
    new = copy.deepcopy(model)
    for op in order:
        for i, t in enumerate(op.transfers):
            try:
                new.transfer(i, t, op.epoch, unbonding_epochs)
            except Refused as exc:
                exc.args = (f"op {op.op_id!r} {exc.args[0]}",)
                raise
        ids = list(range(new.last_id + 1, new.last_id + 1 + len(op.transfers)))
        new.last_id += len(op.transfers)
        new.ops[op.op_id] = (content_of(op), ids)
    return new, [new.ops[op.op_id][1] for op in ops]


# -- the machine ----------------------------------------------------------------------------


def _key(*parts: object) -> Account:
    return Account.from_key(hashlib.sha256("gpucoin-stateful:".join(map(str, parts)).encode()).digest())


class LedgerMachine(RuleBasedStateMachine):
    """Set ``ledgers`` ({unbonding_epochs: Ledger}, one database) and ``counter`` on a subclass."""

    ledgers: dict[int, Ledger] = {}
    counter: Any = itertools.count(1)

    def __init__(self) -> None:
        super().__init__()
        self.n = n = next(type(self).counter)
        self.ledger = self.ledgers[UNBONDING_CHOICES[0]]
        self.ub = UNBONDING_CHOICES[0]
        self.epoch = 0
        self.wallets = [_key(n, i) for i in range(WALLETS)]
        self.escrow_accts: list[str] = []  # the escrow account of job f"st{n}-job{index}"
        self.wallet_accts = [wallet_account(w.address, k) for w in self.wallets for k in ("available", "bonded", "unbonding")]
        s = Signer(start=n * 100 + 1)  # FAUCET, COORDINATOR and WORKER nonces unique per example
        faucet = s.faucet(self.wallets[0], 1)
        receipt = s.receipt(0, job=f"st{n}-job0")
        settlement = s.settlement(receipt.digest, job=f"st{n}-job0", paid=1)
        order = s.order(1, job=f"st{n}-job0", consumer=self.wallets[0])
        registration = s.registration(1, who=self.wallets[1])
        worker_registration = s.registration(1)  # a receipt needs its job's order and its worker's registration
        self.ledger.record_messages([faucet, order, registration, worker_registration, receipt, settlement])
        self.recorded = {m.digest.lower() for m in (faucet, receipt, settlement, order, registration)}
        self.d_faucet, self.d_settle, self.d_order, self.d_reg = (
            faucet.digest, settlement.digest, order.digest, registration.digest)
        self.digests = [faucet.digest, receipt.digest, settlement.digest, order.digest, registration.digest]
        self.unrecorded = "0x" + hashlib.sha256(f"unrecorded-{n}".encode()).hexdigest()
        last = self.ledger.transfers(limit=1)
        self.sys0 = {a: self.ledger.balance(a) for a in SYSTEM}
        self.totals0 = self.ledger.totals()
        self.model = Model(self.sys0, last[-1].id if last else 0)
        self.posted: dict[str, Operation] = {}  # op id -> the operation stored under it
        self.failed_ids: list[str] = []  # op ids only ever refused: free for new content
        self.op_counter = itertools.count()

    # -- helpers ----------------------------------------------------------------------------

    def acct(self, i: int, kind: str = "available") -> str:
        return wallet_account(self.wallets[i].address, kind)  # type: ignore[arg-type]

    def wallet(self, data: st.DataObject, label: str = "wallet", *, having: str | None = None) -> int:
        """A wallet index; with ``having`` (an account kind), mostly one with money there."""
        if having is not None:
            rich = [i for i in range(WALLETS) if self.model.bal(self.acct(i, having)) > 0]
            if rich and not self.rare(data, f"{label} without {having}"):
                return data.draw(st.sampled_from(rich), label=label)
        return data.draw(st.integers(0, WALLETS - 1), label=label)

    def other_wallet(self, data: st.DataObject, i: int, label: str = "other") -> int:
        return (i + data.draw(st.integers(1, WALLETS - 1), label=label)) % WALLETS

    @staticmethod
    def rare(data: st.DataObject, label: str) -> bool:
        return data.draw(st.integers(0, 7), label=label) == 7

    def amount(self, data: st.DataObject, have: int, label: str = "amount") -> int:
        """Mostly what ``have`` allows, sometimes all of it, sometimes one more."""
        how = data.draw(st.sampled_from(["some", "all", "some", "more", "any"]), label=f"{label} how")
        if how == "some" and have > 1:
            return data.draw(st.integers(1, have), label=label)
        if how in ("some", "all"):
            return max(have, 1)
        if how == "more":
            return min(have + 1, INT64_MAX) if have >= 0 else 1
        return data.draw(st.integers(1, 10**7), label=label)

    def split(self, data: st.DataObject, total: int, k: int) -> list[int]:
        """``k`` (or fewer, if ``total`` < ``k``) positive parts summing to ``total`` >= 1."""
        k = max(1, min(k, total))
        cuts = sorted(data.draw(st.lists(st.integers(1, total - 1), min_size=k - 1, max_size=k - 1, unique=True),
                                label="cuts")) if k > 1 else []
        bounds = [0, *cuts, total]
        return [b - a for a, b in zip(bounds, bounds[1:])]

    @property
    def universe(self) -> list[str]:
        """Every account this example may touch (so far)."""
        return self.wallet_accts + self.escrow_accts + list(SYSTEM)

    def new_job(self) -> int:
        self.escrow_accts.append(escrow_account(f"st{self.n}-job{len(self.escrow_accts)}"))
        return len(self.escrow_accts) - 1

    def job(self, data: st.DataObject, *, existing: bool) -> int:
        """A job index: if ``existing``, mostly one whose escrow is pending; else mostly a new job."""
        escrows = self.model.escrows
        pending = [j for j, a in enumerate(self.escrow_accts) if a in escrows and escrows[a].phase == "pending"]
        if existing and pending and not self.rare(data, "any job"):
            return data.draw(st.sampled_from(pending), label="job")
        if not self.escrow_accts or (not existing and not self.rare(data, "a job seen before")):
            return self.new_job()
        return data.draw(st.integers(0, len(self.escrow_accts) - 1), label="job")

    def op_id(self, data: st.DataObject | None = None) -> str:
        free = [o for o in self.failed_ids if o not in self.model.ops]
        if data is not None and free and self.rare(data, "reuse a refused op id"):
            return data.draw(st.sampled_from(free), label="op id")
        return f"st{self.n}-op{next(self.op_counter)}"

    def maybe_epoch(self, data: st.DataObject, *, needed: bool = False) -> int | None:
        if needed:
            return None if self.rare(data, "no epoch") else self.epoch
        return data.draw(st.sampled_from([self.epoch, None]), label="epoch")

    def memo(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(["", "", "interval 0-10", "µ memo"]), label="memo")

    def submit(self, ops: list[Operation], *, batch: bool) -> bool:
        """Post ``ops`` to the ledger and to the model; both must agree. True if accepted."""
        refused: Refused | None = None
        try:
            new, want = model_post(self.model, ops, self.ub, self.recorded)
        except Refused as exc:
            refused = exc
        try:
            if batch:
                got = self.ledger.post_batch(ops)
            else:
                (op,) = ops
                got = [self.ledger.post(op.op_id, list(op.transfers), op.memo, epoch=op.epoch)]
        except LedgerError as exc:
            assert refused is not None, (
                f"ledger refused ({type(exc).__name__}: {exc}); the model expected ids {want}")
            assert type(exc) in refused.allowed, (
                f"ledger raised {type(exc).__name__}: {exc}; the model expected "
                f"{sorted(c.__name__ for c in refused.allowed)} ({refused})")
            self.failed_ids += [op.op_id for op in ops if op.op_id not in self.model.ops]
            return False
        assert refused is None, f"ledger accepted (ids {got}); the model refuses: {refused}"
        assert got == want, f"ledger returned ids {got}, the model predicts {want}"
        self.model = new
        for op in ops:
            self.posted.setdefault(op.op_id, op)
        return True

    def post(self, data: st.DataObject, transfers: list[Transfer], epoch: int | None) -> bool:
        return self.submit([Operation(self.op_id(data), tuple(transfers), self.memo(data), epoch)], batch=False)

    # -- builders: the transfers and epoch of one operation ----------------------------------

    def b_faucet(self, data: st.DataObject) -> tuple[list[Transfer], int | None]:
        i = self.wallet(data)
        code = data.draw(st.sampled_from([Code.FAUCET, Code.FAUCET, Code.MINT_WORKER, Code.MINT_VERIFIER]), label="code")
        digest = self.d_faucet if code is Code.FAUCET else self.d_settle  # the audit wants a Settlement for a mint
        amount = data.draw(st.integers(1, 10**9), label="amount")
        return [Transfer(ISSUANCE, self.acct(i), amount, code, digest)], self.maybe_epoch(data)

    def b_bond(self, data: st.DataObject, i: int | None = None) -> tuple[list[Transfer], int | None]:
        i = self.wallet(data, having="available") if i is None else i
        j = self.other_wallet(data, i) if self.rare(data, "bond into another wallet") else i
        amount = self.amount(data, self.model.bal(self.acct(i)))
        return [Transfer(self.acct(i), self.acct(j, "bonded"), amount, Code.BOND, self.d_reg)], self.maybe_epoch(data)

    def b_unbond(self, data: st.DataObject, i: int | None = None) -> tuple[list[Transfer], int | None]:
        i = self.wallet(data, having="bonded") if i is None else i
        amount = self.amount(data, self.model.bal(self.acct(i, "bonded")))
        t = Transfer(self.acct(i, "bonded"), self.acct(i, "unbonding"), amount, Code.UNBOND, self.d_reg)
        return [t], self.maybe_epoch(data, needed=True)

    def b_withdraw(self, data: st.DataObject, i: int | None = None) -> tuple[list[Transfer], int | None]:
        i = self.wallet(data, having="unbonding") if i is None else i
        src = self.acct(i, "unbonding")
        matured, total = self.model.matured(src, self.epoch), self.model.bal(src)
        how = data.draw(st.sampled_from(["matured", "matured", "matured+1", "all", "any"]), label="withdraw how")
        amount = {"matured": max(matured, 1), "matured+1": matured + 1, "all": max(total, 1)}.get(how)
        if amount is None:
            amount = self.amount(data, matured)
        t = Transfer(src, self.acct(i), amount, Code.WITHDRAW, self.d_reg)
        return [t], self.maybe_epoch(data, needed=True)

    def b_escrow(self, data: st.DataObject, j: int | None = None) -> tuple[list[Transfer], int | None]:
        i = self.wallet(data, "consumer", having="available")
        j = self.job(data, existing=False) if j is None else j
        amount = self.amount(data, self.model.bal(self.acct(i)))
        return [Transfer(self.acct(i), self.escrow_accts[j], amount, Code.ESCROW, self.d_order)], self.maybe_epoch(data)

    def b_settle(self, data: st.DataObject, j: int | None = None) -> tuple[list[Transfer], int | None]:
        """BURN + TREASURY + PAY (a non-empty subset) from one escrow: all of it, part, or too much."""
        esc = self.escrow_accts[self.job(data, existing=True) if j is None else j]
        rem = self.model.bal(esc)
        codes = data.draw(st.lists(st.sampled_from([Code.BURN, Code.TREASURY, Code.PAY]), min_size=1, max_size=3,
                                   unique=True), label="codes")
        how = data.draw(st.sampled_from(["all", "part", "part", "over"]), label="settle how")
        if how == "part" and rem > 1:
            total = data.draw(st.integers(1, rem - 1), label="total")
        elif how == "over" or rem == 0:
            total = rem + 1
        else:
            total = rem
        worker = self.wallet(data, "worker")
        credit = {Code.BURN: BURNED, Code.TREASURY: TREASURY, Code.PAY: self.acct(worker)}
        parts = self.split(data, total, len(codes))
        return [Transfer(esc, credit[c], a, c, self.d_settle) for c, a in zip(codes, parts)], self.maybe_epoch(data)

    def b_refund(self, data: st.DataObject, j: int | None = None) -> tuple[list[Transfer], int | None]:
        esc = self.escrow_accts[self.job(data, existing=True) if j is None else j]
        rem = self.model.bal(esc)
        e = self.model.escrows.get(esc)
        to = e.source if e is not None else self.acct(self.wallet(data))
        if self.rare(data, "refund to another wallet"):
            others = [self.acct(i) for i in range(WALLETS) if self.acct(i) != to]
            to = data.draw(st.sampled_from(others), label="to")
        how = data.draw(st.sampled_from(["all", "all", "part", "over"]), label="refund how")
        if how == "part" and rem > 1:
            amount = data.draw(st.integers(1, rem - 1), label="part")
        elif how == "all" and rem > 0:
            amount = rem
        else:
            amount = rem + 1
        return [Transfer(esc, to, amount, Code.REFUND, self.d_settle)], self.maybe_epoch(data)

    def b_slash(self, data: st.DataObject) -> tuple[list[Transfer], int | None]:
        kind = data.draw(st.sampled_from(["bonded", "unbonding"]), label="from")
        i = self.wallet(data, "cheater", having=kind)
        src = self.acct(i, kind)
        amount = self.amount(data, self.model.bal(src))
        if data.draw(st.booleans(), label="whistleblower"):
            j = i if self.rare(data, "pay the cheater itself") else self.other_wallet(data, i, "verifier")
            return [Transfer(src, self.acct(j), amount, Code.WHISTLEBLOWER, self.d_settle)], self.maybe_epoch(data)
        return [Transfer(src, BURNED, amount, Code.SLASH, self.d_settle)], self.maybe_epoch(data)

    def b_random(self, data: st.DataObject) -> tuple[list[Transfer], int | None]:
        """1-3 transfers of any codes, mostly between accounts of the right kinds."""
        transfers = []
        for _ in range(data.draw(st.integers(1, 3), label="transfers")):
            code = data.draw(st.sampled_from(sorted(SHAPES)), label="code")
            debits, credits, owner = SHAPES[code]
            if self.rare(data, "any accounts"):
                debit = data.draw(st.sampled_from(self.universe), label="debit")
                credit = data.draw(st.sampled_from([a for a in self.universe if a != debit]), label="credit")
            else:
                i = self.wallet(data)
                j = i if owner == "same" else self.other_wallet(data, i) if owner == "other" else self.wallet(data, "w2")
                debit, credit = (self.pick(data, sorted(kinds), w) for kinds, w in ((debits, i), (credits, j)))
            if debit == ISSUANCE:
                amount = data.draw(st.integers(1, 10**9), label="amount")
            else:
                amount = self.amount(data, self.model.bal(debit))
            digest = self.d_settle if code.startswith("mint") else data.draw(st.sampled_from(self.digests), label="digest")
            transfers.append(Transfer(debit, credit, amount, Code(code), digest))
        return transfers, self.maybe_epoch(data)

    def pick(self, data: st.DataObject, kinds: list[str], i: int) -> str:
        kind = data.draw(st.sampled_from(kinds), label="kind")
        if kind in ("available", "bonded", "unbonding"):
            return self.acct(i, kind)
        if kind == "escrow":
            return self.escrow_accts[self.job(data, existing=True)]
        return f"system:{kind}"

    BUILDERS = ("b_faucet", "b_bond", "b_unbond", "b_withdraw", "b_escrow", "b_settle", "b_refund", "b_slash",
                "b_random")

    # -- rules ------------------------------------------------------------------------------

    @initialize(ub=st.sampled_from(UNBONDING_CHOICES), epoch=st.integers(0, 5),
                funds=st.lists(st.integers(1000, 10**9), min_size=WALLETS, max_size=WALLETS),
                percent=st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100)), min_size=WALLETS,
                                 max_size=WALLETS))
    def start(self, ub: int, epoch: int, funds: list[int], percent: list[tuple[int, int]]) -> None:
        """Pick the unbonding period and first epoch; fund the wallets, bond and unbond some of it."""
        self.ub, self.ledger, self.epoch = ub, self.ledgers[ub], epoch
        faucet = [Transfer(ISSUANCE, self.acct(i), a, Code.FAUCET, self.d_faucet) for i, a in enumerate(funds)]
        bonded = [f * p // 100 for f, (p, _) in zip(funds, percent)]
        bond = [Transfer(self.acct(i), self.acct(i, "bonded"), b, Code.BOND, self.d_reg)
                for i, b in enumerate(bonded) if b]
        unbonding = [b * p // 100 for b, (_, p) in zip(bonded, percent)]
        unbond = [Transfer(self.acct(i, "bonded"), self.acct(i, "unbonding"), u, Code.UNBOND, self.d_reg)
                  for i, u in enumerate(unbonding) if u]
        for transfers, epoch_ in ((faucet, None), (bond, None), (unbond, epoch)):
            if transfers:
                assert self.submit([Operation(self.op_id(), tuple(transfers), "genesis", epoch_)], batch=False)

    @rule(data=st.data())
    def faucet(self, data: st.DataObject) -> None:
        self.post(data, *self.b_faucet(data))

    @precondition(lambda self: any(self.model.bal(self.acct(i)) > 0 for i in range(WALLETS)))
    @rule(data=st.data())
    def faucet_overflow(self, data: st.DataObject) -> None:
        """Mint so much that the wallet (or issuance) would leave int64: always refused."""
        i = data.draw(st.sampled_from([i for i in range(WALLETS) if self.model.bal(self.acct(i)) > 0]), label="wallet")
        have = self.model.bal(self.acct(i))
        amount = INT64_MAX - have + data.draw(st.integers(1, min(have, 1000)), label="over by")
        t = Transfer(ISSUANCE, self.acct(i), amount, Code.FAUCET, self.d_faucet)
        assert not self.post(data, [t], None)

    @rule(data=st.data())
    def bond(self, data: st.DataObject) -> None:
        self.post(data, *self.b_bond(data))

    @rule(data=st.data())
    def unbond(self, data: st.DataObject) -> None:
        self.post(data, *self.b_unbond(data))

    @rule(data=st.data())
    def withdraw(self, data: st.DataObject) -> None:
        self.post(data, *self.b_withdraw(data))

    @rule(k=st.integers(1, 3))
    def advance_epoch(self, k: int) -> None:
        self.epoch += k

    @rule(data=st.data())
    def escrow(self, data: st.DataObject) -> None:
        self.post(data, *self.b_escrow(data))

    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        self.post(data, *self.b_settle(data))

    @rule(data=st.data())
    def refund(self, data: st.DataObject) -> None:
        self.post(data, *self.b_refund(data))

    @rule(data=st.data())
    def slash(self, data: st.DataObject) -> None:
        self.post(data, *self.b_slash(data))

    @rule(data=st.data())
    def random_op(self, data: st.DataObject) -> None:
        self.post(data, *self.b_random(data))

    @rule(data=st.data())
    def job_lifecycle(self, data: st.DataObject) -> None:
        """One job from escrow to its end: escrow, some settlements, then a refund or a last settlement."""
        j = self.job(data, existing=False)
        if not self.post(data, *self.b_escrow(data, j)) and not self.rare(data, "go on anyway"):
            return
        for _ in range(data.draw(st.integers(0, 2), label="settlements")):
            self.post(data, *self.b_settle(data, j))
        end = self.b_refund if data.draw(st.booleans(), label="refund at the end") else self.b_settle
        self.post(data, *end(data, j))

    @rule(data=st.data())
    def stake_lifecycle(self, data: st.DataObject) -> None:
        """Bond; unbond in one or two epochs (two maturities); maybe slash part of the unbonding
        stake (newest first); let epochs pass (or not); withdraw."""
        i = self.wallet(data, having="available")
        self.post(data, *self.b_bond(data, i))
        self.post(data, *self.b_unbond(data, i))
        self.epoch += data.draw(st.integers(0, 3), label="epochs pass")
        if data.draw(st.booleans(), label="unbond again"):
            self.post(data, *self.b_unbond(data, i))
        if data.draw(st.booleans(), label="slash the unbonding stake"):
            src = self.acct(i, "unbonding")
            amount = self.amount(data, self.model.bal(src))
            if data.draw(st.booleans(), label="whistleblower"):
                t = Transfer(src, self.acct(self.other_wallet(data, i)), amount, Code.WHISTLEBLOWER, self.d_settle)
            else:
                t = Transfer(src, BURNED, amount, Code.SLASH, self.d_settle)
            self.post(data, [t], self.maybe_epoch(data))
        self.epoch += data.draw(st.integers(0, 3), label="epochs pass")
        self.post(data, *self.b_withdraw(data, i))

    @rule(data=st.data())
    def failing_tail(self, data: st.DataObject) -> None:
        """An operation whose first transfers are fine and whose last one is refused: nothing applies."""
        i = self.wallet(data)
        a = data.draw(st.integers(2, 10**6), label="a")
        fund = Transfer(ISSUANCE, self.acct(i), a, Code.FAUCET, self.d_faucet)
        how = data.draw(st.sampled_from(["overdraw", "partial refund", "unbond without epoch", "self whistleblower"]),
                        label="how")
        if how == "overdraw":
            over = self.model.bal(self.acct(i)) + a + 1
            tail = [Transfer(self.acct(i), self.acct(i, "bonded"), over, Code.BOND, self.d_reg)]
        elif how == "partial refund":
            esc = self.escrow_accts[self.job(data, existing=False)]
            tail = [Transfer(self.acct(i), esc, a, Code.ESCROW, self.d_order),
                    Transfer(esc, self.acct(i), a - 1, Code.REFUND, self.d_settle)]
        elif how == "unbond without epoch":
            tail = [Transfer(self.acct(i), self.acct(i, "bonded"), a, Code.BOND, self.d_reg),
                    Transfer(self.acct(i, "bonded"), self.acct(i, "unbonding"), a, Code.UNBOND, self.d_reg)]
        else:
            tail = [Transfer(self.acct(i), self.acct(i, "bonded"), a, Code.BOND, self.d_reg),
                    Transfer(self.acct(i, "bonded"), self.acct(i), a, Code.WHISTLEBLOWER, self.d_settle)]
        assert not self.post(data, [fund, *tail], None)

    @rule(data=st.data())
    def unknown_digest(self, data: st.DataObject) -> None:
        t = Transfer(ISSUANCE, self.acct(self.wallet(data)), 5, Code.FAUCET, self.unrecorded)
        assert not self.post(data, [t], None)

    @precondition(lambda self: bool(self.posted))
    @rule(data=st.data())
    def retry_same(self, data: st.DataObject) -> None:
        """Post a stored op id again with the same content: the same ids, nothing changes."""
        op = self.posted[data.draw(st.sampled_from(sorted(self.posted)), label="op id")]
        how = data.draw(st.sampled_from(["as is", "upper-case digests", "another epoch"]), label="how")
        if how == "upper-case digests":
            op = replace(op, transfers=tuple(replace(t, digest="0x" + t.digest[2:].upper()) for t in op.transfers))
        elif how == "another epoch":
            op = replace(op, epoch=self.epoch + 7)
        assert self.submit([op], batch=False)

    @precondition(lambda self: bool(self.posted))
    @rule(data=st.data())
    def retry_conflict(self, data: st.DataObject) -> None:
        """Post a stored op id again with other content: ConflictError, nothing changes."""
        op = self.posted[data.draw(st.sampled_from(sorted(self.posted)), label="op id")]
        assert not self.submit([self.conflicting(data, op)], batch=False)

    def conflicting(self, data: st.DataObject, op: Operation) -> Operation:
        how = data.draw(st.sampled_from(["memo", "amount", "extra transfer", "fewer transfers"]), label="change")
        ts = list(op.transfers)
        if how == "memo":
            return replace(op, memo=op.memo + "!")
        if how == "amount":
            t = ts[0]
            ts[0] = replace(t, amount=t.amount - 1 if t.amount > 1 else 2)
        elif how == "fewer transfers" and len(ts) > 1:
            ts.pop()
        else:
            ts.append(ts[-1])
        return replace(op, transfers=tuple(ts))

    @rule(data=st.data())
    def batch(self, data: st.DataObject) -> None:
        """2-4 operations in one post_batch: new ones, retries, repeats of an id within the batch."""
        ops: list[Operation] = []
        for _ in range(data.draw(st.integers(2, 4), label="ops")):
            kind = data.draw(st.sampled_from(["new", "new", "new", "retry", "repeat", "conflict"]), label="op kind")
            if kind == "retry" and self.posted:
                ops.append(self.posted[data.draw(st.sampled_from(sorted(self.posted)), label="op id")])
            elif kind == "repeat" and ops:
                ops.append(data.draw(st.sampled_from(ops), label="repeat of"))
            elif kind == "conflict" and (ops or self.posted):
                pool = ops + [self.posted[k] for k in sorted(self.posted)]
                ops.append(self.conflicting(data, data.draw(st.sampled_from(pool), label="conflict with")))
            else:
                builder = getattr(self, data.draw(st.sampled_from(self.BUILDERS), label="builder"))
                transfers, epoch = builder(data)
                ops.append(Operation(self.op_id(data), tuple(transfers), self.memo(data), epoch))
        self.submit(ops, batch=True)

    # -- invariants and the end of an example ------------------------------------------------

    @invariant()
    def balances_match(self) -> None:
        stored = self.ledger.balances()
        wrong = {a: (stored.get(a, 0), self.model.bal(a)) for a in self.universe if stored.get(a, 0) != self.model.bal(a)}
        assert not wrong, f"(ledger, model) balances differ: {wrong}"

    @invariant()
    def model_keeps_the_money_rules(self) -> None:
        m = self.model
        mine = [a for a in self.universe if a not in SYSTEM]
        minted = self.sys0[ISSUANCE] - m.bal(ISSUANCE)
        burned = m.bal(BURNED) - self.sys0[BURNED]
        # what this example minted is in its accounts, burned, or in the treasury
        assert sum(m.bal(a) for a in mine) + (m.bal(TREASURY) - self.sys0[TREASURY]) == minted - burned
        assert all(m.bal(a) >= 0 for a in mine + [BURNED, TREASURY])
        for a in mine:
            if kind_of(a) == "unbonding":
                assert sum(m.unbonding.get(a, {}).values()) == m.bal(a), a

    def teardown(self) -> None:
        problems = self.ledger.audit()
        assert problems == [], problems
        totals, m = self.ledger.totals(), self.model
        delta = {k: totals[k] - self.totals0[k] for k in ("minted", "burned", "slashed", "refunded", "treasury")}
        assert delta == {
            "minted": self.sys0[ISSUANCE] - m.bal(ISSUANCE),
            "burned": m.bal(BURNED) - self.sys0[BURNED],
            "slashed": m.slashed,
            "refunded": m.refunded,
            "treasury": m.bal(TREASURY) - self.sys0[TREASURY],
        }
        unbonding = [a for a in self.universe if a.endswith(":unbonding")]
        with Session(self.ledger.engine) as s:
            escrows = {r.account: MEscrow(r.source, r.amount, r.phase)
                       for r in s.exec(select(EscrowRow).where(EscrowRow.account.in_(self.escrow_accts)))}
            entries: dict[str, dict[int, int]] = {}
            for r in s.exec(select(UnbondingRow).where(UnbondingRow.account.in_(unbonding))):
                entries.setdefault(r.account, {})[r.mature_epoch] = r.amount
        assert escrows == m.escrows
        assert entries == {a: dict(e) for a, e in m.unbonding.items() if e}


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_ledger_agrees_with_an_independent_model(backend: str, tmp_path: Path) -> None:
    gen = make_url(backend, tmp_path)
    url = next(gen)
    ledgers: dict[int, Ledger] = {}
    try:
        for ub in UNBONDING_CHOICES:
            ledgers[ub] = Ledger(url, unbonding_epochs=ub)
        machine = type(f"LedgerMachine_{backend}", (LedgerMachine,), {"ledgers": ledgers, "counter": itertools.count(1)})
        started = time.perf_counter()
        run_state_machine_as_test(machine, settings=SETTINGS)
        print(f"{backend}: {time.perf_counter() - started:.1f} s")
        ledger = ledgers[UNBONDING_CHOICES[0]]
        assert ledger.audit() == []
        assert len(ledger.transfers()) > 100, "the run posted almost nothing: the machine is too timid"
    finally:
        for ledger in ledgers.values():
            ledger.close()
        gen.close()
