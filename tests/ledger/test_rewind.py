"""A coordinator-signed Rewind (issue 12: the job goes on after a fraud), on SQLite and PostgreSQL.

The attacks: a job that trains steps again must not pay for the superseded steps (a coordinator
charging a superseded interval is refused), nor be blocked by them (today's rule, receipts tiling
each rank from 0 for ever, refused every receipt after a refused one); a worker cannot go on
from a superseded receipt; nobody but the coordinator rewinds a job; the audit replays the
same rules over what is stored.
"""

from __future__ import annotations

import pytest
from eth_account import Account

from gpucoin.exceptions import ConflictError, ReceiptOutOfOrder, Unauthorized, UnknownParty
from gpucoin.ledger import Ledger
from tests.ledger.helpers import (
    CONSUMER,
    GPC,
    VERIFIER,
    WORKER,
    WORKER2,
    Market,
    bonded,
    raw_sql,
    tamper,
)

REPLACEMENT = Account.from_key(b"\x09" * 32)
STAKE = 500 * GPC


def _caught(ledger: Ledger):
    """Ranks 0 (WORKER) and 1 (WORKER2) trained 0-10, 10-20 and 20-30; 0-10 was charged; in
    10-20 the verifier failed rank 1, which was slashed, and rank 0 was paid."""
    m = Market(ledger)
    m.fund(CONSUMER, 100 * GPC)
    for i, who in enumerate((WORKER, WORKER2, VERIFIER, REPLACEMENT)):
        m.fund(who, STAKE)
        m.register(who, STAKE, node=f"n{i}")
    m.escrow(50 * GPC, workers=2)
    m.assign(0, WORKER, node="n0")
    m.assign(1, WORKER2, node="n1")
    first = m.receipts(0, [WORKER, WORKER2])
    m.charge(first, GPC)
    failed = m.receipts(10, [WORKER, WORKER2], previous=first)
    reports = m.reports(failed[:1], "pass") + m.reports(failed[1:], "fail")
    m.slash(reports[1])
    m.charge(failed, GPC, reports=reports)
    trained_meanwhile = m.receipts(20, [WORKER, WORKER2], previous=failed)
    return m, first, failed, trained_meanwhile


def test_a_rewound_job_trains_the_steps_again_on_a_replacement_and_each_attempt_is_charged_once(
    ledger: Ledger,
) -> None:
    m, first, failed, meanwhile = _caught(ledger)
    assert ledger.balance(bonded(WORKER2)) < STAKE
    m.rewind(10)
    with pytest.raises(Unauthorized, match="superseded the interval"):
        m.charge(meanwhile, GPC)
    with pytest.raises(ConflictError, match="has receipts up to step 10"):
        m.assign(1, REPLACEMENT, node="n3", start=20)
    with pytest.raises(UnknownParty, match=f"assigned to {WORKER2.address}"):  # not yet replaced
        m.receipts(10, [WORKER, REPLACEMENT], previous=first)
    m.assign(1, REPLACEMENT, node="n3", start=10)
    again = m.receipts(10, [WORKER, REPLACEMENT], previous=first)
    m.charge(again, GPC)  # the steps of the failed interval, trained again, in a new attempt
    with pytest.raises(Unauthorized, match="already charged"):
        m.charge(again, GPC)

    reopened = Ledger(ledger.url)  # what the rules read now comes from the tables only
    try:
        with pytest.raises(ReceiptOutOfOrder, match="the next must start at step 20|is not job"):
            reopened.record_message(m.s.receipt(30, previous=meanwhile[0].digest, who=WORKER))
        reopened.record_messages(
            [m.s.receipt(20, previous=again[i].digest, who=who, rank=i) for i, who in enumerate((WORKER, REPLACEMENT))]
        )
        assert reopened.audit() == []
    finally:
        reopened.close()
    rows = raw_sql(ledger, "SELECT step_start, attempt FROM work_receipt WHERE rank = 1 ORDER BY step_start, attempt")
    assert [tuple(r) for r in rows] == [(0, 0), (10, 0), (10, 1), (20, 0), (20, 1)]
    assert [tuple(r) for r in raw_sql(ledger, "SELECT job_id, attempt, to_step FROM rewind")] == [("job-1", 1, 10)]
    charged = raw_sql(ledger, "SELECT step_start, attempt FROM interval_charge ORDER BY step_start, attempt")
    assert [tuple(r) for r in charged] == [(0, 0), (10, 0), (10, 1)]


def test_only_the_coordinator_rewinds_and_only_to_where_every_ranks_receipts_end(ledger: Ledger) -> None:
    m, first, failed, meanwhile = _caught(ledger)
    with pytest.raises(UnknownParty, match="not by this market's coordinator"):
        ledger.record_message(m.s.rewind(10, signer=WORKER))
    with pytest.raises(ConflictError, match="rank 0 has no live receipt ending at step 15"):
        ledger.record_message(m.s.rewind(15))
    with pytest.raises(ConflictError, match="supersedes nothing"):
        ledger.record_message(m.s.rewind(30))
    with pytest.raises(UnknownParty, match="no JobOrder for job 'job-2'"):
        ledger.record_message(m.s.rewind(10, job="job-2"))
    assert ledger.messages("Rewind") == []
    m.rewind(0)  # back to the start: every receipt superseded, the ranks start again from step 0
    with pytest.raises(ConflictError, match="no live receipt ending at step 10"):
        ledger.record_message(m.s.rewind(10))
    ledger.record_messages([m.s.receipt(0, who=WORKER), m.s.receipt(0, who=WORKER2, rank=1)])
    assert ledger.audit() == []


def test_the_audit_catches_a_rewind_or_an_attempt_changed_behind_the_ledgers_back(ledger: Ledger) -> None:
    m, *_ = _caught(ledger)
    m.rewind(10)
    tamper(ledger, "UPDATE rewind SET to_step = 20")
    tamper(ledger, "UPDATE work_receipt SET attempt = 1 WHERE step_start = 0")
    problems = ledger.audit()
    assert any(p.startswith("rewind ") and "stored" in p for p in problems), problems
    assert any(p.startswith("work_receipt ") and "attempt 1" in p for p in problems), problems
