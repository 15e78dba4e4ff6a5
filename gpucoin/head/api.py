"""The head's HTTP API (FastAPI): reads are public, every economic request is a signed message.

    GET  /v1/status    HeadStatus
    GET  /v1/nodes     [NodeView]: registered nodes, newest registration per node, Ray's liveness
    POST /v1/nodes     RegisterRequest -> NodeView: admit a node (``head.admit``), record its signed
                       NodeRegistration and bond its stake, in one ledger transaction
    POST /v1/faucet    FaucetRequest -> FaucetResult: dev money (a dev network only)
    GET  /v1/accounts/{address}   AccountView: available, bonded, unbonding, withdrawable
    POST /v1/unbond    SignedRequest (an Unbond) -> AccountView: bonded -> unbonding
    POST /v1/withdraw  SignedRequest (a Withdraw) -> AccountView: matured unbonding -> available
    PUT  /v1/packages/{hash}      a job package (zip) -> PackageAnswer: kept only under the hash
                       its files have (``head.packages``)
    POST /v1/jobs      SubmitJobRequest -> JobView: a signed JobOrder and its spec; escrowed and
                       queued in one request (a retry of the same order changes nothing)
    GET  /v1/jobs, /v1/jobs/{id}, /v1/jobs/{id}/events?after=N   JobView(s), the job's log
    POST /v1/jobs/{id}/cancel     SignedRequest (its consumer's JobCancel) -> JobView: a queued job
                       is refunded; a running one stops at its next interval boundary, is settled
                       for what was verified and refunded the rest
    GET  /metrics      Prometheus text (``head.metrics``)

    The ranks and the verifier of a running job (``runtime.channel.HttpChannel``; every input
    screened, nothing here moves money):
    GET  /v1/jobs/{id}/launch     JobLaunch: what its Ray driver starts
    GET  /v1/jobs/{id}/stop       StopAnswer: stop at the next interval boundary?
    POST /v1/jobs/{id}/progress   ProgressReport (display only)
    POST /v1/jobs/{id}/receipts   ReceiptSubmission -> InboxAnswer (``runtime.inbox.JobInbox``)
    PUT  /v1/jobs/{id}/objects    bytes -> ObjectAnswer; GET .../objects/{digest}; POST .../objects/has
    GET  /v1/jobs/{id}/replays?verifier=A&wait_s=W   ReplayQueue: the drawn replays the job's replay
                                  worker (of verifier A; all without it) is to run, held up to W s
                                  (at most REPLAY_WAIT_MAX_S) while there are none
    GET  /v1/jobs/{id}/replays/{rid}?worker=G   a drawn interval's ReplayRequest (taken by replay
                       worker generation G); POST: the verifier's ReplayAnswer

Errors answer ``{"detail": "<one line>"}`` with 400 (malformed), 403 (refused), 404 (no such job,
or not running), 409 (conflict: a nonce or an id used before, too little money, stake not
matured), 410 (an object the job's store does not hold: the verifier's loader pins that on the
rank whose signed manifest names it) or 503 (Ray's state cannot be read).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from fastapi import Request  # at module level: FastAPI reads route annotations from these globals

from gpucoin.exceptions import (
    ConflictError,
    GpucoinError,
    HeadError,
    InsufficientFunds,
    NodeRefused,
    ObjectMissing,
    RuleViolation,
    SpecError,
    Unauthorized,
    UnknownJob,
)
from gpucoin.head.admit import check_registration
from gpucoin.head.jobs import MAX_JOB_STORE_BYTES, JobBoard, JobTable, check_job_id, job_order, job_view
from gpucoin.head.packages import MAX_PACKAGE_BYTES, PackageStore
from gpucoin.head.ray_state import RayNode
from gpucoin.head.records import (
    AccountView,
    CheckRecord,
    FaucetRequest,
    FaucetResult,
    HasAnswer,
    HasRequest,
    HeadStatus,
    InboxAnswer,
    JobEvent,
    JobLaunch,
    JobState,
    JobView,
    NodeRole,
    NodeState,
    NodeView,
    ObjectAnswer,
    PackageAnswer,
    PolicyRef,
    ProgressReport,
    ReceiptSubmission,
    RegisterRequest,
    ReplayAnswer,
    ReplayQueue,
    ServiceConfig,
    SignedRequest,
    StopAnswer,
    SubmitJobRequest,
)
from gpucoin.head.versions import versions
from gpucoin.ledger import Ledger
from gpucoin.ledger.accounts import wallet_account
from gpucoin.policy.model import policy_hash
from gpucoin.spec import JobSpec, spec_digest
from gpucoin.storage import ContentStore
from gpucoin.wallet.messages import MessageFieldError, SignedMessage, loads_json, parse_address, verify

if TYPE_CHECKING:
    from gpucoin.head.metrics import HeadMetrics

REPLAY_WAIT_MAX_S = 10.0
"""Longest a replay worker's ``GET /v1/jobs/{id}/replays?wait_s=`` is held open while it has no
work (a long poll: an idle worker asks every few seconds, not twice a second, on the cores the
ranks share; well under the client's ``REQUEST_TIMEOUT_S``)."""
REPLAY_WAIT_POLL_S = 0.1

FAUCET_MAX_UGPC = 10_000_000_000
"""The most one faucet request mints: 10,000 GPC (dev money, but a bound all the same)."""


def status(ledger: Ledger, cfg: ServiceConfig) -> HeadStatus:
    """The ``HeadStatus`` of ``ledger``'s market now."""
    from gpucoin import __version__

    genesis = ledger.genesis
    assert genesis is not None  # the service opened or wrote one
    totals = ledger.totals()
    counts = ledger.market_counts()["messages"]
    return HeadStatus(
        gpucoin_version=__version__,
        dev=genesis.dev,
        ray_address=cfg.ray_address,
        chain_id=genesis.policy.chain_id,
        coordinator=genesis.coordinator,
        policy=PolicyRef(name=genesis.policy.name, version=genesis.policy.version, hash=policy_hash(genesis.policy)),
        epoch=ledger.current_epoch(),
        supply_ugpc=totals["supply"],
        minted_ugpc=totals["minted"],
        burned_ugpc=totals["burned"],
        slashed_ugpc=totals["slashed"],
        jobs=counts.get("JobOrder", 0),
        nodes=counts.get("NodeRegistration", 0),
        tolerance_rel_l2=genesis.policy.verification.tolerance_rel_l2,
        versions=versions(),
    )


def stored_message(row) -> SignedMessage:
    """The ``SignedMessage`` a ledger ``MessageRow`` holds."""
    typed = loads_json(row.typed_data)
    return SignedMessage.from_dict(
        {
            "primaryType": typed["primaryType"],
            "domain": typed["domain"],
            "message": typed["message"],
            "digest": row.digest,
            "signature": row.signature,
            "signer": row.signer,
        }
    )


def registrations(ledger: Ledger) -> dict[str, SignedMessage]:
    """The newest admitted NodeRegistration of each node id, by node id."""
    out: dict[str, SignedMessage] = {}
    for row in ledger.messages("NodeRegistration"):  # in recording order: a later one wins
        msg = stored_message(row)
        out[msg.message["nodeId"]] = msg
    return out


def node_role(resources: str) -> NodeRole:
    """The role a registration declares in its ``resources`` JSON (``"role"``; volunteer if none)."""
    try:
        return NodeRole(json.loads(resources).get("role", NodeRole.VOLUNTEER.value))
    except (ValueError, AttributeError, TypeError):
        return NodeRole.VOLUNTEER


def node_views(ledger: Ledger, ray_nodes: Mapping[str, RayNode]) -> list[NodeView]:
    """Every registered node with its provider's bond, verification record, proven frauds (and
    whether they ban it) and Ray's liveness, in the order the nodes first registered (the head
    asks verifiers in that order: the first free one replays a job's intervals, the next
    re-checks them)."""
    views = []
    regs = list(registrations(ledger).items())
    records = ledger.verification_records(r.message["provider"] for _, r in regs)
    frauds = ledger.proven_frauds(r.message["provider"] for _, r in regs)
    verification, ban_after = ledger.policy.verification, ledger.policy.slashing.ban_after_frauds
    for node_id, reg in regs:
        m = reg.message
        node = ray_nodes.get(node_id)
        views.append(
            NodeView(
                node_id=node_id,
                provider=m["provider"],
                ask_ugpc_per_worker_hour=m["askPerWorkerHour"],
                resources=m["resources"],
                bonded_ugpc=ledger.balance(wallet_account(m["provider"], "bonded")),
                state=NodeState.ALIVE if node is not None and node.alive else NodeState.GONE,
                role=node_role(m["resources"]),
                registration=reg.digest,
                checks=CheckRecord.of(records[m["provider"]], verification),
                frauds=frauds[m["provider"]],
                banned=frauds[m["provider"]] >= ban_after,
            )
        )
    return views


def account_view(ledger: Ledger, address: str) -> AccountView:
    """What ``address`` holds on ``ledger`` now; withdrawable: unbonding stake matured by this epoch.

    Raises:
        MessageFieldError: ``address`` is no address (or a mixed-case one with a wrong checksum).
    """
    checksummed = parse_address(address, "address")
    epoch = ledger.current_epoch()
    entries = ledger.unbonding(checksummed)
    later = [e for e in entries if e > epoch]
    return AccountView(
        address=checksummed,
        available_ugpc=ledger.balance(wallet_account(checksummed)),
        bonded_ugpc=ledger.balance(wallet_account(checksummed, "bonded")),
        unbonding_ugpc=sum(entries.values()),
        withdrawable_ugpc=sum(a for e, a in entries.items() if e <= epoch),
        epoch=epoch,
        next_maturity_epoch=min(later) if later else None,
    )


_STATUS_OF: tuple[tuple[type[Exception], int], ...] = (
    (HeadError, 503),
    (UnknownJob, 404),
    (ObjectMissing, 410),
    (NodeRefused, 403),
    (Unauthorized, 403),
    (InsufficientFunds, 409),
    (ConflictError, 409),
    (RuleViolation, 409),
)


def http_status(e: GpucoinError) -> int:
    """The HTTP status answering ``e``: the most specific class in ``_STATUS_OF`` wins; else 400."""
    best, code = None, 400
    for cls, c in _STATUS_OF:
        if isinstance(e, cls) and (best is None or issubclass(cls, best)):
            best, code = cls, c
    return code


def _json_response_class():
    from fastapi.responses import JSONResponse

    from gpucoin.jsonsafe import dumps

    class JsSafeJSONResponse(JSONResponse):
        """JSON in which an integer above 2**53 - 1 is its decimal string (``gpucoin.jsonsafe``),
        so a JavaScript client reads every amount and nonce exactly."""

        def render(self, content) -> bytes:
            return dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")

    return JsSafeJSONResponse


def make_app(
    ledger: Ledger,
    cfg: ServiceConfig,
    coordinator,
    ray_nodes: Callable[[], Mapping[str, RayNode]],
    board: JobBoard | None = None,
    metrics: HeadMetrics | None = None,
):
    """The head's FastAPI application.

    Args:
        ledger: the open ledger (its Genesis written).
        cfg: the service's settings.
        coordinator: a ``coordinator.settle.Coordinator`` over ``ledger`` (writes go through it,
            one at a time: under its ``lock`` when it has one, ``scheduler.LockedCoordinator``).
        ray_nodes: reads Ray's nodes by id (``ray_state.list_nodes`` in the service).
        board: the running jobs the scheduler shares (default: a board of no running job under
            ``<cfg.home>/jobs``).
        metrics: the head's metrics, which the scheduler observes too (default: fresh ones).
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from gpucoin import __version__
    from gpucoin.head.metrics import HeadMetrics

    JsSafeJSON = _json_response_class()
    app = FastAPI(
        title="gpucoin head", version=__version__, docs_url=None, redoc_url=None, default_response_class=JsSafeJSON
    )
    registry = (metrics or HeadMetrics(ledger, ray_nodes)).registry
    # one coordinator write at a time: its nonce source and key are shared
    writes = getattr(coordinator, "lock", None) or threading.RLock()
    board = board or JobBoard(cfg.home / "jobs")
    table = JobTable(ledger.engine)
    packages = PackageStore(cfg.home / "packages")

    @app.exception_handler(GpucoinError)
    def refused(request: Request, e: GpucoinError) -> JSONResponse:
        return JsSafeJSON({"detail": " ".join(str(e).split())}, status_code=http_status(e))

    @app.get("/v1/status", response_model=HeadStatus)
    def get_status() -> HeadStatus:
        return status(ledger, cfg)

    @app.get("/v1/nodes", response_model=list[NodeView])
    def get_nodes() -> list[NodeView]:
        return node_views(ledger, ray_nodes())

    @app.post("/v1/nodes", response_model=NodeView)
    def post_node(body: RegisterRequest) -> NodeView:
        reg = SignedMessage.from_dict(body.registration)
        if reg.primary_type != "NodeRegistration":
            raise MessageFieldError(f"expected a signed NodeRegistration, got a {reg.primary_type}")
        # the signature first: a forged request costs one recovery, never a read of Ray or the ledger
        verify(reg, expected_signer=reg.message["provider"], domain=ledger.domain)
        with writes:
            known = ray_nodes()
            holders = {n: r.message["provider"] for n, r in registrations(ledger).items()}
            check_registration(reg, known, holders)
            if reg.message["stake"] > 0:
                coordinator.bond(reg)
            else:
                coordinator.record(reg)
        board.wake.set()
        (view,) = [v for v in node_views(ledger, known) if v.node_id == reg.message["nodeId"]]
        return view

    @app.post("/v1/faucet", response_model=FaucetResult)
    def post_faucet(body: FaucetRequest) -> FaucetResult:
        genesis = ledger.genesis
        if genesis is None or not genesis.dev:
            raise Unauthorized("the faucet exists only on a dev network (gpucoin up --dev)")
        if body.amount_ugpc > FAUCET_MAX_UGPC:
            raise Unauthorized(f"at most {FAUCET_MAX_UGPC} µGPC per faucet request, asked {body.amount_ugpc}")
        recipient = parse_address(body.recipient, "recipient")
        with writes:
            # the id names the content too: a retry changes nothing, another grant under a used id is another grant
            op_id = f"faucet:request:{recipient}:{body.amount_ugpc}:{body.request_id}"
            coordinator.faucet(recipient, body.amount_ugpc, op_id)
        available = ledger.balance(wallet_account(recipient))
        return FaucetResult(recipient=recipient, amount_ugpc=body.amount_ugpc, available_ugpc=available)

    @app.get("/v1/accounts/{address}", response_model=AccountView)
    def get_account(address: str) -> AccountView:
        return account_view(ledger, address)

    def signed_of(body: SignedRequest, kind: str) -> SignedMessage:
        msg = SignedMessage.from_dict(body.message)
        if msg.primary_type != kind:
            raise MessageFieldError(f"expected a signed {kind}, got a {msg.primary_type}")
        return msg

    @app.post("/v1/unbond", response_model=AccountView)
    def post_unbond(body: SignedRequest) -> AccountView:
        msg = signed_of(body, "Unbond")
        with writes:
            coordinator.unbond(msg)
        return account_view(ledger, msg.message["provider"])

    @app.post("/v1/withdraw", response_model=AccountView)
    def post_withdraw(body: SignedRequest) -> AccountView:
        msg = signed_of(body, "Withdraw")
        with writes:
            coordinator.withdraw(msg)
        return account_view(ledger, msg.message["provider"])

    # -- jobs: the submitter's side --------------------------------------------
    async def body_of(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise SpecError(f"a request body of at most {limit} bytes, declared {declared}")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise SpecError(f"a request body of at most {limit} bytes")
        return bytes(data)

    @app.put("/v1/packages/{package_hash}", response_model=PackageAnswer)
    async def put_package(package_hash: str, request: Request) -> PackageAnswer:
        from starlette.concurrency import run_in_threadpool

        data = await body_of(request, MAX_PACKAGE_BYTES)
        n = await run_in_threadpool(packages.put, package_hash, data)
        return PackageAnswer(package_hash=package_hash.lower(), files=n)

    @app.post("/v1/jobs", response_model=JobView)
    def post_job(body: SubmitJobRequest) -> JobView:
        order = SignedMessage.from_dict(body.order)
        if order.primary_type != "JobOrder":
            raise MessageFieldError(f"expected a signed JobOrder, got a {order.primary_type}")
        m = order.message
        job_id = check_job_id(m["jobId"])
        try:
            spec = JobSpec.model_validate(body.spec)
        except ValueError as e:
            raise SpecError(f"the job spec does not validate: {str(e).splitlines()[0]}") from None
        if spec_digest(spec) != m["specHash"]:
            raise SpecError(f"the spec hashes to {spec_digest(spec)}, the order signed specHash {m['specHash']}")
        wanted = {
            "workers": (spec.workers, m["workers"]),
            "bid": (spec.bid_ugpc_per_worker_hour, m["bidPerWorkerHour"]),
            "budget": (spec.budget_ugpc, m["budget"]),
        }
        for what, (in_spec, in_order) in wanted.items():
            if in_spec != in_order:
                raise SpecError(f"the spec's {what} is {in_spec}, the order's {in_order}")
        if packages.path(m["packageHash"]) is None:
            raise SpecError(f"no package {m['packageHash']} was uploaded (PUT /v1/packages/{{hash}} first)")
        with writes:
            try:
                row = table.get(job_id)
            except UnknownJob:
                row = None
            if row is not None:
                if ledger.message(order.digest) is None:
                    raise ConflictError(f"job {job_id} exists with another order")
                return job_view(row)  # a retry of the same order
            coordinator.escrow(order)
            row = table.add(job_id, m["consumer"], spec)
        board.log(
            job_id,
            f"queued: {spec.workers} worker(s), {spec.steps} steps, bid {m['bidPerWorkerHour']} µGPC/worker-hour",
        )
        board.wake.set()
        return job_view(row)

    @app.get("/v1/jobs", response_model=list[JobView])
    def get_jobs() -> list[JobView]:
        return [job_view(r) for r in table.all()]

    @app.get("/v1/jobs/{job_id}", response_model=JobView)
    def get_job(job_id: str) -> JobView:
        return job_view(table.get(job_id))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobView)
    def post_cancel(job_id: str, body: SignedRequest) -> JobView:
        msg = signed_of(body, "JobCancel")
        row = table.get(job_id)
        if msg.message["jobId"] != job_id:
            raise MessageFieldError(f"the JobCancel names job {msg.message['jobId']!r}, not {job_id!r}")
        verify(msg, domain=ledger.domain)
        if msg.signer != row.consumer:
            raise Unauthorized(f"only job {job_id}'s consumer {row.consumer} cancels it, not {msg.signer}")
        with writes:  # the market round places a job under the same lock: a cancel comes before or after it
            state = JobState(table.get(job_id).state)
            if state == JobState.QUEUED:
                coordinator.refund(job_id, job_order(ledger, job_id))
                table.update(job_id, state=JobState.CANCELLED, reason="cancelled by its consumer before it was placed")
                board.log(job_id, "cancelled by its consumer; the escrow was refunded")
            elif state == JobState.RUNNING:
                running = board.running(job_id)
                if not running.cancelled:
                    running.cancelled = True
                    running.inbox.stop("cancelled by its consumer")
                    board.log(job_id, "cancelled by its consumer: stopping at the next interval boundary")
        return job_view(table.get(job_id))

    @app.get("/v1/jobs/{job_id}/events", response_model=list[JobEvent])
    def get_job_events(job_id: str, after: int = 0) -> list[JobEvent]:
        table.get(job_id)
        return board.events(job_id, after)

    # -- jobs: the ranks' and the verifier's side ------------------------------
    @app.get("/v1/jobs/{job_id}/launch", response_model=JobLaunch)
    def get_launch(job_id: str) -> JobLaunch:
        return board.running(job_id).launch

    @app.get("/v1/jobs/{job_id}/stop", response_model=StopAnswer)
    def get_stop(job_id: str) -> StopAnswer:
        return StopAnswer(reason=board.running(job_id).inbox.stop_reason())

    @app.post("/v1/jobs/{job_id}/progress", response_model=StopAnswer)
    def post_progress(job_id: str, body: ProgressReport) -> StopAnswer:
        inbox = board.running(job_id).inbox
        inbox.progress(body.step, body.loss, body.lr)
        return StopAnswer(reason=inbox.stop_reason())

    @app.post("/v1/jobs/{job_id}/receipts", response_model=InboxAnswer)
    def post_receipt(job_id: str, body: ReceiptSubmission) -> InboxAnswer:
        import numpy as np

        inbox = board.running(job_id).inbox
        rows = {len(r) for r in body.sketches}
        if len(rows) != 1:
            return InboxAnswer(accepted=False, reason="sketches must be a non-empty (steps, B) array")
        reply = inbox.submit_receipt(
            body.rank, body.receipt_json, np.asarray(body.sketches, dtype=np.float64), list(body.losses)
        )
        return InboxAnswer(accepted=reply.accepted, reason=reply.reason, busy=reply.busy)

    @app.put("/v1/jobs/{job_id}/objects", response_model=ObjectAnswer)
    async def put_object(job_id: str, request: Request) -> ObjectAnswer:
        from starlette.concurrency import run_in_threadpool

        job = board.running(job_id)
        data = await body_of(request, job.store.max_object_bytes)
        if job.stored_bytes + len(data) > MAX_JOB_STORE_BYTES:
            raise Unauthorized(
                f"job {job_id} has put {job.stored_bytes} bytes, the most a job may is {MAX_JOB_STORE_BYTES}"
            )
        job.stored_bytes += len(data)
        return ObjectAnswer(digest=await run_in_threadpool(job.store.put, data))

    @app.get("/v1/jobs/{job_id}/objects/{digest}")
    def get_object(job_id: str, digest: str) -> Response:
        try:
            store = board.running(job_id).store
        except UnknownJob:  # an ended job's checkpoints stay readable (``gpucoin pull``)
            table.get(job_id)
            store = ContentStore(board.job_dir(job_id) / "store")
        return Response(store.get(digest), media_type="application/octet-stream")

    @app.post("/v1/jobs/{job_id}/objects/has", response_model=HasAnswer)
    def post_has(job_id: str, body: HasRequest) -> HasAnswer:
        return HasAnswer(present=board.running(job_id).store.has(body.digests))

    @app.get("/v1/jobs/{job_id}/replays", response_model=ReplayQueue)
    async def get_replays(job_id: str, verifier: str | None = None, wait_s: float = 0.0) -> ReplayQueue:
        # async: a held long poll waits on the event loop, not on one of the request threads
        deadline = time.monotonic() + min(max(wait_s, 0.0), REPLAY_WAIT_MAX_S)
        while True:
            try:
                replays = board.running(job_id).replays
            except UnknownJob:
                return ReplayQueue(pending=[], open=False)
            pending = [
                rid
                for rid, r in list(replays.items())
                if r.answer is None and not r.cancelled and verifier in (None, r.verifier)
            ]
            if pending or time.monotonic() >= deadline:
                return ReplayQueue(pending=pending, open=True)
            await asyncio.sleep(REPLAY_WAIT_POLL_S)

    @app.get("/v1/jobs/{job_id}/replays/{replay_id}")
    def get_replay(job_id: str, replay_id: str, worker: int | None = None) -> dict:
        replay = board.running(job_id).replays.get(replay_id)
        if replay is None:
            raise UnknownJob(f"job {job_id} drew no replay {replay_id!r}")
        if worker is not None and replay.started_by is None:
            # read by anyone; a wrong mark only makes a worker's death fail this replay, not retry it
            replay.started_by = worker
        return replay.request

    @app.post("/v1/jobs/{job_id}/replays/{replay_id}", response_model=StopAnswer)
    def post_replay(job_id: str, replay_id: str, body: ReplayAnswer) -> StopAnswer:
        replay = board.running(job_id).replays.get(replay_id)
        if replay is None:
            raise UnknownJob(f"job {job_id} drew no replay {replay_id!r}")
        # anyone can reach this endpoint: only an answer signed by the job's verifier takes the slot
        # (else a forged one would stand and fail the job); the runner checks what the reports name
        if body.verifier != replay.verifier or not body.reports:
            raise Unauthorized(f"replay {replay_id} of job {job_id} is answered by its verifier {replay.verifier}")
        for text in body.reports:
            verify(SignedMessage.from_json(text), expected_signer=replay.verifier, domain=ledger.domain)
        if replay.answer is None:  # the verifier's first answer stands
            replay.answer = body
        return StopAnswer(reason=None)

    @app.get("/metrics")
    def get_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
