"""Typed records of the head: its settings, where it runs, and what its API answers.

``ServiceConfig`` is what ``gpucoin up`` hands the head service process (a 0600 file, no secret in
it: the dev coordinator key is read by the service from its own keystore); ``HeadInfo`` is what
``gpucoin up`` writes beside it for ``gpucoin down`` and ``gpucoin status`` on the same host;
``HeadStatus`` is the body of ``GET /v1/status``. All closed schemas: unknown keys are errors.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gpucoin.cluster.embedded import check_short_temp_dir
from gpucoin.cluster.procs import ProcessRef

HEAD_TEMP_PREFIX = "gpucoin-head-"
"""Prefix of a head's Ray temp dir (``short_temp_dir``)."""

_CLOSED = ConfigDict(extra="forbid", frozen=True)


class ServiceConfig(BaseModel):
    """Settings of one head service process."""

    model_config = _CLOSED

    home: Path = Field(description="the head's state directory (ledger, dev wallets, logs)")
    ledger_url: str = Field(description="SQLAlchemy URL of the ledger database")
    dev: bool = Field(description="a development network: dev Genesis, dev coordinator key, faucet")
    coordinator_keystore: Path | None = Field(
        default=None,
        description="the coordinator's keystore, its password read on the service's stdin (None: the dev "
        "coordinator wallet under home)",
    )
    api_host: str = Field(description="address the HTTP API listens on")
    api_port: int = Field(ge=1, le=65535, description="TCP port of the HTTP API (and /metrics)")
    ray_address: str = Field(description="host:port of the Ray head's GCS, which volunteers join")
    dashboard_url: str = Field(description="Ray's dashboard (job submission, state API) on loopback")
    ray_token_path: Path = Field(description="the cluster's Ray token file, for the dashboard's API")


class HeadInfo(BaseModel):
    """Where a head started by ``gpucoin up`` runs (``<home>/head.json``)."""

    model_config = _CLOSED

    ray_address: str = Field(description="host:port volunteers join (``gpucoin join --address``)")
    api_url: str = Field(description="base URL of the head's HTTP API")
    metrics_url: str = Field(description="Prometheus text endpoint")
    dashboard_url: str = Field(description="Ray's dashboard, loopback only")
    token_path: Path = Field(description="the cluster's Ray token file (0600)")
    ray_temp_dir: Path = Field(description="Ray's temp dir for this head (removed by ``gpucoin down``)")
    ray_head: ProcessRef
    service: ProcessRef
    dev: bool

    @field_validator("ray_temp_dir")
    @classmethod
    def _a_head_temp_dir(cls, v: Path) -> Path:
        # ``down`` ends every process naming it and removes it: never a path a record was edited to
        return check_short_temp_dir(v, HEAD_TEMP_PREFIX)


class Versions(BaseModel):
    """Versions a joining node must share with the head (Ray's wire protocol, pickled Python
    objects and DeepSpeed's collectives differ between releases)."""

    model_config = _CLOSED

    gpucoin: str
    python: str = Field(description="major.minor.micro")
    ray: str
    torch: str
    deepspeed: str


class PolicyRef(BaseModel):
    """The policy in force: its name, version and hash (keccak256 of its canonical JSON)."""

    model_config = _CLOSED

    name: str
    version: int
    hash: str


class HeadStatus(BaseModel):
    """``GET /v1/status``: the head and its market at a glance (amounts in µGPC)."""

    model_config = _CLOSED

    gpucoin_version: str
    dev: bool
    ray_address: str
    chain_id: int
    coordinator: str = Field(description="the coordinator's address: the EIP-712 verifyingContract")
    policy: PolicyRef
    epoch: int = Field(description="the ledger's current emission epoch")
    supply_ugpc: int
    minted_ugpc: int
    burned_ugpc: int
    slashed_ugpc: int
    jobs: int = Field(description="JobOrders the ledger holds")
    nodes: int = Field(description="NodeRegistrations the ledger holds")
    tolerance_rel_l2: float = Field(description="the policy's replay tolerance, which a verifier's signer judges by")
    versions: Versions


