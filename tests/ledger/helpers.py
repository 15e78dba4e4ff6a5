"""Keys, a message signer and plain-SQL access shared by the ledger tests."""

from __future__ import annotations

import itertools
from typing import Any

from eth_account import Account
from sqlalchemy import create_engine, text

from gpucoin.ledger import BURNED, ISSUANCE, TREASURY, Code, Ledger, Transfer, escrow_account, wallet_account
from gpucoin.ledger.models import APPEND_ONLY_TABLES
from gpucoin.money import MICRO_PER_GPC
from gpucoin.wallet.messages import ZERO_BYTES32, Domain, SignedMessage, sign

GPC = MICRO_PER_GPC

FAUCET = Account.from_key(b"\x01" * 32)
COORDINATOR = Account.from_key(b"\x02" * 32)
CONSUMER = Account.from_key(b"\x03" * 32)
WORKER = Account.from_key(b"\x04" * 32)
VERIFIER = Account.from_key(b"\x05" * 32)
DOMAIN = Domain(chain_id=31337, verifying_contract=COORDINATOR.address)
JOB = "job-1"
ESCROW = escrow_account(JOB)


class Signer:
    """Signs gpucoin messages with fresh nonces (shared by every key; unique per signer is enough)."""

    def __init__(self, start: int = 1) -> None:
        self._nonce = itertools.count(start)

    def __call__(self, account: Any, primary_type: str, **message: Any) -> SignedMessage:
        message.setdefault("nonce", next(self._nonce))
        return sign(account, primary_type, DOMAIN, message)

    def faucet(self, to: Any, amount: int) -> SignedMessage:
        return self(FAUCET, "Faucet", recipient=to.address, amount=amount)

    def receipt(self, step: int, job: str = JOB, previous: str = ZERO_BYTES32) -> SignedMessage:
        """WORKER's receipt for steps step..step+10 of rank 0; ``previous`` is the rank's receipt before it."""
        return self(
            WORKER, "WorkReceipt", jobId=job, worker=WORKER.address, rank=0, stepStart=step, stepEnd=step + 10,
            samples=320, computeTimeMs=5000, sketchRoot="0x" + "aa" * 32, checkpointHash="0x" + "bb" * 32,
            previousReceipt=previous,
        )

    def settlement(self, subject: str, job: str = JOB, **amounts: int) -> SignedMessage:
        fields = dict(paid=0, burned=0, treasury=0, minted=0, slashed=0, refunded=0) | amounts
        return self(
            COORDINATOR, "Settlement", coordinator=COORDINATOR.address, jobId=job, subject=subject, epoch=1,
            policyHash="0x" + "cc" * 32, **fields,
        )

    def order(self, budget: int, job: str = JOB, consumer: Any = CONSUMER) -> SignedMessage:
        return self(consumer, "JobOrder", consumer=consumer.address, jobId=job, specHash="0x" + "dd" * 32, workers=1,
                    bidPerWorkerHour=2 * GPC, budget=budget, deadline=2**40)

    def registration(self, stake: int, who: Any = WORKER) -> SignedMessage:
        return self(who, "NodeRegistration", provider=who.address, nodeId="n1", resources="cpu=2",
                    askPerWorkerHour=GPC, stake=stake, deadline=2**40)


def avail(acct: Any) -> str:
    return wallet_account(acct.address)


def bonded(acct: Any) -> str:
    return wallet_account(acct.address, "bonded")


def unbonding(acct: Any) -> str:
    return wallet_account(acct.address, "unbonding")


def record(ledger: Ledger, *msgs: SignedMessage) -> None:
    for m in msgs:
        ledger.record_message(m)


def fund(ledger: Ledger, s: Signer, acct: Any, amount: int, op_id: str) -> list[int]:
    m = s.faucet(acct, amount)
    ledger.record_message(m)
    return ledger.post(op_id, [Transfer(ISSUANCE, avail(acct), amount, Code.FAUCET, m.digest)])


def normal_history(ledger: Ledger, s: Signer) -> None:
    """Faucet, bond, escrow, a settled interval with mint, a slash, a refund (11 transfers)."""
    fund(ledger, s, CONSUMER, 1000 * GPC, "faucet-consumer")
    fund(ledger, s, WORKER, 600 * GPC, "faucet-worker")
    reg = s.registration(500 * GPC)
    order = s.order(200 * GPC)
    record(ledger, reg, order)
    ledger.post("bond-1", [Transfer(avail(WORKER), bonded(WORKER), 500 * GPC, Code.BOND, reg.digest)])
    ledger.post("escrow-1", [Transfer(avail(CONSUMER), ESCROW, 200 * GPC, Code.ESCROW, order.digest)])

    r1 = s.receipt(0)
    st1 = s.settlement(r1.digest, paid=10 * GPC, burned=9 * GPC, treasury=GPC, minted=5 * GPC)
    record(ledger, r1, st1)
    ledger.post(
        "settle-1",
        [
            Transfer(ESCROW, BURNED, 9 * GPC, Code.BURN, st1.digest),
            Transfer(ESCROW, TREASURY, GPC, Code.TREASURY, st1.digest),
            Transfer(ISSUANCE, avail(WORKER), 4 * GPC, Code.MINT_WORKER, st1.digest),
            Transfer(ISSUANCE, avail(VERIFIER), GPC, Code.MINT_VERIFIER, st1.digest),
        ],
        memo="interval 0-10",
    )
    r2 = s.receipt(10, previous=r1.digest)
    report = s(VERIFIER, "VerificationReport", verifier=VERIFIER.address, receiptDigest=r2.digest, verdict="fail",
               distanceE9=90_000_000)
    st2 = s.settlement(r2.digest, slashed=50 * GPC)
    record(ledger, r2, report, st2)
    ledger.post(
        "slash-1",
        [
            Transfer(bonded(WORKER), BURNED, 40 * GPC, Code.SLASH, st2.digest),
            Transfer(bonded(WORKER), avail(VERIFIER), 10 * GPC, Code.WHISTLEBLOWER, st2.digest),
        ],
    )
    st3 = s.settlement(order.digest, refunded=190 * GPC)
    record(ledger, st3)
    ledger.post("refund-1", [Transfer(ESCROW, avail(CONSUMER), 190 * GPC, Code.REFUND, st3.digest)])


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
