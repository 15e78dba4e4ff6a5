"""The head's market loop and job runners (in the head service's process, never in Ray).

Every ``ROUND_INTERVAL_S`` seconds, and at once when a job is queued, a node registers or a job
ends, a round:

1. closes every ended epoch (its emission is minted);
2. clears the queue (``scheduler.market.clear``) onto the live, admitted volunteer nodes no
   running job holds: bid order, gang all-or-nothing, the policy's clearing price; an unplaced
   job's row says why it waits;
3. for each placed job, signs one Assignment per rank, opens its inbox and store on the head and
   starts a runner thread, which submits the job's driver as a Ray job pinned to rank 0's node
   (``head.rayjobs``) and runs ``coordinator.run.JobRun`` over the API's inbox: receipts in,
   draws, replays on a verifier node (by the job's replay worker, a Ray job pinned there),
   settlement, then the refund
   of what is left in escrow.

A proven fraud stops the job's ranks; its runner then rewinds it (``_rewind``): what trained
before the fraud is settled, a coordinator-signed Rewind supersedes the receipts from the job's
newest settled step on, the convicted ranks go to free volunteers of other providers chosen by
the same clearing rule (waiting up to ``REPLACEMENT_WAIT_S`` for one), every rank gets a new
Assignment from that step, and the driver is submitted again (``<job>~attempt~<n>``) to train
the superseded steps again from the checkpoint the ranks signed there. A void interval of a
vetted job of several ranks (the evidence names nobody) is group-tested instead
(``_group_test``, ``verify.group_testing``): the interval is re-run on groups of its suspects
and free fillers, each re-run replayed; the node the rule names is excluded from the market for
good (read back from the jobs' summaries on a restart), never slashed; then the job goes on
without it.

A head that restarts finds the jobs its last run left ``running``: their Ray jobs are stopped and
what is left of their escrow is refunded (what was settled stays paid; every receipt stays in the
ledger); orders escrowed but never queued are refunded too.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from gpucoin.coordinator.run import RewindKind
from gpucoin.exceptions import GpucoinError, VerificationError
from gpucoin.head.jobs import JobBoard, JobTable, Replay, RunningJob, job_order
from gpucoin.head.packages import PackageStore
from gpucoin.head.rayjobs import TERMINAL, RayJobs, RayJobTraining
from gpucoin.head.records import (
    CheckRecord,
    EventKind,
    GroupRun,
    GroupTestSummary,
    JobEvaluation,
    JobLaunch,
    JobState,
    JobSummary,
    NodeRole,
    NodeState,
    NodeView,
    RankReplacement,
    ReceiptCounts,
    RewindSummary,
    StepProgress,
)
from gpucoin.runtime.inbox import InboxConfig, JobInbox
from gpucoin.spec import JobSpec
from gpucoin.storage import ContentStore
from gpucoin.verify.judgment import Finding
from gpucoin.verify.verifier import ReplayRequest, ReplayResult

log = logging.getLogger("gpucoin.head")

ROUND_INTERVAL_S = 2.0
"""Longest wait between two market rounds."""

REPLAY_POLL_S = 0.5
"""How often a runner that waits for a replay looks again."""

STATUS_EVERY_S = 5.0
"""How often a runner asks Ray about the job's replay worker or its driver (an HTTP request each)."""

RUNNER_JOIN_S = 10.0
"""How long stopping the service waits for each job runner."""

REPLACEMENT_WAIT_S = 600.0
"""How long a rewound job waits for free volunteers to replace its convicted ranks (or to form a
group test's groups) while other jobs hold them; past it, or at once if no registered volunteer
could ever do, the job ends at its newest settled step."""

ATTEMPT_SEP = "~attempt~"
"""Between a job's id and its attempt in the Ray submission id of a driver launched after a
Rewind (``~``: no job id holds one, see ``REPLAY_WORKER_SEP``)."""


def driver_id(job_id: str, attempt: int) -> str:
    """The Ray submission id of job ``job_id``'s driver in attempt ``attempt`` (0: the job id)."""
    return job_id if attempt == 0 else f"{job_id}{ATTEMPT_SEP}{attempt}"


class LockedCoordinator:
    """A ``coordinator.settle.Coordinator`` whose every method runs under one lock: the API's
    requests and the job runners share its key and nonce source. Attributes pass through."""

    def __init__(self, coord):
        self._coord = coord
        self.lock = threading.RLock()

    def __getattr__(self, name: str):
        value = getattr(self._coord, name)
        if not callable(value):
            return value

        def locked(*args, **kwargs):
            with self.lock:
                return value(*args, **kwargs)

        return locked


PROGRESS_WRITE_S = 2.0
"""Least time between two writes of a running job's step to its row (``gpucoin jobs``): one
database write per training step cost the head's cores, which the ranks share on a small host,
more than the display is worth; the log and the metrics still see every step."""


