"""Keys, a controllable clock, a market on a ledger and plain-SQL access, shared by the ledger tests.

``Market`` drives a ledger the way the coordinator does: every transfer it posts is the
``gpucoin.ledger.plans`` list of a message signed by the party the protocol names, so tests say
what happens (fund, bond, escrow, assign, receipt, charge, close an epoch, slash, refund) and
forgeries are built by changing one thing of an honest operation.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

from eth_account import Account
from sqlalchemy import create_engine, text

from gpucoin.ledger import BURNED, ISSUANCE, TREASURY, Code, Ledger, Operation, Transfer, escrow_account, wallet_account
from gpucoin.ledger.epochs import plan_epoch
from gpucoin.ledger.models import APPEND_ONLY_TABLES
from gpucoin.ledger.plans import (
    SettlementAmounts,
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
    slash_split,
)
from gpucoin.money import MICRO_PER_GPC
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, Policy, load_policy, policy_hash
from gpucoin.spec import package_hash
from gpucoin.wallet.messages import ZERO_BYTES32, Domain, SignedMessage, sign

GPC = MICRO_PER_GPC
POLICY: Policy = load_policy(SHIPPED_POLICIES_DIR / "local.toml")
PACKAGE = package_hash(Path(__file__).resolve().parents[2] / "jobs" / "shakespeare_char")
"""The main job's package: vetted by the shipped policies, so its jobs' ranks can be slashed."""
UNVETTED = "0x" + "ab" * 32
"""A package no policy vets: a replay mismatch in its job slashes nobody."""
"""The local dev policy: 10 s epochs, unbonding after 7 of them."""
EPOCH_S = POLICY.tokenomics.epoch_length_s

FAUCET = Account.from_key(b"\x01" * 32)  # a key that is not the coordinator's
COORDINATOR = Account.from_key(b"\x02" * 32)
CONSUMER = Account.from_key(b"\x03" * 32)
WORKER = Account.from_key(b"\x04" * 32)
VERIFIER = Account.from_key(b"\x05" * 32)
WORKER2 = Account.from_key(b"\x06" * 32)
DOMAIN = Domain(chain_id=31337, verifying_contract=COORDINATOR.address)
JOB = "job-1"
ESCROW = escrow_account(JOB)

__all__ = [
    "PACKAGE",
    "UNVETTED",
    "BURNED",
    "ISSUANCE",
    "TREASURY",
    "Code",
    "Operation",
    "Transfer",
    "wallet_account",
]


class Clock:
    """A clock the test moves (unix seconds). It starts an hour in the past, so a ledger opened
    later with the real clock never sees a transfer stamped in its future."""

    def __init__(self, t: float | None = None) -> None:
        self.t = float(time.time() - 3600 if t is None else t)

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Signer:
    """Signs gpucoin messages with fresh nonces (shared by every key; unique per signer is enough)."""

    def __init__(self, start: int = 1) -> None:
        self._nonce = itertools.count(start)

    def __call__(self, account: Any, primary_type: str, **message: Any) -> SignedMessage:
        message.setdefault("nonce", next(self._nonce))
        return sign(account, primary_type, DOMAIN, message)

    def genesis(
        self,
        *,
        dev: bool = True,
        start: int,
        allocations: tuple[tuple[Any, int], ...] = (),
        policy: Policy = POLICY,
        signer: Any = COORDINATOR,
    ) -> SignedMessage:
        return sign(
            signer,
            "Genesis",
            DOMAIN,
            dict(
                coordinator=signer.address,
                admin=COORDINATOR.address,
                chainId=DOMAIN.chain_id,
                dev=dev,
                policyHash=policy_hash(policy),
                startTime=start,
                allocations=[{"recipient": a.address, "amount": n} for a, n in allocations],
            ),
        )

    def faucet(self, to: Any, amount: int, signer: Any = COORDINATOR) -> SignedMessage:
        return self(signer, "Faucet", recipient=to.address, amount=amount)

    def receipt(
        self, step: int, job: str = JOB, previous: str = ZERO_BYTES32, who: Any = WORKER, rank: int = 0, steps: int = 10
    ) -> SignedMessage:
        """``who``'s receipt for steps step..step+steps of ``rank``; ``previous`` is the rank's receipt before it."""
        return self(
            who,
            "WorkReceipt",
            jobId=job,
            worker=who.address,
            rank=rank,
            stepStart=step,
            stepEnd=step + steps,
            samples=320,
            computeTimeMs=5000,
            sketchRoot="0x" + "aa" * 32,
            checkpointHash="0x" + "bb" * 32,
            previousReceipt=previous,
        )

    def rewind(self, to_step: int, job: str = JOB, signer: Any = COORDINATOR) -> SignedMessage:
        """The coordinator's Rewind of ``job`` to ``to_step``."""
        return self(signer, "Rewind", coordinator=signer.address, jobId=job, toStep=to_step)

    def report(self, receipt: SignedMessage, verdict: str = "pass", verifier: Any = VERIFIER) -> SignedMessage:
        return self(
            verifier,
            "VerificationReport",
            verifier=verifier.address,
            receiptDigest=receipt.digest,
            verdict=verdict,
            distanceE9=0 if verdict == "pass" else 90_000_000,
        )

    def settlement(
        self,
        subject: str,
        epoch: int,
        job: str = JOB,
        signer: Any = COORDINATOR,
        policy: Policy = POLICY,
        **amounts: int,
    ) -> SignedMessage:
        return self(
            signer,
            "Settlement",
            coordinator=signer.address,
            jobId=job,
            subject=subject,
            epoch=epoch,
            policyHash=policy_hash(policy),
            **SettlementAmounts(**amounts).fields(),
        )

    def order(
        self, budget: int, job: str = JOB, consumer: Any = CONSUMER, workers: int = 1, package: str = PACKAGE
    ) -> SignedMessage:
        return self(
            consumer,
            "JobOrder",
            consumer=consumer.address,
            jobId=job,
            specHash="0x" + "dd" * 32,
            packageHash=package,
            workers=workers,
            bidPerWorkerHour=2 * GPC,
            budget=budget,
            deadline=2**40,
        )

    def registration(self, stake: int, who: Any = WORKER, node: str = "n1") -> SignedMessage:
        return self(
            who,
            "NodeRegistration",
            provider=who.address,
            nodeId=node,
            resources="cpu=2",
            askPerWorkerHour=GPC,
            stake=stake,
            deadline=2**40,
        )

    def assignment(
        self, rank: int = 0, who: Any = WORKER, job: str = JOB, node: str = "n1", start: int = 0
    ) -> SignedMessage:
        return self(COORDINATOR, "Assignment", jobId=job, rank=rank, provider=who.address, nodeId=node, fromStep=start)


