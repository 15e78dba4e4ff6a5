"""A node's verification record is read from the ledger's signed VerificationReports and lasts
across jobs (``Ledger.verification_records``), and the check probability follows from it
(``verify.sampling.check_probability``), on SQLite and PostgreSQL."""

from __future__ import annotations

from gpucoin.ledger import Ledger
from gpucoin.verify.sampling import VerificationRecord, check_probability
from tests.ledger.helpers import CONSUMER, GPC, POLICY, VERIFIER, WORKER, WORKER2, Market

V = POLICY.verification  # local: 1.0 until 2 passes in a row, then 0.1


def _job(m: Market, job: str, verdicts: list[tuple[str, str]], steps: int = 10) -> None:
    """A job of ranks WORKER, WORKER2 whose intervals get ``verdicts`` (rank 0's, rank 1's) in turn."""
    m.escrow(100 * GPC, job=job, workers=2)
    m.assign(0, WORKER, job, "n1")
    m.assign(1, WORKER2, job, "n2")
    previous = None
    for i, (v0, v1) in enumerate(verdicts):
        rs = m.receipts(i * steps, [WORKER, WORKER2], job=job, previous=previous, steps=steps)
        m.reports([rs[0]], v0)
        m.reports([rs[1]], v1)
        previous = rs


def _probabilities(ledger: Ledger) -> list[float]:
    records = ledger.verification_records([WORKER.address, WORKER2.address])
    return [check_probability(V, records[a]) for a in (WORKER.address, WORKER2.address)]


def test_a_node_never_checked_has_an_empty_record_and_is_checked_as_new(ledger: Ledger) -> None:
    records = ledger.verification_records([WORKER.address, VERIFIER.address])
    assert records == {WORKER.address: VerificationRecord(), VERIFIER.address: VerificationRecord()}
    assert check_probability(V, records[WORKER.address]) == V.new_node_check_probability == 1.0


def test_the_record_lasts_across_jobs_and_a_failure_restarts_the_streak(ledger: Ledger) -> None:
    m = Market(ledger)
    m.fund(CONSUMER, 1000 * GPC)
    m.register(WORKER, node="n1")
    m.register(WORKER2, node="n2")
    _job(m, "job-a", [("pass", "pass")])
    assert _probabilities(ledger) == [1.0, 1.0]  # one pass: still new
    _job(m, "job-b", [("pass", "pass"), ("pass", "pass")])
    records = ledger.verification_records([WORKER.address, WORKER2.address, VERIFIER.address])
    assert records[WORKER.address] == VerificationRecord(passed=3, other=0, clean_streak=3)
    assert records[VERIFIER.address] == VerificationRecord()  # its own reports are not its record as a worker
    assert _probabilities(ledger) == [V.check_probability, V.check_probability]  # established in another job

    _job(m, "job-c", [("pass", "fail"), ("pass", "pass")])
    records = ledger.verification_records([WORKER.address, WORKER2.address])
    assert records[WORKER.address] == VerificationRecord(passed=5, other=0, clean_streak=5)
    assert records[WORKER2.address] == VerificationRecord(passed=4, other=1, clean_streak=1)
    assert _probabilities(ledger) == [V.check_probability, 1.0]  # checked as new again until 2 passes more

    _job(m, "job-d", [("void", "pass")])
    records = ledger.verification_records([WORKER.address, WORKER2.address])
    assert records[WORKER.address] == VerificationRecord(passed=5, other=1, clean_streak=0)  # void: not clean
    assert records[WORKER2.address] == VerificationRecord(passed=5, other=1, clean_streak=2)
    assert _probabilities(ledger) == [1.0, V.check_probability]


def test_a_record_is_never_read_from_what_a_node_says(ledger: Ledger) -> None:
    # Receipts nobody checked count for nothing: a node's record grows only by a verifier's signed pass.
    m = Market(ledger)
    m.fund(CONSUMER, 1000 * GPC)
    m.register(WORKER, node="n1")
    m.escrow(100 * GPC, job="job-x", workers=1)
    m.assign(0, WORKER, "job-x", "n1")
    previous = None
    for i in range(5):
        previous = m.receipts(i * 10, [WORKER], job="job-x", previous=previous)
    assert ledger.verification_records([WORKER.address])[WORKER.address] == VerificationRecord()
    # nor by passes it signs on its own receipts (the ledger admits the messages; they count for nothing)
    m.reports(previous, "pass", verifier=WORKER)
    assert ledger.verification_records([WORKER.address])[WORKER.address] == VerificationRecord()
    m.reports(previous, "pass")
    assert ledger.verification_records([WORKER.address])[WORKER.address] == VerificationRecord(1, 0, 1)