class NodeState(str, Enum):
    """A registered node as the head sees it in Ray: ``alive``, or ``gone`` (dead or unknown)."""

    ALIVE = "alive"
    GONE = "gone"


class NodeRole(str, Enum):
    """What a joined node offers: training ranks (``volunteer``) or replays (``verifier``)."""

    VOLUNTEER = "volunteer"
    VERIFIER = "verifier"


class CheckRecord(BaseModel):
    """A node's verification record (``verify.sampling.VerificationRecord``, from the ledger's signed
    VerificationReports over every job) and the probability its next interval is replayed."""

    model_config = _CLOSED

    passed: int = Field(ge=0, description="reports that passed its receipts")
    other: int = Field(ge=0, description="reports that failed or voided its receipts")
    clean_streak: int = Field(ge=0, description="passes since its newest report that was not a pass")
    check_probability: float = Field(ge=0.0, le=1.0, description="the policy's probability for this record")

    @classmethod
    def of(cls, record, verification) -> CheckRecord:
        """From a ``VerificationRecord`` under the policy's ``verification`` section."""
        from gpucoin.verify.sampling import check_probability

        return cls(
            passed=record.passed,
            other=record.other,
            clean_streak=record.clean_streak,
            check_probability=check_probability(verification, record),
        )


class NodeView(BaseModel):
    """``GET /v1/nodes``: one registered node (its newest NodeRegistration), amounts in µGPC."""

    model_config = _CLOSED

    node_id: str = Field(description="Ray's node id (hex)")
    provider: str = Field(description="the address that signed the registration")
    ask_ugpc_per_worker_hour: int
    resources: str = Field(description="what the node declared (untrusted; the market counts Ray's view)")
    bonded_ugpc: int = Field(description="the provider's whole bonded balance")
    state: NodeState
    role: NodeRole = Field(description="what it offers, as its registration declares")
    registration: str = Field(description="digest of the NodeRegistration")
    checks: CheckRecord = Field(description="its provider's verification record and check probability")
    frauds: int = Field(default=0, description="times its provider was slashed, as a worker or a verifier")
    banned: bool = Field(
        default=False, description="its provider reached the policy's ban_after_frauds: it is never placed again"
    )


class RegisterRequest(BaseModel):
    """``POST /v1/nodes``: a NodeRegistration signed by the provider (``SignedMessage`` JSON)."""

    model_config = _CLOSED

    registration: dict


class FaucetRequest(BaseModel):
    """``POST /v1/faucet`` (a dev head only): mint ``amount_ugpc`` to ``recipient``, once per
    ``request_id`` (client-chosen, so a retry never pays twice)."""

    model_config = _CLOSED

    recipient: str
    amount_ugpc: int = Field(gt=0)
    request_id: str = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")


class FaucetResult(BaseModel):
    """What ``POST /v1/faucet`` did: the recipient's available balance after it."""

    model_config = _CLOSED

    recipient: str
    amount_ugpc: int
    available_ugpc: int


class SignedRequest(BaseModel):
    """``POST /v1/unbond`` and ``/v1/withdraw``: the provider's signed Unbond or Withdraw
    (``SignedMessage`` JSON)."""

    model_config = _CLOSED

    message: dict


class AccountView(BaseModel):
    """``GET /v1/accounts/{address}``: a wallet's money on the ledger now (µGPC)."""

    model_config = _CLOSED

    address: str
    available_ugpc: int
    bonded_ugpc: int
    unbonding_ugpc: int
    withdrawable_ugpc: int = Field(description="unbonding stake matured by the current epoch")
    epoch: int
    next_maturity_epoch: int | None = Field(description="when the next unbonding stake matures, if any")