def open_market(
    url: str,
    clock: Any = None,
    *,
    dev: bool = True,
    allocations: tuple[tuple[Any, int], ...] = (),
    policy: Policy = POLICY,
) -> Ledger:
    """A ledger at ``url`` with the market's Genesis recorded (the local policy, COORDINATOR's domain).

    The ledger runs on ``clock`` (a new ``Clock`` by default; ``time.time`` where other processes
    write to it on the real clock) and gets it as an attribute ``clock``.
    """
    clock = clock or Clock()
    ledger = Ledger(url, clock=clock)
    ledger.init_genesis(Signer().genesis(dev=dev, start=int(clock()), allocations=allocations, policy=policy), policy)
    ledger.clock = clock  # type: ignore[attr-defined]
    return ledger


def avail(acct: Any) -> str:
    return wallet_account(acct.address)


def bonded(acct: Any) -> str:
    return wallet_account(acct.address, "bonded")


def unbonding(acct: Any) -> str:
    return wallet_account(acct.address, "unbonding")


def record(ledger: Ledger, *msgs: SignedMessage) -> None:
    for m in msgs:
        ledger.record_message(m)


class Market:
    """A ledger driven as the coordinator drives it; each method posts one authorized operation."""

    def __init__(self, ledger: Ledger, s: Signer | None = None) -> None:
        self.ledger, self.s = ledger, s or Signer()
        self.policy = ledger.policy

    @property
    def clock(self) -> Clock:
        return self.ledger.clock  # type: ignore[attr-defined]

    def post(self, op_id: str, transfers: list[Transfer], *msgs: SignedMessage, memo: str = "") -> list[int]:
        return self.ledger.post_batch([Operation(op_id, tuple(transfers), memo)], messages=list(msgs))[0]

    def fund(self, acct: Any, amount: int, op_id: str | None = None) -> SignedMessage:
        m = self.s.faucet(acct, amount)
        self.post(op_id or f"faucet:{m.digest}", plan_faucet(acct.address, amount, m.digest), m)
        return m

    def register(self, who: Any = WORKER, stake: int = 0, node: str = "n1") -> SignedMessage:
        reg = self.s.registration(stake, who, node)
        if stake:
            self.post(f"bond:{reg.digest}", plan_bond(who.address, stake, reg.digest), reg)
        else:
            self.ledger.record_message(reg)
        return reg

    def escrow(
        self, budget: int, job: str = JOB, consumer: Any = CONSUMER, workers: int = 1, package: str = PACKAGE
    ) -> SignedMessage:
        order = self.s.order(budget, job, consumer, workers, package)
        self.post(f"escrow:{job}", plan_escrow(job, consumer.address, budget, order.digest), order)
        return order

    def assign(
        self, rank: int = 0, who: Any = WORKER, job: str = JOB, node: str = "n1", start: int = 0
    ) -> SignedMessage:
        m = self.s.assignment(rank, who, job, node, start)
        self.ledger.record_message(m)
        return m

    def receipts(
        self,
        step: int,
        workers: list[Any],
        job: str = JOB,
        previous: list[SignedMessage] | None = None,
        steps: int = 10,
    ) -> list[SignedMessage]:
        """One receipt per rank (rank i by ``workers[i]``) for steps step..step+steps, recorded."""
        rs = [
            self.s.receipt(step, job, previous[i].digest if previous else ZERO_BYTES32, who, i, steps)
            for i, who in enumerate(workers)
        ]
        self.ledger.record_messages(rs)
        return rs

    def rewind(self, to_step: int, job: str = JOB) -> SignedMessage:
        """Record the coordinator's Rewind of ``job`` to ``to_step``."""
        m = self.s.rewind(to_step, job)
        self.ledger.record_message(m)
        return m

    def reports(
        self, receipts: list[SignedMessage], verdict: str = "pass", verifier: Any = VERIFIER
    ) -> list[SignedMessage]:
        reps = [self.s.report(r, verdict, verifier) for r in receipts]
        self.ledger.record_messages(reps)
        return reps

    def charge(
        self, receipts: list[SignedMessage], paid: int, reports: list[SignedMessage] | None = None, job: str = JOB
    ) -> SignedMessage:
        """Charge an interval ``paid`` µGPC (checked when ``reports`` are given), in the current epoch."""
        subject = (reports[0] if reports else receipts[0]).digest
        st = self.s.settlement(
            subject,
            self.ledger.current_epoch(),
            job,
            policy=self.policy,
            **charge_amounts(paid, self.policy.tokenomics).fields(),
        )
        workers = [r.message["worker"] for r in receipts]
        self.post(f"settle:{st.digest}", plan_interval(job, paid, self.policy.tokenomics, st.digest, workers), st)
        return st

    def close(self, epoch: int) -> SignedMessage:
        """Close ``epoch`` (its end must have passed on the ledger's clock)."""
        supply = self.ledger.totals()["supply"]
        plan = plan_epoch(epoch, [c.interval for c in self.ledger.epoch_charges(epoch)], self.policy.tokenomics, supply)
        m = self.s(
            COORDINATOR,
            "EpochClose",
            coordinator=COORDINATOR.address,
            epoch=epoch,
            emission=plan.emission,
            minted=plan.minted,
            payments=plan.payments,
            policyHash=policy_hash(self.policy),
        )
        self.post(
            f"close:{m.digest}", plan_mint(plan.rewards, m.digest), m
        )  # not the coordinator's epoch:<e> id: the rule, not the id, refuses a second close
        return m

    def next_epoch(self) -> int:
        """Move the clock past the current epoch's end; returns the epoch that ended."""
        epoch = self.ledger.current_epoch()
        self.clock.t = float(self.ledger.epoch_end_s(epoch))
        return epoch

    def slash(self, report: SignedMessage, job: str = JOB) -> SignedMessage:
        cheater = self.ledger.message(report.message["receiptDigest"]).signer
        verifier = report.message["verifier"] if report.message["verifier"] != cheater else None
        return self._take_stake(report, cheater, verifier, job)

    def slash_verifier(self, report: SignedMessage, shown_by: SignedMessage, job: str = JOB) -> SignedMessage:
        """Slash the verifier of ``report``, which ``shown_by`` showed false (``verify.recheck``)."""
        return self._take_stake(report, report.message["verifier"], shown_by.message["verifier"], job)

    def _take_stake(self, subject: SignedMessage, cheater: str, whistleblower: str | None, job: str) -> SignedMessage:
        """A Settlement of ``subject`` slashing ``cheater``'s stake, the whistleblower share to ``whistleblower``."""
        b = self.ledger.balance(wallet_account(cheater, "bonded"))
        u = self.ledger.balance(wallet_account(cheater, "unbonding"))
        burned, whistle = slash_split(b + u, self.policy.slashing, whistleblower=whistleblower is not None)
        st = self.s.settlement(
            subject.digest,
            self.ledger.current_epoch(),
            job,
            policy=self.policy,
            burned=burned,
            slashed=burned + whistle,
        )
        self.post(f"slash:{st.digest}", plan_slash(cheater, whistleblower, b, u, burned, whistle, st.digest), st)
        return st

    def refund(self, order: SignedMessage, job: str = JOB) -> SignedMessage:
        left = self.ledger.balance(escrow_account(job))
        st = self.s.settlement(order.digest, self.ledger.current_epoch(), job, policy=self.policy, refunded=left)
        self.post(f"refund:{job}", plan_refund(job, order.message["consumer"], left, st.digest), st)
        return st

    def unbond(self, who: Any, amount: int) -> SignedMessage:
        m = self.s(who, "Unbond", provider=who.address, amount=amount)
        self.post(f"unbond:{m.digest}", plan_unbond(who.address, amount, m.digest), m)
        return m

    def withdraw(self, who: Any, amount: int) -> SignedMessage:
        m = self.s(who, "Withdraw", provider=who.address, amount=amount)
        self.post(f"withdraw:{m.digest}", plan_withdraw(who.address, amount, m.digest), m)
        return m


