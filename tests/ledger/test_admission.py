"""Messages the ledger refuses on arrival (issue 4's list), each with its own error and no change.

Every test runs on SQLite and PostgreSQL against a ledger holding the market's Genesis (which binds
it to the market's domain) whose clock stands at ``NOW``. Messages are signed for real; the
malformed ones are built by hand with plain eth-account, as an attacker would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from gpucoin.exceptions import (
    AmountError,
    DomainMismatch,
    LedgerError,
    MessageExpired,
    NoGenesis,
    NonceReused,
    ReceiptOutOfOrder,
    SignatureError,
    UnknownParty,
)
from gpucoin.ledger import Ledger
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy
from gpucoin.wallet.messages import (
    EIP712_DOMAIN_TYPE,
    MESSAGE_TYPES,
    SECP256K1_N,
    ZERO_BYTES32,
    Domain,
    SignedMessage,
    sign,
)
from tests.ledger.helpers import (
    CONSUMER,
    COORDINATOR,
    DOMAIN,
    GPC,
    JOB,
    PACKAGE,
    POLICY,
    WORKER,
    Clock,
    Signer,
    open_market,
)

NOW = 1_700_000_000
"""The ledger's clock in these tests, unix seconds (in the past: a later real-clock audit sees nothing in its future)."""
POLICY_DIR = SHIPPED_POLICIES_DIR


@pytest.fixture
def market(ledger_url: str) -> Iterator[Ledger]:
    led = open_market(ledger_url, Clock(NOW))
    yield led
    led.close()


@pytest.fixture
def s() -> Signer:
    return Signer()


@pytest.fixture
def ready(market: Ledger, s: Signer) -> Ledger:
    """The market with JOB ordered, WORKER registered and assigned rank 0: its receipts may arrive."""
    market.record_messages([s.order(100 * GPC), s.registration(10 * GPC), s.assignment()])
    return market


def snapshot(ledger: Ledger) -> tuple[Any, ...]:
    return ([m.digest for m in ledger.messages()], ledger.balances(), [t.id for t in ledger.transfers()])


def refused(ledger: Ledger, message: SignedMessage, error: type[Exception], match: str) -> None:
    """Recording ``message`` raises ``error`` matching ``match`` and changes nothing."""
    before = snapshot(ledger)
    with pytest.raises(error, match=match):
        ledger.record_message(message)
    assert snapshot(ledger) == before


def with_signature(m: SignedMessage, signature: str) -> SignedMessage:
    return SignedMessage(m.primary_type, m.domain, m.message, m.digest, signature, m.signer)


def test_a_forged_signature_is_refused(ready: Ledger, s: Signer) -> None:
    r = s.receipt(0)
    sig = bytes.fromhex(r.signature[2:])
    forged = sig[:5] + bytes([sig[5] ^ 0x01]) + sig[6:]  # one bit of r flipped
    refused(ready, with_signature(r, "0x" + forged.hex()), SignatureError, "recovers to|no public key")


def test_a_signature_by_another_key_is_refused(ready: Ledger, s: Signer) -> None:
    r = s.receipt(0)
    # CONSUMER signs the receipt that names WORKER, and says so ...
    by_other = sign(CONSUMER, "WorkReceipt", DOMAIN, r.message)
    refused(
        ready, by_other, SignatureError, f"worker is {WORKER.address} but the message was signed by {CONSUMER.address}"
    )
    # ... or claims WORKER signed it
    refused(
        ready,
        SignedMessage(r.primary_type, r.domain, r.message, r.digest, by_other.signature, WORKER.address),
        SignatureError,
        f"recovers to {CONSUMER.address}, stored signer {WORKER.address}",
    )


def test_the_high_s_twin_of_a_valid_signature_is_refused(ready: Ledger, s: Signer) -> None:
    r = s.receipt(0)
    raw = bytes.fromhex(r.signature[2:])
    sig_r, sig_s, v = raw[:32], int.from_bytes(raw[32:64], "big"), raw[64]
    twin = sig_r + (SECP256K1_N - sig_s).to_bytes(32, "big") + bytes([55 - v])  # 27 <-> 28
    # the twin is a valid ECDSA signature of the same digest by the same key ...
    assert Account._recover_hash(bytes.fromhex(r.digest[2:]), signature=twin) == WORKER.address
    # ... which the ledger refuses, so one message never has two valid signatures
    refused(ready, with_signature(r, "0x" + twin.hex()), SignatureError, "high s")
    ready.record_message(r)  # the low-s original is fine


def test_a_replayed_nonce_is_refused(ready: Ledger, s: Signer) -> None:
    first = s.receipt(0)
    ready.record_message(first)
    ready.record_message(first)  # the same message again is a no-op, not a replay
    replay = s.receipt(10, previous=first.digest)
    replay = sign(WORKER, "WorkReceipt", DOMAIN, {**replay.message, "nonce": first.message["nonce"]})
    refused(ready, replay, NonceReused, f"{WORKER.address} already used nonce {first.message['nonce']}")


