"""The head's rule for a job's replay worker (``head.scheduler.HttpReplays``): one worker per job
runs its drawn replays; a worker that dies is blamed for the one replay it had fetched, the next
generation replays the rest, and the generations are bounded.

Ray's job API is replaced by a recorder of what the head asks of it (``RecordedRayJobs``): what is
tested is the head's bookkeeping, not Ray; the worker itself runs on a cluster in every Ray test
that replays (``tests/integration/test_fraud_and_zero_stages.py``, ``tests/e2e``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from gpucoin.exceptions import VerificationError
from gpucoin.head import scheduler
from gpucoin.head.jobs import JobBoard, RunningJob
from gpucoin.head.records import JobLaunch, ReplayAnswer
from gpucoin.head.scheduler import HttpReplays
from gpucoin.runtime.inbox import InboxConfig, JobInbox
from gpucoin.storage import ContentStore
from gpucoin.wallet.messages import Domain

VERIFIER = "0x" + "11" * 20


@dataclass
class RecordedRayJobs:
    """The calls ``HttpReplays`` makes of ``head.rayjobs.RayJobs``, and the status each job is given."""

    submitted: list[tuple[str, list[str]]] = field(default_factory=list)
    status_of: dict[str, str] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)

    def submit(self, submission_id, module_args, node_id, module_dir, env=None) -> None:
        self.submitted.append((submission_id, module_args))
        self.status_of.setdefault(submission_id, "RUNNING")

    def status(self, submission_id):
        return self.status_of.get(submission_id)

    def logs_tail(self, submission_id) -> str:
        return "Traceback (most recent call last):\nMemoryError: the job's code ate the node"

    def stop(self, submission_id) -> None:
        self.stopped.append(submission_id)


@dataclass
class Req:
    """What ``HttpReplays.submit`` reads of a ``ReplayRequest``."""

    step_start: int

    def to_dict(self) -> dict:
        return {"step_start": self.step_start}


@pytest.fixture
def replays(tmp_path, monkeypatch):
    monkeypatch.setattr(scheduler, "STATUS_EVERY_S", 0.0)
    monkeypatch.setattr(scheduler, "REPLAY_POLL_S", 0.01)
    board = JobBoard(tmp_path / "jobs")
    domain = Domain(chain_id=31337, verifying_contract="0x" + "22" * 20).as_dict()
    inbox = JobInbox(InboxConfig("job-1", domain, (VERIFIER,), 4, 8, 8))
    launch = JobLaunch(job_id="job-1", spec={}, node_ids=["n"], assignments=[], buckets=8, data_source="x", api_url="h")
    board.add_running("job-1", RunningJob(inbox=inbox, store=ContentStore(tmp_path / "s"), launch=launch))
    jobs = RecordedRayJobs()
    r = HttpReplays(jobs, board, "job-1", "node-v", VERIFIER, tmp_path / "pkg", "http://127.0.0.1:1")
    return r, jobs, board.running("job-1").replays


def answer(replays, rid: str) -> None:
    replays[rid].answer = ReplayAnswer(verifier=VERIFIER, reports=["{}"], findings=[])


def test_one_worker_per_job_started_with_it_serves_every_replay(replays) -> None:
    r, jobs, board = replays
    r.start()
    a, b = r.submit(Req(0)), r.submit(Req(4))
    assert [sid for sid, _ in jobs.submitted] == ["job-1~replays~1"]
    assert jobs.submitted[0][1] == ["gpucoin.verify.replay_job", "http://127.0.0.1:1", "job-1", "1", VERIFIER]
    assert r.result(a, 0.0) is None  # not answered yet
    answer(board, a)
    answer(board, b)
    assert r.result(a, 0.0).verifier == VERIFIER and r.result(b, 0.0).reports == ("{}",)
    r.stop()
    assert jobs.stopped == ["job-1~replays~1"]


def test_a_dead_worker_fails_only_the_replay_it_took_and_the_next_one_replays_the_rest(replays) -> None:
    r, jobs, board = replays
    r.start()
    taken, waiting = r.submit(Req(0)), r.submit(Req(4))
    board[taken].started_by = 1  # generation 1 fetched it (GET ...?worker=1), then died
    jobs.status_of["job-1~replays~1"] = "FAILED"
    with pytest.raises(VerificationError, match="MemoryError: the job's code ate the node"):
        r.result(taken, 0.0)
    assert r.result(waiting, 0.0) is None  # not blamed: a new worker is started for it
    assert [sid for sid, _ in jobs.submitted] == ["job-1~replays~1", "job-1~replays~2"]
    answer(board, waiting)
    assert r.result(waiting, 0.0) is not None


def test_a_worker_that_ended_idle_is_started_again_by_the_next_draw(replays) -> None:
    r, jobs, board = replays
    r.start()
    jobs.status_of["job-1~replays~1"] = "SUCCEEDED"  # it exited after IDLE_EXIT_S without work
    r.submit(Req(0))
    assert [sid for sid, _ in jobs.submitted] == ["job-1~replays~1", "job-1~replays~2"]


def test_workers_that_keep_dying_are_started_a_bounded_number_of_times(replays) -> None:
    r, jobs, board = replays
    r.start()
    rid = r.submit(Req(0))
    with pytest.raises(VerificationError, match="died"):
        for _ in range(10):
            jobs.status_of[jobs.submitted[-1][0]] = "FAILED"  # each dies before it takes the replay
            r.result(rid, 0.0)
    assert len(jobs.submitted) == 2  # one replay drawn: at most 1 + 1 generations


def test_a_second_verifiers_worker_starts_with_its_first_recheck_and_answers_for_its_own(replays, tmp_path) -> None:
    """The re-checking verifier (``verify.recheck``) has a worker of its own on its node, started
    by the first re-check drawn, under ids and replay ids apart from the first verifier's."""
    r, jobs, board = replays
    second = "0x" + "33" * 20
    recheck = HttpReplays(jobs, r.board, "job-1", "node-w", second, tmp_path / "pkg", "http://127.0.0.1:1", lane=1)
    r.start()
    first = r.submit(Req(0))
    again = recheck.submit(Req(0))
    assert first != again and board[first].verifier == VERIFIER and board[again].verifier == second
    assert [sid for sid, _ in jobs.submitted] == ["job-1~replays~1", "job-1~replays~1-1"]
    assert jobs.submitted[1][1][-1] == second
    board[again].answer = ReplayAnswer(verifier=second, reports=["{}"], findings=[])
    assert recheck.result(again, 0.0).verifier == second and r.result(first, 0.0) is None
    recheck.stop()
    assert jobs.stopped == ["job-1~replays~1-1"]