def fund(ledger: Ledger, s: Signer, acct: Any, amount: int, op_id: str) -> list[int]:
    """The dev faucet's ``amount`` µGPC to ``acct`` as operation ``op_id``; its transfer ids."""
    m = s.faucet(acct, amount)
    ledger.record_message(m)
    return ledger.post(op_id, [Transfer(ISSUANCE, avail(acct), amount, Code.FAUCET, m.digest)])


def normal_history(ledger: Ledger, s: Signer) -> dict[str, SignedMessage]:
    """Faucets, a bond, an escrow, a checked interval charged, its epoch closed (mint), a slash and a
    refund: 11 transfers in operations 'faucet-consumer', 'faucet-worker', 'bond-1', 'escrow-1',
    'settle-1', 'epoch-close', 'slash-1', 'refund-1'. Returns the messages by name."""
    m = Market(ledger, s)
    m.fund(CONSUMER, 1000 * GPC, "faucet-consumer")
    m.fund(WORKER, 600 * GPC, "faucet-worker")
    reg = s.registration(500 * GPC)
    order = s.order(200 * GPC)
    record(ledger, reg, order)
    ledger.post("bond-1", plan_bond(WORKER.address, 500 * GPC, reg.digest))
    ledger.post("escrow-1", plan_escrow(JOB, CONSUMER.address, 200 * GPC, order.digest))
    m.assign()
    (r1,) = m.receipts(0, [WORKER])
    (rep1,) = m.reports([r1])
    st1 = s.settlement(rep1.digest, ledger.current_epoch(), **charge_amounts(10 * GPC, POLICY.tokenomics).fields())
    record(ledger, st1)
    ledger.post("settle-1", plan_interval(JOB, 10 * GPC, POLICY.tokenomics, st1.digest), memo="interval 0-10")
    epoch = m.next_epoch()
    supply = ledger.totals()["supply"]
    plan = plan_epoch(epoch, [c.interval for c in ledger.epoch_charges(epoch)], POLICY.tokenomics, supply)
    close = s(
        COORDINATOR,
        "EpochClose",
        coordinator=COORDINATOR.address,
        epoch=epoch,
        emission=plan.emission,
        minted=plan.minted,
        payments=plan.payments,
        policyHash=policy_hash(POLICY),
    )
    record(ledger, close)
    ledger.post("epoch-close", plan_mint(plan.rewards, close.digest))
    (r2,) = m.receipts(10, [WORKER], previous=[r1])
    (rep2,) = m.reports([r2], "fail")
    burned, whistle = slash_split(500 * GPC, POLICY.slashing, whistleblower=True)
    st2 = s.settlement(rep2.digest, ledger.current_epoch(), burned=burned, slashed=burned + whistle)
    record(ledger, st2)
    ledger.post("slash-1", plan_slash(WORKER.address, VERIFIER.address, 500 * GPC, 0, burned, whistle, st2.digest))
    left = ledger.balance(ESCROW)
    st3 = s.settlement(order.digest, ledger.current_epoch(), refunded=left)
    record(ledger, st3)
    ledger.post("refund-1", plan_refund(JOB, CONSUMER.address, left, st3.digest))
    return dict(reg=reg, order=order, r1=r1, rep1=rep1, st1=st1, close=close, r2=r2, rep2=rep2, st2=st2, st3=st3)


