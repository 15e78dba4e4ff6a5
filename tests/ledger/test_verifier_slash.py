"""Verifiers are checked too (issue 12): a report a second verifier's re-check shows false slashes
its verifier, on SQLite and PostgreSQL, under the ledger's own rules (``verify.recheck``), and the
audit replays the same rule.

The attack each test stands for: a lazy verifier signs "pass" on a cheater's receipt without
replaying; a re-check that fails the receipt afterwards takes its bond. A verifier that frames a
worker does not get the honest re-checker that passes after it slashed (its fail still convicts
the worker, as any fail does: a third verifier's tie-break is not built).
"""

from __future__ import annotations

import pytest
from eth_account import Account

from gpucoin.exceptions import Unauthorized
from gpucoin.ledger import Ledger
from tests.ledger.helpers import (
    BURNED,
    CONSUMER,
    GPC,
    UNVETTED,
    VERIFIER,
    WORKER,
    WORKER2,
    Market,
    avail,
    bonded,
)

VERIFIER2 = Account.from_key(b"\x07" * 32)
VERIFIER3 = Account.from_key(b"\x08" * 32)
STAKE = 500 * GPC


def _interval(ledger: Ledger, package: str | None = None):
    """Two ranks (WORKER, WORKER2) trained steps 0-10 of a job; three verifiers are bonded."""
    m = Market(ledger)
    m.fund(CONSUMER, 100 * GPC)
    for i, who in enumerate((WORKER, WORKER2, VERIFIER, VERIFIER2, VERIFIER3)):
        m.fund(who, STAKE)
        m.register(who, STAKE, node=f"n{i}")
    m.escrow(50 * GPC, workers=2, **({"package": package} if package else {}))
    m.assign(0, WORKER, node="n0")
    m.assign(1, WORKER2, node="n1")
    return m, m.receipts(0, [WORKER, WORKER2])


def test_a_lazy_pass_on_a_cheaters_receipt_is_shown_false_and_slashes_its_verifier(ledger: Ledger) -> None:
    m, receipts = _interval(ledger)
    lazy = m.reports(receipts, "pass", VERIFIER)  # signed without replaying
    agrees = m.reports(receipts[1:], "pass", VERIFIER2)
    # nothing shows the pass false yet: a Settlement of it that pays nothing slashes nobody
    with pytest.raises(Unauthorized, match="slashes nobody"):
        m.slash_verifier(lazy[0], agrees[0])
    recheck = m.reports(receipts[:1], "fail", VERIFIER2) + agrees
    before = {a.address: ledger.balance(bonded(a)) for a in (VERIFIER, VERIFIER2)}
    avail2 = ledger.balance(avail(VERIFIER2))
    m.slash_verifier(lazy[0], recheck[0])
    # the local policy takes half the bond; the whistleblower share goes to the verifier that failed it
    taken = before[VERIFIER.address] - ledger.balance(bonded(VERIFIER))
    assert taken == STAKE // 2 and ledger.balance(bonded(VERIFIER2)) == before[VERIFIER2.address]
    whistle = ledger.balance(avail(VERIFIER2)) - avail2
    assert whistle == taken * m.policy.slashing.whistleblower_share_bps // 10_000 > 0
    # once per false report; the lazy pass of the honest rank's receipt is not shown false
    with pytest.raises(Unauthorized, match="already slashed"):
        m.slash_verifier(lazy[0], recheck[0])
    with pytest.raises(Unauthorized, match="slashes nobody"):
        m.slash_verifier(lazy[1], recheck[1])
    # the cheater is slashed on the re-check's fail, the honest rank paid on its pass
    m.slash(recheck[0])
    assert ledger.balance(bonded(WORKER)) == STAKE // 2
    m.charge(receipts, 10 * GPC, reports=recheck[1:])
    assert ledger.balance(BURNED) > 0 and ledger.audit() == []
    # a verifier's proven fraud counts toward its ban as a worker's does
    assert ledger.proven_frauds([VERIFIER.address, VERIFIER2.address, WORKER.address]) == {
        VERIFIER.address: 1,
        VERIFIER2.address: 0,
        WORKER.address: 1,
    }


def test_a_pass_recorded_after_a_fail_is_not_shown_false_and_a_fail_is_never_a_verifiers_slash(
    ledger: Ledger,
) -> None:
    """What a Settlement of a pass does is told by its amounts: a charge pays, a verifier's slash
    pays nothing; only a fail recorded after a pass shows it false."""
    m, receipts = _interval(ledger)
    framing = m.reports(receipts[:1], "fail", VERIFIER)
    honest = m.reports(receipts, "pass", VERIFIER2)  # the re-check, after the framing fail
    with pytest.raises(Unauthorized, match="slashes nobody"):
        m.slash_verifier(honest[0], framing[0])
    with pytest.raises(
        Unauthorized, match=r"authorizes \[slash .* -> system:burned"
    ):  # the worker's stake, not its verifier's
        m.slash_verifier(framing[0], honest[0])
    m.charge(receipts, 10 * GPC, reports=honest[1:])  # the coordinator decides whose reports it settles on
    assert ledger.balance(bonded(VERIFIER2)) == ledger.balance(bonded(VERIFIER)) == STAKE
    assert ledger.audit() == []


def test_in_a_job_of_an_unvetted_package_no_report_is_shown_false(ledger: Ledger) -> None:
    m, receipts = _interval(ledger, package=UNVETTED)
    lazy = m.reports(receipts, "pass", VERIFIER)
    fail = m.reports(receipts[:1], "fail", VERIFIER2)  # counts as void: the job's code may replay differently
    with pytest.raises(Unauthorized, match="slashes nobody"):
        m.slash_verifier(lazy[0], fail[0])
    assert ledger.balance(bonded(VERIFIER)) == STAKE and ledger.audit() == []