class BoardUI:
    """``coordinator.job.UI`` for a job on the head: lines go to the job's log, progress to its
    row (at most every ``PROGRESS_WRITE_S``, and the last step) and to the
    ``gpucoin_job_samples_per_second`` gauge (``block_size``: tokens per sample)."""

    def __init__(self, board: JobBoard, table: JobTable, job_id: str, metrics=None, block_size: int = 1):
        self.board, self.table, self.job_id = board, table, job_id
        self.metrics, self.block_size = metrics, block_size
        self.total_steps = 0
        self._written_s = -PROGRESS_WRITE_S

    def status(self, text: str) -> None:
        self.board.log(self.job_id, text, EventKind.STATUS)

    def training_started(self, total_steps: int, first_step: int) -> None:
        self.total_steps = total_steps
        self.board.log(
            self.job_id,
            f"training: steps {first_step}-{total_steps}",
            EventKind.TRAINING_STARTED,
            StepProgress(step=first_step, total_steps=total_steps),
        )

    def step(self, step: int, loss: float, tokens_per_s: float) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        self.board.log(
            self.job_id,
            f"step {step} loss {loss:.4f} {tokens_per_s:,.0f} tok/s",
            EventKind.STEP,
            StepProgress(step=step, total_steps=self.total_steps, loss=loss, tokens_per_s=tokens_per_s),
        )
        now = time.monotonic()
        if now - self._written_s >= PROGRESS_WRITE_S or step >= self.total_steps:
            self._written_s = now
            try:
                self.table.update(self.job_id, step=step)
            except SQLAlchemyError:  # display only: a busy database must not fail the job
                log.warning("job %s: progress not recorded", self.job_id, exc_info=True)
        if self.metrics is not None:
            self.metrics.samples_per_second.labels(self.job_id).set(tokens_per_s / self.block_size)

    def note(self, text: str) -> None:
        self.board.log(self.job_id, text)

    def training_done(self) -> None:
        self.board.log(self.job_id, "training ended", EventKind.TRAINING_DONE)


REPLAY_WORKER_SEP = "~replays~"
"""Between a job's id and its replay worker's generation in the worker's Ray submission id: no job
id holds a ``~`` (``head.jobs.JOB_ID``), so no submitter can name its job (whose driver is
submitted under the job id) as another job's replay worker, take its place or have it stopped."""


def replay_worker_id(job_id: str, generation: int, lane: int = 0) -> str:
    """The Ray submission id of generation ``generation`` of job ``job_id``'s replay worker on its
    verifier (``lane`` 0) or on its re-checking second verifier (``lane`` 1)."""
    return (
        f"{job_id}{REPLAY_WORKER_SEP}{generation}" if lane == 0 else f"{job_id}{REPLAY_WORKER_SEP}{lane}-{generation}"
    )


class HttpReplays:
    """``coordinator.run.Replays`` for the head: the job's drawn intervals are replayed, one at a
    time, by the job's replay worker (``verify.replay_job``), a Ray job on the verifier node that
    reads its requests from, and posts its reports to, the API.

    The worker is started by the job's first drawn replay, not with the job: it imports torch and
    the job's code only for its first replay anyway, and an idle worker would hold a Ray job (its
    supervisor actor, its polls) on the cores the ranks train on until then. It lives as long as
    the job, or until ``verify.replay_job.IDLE_EXIT_S`` without work. One that dies (the job's code
    crashed it, the node went away) is blamed for the replay it had fetched, which fails with its
    last log line (``VerificationError``: the interval is unverifiable, as a replay that could not
    run); the next generation replays the rest, at most ``len(replays) + 1`` generations in all.

    A job re-checked by a second verifier (``verify.recheck``) has a second ``HttpReplays`` of
    ``lane`` 1 on that node, whose worker is only started by its first re-check; each worker
    lists only the replays of its own verifier.
    """

    def __init__(
        self,
        jobs: RayJobs,
        board: JobBoard,
        job_id: str,
        node_id: str,
        verifier: str,
        module_dir: Path,
        api_url: str,
        lane: int = 0,
    ):
        self.jobs, self.board, self.job_id, self.verifier = jobs, board, job_id, verifier
        self.node_id, self.module_dir, self.api_url, self.lane = node_id, module_dir, api_url, lane
        self._n = 0
        self._generation = 0
        self._status: str | None = None
        self._asked_s = -1e9

    def _submission(self, generation: int) -> str:
        return replay_worker_id(self.job_id, generation, self.lane)

    def start(self) -> None:
        """Submit the next generation of the job's replay worker."""
        self._generation += 1
        self._status, self._asked_s = None, -1e9
        self.jobs.submit(
            self._submission(self._generation),
            ["gpucoin.verify.replay_job", self.api_url, self.job_id, str(self._generation), self.verifier],
            self.node_id,
            self.module_dir,
        )

    def stop(self) -> None:
        """Stop the job's replay worker (the job ended; it would exit by itself within ``verify.replay_job.POLL_S``).
        Never raises: the job's settlement comes next."""
        try:
            if self._generation:
                self.jobs.stop(self._submission(self._generation))
        except GpucoinError:
            log.warning("job %s: its replay worker could not be stopped", self.job_id, exc_info=True)

    def _worker_status(self, now: bool = False) -> str | None:
        """Ray's status of the current worker, asked at most every ``STATUS_EVERY_S`` unless ``now``."""
        if self._status not in TERMINAL and (now or time.monotonic() - self._asked_s >= STATUS_EVERY_S):
            self._asked_s = time.monotonic()
            self._status = self.jobs.status(self._submission(self._generation))
        return self._status

    def submit(self, req: ReplayRequest) -> str:
        self._n += 1
        rid = f"{req.step_start}-{self._n}" if self.lane == 0 else f"{req.step_start}-{self.lane}.{self._n}"
        self.board.running(self.job_id).replays[rid] = Replay(request=req.to_dict(), verifier=self.verifier)
        if self._generation == 0 or self._worker_status(now=True) in TERMINAL:
            self._next_worker()
        return rid

    def _next_worker(self) -> None:
        mine = [r for r in self.board.running(self.job_id).replays.values() if r.verifier == self.verifier]
        if self._generation >= len(mine) + 1:
            raise VerificationError(f"the job's replay worker died {self._generation} times")
        self.start()

    def result(self, handle: str, timeout_s: float | None) -> ReplayResult | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            replay = self.board.running(self.job_id).replays[handle]
            status = None
            if replay.answer is None:
                # the answer arrives in memory; Ray is asked now and then, to learn of a worker that died
                status = self._worker_status()
                replay = self.board.running(self.job_id).replays[handle]  # the answer may have come meanwhile
            if replay.answer is not None:
                a = replay.answer
                findings = tuple(
                    Finding.from_dict({**f, "distance": float("inf") if f.get("distance") is None else f["distance"]})
                    for f in a.findings
                )
                return ReplayResult(a.verifier, tuple(a.reports), findings)
            if status in TERMINAL:
                generation = self._generation
                if replay.started_by == generation:
                    lines = [x for x in self.jobs.logs_tail(self._submission(generation)).splitlines() if x.strip()]
                    raise VerificationError(f"the replay worker ended {status}: {lines[-1] if lines else 'no log'}")
                self._next_worker()  # it ended before it took this one: the next generation replays it
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(REPLAY_POLL_S)

    def cancel(self, handle: str) -> None:
        self.board.running(self.job_id).replays[handle].cancelled = True


