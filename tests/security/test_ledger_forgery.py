"""Forgeries against the ledger by one party with only what that party holds (issue: the ledger binds
every transfer to the signed message that allows it).

Each attack is tried twice, on SQLite and on PostgreSQL: through ``Ledger.post`` / ``post_batch``,
where it must be refused with nothing changed; and written with plain SQL by someone with write
access to the database (append-only triggers dropped, hash chain, content hashes and balances
recomputed: ``helpers.forge_operation`` / ``rechain``), where ``gpucoin ledger audit`` must name the
forged rows. Then, per transfer code, the right message is admitted and a message of the wrong
type, of the wrong signer, and the wrong amount or recipient are each refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner
from eth_account import Account

from gpucoin.cli.main import cli
from gpucoin.exceptions import RuleViolation, SignatureError, StaleEpoch, Unauthorized, UnknownParty
from gpucoin.ledger import BURNED, ISSUANCE, TREASURY, Code, Ledger, Operation, Transfer
from gpucoin.ledger.accounts import escrow_account
from gpucoin.ledger.plans import (
    charge_amounts,
    plan_bond,
    plan_escrow,
    plan_faucet,
    plan_interval,
    plan_refund,
    plan_slash,
    plan_unbond,
    plan_withdraw,
    slash_split,
)
from gpucoin.policy.model import policy_hash
from tests.ledger.helpers import (
    CONSUMER,
    COORDINATOR,
    DOMAIN,
    ESCROW,
    GPC,
    JOB,
    POLICY,
    VERIFIER,
    WORKER,
    WORKER2,
    Clock,
    Market,
    Signer,
    avail,
    bonded,
    forge_operation,
    open_market,
    rechain,
    tamper,
    unbonding,
)

ATTACKER = Account.from_key(b"\x66" * 32)


def snapshot(ledger: Ledger) -> tuple[Any, ...]:
    return ([m.digest for m in ledger.messages()], ledger.balances(), [t.row_hash for t in ledger.transfers()])


def refused(ledger: Ledger, error: type[Exception], match: str, ops: list[Operation], *messages: Any) -> None:
    """``post_batch(ops, messages=...)`` raises ``error`` matching ``match`` and changes nothing."""
    before = snapshot(ledger)
    with pytest.raises(error, match=match):
        ledger.post_batch(ops, messages=list(messages))
    assert snapshot(ledger) == before
    assert ledger.audit() == []


def audit_names(ledger: Ledger, op_id: str, *more: str) -> list[str]:
    """``gpucoin ledger audit`` fails, and a problem names operation ``op_id`` as not authorized."""
    r = CliRunner().invoke(cli, ["ledger", "audit", "--ledger-url", ledger.url], catch_exceptions=False)
    assert r.exit_code == 1, r.output
    problems = [line[len("problem: ") :] for line in r.output.splitlines() if line.startswith("problem: ")]
    named = [p for p in problems if p.startswith(f"operation {op_id!r}") and "not authorized" in p]
    assert named, problems
    for text in more:
        assert any(text in p for p in named), (text, named)
    return problems


def op(op_id: str, *transfers: Transfer) -> Operation:
    return Operation(op_id, transfers)


@pytest.fixture
def market(ledger: Ledger) -> Market:
    """A dev market: the consumer has 1,000 GPC, the worker 600 GPC of which 500 bonded on node n1,
    the attacker is a registered volunteer with 100 GPC bonded (all it legitimately holds)."""
    m = Market(ledger)
    m.fund(CONSUMER, 1000 * GPC)
    m.fund(WORKER, 600 * GPC)
    m.register(WORKER, 500 * GPC)
    m.fund(ATTACKER, 100 * GPC)
    m.attacker_reg = m.register(ATTACKER, 100 * GPC, node="evil")  # type: ignore[attr-defined]
    return m


# -- the forgeries the attack review found ----------------------------------------------------


def test_a_faucet_citing_the_attackers_own_registration(market: Market) -> None:
    reg = market.attacker_reg.digest  # type: ignore[attr-defined]
    forged = Transfer(ISSUANCE, avail(ATTACKER), 10**12, Code.FAUCET, reg)
    refused(market.ledger, Unauthorized, "cites a NodeRegistration, which authorizes bond", [op("mint-me", forged)])
    forge_operation(market.ledger, "mint-me", [forged])
    audit_names(market.ledger, "mint-me", "cites a NodeRegistration")


def test_an_escrow_out_of_a_victims_wallet_and_a_pay_to_the_attacker(market: Market) -> None:
    reg = market.attacker_reg.digest  # type: ignore[attr-defined]
    steal = Transfer(avail(CONSUMER), escrow_account("heist"), 500 * GPC, Code.ESCROW, reg)
    refused(market.ledger, Unauthorized, "cites a NodeRegistration", [op("heist", steal)])
    # with a JobOrder the attacker signed itself for the victim's money: the order moves only its own
    order = market.s.order(500 * GPC, "heist", consumer=ATTACKER)
    steal = Transfer(avail(CONSUMER), escrow_account("heist"), 500 * GPC, Code.ESCROW, order.digest)
    refused(market.ledger, Unauthorized, "missing .*not authorized", [op("heist", steal)], order)
    # ... nor can it sign an order naming the victim as consumer
    victim_order = market.s(ATTACKER, "JobOrder", **{**order.message, "consumer": CONSUMER.address, "nonce": 10**6})
    refused(market.ledger, SignatureError, "consumer is .* but the message was signed by", [], victim_order)
    # and a PAY out of a real job's escrow to itself
    real = market.escrow(200 * GPC)
    pay = Transfer(ESCROW, avail(ATTACKER), 200 * GPC, Code.PAY, reg)
    refused(market.ledger, Unauthorized, "cites a NodeRegistration, which authorizes bond", [op("pay-me", pay)])
    pay = Transfer(ESCROW, avail(ATTACKER), 200 * GPC, Code.PAY, real.digest)
    refused(market.ledger, Unauthorized, "cites a JobOrder, which authorizes escrow", [op("pay-me", pay)])
    forge_operation(
        market.ledger, "heist", [Transfer(avail(CONSUMER), escrow_account("heist"), 500 * GPC, Code.ESCROW, reg)]
    )
    forge_operation(market.ledger, "pay-me", [pay])
    audit_names(market.ledger, "heist", "cites a NodeRegistration")
    audit_names(market.ledger, "pay-me", "cites a JobOrder")


def _checked_interval(m: Market, paid: int = 10 * GPC) -> tuple[Any, Any, Any]:
    """Job JOB (1 rank, WORKER) with one checked interval charged ``paid``: (order, receipt, report)."""
    order = m.escrow(200 * GPC)
    m.assign()
    (r,) = m.receipts(0, [WORKER])
    (rep,) = m.reports([r])
    m.charge([r], paid, [rep])
    return order, r, rep


def test_mint_amounts_and_recipients_are_the_epochs_emission_and_nothing_else(market: Market) -> None:
    _, r, _ = _checked_interval(market)
    epoch = market.next_epoch()
    honest = market.close(epoch)  # posts the honest close; now try other mints against it and others
    ledger = market.ledger
    minted = ledger.epoch_rewards(epoch)
    worker_reward = next(x.amount_ugpc for x in minted if x.role == "worker")
    # the same EpochClose again, or a second one for the epoch
    again = Transfer(ISSUANCE, avail(WORKER), worker_reward, Code.MINT_WORKER, honest.digest)
    refused(ledger, Unauthorized, "already authorized an operation", [op("again", again)])
    second = market.s(COORDINATOR, "EpochClose", **{**honest.message, "nonce": 10**6})
    refused(
        ledger,
        Unauthorized,
        "already closed",
        [op("again", Transfer(ISSUANCE, avail(WORKER), worker_reward, Code.MINT_WORKER, second.digest))],
        second,
    )
    # a mint citing a Settlement (what used to authorize one)
    st = ledger.messages("Settlement")[-1].digest
    refused(
        ledger,
        Unauthorized,
        "cites a Settlement, which authorizes",
        [op("m", Transfer(ISSUANCE, avail(ATTACKER), 5, Code.MINT_WORKER, st))],
    )
    # rewritten with plain SQL: the worker's reward moved to the attacker, the amount doubled
    mint = next(t for t in ledger.transfers() if t.code == "mint_worker")
    tamper(
        ledger,
        "UPDATE transfer SET credit = :c, amount = :a WHERE id = :i",
        {"c": avail(ATTACKER), "a": 2 * mint.amount, "i": mint.id},
    )
    rechain(ledger)
    audit_names(ledger, f"close:{honest.digest}", "not authorized")


def test_emission_follows_the_clock_never_early_never_twice(market: Market) -> None:
    _checked_interval(market)
    ledger = market.ledger
    epoch = ledger.current_epoch()
    with pytest.raises(Unauthorized, match=f"epoch ends at unix second {ledger.epoch_end_s(epoch)}"):
        market.close(epoch)  # the epoch is still running
    assert ledger.closable_epochs() == [] and ledger.totals()["minted"] == 1700 * GPC
    market.clock.t = ledger.epoch_end_s(epoch) - 0.001
    with pytest.raises(Unauthorized, match="ends at"):
        market.close(epoch)
    market.clock.t = ledger.epoch_end_s(epoch)
    assert ledger.closable_epochs() == [epoch]
    market.close(epoch)
    with pytest.raises(Unauthorized, match="already closed"):
        market.close(epoch)
    # an epoch without charges mints nothing; one before the last closed cannot be closed any more
    market.next_epoch()
    empty = market.s(
        COORDINATOR,
        "EpochClose",
        coordinator=COORDINATOR.address,
        epoch=epoch + 1,
        emission=1,
        minted=1,
        payments=1,
        policyHash=policy_hash(POLICY),
    )
    refused(
        ledger,
        Unauthorized,
        "no interval was charged in it",
        [op("empty", Transfer(ISSUANCE, avail(WORKER), 1, Code.MINT_WORKER, empty.digest))],
        empty,
    )
    # a charge dated into an earlier epoch (where its emission would go) is refused
    (r2,) = market.receipts(10, [WORKER], previous=[ledger.message(ledger.messages("WorkReceipt")[0].digest)])
    old = market.s.settlement(r2.digest, epoch, **charge_amounts(GPC, POLICY.tokenomics).fields())
    refused(
        ledger,
        StaleEpoch,
        f"signed for epoch {epoch}; the ledger's clock is in epoch {epoch + 2}",
        [op("late", *plan_interval(JOB, GPC, POLICY.tokenomics, old.digest))],
        old,
    )


def test_a_close_written_early_with_plain_sql_is_named(market: Market) -> None:
    _checked_interval(market)
    ledger = market.ledger
    epoch = ledger.current_epoch()
    from gpucoin.ledger.epochs import plan_epoch
    from gpucoin.ledger.plans import plan_mint

    plan = plan_epoch(
        epoch, [c.interval for c in ledger.epoch_charges(epoch)], POLICY.tokenomics, ledger.totals()["supply"]
    )
    close = market.s(
        COORDINATOR,
        "EpochClose",
        coordinator=COORDINATOR.address,
        epoch=epoch,
        emission=plan.emission,
        minted=plan.minted,
        payments=plan.payments,
        policyHash=policy_hash(POLICY),
    )
    ledger.record_message(close)
    forge_operation(ledger, "early", plan_mint(plan.rewards, close.digest))  # stamped inside the epoch it closes
    audit_names(ledger, "early", "ends at")


def test_a_slash_needs_a_failing_report_of_the_slashed_workers_receipt(market: Market) -> None:
    _, r, passing = _checked_interval(market)
    ledger = market.ledger
    # a Settlement of the passing report that pays nothing would slash its verifier, were the pass
    # shown false by another verifier's fail (verify.recheck); it never slashes the worker
    st = market.s.settlement(passing.digest, ledger.current_epoch(), burned=200 * GPC, slashed=250 * GPC)
    slash = Transfer(bonded(WORKER), BURNED, 200 * GPC, Code.SLASH, st.digest)
    whistle = Transfer(bonded(WORKER), avail(VERIFIER), 50 * GPC, Code.WHISTLEBLOWER, st.digest)
    refused(ledger, Unauthorized, "slashes nobody", [op("frame", slash, whistle)], st)
    # a failing report by the attacker of another volunteer's receipt, slashed to the attacker's profit
    (fail,) = market.reports([r], "fail", verifier=ATTACKER)
    st = market.s.settlement(fail.digest, ledger.current_epoch(), burned=200 * GPC, slashed=250 * GPC)
    to_me = Transfer(bonded(WORKER), avail(ATTACKER), 50 * GPC, Code.WHISTLEBLOWER, st.digest)
    honest = [Transfer(bonded(WORKER), BURNED, 200 * GPC, Code.SLASH, st.digest), to_me]
    ledger.post_batch([op("slash", *honest)], messages=[st])  # the coordinator's decision, correctly carried out
    # slashing the same receipt again, or the attacker's own stake to a friend, is refused
    st2 = market.s.settlement(fail.digest, ledger.current_epoch(), burned=100 * GPC, slashed=125 * GPC)
    refused(
        ledger,
        Unauthorized,
        "already slashed",
        [
            op(
                "again",
                Transfer(bonded(WORKER), BURNED, 100 * GPC, Code.SLASH, st2.digest),
                Transfer(bonded(WORKER), avail(ATTACKER), 25 * GPC, Code.WHISTLEBLOWER, st2.digest),
            )
        ],
        st2,
    )
    # a SLASH citing the failing report itself (no coordinator's Settlement): reports authorize nothing
    refused(
        ledger,
        Unauthorized,
        "cites a VerificationReport, which authorizes no transfer",
        [op("x", Transfer(bonded(WORKER), BURNED, 1, Code.SLASH, fail.digest))],
    )
    forge_operation(ledger, "x", [Transfer(bonded(ATTACKER), BURNED, 1, Code.SLASH, passing.digest)])
    audit_names(ledger, "x", "VerificationReport")


def test_no_faucet_outside_a_dev_market(ledger_url: str) -> None:
    ledger = open_market(ledger_url, dev=False, allocations=((CONSUMER, 5 * GPC),))
    s = Signer()
    grant = s.faucet(ATTACKER, 10**12)
    refused(
        ledger,
        UnknownParty,
        "not dev; it has no faucet",
        [op("f", *plan_faucet(ATTACKER.address, 10**12, grant.digest))],
        grant,
    )
    # written with plain SQL, citing the Genesis (the only thing that mints there)
    forge_operation(ledger, "f", [Transfer(ISSUANCE, avail(ATTACKER), 10**12, Code.FAUCET, ledger.genesis.digest)])
    audit_names(ledger, "f", "cites a Genesis, which authorizes genesis")
    assert ledger.balance(avail(CONSUMER)) == 5 * GPC  # the Genesis allocation is what entered
    ledger.close()


def test_unbonding_matures_on_the_ledgers_clock_never_the_callers(market: Market) -> None:
    ledger = market.ledger
    market.unbond(WORKER, 100 * GPC)
    w = market.s(WORKER, "Withdraw", provider=WORKER.address, amount=100 * GPC)
    out = [Transfer(unbonding(WORKER), avail(WORKER), 100 * GPC, Code.WITHDRAW, w.digest)]
    refused(ledger, RuleViolation, "only 0 µGPC has matured", [op("out", *out)], w)
    for _ in range(POLICY.bonding.unbonding_epochs - 1):
        market.next_epoch()
    refused(ledger, RuleViolation, "only 0 µGPC has matured", [op("out", *out)], w)
    # written with plain SQL, stamped in the epoch where the stake would have matured: in the future
    ledger.record_message(w)
    now_epoch = ledger.current_epoch()
    future = int((ledger.epoch_end_s(now_epoch) + 6) * 1_000_000)  # > the audit's 5 s of clock skew
    forge_operation(ledger, "out", out, created_at=future)
    assert any("in the future" in p for p in ledger.audit())
    # ... and the same row stamped now, with its epoch column claiming the later epoch
    tamper(ledger, "DELETE FROM transfer WHERE op_id = 'out'")
    tamper(ledger, "DELETE FROM operation WHERE op_id = 'out'")
    rechain(ledger)
    forge_operation(ledger, "out", out, epoch=now_epoch + 1, created_at=int(market.clock() * 1_000_000))
    problems = audit_names(ledger, "out", "has matured")
    assert any("stored epoch" in p for p in problems), problems
    tamper(ledger, "DELETE FROM transfer WHERE op_id = 'out'")
    tamper(ledger, "DELETE FROM operation WHERE op_id = 'out'")
    rechain(ledger)
    assert ledger.audit() == []
    market.next_epoch()
    ledger.post("out", out)  # now it has matured, by the ledger's own clock
    assert ledger.balance(avail(WORKER)) == 200 * GPC and ledger.audit() == []


def test_a_receipt_only_from_the_provider_its_rank_is_assigned_to(market: Market) -> None:
    ledger = market.ledger
    market.escrow(200 * GPC)
    market.assign(0, WORKER)
    forged = market.s.receipt(0, who=ATTACKER)  # the attacker claims rank 0's work
    before = snapshot(ledger)
    with pytest.raises(UnknownParty, match=f"assigned to {WORKER.address}"):
        ledger.record_message(forged)
    assert snapshot(ledger) == before
    # an Assignment is the coordinator's: the attacker cannot sign one for itself
    with pytest.raises(UnknownParty, match="not by this market's coordinator"):
        ledger.record_message(
            market.s(ATTACKER, "Assignment", jobId=JOB, rank=0, provider=ATTACKER.address, nodeId="evil", fromStep=0)
        )
    # written with plain SQL, with its index row, the receipt is named by the audit's admission replay
    from gpucoin.ledger.record import check_message

    row = check_message(forged).row
    tamper(
        ledger,
        "INSERT INTO message (digest, primary_type, signer, nonce, signature, typed_data, recorded_at) "
        "VALUES (:d, :p, :s, :n, :g, :t, :r)",
        {
            "d": row["digest"],
            "p": row["primary_type"],
            "s": row["signer"],
            "n": row["nonce"],
            "g": row["signature"],
            "t": row["typed_data"],
            "r": int(market.clock() * 1e6),
        },
    )
    tamper(
        ledger,
        "INSERT INTO work_receipt (digest, job_id, rank, step_start, step_end) VALUES (:d, :j, 0, 0, 10)",
        {"d": row["digest"], "j": JOB},
    )
    problems = ledger.audit()
    assert any(
        p.startswith("message #") and forged.digest in p and f"assigned to {WORKER.address}" in p for p in problems
    ), problems


def test_an_interval_is_charged_once_and_only_from_its_jobs_escrow(market: Market) -> None:
    _, r, rep = _checked_interval(market)
    ledger = market.ledger
    again = market.s.settlement(r.digest, ledger.current_epoch(), **charge_amounts(GPC, POLICY.tokenomics).fields())
    refused(
        ledger,
        Unauthorized,
        "already charged by Settlement",
        [op("twice", *plan_interval(JOB, GPC, POLICY.tokenomics, again.digest))],
        again,
    )
    # a Settlement of another job's receipt cannot drain this one
    other = market.escrow(50 * GPC, "job-2")
    st = market.s.settlement(
        r.digest, ledger.current_epoch(), "job-2", **charge_amounts(GPC, POLICY.tokenomics).fields()
    )
    refused(
        ledger,
        UnknownParty,
        "its subject is of job 'job-1'",
        [op("cross", *plan_interval("job-2", GPC, POLICY.tokenomics, st.digest))],
        st,
    )
    assert other


# -- one test per transfer code ----------------------------------------------------------------


Case = tuple[list[Transfer], list[Any]]


def _faucet(m: Market) -> tuple[Case, Case, Case]:
    grant = m.s.faucet(CONSUMER, 7 * GPC)
    by_other = m.s.faucet(CONSUMER, 7 * GPC, signer=WORKER)
    return (
        (plan_faucet(CONSUMER.address, 7 * GPC, grant.digest), [grant]),
        (plan_faucet(CONSUMER.address, 7 * GPC, m.attacker_reg.digest), []),
        (plan_faucet(CONSUMER.address, 7 * GPC, by_other.digest), [by_other]),
    )  # type: ignore[attr-defined]


def _bond(m: Market) -> tuple[Case, Case, Case]:
    reg = m.s.registration(50 * GPC, who=CONSUMER, node="c1")
    grant = m.s.faucet(CONSUMER, 50 * GPC)  # another type naming the same wallet and amount
    theirs = m.s.registration(50 * GPC, who=ATTACKER, node="e2")  # the attacker's own, bonding the consumer's funds
    return (
        (plan_bond(CONSUMER.address, 50 * GPC, reg.digest), [reg]),
        (plan_bond(CONSUMER.address, 50 * GPC, grant.digest), [grant]),
        ([Transfer(avail(CONSUMER), bonded(CONSUMER), 50 * GPC, Code.BOND, theirs.digest)], [theirs]),
    )


def _escrow(m: Market) -> tuple[Case, Case, Case]:
    order = m.s.order(50 * GPC, "job-x")
    theirs = m.s.order(50 * GPC, "job-x", consumer=ATTACKER)
    return (
        (plan_escrow("job-x", CONSUMER.address, 50 * GPC, order.digest), [order]),
        (plan_escrow("job-x", CONSUMER.address, 50 * GPC, m.attacker_reg.digest), []),
        (plan_escrow("job-x", CONSUMER.address, 50 * GPC, theirs.digest), [theirs]),
    )  # type: ignore[attr-defined]


def _refund(m: Market) -> tuple[Case, Case, Case]:
    order = m.escrow(50 * GPC, "job-r")
    st = m.s.settlement(order.digest, m.ledger.current_epoch(), "job-r", refunded=50 * GPC)
    by_other = m.s.settlement(order.digest, m.ledger.current_epoch(), "job-r", signer=ATTACKER, refunded=50 * GPC)
    return (
        (plan_refund("job-r", CONSUMER.address, 50 * GPC, st.digest), [st]),
        (plan_refund("job-r", CONSUMER.address, 50 * GPC, order.digest), []),
        (plan_refund("job-r", CONSUMER.address, 50 * GPC, by_other.digest), [by_other]),
    )


def _charge(m: Market) -> tuple[Case, Case, Case]:
    m.escrow(200 * GPC)
    m.assign()
    (r,) = m.receipts(0, [WORKER])
    amounts = charge_amounts(10 * GPC, POLICY.tokenomics)
    st = m.s.settlement(r.digest, m.ledger.current_epoch(), **amounts.fields())
    by_other = m.s.settlement(r.digest, m.ledger.current_epoch(), signer=ATTACKER, **amounts.fields())
    return (
        (plan_interval(JOB, 10 * GPC, POLICY.tokenomics, st.digest), [st]),
        (plan_interval(JOB, 10 * GPC, POLICY.tokenomics, r.digest), []),
        (plan_interval(JOB, 10 * GPC, POLICY.tokenomics, by_other.digest), [by_other]),
    )


def _unbond(m: Market) -> tuple[Case, Case, Case]:
    u = m.s(WORKER, "Unbond", provider=WORKER.address, amount=50 * GPC)
    theirs = m.s(ATTACKER, "Unbond", provider=ATTACKER.address, amount=50 * GPC)  # for the worker's stake
    return (
        (plan_unbond(WORKER.address, 50 * GPC, u.digest), [u]),
        (plan_unbond(WORKER.address, 50 * GPC, m.attacker_reg.digest), []),  # type: ignore[attr-defined]
        ([Transfer(bonded(WORKER), unbonding(WORKER), 50 * GPC, Code.UNBOND, theirs.digest)], [theirs]),
    )


def _withdraw(m: Market) -> tuple[Case, Case, Case]:
    m.unbond(WORKER, 50 * GPC)
    for _ in range(POLICY.bonding.unbonding_epochs):
        m.next_epoch()
    w = m.s(WORKER, "Withdraw", provider=WORKER.address, amount=50 * GPC)
    theirs = m.s(ATTACKER, "Withdraw", provider=ATTACKER.address, amount=50 * GPC)
    u = m.ledger.messages("Unbond")[0].digest  # the unbond itself: another type naming the same stake
    return (
        (plan_withdraw(WORKER.address, 50 * GPC, w.digest), [w]),
        (plan_withdraw(WORKER.address, 50 * GPC, u), []),
        ([Transfer(unbonding(WORKER), avail(WORKER), 50 * GPC, Code.WITHDRAW, theirs.digest)], [theirs]),
    )


def _slash(m: Market) -> tuple[Case, Case, Case]:
    m.escrow(200 * GPC)
    m.assign()
    (r,) = m.receipts(0, [WORKER])
    (fail,) = m.reports([r], "fail")
    burned, whistle = slash_split(500 * GPC, POLICY.slashing, whistleblower=True)
    st = m.s.settlement(fail.digest, m.ledger.current_epoch(), burned=burned, slashed=burned + whistle)
    by_other = m.s.settlement(
        fail.digest, m.ledger.current_epoch(), signer=ATTACKER, burned=burned, slashed=burned + whistle
    )
    return (
        (plan_slash(WORKER.address, VERIFIER.address, 500 * GPC, 0, burned, whistle, st.digest), [st]),
        (plan_slash(WORKER.address, VERIFIER.address, 500 * GPC, 0, burned, whistle, fail.digest), []),
        (plan_slash(WORKER.address, VERIFIER.address, 500 * GPC, 0, burned, whistle, by_other.digest), [by_other]),
    )


def _mint(m: Market) -> tuple[Case, Case, Case]:
    from gpucoin.ledger.epochs import plan_epoch
    from gpucoin.ledger.plans import plan_mint

    m.escrow(200 * GPC)
    m.assign()
    (r,) = m.receipts(0, [WORKER])
    reps = m.reports([r])
    st = m.charge([r], 10 * GPC, reps)
    epoch = m.next_epoch()
    ledger = m.ledger
    plan = plan_epoch(
        epoch, [c.interval for c in ledger.epoch_charges(epoch)], POLICY.tokenomics, ledger.totals()["supply"]
    )
    fields = dict(
        epoch=epoch, emission=plan.emission, minted=plan.minted, payments=plan.payments, policyHash=policy_hash(POLICY)
    )
    close = m.s(COORDINATOR, "EpochClose", coordinator=COORDINATOR.address, **fields)
    by_other = m.s(ATTACKER, "EpochClose", coordinator=ATTACKER.address, **fields)
    return (
        (plan_mint(plan.rewards, close.digest), [close]),
        (plan_mint(plan.rewards, st.digest), []),
        (plan_mint(plan.rewards, by_other.digest), [by_other]),
    )


CODE_CASES: dict[str, Callable[[Market], tuple[Case, Case, Case]]] = {
    "faucet": _faucet,
    "bond": _bond,
    "unbond": _unbond,
    "withdraw": _withdraw,
    "escrow": _escrow,
    "refund": _refund,
    "burn+treasury": _charge,
    "slash+whistleblower": _slash,
    "mint_worker+mint_verifier": _mint,
}
"""Per transfer code (PAY and GENESIS have tests of their own below), a builder of (the right
message's transfers and messages, the same transfers citing a message of another type, the same
transfers citing a message of the right type by the wrong signer)."""


@pytest.mark.parametrize("code", sorted(CODE_CASES))
def test_each_code_takes_its_own_message_and_no_other(market: Market, code: str) -> None:
    """The right message is admitted; a message of the wrong type or signer, the wrong amount and the
    wrong recipient are each refused with nothing changed."""
    ledger = market.ledger
    (good, good_msgs), (wrong_type, wrong_msgs), (wrong_signer, signer_msgs) = CODE_CASES[code](market)
    refused(ledger, Unauthorized, "which authorizes", [op("x", *wrong_type)], *wrong_msgs)
    with pytest.raises((Unauthorized, UnknownParty, SignatureError)):
        ledger.post_batch([op("x", *wrong_signer)], messages=signer_msgs)
    assert ledger.audit() == []
    t = good[0]
    more = Transfer(t.debit, t.credit, t.amount + 1, t.code, t.digest)
    refused(ledger, Unauthorized, "missing", [op("x", more, *good[1:])], *good_msgs)
    if t.credit.startswith("wallet:"):
        credit = avail(ATTACKER)
    elif t.credit.startswith("job:"):
        credit = escrow_account("attackers-job")
    else:  # burned <-> treasury
        credit = TREASURY if t.credit == BURNED else BURNED
    elsewhere = Transfer(t.debit, credit, t.amount, t.code, t.digest)
    refused(ledger, Unauthorized, "not authorized", [op("x", elsewhere, *good[1:])], *good_msgs)
    ledger.post_batch([op("x", *good)], messages=good_msgs)
    refused(ledger, Unauthorized, "already authorized an operation", [op("y", *good)])
    assert ledger.audit() == []


def test_pay_only_in_direct_mode_to_the_intervals_workers(ledger_url: str) -> None:
    direct = POLICY.model_copy(update={"tokenomics": POLICY.tokenomics.model_copy(update={"mode": "direct"})})
    ledger = open_market(ledger_url, policy=direct)
    m = Market(ledger)
    m.fund(CONSUMER, 100 * GPC)
    m.register(WORKER, 0)
    m.register(VERIFIER, 0, node="n2")
    m.escrow(100 * GPC, workers=2)
    m.assign(0, WORKER)
    m.assign(1, VERIFIER, node="n2")
    rs = m.receipts(0, [WORKER, VERIFIER])
    amounts = charge_amounts(10 * GPC + 1, direct.tokenomics)
    assert amounts.burned == 0
    st = m.s.settlement(rs[0].digest, ledger.current_epoch(), policy=direct, **amounts.fields())
    good = plan_interval(JOB, 10 * GPC + 1, direct.tokenomics, st.digest, [WORKER.address, VERIFIER.address])
    assert [t.amount for t in good if t.code == Code.PAY] == [4_500_001, 4_500_000]
    swapped = [
        Transfer(t.debit, avail(ATTACKER) if t.credit == avail(VERIFIER) else t.credit, t.amount, t.code, t.digest)
        for t in good
    ]
    refused(ledger, Unauthorized, "not authorized", [op("pay", *swapped)], st)
    more = [Transfer(t.debit, t.credit, t.amount + (t.code == Code.PAY), t.code, t.digest) for t in good]
    refused(ledger, Unauthorized, "not authorized", [op("pay", *more)], st)
    order = ledger.messages("JobOrder")[0].digest
    refused(
        ledger,
        Unauthorized,
        "cites a JobOrder, which authorizes escrow",
        [op("pay", *(Transfer(t.debit, t.credit, t.amount, t.code, order) for t in good))],
    )
    by_other = m.s.settlement(rs[0].digest, ledger.current_epoch(), signer=ATTACKER, policy=direct, **amounts.fields())
    refused(
        ledger,
        UnknownParty,
        "not by this market's coordinator",
        [op("pay", *(Transfer(t.debit, t.credit, t.amount, t.code, by_other.digest) for t in good))],
        by_other,
    )
    ledger.post_batch([op("pay", *good)], messages=[st])
    assert ledger.audit() == []
    ledger.close()


def test_a_genesis_of_someone_else_or_a_second_allocation_is_refused(ledger_url: str) -> None:
    bare = Ledger(ledger_url, clock=Clock())
    s = Signer()
    with pytest.raises(UnknownParty, match="not the domain's verifyingContract"):
        bare.init_genesis(
            s.genesis(start=int(bare._clock()), signer=ATTACKER, allocations=((ATTACKER, 10**12),)), POLICY
        )
    bare.close()
    ledger = open_market(ledger_url, allocations=((CONSUMER, 5 * GPC),))
    g = ledger.genesis.digest
    refused(
        ledger,
        Unauthorized,
        "already authorized an operation",
        [op("more", Transfer(ISSUANCE, avail(CONSUMER), 5 * GPC, Code.GENESIS, g))],
    )
    tamper(
        ledger,
        "UPDATE transfer SET amount = :a, credit = :c WHERE code = 'genesis'",
        {"a": 10**12, "c": avail(ATTACKER)},
    )
    rechain(ledger)
    audit_names(ledger, "genesis")
    ledger.close()


# -- found by an independent review of the change --------------------------------------------


def test_nobody_can_take_the_operation_ids_the_coordinator_needs(market: Market) -> None:
    """A cheater posts its own Unbonds under the ids a coordinator might use; the coordinator's
    ids name the digests of messages it has not signed yet, so its slash, close and refund land."""
    from gpucoin.coordinator.settle import Coordinator
    from gpucoin.ledger.plans import plan_unbond

    ledger = market.ledger
    coord = Coordinator(ledger, POLICY, COORDINATOR, DOMAIN)
    order = market.escrow(50 * GPC)
    market.assign()
    (r,) = market.receipts(0, [WORKER])
    epoch = ledger.current_epoch()
    for squatted in (f"slash:{r.digest}", f"epoch:{epoch}", f"close:{epoch}", f"refund:{JOB}", f"settle:{JOB}:0"):
        u = market.s(WORKER, "Unbond", provider=WORKER.address, amount=1)
        ledger.post_batch([op(squatted, *plan_unbond(WORKER.address, 1, u.digest))], messages=[u])
    assert coord.settle_interval(JOB, [r], None, 5 * GPC)[0] == 5 * GPC
    (fail,) = market.reports([r], "fail")
    stake = ledger.balance(bonded(WORKER)) + ledger.balance(unbonding(WORKER))
    assert coord.slash(JOB, fail) == stake // 2
    market.next_epoch()
    assert [p.epoch for p in coord.close_epochs()] == [epoch]
    assert coord.refund(JOB, order) == 50 * GPC - 5 * GPC
    assert ledger.audit() == []


def test_an_operation_removed_from_the_middle_leaves_its_decision_unused_and_named(ledger: Ledger) -> None:
    from tests.ledger.helpers import normal_history, raw_sql

    msgs = normal_history(ledger, Signer())
    Market(ledger, Signer(10**6)).fund(CONSUMER, GPC, "later")  # so the slash is mid-chain
    first, n = ledger.operation("slash-1").first_transfer_id, ledger.operation("slash-1").n_transfers
    tamper(ledger, "DELETE FROM transfer WHERE op_id = 'slash-1'")
    raw_sql(ledger, "DELETE FROM slash WHERE op_id = 'slash-1'")
    raw_sql(ledger, "DELETE FROM operation WHERE op_id = 'slash-1'")
    raw_sql(ledger, "UPDATE transfer SET id = -(id - :n) WHERE id > :k", {"n": n, "k": first})
    raw_sql(ledger, "UPDATE transfer SET id = -id WHERE id < 0")
    raw_sql(
        ledger,
        "UPDATE operation SET first_transfer_id = first_transfer_id - :n WHERE first_transfer_id > :k",
        {"n": n, "k": first},
    )
    rechain(ledger)
    assert ledger.balance(bonded(WORKER)) == 500 * GPC  # the cheater got its stake back
    assert ledger.audit() == [
        f"message Settlement {msgs['st2'].digest}: recorded, but authorized no operation (was its operation removed?)"
    ]


def test_an_operation_spliced_in_before_the_message_it_cites_is_named(market: Market) -> None:
    """A database writer moves a volunteer's UNBOND back to epoch 0, so its stake would mature early."""
    from tests.ledger.helpers import raw_sql

    ledger = market.ledger
    bond = next(t for t in ledger.transfers() if t.code == "bond" and t.credit == bonded(WORKER))
    for _ in range(3):
        market.next_epoch()
        market.fund(CONSUMER, GPC)
    u = market.s(WORKER, "Unbond", provider=WORKER.address, amount=100 * GPC)
    ledger.record_message(u)  # signed and recorded now
    k = bond.id
    tamper(ledger, "UPDATE transfer SET id = -id WHERE id > :k", {"k": k})
    raw_sql(ledger, "UPDATE transfer SET id = -id + 1 WHERE id < 0")
    raw_sql(
        ledger, "UPDATE operation SET first_transfer_id = first_transfer_id + 1 WHERE first_transfer_id > :k", {"k": k}
    )
    raw_sql(
        ledger,
        "INSERT INTO operation (op_id, content_hash, memo, first_transfer_id, n_transfers, created_at, epoch, "
        "unbonding_epochs) VALUES ('early', '', '', :f, 1, :t, 0, 7)",
        {"f": k + 1, "t": bond.created_at},
    )
    raw_sql(
        ledger,
        "INSERT INTO transfer (id, op_id, seq, debit, credit, amount, code, digest, created_at, prev_hash, "
        "row_hash) VALUES (:i, 'early', 0, :d, :c, :a, 'unbond', :g, :t, '', '')",
        {"i": k + 1, "d": bonded(WORKER), "c": unbonding(WORKER), "a": 100 * GPC, "g": u.digest, "t": bond.created_at},
    )
    raw_sql(
        ledger,
        "INSERT INTO unbonding (account, mature_epoch, amount) VALUES (:a, 7, :m)",
        {"a": unbonding(WORKER), "m": 100 * GPC},
    )
    rechain(ledger)
    audit_names(ledger, "early", "names no recorded message")