class JobState(str, Enum):
    """A job on the head: ``queued`` -> ``running`` -> ``succeeded`` | ``failed`` | ``cancelled``."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        """True once nothing more happens to the job (its escrow is settled and refunded)."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class SubmitJobRequest(BaseModel):
    """``POST /v1/jobs``: the consumer's signed JobOrder and the job spec its ``specHash`` names
    (``gpucoin.spec.spec_digest`` of this mapping); the package its ``packageHash`` names must be
    uploaded first (``PUT /v1/packages/{hash}``)."""

    model_config = _CLOSED

    order: dict
    spec: dict


class ReceiptCounts(BaseModel):
    """Receipts of a job by what became of them."""

    model_config = _CLOSED

    signed: int = 0
    checked: int = 0
    passed: int = 0
    failed: int = 0
    void: int = 0
    rejected: int = 0
    rechecked: int = Field(default=0, description="checked intervals a second verifier replayed again")


class JobEvaluation(BaseModel):
    """The head's evaluation of a job's final checkpoint, run as the job's code in a child
    process (``coordinator.jobcode.evaluate_in_child``)."""

    model_config = _CLOSED

    step: int = Field(description="the optimizer step of the checkpoint evaluated (the summary's ``steps``)")
    val_loss: float | None = Field(description="validation loss, nats per token; None if it could not be evaluated")
    uniform_loss: float | None = Field(description="ln(vocabulary size): the loss of a model that knows nothing")
    sample: str = Field(description="text the model generated, or why there is none")


class RankReplacement(BaseModel):
    """A rank a Rewind placed on another volunteer."""

    model_config = _CLOSED

    rank: int
    provider_before: str = Field(description="the provider whose node held the rank (a convicted one)")
    provider_after: str = Field(description="the volunteer that trained the rank from the Rewind on")


class RewindSummary(BaseModel):
    """One Rewind of a job (docs/protocol.md, Rewind): the steps from ``to_step`` were trained again."""

    model_config = _CLOSED

    kind: str = Field(
        "fraud", description="'fraud' (a rank convicted, replaced), 'group_test' (a re-run), 'resume' (after one)"
    )
    to_step: int = Field(description="the step the ranks trained again from (the newest settled step then)")
    reason: str = Field(description="why the job was stopped before it (the proven fraud)")
    intervals: dict[str, str] = Field(description="'start-end' -> outcome of each interval it superseded")
    failed_ranks: dict[str, list[int]] = Field(
        default_factory=dict, description="'start-end' -> the ranks a replay convicted in a superseded interval"
    )
    replaced: list[RankReplacement] = Field(default_factory=list)


class GroupRun(BaseModel):
    """One judged re-run of a group test: its suspects and fillers (providers) and what it showed."""

    model_config = _CLOSED

    suspects: list[str]
    fillers: list[str]
    outcome: str = Field(description="'diverged' (void again) or 'clean' (the replay passed)")


class GroupTestSummary(BaseModel):
    """A group test of a void interval (docs/verification.md, group testing)."""

    model_config = _CLOSED

    step: int = Field(description="the void interval's first step")
    suspects: list[str] = Field(description="the providers of its ranks, rank order")
    rounds: list[list[GroupRun]] = Field(default_factory=list)
    named: str | None = Field(description="the provider named and excluded from the market (never slashed), or None")
    cleared: list[str] = Field(default_factory=list, description="suspects a clean re-run cleared")