class Scheduler:
    """The market loop and the job runners of one head service.

    Args:
        ledger / coord: the head's ledger and its (locked) coordinator.
        board / table: the running jobs' in-process state and their database rows.
        packages: uploaded job packages. rayjobs: Ray's job API.
        ray_nodes: reads Ray's nodes by id. api_url: where ranks and verifiers reach the API.
        node_views: ``head.api.node_views`` (the registered nodes with their bond and liveness).
        metrics: ``head.metrics.HeadMetrics`` to observe into, or None.
        job_code_user: the ``cluster.node_user.NodeUser`` the end-of-job evaluation runs the
            job's code as (None: this process's user).
    """

    def __init__(
        self,
        ledger,
        coord,
        board: JobBoard,
        table: JobTable,
        packages: PackageStore,
        rayjobs: RayJobs,
        ray_nodes: Callable[[], Mapping],
        api_url: str,
        node_views: Callable,
        metrics=None,
        job_code_user=None,
    ):
        self.ledger, self.coord, self.board, self.table = ledger, coord, board, table
        self.packages, self.rayjobs, self.ray_nodes, self.api_url = packages, rayjobs, ray_nodes, api_url
        self.node_views = node_views
        self.metrics = metrics
        self.job_code_user = job_code_user
        self.runners: dict[str, tuple[threading.Thread, frozenset[str]]] = {}
        self._placing = threading.Lock()  # a round's placements and a rewind's replacements: one at a time
        self.excluded: set[str] = set()  # providers a group test named (``_group_test``): never placed again
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the loop -------------------------------------------------------------
    def start(self) -> None:
        """Recover what the last run of the service left, then run rounds in a thread."""
        self.excluded |= {
            t.named
            for row in self.table.all()
            if row.summary_json
            for t in JobSummary.model_validate_json(row.summary_json).group_tests
            if t.named
        }
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="market", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the rounds; running jobs' runners are daemon threads and end with the process
        (a restarted head refunds what their escrow holds)."""
        self._stop.set()
        self.board.wake.set()
        if self._thread is not None:
            self._thread.join(RUNNER_JOIN_S)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.round()
            except Exception:  # noqa: BLE001 - one failed round must not end the market
                log.exception("market round failed")
            self.board.wake.wait(ROUND_INTERVAL_S)
            self.board.wake.clear()

    def busy_nodes(self, but: str | None = None) -> set[str]:
        """Nodes a running job (other than ``but``) holds."""
        for job_id, (thread, _) in list(self.runners.items()):
            if not thread.is_alive():
                self.runners.pop(job_id, None)
        return {n for j, (_, nodes) in self.runners.items() if j != but for n in nodes}

    def round(self) -> None:
        """One market round (module docstring)."""
        self.coord.close_epochs()
        with self._placing:
            self._round()

    def _round(self) -> None:
        from gpucoin.scheduler.market import Offer, Order, clear

        queued = self.table.all(JobState.QUEUED)
        if not queued:
            return
        views = [
            v
            for v in self.node_views()
            if v.state == NodeState.ALIVE and not v.banned and v.provider not in self.excluded
        ]
        busy = self.busy_nodes()
        offers = [  # views come in registration order: the earlier node wins a tie
            Offer(v.node_id, v.provider, v.ask_ugpc_per_worker_hour, 1, v.bonded_ugpc, seniority=i)
            for i, v in enumerate(views)
            if v.role == NodeRole.VOLUNTEER and v.node_id not in busy
        ]
        policy = self.ledger.policy
        # verifiers bond like volunteers: a report shown false by a re-check slashes that bond
        verifiers = [v for v in views if v.role == NodeRole.VERIFIER and v.bonded_ugpc >= policy.market.min_bond_ugpc]
        specs = {r.job_id: JobSpec.model_validate_json(r.spec_json) for r in queued}
        orders = [
            Order(r.job_id, specs[r.job_id].bid_ugpc_per_worker_hour, specs[r.job_id].workers, 1, r.submitted_ms / 1000)
            for r in queued
        ]
        t0 = time.perf_counter()
        result = clear(orders, offers, self.ledger.policy.market)
        if self.metrics is not None:
            self.metrics.clearing_seconds.observe(time.perf_counter() - t0)
        provider_of = {o.node_id: o.provider for o in offers}
        for placement in result.placements:
            providers = {provider_of[n] for n in placement.node_ids}
            free = [v for v in verifiers if v.provider not in providers]
            if not free:
                self.table.update(
                    placement.job_id,
                    reason=f"waiting for a verifier node bonded with >= {policy.market.min_bond_ugpc} µGPC that is "
                    "not one of its workers",
                )
                continue
            verifier = free[0]  # the verifier that registered first (``api.node_views``' order)
            # a second verifier, of another provider, re-checks a share of its reports (none: not re-checked)
            second = next((v for v in free if v.provider != verifier.provider), None)
            rechecker = second if policy.verification.recheck_share_bps else None
            self.start_job(placement, specs[placement.job_id], provider_of, verifier, rechecker)
        for job_id, why in result.unplaced.items():
            self.table.update(job_id, reason=why)

    # -- one job --------------------------------------------------------------
    def order_of(self, job_id: str):
        """The JobOrder the ledger recorded for ``job_id``."""
        return job_order(self.ledger, job_id)

    def start_job(self, placement, spec: JobSpec, provider_of: dict[str, str], verifier, rechecker=None) -> None:
        """Assign the ranks, open the job's inbox and store, start its runner."""
        job_id = placement.job_id
        order = self.order_of(job_id)
        job_dir = self.board.job_dir(job_id)
        module_dir = job_dir / "modules" / spec.module
        if not module_dir.is_dir():
            self.packages.materialize(order.message["packageHash"], module_dir)
        node_ids = list(placement.node_ids)
        rank_worker = [provider_of[n] for n in node_ids]
        # a cancel (the API, under the same lock) comes before the placement or after, never between
        with self.coord.lock:
            if self.table.get(job_id).state != JobState.QUEUED.value:
                return
            assignments = [self.coord.assign(job_id, r, rank_worker[r], n).to_json() for r, n in enumerate(node_ids)]
            self._open(job_id, spec, placement, rank_worker, assignments, verifier)
        self.board.log(
            job_id, f"placed on {len(node_ids)} node(s) at {placement.price_ugpc_per_worker_hour} µGPC/worker-hour"
        )
        t = threading.Thread(
            target=self._run_job,
            args=(job_id, spec, order, placement, rank_worker, assignments, verifier, module_dir, rechecker),
            name=f"job-{job_id}",
            daemon=True,
        )
        self.runners[job_id] = (t, frozenset(node_ids))
        t.start()

    def _inbox(self, job_id: str, spec: JobSpec, rank_worker: list[str]) -> JobInbox:
        """A fresh inbox for the job's ranks, rank r signed by ``rank_worker[r]``."""
        return JobInbox(
            InboxConfig(
                job_id=job_id,
                domain=self.coord.domain.as_dict(),
                rank_worker=tuple(rank_worker),
                steps_per_interval=spec.checkpoint_interval_steps,
                buckets=self.ledger.policy.verification.sketch_buckets,
                total_steps=spec.steps,
            )
        )

    def _open(self, job_id, spec, placement, rank_worker, assignments, verifier) -> None:
        """The job's inbox, store and launch on the board; its row ``running``."""
        node_ids = list(placement.node_ids)
        policy = self.ledger.policy
        inbox = self._inbox(job_id, spec, rank_worker)
        launch = JobLaunch(
            job_id=job_id,
            spec=spec.model_dump(mode="json"),
            node_ids=node_ids,
            assignments=assignments,
            buckets=policy.verification.sketch_buckets,
            data_source=spec.data.source,
            api_url=self.api_url,
        )
        store = ContentStore(self.board.job_dir(job_id) / "store")
        self.board.add_running(job_id, RunningJob(inbox=inbox, store=store, launch=launch))
        self.table.update(
            job_id,
            state=JobState.RUNNING,
            node_ids=node_ids,
            verifier_node=verifier.node_id,
            price=placement.price_ugpc_per_worker_hour,
            reason=None,
        )

    def _run_job(
        self, job_id, spec, order, placement, rank_worker, assignments, verifier, module_dir, rechecker=None
    ) -> None:
        """Run a placed job to its end, then refund what is left of its escrow (whatever happened)."""
        from gpucoin.coordinator.run import JobRun

        job, state, reason, evaluating = None, JobState.FAILED, None, None
        driver = driver_id(job_id, 0)
        evaluator = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"evaluate-{job_id}")
        replays = HttpReplays(
            self.rayjobs, self.board, job_id, verifier.node_id, verifier.provider, module_dir, self.api_url
        )
        rechecks = None
        share = self.ledger.policy.verification.recheck_share_bps
        if share and rechecker is None:
            self.board.log(
                job_id,
                f"the policy re-checks {share / 100:g} % of replayed intervals on a second verifier, but no second "
                "bonded verifier node of another provider is free: this job's replays are not re-checked",
            )
        if rechecker is not None:
            rechecks = HttpReplays(
                self.rayjobs, self.board, job_id, rechecker.node_id, rechecker.provider, module_dir, self.api_url, 1
            )
        package = order.message["packageHash"]
        if package not in self.ledger.policy.verification.vetted_packages:
            self.board.log(
                job_id,
                f"the job's package {package[:10]}… is not on the policy's vetted list: a replay mismatch slashes "
                "nobody, the interval is void and its charge to the consumer is burned",
            )
        try:
            running = self.board.running(job_id)
            job = JobRun(
                spec=spec,
                job_id=job_id,
                coord=self.coord,
                inbox=running.inbox,
                rank_worker=rank_worker,
                price_ugpc_per_worker_hour=placement.price_ugpc_per_worker_hour,
                verifier_address=verifier.provider,
                package_hash=package,
                replays=replays,
                store=running.store,
                sketch_dir=self.board.job_dir(job_id) / "sketches",
                data_source=spec.data.source,
                ui=BoardUI(self.board, self.table, job_id, self.metrics, spec.model.block_size),
                assignments=tuple(assignments),
                recheck=rechecks,
                recheck_address=None if rechecker is None else rechecker.provider,
            )
            self.rayjobs.submit(
                job_id, ["gpucoin.runtime.driver", self.api_url, job_id], placement.node_ids[0], module_dir
            )
            training = RayJobTraining(self.rayjobs, job_id)
            while True:
                job.run(training)
                if training.alive():  # a lost rank: the others may wait in a collective forever
                    self.rayjobs.stop(driver)
                if running.cancelled:
                    break
                if (point := job.rewind_point()) is not None:
                    relaunched = self._rewind(job, spec, running, module_dir, verifier, rechecker, *point)
                elif (step := job.group_point()) is not None and not job.group_tests:
                    relaunched = self._group_test(job, spec, running, module_dir, verifier, rechecker, step)
                else:
                    break
                if relaunched is None:
                    break
                driver, training = relaunched
            job.settle_all()
            reason = job.stopped
            if running.cancelled:
                state, reason = JobState.CANCELLED, "cancelled by its consumer"
            elif job.stopped is None and job.last_settled_step() == spec.steps:
                state = JobState.SUCCEEDED
            if not running.cancelled:  # a cancelled job's consumer can still `gpucoin pull` it
                # the nodes are free for the next job, and the checkpoint is evaluated while the
                # job's last epoch ends on the clock (both take seconds; neither needs the other)
                self.runners[job_id] = (threading.current_thread(), frozenset())
                self.board.wake.set()
                evaluating = evaluator.submit(self.evaluate, job, spec, running.store, module_dir)
            job.close_epochs_on_clock()
        except GpucoinError as e:
            reason = " ".join(str(e).split())[:500]
            self.rayjobs.stop(driver)
        except Exception as e:  # noqa: BLE001 - the escrow must be refunded whatever went wrong
            log.exception("job %s failed", job_id)
            reason = f"internal error: {type(e).__name__}: {e}"[:500]
            self.rayjobs.stop(driver)
        finally:
            replays.stop()
            if rechecks is not None:
                rechecks.stop()
            refunded = self.coord.refund(job_id, order)
            evaluation = None if evaluating is None else evaluating.result()  # evaluate() never raises
            evaluator.shutdown()
            summary = None if job is None else _summary(job, refunded, evaluation)
            self.board.log(
                job_id,
                f"{state.value}: settled to step {summary.steps if summary else 0}, refunded {refunded} µGPC"
                + (f" ({reason})" if reason else ""),
            )
            self.table.update(job_id, state=state, reason=reason, summary=summary)
            self.board.remove_running(job_id)
            if self.metrics is not None:
                try:
                    self.metrics.samples_per_second.remove(job_id)
                except KeyError:
                    pass
            self.board.wake.set()

    def _rewind(
        self, job, spec: JobSpec, running: RunningJob, module_dir: Path, verifier, rechecker, to_step, convicted
    ):
        """Rewind ``job`` to ``to_step`` (``JobRun.rewind_point``), put its ``convicted`` ranks on
        free volunteers, and launch its ranks again (module docstring).

        Returns:
            (the new driver's Ray submission id, its ``RayJobTraining``), or None when no
            volunteer was free within ``REPLACEMENT_WAIT_S`` (nothing was rewound then).
        """
        job_id = job.job_id
        node_ids = list(running.launch.node_ids)
        taken = self._parties(job, verifier, rechecker)  # the convicted providers are among them
        where = ", ".join(map(str, convicted))
        deadline = time.monotonic() + REPLACEMENT_WAIT_S
        waiting = False
        while True:
            with self._placing:
                chosen = self._replacements(job_id, len(convicted), job.price_ugpc_per_worker_hour, taken)
                if chosen is not None:
                    new_nodes, new_workers = list(node_ids), list(job.rank_worker)
                    for r, (node, provider) in zip(convicted, chosen, strict=True):
                        new_nodes[r], new_workers[r] = node, provider
                    self.runners[job_id] = (threading.current_thread(), frozenset(new_nodes))
                    break
            hopeless = (
                self._replacements(job_id, len(convicted), job.price_ugpc_per_worker_hour, taken, busy_too=True) is None
            )
            if hopeless or time.monotonic() > deadline or self._stop.is_set() or running.cancelled:
                why = (
                    "no volunteer of another provider is registered at the job's price"
                    if hopeless
                    else (f"none was free within {REPLACEMENT_WAIT_S:.0f} s")
                )
                job.ui.note(f"no volunteer to replace rank(s) {where} ({why}): the job ends at step {to_step}")
                return None
            if not waiting:
                waiting = True
                job.ui.note(f"waiting for a free volunteer of another provider to replace rank(s) {where}")
                self.table.update(job_id, reason=f"waiting for a free volunteer to replace rank(s) {where}")
            time.sleep(ROUND_INTERVAL_S)
        placed = "; ".join(f"rank {r} now on {new_workers[r]}'s node" for r in convicted)
        return self._relaunch(job, spec, running, module_dir, to_step, new_nodes, new_workers, RewindKind.FRAUD, placed)

    def _relaunch(
        self,
        job,
        spec: JobSpec,
        running: RunningJob,
        module_dir: Path,
        to_step: int,
        nodes: list[str],
        workers: list[str],
        kind,
        placed: str,
        end_step: int | None = None,
        also_hold: frozenset[str] = frozenset(),
    ):
        """Rewind ``job`` to ``to_step`` (if anything past it is live), assign rank r to
        ``workers[r]``'s node ``nodes[r]`` from there, and submit its driver again (to train up
        to ``end_step``, None: the end; every interval replayed if it is set). The job holds
        ``nodes`` and ``also_hold`` (a group test's next groups) meanwhile.

        Returns:
            (the driver's Ray submission id, its ``RayJobTraining``), or None if the job's
            consumer cancelled it (nothing is rewound or launched then).
        """
        job_id = job.job_id
        attempt = len(job.rewinds) + 1
        with self._placing:
            self.runners[job_id] = (threading.current_thread(), frozenset(nodes) | also_hold)
        inbox = self._inbox(job_id, spec, workers)
        # under the lock the API's cancel takes: a cancel comes before (nothing is launched) or
        # after (it stops the new inbox), never between
        with self.coord.lock:
            if running.cancelled:
                return None
            if any(iv.receipts for iv in job.intervals.values() if iv.start >= to_step):
                self.coord.rewind(job_id, to_step)
            assignments = [
                self.coord.assign(job_id, r, workers[r], nodes[r], to_step).to_json() for r in range(spec.workers)
            ]
            running.launch = running.launch.model_copy(
                update=dict(
                    node_ids=list(nodes),
                    assignments=assignments,
                    attempt=attempt,
                    start_step=to_step,
                    start_manifests=job.end_manifests(to_step),
                    previous=job.start_receipts(to_step),
                    end_step=end_step,
                )
            )
            running.inbox = inbox
            job.restart(
                to_step,
                list(workers),
                tuple(assignments),
                inbox,
                time.monotonic(),
                kind,
                end_step,
            )
        self.table.update(job_id, node_ids=list(nodes), reason=None)
        until = spec.steps if end_step is None else end_step
        job.ui.note(f"rewound to step {to_step} (attempt {attempt}): {placed}; training steps {to_step}-{until}")
        driver = driver_id(job_id, attempt)
        self.rayjobs.submit(driver, ["gpucoin.runtime.driver", self.api_url, job_id], nodes[0], module_dir)
        return driver, RayJobTraining(self.rayjobs, driver)

    @staticmethod
    def _parties(job, verifier, rechecker) -> set[str]:
        """The providers of ``job``'s ranks and of its verifiers: none of them replaces a rank of
        it or fills one of its group test's groups."""
        return set(job.rank_worker) | {verifier.provider} | ({rechecker.provider} if rechecker else set())

    def _candidates(self, job_id: str, taken: set[str], busy_too: bool) -> list[tuple[int, NodeView]]:
        """(place in registration order, view) of the live volunteer nodes no other job holds
        (``busy_too``: held or not), of providers not in ``taken``, not banned or excluded, one
        per provider (its first registered), in registration order."""
        busy = set() if busy_too else self.busy_nodes(but=job_id)
        found, seen = [], set()
        for i, v in enumerate(self.node_views()):
            ok = v.state == NodeState.ALIVE and not v.banned and v.role == NodeRole.VOLUNTEER
            if ok and v.node_id not in busy and v.provider not in taken | self.excluded | seen:
                seen.add(v.provider)
                found.append((i, v))
        return found

    def _free_volunteers(
        self, job_id: str, price: int, taken: set[str], busy_too: bool = False
    ) -> list[tuple[str, str]]:
        """(node id, provider) of the ``_candidates`` the market's clearing rule admits for one
        rank at the job's ``price`` (ask <= price, bond >= the policy's minimum: ``clear`` of each
        alone, the rule ``_replacements`` applies), in registration order."""
        from gpucoin.scheduler.market import Offer, Order, clear

        order = [Order(job_id, price, 1, 1, 0.0)]
        return [
            (v.node_id, v.provider)
            for i, v in self._candidates(job_id, taken, busy_too)
            if clear(
                order,
                [Offer(v.node_id, v.provider, v.ask_ugpc_per_worker_hour, 1, v.bonded_ugpc, seniority=i)],
                self.ledger.policy.market,
            ).placements
        ]

    def _group_test(self, job, spec: JobSpec, running: RunningJob, module_dir: Path, verifier, rechecker, step: int):
        """Find who made the void interval at ``step`` diverge (``verify.group_testing``): re-run
        it on the rule's groups of suspects (its nodes) and free fillers, one group at a time,
        each re-run replayed (a pass clears the group's suspects, a void keeps them); exclude the
        node the rule names from the market, then go on without it from ``step``.

        Returns:
            (driver submission id, training) of the job going on, or None (no group could be
            formed within ``REPLACEMENT_WAIT_S``, or nobody was named or cleared: the job ends at
            ``step``).
        """
        from gpucoin.coordinator.run import GroupTestRecord
        from gpucoin.verify.group_testing import GroupOutcome, GroupTest, plan_round, record

        job_id, end = job.job_id, min(step + spec.checkpoint_interval_steps, spec.steps)
        suspects = list(running.launch.node_ids)
        provider = dict(zip(suspects, job.rank_worker, strict=True))
        taken = self._parties(job, verifier, rechecker)  # a filler is no suspect's provider
        test = GroupTest(tuple(suspects))
        job.ui.note(
            f"steps {step}-{end} are void: group testing its {len(suspects)} nodes (each re-run of the interval is "
            f"replayed; at most {test.max_rounds} rounds)"
        )
        rounds: list[tuple[tuple[tuple[str, ...], tuple[str, ...], str], ...]] = []
        outcome_of = {"passed": GroupOutcome.CLEAN, "void": GroupOutcome.DIVERGED}
        while not test.done():  # record() adds a round each pass: at most test.max_rounds
            deadline = time.monotonic() + REPLACEMENT_WAIT_S
            while True:
                with self._placing:  # the round's nodes are the job's until it ends
                    free = self._free_volunteers(job_id, job.price_ugpc_per_worker_hour, taken)
                    # fillers in an order nobody can aim at (the job's secret draws it): a cheap
                    # node placed first in every solo group of an honest suspect could frame it
                    order = [n for n, _ in free]
                    seed = hashlib.sha256(job.secret + f"group test {step} round {len(rounds)}".encode())
                    random.Random(seed.digest()).shuffle(order)
                    groups = plan_round(test, order)
                    if groups:
                        held = frozenset(suspects) | {n for g in groups for n in g.nodes}
                        self.runners[job_id] = (threading.current_thread(), held)
                        break
                could = self._free_volunteers(job_id, job.price_ugpc_per_worker_hour, taken, busy_too=True)
                hopeless = not plan_round(test, [n for n, _ in could])
                if hopeless or time.monotonic() > deadline or self._stop.is_set() or running.cancelled:
                    break
                time.sleep(ROUND_INTERVAL_S)
            if running.cancelled:
                return None
            if not groups:
                job.ui.note("group test: not enough free nodes to form a group; it ends unresolved")
                break
            provider.update(free)
            results = []
            for g in groups:
                who = ", ".join(provider[n] for n in g.suspects)
                relaunched = self._relaunch(
                    job,
                    spec,
                    running,
                    module_dir,
                    step,
                    list(g.nodes),
                    [provider[n] for n in g.nodes],
                    RewindKind.GROUP_TEST,
                    f"group test round {len(rounds) + 1}, suspect(s) {who} with {len(g.fillers)} other node(s)",
                    end_step=end,
                    also_hold=held,
                )
                if relaunched is None:
                    return None  # cancelled
                driver, training = relaunched
                job.run(training)
                if training.alive():
                    self.rayjobs.stop(driver)
                iv = job.intervals[step]
                taken |= {provider[g.nodes[r]] for r in iv.failed_ranks}  # convicted here: never a filler again
                job.ui.note(f"group test: the re-run with suspect(s) {who}: {iv.outcome}")
                if iv.outcome in outcome_of:
                    results.append((g, outcome_of[iv.outcome]))
            if not results:
                job.ui.note("group test: no re-run of the round could be judged; it ends unresolved")
                break
            test = record(test, results)
            rounds.append(
                tuple(
                    (tuple(provider[n] for n in g.suspects), tuple(provider[n] for n in g.fillers), o.value)
                    for g, o in results
                )
            )
        named = test.named()
        job.group_tests.append(
            GroupTestRecord(
                step=step,
                suspects=tuple(provider[n] for n in suspects),
                rounds=tuple(rounds),
                named=None if named is None else provider[named],
                cleared=tuple(provider[n] for n in suspects if n in test.cleared()),
            )
        )
        nodes, workers = list(suspects), [provider[n] for n in suspects]
        if named is not None:
            self.excluded.add(provider[named])
            job.ui.note(
                f"group test: {provider[named]} is named (its {test.confirmations} re-runs alone among other nodes "
                "all diverged): excluded from the market, not slashed"
            )
            r = suspects.index(named)
            with self._placing:
                chosen = self._replacements(job_id, 1, job.price_ugpc_per_worker_hour, taken | {provider[named]})
                if chosen is not None:
                    nodes[r], workers[r] = chosen[0]
                    self.runners[job_id] = (threading.current_thread(), frozenset(nodes))
            if chosen is None:
                job.ui.note(f"no free volunteer to replace {provider[named]}: the job ends at step {step}")
                return None
        elif not test.cleared():
            job.ui.note("group test: nobody is named and nobody cleared; the job ends here")
            return None
        return self._relaunch(
            job, spec, running, module_dir, step, nodes, workers, RewindKind.RESUME, "the job goes on"
        )

    def _replacements(
        self, job_id: str, n: int, price: int, taken: set[str], busy_too: bool = False
    ) -> list[tuple[str, str]] | None:
        """``n`` free volunteer nodes (node id, provider) of providers not in ``taken``, chosen by
        the market's clearing rule at the job's ``price`` (ask <= price, bond >= the policy's
        minimum, cheapest first), or None if there are not enough (``busy_too``: counting the
        nodes other jobs hold as free, whether there could be)."""
        from gpucoin.scheduler.market import Offer, Order, clear

        if n == 0:
            return []
        # the job's own nodes are free to it (``taken`` names its parties); ``busy_too``: would any do, once free
        offers = [
            Offer(v.node_id, v.provider, v.ask_ugpc_per_worker_hour, 1, v.bonded_ugpc, seniority=i)
            for i, v in self._candidates(job_id, taken, busy_too)
        ]
        result = clear([Order(job_id, price, n, 1, 0.0)], offers, self.ledger.policy.market)
        if not result.placements:
            return None
        provider_of = {o.node_id: o.provider for o in offers}
        return [(node, provider_of[node]) for node in result.placements[0].node_ids]

    def evaluate(self, job, spec: JobSpec, store: ContentStore, module_dir: Path) -> JobEvaluation:
        """Validation loss and a sample of the checkpoint the job vouches for, from the job's code
        run in a child process (as ``job_code_user``) on the checkpoint rebuilt from the store by
        the manifests its ranks signed. Never raises: what went wrong is the sample's text.

        Without a ``job_code_user`` (not root) the job's code would run as the head's own user,
        who can read the coordinator's keystore: only a dev network (the embedded mode, where
        every party is this user anyway, and says so) evaluates then."""
        import math

        from gpucoin.coordinator.evaluate import rebuilt_checkpoint
        from gpucoin.coordinator.jobcode import evaluate_in_child

        step = job.last_settled_step()
        genesis = self.ledger.genesis
        if self.job_code_user is None and not (genesis is not None and genesis.dev):
            return JobEvaluation(
                step=step,
                val_loss=None,
                uniform_loss=None,
                sample="(not evaluated: a head that is not a dev network runs job code only as another OS user; "
                "run it as root, and the job's code runs as the node user)",
            )
        self.board.log(job.job_id, f"evaluating the checkpoint after step {step}", EventKind.STATUS)
        try:
            with rebuilt_checkpoint(spec, store.get, job.job_id, job.end_manifests(step), step) as tag_dir:
                ev = evaluate_in_child(
                    module_dir.parent,
                    spec.model_dump(mode="json"),
                    spec.data.source,
                    tag_dir,
                    step,
                    user=self.job_code_user,
                )
            return JobEvaluation(
                step=step, val_loss=ev.val_loss, uniform_loss=math.log(ev.vocab_size), sample=ev.sample
            )
        except Exception as e:  # noqa: BLE001 - a job whose evaluation fails is still settled and summarized
            if not isinstance(e, GpucoinError):
                log.exception("job %s: evaluation failed", job.job_id)
            return JobEvaluation(step=step, val_loss=None, uniform_loss=None, sample=f"(no evaluation: {e})")

    # -- a restart ------------------------------------------------------------
    def recover(self) -> None:
        """End what the service's last run left behind (module docstring)."""
        for row in self.table.all(JobState.RUNNING):
            self.rayjobs.stop(row.job_id)
            self.rayjobs.stop_prefixed(f"{row.job_id}~")  # its replay workers and its drivers after a Rewind
        settle_lost_jobs(
            self.ledger, self.coord, self.table, self.board, "the head service restarted while the job ran"
        )


