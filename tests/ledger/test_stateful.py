"""Stateful test of the SQL ledger against an independent in-memory model of the money and
authorization rules.

Hypothesis drives what the parties of a market do (the dev faucet, bonds, unbonds and
withdrawals, escrows, interval charges checked or not, slashes, refunds, epoch closes, the clock
moving on) and what an attacker or a buggy client does (an honest operation with one amount or
recipient changed, a message's transfers posted again under a new id, retries of an id with the
same and with other content, ``post_batch`` of several operations, one of which may fail) against
the real ``Ledger`` and against ``Model`` below: a second implementation of the rules written from
SPEC.md and docs/ledger.md, without ``gpucoin.ledger.state``, ``rules``, ``authorize`` or
``epochs``. Every transfer of an honest operation is built by ``gpucoin.ledger.plans`` from a
really signed message, as the coordinator builds it. After every step the outcome (the transfer
ids, or the exception class) and every balance must agree; at the end of each example the ledger's
audit must be clean and its escrow and unbonding rows, and the deltas of its totals, must equal
the model's.

One database per backend serves the whole run (a fresh one per example would cost a migration
each time), so every example uses its own wallets, job ids, op ids and nonces, starts in an epoch
of its own on the shared clock, and starts its model from the ledger's system balances.

Where the model sees several reasons to refuse (say a withdrawal both above the unbonding balance
and not matured), any of their exception classes is accepted.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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

from gpucoin.coordinator.settle import Coordinator
from gpucoin.exceptions import ConflictError, InsufficientFunds, LedgerError, RuleViolation, Unauthorized
from gpucoin.ledger import BURNED, ISSUANCE, TREASURY, Code, Ledger, Operation, Transfer, escrow_account, wallet_account
from gpucoin.ledger.models import EscrowRow, UnbondingRow
from gpucoin.ledger.plans import (
    charge_amounts,
    plan_bond,
    plan_escrow,
    plan_faucet,
    plan_interval,
    plan_mint,
    plan_refund,
    plan_slash,
    plan_unbond,
    plan_withdraw,
)
from gpucoin.policy.model import policy_hash
from gpucoin.policy.tokenomics import Reward
from gpucoin.wallet.messages import ZERO_BYTES32, SignedMessage
from tests.ledger.conftest import BACKENDS, make_url
from tests.ledger.helpers import COORDINATOR, DOMAIN, POLICY, Clock, Signer, open_market

SYSTEM = (ISSUANCE, BURNED, TREASURY)
WALLETS = 3
TOK = POLICY.tokenomics
BPS = 10_000

SETTINGS = settings(
    max_examples=20,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# -- the model ------------------------------------------------------------------------------


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


@dataclass
class Model:
    """What this example's operations did to the ledger, by the rules as documented."""

    balances: dict[str, int]
    last_id: int
    epoch_of: Callable[[], int]
    escrows: dict[str, MEscrow] = field(default_factory=dict)
    unbonding: dict[str, dict[int, int]] = field(default_factory=dict)  # account -> {maturity epoch: µGPC}
    ops: dict[str, tuple[Any, list[int]]] = field(default_factory=dict)  # op id -> (content, ids)
    used: set[str] = field(default_factory=set)  # digests that authorized an operation
    charges: dict[int, list[tuple[int, str, str | None, str]]] = field(
        default_factory=dict
    )  # epoch -> [(paid, worker, verifier, receipt)]
    closed: set[int] = field(default_factory=set)
    slashed: int = 0
    refunded: int = 0

    def bal(self, account: str) -> int:
        return self.balances.get(account, 0)

    def move(self, debit: str, credit: str, amount: int) -> None:
        if self.bal(debit) < amount and debit != ISSUANCE:
            raise Refused({InsufficientFunds: f"{debit} has {self.bal(debit)} < {amount}"})
        self.balances[debit] = self.bal(debit) - amount
        self.balances[credit] = self.bal(credit) + amount

    def matured(self, account: str) -> int:
        return sum(v for e, v in self.unbonding.get(account, {}).items() if e <= self.epoch_of())

    def take_unbonding(self, account: str, amount: int, *, oldest_first: bool) -> None:
        entries = self.unbonding[account]
        for e in sorted(entries, reverse=not oldest_first):
            part = min(amount, entries[e])
            entries[e] -= part
            amount -= part
            if not entries[e]:
                del entries[e]
        assert amount == 0