class JobSummary(BaseModel):
    """What a job that ended did (µGPC): ``steps`` is the end of the last interval settled
    without a gap from step 0 (the checkpoint the job vouches for)."""

    model_config = _CLOSED

    steps: int
    receipts: ReceiptCounts
    intervals: dict[str, str] = Field(description="'start-end' -> the interval's outcome")
    failed_ranks: dict[str, list[int]] = Field(
        default_factory=dict, description="'start-end' -> the ranks a replay convicted of it (failed intervals only)"
    )
    interval_wall_ms: dict[str, int] = Field(
        default_factory=dict,
        description="'start-end' -> metered worker time billed for the interval, ms (``coordinator.meter``)",
    )
    max_replay_distance: float | None = Field(
        default=None, description="the largest relative L2 distance a replay found (None: nothing replayed)"
    )
    check_probabilities: dict[str, float] = Field(
        default_factory=dict,
        description="'start-end' -> the probability its replay draw was held against, the largest of its ranks' "
        "nodes' (1.0 where it had to be replayed); no entry for an interval that was never drawn",
    )
    nodes: dict[str, CheckRecord] = Field(
        default_factory=dict, description="worker address -> its verification record once the job ended"
    )
    verifiers_slashed: dict[str, int] = Field(
        default_factory=dict,
        description="verifier address -> µGPC of its bond slashed because a re-check showed its report false",
    )
    escrowed_ugpc: int = 0
    treasury_ugpc: int = 0
    paid_ugpc: int
    burned_ugpc: int
    minted_ugpc: int
    slashed_ugpc: int
    refunded_ugpc: int
    stopped: str | None = Field(description="why the job stopped early, if it did")
    rewinds: list[RewindSummary] = Field(
        default_factory=list, description="each time the job trained steps again, in order"
    )
    group_tests: list[GroupTestSummary] = Field(
        default_factory=list, description="group tests of void intervals (who sent another gradient)"
    )
    checkpoint_receipts: list[str] = Field(
        default_factory=list,
        description="the signed WorkReceipts (JSON, rank order) of the interval that ended at ``steps``: their "
        "``checkpointHash`` names the checkpoint ``gpucoin pull`` fetches (empty after 0 steps)",
    )
    evaluation: JobEvaluation | None = Field(default=None, description="the final checkpoint's evaluation")


class JobView(BaseModel):
    """``GET /v1/jobs`` and ``/v1/jobs/{id}``: a job as the head sees it (µGPC)."""

    model_config = _CLOSED

    job_id: str
    consumer: str
    state: JobState
    workers: int
    steps: int
    bid_ugpc_per_worker_hour: int
    budget_ugpc: int
    submitted_ms: int = Field(description="when the head took the order (unix ms)")
    node_ids: list[str] = Field(description="Ray node id per rank, once placed")
    verifier_node: str | None
    price_ugpc_per_worker_hour: int | None = Field(description="the clearing price, once placed")
    step: int = Field(description="the newest optimizer step rank 0 reported")
    reason: str | None = Field(description="why it waits, or why it stopped")
    summary: JobSummary | None = Field(description="once it ended")
    spec: dict = Field(description="the job spec its JobOrder's specHash names")


class ReceiptSubmission(BaseModel):
    """``POST /v1/jobs/{id}/receipts``: a rank's signed WorkReceipt (JSON text), the sketches it
    commits to, (steps, B) float64, and its losses per step (nats/char). Screened by the job's
    ``JobInbox`` before anything is kept."""

    model_config = _CLOSED

    rank: int
    receipt_json: str = Field(max_length=8192)
    sketches: list[list[float]] = Field(max_length=10_000)
    losses: list[float] = Field(max_length=10_000)


class InboxAnswer(BaseModel):
    """The inbox's answer: ``accepted``, or the ``reason`` it refused (nothing kept); ``busy``: only
    because the rank's queue is full, so try again later (``runtime.inbox.InboxReply``)."""

    model_config = _CLOSED

    accepted: bool
    reason: str = ""
    busy: bool = False


class ProgressReport(BaseModel):
    """``POST /v1/jobs/{id}/progress``: rank 0 finished optimizer step ``step`` (display only)."""

    model_config = _CLOSED

    step: int
    loss: float
    lr: float


