"""The head's jobs: their rows in the ledger database and what the API hands the running ones.

``JobTable`` reads and writes ``head_job`` (``ledger.models.HeadJobRow``): a job's state, where
it was placed, its progress and, once it ended, its summary; the money is in the ledger's own
tables. ``JobBoard`` is the in-process side the API and the runners share: each running job's
inbox (``runtime.inbox.JobInbox``), checkpoint store, launch record, drawn replays and log.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from sqlmodel import select

from gpucoin.exceptions import SpecError, UnknownJob
from gpucoin.head.records import (
    EventKind,
    JobEvent,
    JobLaunch,
    JobState,
    JobSummary,
    JobView,
    ReplayAnswer,
    StepProgress,
)
from gpucoin.ledger import db
from gpucoin.ledger.models import HeadJobRow
from gpucoin.runtime.inbox import JobInbox
from gpucoin.spec import JobSpec
from gpucoin.storage import ContentStore

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
"""A job id the head takes: it names directories and Ray submission ids."""

MAX_LOG_LINES = 2000
"""Lines of a job's log the head keeps in memory (all of them go to the job's log file)."""

MAX_JOB_STORE_BYTES = 8 << 30
"""The most bytes one job's ranks may put into its store on the head (8 GiB)."""


def check_job_id(job_id: str) -> str:
    """``job_id`` if the head takes it, else ``SpecError``."""
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise SpecError(
            f"job id {job_id!r}: 1-80 of letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return job_id


class JobTable:
    """``head_job`` rows on the ledger's engine; every call is its own transaction (``ledger.db.session``:
    a write takes SQLite's write lock before it reads, so concurrent runners wait, never fail)."""

    def __init__(self, engine):
        self.engine = engine

    def add(self, job_id: str, consumer: str, spec: JobSpec) -> HeadJobRow:
        """Queue a job whose JobOrder the ledger recorded (idempotent: an existing row is returned)."""
        with db.session(self.engine, write=True) as s:
            row = s.get(HeadJobRow, job_id)
            if row is None:
                row = HeadJobRow(
                    job_id=job_id,
                    state=JobState.QUEUED.value,
                    consumer=consumer,
                    spec_json=spec.model_dump_json(),
                    submitted_ms=int(time.time() * 1000),
                    step=0,
                )
                s.add(row)
                s.flush()
            return row

    def get(self, job_id: str) -> HeadJobRow:
        """The row of ``job_id``; ``UnknownJob`` if there is none."""
        with db.session(self.engine, write=False) as s:
            row = s.get(HeadJobRow, job_id)
        if row is None:
            raise UnknownJob(f"no job {job_id!r} on this head")
        return row

    def all(self, state: JobState | None = None) -> list[HeadJobRow]:
        """Every job (of ``state``), oldest submission first."""
        with db.session(self.engine, write=False) as s:
            q = select(HeadJobRow).order_by(HeadJobRow.submitted_ms, HeadJobRow.job_id)
            if state is not None:
                q = q.where(HeadJobRow.state == state.value)
            return list(s.exec(q))

    def update(self, job_id: str, **values) -> None:
        """Set columns of ``job_id``'s row (``state`` as a ``JobState``; lists as JSON;
        ``summary`` as a ``JobSummary`` or None)."""
        with db.session(self.engine, write=True) as s:  # BEGIN IMMEDIATE on SQLite: no read-then-write race
            row = s.get(HeadJobRow, job_id)
            if row is None:
                raise UnknownJob(f"no job {job_id!r} on this head")
            for k, v in values.items():
                if isinstance(v, JobState):
                    v = v.value
                elif isinstance(v, list):
                    v = json.dumps(v)
                elif isinstance(v, JobSummary):
                    v = v.model_dump_json()
                if k == "summary":
                    k = "summary_json"
                setattr(row, k, v)
            s.add(row)


def job_order(ledger, job_id: str):
    """The signed JobOrder the ledger recorded for ``job_id``; ``UnknownJob`` if none."""
    from gpucoin.head.api import stored_message
    from gpucoin.ledger.models import JobOrderRow

    with db.session(ledger.engine, write=False) as s:
        row = s.get(JobOrderRow, job_id)
    if row is None:
        raise UnknownJob(f"no JobOrder for job {job_id!r}")
    return stored_message(ledger.message(row.digest))


def job_view(row: HeadJobRow) -> JobView:
    """The API's view of a ``head_job`` row."""
    spec = JobSpec.model_validate_json(row.spec_json)
    return JobView(
        job_id=row.job_id,
        consumer=row.consumer,
        state=JobState(row.state),
        workers=spec.workers,
        steps=spec.steps,
        bid_ugpc_per_worker_hour=spec.bid_ugpc_per_worker_hour,
        budget_ugpc=spec.budget_ugpc,
        submitted_ms=row.submitted_ms,
        node_ids=json.loads(row.node_ids) if row.node_ids else [],
        verifier_node=row.verifier_node,
        price_ugpc_per_worker_hour=row.price,
        step=row.step,
        reason=row.reason,
        summary=JobSummary.model_validate_json(row.summary_json) if row.summary_json else None,
        spec=spec.model_dump(mode="json"),
    )


@dataclass
class Replay:
    """One drawn interval's replay: the request (JSON) the verifier reads, the address whose
    signature alone its answer is taken with, and the answer it posts.

    Attributes:
        started_by: the generation of the job's replay worker that fetched the request (None: not
            started yet); a worker that dies is blamed only for the replay it had started.
        cancelled: no longer wanted (its interval was voided): the worker skips it.
    """

    request: dict
    verifier: str
    answer: ReplayAnswer | None = None
    started_by: int | None = None
    cancelled: bool = False


@dataclass
class RunningJob:
    """What the API serves for one running job."""

    inbox: JobInbox
    store: ContentStore
    launch: JobLaunch
    replays: dict[str, Replay] = field(default_factory=dict)
    stored_bytes: int = 0
    cancelled: bool = False


class JobBoard:
    """The running jobs' inboxes, stores, launches and replays, and every job's log, by job id.

    ``root``: the head's jobs directory (``<home>/jobs``); each job's log file is
    ``<root>/<job id>/events.log``. Thread-safe.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.Lock()
        self._running: dict[str, RunningJob] = {}
        self._logs: dict[str, deque[JobEvent]] = {}
        self._seq: dict[str, int] = {}
        self.wake = threading.Event()
        """Set to start a market round now (a new job, a new node, a job that ended)."""

    def job_dir(self, job_id: str) -> Path:
        return self.root / check_job_id(job_id)

    def add_running(self, job_id: str, job: RunningJob) -> None:
        with self._lock:
            self._running[job_id] = job

    def remove_running(self, job_id: str) -> None:
        with self._lock:
            self._running.pop(job_id, None)

    def running(self, job_id: str) -> RunningJob:
        """The running job ``job_id``; ``UnknownJob`` if it is not running here."""
        with self._lock:
            job = self._running.get(job_id)
        if job is None:
            raise UnknownJob(f"job {job_id!r} is not running on this head")
        return job

    def log(
        self, job_id: str, text: str, kind: EventKind = EventKind.NOTE, progress: StepProgress | None = None
    ) -> None:
        """Append a line to the job's log (memory and ``events.log``)."""
        with self._lock:
            seq = self._seq.get(job_id, 0) + 1
            self._seq[job_id] = seq
            ev = JobEvent(seq=seq, time_ms=int(time.time() * 1000), text=str(text)[:2000], kind=kind, progress=progress)
            self._logs.setdefault(job_id, deque(maxlen=MAX_LOG_LINES)).append(ev)
        path = self.job_dir(job_id) / "events.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{ev.time_ms} {ev.text}\n")

    def events(self, job_id: str, after: int = 0) -> list[JobEvent]:
        """The job's log lines with ``seq`` > ``after`` (those still in memory; after a restart
        of the head, the lines its file holds, numbered again from 1)."""
        with self._lock:
            known = job_id in self._logs
            lines = [e for e in self._logs.get(job_id, ()) if e.seq > after]
        if known:
            return lines
        path = self.job_dir(job_id) / "events.log"
        if not path.is_file():
            return []
        out = []
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()[-MAX_LOG_LINES:], 1):
            ms, _, text = line.partition(" ")
            if i > after:
                out.append(JobEvent(seq=i, time_ms=int(ms) if ms.isdigit() else 0, text=text))
        return out
