"""The compute market: one sealed-bid auction round placing jobs on volunteer nodes.

Pure and deterministic (no Ray, no I/O, no clock): the same orders and offers, in any order,
give the same result (SPEC.md, Scheduling). Prices are µGPC per worker-hour.

Rules of a round (``clear``):
  * orders are served by bid (highest first), then submission time (earliest first), then job id;
  * a node is admissible for an order if its ask <= the bid, its bond >= the policy's
    ``min_bond_ugpc`` and its free CPUs >= the order's CPUs per worker;
  * one worker per node (each data-parallel rank on its own volunteer node), chosen cheapest
    ask first, then higher reputation, then seniority (the head passes the order the nodes
    registered in: first come, first placed), then node id; the node ids of a placement are in
    rank order (rank 0 is the cheapest);
  * all-or-nothing (gang): an order gets all its workers or none; nodes a placed order took are
    gone for later orders of the round;
  * the price is the policy's ``clearing``: ``"uniform"`` = the highest ask among the job's
    nodes (no node is paid below its ask, never above the bid); ``"pay_as_bid"`` = the bid.

Preemption (``allow_preemption``) is not done here: a round only places onto free nodes.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

from gpucoin.exceptions import MarketError
from gpucoin.money import MICRO_PER_GPC, check_amount
from gpucoin.policy.model import MarketPolicy


@dataclass(frozen=True)
class Order:
    """A job waiting to be placed.

    Attributes:
        job_id: unique job id.
        bid_ugpc_per_worker_hour: most the consumer pays, µGPC per worker-hour.
        workers: data-parallel ranks wanted (>= 1), one node each.
        cpus_per_worker: logical CPUs (Ray's ``num_cpus``) one rank needs, > 0.
        submitted_at_s: submission time, Unix seconds (earlier wins a tie on bid).

    Raises:
        AmountError: for a bid that is not an int64 of µGPC.
        MarketError: for an empty job id, workers < 1 or cpus_per_worker <= 0.
    """

    job_id: str
    bid_ugpc_per_worker_hour: int
    workers: int
    cpus_per_worker: float
    submitted_at_s: float

    def __post_init__(self) -> None:
        if not isinstance(self.job_id, str) or not self.job_id:
            raise MarketError(f"order needs a job id, got {self.job_id!r}")
        check_amount(self.bid_ugpc_per_worker_hour)
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise MarketError(f"job {self.job_id}: workers must be an int >= 1, got {self.workers!r}")
        if not self.cpus_per_worker > 0:
            raise MarketError(f"job {self.job_id}: cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")


@dataclass(frozen=True)
class Offer:
    """A volunteer node available to the market.

    Attributes:
        node_id: Ray node id (unique).
        provider: address of the wallet that registered the node and bonded for it.
        ask_ugpc_per_worker_hour: least the node accepts, µGPC per worker-hour.
        free_cpus: logical CPUs not in use on the node.
        bond_ugpc: µGPC bonded by the provider for this node.
        reputation: passed spot checks minus penalties; higher wins a tie on ask.
        seniority: lower wins a tie on ask and reputation (the node's place in registration order).

    Raises:
        AmountError: for an ask or bond that is not an int64 of µGPC.
        MarketError: for an empty node id or negative free CPUs.
    """

    node_id: str
    provider: str
    ask_ugpc_per_worker_hour: int
    free_cpus: float
    bond_ugpc: int
    reputation: int = 0
    seniority: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise MarketError(f"offer needs a node id, got {self.node_id!r}")
        check_amount(self.ask_ugpc_per_worker_hour)
        check_amount(self.bond_ugpc)
        if not self.free_cpus >= 0:
            raise MarketError(f"node {self.node_id}: free_cpus must be >= 0, got {self.free_cpus!r}")


@dataclass(frozen=True)
class Placement:
    """An order placed: its ranks' nodes (rank order) and the price it pays, µGPC per worker-hour."""

    job_id: str
    node_ids: tuple[str, ...]
    price_ugpc_per_worker_hour: int


@dataclass(frozen=True)
class ClearingResult:
    """Outcome of one round.

    Attributes:
        placements: the placed orders, in the order they were served (bid order).
        unplaced: job id -> one-line reason naming the numbers, for every order not placed.
    """

    placements: tuple[Placement, ...]
    unplaced: dict[str, str]


def _gpc(ugpc: int) -> str:
    """µGPC as short GPC text: 100_000_000 -> "100", 1_500_000 -> "1.5"."""
    whole, frac = divmod(ugpc, MICRO_PER_GPC)
    return f"{whole}.{frac:06d}".rstrip("0") if frac else str(whole)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _unique(items: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for item in items:
        if item in seen:
            raise MarketError(f"duplicate {what} {item!r} in one clearing round")
        seen.add(item)


def clear(orders: Iterable[Order], offers: Iterable[Offer], market_policy: MarketPolicy) -> ClearingResult:
    """Run one auction round (rules in the module docstring).

    Cost: O(N log N) to sort N offers, then per order a scan of the free nodes with ask <= bid
    until enough are found (a placed order stops early), plus O(N) list deletions per
    placement.

    Args:
        orders: pending jobs; job ids unique.
        offers: free nodes; node ids unique.
        market_policy: ``clearing`` and ``min_bond_ugpc``.

    Returns:
        ClearingResult; an unplaced order's reason counts the nodes by the first rule each
        fails, e.g. "needs 3 workers of 2 CPUs, 1 admissible node of 4 (1 taken by earlier
        orders, 1 ask above the bid of 1.5 GPC/worker-hour, 1 bond below the 100 GPC minimum)".

    Raises:
        MarketError: for a duplicate job id or node id.
    """
    orders = sorted(orders, key=lambda o: (-o.bid_ugpc_per_worker_hour, o.submitted_at_s, o.job_id))
    offers = sorted(offers, key=lambda n: (n.ask_ugpc_per_worker_hour, -n.reputation, n.seniority, n.node_id))
    _unique((o.job_id for o in orders), "job id")
    _unique((n.node_id for n in offers), "node id")
    min_bond = market_policy.min_bond_ugpc

    # Nodes with too small a bond are never admissible; only their asks matter (for reasons).
    low_bond_asks = [n.ask_ugpc_per_worker_hour for n in offers if n.bond_ugpc < min_bond]
    free = [n for n in offers if n.bond_ugpc >= min_bond]  # sorted by (ask, -reputation, node id)
    free_asks = [n.ask_ugpc_per_worker_hour for n in free]
    taken = 0

    placements: list[Placement] = []
    unplaced: dict[str, str] = {}
    for order in orders:
        bid = order.bid_ugpc_per_worker_hour
        within_bid = bisect_right(free_asks, bid)
        chosen: list[int] = []
        for i in range(within_bid):
            if free[i].free_cpus >= order.cpus_per_worker:
                chosen.append(i)
                if len(chosen) == order.workers:
                    break
        if len(chosen) == order.workers:
            nodes = tuple(free[i].node_id for i in chosen)
            ask_max = free[chosen[-1]].ask_ugpc_per_worker_hour
            price = ask_max if market_policy.clearing == "uniform" else bid
            placements.append(Placement(order.job_id, nodes, price))
            for i in reversed(chosen):
                del free[i]
                del free_asks[i]
            taken += len(chosen)
            continue
        above_bid = len(free) - within_bid + (len(low_bond_asks) - bisect_right(low_bond_asks, bid))
        low_bond = bisect_right(low_bond_asks, bid)
        few_cpus = within_bid - len(chosen)
        total = taken + len(free) + len(low_bond_asks)
        parts = [
            (taken, "taken by earlier orders"),
            (above_bid, f"ask above the bid of {_gpc(bid)} GPC/worker-hour"),
            (low_bond, f"bond below the {_gpc(min_bond)} GPC minimum"),
            (few_cpus, f"fewer than {order.cpus_per_worker:g} free CPUs"),
        ]
        detail = ", ".join(f"{n} {text}" for n, text in parts if n)
        unplaced[order.job_id] = (
            f"needs {_plural(order.workers, 'worker')} of {order.cpus_per_worker:g} CPUs, "
            f"{_plural(len(chosen), 'admissible node')} of {total}" + (f" ({detail})" if detail else "")
        )
    return ClearingResult(tuple(placements), unplaced)
