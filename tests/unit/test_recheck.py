"""The re-check rule (``verify.recheck``): which report on a receipt is shown false, pure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpucoin.verify.recheck import Opinion, is_rechecked, shown_false_by

WORKER = "0xW"


def op(verifier: str, verdict: str) -> Opinion:
    return Opinion(f"{verifier}-{verdict}", verifier, verdict)


def test_a_pass_is_shown_false_by_another_verifiers_later_fail_and_nothing_else_is() -> None:
    lazy, recheck, third = op("A", "pass"), op("B", "fail"), op("C", "fail")
    assert shown_false_by(lazy, [lazy, recheck, third], WORKER) == (recheck, third)
    assert shown_false_by(recheck, [lazy, recheck], WORKER) == ()  # a fail is never shown false here
    void = op("C", "void")
    assert shown_false_by(void, [lazy, recheck, void], WORKER) == ()
    passes = [lazy, op("B", "pass"), op("C", "void")]
    assert shown_false_by(lazy, passes, WORKER) == ()


def test_a_fail_recorded_before_a_pass_does_not_show_it_false() -> None:
    """A framing first verifier's fail does not get the honest re-checker that passed after it slashed."""
    frame, honest = op("A", "fail"), op("B", "pass")
    assert shown_false_by(honest, [frame, honest], WORKER) == ()


def test_the_workers_own_reports_and_a_verifiers_own_fail_show_nothing() -> None:
    a_pass = op("A", "pass")
    assert shown_false_by(a_pass, [a_pass, op(WORKER, "fail")], WORKER) == ()
    own = op(WORKER, "pass")
    assert shown_false_by(own, [own, op("A", "fail")], WORKER) == ()
    assert shown_false_by(a_pass, [a_pass, op("A", "fail")], WORKER) == ()  # it contradicts itself


def test_a_report_is_judged_against_a_list_that_holds_it() -> None:
    with pytest.raises(ValueError, match="not among"):
        shown_false_by(op("A", "pass"), [op("B", "fail")], WORKER)


opinions = st.lists(
    st.builds(op, st.sampled_from(["A", "B", "C", WORKER]), st.sampled_from(["pass", "fail", "void"])),
    max_size=8,
    unique_by=lambda o: o.digest,
)


@given(opinions, opinions)
def test_what_is_shown_false_stays_so_whatever_is_recorded_later(ops, later) -> None:
    """Monotone: the audit replays a slash against what was recorded by then, and later reports
    never take back what it showed."""
    more = ops + [o for o in later if o.digest not in {x.digest for x in ops}]
    for o in ops:
        assert set(shown_false_by(o, ops, WORKER)) <= set(shown_false_by(o, more, WORKER))


@given(opinions)
def test_a_report_is_only_ever_shown_false_by_fails_recorded_after_it(ops) -> None:
    for i, o in enumerate(ops):
        for by in shown_false_by(o, ops, WORKER):
            assert by.verdict == "fail" and by.verifier not in (o.verifier, WORKER) and by in ops[i + 1 :]


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
