"""The replay draw and the adaptive check probability (``verify.sampling``), without Ray or a ledger."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy
from gpucoin.verify.sampling import VerificationRecord, check_probability, draw, is_checked

V = load_policy(SHIPPED_POLICIES_DIR / "local.toml").verification  # 1.0 until 2 passes in a row, then 0.1


def test_a_new_node_is_checked_until_its_clean_streak_reaches_the_policy_count() -> None:
    assert check_probability(V, VerificationRecord()) == 1.0
    assert check_probability(V, VerificationRecord(passed=1, clean_streak=1)) == 1.0
    assert check_probability(V, VerificationRecord(passed=2, clean_streak=2)) == 0.1
    assert check_probability(V, VerificationRecord(passed=500, clean_streak=500)) == 0.1
    # 500 passes, then a failure: checked as new again, however long its history
    assert check_probability(V, VerificationRecord(passed=500, other=1, clean_streak=0)) == 1.0
    assert check_probability(V, VerificationRecord(passed=501, other=1, clean_streak=1)) == 1.0


@given(
    passed=st.integers(0, 10**6),
    other=st.integers(0, 10**6),
    streak=st.integers(0, 10**6),
    floor=st.floats(0.0, 1.0),
    new=st.floats(0.0, 1.0),
    intervals=st.integers(0, 100),
)
def test_the_probability_is_never_below_the_floor_and_never_above_the_new_node_rate(
    passed: int, other: int, streak: int, floor: float, new: float, intervals: int
) -> None:
    floor, new = min(floor, new), max(floor, new)
    v = V.model_copy(
        update={"check_probability": floor, "new_node_check_probability": new, "new_node_intervals": intervals}
    )
    record = VerificationRecord(passed=passed + streak, other=other, clean_streak=streak)
    p = check_probability(v, record)
    assert floor <= p <= new
    assert p == (new if streak < intervals else floor)


@pytest.mark.parametrize(
    ("passed", "other", "streak"),
    [(-1, 0, 0), (0, -1, 0), (1, 0, 2), (0, 0, -1)],
    ids=["passed", "other", "long", "neg"],
)
def test_an_impossible_record_is_refused(passed: int, other: int, streak: int) -> None:
    with pytest.raises(ValueError, match="not a verification record"):
        VerificationRecord(passed=passed, other=other, clean_streak=streak)


def test_the_draw_is_fixed_by_the_secret_and_the_receipts() -> None:
    secret, digests = b"s" * 32, ["0x" + "01" * 32, "0x" + "02" * 32]
    d = draw(secret, digests)
    assert 0.0 <= d < 1.0 and d == draw(secret, digests)
    assert d != draw(b"t" * 32, digests) and d != draw(secret, digests[::-1])
    assert is_checked(secret, digests, 1.0) and not is_checked(secret, digests, 0.0)
    with pytest.raises(ValueError, match="16 bytes"):
        draw(b"short", digests)
