"""The coordinator's event loop for one running job: receipts in, draws, replays, verdicts, settlement.

``JobRun.run`` polls the job's inbox until training ends and every drawn replay is back. Each
interval moves through

    open -> (all ranks' receipts admitted) -> pending (drawn for replay) -> passed | failed | void
                                           -> held (not drawn; challengeable) -> unchecked (settled)
    and, off the main path: unverifiable (the verifier could not run the replay), void (after a
    proven fraud, or once the budget is spent)

After a proven fraud the run stops its ranks; the head then rewinds the job to its newest
settled step (``rewind_point``), replaces the convicted ranks' nodes and launches the ranks
again, and the same run goes on from there (``restart``): the superseded intervals are kept in
``rewinds``, at most ``MAX_REWINDS`` frauds. After a void interval of a vetted job of several
ranks (the evidence names nobody) the head re-runs that interval on groups of nodes
(``group_point``; ``verify.group_testing``), each re-run replayed whatever the draw says.

An interval is drawn for sure when it is the job's last (its end checkpoint is what the engineer
gets) or when a rank's signed checkpoint is not all in the store. Only passed and unchecked
intervals are charged to the escrow and earn emission.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

import numpy as np

from gpucoin.coordinator.meter import Meter
from gpucoin.coordinator.receipts import ReceiptRejected, check_receipt
from gpucoin.coordinator.settle import Coordinator
from gpucoin.exceptions import ConflictError, ReceiptOutOfOrder, SignatureError, TrainingError, UnknownParty
from gpucoin.money import format_gpc
from gpucoin.policy.tokenomics import interval_payment_ugpc
from gpucoin.runtime.inbox import ProgressEvent, ReceiptEvent
from gpucoin.spec import JobSpec
from gpucoin.storage.checkpoints import commitment_problem
from gpucoin.verify.compare import effective_verdict
from gpucoin.verify.recheck import Opinion, is_rechecked, shown_false_by
from gpucoin.verify.sampling import check_probability, is_checked
from gpucoin.verify.verifier import ReplayRequest, ReplayResult
from gpucoin.wallet.messages import SignedMessage, verify

POLL_INTERVAL_S = 0.5
QUIET_CHECK_S = 5.0
"""While intervals are still to come, how often the run asks Ray whether the training still runs
and closes ended epochs (each a few database reads or a dashboard request on the head's cores,
which the ranks share on a small host); once the last interval's receipts are in or the job is
stopping, on every loop, so its end is seen at once. A driver that dies mid-job is also found
by the interval timeout."""
RECHECK_TIMEOUT_S = 1800.0
"""Longest the coordinator waits for a second verifier's re-check; past it the first verifier's
result stands (as when the re-check cannot run)."""
MAX_RUN_S = 6 * 3600
"""Upper bound on one run's wall time; past it the run is stopped as failed."""
MAX_REWINDS = 3
"""Most Rewinds of one job (each after a proven fraud, with the convicted ranks' nodes replaced);
past it a fraud stops the job, as it did before there were Rewinds."""


class Inbox(Protocol):
    """A job's events as the coordinator reads them (``runtime.inbox.JobInbox`` or its actor)."""

    def poll(self) -> list[ReceiptEvent | ProgressEvent]: ...
    def stop(self, reason: str) -> None: ...


class Replays(Protocol):
    """Where a job's drawn intervals are replayed: on its verifier node, one handle per request."""

    def submit(self, req: ReplayRequest) -> object: ...
    def result(self, handle: object, timeout_s: float | None) -> ReplayResult | None:
        """The replay's result once it is back (None while it runs, after waiting up to
        ``timeout_s``; None waits for it); raises why it could not run."""

    def cancel(self, handle: object) -> None: ...


@dataclass
class Interval:
    """The coordinator's view of one checkpoint interval [start, end)."""

    start: int
    end: int
    receipts: dict[int, SignedMessage] = field(default_factory=dict)
    sketches: dict[int, np.ndarray] = field(default_factory=dict)
    arrivals_s: dict[int, float] = field(default_factory=dict)  # rank -> its receipt's arrival, head clock
    reports: list[SignedMessage] | None = None  # the verifier's signed reports, rank order, once replayed
    wall_ms: int = 0  # metered worker time (``coordinator.meter``), what the interval is billed for
    pending: object = None  # the replay's handle (``Replays.submit``) while it runs
    pending_on: object = None  # the ``Replays`` that runs it (the verifier's, or the re-checker's)
    first: "ReplayResult | None" = None  # the verifier's result while a second verifier re-checks it
    recheck_by: float = 0.0  # monotonic time past which the re-check is given up (``RECHECK_TIMEOUT_S``)
    settle_at: float | None = None  # monotonic time when a held interval's challenge window ends
    outcome: str = "open"
    settled: bool = False  # charged to the escrow (a later re-check may still slash its ranks)
    failed_ranks: list[int] = field(default_factory=list)  # the ranks a replay convicted of this interval


class RewindKind(str, Enum):
    """Why the job was rewound."""

    FRAUD = "fraud"  # a replay convicted a rank: it is replaced
    GROUP_TEST = "group_test"  # a re-run of a void interval on a group of nodes (``verify.group_testing``)
    RESUME = "resume"  # after a group test: the job goes on without the node it named


