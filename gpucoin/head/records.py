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
    policy: str = Field(description="name or TOML path of the policy a new ledger's Genesis names")
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
    versions: Versions


class NodeState(str, Enum):
    """A registered node as the head sees it in Ray: ``alive``, or ``gone`` (dead or unknown)."""

    ALIVE = "alive"
    GONE = "gone"


class NodeView(BaseModel):
    """``GET /v1/nodes``: one registered node (its newest NodeRegistration), amounts in µGPC."""

    model_config = _CLOSED

    node_id: str = Field(description="Ray's node id (hex)")
    provider: str = Field(description="the address that signed the registration")
    ask_ugpc_per_worker_hour: int
    resources: str = Field(description="what the node declared (untrusted; the market counts Ray's view)")
    bonded_ugpc: int = Field(description="the provider's whole bonded balance")
    state: NodeState
    registration: str = Field(description="digest of the NodeRegistration")


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
