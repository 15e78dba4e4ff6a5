"""Metering an interval so that stalling raises neither the bill nor anyone's pay (pure, no Ray)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpucoin.coordinator.meter import Meter
from gpucoin.policy.model import MeteringPolicy

POLICY = MeteringPolicy(interval_timeout_s=600, pace_slack_bps=15_000)
K = 10


def run(arrivals_per_interval: list[list[float]], workers: int = 2) -> list[int]:
    """Metered ms of each interval, given each rank's receipt arrival time (s since the launch)."""
    meter = Meter(workers, K, POLICY, 0.0)
    return [meter.close(dict(enumerate(arr)), K) for arr in arrivals_per_interval]


def test_honest_ranks_are_metered_their_common_time() -> None:
    assert run([[30.0, 30.1], [40.0, 40.0], [50.0, 50.2]]) == [30_000, 9_900, 10_000]


def test_a_rank_that_stalls_before_handing_in_raises_no_interval() -> None:
    honest = run([[30.0, 30.0], [40.0, 40.0], [50.0, 50.0], [60.0, 60.0]])
    # rank 1 sleeps 100 s before its receipt of interval 1; rank 0 then waits for it in the next all-reduce
    stalled = run([[30.0, 30.0], [40.0, 140.0], [150.0, 150.0], [160.0, 160.0]])
    assert stalled == honest
    assert sum(stalled) == sum(honest)


def test_a_stall_that_holds_every_rank_is_billed_at_most_the_slack_over_the_best_pace() -> None:
    # every rank is held 100 s in interval 2 (a stall inside a step, or between receipt and all-reduce)
    metered = run([[30.0, 30.0], [40.0, 40.0], [150.0, 150.0], [160.0, 160.0]])
    assert metered == [30_000, 10_000, 15_000, 10_000]


def test_the_first_interval_holds_the_start_up_and_sets_no_pace() -> None:
    metered = run([[60.0, 60.0], [70.0, 70.0]])
    assert metered == [60_000, 10_000]


def test_a_shorter_last_interval_is_capped_for_its_steps() -> None:
    meter = Meter(1, K, POLICY, 0.0)
    meter.close({0: 30.0}, K)
    meter.close({0: 40.0}, K)  # 1 s a step
    assert meter.close({0: 100.0}, 2) == 3_000  # 2 steps at 1.5 s


@given(
    st.lists(st.lists(st.floats(0.5, 100.0), min_size=3, max_size=3), min_size=2, max_size=8),
    st.integers(0, 2),
    st.lists(st.floats(0.0, 1000.0), min_size=8, max_size=8),
)
def test_a_delaying_rank_is_never_metered_above_its_co_workers_own_time(durations, rank, delays) -> None:
    """Three ranks with any honest time per interval; one of them hands in each receipt late.

    Each interval starts when its last receipt before arrived (a collective at its start holds
    every rank until then); a rank's time is from there to its own receipt."""
    t = [0.0, 0.0, 0.0]
    arrivals = []
    for d, delay in zip(durations, delays, strict=False):
        start = max(t)
        t = [start + x + (delay if r == rank else 0.0) for r, x in enumerate(d)]
        arrivals.append(list(t))
    for metered, d in zip(run(arrivals, 3), durations, strict=True):
        assert metered <= round(min(x for r, x in enumerate(d) if r != rank) * 1000)


def test_a_silent_rank_is_overdue_after_the_timeout() -> None:
    meter = Meter(2, K, POLICY, 0.0)
    meter.close({0: 30.0, 1: 31.0}, K)
    assert meter.overdue(600.0, {0, 1}) == []
    assert meter.overdue(631.5, {1}) == [1]
    assert meter.overdue(631.5, {0, 1}) == [0, 1]
    assert meter.overdue(10_000.0, set()) == []


def test_bad_input_is_refused() -> None:
    meter = Meter(2, K, POLICY, 0.0)
    with pytest.raises(ValueError, match="one receipt per rank"):
        meter.close({0: 1.0}, K)
    with pytest.raises(ValueError, match="1..10 steps"):
        meter.close({0: 1.0, 1: 1.0}, 11)
    with pytest.raises(ValueError, match="must be >= 1"):
        Meter(0, K, POLICY, 0.0)