def test_a_market_row_naming_another_domain_is_refused(ledger: Ledger) -> None:
    from gpucoin.exceptions import LedgerError

    tamper(
        ledger,
        "UPDATE market SET domain = :d",
        {"d": '{"chainId":1,"name":"gpucoin","verifyingContract":"' + ATTACKER.address + '","version":"1"}'},
    )
    with pytest.raises(LedgerError, match="but the Genesis is signed in"):
        Ledger(ledger.url)
    problems = ledger.audit()
    assert len(problems) >= 1 and problems[0].startswith("market: the market row names the domain"), problems


def test_a_deeply_nested_stored_message_is_a_finding_not_a_crash(market: Market) -> None:
    import subprocess
    import sys

    ledger = market.ledger
    row = ledger.messages("JobOrder") or [market.escrow(GPC) and ledger.messages("JobOrder")[0]]
    tamper(
        ledger,
        "UPDATE message SET typed_data = :t WHERE digest = :d",
        {"t": '{"message":' + "[" * 200_000 + "]" * 200_000 + "}", "d": row[0].digest},
    )
    p = subprocess.run(
        [sys.executable, "-m", "gpucoin", "ledger", "audit", "--ledger-url", ledger.url],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1, (p.returncode, p.stderr[-500:])  # a finding, not a segfault (-11)
    assert "nests deeper" in p.stderr and "audit failed" in p.stderr


def test_two_closes_in_one_operation_close_in_order(market: Market) -> None:
    from gpucoin.ledger.epochs import plan_epoch
    from gpucoin.ledger.plans import plan_mint

    ledger = market.ledger
    market.escrow(100 * GPC)
    market.assign()
    r0 = market.receipts(0, [WORKER])
    market.charge(r0, GPC)
    e0 = market.next_epoch()
    r1 = market.receipts(10, [WORKER], previous=r0)
    market.charge(r1, GPC)
    e1 = market.next_epoch()
    closes, transfers = [], []
    for e in (e1, e0):  # the later epoch first
        plan = plan_epoch(
            e, [c.interval for c in ledger.epoch_charges(e)], POLICY.tokenomics, ledger.totals()["supply"]
        )
        m = market.s(
            COORDINATOR,
            "EpochClose",
            coordinator=COORDINATOR.address,
            epoch=e,
            emission=plan.emission,
            minted=plan.minted,
            payments=plan.payments,
            policyHash=policy_hash(POLICY),
        )
        closes.append(m)
        transfers += plan_mint(plan.rewards, m.digest)
    refused(
        ledger, Unauthorized, f"epoch {e1} is already closed; epochs close in order", [op("both", *transfers)], *closes
    )


def test_a_settlement_signed_behind_another_writers_clock_still_lands(ledger_url: str) -> None:
    """current_epoch() is the ledger's time, never before its newest row: a coordinator whose clock
    lags another writer's still signs the epoch its post will be in."""
    from gpucoin.coordinator.settle import Coordinator

    ahead = Clock()
    ledger = open_market(ledger_url, ahead)
    m = Market(ledger)
    m.fund(CONSUMER, 100 * GPC)
    m.register(WORKER)
    m.escrow(50 * GPC)
    m.assign()
    (r,) = m.receipts(0, [WORKER])
    m.next_epoch()
    ahead.advance(0.5)
    m.fund(VERIFIER, 1)  # a row stamped 0.5 s into the new epoch by the writer ahead
    behind = Ledger(ledger_url, clock=lambda: ahead() - 1.0)  # this coordinator's clock is 1 s behind it
    try:
        assert behind.current_epoch() == ledger.current_epoch()
        assert Coordinator(behind, POLICY, COORDINATOR, DOMAIN).settle_interval(JOB, [r], None, GPC)[0] == GPC
        assert behind.audit() == []
    finally:
        behind.close()
        ledger.close()


def test_recording_is_serialized_so_a_reassignment_and_a_receipt_cannot_both_pass(ledger: Ledger, monkeypatch) -> None:
    """The coordinator moves rank 0 to another node while the old one's next receipt arrives: one
    of the two is admitted first and the other checked against it (every write takes the chain
    head lock; on PostgreSQL both used to pass, and the audit then flagged the Assignment)."""
    import threading
    import time

    import gpucoin.ledger.record as record

    m = Market(ledger)
    m.fund(CONSUMER, 100 * GPC)
    m.register(WORKER)
    m.register(WORKER2, node="n2")
    m.escrow(50 * GPC)
    m.assign()
    (r1,) = m.receipts(0, [WORKER])
    moved = m.s.assignment(0, WORKER2, node="n2", start=10)
    late = m.s.receipt(10, previous=r1.digest, who=WORKER)
    admit = record.Admission.admit

    def slow(self, kind, *args, **kwargs):  # widen the window between reading and committing
        admit(self, kind, *args, **kwargs)
        if kind == "Assignment":
            time.sleep(1.0)

    monkeypatch.setattr(record.Admission, "admit", slow)
    other = Ledger(ledger.url, clock=m.clock)
    errors: list[Exception] = []

    def record_moved() -> None:
        try:
            ledger.record_message(moved)
        except Exception as exc:  # noqa: BLE001 - which one loses is the point
            errors.append(exc)

    t = threading.Thread(target=record_moved)
    t.start()
    time.sleep(0.3)
    try:
        other.record_message(late)
    except Exception as exc:  # noqa: BLE001
        errors.append(exc)
    t.join(timeout=30)
    other.close()
    assert len(errors) == 1, errors  # exactly one of the two was admitted
    assert ledger.audit() == []
