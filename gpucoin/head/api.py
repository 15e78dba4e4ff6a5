"""The head's HTTP API (FastAPI): reads are public, every economic request is a signed message.

    GET  /v1/status    HeadStatus
    GET  /v1/nodes     [NodeView]: registered nodes, newest registration per node, Ray's liveness
    POST /v1/nodes     RegisterRequest -> NodeView: admit a node (``head.admit``), record its signed
                       NodeRegistration and bond its stake, in one ledger transaction
    POST /v1/faucet    FaucetRequest -> FaucetResult: dev money (a dev network only)
    GET  /v1/accounts/{address}   AccountView: available, bonded, unbonding, withdrawable
    POST /v1/unbond    SignedRequest (an Unbond) -> AccountView: bonded -> unbonding
    POST /v1/withdraw  SignedRequest (a Withdraw) -> AccountView: matured unbonding -> available
    GET  /metrics      Prometheus text (``head.metrics``)

Errors answer ``{"detail": "<one line>"}`` with 400 (malformed), 403 (refused), 409 (conflict:
a nonce or an id used before, too little money, stake not matured) or 503 (Ray's state cannot be read).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

from gpucoin.exceptions import (
    ConflictError,
    GpucoinError,
    HeadError,
    InsufficientFunds,
    NodeRefused,
    RuleViolation,
    Unauthorized,
)
from gpucoin.head.admit import check_registration
from gpucoin.head.ray_state import RayNode
from gpucoin.head.records import (
    AccountView,
    FaucetRequest,
    FaucetResult,
    HeadStatus,
    NodeState,
    NodeView,
    PolicyRef,
    RegisterRequest,
    ServiceConfig,
    SignedRequest,
)
from gpucoin.head.versions import versions
from gpucoin.ledger import Ledger
from gpucoin.ledger.accounts import wallet_account
from gpucoin.policy.model import policy_hash
from gpucoin.wallet.messages import MessageFieldError, SignedMessage, loads_json, parse_address

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
        versions=versions(),
    )


def registrations(ledger: Ledger) -> dict[str, SignedMessage]:
    """The newest admitted NodeRegistration of each node id, by node id."""
    out: dict[str, SignedMessage] = {}
    for row in ledger.messages("NodeRegistration"):  # in recording order: a later one wins
        typed = loads_json(row.typed_data)
        out[typed["message"]["nodeId"]] = SignedMessage.from_dict(
            {
                "primaryType": typed["primaryType"],
                "domain": typed["domain"],
                "message": typed["message"],
                "digest": row.digest,
                "signature": row.signature,
                "signer": row.signer,
            }
        )
    return out


def node_views(ledger: Ledger, ray_nodes: Mapping[str, RayNode]) -> list[NodeView]:
    """Every registered node with its provider's bond and Ray's liveness, by node id."""
    views = []
    for node_id, reg in sorted(registrations(ledger).items()):
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
                registration=reg.digest,
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


def make_app(ledger: Ledger, cfg: ServiceConfig, coordinator, ray_nodes: Callable[[], Mapping[str, RayNode]]):
    """The head's FastAPI application.

    Args:
        ledger: the open ledger (its Genesis written).
        cfg: the service's settings.
        coordinator: a ``coordinator.settle.Coordinator`` over ``ledger`` (writes go through it,
            one at a time).
        ray_nodes: reads Ray's nodes by id (``ray_state.list_nodes`` in the service).
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from gpucoin import __version__
    from gpucoin.head.metrics import metrics_registry

    JsSafeJSON = _json_response_class()
    app = FastAPI(
        title="gpucoin head", version=__version__, docs_url=None, redoc_url=None, default_response_class=JsSafeJSON
    )
    registry = metrics_registry(ledger, ray_nodes)
    writes = threading.Lock()  # one coordinator write at a time: its nonce source and key are shared

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
        with writes:
            known = ray_nodes()
            holders = {n: r.message["provider"] for n, r in registrations(ledger).items()}
            check_registration(reg, known, holders)
            if reg.message["stake"] > 0:
                coordinator.bond(reg)
            else:
                coordinator.record(reg)
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

    @app.get("/metrics")
    def get_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