@dataclass(frozen=True)
class RewindRecord:
    """One Rewind of the job: what it superseded and who it replaced.

    Attributes:
        kind: why (``RewindKind``).
        to_step: the step the ranks trained again from (the job's newest settled step then).
        reason: why the job was stopped (the proven fraud, the void interval).
        intervals: 'start-end' -> outcome of each interval it superseded (the failed one, and the
            ones trained meanwhile, void).
        failed_ranks: 'start-end' -> the ranks a replay convicted in it.
        replaced: rank -> (provider before, provider after) of each rank placed on another node.
    """

    kind: RewindKind
    to_step: int
    reason: str
    intervals: dict[str, str]
    failed_ranks: dict[str, list[int]]
    replaced: dict[int, tuple[str, str]]


@dataclass(frozen=True)
class GroupTestRecord:
    """One group test of a void interval (``verify.group_testing``), as the head ran it.

    Attributes:
        step: the void interval's first step.
        suspects: the providers of its ranks, rank order.
        rounds: per round, each judged re-run as (suspects, fillers, ``GroupOutcome`` value),
            providers.
        named: the provider the rule named (excluded from the market), or None.
        cleared: the suspects a clean re-run cleared.
    """

    step: int
    suspects: tuple[str, ...]
    rounds: tuple[tuple[tuple[tuple[str, ...], tuple[str, ...], str], ...], ...]
    named: str | None
    cleared: tuple[str, ...]