class StopAnswer(BaseModel):
    """``GET /v1/jobs/{id}/stop``: why the ranks should stop at their next boundary, or None."""

    model_config = _CLOSED

    reason: str | None


class HasRequest(BaseModel):
    """``POST /v1/jobs/{id}/objects/has``: which of these object digests the job's store holds."""

    model_config = _CLOSED

    digests: list[str] = Field(max_length=4096)


class HasAnswer(BaseModel):
    """One flag per digest asked, in order."""

    model_config = _CLOSED

    present: list[bool]


class ObjectAnswer(BaseModel):
    """``PUT /v1/jobs/{id}/objects``: the stored object's name (``0x`` + sha256 of its bytes)."""

    model_config = _CLOSED

    digest: str


class PackageAnswer(BaseModel):
    """``PUT /v1/packages/{hash}``: the package the head holds under that hash."""

    model_config = _CLOSED

    package_hash: str
    files: int


class JobLaunch(BaseModel):
    """``GET /v1/jobs/{id}/launch``: what a job's Ray driver starts its ranks with (public: the
    Assignments are signed, nothing here is secret)."""

    model_config = _CLOSED

    job_id: str
    spec: dict
    node_ids: list[str]
    assignments: list[str] = Field(description="the coordinator-signed Assignment (JSON) of each rank")
    buckets: int
    data_source: str
    api_url: str = Field(description="where the ranks reach the head (``runtime.channel.HttpChannel``)")
    attempt: int = Field(0, ge=0, description="how many Rewinds of the job came before this launch")
    start_step: int = Field(0, ge=0, description="the step the ranks train from (a Rewind's ``toStep``)")
    start_manifests: list[str] = Field(
        default_factory=list, description="per rank, the checkpointHash of its receipt ending at start_step"
    )
    previous: list[str] = Field(
        default_factory=list, description="per rank, the digest of its receipt ending at start_step"
    )
    end_step: int | None = Field(
        None, ge=1, description="the ranks stop at this step (a group test's re-run of one interval; None: the end)"
    )


class EventKind(str, Enum):
    """What a job's log line is: the calls of ``coordinator.job.UI`` the head's runner made."""

    STATUS = "status"
    NOTE = "note"
    TRAINING_STARTED = "training_started"
    STEP = "step"
    TRAINING_DONE = "training_done"


class StepProgress(BaseModel):
    """Training progress carried by ``training_started`` and ``step`` events."""

    model_config = _CLOSED

    step: int = Field(description="optimizer steps done (the first step of the run for ``training_started``)")
    total_steps: int
    loss: float | None = Field(default=None, description="rank 0's loss at ``step``, nats per token")
    tokens_per_s: float | None = Field(default=None, description="tokens trained per second, all ranks")


class JobEvent(BaseModel):
    """One line of a job's log on the head (``GET /v1/jobs/{id}/events``): ``seq`` counts from 1.
    Lines read back from the log file after a restart of the head are all ``note``."""

    model_config = _CLOSED

    seq: int
    time_ms: int = Field(description="unix ms")
    text: str
    kind: EventKind = EventKind.NOTE
    progress: StepProgress | None = None


class ReplayAnswer(BaseModel):
    """``POST /v1/jobs/{id}/replays/{rid}``: what the job's replay worker on the verifier node hands back: its
    address, its signed VerificationReports (JSON; the head checks each signature) and the
    findings behind them (``verify.judgment.Finding`` as dicts; read, never trusted)."""

    model_config = _CLOSED

    verifier: str
    reports: list[str] = Field(max_length=1024)
    findings: list[dict] = Field(max_length=1024)


class ReplayQueue(BaseModel):
    """``GET /v1/jobs/{id}/replays``: what the job's replay worker on its verifier node is to do.

    ``pending``: the drawn replays not answered or cancelled yet, oldest first; ``open``: False
    once the job is not running on this head (the worker then exits)."""

    model_config = _CLOSED

    pending: list[str]
    open: bool
