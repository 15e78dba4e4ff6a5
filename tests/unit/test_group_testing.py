"""The group-testing rule (``verify.group_testing``): who of a void interval's nodes fed another
gradient, found by re-running the interval on new groups; simulated here without Ray."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpucoin.verify.group_testing import (
    Group,
    GroupOutcome,
    GroupTest,
    false_accusation_bound,
    plan_round,
    record,
    rounds_needed,
)


def run(test: GroupTest, free, cheats) -> GroupTest:
    """Play the test to its end: a group diverges iff ``cheats(node, round)`` for a node in it;
    ``free``: the free nodes, or a function of the round giving them."""
    for rnd in range(100):
        groups = plan_round(test, free(rnd) if callable(free) else free)
        if not groups:
            return test
        test = record(
            test,
            [
                (g, GroupOutcome.DIVERGED if any(cheats(n, rnd) for n in g.nodes) else GroupOutcome.CLEAN)
                for g in groups
            ],
        )
    raise AssertionError("the test did not end")


def fillers(n: int) -> list[str]:
    return [f"f{i:03d}" for i in range(n)]


def test_two_ranks_with_room_name_the_cheater_in_two_rounds() -> None:
    test = run(GroupTest(("a", "b")), fillers(10), lambda n, _: n == "b")
    assert test.named() == "b" and len(test.history) == 2
    first = test.history[0]
    assert {g.suspects for g, _ in first} == {("a",), ("b",)}  # split: one group each
    assert test.cleared() == {"a"}
    b_fillers = [g.fillers for rnd in test.history for g, _ in rnd if g.suspects == ("b",)]
    assert len(set(b_fillers)) == 2  # never the same filler twice with b


def test_a_cheater_that_behaves_while_tested_is_cleared_and_nobody_is_named() -> None:
    test = run(GroupTest(("a", "b")), fillers(10), lambda n, _: False)
    assert test.named() is None and test.remaining() == () and test.done()


def test_with_room_for_one_group_half_the_suspects_are_tested() -> None:
    test = GroupTest(("a", "b", "c", "d"))
    groups = plan_round(test, fillers(2))
    assert [g.suspects for g in groups] == [("a", "b")] and len(groups[0].fillers) == 2
    for bad in "abcd":  # 3 free nodes a round, other ones each round: one group at a time
        done = run(test, lambda rnd: [f"r{rnd}-{i}" for i in range(3)], lambda n, _, b=bad: n == b)
        assert done.named() == bad and len(done.history) <= rounds_needed(4, 2)
        assert all(len(rnd) == 1 for rnd in done.history)


def test_too_few_fillers_waits() -> None:
    test = GroupTest(("a", "b", "c"))
    assert plan_round(test, fillers(1)) == [Group(("a", "b"), ("f000",))]  # half of 3, rounded up, + 1
    assert plan_round(test, []) == []
    assert plan_round(test, ["a", "b", "c"]) == []  # suspects are never fillers
    solo = record(GroupTest(("a", "b")), [(Group(("a",), ("x",)), GroupOutcome.DIVERGED)])
    assert plan_round(solo, ["x"]) == []  # a alone again, but only with a filler it sat alone with


def test_record_refuses_malformed_rounds() -> None:
    test = GroupTest(("a", "b"))
    with pytest.raises(ValueError, match="distinct"):
        record(test, [(Group(("a",), ("a",)), GroupOutcome.CLEAN)])
    with pytest.raises(ValueError, match="fillers none"):
        record(test, [(Group(("a",), ("b",)), GroupOutcome.CLEAN)])
    with pytest.raises(ValueError, match="shares nodes"):
        record(test, [(Group(("a",), ("x",)), GroupOutcome.CLEAN), (Group(("b",), ("x",)), GroupOutcome.CLEAN)])
    with pytest.raises(ValueError, match="at least one"):
        record(test, [])
    solo = record(test, [(Group(("a",), ("x",)), GroupOutcome.DIVERGED)])
    with pytest.raises(ValueError, match="sat alone with"):  # the same filler cannot confirm a twice
        record(solo, [(Group(("a",), ("x",)), GroupOutcome.DIVERGED)])
    assert record(solo, [(Group(("a", "b"), ()), GroupOutcome.DIVERGED)]).history[-1][0][1] == GroupOutcome.DIVERGED
    cleared = record(test, [(Group(("a",), ("x",)), GroupOutcome.CLEAN)])
    with pytest.raises(ValueError, match="uncleared"):
        record(cleared, [(Group(("a",), ("y",)), GroupOutcome.DIVERGED)])
    with pytest.raises(ValueError, match="2 or more"):
        GroupTest(("a",))
    with pytest.raises(ValueError, match="below"):
        GroupTest(("a", "b"), max_rounds=1)


@pytest.mark.parametrize(("world", "confirmations", "q", "bound"), [(2, 2, 0.05, 0.0025), (2, 3, 0.05, 0.000125)])
def test_false_accusation_bound(world, confirmations, q, bound) -> None:
    assert false_accusation_bound(world, confirmations, q) == pytest.approx(bound)
    assert false_accusation_bound(world, confirmations, 0.0) == 0.0


@settings(max_examples=300, deadline=None)
@given(
    world=st.integers(2, 8),
    cheater=st.integers(0, 7),
    spare=st.integers(0, 40),
    confirmations=st.integers(1, 3),
    order=st.randoms(use_true_random=False),
)
def test_a_persistent_cheater_is_named_within_the_bound_and_nobody_else_ever(
    world, cheater, spare, confirmations, order
) -> None:
    suspects = tuple(f"s{i}" for i in range(world))
    bad = suspects[cheater % world]
    free = fillers(spare + confirmations * (world - 1))  # enough fresh fillers for the confirmations
    order.shuffle(free)
    test = run(GroupTest(suspects, confirmations), free, lambda n, _: n == bad)
    assert test.named() == bad
    assert len(test.history) <= rounds_needed(world, confirmations)
    for rnd in test.history:
        nodes = [n for g, _ in rnd for n in g.nodes]
        assert len(nodes) == len(set(nodes))  # no node in two groups of a round
        for g, _ in rnd:
            assert len(g.nodes) == world and not set(g.fillers) & set(suspects)
    for s in suspects:  # a suspect never sits alone with the same filler twice
        seen = [f for rnd in test.history for g, _ in rnd if g.suspects == (s,) for f in g.fillers]
        assert len(seen) == len(set(seen))


@settings(max_examples=300, deadline=None)
@given(
    world=st.integers(2, 6),
    spare=st.integers(0, 30),
    cheating_fillers=st.sets(st.integers(0, 40), max_size=3),
    confirmations=st.integers(1, 3),
)
def test_honest_suspects_are_named_only_through_distinct_cheating_fillers(
    world, spare, cheating_fillers, confirmations
) -> None:
    """No suspect cheats; some fillers do. Whoever is named sat alone with a cheating filler in
    each of its confirming groups, every time a different one: the case the bound counts."""
    suspects = tuple(f"s{i}" for i in range(world))
    free = fillers(spare + world)
    bad = {free[i] for i in cheating_fillers if i < len(free)}
    test = run(GroupTest(suspects, confirmations), free, lambda n, _: n in bad)
    named = test.named()
    if not bad:
        assert named is None
    if named is not None:
        solo = [g for rnd in test.history for g, out in rnd if g.suspects == (named,)][-confirmations:]
        culprits = [set(g.fillers) & bad for g in solo]
        assert all(culprits) and len(set().union(*culprits)) >= 1
        assert len({f for g in solo for f in g.fillers}) == confirmations * (world - 1)