def test_a_cancelled_replay_is_skipped_not_stopped(replays) -> None:
    r, jobs, board = replays
    r.start()
    rid = r.submit(Req(0))
    r.cancel(rid)
    assert board[rid].cancelled and jobs.stopped == []  # the worker serves the job's other replays


@pytest.mark.parametrize("victim", ["job-1", "a", "shakespeare_char-20261207-044039-49e7"])
def test_no_job_id_a_submitter_may_choose_is_another_jobs_replay_worker(victim) -> None:
    """A job's driver runs as the Ray job named by its id, which its submitter chooses: were a
    worker's id one a job may take, a submitter could take a victim's worker's place (the head
    submits nothing under a taken id), have it stopped with its own job, or be stopped with it."""
    from gpucoin.exceptions import SpecError
    from gpucoin.head.jobs import check_job_id
    from gpucoin.head.scheduler import REPLAY_WORKER_SEP, replay_worker_id

    for generation in (1, 2, 10**6):
        with pytest.raises(SpecError):
            check_job_id(replay_worker_id(victim, generation))
        assert replay_worker_id(victim, generation).startswith(f"{victim}{REPLAY_WORKER_SEP}")
    check_job_id(f"{victim}-replays-1")  # the old scheme: a name anyone could give a job
    assert not f"{victim}-replays-1".startswith(f"{victim}{REPLAY_WORKER_SEP}")
