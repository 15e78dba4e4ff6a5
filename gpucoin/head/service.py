"""The head service: gpucoin's own process on the head host, never a Ray worker (SPEC.md, Trust).

It holds the ledger and the coordinator's key, which never enter Ray objects, runtime
environments or logs, serves the HTTP API of ``gpucoin.head.api`` on uvicorn and runs the
market loop and the jobs (``gpucoin.head.scheduler``) in threads of its own.
``gpucoin up`` starts it as ``python -m gpucoin.head.service CONFIG`` after the Ray head and waits
for ``/v1/status``; SIGTERM stops it (uvicorn finishes the requests in flight, then the ledger
closes).
"""

from __future__ import annotations

import sys
from pathlib import Path

from gpucoin.head.records import ServiceConfig
from gpucoin.ledger import Ledger


def open_head_ledger(cfg: ServiceConfig, coordinator) -> Ledger:
    """The head's ledger, which ``gpucoin up`` gave its Genesis; it must be ``coordinator``'s market.

    Raises:
        HeadError: as ``head.genesis.ensure_genesis`` (no Genesis on a network that is not dev,
            another coordinator's market).
        LedgerError / DomainMismatch: the ledger cannot be opened, or is another market's.
    """
    from gpucoin.head.genesis import ensure_genesis

    domain = ensure_genesis(cfg.ledger_url, coordinator, dev=False, policy=None)
    return Ledger(cfg.ledger_url, domain=domain)


def coordinator_account(cfg: ServiceConfig, password: str | None):
    """The coordinator's key: the dev wallet under ``cfg.home`` on a dev network, else
    ``cfg.coordinator_keystore`` opened with ``password``.

    Raises:
        WalletError: the keystore does not open with ``password``.
    """
    from gpucoin.cluster.local import participant
    from gpucoin.wallet.keystore import load_keystore

    if cfg.coordinator_keystore is None:
        return participant("coordinator", cfg.home).account
    return load_keystore(cfg.coordinator_keystore, password or "")


def serve(cfg: ServiceConfig, password: str | None = None) -> None:
    """Open the ledger and serve the API until SIGTERM or SIGINT.

    Args:
        password: the coordinator keystore's (None on a dev network).

    Raises:
        GpucoinError subclasses: as ``coordinator_account`` and ``open_head_ledger``.
    """
    import uvicorn

    from gpucoin.cluster.node_user import prepare_node_user, switching_users
    from gpucoin.coordinator.settle import Coordinator
    from gpucoin.head.api import make_app, node_views
    from gpucoin.head.jobs import JobBoard, JobTable
    from gpucoin.head.metrics import HeadMetrics
    from gpucoin.head.packages import PackageStore
    from gpucoin.head.ray_state import list_nodes
    from gpucoin.head.rayjobs import RayJobs
    from gpucoin.head.scheduler import LockedCoordinator, Scheduler

    coordinator = coordinator_account(cfg, password)
    # as root, the job's code (the end-of-job evaluation) runs as the unprivileged node user
    job_code_user = prepare_node_user()[0] if switching_users() else None
    ledger = open_head_ledger(cfg, coordinator)
    try:
        coord = LockedCoordinator(Coordinator(ledger, ledger.policy, coordinator, ledger.domain))
        board = JobBoard(cfg.home / "jobs")
        metrics = HeadMetrics(ledger, lambda: list_nodes(cfg.dashboard_url, cfg.ray_token_path))

        def ray_nodes():
            return list_nodes(cfg.dashboard_url, cfg.ray_token_path)

        scheduler = Scheduler(
            ledger,
            coord,
            board,
            JobTable(ledger.engine),
            PackageStore(cfg.home / "packages"),
            RayJobs(cfg.dashboard_url, cfg.ray_token_path),
            ray_nodes,
            public_api_url(cfg),
            lambda: node_views(ledger, ray_nodes()),
            metrics,
            job_code_user,
        )
        app = make_app(ledger, cfg, coord, ray_nodes, board, metrics)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=cfg.api_host,
                port=cfg.api_port,
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=5,
            )
        )
        scheduler.start()
        try:
            server.run()
        finally:
            scheduler.stop()
        if not server.started:
            raise SystemExit(f"the head's API could not listen on {cfg.api_host}:{cfg.api_port}")
    finally:
        ledger.close()


def public_api_url(cfg: ServiceConfig) -> str:
    """Where ranks and verifiers on other hosts reach the API: its own address, or the head
    node's (the Ray address's host) when it listens on every interface."""
    host = cfg.api_host
    if host in ("0.0.0.0", "::", ""):
        host = cfg.ray_address.rsplit(":", 1)[0]
    return f"http://{host}:{cfg.api_port}"


def main(argv: list[str] | None = None) -> None:
    """``python -m gpucoin.head.service CONFIG.json``: serve with the ``ServiceConfig`` in that file."""
    from gpucoin.exceptions import GpucoinError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m gpucoin.head.service CONFIG.json")
    cfg = ServiceConfig.model_validate_json(Path(args[0]).read_text())
    password = sys.stdin.readline().rstrip("\n") if cfg.coordinator_keystore is not None else None
    try:
        serve(cfg, password)
    except GpucoinError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