def raw_sql(ledger: Ledger, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
    """Run plain SQL on the ledger's database behind its back (autocommit); rows if any."""
    engine = create_engine(ledger.engine.url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            result = conn.execute(text(sql), params or {})
            return list(result.all()) if result.returns_rows else []
    finally:
        engine.dispose()


def tamper(ledger: Ledger, sql: str, params: dict[str, Any] | None = None) -> None:
    """Run ``sql`` as someone with write access to the database would: append-only triggers off first."""
    if ledger.backend == "postgresql":
        stmts = [f"ALTER TABLE {t} DISABLE TRIGGER USER" for t in APPEND_ONLY_TABLES]
    else:
        stmts = [f"DROP TRIGGER IF EXISTS {t}_no_{verb}" for t in APPEND_ONLY_TABLES for verb in ("update", "delete")]
    for stmt in stmts:
        raw_sql(ledger, stmt)
    raw_sql(ledger, sql, params)


def rechain(ledger: Ledger) -> None:
    """What someone with write access does to hide an edit: recompute every transfer row's hash
    chain from row 1, the chain head, every operation's content hash and every stored balance
    from the transfer rows as they now are (run after ``tamper``, whose triggers stay dropped)."""
    from gpucoin.ledger.rules import GENESIS_HASH, chain_hash, operation_hash_of_fields

    rows = raw_sql(
        ledger, "SELECT id, op_id, seq, debit, credit, amount, code, digest, created_at FROM transfer ORDER BY id"
    )
    prev = GENESIS_HASH
    balances: dict[str, int] = {}
    by_op: dict[str, list[list[Any]]] = {}
    for r in rows:
        fields = dict(
            id=r[0], op_id=r[1], seq=r[2], debit=r[3], credit=r[4], amount=r[5], code=r[6], digest=r[7], created_at=r[8]
        )
        h = chain_hash(prev, **fields)
        raw_sql(
            ledger, "UPDATE transfer SET prev_hash = :p, row_hash = :h WHERE id = :i", {"p": prev, "h": h, "i": r[0]}
        )
        prev = h
        balances[r[3]] = balances.get(r[3], 0) - r[5]
        balances[r[4]] = balances.get(r[4], 0) + r[5]
        by_op.setdefault(r[1], []).append([r[2], r[3], r[4], r[5], r[6], r[7]])
    for op_id, fields in by_op.items():
        memo = raw_sql(ledger, "SELECT memo FROM operation WHERE op_id = :o", {"o": op_id})[0][0]
        content = operation_hash_of_fields([f[1:] for f in sorted(fields)], memo)
        raw_sql(ledger, "UPDATE operation SET content_hash = :c WHERE op_id = :o", {"c": content, "o": op_id})
    raw_sql(
        ledger,
        "UPDATE chain_head SET last_transfer_id = :i, last_hash = :h WHERE id = 1",
        {"i": rows[-1][0] if rows else 0, "h": prev},
    )
    raw_sql(ledger, "DELETE FROM account")
    for name, balance in balances.items():
        raw_sql(ledger, "INSERT INTO account (name, balance) VALUES (:n, :b)", {"n": name, "b": balance})


def forge_operation(
    ledger: Ledger, op_id: str, transfers: list[Transfer], *, created_at: int | None = None, epoch: int | None = None
) -> None:
    """Append operation ``op_id`` with ``transfers`` behind the ledger's back, as plain SQL with the
    append-only triggers dropped, the hash chain and the balances recomputed (``rechain``)."""
    last = raw_sql(ledger, "SELECT id, created_at FROM transfer ORDER BY id DESC LIMIT 1")
    first = (last[0][0] if last else 0) + 1
    at = created_at if created_at is not None else (last[0][1] + 1 if last else 1)
    g = ledger.genesis
    if epoch is None and g is not None:
        from gpucoin.ledger.epochs import epoch_at

        epoch = epoch_at(at, g.start_s, g.policy.tokenomics.epoch_length_s)
    tamper(
        ledger,
        "INSERT INTO operation (op_id, content_hash, memo, first_transfer_id, n_transfers, created_at, epoch, "
        "unbonding_epochs) VALUES (:o, '', '', :f, :n, :t, :e, :u)",
        {"o": op_id, "f": first, "n": len(transfers), "t": at, "e": epoch, "u": POLICY.bonding.unbonding_epochs},
    )
    for seq, t in enumerate(transfers):
        raw_sql(
            ledger,
            "INSERT INTO transfer (id, op_id, seq, debit, credit, amount, code, digest, created_at, prev_hash, "
            "row_hash) VALUES (:i, :o, :s, :d, :c, :a, :k, :g, :t, '', '')",
            {
                "i": first + seq,
                "o": op_id,
                "s": seq,
                "d": t.debit,
                "c": t.credit,
                "a": t.amount,
                "k": Code(t.code).value,
                "g": t.digest.lower(),
                "t": at,
            },
        )
    rechain(ledger)