@pytest.mark.parametrize(
    "other",
    [
        Domain(chain_id=1, verifying_contract=COORDINATOR.address),
        Domain(chain_id=DOMAIN.chain_id, verifying_contract=CONSUMER.address),
        Domain(chain_id=DOMAIN.chain_id, verifying_contract=COORDINATOR.address, version="2"),
    ],
    ids=["chainId", "verifyingContract", "version"],
)
def test_a_message_for_another_market_is_refused(ready: Ledger, s: Signer, other: Domain) -> None:
    r = s.receipt(0)
    elsewhere = sign(WORKER, "WorkReceipt", other, r.message)
    refused(ready, elsewhere, DomainMismatch, "signed for another market")


def test_an_expired_deadline_is_refused(market: Ledger, s: Signer) -> None:
    late = s(
        CONSUMER,
        "JobOrder",
        consumer=CONSUMER.address,
        jobId=JOB,
        specHash="0x" + "dd" * 32,
        packageHash=PACKAGE,
        workers=1,
        bidPerWorkerHour=GPC,
        budget=GPC,
        deadline=NOW - 1,
    )
    refused(market, late, MessageExpired, "deadline .* passed 1 s ago")
    on_time = s(
        CONSUMER,
        "JobOrder",
        consumer=CONSUMER.address,
        jobId=JOB,
        specHash="0x" + "dd" * 32,
        packageHash=PACKAGE,
        workers=1,
        bidPerWorkerHour=GPC,
        budget=GPC,
        deadline=NOW,
    )
    market.record_message(on_time)
    reg = s(
        WORKER,
        "NodeRegistration",
        provider=WORKER.address,
        nodeId="n1",
        resources="cpu=2",
        askPerWorkerHour=GPC,
        stake=GPC,
        deadline=NOW - 3600,
    )
    refused(market, reg, MessageExpired, "passed 3600 s ago")


def test_overlapping_gapped_and_unchained_receipts_are_refused(ready: Ledger, s: Signer) -> None:
    refused(ready, s.receipt(10), ReceiptOutOfOrder, "leaves a gap after .* the next must start at step 0")
    r0 = s.receipt(0)
    ready.record_message(r0)
    overlap = s(
        WORKER,
        "WorkReceipt",
        **{**r0.message, "stepStart": 5, "stepEnd": 15, "previousReceipt": r0.digest, "nonce": 999},
    )
    refused(ready, overlap, ReceiptOutOfOrder, r"steps 5-15 overlaps .* \(steps 0-10\)")
    refused(ready, s.receipt(20, previous=r0.digest), ReceiptOutOfOrder, "leaves a gap .* must start at step 10")
    refused(ready, s.receipt(10), ReceiptOutOfOrder, f"previousReceipt {ZERO_BYTES32} is not .* {r0.digest}")
    ready.record_message(s.receipt(10, previous=r0.digest))
    assert [r.primary_type for r in ready.messages()].count("WorkReceipt") == 2


def test_receipts_in_one_batch_are_admitted_in_order(ready: Ledger, s: Signer) -> None:
    r0 = s.receipt(0)
    r1 = s.receipt(10, previous=r0.digest)
    with pytest.raises(ReceiptOutOfOrder):
        ready.record_messages([r1, r0])
    assert ready.messages("WorkReceipt") == []
    assert ready.record_messages([r0, r1]) == 2


def test_a_receipt_for_an_unknown_job_or_an_unassigned_node_is_refused(market: Ledger, s: Signer) -> None:
    refused(market, s.receipt(0), UnknownParty, f"no JobOrder for job {JOB!r}")
    market.record_message(s.order(GPC))
    refused(market, s.receipt(0), UnknownParty, f"job {JOB!r} rank 0 has no recorded Assignment")
    refused(market, s.assignment(), UnknownParty, f"provider {WORKER.address} has no recorded NodeRegistration")
    refused(market, s.receipt(0, job="job-2"), UnknownParty, "no JobOrder for job 'job-2'")
    market.record_messages([s.registration(GPC), s.registration(GPC, CONSUMER, "n2"), s.assignment()])
    refused(
        market, s.receipt(0, who=CONSUMER), UnknownParty, f"assigned to {WORKER.address}"
    )  # registered, not assigned
    refused(market, s.assignment(rank=1), UnknownParty, "rank 1 of job 'job-1', which has 1 ranks")
    market.record_message(s.receipt(0))


