"""Emission on the clock: one closer for the whole ledger mints each ended epoch once, pro rata to
everything charged in it across all jobs; nothing is minted early, twice, or for an epoch without
work. A controlled clock drives the ledger; the closer is the coordinator's own
(``Coordinator.close_epochs``). On SQLite and PostgreSQL.
"""

from __future__ import annotations

from fractions import Fraction

from eth_account import Account

from gpucoin.coordinator.settle import Coordinator
from gpucoin.ledger import Ledger
from gpucoin.ledger.epochs import plan_epoch
from gpucoin.policy.tokenomics import SettledInterval
from tests.ledger.helpers import (
    CONSUMER,
    COORDINATOR,
    DOMAIN,
    GPC,
    POLICY,
    VERIFIER,
    Market,
    avail,
)

TOK = POLICY.tokenomics
WORKERS = [Account.from_key(bytes([0x20 + i]) * 32) for i in range(10)]


def coordinator(ledger: Ledger) -> Coordinator:
    return Coordinator(ledger, POLICY, COORDINATOR, DOMAIN)


def ten_jobs(m: Market) -> list[int]:
    """Ten jobs of one rank each (worker i on job i), each charging one checked interval of a
    different payment in the current epoch; returns the payments, µGPC."""
    m.fund(CONSUMER, 10_000 * GPC)
    payments = [(i + 1) * 1_000_003 for i in range(10)]
    for i, (w, paid) in enumerate(zip(WORKERS, payments, strict=True)):
        job = f"job-{i}"
        m.register(w, 0, node=f"n{i}")
        m.escrow(100 * GPC, job)
        m.assign(0, w, job, node=f"n{i}")
        rs = m.receipts(0, [w], job)
        reps = m.reports(rs)
        m.charge(rs, paid, reps, job)
    return payments


def test_ten_jobs_in_one_epoch_share_its_emission_pro_rata(ledger: Ledger) -> None:
    m = Market(ledger)
    payments = ten_jobs(m)
    epoch = ledger.current_epoch()
    coord = coordinator(ledger)
    minted_before = ledger.totals()["minted"]

    # not before the epoch has ended on the clock
    m.clock.t = ledger.epoch_end_s(epoch) - 0.5
    assert coord.close_epochs() == [] and ledger.epoch_close(epoch) is None
    assert ledger.totals()["minted"] == minted_before

    m.clock.t = ledger.epoch_end_s(epoch)
    (plan,) = coord.close_epochs()
    assert plan.epoch == epoch and plan.payments == sum(payments)
    emission = TOK.initial_emission_ugpc  # epoch 0: no halving; far below the cap
    assert plan.emission == emission
    total = sum(payments)
    for w, paid in zip(WORKERS, payments, strict=True):
        share = Fraction(emission * paid, total)
        got = ledger.balance(avail(w))
        assert got == int(share * TOK.worker_share_bps / 10_000)  # floored once, exactly
    verifier_share = sum(int(Fraction(emission * p, total) * TOK.verifier_share_bps / 10_000) for p in payments)
    assert ledger.balance(avail(VERIFIER)) == verifier_share
    minted = ledger.totals()["minted"] - minted_before
    assert minted == plan.minted <= emission and emission - minted < 2 * len(payments)  # at most 1 µGPC lost per reward

    # never twice: the closer finds nothing more to close, now or epochs later
    assert coord.close_epochs() == []
    m.next_epoch()
    m.next_epoch()
    assert coord.close_epochs() == [] and ledger.totals()["minted"] - minted_before == minted
    assert ledger.epoch_rewards(epoch) and sum(r.amount_ugpc for r in ledger.epoch_rewards(epoch)) == minted
    assert ledger.audit() == []


def test_two_closers_race_and_the_epoch_is_minted_once(ledger: Ledger) -> None:
    m = Market(ledger)
    ten_jobs(m)
    epoch = m.next_epoch()
    other = Ledger(ledger.url, clock=m.clock)  # a second coordinator process on the same ledger
    try:
        first, second = coordinator(ledger), coordinator(other)
        (plan,) = first.close_epochs()
        assert second.close_epochs() == []  # it sees the close (closable_epochs is empty)
        # and one that read the epoch as closable before the first closed it skips it too
        assert second.close_epochs() == [] and ledger.epoch_close(epoch) is not None
        assert ledger.totals()["minted"] == 10_000 * GPC + plan.minted
    finally:
        other.close()
    assert ledger.audit() == []


def test_epochs_close_in_order_and_an_epoch_without_work_mints_nothing(ledger: Ledger) -> None:
    m = Market(ledger)
    m.fund(CONSUMER, 100 * GPC)
    m.register(WORKERS[0], 0)
    m.escrow(100 * GPC)
    m.assign(0, WORKERS[0])
    r0 = m.receipts(0, [WORKERS[0]])
    m.charge(r0, GPC)  # epoch e, unchecked: no verifier reward
    e = m.next_epoch()
    m.next_epoch()  # e + 1 passes with no charge
    r1 = m.receipts(10, [WORKERS[0]], previous=r0)
    m.charge(r1, 2 * GPC)  # epoch e + 2
    m.next_epoch()
    coord = coordinator(ledger)
    plans = coord.close_epochs()
    assert [p.epoch for p in plans] == [e, e + 2]  # e + 1 had nothing to mint
    assert all(r.role == "worker" for p in plans for r in p.rewards)
    assert ledger.balance(avail(VERIFIER)) == 0
    assert ledger.audit() == []


def test_a_thousand_tiny_intervals_earn_what_one_interval_of_the_same_payment_earns() -> None:
    """Emission is split by payment alone: splitting work into many jobs gains nothing (up to the
    1 µGPC each floored reward may lose)."""
    one = plan_epoch(3, [SettledInterval(("0x" + "11" * 32,), (WORKERS[0].address,), None, 1_000_000)], TOK, 0)
    tiny = [SettledInterval((f"0x{i:064x}",), (WORKERS[0].address,), None, 1_000) for i in range(1000)]
    many = plan_epoch(3, tiny, TOK, 0)
    assert one.payments == many.payments == 1_000_000
    assert one.emission == many.emission
    assert 0 <= one.minted - many.minted <= 1000