@dataclass
class JobRun:
    """State and handlers of one running job on the coordinator.

    Attributes:
        spec: the job; coord: money and messages; inbox: the job's events (``Inbox``);
        rank_worker: provider address per rank (the market's placement);
        price_ugpc_per_worker_hour: the clearing price; verifier_address: the verifier node's key;
        package_hash: the job's package as its JobOrder signed it (``gpucoin.spec.package_hash``);
        replays: runs ``verify.verifier.check_interval`` on the verifier node (``Replays``);
        store: the job's checkpoints (``get``/``has`` of a ``ContentStore``); sketch_dir: where committed sketches
        are kept; data_source: the corpus;
        ui: progress reporting; secret: the sampling secret (drawn fresh if None);
        assignments: each rank's coordinator-signed Assignment (JSON), which the verifier's signer checks.
        recheck / recheck_address: a second verifier node's ``Replays`` and key, which replays the
            policy's ``recheck_share_bps`` of the replayed intervals again (``verify.recheck``);
            None when the market has no second verifier free for the job.
    """

    spec: JobSpec
    job_id: str
    coord: Coordinator
    inbox: Inbox
    rank_worker: list[str]
    price_ugpc_per_worker_hour: int
    verifier_address: str
    package_hash: str
    replays: Replays
    store: object
    sketch_dir: Path
    data_source: str
    ui: object
    secret: bytes | None = None
    assignments: tuple[str, ...] = ()
    recheck: Replays | None = None
    recheck_address: str | None = None

    def __post_init__(self) -> None:
        self.secret = self.secret or secrets.token_bytes(32)
        self.policy = self.coord.policy
        self.ledger = self.coord.ledger
        self.vetted = self.package_hash in self.policy.verification.vetted_packages
        self.intervals = {s: Interval(s, e) for s, e in self.spec.intervals()}
        self.check_probabilities: dict[str, float] = {}  # 'start-end' -> what its draw was held against
        self.slashed_receipts: set[str] = set()
        self.open_epochs: set[int] = set()  # epochs this job's charges count in, not closed yet
        self.counts = {"signed": 0, "checked": 0, "passed": 0, "failed": 0, "void": 0, "rejected": 0, "rechecked": 0}
        self.verifiers_slashed: dict[str, int] = {}  # verifier address -> µGPC its false reports cost it
        self.money = {
            "escrowed": self.spec.budget_ugpc,
            "paid": 0,
            "burned": 0,
            "treasury": 0,
            "minted": 0,
            "slashed": 0,
        }
        self.distances: list[float] = []
        self.stopped: str | None = None
        self.fraud_at: int | None = None
        self.void_at: int | None = None  # the first void interval's start (the evidence named nobody)
        self.end_step = self.spec.steps  # where this launch's ranks stop (a group test's re-run: one interval)
        self.check_all = False  # a launch with an end step (a group test's re-run): every interval is replayed
        self.rewinds: list[RewindRecord] = []
        self.group_tests: list[GroupTestRecord] = []  # run by the head (``head.scheduler``)
        self.superseded_receipts: set[str] = set()  # receipts of intervals a Rewind superseded
        # the meter starts now, as the coordinator launches the ranks; it never takes a time from a rank
        self.meter = Meter(
            self.spec.workers, self.spec.checkpoint_interval_steps, self.policy.metering, time.monotonic()
        )
        self.t_step: float | None = None
        self.last_progress_step = 0
        self.sketch_dir.mkdir(parents=True, exist_ok=True)

    # -- the loop -------------------------------------------------------------
    def run(self, training) -> None:
        """Handle events until ``training`` ends (``alive()`` False; ``join()`` re-raises its
        failure) and no replay is outstanding."""
        deadline = time.monotonic() + MAX_RUN_S
        checked = -QUIET_CHECK_S
        while True:
            if time.monotonic() > deadline:
                raise TrainingError(f"job {self.job_id} did not finish within {MAX_RUN_S} s")
            for ev in self.inbox.poll():
                self.on_event(ev)
            if self.lost_nodes():
                return  # a lost rank may hold the others in a collective: the cluster's shutdown ends them
            self.collect_replays(block=False)
            self.settle_held(force=False)
            if self.finishing() or time.monotonic() - checked >= QUIET_CHECK_S:
                checked = time.monotonic()
                self.close_epochs()
                if not training.alive() and not self.outstanding():
                    break
            time.sleep(POLL_INTERVAL_S)
        training.join()
        for ev in self.inbox.poll():
            self.on_event(ev)

    def finishing(self) -> bool:
        """True once the job is stopping or every rank's receipt of its last interval is in."""
        last = max((iv for iv in self.intervals.values() if iv.start < self.end_step), key=lambda iv: iv.start)
        return self.stopped is not None or len(last.receipts) == self.spec.workers

    def lost_nodes(self) -> bool:
        """Stop the job if a rank has not delivered its next receipt within the policy's
        ``interval_timeout_s``: it counts as a lost node, and its open interval is void (unpaid)."""
        iv = next((iv for iv in self.intervals.values() if iv.outcome == "open" and iv.start < self.end_step), None)
        if iv is None or self.stopped is not None:
            return False
        late = self.meter.overdue(time.monotonic(), set(range(self.spec.workers)) - set(iv.receipts))
        if not late:
            return False
        iv.outcome = "void"
        self.stop(
            f"rank {', '.join(map(str, late))} lost: no receipt for steps {iv.start}-{iv.end} within "
            f"{self.policy.metering.interval_timeout_s} s"
        )
        return True

    def settle_all(self) -> None:
        """After training: settle what is still held (the local run ends its challenge window) and
        close the epochs that have ended. The checkpoint the job vouches for is final from here."""
        self.settle_held(force=True)
        self.close_epochs()

    def close_epochs_on_clock(self) -> None:
        """After ``settle_all``: wait for the epochs this job's charges count in to end on the clock
        (at most one epoch length, ``tokenomics.epoch_length_s``) and close them, so the job's
        emission is minted before its summary is written."""
        self.close_epochs()
        if not self.open_epochs:
            return
        end_s = self.ledger.epoch_end_s(max(self.open_epochs))
        wait_s = end_s - time.time()
        if wait_s > 0:
            self.ui.status(
                f"waiting {wait_s:.0f} s for epoch {max(self.open_epochs)} to end, so its emission can be minted"
            )
            time.sleep(min(wait_s, self.policy.tokenomics.epoch_length_s) + 0.05)
        self.close_epochs()

    def outstanding(self) -> bool:
        """True while a replay is running."""
        return any(iv.pending is not None for iv in self.intervals.values())

    def stop(self, reason: str) -> None:
        """Ask the ranks to stop at their next interval boundary; later intervals are void."""
        if self.stopped is None:
            self.stopped = reason
            self.inbox.stop(reason)
            self.ui.note(f"stopping the job: {reason}")

    def on_event(self, ev: ReceiptEvent | ProgressEvent) -> None:
        """Dispatch one inbox event (see ``runtime.inbox.JobInbox``)."""
        if isinstance(ev, ProgressEvent):
            now = time.monotonic()
            if self.t_step is None:
                self.ui.training_started(self.spec.steps, self.last_progress_step)
                self.t_step = now
            dt = now - self.t_step
            tokens = (
                self.spec.global_batch_size * self.spec.model.block_size * max(0, ev.step - self.last_progress_step)
            )
            self.last_progress_step, self.t_step = ev.step, now
            self.ui.step(ev.step, ev.loss, tokens / dt if dt > 0 else 0.0)
        elif isinstance(ev, ReceiptEvent):
            self.on_receipt(ev.rank, ev.receipt_json, ev.sketches, ev.arrived_s)

    # -- receipts -------------------------------------------------------------
    def on_receipt(self, rank: int, receipt_json: str, sketches, arrived_s: float | None = None) -> None:
        """Admit a rank's receipt (``receipts.check_receipt``), record it, and close the interval when complete.

        ``arrived_s``: when the inbox received it (head clock, monotonic s); now if None."""
        arrived_s = time.monotonic() if arrived_s is None else arrived_s
        try:
            receipt = SignedMessage.from_json(receipt_json)
            if receipt.digest in self.superseded_receipts:  # recording it again would be a silent no-op
                raise ReceiptRejected(f"rank {rank}: receipt {receipt.digest} was superseded by a Rewind")
            iv = self.intervals.get(receipt.message["stepStart"])
            if iv is None or not 0 <= rank < self.spec.workers:
                raise ReceiptRejected(f"rank {rank}: no interval starts at step {receipt.message['stepStart']}")
            prev = self.intervals.get(iv.start - self.spec.checkpoint_interval_steps) if iv.start else None
            check_receipt(
                receipt,
                sketches,
                job_id=self.job_id,
                rank=rank,
                worker=self.rank_worker[rank],
                step_start=iv.start,
                step_end=iv.end,
                buckets=self.policy.verification.sketch_buckets,
                samples=(iv.end - iv.start)
                * self.spec.deepspeed.micro_batch_size
                * self.spec.deepspeed.gradient_accumulation_steps,
                elapsed_ms=self.meter.elapsed_ms(arrived_s),
                previous_digest=prev.receipts[rank].digest if prev and rank in prev.receipts else None,
                already_have=rank in iv.receipts or iv.outcome != "open",
                domain=self.coord.domain,
            )
            # the ledger's own admission rules (known job and node, contiguous steps) get the last word
            self.coord.record(receipt)
        except (SignatureError, ReceiptOutOfOrder, UnknownParty, ConflictError, ValueError, KeyError, TypeError) as e:
            self.counts["rejected"] += 1
            self.ui.note(f"receipt from rank {rank} rejected: {e}")
            return
        self.counts["signed"] += 1
        iv.receipts[rank], iv.sketches[rank], iv.arrivals_s[rank] = receipt, sketches, arrived_s
        # kept beside the checkpoints: the receipt commits to them, a verifier may ask for them later
        again = f"-attempt{len(self.rewinds)}" if self.rewinds else ""  # a re-run keeps the superseded ones
        np.save(self.sketch_dir / f"rank{rank}-step{iv.start:08d}{again}.npy", sketches)
        if len(iv.receipts) == self.spec.workers:
            self.interval_complete(iv)

    def interval_complete(self, iv: Interval) -> None:
        """Meter the interval (``coordinator.meter``), then draw: replay it, or hold it for the window."""
        now = time.monotonic()
        iv.wall_ms = self.meter.close(iv.arrivals_s, iv.end - iv.start)
        if self.stopped is not None:
            iv.outcome = "void"  # trained after a proven fraud or with the budget spent
            return
        digests = [iv.receipts[r].digest for r in range(self.spec.workers)]
        # each node's record is the ledger's signed reports over every job, this one's so far included
        records = self.ledger.verification_records(self.rank_worker)
        p = max(check_probability(self.policy.verification, records[w]) for w in self.rank_worker)
        why = self.must_check(iv)
        self.check_probabilities[f"{iv.start}-{iv.end}"] = 1.0 if why else p
        if why or is_checked(self.secret, digests, p):
            iv.outcome = "pending"
            self.counts["checked"] += 1
            self.submit_replay(iv, self.replays)
            drawn = f"drawn for replay ({why})" if why else f"drawn for replay (p={p:.2f})"
            self.ui.note(f"steps {iv.start}-{iv.end}: receipts signed by {self.spec.workers} ranks; {drawn}")
        else:
            iv.outcome = "held"
            iv.settle_at = now + self.policy.verification.challenge_window_s
            self.ui.note(
                f"steps {iv.start}-{iv.end}: receipts signed by {self.spec.workers} ranks; not drawn (p={p:.2f})"
            )
            self.settle_held(force=False)

    def previous(self, iv: Interval) -> Interval | None:
        """The interval before ``iv`` (None for the first)."""
        return self.intervals.get(iv.start - self.spec.checkpoint_interval_steps) if iv.start else None

    def must_check(self, iv: Interval) -> str | None:
        """Why ``iv`` is replayed whatever the draw, or None: it is the job's last interval, or a
        rank's signed checkpoint is not all in the store (the replay convicts that rank)."""
        if self.check_all:
            return "a group test's re-run is always checked"
        if iv.end == self.spec.steps:
            return "the last interval is always checked"
        client = self.store
        for r, receipt in sorted(iv.receipts.items()):
            problem = commitment_problem(
                client.get,
                client.has,
                receipt.message["checkpointHash"],
                job_id=self.job_id,
                rank=r,
                step=iv.end,
                zero_stage=self.spec.deepspeed.zero_stage,
                world=self.spec.workers,
            )
            if problem:
                return f"rank {r}'s checkpoint: {problem}"
        return None

    def replay_request(self, iv: Interval) -> ReplayRequest:
        """What the verifier needs for ``iv``: the committed sketches, the receipts of ``iv`` and of
        the interval before, and the checkpoint manifests they signed."""
        W = self.spec.workers
        prev = self.previous(iv)
        start = [prev.receipts[r] for r in range(W)] if prev else []
        return ReplayRequest(
            spec=self.spec.model_dump(mode="json"),
            data_source=self.data_source,
            job_id=self.job_id,
            step_start=iv.start,
            step_end=iv.end,
            buckets=self.policy.verification.sketch_buckets,
            committed=np.stack([iv.sketches[r] for r in range(W)]),  # (W, K, B)
            receipts=tuple(iv.receipts[r].digest for r in range(W)),
            end_manifests=tuple(iv.receipts[r].message["checkpointHash"] for r in range(W)),
            start_receipts=tuple(r.digest for r in start),
            start_manifests=tuple(r.message["checkpointHash"] for r in start),
            package_hash=self.package_hash,
            vetted_packages=self.policy.verification.vetted_packages,
            tolerance=self.policy.verification.tolerance_rel_l2,
            receipt_messages=tuple(iv.receipts[r].to_json() for r in range(W)),
            start_receipt_messages=tuple(r.to_json() for r in start),
            assignments=self.assignments,
        )

    # -- replays --------------------------------------------------------------
    def submit_replay(self, iv: Interval, replays: Replays) -> None:
        """Have ``replays`` (the verifier's, or the re-checker's) replay ``iv``."""
        iv.pending, iv.pending_on = replays.submit(self.replay_request(iv)), replays

    def collect_replays(self, block: bool) -> None:
        """Take in every finished replay (or, with ``block``, wait for all)."""
        for iv in self.intervals.values():
            if iv.pending is None:
                continue
            replays = iv.pending_on or self.replays
            if iv.outcome == "void":
                replays.cancel(iv.pending)
                iv.pending, iv.first = None, None
                continue
            if iv.first is not None and time.monotonic() > iv.recheck_by:
                replays.cancel(iv.pending)
                iv.pending = None
                self.ui.note(f"steps {iv.start}-{iv.end}: no re-check within {RECHECK_TIMEOUT_S:.0f} s")
                self.recheck_failed(iv)
                continue
            try:
                result = replays.result(iv.pending, None if block else 0.0)
                if result is None:
                    continue
            except Exception as e:  # noqa: BLE001 - a replay that could not run is a fact to settle, not a crash
                iv.pending = None
                if iv.first is not None:
                    self.ui.note(f"steps {iv.start}-{iv.end}: the re-check could not run ({_last_line(e)})")
                    self.recheck_failed(iv)
                    continue
                iv.outcome = "unverifiable"
                self.ui.note(f"steps {iv.start}-{iv.end}: replay could not run ({_last_line(e)}); not settled")
                continue
            iv.pending = None
            self.on_verdict(iv, result)

    def on_verdict(self, iv: Interval, result: ReplayResult) -> None:
        """Take in a replay's signed reports (``_reports``). A first verifier's result is re-checked
        by the second verifier when the draw says so (``verify.recheck.is_rechecked``), and acted on
        once the re-check is back (``recheck_done``); else it is judged now (``judge``).

        Raises:
            SignatureError: a report not signed by the verifier that was asked, or naming another receipt.
        """
        if iv.outcome == "void":
            return
        if iv.first is not None:
            self.recheck_done(iv, iv.first, result)
            return
        by_receipt = self._reports(iv, result, self.verifier_address)
        share = self.policy.verification.recheck_share_bps
        digests = [iv.receipts[r].digest for r in range(self.spec.workers)]
        if self.recheck is not None and share and is_rechecked(self.secret, digests, share):
            try:
                self.submit_replay(iv, self.recheck)
            except Exception as e:  # noqa: BLE001 - a re-check that cannot start leaves the first result standing
                self.ui.note(f"steps {iv.start}-{iv.end}: the re-check could not start ({_last_line(e)})")
                self.judge(iv, result, by_receipt)
                return
            iv.first, iv.recheck_by = result, time.monotonic() + RECHECK_TIMEOUT_S
            self.counts["rechecked"] += 1
            self.ui.note(
                f"steps {iv.start}-{iv.end}: drawn for a re-check by a second verifier ({self.recheck_address})"
            )
            return
        self.judge(iv, result, by_receipt)

    def recheck_failed(self, iv: Interval) -> None:
        """The re-check of ``iv`` could not be had (it could not run, timed out, or its reports do
        not check): the first verifier's result stands."""
        first, iv.first = iv.first, None
        self.judge(iv, first, self._reports(iv, first, self.verifier_address, record=False))

    def _reports(
        self, iv: Interval, result: ReplayResult, verifier: str | None, record: bool = True
    ) -> dict[str, SignedMessage]:
        """The reports of ``result`` by receipt digest, each checked (signed by ``verifier`` in the
        market's domain, naming a receipt of ``iv`` or, failing it, of the interval before, one per
        receipt, every receipt of ``iv`` judged) and, with ``record``, recorded on the ledger.

        Raises:
            SignatureError: anything of that does not hold.
        """
        prev = self.previous(iv)
        judged = {r.digest: iv for r in iv.receipts.values()}
        if prev is not None:
            judged.update({r.digest: prev for r in prev.receipts.values()})
        by_receipt: dict[str, SignedMessage] = {}
        for rep_json in result.reports:
            rep = SignedMessage.from_json(rep_json)
            verify(rep, expected_signer=verifier, domain=self.coord.domain)
            digest = rep.message["receiptDigest"]
            if digest not in judged or digest in by_receipt:
                raise SignatureError(
                    f"verification report {rep.digest} names receipt {digest}, not one it was asked about"
                )
            if judged[digest] is prev and rep.message["verdict"] != "fail":
                raise SignatureError(
                    f"verification report {rep.digest} judges a receipt of the interval before: {rep.message['verdict']}"
                )
            by_receipt[digest] = rep
        if any(r.digest not in by_receipt for r in iv.receipts.values()):
            raise SignatureError(f"the verifier did not judge every receipt of steps {iv.start}-{iv.end}")
        if record:
            for rep in by_receipt.values():
                self.coord.record(rep)
        return by_receipt

    def recheck_done(self, iv: Interval, first: ReplayResult, second: ReplayResult) -> None:
        """Both verifiers' reports are in. If the re-check shows a pass of the first verifier false
        (``verify.recheck``: the second failed what it passed), slash the first verifier once for
        the interval and judge by the second's reports; else judge by the first's (a fail of the
        first the second passed still stands). Reports of the second that do not check leave the
        first's result standing (``recheck_failed``)."""
        mine = self._reports(iv, first, self.verifier_address, record=False)
        try:
            theirs = self._reports(iv, second, self.recheck_address)
        except SignatureError as e:
            self.ui.note(f"steps {iv.start}-{iv.end}: the re-check's reports do not check ({e})")
            self.recheck_failed(iv)
            return
        iv.first = None
        shown: list[tuple[SignedMessage, SignedMessage]] = []  # (a false pass of the first, the fail showing it)
        for digest, rep in mine.items():
            other = theirs.get(digest)
            if other is None:
                continue
            worker = self.ledger.message(digest).signer
            opinions = [  # recording order: the first's reports were recorded before the re-check
                Opinion(r.digest, r.message["verifier"], effective_verdict(r.message["verdict"], self.vetted))
                for r in (rep, other)
            ]
            if shown_false_by(opinions[0], opinions, worker):
                shown.append((rep, other))
        differ = sorted(
            d for d in set(mine) & set(theirs) if mine[d].message["verdict"] != theirs[d].message["verdict"]
        )
        if not shown:
            agreed = (
                "agrees" if not differ else f"differs on {len(differ)} receipt(s); the first verifier's fails stand"
            )
            self.ui.note(f"steps {iv.start}-{iv.end}: the re-check {agreed}")
            self.judge(iv, first, mine)
            return
        rep, by = shown[0]  # one slash per interval: each false pass is on the ledger as evidence
        who = rep.message["verifier"]
        taken = self.coord.slash_verifier(self.job_id, rep, by)
        self.money["slashed"] += taken
        self.verifiers_slashed[who] = self.verifiers_slashed.get(who, 0) + taken
        self.ui.note(
            f"steps {iv.start}-{iv.end}: verifier {who} passed {len(shown)} receipt(s) the re-check by "
            f"{by.message['verifier']} failed; its bond was slashed ({format_gpc(taken)} GPC) and the interval "
            "is judged on the re-check"
        )
        self.judge(iv, second, theirs)

    def judge(self, iv: Interval, result: ReplayResult, by_receipt: dict[str, SignedMessage]) -> None:
        """Act on the verifier's signed reports (recorded): one per receipt of ``iv``, and a failing
        one for each receipt of the interval before whose start-checkpoint file was at fault.

        Any fail: slash each failing receipt's worker, pay the ranks of ``iv`` that passed their
        share (when every other rank of it failed), and stop (the state the job trains on is
        disowned). Else any void (the evidence names nobody): slash nobody, pay nobody (in a job of
        an unvetted package, charge the submitter and burn it), check these nodes more often, and
        stop. Else: settle the pass.
        """
        if iv.outcome == "void":
            return
        prev = self.previous(iv)
        judged = {r.digest: (iv, rank) for rank, r in iv.receipts.items()}
        if prev is not None:
            judged.update({r.digest: (prev, rank) for rank, r in prev.receipts.items()})
        if iv.outcome == "failed":  # already convicted by the check of the interval after it: slash, never pay
            for digest, rep in by_receipt.items():
                if effective_verdict(rep.message["verdict"], self.vetted) == "fail":
                    self.slash_once(judged[digest], rep, iv, reasons={})
            return
        reasons = {f.receipt: f.reason for f in result.findings}
        iv.reports = [by_receipt[iv.receipts[r].digest] for r in range(self.spec.workers)]
        worst = max(r.message["distanceE9"] for r in iv.reports) / 1e9
        self.distances.append(worst)
        # in a job of an unvetted package a fail convicts nobody, whatever the verifier's process was made to find
        verdict_of = {d: effective_verdict(rep.message["verdict"], self.vetted) for d, rep in by_receipt.items()}
        failing = [(judged[d], rep) for d, rep in by_receipt.items() if verdict_of[d] == "fail"]
        if failing:
            iv.outcome = "failed"
            self.counts["failed"] += 1
            for where_rank, rep in sorted(failing, key=lambda x: (x[0][0].start, x[0][1])):
                self.slash_once(where_rank, rep, iv, reasons)
            verdicts = [verdict_of[rep.message["receiptDigest"]] for rep in iv.reports]
            honest = [r for r, v in enumerate(verdicts) if v == "pass"]
            if honest and all(v in ("pass", "fail") for v in verdicts) and not iv.settled:
                # the evidence separates them: the ranks that passed are paid for their work
                self.settle(iv, ranks=honest)
            self.fraud_at = iv.start if self.fraud_at is None else min(self.fraud_at, iv.start)
            self.void_after(iv)
            self.stop(f"rank(s) {sorted({r for (_, r), _ in failing})} failed the replay of steps {iv.start}-{iv.end}")
            return
        voids = [rep for rep in iv.reports if verdict_of[rep.message["receiptDigest"]] == "void"]
        if voids:
            # the evidence names nobody (docs/verification.md, Blame)
            iv.outcome = "void"
            self.counts["void"] += 1
            self.void_after(iv)
            why = reasons.get(voids[0].message["receiptDigest"]) or "the ranks diverged together"
            if not self.vetted and not iv.settled:
                self.charge_void(iv)
            if self.vetted and self.spec.workers > 1:  # a group test can find who sent another gradient
                self.void_at = iv.start if self.void_at is None else min(self.void_at, iv.start)
            self.stop(f"steps {iv.start}-{iv.end} are void, nobody is slashed: {why}")
            self.recheck_start(iv)
            return
        iv.outcome = "passed"
        self.counts["passed"] += 1
        self.ui.note(f"steps {iv.start}-{iv.end}: replay passed (max relative L2 {worst:.1e})")
        self.settle_held(force=False)  # settles it, in step order, once no earlier replay runs

    def slash_once(self, where_rank: tuple[Interval, int], rep: SignedMessage, iv: Interval, reasons: dict) -> None:
        """Mark the rank of the interval ``where_rank`` names failed and slash its worker on the
        failing report ``rep`` (from the check of ``iv``), once per receipt."""
        where, rank = where_rank
        where.outcome = "failed"  # its end checkpoint is disowned too (the job's result is an earlier one)
        where.failed_ranks = sorted({*where.failed_ranks, rank})
        if rep.message["receiptDigest"] in self.slashed_receipts:
            return  # convicted by the check of both intervals its checkpoint bounds: slashed once
        self.slashed_receipts.add(rep.message["receiptDigest"])
        self.money["slashed"] += self.coord.slash(self.job_id, rep)
        self.ui.note(
            f"steps {where.start}-{where.end}: rank {rank} FAILED the check of steps {iv.start}-{iv.end} "
            f"({reasons.get(rep.message['receiptDigest']) or 'mismatch'}); its bond was slashed"
        )

    def recheck_start(self, iv: Interval) -> None:
        """After ``iv`` came out void: if its start checkpoint was never checked (the interval
        before was not drawn), replay the interval before too. A start file that loads but holds
        other numbers than its writer computed voids every replay that starts from it; the check
        of the interval that wrote it convicts the writer (docs/verification.md, The end checkpoint)."""
        prev = self.previous(iv)
        if prev is None or prev.outcome not in ("held", "unchecked") or prev.pending is not None:
            return
        prev.outcome = "pending"
        self.counts["checked"] += 1
        self.submit_replay(prev, self.replays)
        self.ui.note(f"steps {prev.start}-{prev.end}: drawn for replay (the replay from its end checkpoint was void)")

    def void_after(self, iv: Interval) -> None:
        """Intervals after ``iv`` not settled yet earn nothing: they trained on state the replay of
        ``iv`` disowned (SPEC.md, Money)."""
        for later in self.intervals.values():
            unsettled = later.outcome in ("open", "pending", "held") or (
                later.outcome == "passed" and not later.settled
            )
            if later.start > iv.start and unsettled:
                later.outcome = "void"

    # -- money ----------------------------------------------------------------
    def settle_held(self, force: bool) -> None:
        """Settle, in step order, passed intervals not settled yet and held (unchecked) ones whose
        challenge window is over (all of them with ``force``). Without ``force``, none after an
        interval whose replay (or re-check) is still running: they trained on the state it ends
        with, and its failure voids them (``void_after``), so they wait for its verdict."""
        now = time.monotonic()
        for iv in sorted(self.intervals.values(), key=lambda i: i.start):
            if iv.outcome == "pending" and not force:
                break
            if iv.outcome == "passed" and not iv.settled:
                self.settle(iv)
                self.ui.note(f"steps {iv.start}-{iv.end}: settled")
            elif iv.outcome == "held" and (force or (iv.settle_at is not None and now >= iv.settle_at)):
                iv.outcome = "unchecked"
                self.settle(iv)
                self.ui.note(f"steps {iv.start}-{iv.end}: unchallenged, settled")

    def settle(self, iv: Interval, ranks: list[int] | None = None) -> None:
        """Charge the interval (burn + treasury) in the ledger's current epoch; its emission share
        is minted when that epoch closes. With ``ranks``, only those ranks' share of a checked
        interval whose other ranks were convicted (each rank's work is metered alike)."""
        iv.settled = True
        ranks = list(range(self.spec.workers)) if ranks is None else ranks
        pay = interval_payment_ugpc(self.price_ugpc_per_worker_hour, len(ranks), iv.wall_ms)
        ordered = [iv.receipts[r] for r in ranks]
        reports = [iv.reports[r] for r in ranks] if iv.reports else None
        charged, burned, treasury, epoch = self.coord.settle_interval(self.job_id, ordered, reports, pay)
        if charged < pay:  # the escrow could not cover the whole interval
            self.stop(f"the budget is spent ({format_gpc(self.spec.budget_ugpc)} GPC); raise --budget to train longer")
        self.money["paid"] += charged
        self.money["burned"] += burned
        self.money["treasury"] += treasury
        if charged:
            self.open_epochs.add(epoch)

    def charge_void(self, iv: Interval) -> None:
        """A void interval of a job whose package the policy does not vet: the submitter is charged
        what it would have cost, and all of it is burned (docs/verification.md, Vetted job packages)."""
        iv.settled = True
        pay = interval_payment_ugpc(self.price_ugpc_per_worker_hour, self.spec.workers, iv.wall_ms)
        # the Settlement cites a report that counts as void (a fail does, in a job of an unvetted package)
        reports = sorted(iv.reports, key=lambda rep: effective_verdict(rep.message["verdict"], self.vetted) != "void")
        charged, _ = self.coord.charge_void(self.job_id, reports, pay)
        self.money["paid"] += charged
        self.money["burned"] += charged
        self.ui.note(
            f"steps {iv.start}-{iv.end}: the job's package is not vetted; the void interval is charged "
            f"({format_gpc(charged)} GPC) and burned"
        )

    def close_epochs(self) -> None:
        """Close every ended epoch of the whole ledger (``Coordinator.close_epochs``) and count what
        the closed ones minted for this job's receipts (whoever closed them)."""
        self.coord.close_epochs()
        mine = {r.digest for iv in self.intervals.values() for r in iv.receipts.values()} | self.superseded_receipts
        for ep in sorted(self.open_epochs):
            if self.ledger.epoch_close(ep) is None:
                continue
            self.open_epochs.discard(ep)
            rewards = [r for r in self.ledger.epoch_rewards(ep) if r.receipt_digest in mine]
            minted = sum(r.amount_ugpc for r in rewards)
            self.money["minted"] += minted
            if rewards:
                self.ui.note(
                    f"epoch {ep} closed: minted {format_gpc(minted)} GPC to {len({r.address for r in rewards})} accounts of this job"
                )

    # -- the job goes on --------------------------------------------------------
    def rewind_point(self) -> tuple[int, list[int]] | None:
        """After ``run`` ended on a proven fraud: (the step the job trains again from, the
        convicted ranks), or None (no fraud, or ``MAX_REWINDS`` reached).

        First settles every interval still held or passed (their challenge window ends now):
        what trained before the fraud is not disowned, and a superseded interval is charged no
        more. The step is then the newest settled one (``last_settled_step``)."""
        frauds = sum(rw.kind == RewindKind.FRAUD for rw in self.rewinds)
        if self.fraud_at is None or frauds >= MAX_REWINDS or self.outstanding():
            return None
        self.settle_held(force=True)
        to_step = self.last_settled_step()
        ranks = sorted({r for iv in self.intervals.values() if iv.start >= to_step for r in iv.failed_ranks})
        return to_step, ranks

    def group_point(self) -> int | None:
        """After ``run`` ended on a void interval of a vetted job of several ranks, and no fraud:
        the step to re-run that interval from (its start), once every interval before it is
        settled (``settle_held(force=True)``); None otherwise, or if one before it could not be
        settled (the job then ends there)."""
        if self.void_at is None or self.fraud_at is not None or self.outstanding():
            return None
        self.settle_held(force=True)
        step = self.last_settled_step()
        return step if step == self.void_at else None

    def restart(
        self,
        to_step: int,
        rank_worker: list[str],
        assignments: tuple[str, ...],
        inbox: Inbox,
        now_s: float,
        kind: RewindKind = RewindKind.FRAUD,
        end_step: int | None = None,
    ) -> None:
        """The job was rewound to ``to_step`` (its Rewind is recorded, for ``kind``) and its ranks
        are launched again, rank r by ``rank_worker[r]`` under ``assignments[r]``, reporting to
        ``inbox``: the intervals from ``to_step`` on start afresh (the old ones go into
        ``rewinds``); the ranks stop at ``end_step`` (None: the job's end), and a launch that
        stops there (a group test's re-run) has every interval replayed (``check_all``).

        Raises:
            ValueError: ``to_step`` is not the start of an interval, or a list is not one per rank.
        """
        W = self.spec.workers
        if to_step not in self.intervals or len(rank_worker) != W or len(assignments) != W:
            raise ValueError(
                f"a restart at step {to_step} with {len(rank_worker)} workers and {len(assignments)} assignments "
                f"for a job of {self.spec.workers} ranks and intervals starting at {sorted(self.intervals)}"
            )
        old = [iv for iv in self.intervals.values() if iv.start >= to_step]
        self.rewinds.append(
            RewindRecord(
                kind=kind,
                to_step=to_step,
                reason=self.stopped or "",
                intervals={f"{iv.start}-{iv.end}": iv.outcome for iv in old},
                failed_ranks={f"{iv.start}-{iv.end}": iv.failed_ranks for iv in old if iv.failed_ranks},
                replaced={r: (self.rank_worker[r], w) for r, w in enumerate(rank_worker) if w != self.rank_worker[r]},
            )
        )
        for iv in old:
            self.superseded_receipts |= {r.digest for r in iv.receipts.values()}
            self.intervals[iv.start] = Interval(iv.start, iv.end)
        self.rank_worker, self.assignments, self.inbox = list(rank_worker), tuple(assignments), inbox
        self.stopped, self.fraud_at, self.void_at, self.check_all = None, None, None, end_step is not None
        self.end_step = self.spec.steps if end_step is None else end_step
        self.meter.restart(now_s)
        self.t_step, self.last_progress_step = None, to_step

    def last_settled_step(self) -> int:
        """The end of the last interval, counted from step 0 without a gap, that was settled
        (passed or unchecked): the newest checkpoint the job vouches for (0 if none)."""
        step = 0
        for iv in sorted(self.intervals.values(), key=lambda i: i.start):
            if iv.outcome not in ("passed", "unchecked"):
                break
            step = iv.end
        return step

    def _receipts_ending(self, step: int) -> list[SignedMessage]:
        """Per rank, its receipt for the interval ending at ``step`` (empty for step 0)."""
        if step == 0:
            return []
        iv = next(i for i in self.intervals.values() if i.end == step)
        return [iv.receipts[r] for r in range(self.spec.workers)]

    def start_receipts(self, step: int) -> list[str]:
        """Per rank, the digest of its receipt for the interval ending at ``step`` (empty for step
        0): what its next receipt names as ``previousReceipt``."""
        return [r.digest for r in self._receipts_ending(step)]

    def end_manifests(self, step: int) -> list[str]:
        """Per rank, the ``checkpointHash`` its receipt for the interval ending at ``step`` signed
        (empty for step 0, whose state follows from the seed)."""
        return [r.message["checkpointHash"] for r in self._receipts_ending(step)]


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