def settle_lost_jobs(
    ledger,
    coord,
    table: JobTable,
    board: JobBoard,
    why: str,
    include_queued: bool = False,
    job_ids: set[str] | None = None,
) -> None:
    """Jobs no runner holds any more (``why``: what ended their runner): each one left ``running``
    is marked failed and what is left of its escrow refunded (its settled intervals stay paid, its
    receipts stay in the ledger); a JobOrder escrowed but never queued is refunded too. Called by
    a restarted head, and by the embedded mode after it stopped its head mid-job. Nothing of the
    job may still run (its Ray jobs stopped, or the cluster gone). ``include_queued``: queued jobs
    too (a head that is gone for good: the embedded mode's). ``job_ids``: only these jobs (None: all)."""
    from gpucoin.head.api import stored_message
    from gpucoin.ledger.accounts import escrow_account

    rows = table.all(JobState.RUNNING) + (table.all(JobState.QUEUED) if include_queued else [])
    for row in [r for r in rows if job_ids is None or r.job_id in job_ids]:
        refunded = coord.refund(row.job_id, job_order(ledger, row.job_id))
        text = f"{why}: its settled intervals stay paid, the rest of its escrow ({refunded} µGPC) was refunded"
        board.log(row.job_id, text)
        table.update(row.job_id, state=JobState.FAILED, reason=text)
    known = {r.job_id for r in table.all()}
    for msg_row in ledger.messages("JobOrder"):
        order = stored_message(msg_row)
        job_id = order.message["jobId"]
        if job_ids is not None and job_id not in job_ids:
            continue
        if job_id not in known and ledger.balance(escrow_account(job_id)) > 0:
            coord.refund(job_id, order)


