"""Which volunteers the head may take for a rewound job or a group test, without Ray: the market's
clearing rule (ask <= the job's price, bond >= the policy's minimum) holds for a group test's
fillers as it does for a convicted rank's replacement. A filler bonded below the minimum could
cheat in an honest suspect's solo group for almost nothing at stake; one whose ask is above the
job's price would be paid below what it asked."""

from __future__ import annotations

from types import SimpleNamespace

from gpucoin.head.records import CheckRecord, NodeRole, NodeState, NodeView
from gpucoin.head.scheduler import Scheduler
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy

POLICY = load_policy(SHIPPED_POLICIES_DIR / "local.toml")
MIN_BOND = POLICY.market.min_bond_ugpc
PRICE = 800_000


def _view(i: int, ask: int = PRICE, bond: int = 2 * MIN_BOND, role: NodeRole = NodeRole.VOLUNTEER) -> NodeView:
    return NodeView(
        node_id=f"node{i}",
        provider=f"0x{i:040x}",
        ask_ugpc_per_worker_hour=ask,
        resources="CPU: 1",
        bonded_ugpc=bond,
        state=NodeState.ALIVE,
        role=role,
        registration=f"0x{i:064x}",
        checks=CheckRecord(passed=0, other=0, clean_streak=0, check_probability=1.0),
    )


def _scheduler(views: list[NodeView]) -> Scheduler:
    # the ledger is read for its policy only here; the nodes come from the injected node_views
    return Scheduler(
        SimpleNamespace(policy=POLICY), None, None, None, None, None, lambda: {}, "", node_views=lambda: views
    )


def test_a_group_test_takes_no_filler_the_clearing_rule_would_refuse() -> None:
    views = [
        _view(0),  # a suspect's provider: taken
        _view(1),
        _view(2, ask=PRICE + 1),  # asks more than the job pays
        _view(3, bond=MIN_BOND - 1),  # bonded below the minimum (slashed down)
        _view(4, ask=PRICE),
        _view(5, role=NodeRole.VERIFIER),
    ]
    s = _scheduler(views)
    taken = {views[0].provider}
    fillers = s._free_volunteers("job", PRICE, taken)
    assert fillers == [("node1", views[1].provider), ("node4", views[4].provider)]
    assert s._free_volunteers("job", PRICE, taken, busy_too=True) == fillers
    # the same rule the replacement of a convicted rank goes through
    assert sorted(s._replacements("job", 2, PRICE, taken)) == sorted(fillers)
    assert s._replacements("job", 3, PRICE, taken) is None


def test_a_group_test_takes_no_filler_another_job_holds_or_a_named_provider() -> None:
    views = [_view(i) for i in range(4)]
    s = _scheduler(views)
    s.excluded.add(views[3].provider)

    class Alive:
        @staticmethod
        def is_alive() -> bool:
            return True

    s.runners["other"] = (Alive(), frozenset({"node1"}))
    assert s._free_volunteers("job", PRICE, set()) == [("node0", views[0].provider), ("node2", views[2].provider)]
    assert [n for n, _ in s._free_volunteers("job", PRICE, set(), busy_too=True)] == ["node0", "node1", "node2"]