def content_of(op: Operation) -> Any:
    return (op.memo, tuple((t.debit, t.credit, t.amount, Code(t.code).value, t.digest.lower()) for t in op.transfers))


@dataclass
class Intent:
    """One operation a party wants posted: its transfers, the messages to record with it, and its
    effect on the model (``effect(model)`` raises Refused, changing nothing that counts, if the
    ledger must refuse it)."""

    transfers: list[Transfer]
    messages: list[SignedMessage]
    effect: Callable[[Model], None]
    memo: str = ""


def corrupted(intent: Intent, transfers: list[Transfer], why: str) -> Intent:
    def refuse(model: Model) -> None:
        raise Refused({Unauthorized: why})

    return Intent(transfers, intent.messages, refuse, intent.memo)


# -- the machine ----------------------------------------------------------------------------


def _key(*parts: object) -> Account:
    return Account.from_key(hashlib.sha256("gpucoin-stateful:".join(map(str, parts)).encode()).digest())


@dataclass
class Job:
    """A job of this example: one rank, held by wallet ``worker``; ``receipt`` its latest receipt."""

    order: SignedMessage
    worker: int
    next_step: int = 0
    receipt: SignedMessage | None = None
    assigned: bool = False


class LedgerMachine(RuleBasedStateMachine):
    """Set ``ledger`` (one market for the whole run), ``clock`` and ``counter`` on a subclass."""

    ledger: Ledger
    clock: Clock
    counter: Any = itertools.count(1)

    def __init__(self) -> None:
        super().__init__()
        self.n = n = next(type(self).counter)
        self.s = Signer(start=n * 10**6)
        self.wallets = [_key(n, i) for i in range(WALLETS)]
        self.verifier = _key(n, "verifier")
        self.coord = Coordinator(self.ledger, POLICY, COORDINATOR, DOMAIN)
        # an epoch of its own: earlier examples' epochs end, and are closed, first
        self.clock.t = float(self.ledger.epoch_end_s(self.ledger.current_epoch()))
        self.coord.close_epochs()
        regs = [self.s.registration(0, w, f"st{n}-node{i}") for i, w in enumerate(self.wallets)]
        self.ledger.record_messages(regs)
        self.jobs: dict[str, Job] = {}
        self.posted: dict[str, Operation] = {}
        self.op_counter = itertools.count()
        last = self.ledger.transfers(limit=1)
        self.sys0 = {a: self.ledger.balance(a) for a in SYSTEM}
        self.totals0 = self.ledger.totals()
        ledger = self.ledger
        self.model = Model(
            dict(self.sys0), last[-1].id if last else 0, lambda: ledger.current_epoch()
        )  # a function: deepcopy keeps it
        self.first_epoch = self.ledger.current_epoch()

    # -- helpers ----------------------------------------------------------------------------

    def acct(self, i: int, kind: str = "available") -> str:
        return wallet_account(self.wallets[i].address, kind)  # type: ignore[arg-type]

    @property
    def universe(self) -> list[str]:
        return [self.acct(i, k) for i in range(WALLETS) for k in ("available", "bonded", "unbonding")] + [
            wallet_account(self.verifier.address),
            *(escrow_account(j) for j in self.jobs),
            *SYSTEM,
        ]

    def wallet(self, data: st.DataObject, label: str = "wallet", *, having: str | None = None) -> int:
        """A wallet index; with ``having`` (an account kind), mostly one with money there."""
        if having is not None:
            rich = [i for i in range(WALLETS) if self.model.bal(self.acct(i, having)) > 0]
            if rich and not self.rare(data, f"{label} without {having}"):
                return data.draw(st.sampled_from(rich), label=label)
        return data.draw(st.integers(0, WALLETS - 1), label=label)

    @staticmethod
    def rare(data: st.DataObject, label: str) -> bool:
        return data.draw(st.integers(0, 7), label=label) == 7

    def amount(self, data: st.DataObject, have: int, label: str = "amount") -> int:
        """Mostly what ``have`` allows, sometimes all of it, sometimes one more."""
        how = data.draw(st.sampled_from(["some", "all", "some", "some", "more"]), label=f"{label} how")
        if how == "some" and have > 1:
            return data.draw(st.integers(1, have), label=label)
        if how in ("some", "all"):
            return max(have, 1)
        return have + 1

    def op_id(self) -> str:
        return f"st{self.n}-op{next(self.op_counter)}"

    def submit(self, ops: list[Operation], intents: dict[str, Intent], *, batch: bool) -> bool:
        """Post ``ops`` to the ledger and to the model; both must agree. True if accepted."""
        refused: Refused | None = None
        new = copy.deepcopy(self.model)
        want: list[list[int]] = []
        try:
            fresh: dict[str, Any] = {}
            for op in ops:
                prior = new.ops[op.op_id][0] if op.op_id in new.ops else fresh.get(op.op_id)
                if prior is not None and prior != content_of(op):
                    raise Refused({ConflictError: f"op {op.op_id!r} reused with other content"})
                fresh.setdefault(op.op_id, content_of(op))
            for op in ops:
                if op.op_id not in new.ops:
                    used = {t.digest.lower() for t in op.transfers} & new.used
                    if used:
                        raise Refused({Unauthorized: f"op {op.op_id!r} cites used {sorted(used)}"})
                    intents[op.op_id].effect(new)
                    new.used |= {t.digest.lower() for t in op.transfers}
                    ids = list(range(new.last_id + 1, new.last_id + 1 + len(op.transfers)))
                    new.last_id += len(op.transfers)
                    new.ops[op.op_id] = (content_of(op), ids)
                want.append(new.ops[op.op_id][1])
        except Refused as exc:
            refused = exc
        messages = [m for op in ops if op.op_id in intents for m in intents[op.op_id].messages]
        try:
            if batch:
                got = self.ledger.post_batch(ops, messages=messages)
            else:
                (op,) = ops
                if messages:
                    got = self.ledger.post_batch(ops, messages=messages)
                else:
                    got = [self.ledger.post(op.op_id, list(op.transfers), op.memo)]
        except LedgerError as exc:
            assert refused is not None, f"ledger refused ({type(exc).__name__}: {exc}); the model expected ids {want}"
            assert type(exc) in refused.allowed, (
                f"ledger raised {type(exc).__name__}: {exc}; the model expected "
                f"{sorted(c.__name__ for c in refused.allowed)} ({refused})"
            )
            return False
        assert refused is None, f"ledger accepted (ids {got}); the model refuses: {refused}"
        assert got == want, f"ledger returned ids {got}, the model predicts {want}"
        self.model = new
        for op in ops:
            self.posted.setdefault(op.op_id, op)
        return True

    def post(self, intent: Intent) -> bool:
        op = Operation(self.op_id(), tuple(intent.transfers), intent.memo)
        return self.submit([op], {op.op_id: intent}, batch=False)

    # -- intents: what the parties ask for, with their effect by the documented rules ---------

    def i_faucet(self, data: st.DataObject) -> Intent:
        i = data.draw(st.integers(0, WALLETS - 1), label="wallet")
        amount = data.draw(st.integers(1, 10**9), label="amount")
        m = self.s.faucet(self.wallets[i], amount)
        return Intent(
            plan_faucet(self.wallets[i].address, amount, m.digest),
            [m],
            lambda model: model.move(ISSUANCE, self.acct(i), amount),
            "faucet",
        )

    def i_bond(self, data: st.DataObject) -> Intent | None:
        i = self.wallet(data, having="available")
        stake = self.amount(data, self.model.bal(self.acct(i)), "stake")
        reg = self.s.registration(stake, self.wallets[i], f"st{self.n}-node{i}")
        return Intent(
            plan_bond(self.wallets[i].address, stake, reg.digest),
            [reg],
            lambda model: model.move(self.acct(i), self.acct(i, "bonded"), stake),
        )

    def i_unbond(self, data: st.DataObject) -> Intent:
        i = self.wallet(data, having="bonded")
        amount = self.amount(data, self.model.bal(self.acct(i, "bonded")))
        m = self.s(self.wallets[i], "Unbond", provider=self.wallets[i].address, amount=amount)

        def effect(model: Model) -> None:
            model.move(self.acct(i, "bonded"), self.acct(i, "unbonding"), amount)
            entries = model.unbonding.setdefault(self.acct(i, "unbonding"), {})
            mature = model.epoch_of() + POLICY.bonding.unbonding_epochs
            entries[mature] = entries.get(mature, 0) + amount

        return Intent(plan_unbond(self.wallets[i].address, amount, m.digest), [m], effect)

    def i_withdraw(self, data: st.DataObject) -> Intent:
        i = self.wallet(data, having="unbonding")
        src = self.acct(i, "unbonding")
        how = data.draw(st.sampled_from(["matured", "matured", "matured+1", "all"]), label="withdraw how")
        amount = {
            "matured": max(self.model.matured(src), 1),
            "matured+1": self.model.matured(src) + 1,
            "all": max(self.model.bal(src), 1),
        }[how]
        m = self.s(self.wallets[i], "Withdraw", provider=self.wallets[i].address, amount=amount)

        def effect(model: Model) -> None:
            why: dict[type, str] = {}
            if model.bal(src) < amount:
                why[InsufficientFunds] = f"{src} has {model.bal(src)} < {amount}"
            if model.matured(src) < amount:
                why[RuleViolation] = f"only {model.matured(src)} matured"
            if why:
                raise Refused(why)
            model.move(src, self.acct(i), amount)
            model.take_unbonding(src, amount, oldest_first=True)

        return Intent(plan_withdraw(self.wallets[i].address, amount, m.digest), [m], effect)

    def i_escrow(self, data: st.DataObject) -> Intent:
        i = self.wallet(data, "consumer", having="available")
        budget = self.amount(data, self.model.bal(self.acct(i)), "budget")
        job = f"st{self.n}-job{len(self.jobs)}-{next(self.op_counter)}"
        order = self.s.order(budget, job, self.wallets[i])
        worker = data.draw(st.integers(0, WALLETS - 1), label="worker")

        def effect(model: Model) -> None:
            model.move(self.acct(i), escrow_account(job), budget)
            model.escrows[escrow_account(job)] = MEscrow(self.acct(i), budget, "pending")
            self.pending_jobs[job] = Job(order, worker)

        return Intent(plan_escrow(job, self.wallets[i].address, budget, order.digest), [order], effect)

    def i_charge(self, data: st.DataObject) -> Intent | None:
        """The next interval of a job, checked or not, charged some, all or more than its escrow holds."""
        if not self.jobs:
            return None
        name = data.draw(st.sampled_from(sorted(self.jobs)), label="job")
        job = self.jobs[name]
        receipt = self.receipt(name)
        checked = data.draw(st.booleans(), label="checked")
        report = self.s.report(receipt, "pass", self.verifier) if checked else None
        if report is not None:
            self.ledger.record_message(report)
        esc = escrow_account(name)
        paid = max(1, self.amount(data, self.model.bal(esc), "paid"))
        st_ = self.s.settlement(
            (report or receipt).digest, self.ledger.current_epoch(), name, **charge_amounts(paid, TOK).fields()
        )
        worker = self.wallets[job.worker].address

        def effect(model: Model) -> None:
            left = model.bal(esc)
            if not 0 < paid <= left:
                raise Refused({Unauthorized: f"charges {paid} of an escrow holding {left}"})
            treasury = paid * TOK.treasury_share_bps // BPS
            model.move(esc, BURNED, paid - treasury)
            if treasury:
                model.move(esc, TREASURY, treasury)
            if model.bal(esc) == 0:
                model.escrows[esc] = replace(model.escrows[esc], phase="posted")
            verifier = self.verifier.address if report is not None else None
            model.charges.setdefault(model.epoch_of(), []).append((paid, worker, verifier, receipt.digest))

        return Intent(plan_interval(name, paid, TOK, st_.digest, [worker]), [st_], effect, "charge")

    def receipt(self, name: str, verdict: str | None = None) -> SignedMessage:
        """Record the next receipt of job ``name`` (assigning its rank first if needed)."""
        job = self.jobs[name]
        if not job.assigned:
            self.ledger.record_message(
                self.s.assignment(0, self.wallets[job.worker], name, f"st{self.n}-node{job.worker}")
            )
            job.assigned = True
        r = self.s.receipt(
            job.next_step, name, job.receipt.digest if job.receipt else ZERO_BYTES32, self.wallets[job.worker], 0, 4
        )
        self.ledger.record_message(r)
        job.receipt, job.next_step = r, job.next_step + 4
        return r

    def i_refund(self, data: st.DataObject) -> Intent | None:
        pending = [j for j in sorted(self.jobs) if self.model.bal(escrow_account(j)) > 0]
        if not pending:
            return None
        name = data.draw(st.sampled_from(pending), label="job")
        esc, left = escrow_account(name), self.model.bal(escrow_account(name))
        consumer = self.jobs[name].order.message["consumer"]
        st_ = self.s.settlement(self.jobs[name].order.digest, self.ledger.current_epoch(), name, refunded=left)

        def effect(model: Model) -> None:
            if model.bal(esc) != left:
                raise Refused({Unauthorized: f"refunds {left}, the escrow holds {model.bal(esc)}"})
            model.move(esc, wallet_account(consumer), left)
            model.escrows[esc] = replace(model.escrows[esc], phase="voided")
            model.refunded += left

        return Intent(plan_refund(name, consumer, left, st_.digest), [st_], effect, "refund")

    def i_slash(self, data: st.DataObject) -> Intent | None:
        """A failing report of a job's next receipt: half its worker's stake (bonded, then unbonding)."""
        cheats = [
            j
            for j in sorted(self.jobs)
            if self.model.bal(self.acct(self.jobs[j].worker, "bonded"))
            + self.model.bal(self.acct(self.jobs[j].worker, "unbonding"))
        ]
        if not cheats:
            return None
        name = data.draw(st.sampled_from(cheats), label="job")
        i = self.jobs[name].worker
        receipt = self.receipt(name)
        report = self.s.report(receipt, "fail", self.verifier)
        self.ledger.record_message(report)
        b, u = self.model.bal(self.acct(i, "bonded")), self.model.bal(self.acct(i, "unbonding"))
        taken = (b + u) * POLICY.slashing.fraud_slash_fraction_bps // BPS
        whistle = taken * POLICY.slashing.whistleblower_share_bps // BPS
        st_ = self.s.settlement(report.digest, self.ledger.current_epoch(), name, burned=taken - whistle, slashed=taken)

        def effect(model: Model) -> None:
            assert (model.bal(self.acct(i, "bonded")), model.bal(self.acct(i, "unbonding"))) == (b, u)
            left_burn, left_whistle = taken - whistle, whistle
            for src in (self.acct(i, "bonded"), self.acct(i, "unbonding")):
                for credit, need in ((BURNED, "burn"), (wallet_account(self.verifier.address), "whistle")):
                    part = min(left_burn if need == "burn" else left_whistle, model.bal(src))
                    if part:
                        model.move(src, credit, part)
                        if src.endswith(":unbonding"):
                            model.take_unbonding(src, part, oldest_first=False)
                        if need == "burn":
                            left_burn -= part
                        else:
                            left_whistle -= part
            assert left_burn == left_whistle == 0
            model.slashed += taken

        plan = plan_slash(self.wallets[i].address, self.verifier.address, b, u, taken - whistle, whistle, st_.digest)
        return Intent(plan, [st_], effect, "slash")

    def expected_rewards(self, model: Model, epoch: int) -> list[tuple[str, int, str]]:
        """(address, µGPC, code) the close of ``epoch`` mints: the epoch's emission, pro rata to the
        payments charged in it, 80 % to each interval's worker and 20 % to its verifier if checked."""
        emission = TOK.initial_emission_ugpc >> (epoch // TOK.emission_halving_epochs)
        intervals = model.charges[epoch]
        total = sum(p for p, *_ in intervals)
        out = []
        for paid, worker, verifier, _ in intervals:
            out.append((worker, emission * paid * TOK.worker_share_bps // (total * BPS), "mint_worker"))
            if verifier is not None:
                out.append((verifier, emission * paid * TOK.verifier_share_bps // (total * BPS), "mint_verifier"))
        return [r for r in out if r[1] > 0]

    def i_close(self, data: st.DataObject) -> Intent | None:
        """Close the earliest epoch of this example with charges, if the clock allows (else refused)."""
        open_ = [e for e in sorted(self.model.charges) if e not in self.model.closed]
        if not open_:
            return None
        epoch = open_[0]
        rewards = self.expected_rewards(self.model, epoch)
        paid = sum(p for p, *_ in self.model.charges[epoch])
        m = self.s(
            COORDINATOR,
            "EpochClose",
            coordinator=COORDINATOR.address,
            epoch=epoch,
            emission=TOK.initial_emission_ugpc,
            minted=sum(r[1] for r in rewards),
            payments=paid,
            policyHash=policy_hash(POLICY),
        )
        plan = plan_mint(
            [Reward(a, n, "worker" if c == "mint_worker" else "verifier", "0x" + "00" * 32) for a, n, c in rewards],
            m.digest,
        )

        def effect(model: Model) -> None:
            if epoch >= model.epoch_of():
                raise Refused({Unauthorized: f"epoch {epoch} has not ended"})
            for address, amount, _ in rewards:
                model.move(ISSUANCE, wallet_account(address), amount)
            model.closed.add(epoch)

        return Intent(plan, [m], effect, "close")

    INTENTS = ("i_faucet", "i_bond", "i_unbond", "i_withdraw", "i_escrow", "i_charge", "i_refund", "i_slash")

    def intent(self, data: st.DataObject, names: tuple[str, ...] = INTENTS) -> Intent | None:
        return getattr(self, data.draw(st.sampled_from(names), label="intent"))(data)

    # -- rules ------------------------------------------------------------------------------

    @initialize(funds=st.lists(st.integers(1000, 10**9), min_size=WALLETS, max_size=WALLETS))
    def start(self, funds: list[int]) -> None:
        """Fund the wallets from the dev faucet."""
        self.pending_jobs: dict[str, Job] = {}
        for i, amount in enumerate(funds):
            m = self.s.faucet(self.wallets[i], amount)
            assert self.post(
                Intent(
                    plan_faucet(self.wallets[i].address, amount, m.digest),
                    [m],
                    lambda model, i=i, amount=amount: model.move(ISSUANCE, self.acct(i), amount),
                )
            )

    def adopt_jobs(self) -> None:
        """Keep the jobs whose escrow the ledger took; forget the others (their orders were not stored)."""
        self.jobs.update({j: job for j, job in self.pending_jobs.items() if escrow_account(j) in self.model.escrows})
        self.pending_jobs.clear()

    @rule(data=st.data())
    def stake_lifecycle(self, data: st.DataObject) -> None:
        """Bond, unbond (maybe twice, epochs apart), let epochs pass, withdraw what matured."""
        for name in ("i_bond", "i_unbond"):
            self.post(getattr(self, name)(data))
        self.time_passes(data, data.draw(st.integers(0, POLICY.bonding.unbonding_epochs + 1), label="epochs"))
        if data.draw(st.booleans(), label="unbond again"):
            self.post(self.i_unbond(data))
        self.time_passes(data, data.draw(st.integers(0, POLICY.bonding.unbonding_epochs + 1), label="epochs"))
        self.post(self.i_withdraw(data))

    @rule(data=st.data())
    def job_lifecycle(self, data: st.DataObject) -> None:
        """One job: escrow, charges, maybe a slash of its worker, then a refund; its epoch closed."""
        self.post(self.i_escrow(data))
        self.adopt_jobs()
        for _ in range(data.draw(st.integers(1, 3), label="charges")):
            intent = self.i_charge(data)
            if intent is not None:
                self.post(intent)
        if data.draw(st.booleans(), label="slash"):
            intent = self.i_slash(data)
            if intent is not None:
                self.post(intent)
        intent = self.i_refund(data)
        if intent is not None:
            self.post(intent)
        self.time_passes(data, 1)
        self.close(data)

    @rule(data=st.data())
    def act(self, data: st.DataObject) -> None:
        """One party's operation, as the protocol has it."""
        intent = self.intent(data)
        if intent is not None:
            self.post(intent)
        self.adopt_jobs()

    @rule(data=st.data())
    def forge(self, data: st.DataObject) -> None:
        """An honest operation with one transfer's amount or recipient changed: Unauthorized."""
        intent = self.intent(data, ("i_faucet", "i_bond", "i_unbond", "i_escrow", "i_charge", "i_refund", "i_slash"))
        self.pending_jobs.clear()
        if intent is None or not intent.transfers:
            return
        k = data.draw(st.integers(0, len(intent.transfers) - 1), label="which")
        t = intent.transfers[k]
        if data.draw(st.booleans(), label="amount or recipient"):
            bad = replace(t, amount=t.amount + 1)
        else:
            other = (
                wallet_account(self.wallets[(WALLETS - 1)].address)
                if t.credit != self.acct(WALLETS - 1)
                else self.acct(0)
            )
            if t.credit.startswith("wallet:") and t.credit.endswith(":available"):
                bad = replace(t, credit=other)
            else:
                bad = replace(t, amount=t.amount + 1)
        transfers = [*intent.transfers[:k], bad, *intent.transfers[k + 1 :]]
        assert not self.post(corrupted(intent, transfers, "changed"))

    @precondition(lambda self: bool(self.posted))
    @rule(data=st.data())
    def reuse(self, data: st.DataObject) -> None:
        """A stored operation's transfers under a new id: its message already authorized one."""
        op = self.posted[data.draw(st.sampled_from(sorted(self.posted)), label="op id")]
        assert not self.post(Intent(list(op.transfers), [], lambda model: None))

    @rule(data=st.data(), epochs=st.integers(1, 3))
    def time_passes(self, data: st.DataObject, epochs: int) -> None:
        if epochs == 0:
            return
        self.clock.t = float(self.ledger.epoch_end_s(self.ledger.current_epoch() + epochs - 1))
        if data.draw(st.booleans(), label="a little more"):
            self.clock.advance(data.draw(st.integers(0, POLICY.tokenomics.epoch_length_s - 1), label="s"))

    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        intent = self.i_close(data)
        if intent is not None:
            self.post(intent)

    @precondition(lambda self: bool(self.posted))
    @rule(data=st.data())
    def retry_same(self, data: st.DataObject) -> None:
        """Post a stored op id again with the same content: the same ids, nothing changes."""
        op = self.posted[data.draw(st.sampled_from(sorted(self.posted)), label="op id")]
        if data.draw(st.booleans(), label="upper-case digests"):
            op = replace(op, transfers=tuple(replace(t, digest="0x" + t.digest[2:].upper()) for t in op.transfers))
        assert self.submit([op], {}, batch=False)

    @precondition(lambda self: bool(self.posted))
    @rule(data=st.data())
    def retry_conflict(self, data: st.DataObject) -> None:
        """Post a stored op id again with other content: ConflictError, nothing changes."""
        op = self.posted[data.draw(st.sampled_from(sorted(self.posted)), label="op id")]
        ts = list(op.transfers)
        how = data.draw(st.sampled_from(["memo", "amount", "extra transfer"]), label="change")
        if how == "memo":
            changed = replace(op, memo=op.memo + "!")
        elif how == "amount":
            changed = replace(op, transfers=(replace(ts[0], amount=ts[0].amount + 1), *ts[1:]))
        else:
            changed = replace(op, transfers=(*ts, ts[-1]))
        assert not self.submit([changed], {}, batch=False)

    @rule(data=st.data())
    def batch(self, data: st.DataObject) -> None:
        """2-4 operations in one post_batch, all or nothing: new ones, retries, a forged one."""
        ops: list[Operation] = []
        intents: dict[str, Intent] = {}
        for _ in range(data.draw(st.integers(2, 4), label="ops")):
            kind = data.draw(st.sampled_from(["new", "new", "new", "retry", "repeat", "forged"]), label="op kind")
            if kind == "retry" and self.posted:
                ops.append(self.posted[data.draw(st.sampled_from(sorted(self.posted)), label="op id")])
            elif kind == "repeat" and ops:
                ops.append(data.draw(st.sampled_from(ops), label="repeat of"))
            else:
                intent = self.intent(data, ("i_faucet", "i_bond", "i_unbond", "i_withdraw", "i_escrow"))
                if intent is None:
                    continue
                if kind == "forged":
                    t = intent.transfers[0]
                    intent = corrupted(intent, [replace(t, amount=t.amount + 1), *intent.transfers[1:]], "changed")
                op = Operation(self.op_id(), tuple(intent.transfers), intent.memo)
                intents[op.op_id] = intent
                ops.append(op)
        if ops:
            self.submit(ops, intents, batch=True)
        self.adopt_jobs()

    # -- invariants and the end of an example ------------------------------------------------

    @invariant()
    def balances_match(self) -> None:
        stored = self.ledger.balances()
        wrong = {
            a: (stored.get(a, 0), self.model.bal(a)) for a in self.universe if stored.get(a, 0) != self.model.bal(a)
        }
        assert not wrong, f"(ledger, model) balances differ: {wrong}"

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
        escrows = [escrow_account(j) for j in self.jobs]
        unbonding = [self.acct(i, "unbonding") for i in range(WALLETS)]
        with Session(self.ledger.engine) as s:
            stored = {
                r.account: MEscrow(r.source, r.amount, r.phase)
                for r in s.exec(select(EscrowRow).where(EscrowRow.account.in_(escrows)))
            }
            entries: dict[str, dict[int, int]] = {}
            for r in s.exec(select(UnbondingRow).where(UnbondingRow.account.in_(unbonding))):
                entries.setdefault(r.account, {})[r.mature_epoch] = r.amount
        assert stored == {a: e for a, e in m.escrows.items() if a in escrows}
        assert entries == {a: dict(e) for a, e in m.unbonding.items() if e}
        # the epochs this example closed minted exactly what the model says
        for e in sorted(m.closed):
            assert self.ledger.epoch_close(e) is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_ledger_agrees_with_an_independent_model(backend: str, tmp_path: Path) -> None:
    gen = make_url(backend, tmp_path)
    url = next(gen)
    clock = Clock()
    ledger = open_market(url, clock)
    try:
        machine = type(
            f"LedgerMachine_{backend}",
            (LedgerMachine,),
            {"ledger": ledger, "clock": clock, "counter": itertools.count(1)},
        )
        started = time.perf_counter()
        run_state_machine_as_test(machine, settings=SETTINGS)
        print(f"{backend}: {time.perf_counter() - started:.1f} s")
        assert ledger.audit() == []
        codes = {t.code for t in ledger.transfers()}
        assert len(ledger.transfers()) > 100, "the run posted almost nothing: the machine is too timid"
        assert {
            "faucet",
            "bond",
            "unbond",
            "withdraw",
            "escrow",
            "burn",
            "treasury",
            "refund",
            "slash",
            "whistleblower",
            "mint_worker",
            "mint_verifier",
        } <= codes, codes
    finally:
        ledger.close()
        gen.close()