def _summary(job, refunded_ugpc: int, evaluation: JobEvaluation | None = None) -> JobSummary:
    """What a ``coordinator.run.JobRun`` that ended did."""
    step = job.last_settled_step()
    iv = next((i for i in job.intervals.values() if i.end == step), None)
    return JobSummary(
        steps=step,
        receipts=ReceiptCounts(**job.counts),
        intervals={f"{iv.start}-{iv.end}": iv.outcome for iv in job.intervals.values()},
        failed_ranks={f"{iv.start}-{iv.end}": iv.failed_ranks for iv in job.intervals.values() if iv.failed_ranks},
        interval_wall_ms={f"{iv.start}-{iv.end}": iv.wall_ms for iv in job.intervals.values()},
        max_replay_distance=max(job.distances, default=None),
        check_probabilities=dict(job.check_probabilities),
        nodes={  # the job's workers, those a Rewind replaced included
            w: CheckRecord.of(r, job.policy.verification)
            for w, r in job.ledger.verification_records(
                dict.fromkeys([*job.rank_worker, *(a for rw in job.rewinds for a, _ in rw.replaced.values())])
            ).items()
        },
        verifiers_slashed=dict(job.verifiers_slashed),
        escrowed_ugpc=job.money["escrowed"],
        treasury_ugpc=job.money["treasury"],
        evaluation=evaluation,
        paid_ugpc=job.money["paid"],
        burned_ugpc=job.money["burned"],
        minted_ugpc=job.money["minted"],
        slashed_ugpc=job.money["slashed"],
        refunded_ugpc=refunded_ugpc,
        stopped=job.stopped,
        rewinds=[
            RewindSummary(
                kind=rw.kind.value,
                to_step=rw.to_step,
                reason=rw.reason,
                intervals=rw.intervals,
                failed_ranks=rw.failed_ranks,
                replaced=[
                    RankReplacement(rank=r, provider_before=a, provider_after=b) for r, (a, b) in rw.replaced.items()
                ],
            )
            for rw in job.rewinds
        ],
        group_tests=[
            GroupTestSummary(
                step=t.step,
                suspects=list(t.suspects),
                rounds=[
                    [GroupRun(suspects=list(a), fillers=list(b), outcome=o) for a, b, o in rnd] for rnd in t.rounds
                ],
                named=t.named,
                cleared=list(t.cleared),
            )
            for t in job.group_tests
        ],
        checkpoint_receipts=[] if step == 0 else [iv.receipts[r].to_json() for r in sorted(iv.receipts)],
    )