def test_nothing_is_recorded_or_posted_before_the_genesis_and_no_second_genesis(ledger_url: str, s: Signer) -> None:
    with Ledger(ledger_url, clock=lambda: NOW) as bare:
        with pytest.raises(NoGenesis, match="no Genesis yet"):
            bare.record_message(s.faucet(CONSUMER, 1))
        with pytest.raises(NoGenesis, match="Ledger.init_genesis"):
            bare.record_message(s.genesis(start=NOW))
        assert bare.messages() == [] and bare.genesis is None
        with pytest.raises(LedgerError, match="hashes to"):  # the policy given must be the one the Genesis names
            bare.init_genesis(s.genesis(start=NOW), load_policy(POLICY_DIR / "default.toml"))
        genesis = s.genesis(start=NOW)
        bare.init_genesis(genesis, POLICY)
        bare.init_genesis(genesis, POLICY)  # again: a no-op
        with pytest.raises(NoGenesis, match="already has the Genesis"):
            bare.init_genesis(s.genesis(start=NOW - 1), POLICY)
        assert [m.primary_type for m in bare.messages()] == ["Genesis"]
        assert bare.genesis.start_s == NOW and bare.policy == POLICY and bare.current_epoch() == 0
        assert bare.audit() == []


def test_an_amount_above_int64_is_refused(market: Ledger) -> None:
    # eth-account happily signs a uint64 of 2**63; gpucoin's ledger stores BIGINT and refuses it.
    message = dict(
        consumer=CONSUMER.address,
        jobId=JOB,
        specHash="0x" + "dd" * 32,
        packageHash=PACKAGE,
        workers=1,
        bidPerWorkerHour=GPC,
        budget=2**63,
        nonce=1,
        deadline=NOW + 60,
    )
    typed = {
        "types": {"EIP712Domain": [dict(f) for f in EIP712_DOMAIN_TYPE], "JobOrder": MESSAGE_TYPES["JobOrder"]},
        "primaryType": "JobOrder",
        "domain": DOMAIN.as_dict(),
        "message": message,
    }
    signed = Account.sign_message(encode_typed_data(full_message=typed), CONSUMER.key)
    m = SignedMessage(
        "JobOrder",
        DOMAIN.as_dict(),
        message,
        "0x" + signed.message_hash.hex(),
        "0x" + signed.signature.hex(),
        CONSUMER.address,
    )
    refused(market, m, AmountError, r"budget = 9223372036854775808 µGPC is outside \[0, 9223372036854775807\]")


def test_a_ledger_stays_bound_to_its_market(market: Ledger, ledger_url: str) -> None:
    with Ledger(ledger_url) as same:  # no domain given: the bound one applies
        with pytest.raises(DomainMismatch):
            same.record_message(
                sign(
                    CONSUMER,
                    "Faucet",
                    Domain(1, COORDINATOR.address),
                    {"recipient": CONSUMER.address, "amount": 1, "nonce": 1},
                )
            )
    with pytest.raises(LedgerError, match="belongs to the market with EIP-712 domain"):
        Ledger(ledger_url, domain=Domain(chain_id=5, verifying_contract=COORDINATOR.address))


def test_only_the_markets_coordinator_signs_settlements_and_faucets(ready: Ledger, s: Signer) -> None:
    r = s.receipt(0)
    ready.record_message(r)
    forged = s(
        WORKER,
        "Settlement",
        coordinator=WORKER.address,
        jobId=JOB,
        subject=r.digest,
        epoch=1,
        paid=0,
        burned=0,
        treasury=0,
        minted=10**12,
        slashed=0,
        refunded=0,
        policyHash="0x" + "cc" * 32,
    )
    refused(ready, forged, UnknownParty, f"signed by {WORKER.address}, not by this market's coordinator")
    refused(
        ready,
        s(WORKER, "Faucet", recipient=WORKER.address, amount=10**12),
        UnknownParty,
        "not by this market's coordinator",
    )
    ready.record_message(
        s.settlement(r.digest, epoch=0, paid=5)
    )  # signed by COORDINATOR, the domain's verifyingContract


def test_a_foreign_message_is_a_domain_error_even_if_it_also_reuses_a_nonce(ready: Ledger, s: Signer) -> None:
    first = s.receipt(0)
    ready.record_message(first)
    elsewhere = sign(WORKER, "WorkReceipt", Domain(1, COORDINATOR.address), first.message)  # same nonce
    refused(ready, elsewhere, DomainMismatch, "signed for another market")


def test_a_genesis_recorded_by_another_process_is_enforced_at_once(ledger_url: str, s: Signer) -> None:
    foreign = sign(
        COORDINATOR, "Faucet", Domain(1, COORDINATOR.address), {"recipient": CONSUMER.address, "amount": 1, "nonce": 1}
    )
    with Ledger(ledger_url, clock=lambda: NOW) as early:  # opened while the ledger has no Genesis
        with pytest.raises(NoGenesis):
            early.record_message(s.faucet(CONSUMER, 1))
        with open_market(ledger_url, Clock(NOW)):  # another process records the Genesis
            pass
        refused(early, foreign, DomainMismatch, "signed for another market")
        early.record_message(s.registration(0))
        assert early.audit() == []
