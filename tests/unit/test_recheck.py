"""The re-check rule (``verify.recheck``): which report on a receipt is shown false, pure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpucoin.verify.recheck import Opinion, is_rechecked, shown_false_by

WORKER = "0xW"


def op(verifier: str, verdict: str) -> Opinion:
    return Opinion(f"{verifier}-{verdict}", verifier, verdict)


def test_a_pass_is_shown_false_by_another_verifiers_fail_and_nothing_else_is() -> None:
    lazy, recheck, third = op("A", "pass"), op("B", "fail"), op("C", "fail")
    assert shown_false_by(lazy, [lazy, recheck, third], WORKER) == (recheck, third)
    assert shown_false_by(recheck, [lazy, recheck], WORKER) == ()  # a fail is never shown false here
    assert shown_false_by(op("C", "void"), [lazy, recheck], WORKER) == ()
    assert shown_false_by(lazy, [lazy, op("B", "pass"), op("C", "void")], WORKER) == ()


def test_the_workers_own_reports_and_a_verifiers_own_fail_show_nothing() -> None:
    own = op(WORKER, "fail")
    assert shown_false_by(op("A", "pass"), [own], WORKER) == ()
    assert shown_false_by(op(WORKER, "pass"), [op("A", "fail")], WORKER) == ()
    assert shown_false_by(op("A", "pass"), [op("A", "fail")], WORKER) == ()  # it contradicts itself: its fail counts


opinions = st.lists(
    st.builds(op, st.sampled_from(["A", "B", "C", WORKER]), st.sampled_from(["pass", "fail", "void"])), max_size=8
)


@given(opinions, opinions, st.randoms())
def test_what_is_shown_false_stays_so_whatever_comes_later_and_in_any_order(ops, later, rnd) -> None:
    """Monotone: the audit replays a slash against what was recorded by then, and later reports
    never take back what it showed."""
    shuffled = list(ops)
    rnd.shuffle(shuffled)
    for o in ops:
        now = set(shown_false_by(o, ops, WORKER))
        assert now == set(shown_false_by(o, shuffled, WORKER))
        assert now <= set(shown_false_by(o, ops + later, WORKER))


@given(opinions)
def test_the_reports_not_shown_false_never_disagree(ops) -> None:
    """No pass and fail of two verifiers both stand on one receipt: a consistent verdict is left."""
    standing = {(o.verifier, o.verdict) for o in ops if o.verifier != WORKER and not shown_false_by(o, ops, WORKER)}
    fails = {v for v, x in standing if x == "fail"}
    assert all(v in fails for v, x in standing if x == "pass" and fails)


def test_the_recheck_draw_follows_its_share_and_is_not_the_spot_checks_draw() -> None:
    from gpucoin.verify.sampling import is_checked

    secret = b"s" * 32
    draws = [[f"0x{i:064x}"] for i in range(2000)]
    assert not any(is_rechecked(secret, d, 0) for d in draws)
    assert all(is_rechecked(secret, d, 10_000) for d in draws)
    rechecked = [is_rechecked(secret, d, 5000) for d in draws]
    assert 900 < sum(rechecked) < 1100  # 1000 +- 4.5 sigma
    # keyed apart from the spot check: the two draws agree about half the time, not always
    checked = [is_checked(secret, d, 0.5) for d in draws]
    assert 900 < sum(a == b for a, b in zip(rechecked, checked, strict=True)) < 1100
    with pytest.raises(ValueError, match="0-10000"):
        is_rechecked(secret, draws[0], 10_001)
