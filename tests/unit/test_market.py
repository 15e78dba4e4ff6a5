"""The auction round: admissibility, gang placement, tie-breaks, prices, reasons, determinism."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpucoin.exceptions import AmountError, MarketError
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, MarketPolicy, load_policy
from gpucoin.scheduler.market import ClearingResult, Offer, Order, Placement, clear

UNIFORM: MarketPolicy = load_policy(SHIPPED_POLICIES_DIR / "default.toml").market
PAY_AS_BID = UNIFORM.model_copy(update={"clearing": "pay_as_bid"})
MIN_BOND = UNIFORM.min_bond_ugpc  # 100 GPC
GPC = 1_000_000
PROVIDER = "0x" + "11" * 20


def node(node_id: str, ask: int, cpus: float = 4, bond: int = MIN_BOND, reputation: int = 0) -> Offer:
    return Offer(node_id, PROVIDER, ask, cpus, bond, reputation)


def order(job_id: str, bid: int, workers: int = 1, cpus: float = 1, at: float = 0.0) -> Order:
    return Order(job_id, bid, workers, cpus, at)


# --- examples ------------------------------------------------------------------------------


def test_cheapest_nodes_and_uniform_price() -> None:
    offers = [node("a", 3 * GPC), node("b", 1 * GPC), node("c", 2 * GPC), node("d", 5 * GPC)]
    result = clear([order("j", 4 * GPC, workers=2)], offers, UNIFORM)
    assert result == ClearingResult((Placement("j", ("b", "c"), 2 * GPC),), {})
    result = clear([order("j", 4 * GPC, workers=2)], offers, PAY_AS_BID)
    assert result.placements == (Placement("j", ("b", "c"), 4 * GPC),)


def test_ties_on_ask_go_to_higher_reputation_then_node_id() -> None:
    offers = [node("z", GPC, reputation=5), node("b", GPC), node("a", GPC), node("y", GPC, reputation=9)]
    result = clear([order("j", GPC, workers=3)], offers, UNIFORM)
    assert result.placements[0].node_ids == ("y", "z", "a")


def test_higher_bid_served_first_then_earlier_then_job_id() -> None:
    offers = [node("a", GPC), node("b", 2 * GPC)]
    orders = [
        order("late", 3 * GPC, at=20.0),
        order("rich", 5 * GPC, at=30.0),
        order("early", 3 * GPC, at=10.0),
    ]
    result = clear(orders, offers, UNIFORM)
    assert [p.job_id for p in result.placements] == ["rich", "early"]
    assert result.placements[0].node_ids == ("a",) and result.placements[1].node_ids == ("b",)
    assert set(result.unplaced) == {"late"}
    tie = clear([order("b", GPC), order("a", GPC)], [node("n", GPC)], UNIFORM)
    assert tie.placements[0].job_id == "a"


def test_gang_placement_is_all_or_nothing_and_frees_nodes_for_later_orders() -> None:
    offers = [node("a", GPC), node("b", GPC)]
    orders = [order("big", 9 * GPC, workers=3), order("small", GPC, workers=2)]
    result = clear(orders, offers, UNIFORM)
    assert result.placements == (Placement("small", ("a", "b"), GPC),)
    assert result.unplaced["big"].startswith("needs 3 workers of 1 CPUs, 2 admissible nodes of 2")


def test_inadmissible_nodes_are_skipped_and_counted_in_the_reason() -> None:
    offers = [
        node("cheap-no-bond", GPC // 2, bond=MIN_BOND - 1),
        node("too-small", GPC // 2, cpus=1),
        node("ok", GPC),
        node("dear", 3 * GPC),
        node("taken", GPC // 4),
    ]
    orders = [order("first", 10 * GPC, workers=1, cpus=1), order("j", 3 * GPC // 2, workers=3, cpus=2)]
    result = clear(orders, offers, UNIFORM)
    assert result.placements == (Placement("first", ("taken",), GPC // 4),)
    assert result.unplaced == {
        "j": "needs 3 workers of 2 CPUs, 1 admissible node of 5 (1 taken by earlier orders, "
        "1 ask above the bid of 1.5 GPC/worker-hour, 1 bond below the 100 GPC minimum, "
        "1 fewer than 2 free CPUs)"
    }


def test_reason_when_there_are_no_nodes() -> None:
    result = clear([order("j", GPC, workers=1)], [], UNIFORM)
    assert result.unplaced == {"j": "needs 1 worker of 1 CPUs, 0 admissible nodes of 0"}


def test_bad_orders_offers_and_duplicates_are_refused() -> None:
    with pytest.raises(MarketError):
        order("j", GPC, workers=0)
    with pytest.raises(MarketError):
        order("j", GPC, cpus=0)
    with pytest.raises(AmountError):
        order("j", 1.5)  # type: ignore[arg-type]
    with pytest.raises(AmountError):
        node("n", -1)
    with pytest.raises(MarketError):
        clear([order("j", GPC), order("j", 2 * GPC)], [], UNIFORM)
    with pytest.raises(MarketError):
        clear([], [node("n", GPC), node("n", 2 * GPC)], UNIFORM)


# --- properties ----------------------------------------------------------------------------

offers_st = st.lists(
    st.builds(
        Offer,
        node_id=st.text("abcdefgh", min_size=1, max_size=3),
        provider=st.just(PROVIDER),
        ask_ugpc_per_worker_hour=st.integers(min_value=0, max_value=6).map(lambda k: k * GPC // 2),
        free_cpus=st.sampled_from([0, 1, 2, 4, 0.5]),
        bond_ugpc=st.sampled_from([0, MIN_BOND - 1, MIN_BOND, 5 * MIN_BOND]),
        reputation=st.integers(min_value=-2, max_value=3),
    ),
    max_size=14,
    unique_by=lambda o: o.node_id,
)
orders_st = st.lists(
    st.builds(
        Order,
        job_id=st.text("jklmn", min_size=1, max_size=3),
        bid_ugpc_per_worker_hour=st.integers(min_value=0, max_value=6).map(lambda k: k * GPC // 2),
        workers=st.integers(min_value=1, max_value=4),
        cpus_per_worker=st.sampled_from([0.5, 1, 2]),
        submitted_at_s=st.integers(min_value=0, max_value=3).map(float),
    ),
    max_size=8,
    unique_by=lambda o: o.job_id,
)
policies_st = st.sampled_from([UNIFORM, PAY_AS_BID, UNIFORM.model_copy(update={"min_bond_ugpc": 0})])


def reference_clear(orders: list[Order], offers: list[Offer], policy: MarketPolicy) -> list[Placement]:
    """The rules written out the slow, obvious way."""
    used: set[str] = set()
    out = []
    for o in sorted(orders, key=lambda o: (-o.bid_ugpc_per_worker_hour, o.submitted_at_s, o.job_id)):
        fit = [
            n
            for n in sorted(offers, key=lambda n: (n.ask_ugpc_per_worker_hour, -n.reputation, n.node_id))
            if n.node_id not in used
            and n.ask_ugpc_per_worker_hour <= o.bid_ugpc_per_worker_hour
            and n.bond_ugpc >= policy.min_bond_ugpc
            and n.free_cpus >= o.cpus_per_worker
        ][: o.workers]
        if len(fit) == o.workers:
            used.update(n.node_id for n in fit)
            price = fit[-1].ask_ugpc_per_worker_hour if policy.clearing == "uniform" else o.bid_ugpc_per_worker_hour
            out.append(Placement(o.job_id, tuple(n.node_id for n in fit), price))
    return out


@given(orders_st, offers_st, policies_st)
def test_placements_respect_every_rule(orders: list[Order], offers: list[Offer], policy: MarketPolicy) -> None:
    result = clear(orders, offers, policy)
    by_node = {n.node_id: n for n in offers}
    by_job = {o.job_id: o for o in orders}
    used = [nid for p in result.placements for nid in p.node_ids]
    assert len(used) == len(set(used)), "a node was used twice"
    assert {p.job_id for p in result.placements}.isdisjoint(result.unplaced)
    assert {p.job_id for p in result.placements} | set(result.unplaced) == set(by_job)
    for p in result.placements:
        o = by_job[p.job_id]
        assert len(p.node_ids) == o.workers, "not all-or-nothing"
        asks = [by_node[nid].ask_ugpc_per_worker_hour for nid in p.node_ids]
        for nid in p.node_ids:
            n = by_node[nid]
            assert n.ask_ugpc_per_worker_hour <= o.bid_ugpc_per_worker_hour
            assert n.bond_ugpc >= policy.min_bond_ugpc
            assert n.free_cpus >= o.cpus_per_worker
        assert max(asks) <= p.price_ugpc_per_worker_hour <= o.bid_ugpc_per_worker_hour
        if policy.clearing == "uniform":
            assert p.price_ugpc_per_worker_hour == max(asks)
        else:
            assert p.price_ugpc_per_worker_hour == o.bid_ugpc_per_worker_hour
    assert list(result.placements) == reference_clear(orders, offers, policy)


@given(orders_st, offers_st, policies_st, st.randoms())
def test_clearing_is_deterministic_under_permutation(
    orders: list[Order], offers: list[Offer], policy: MarketPolicy, rnd: random.Random
) -> None:
    first = clear(orders, offers, policy)
    orders2, offers2 = list(orders), list(offers)
    rnd.shuffle(orders2)
    rnd.shuffle(offers2)
    assert clear(orders2, offers2, policy) == first


@given(orders_st, offers_st, policies_st)
def test_unplaced_reasons_account_for_every_node(
    orders: list[Order], offers: list[Offer], policy: MarketPolicy
) -> None:
    result = clear(orders, offers, policy)
    by_job = {o.job_id: o for o in orders}
    for job_id, reason in result.unplaced.items():
        o = by_job[job_id]
        head, _, detail = reason.partition(" (")
        words = head.split()
        assert words[1] == str(o.workers)
        admissible, total = int(words[6]), int(words[-1])
        assert admissible < o.workers
        assert total == len(offers)
        counted = sum(int(part.split()[0]) for part in detail.rstrip(")").split(", ")) if detail else 0
        assert admissible + counted == total
