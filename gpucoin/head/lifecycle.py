"""``gpucoin up`` / ``down`` / ``status``: start, stop and ask a head on this host.

A head is two process groups of this user, both started in sessions of their own so they
outlive the command that started them:

1. a Ray head node (``ray start --head --block`` through ``gpucoin.cluster.ray_node``) with token
   authentication (gpucoin's own 0600 token file), no CPUs or GPUs for tasks, its own temp dir
   and ports, and Ray's dashboard on loopback (job submission needs it);
2. the head service (``gpucoin.head.service``): the ledger, the coordinator key, the HTTP API
   and the metrics, never a Ray worker.

``up`` returns once the API answers; it writes ``HeadInfo`` to ``<home>/head.json`` (0600), which
``down`` and ``status`` read. A pid is signalled only while its start time still matches, so a
pid the OS gave to another process since is never touched.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gpucoin.cluster.auth import ensure_token, home_token_path
from gpucoin.cluster.embedded import (
    RAY_START,
    PortPool,
    component_ports,
    short_temp_dir,
    sigint_ignored,
    spawn_ray_node,
    stop_marked_processes,
)
from gpucoin.cluster.procs import ProcessRef, stop_group
from gpucoin.exceptions import HeadError
from gpucoin.head.records import HEAD_TEMP_PREFIX, HeadInfo, HeadStatus, ServiceConfig

DEFAULT_HOME = Path.home() / ".gpucoin" / "head"
"""The head's state directory unless ``--home`` says otherwise."""

DEFAULT_RAY_PORT = 6390
"""The Ray head's GCS port by default (not Ray's 6379, where Redis often listens)."""

DEFAULT_API_PORT = 8470
"""The head's HTTP API port by default."""

START_TIMEOUT_S = 120.0
"""How long ``up`` waits for the Ray head to listen and then for the API to answer."""

STOP_TIMEOUT_S = 30.0
"""How long ``down`` waits for each process group after SIGTERM before SIGKILL."""

REQUEST_TIMEOUT_S = 10.0
"""Timeout of one HTTP request to the head."""

INFO_FILE = "head.json"


@dataclass(frozen=True)
class UpOptions:
    """What ``gpucoin up`` was asked for.

    Attributes:
        home: state directory (ledger, dev wallets, token, logs, ``head.json``).
        dev: a development network (dev Genesis, dev coordinator key, faucet).
        policy: name or TOML path of a new dev network's policy (None: ``local``).
        genesis: the Genesis file of a new network that is not dev (``head.genesis``); None
            for a dev network or a ledger that has its Genesis.
        coordinator_keystore: the coordinator's keystore (not dev; the key that signs the
            Genesis, Assignments, Settlements); None for the dev coordinator of ``home``.
        coordinator_password: its password, handed to the service on a pipe.
        ledger_url: the ledger database (None: SQLite ``<home>/ledger.db``).
        host: the address volunteers reach this host at (Ray's node IP; the API listens there too).
        ray_port: the Ray head's GCS port. api_port: the HTTP API's port.
    """

    home: Path = DEFAULT_HOME
    dev: bool = False
    policy: str | None = None
    genesis: Path | None = None
    coordinator_keystore: Path | None = None
    coordinator_password: str | None = field(default=None, repr=False)
    ledger_url: str | None = None
    host: str = "127.0.0.1"
    ray_port: int = DEFAULT_RAY_PORT
    api_port: int = DEFAULT_API_PORT


def info_path(home: Path) -> Path:
    """Where ``up`` writes the ``HeadInfo`` of the head it started from ``home``."""
    return Path(home) / INFO_FILE


def read_info(home: Path) -> HeadInfo | None:
    """The ``HeadInfo`` under ``home``, or None if there is none.

    Raises:
        HeadError: the file exists but does not parse.
    """
    path = info_path(home)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise HeadError(f"cannot read {path}: {e.strerror}") from None
    try:
        return HeadInfo.model_validate_json(text)
    except ValueError as e:
        raise HeadError(f"{path} is not a head's record ({str(e).splitlines()[0]}); remove it") from None


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (0600), whole or not at all."""
    tmp = path.with_name(path.name + ".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def _spawn(args: list[str], env: dict[str, str], log: Path, secret: str | None = None) -> subprocess.Popen:
    """Start ``args`` in a session of its own, output to ``log``; ``secret`` is written to its stdin
    (one line), never to an argument or the environment."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL if secret is None else subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    if secret is not None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(secret.encode() + b"\n")
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it died at once: the wait for it says so, with its log
    return proc


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _wait(what: str, ready: Callable[[], bool], proc: subprocess.Popen, log: Path, deadline: float) -> None:
    """Poll ``ready`` every 0.3 s until it holds; fail if ``proc`` exits or ``deadline`` passes."""
    while not ready():
        if proc.poll() is not None:
            raise HeadError(f"{what} exited with {proc.returncode} while starting; log tail:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise HeadError(f"{what} was not ready within {START_TIMEOUT_S:.0f} s; log tail:\n{_tail(log)}")
        time.sleep(0.3)


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _answers(url: str) -> bool:
    try:
        fetch_status(url)
        return True
    except HeadError:
        return False


def up(opts: UpOptions) -> HeadInfo:
    """Start a head from ``opts.home`` and return once its API answers.

    The coordinator's key is loaded first (a wrong password is said before anything starts); a
    new ledger gets its Genesis (``head.genesis.ensure_genesis``) before the Ray head starts.

    Raises:
        HeadError: options that do not go together; a head already runs from this home; a port
            is taken; the ledger has no Genesis and none was given, or another one; the Ray
            head or the service failed to start (the log's tail is quoted). Whatever was started
            is stopped again. A home whose Ray head runs but whose service does not (it was
            killed) gets its service started again, and keeps its ports.
        WalletError: the coordinator's keystore does not open with the password.
        PolicyError: the dev network's policy does not load.
    """
    from gpucoin.cluster.local import participant
    from gpucoin.head.genesis import ensure_genesis, load_genesis_file
    from gpucoin.policy.model import resolve_policy
    from gpucoin.wallet.keystore import load_keystore

    if opts.dev and (opts.genesis is not None or opts.coordinator_keystore is not None):
        raise HeadError(
            "--dev starts a development network with its own Genesis and coordinator key: "
            "leave out --genesis and --coordinator"
        )
    if not opts.dev and opts.coordinator_keystore is None:
        raise HeadError(
            "a network that is not --dev needs its coordinator's wallet (--coordinator NAME|ADDRESS): "
            "the key that signs its Genesis, Assignments and Settlements"
        )
    if not opts.dev and opts.policy is not None:
        raise HeadError(
            "--policy names a new dev network's policy; a network's own is named in its Genesis file (--genesis)"
        )
    home = opts.home.expanduser().resolve()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    if opts.dev:
        coordinator = participant("coordinator", home).account
    else:
        coordinator = load_keystore(opts.coordinator_keystore, opts.coordinator_password or "")
    old = read_info(home)
    if old is not None:
        if old.ray_head.alive() and not old.service.alive():
            return _restart_service(old, home, opts)
        if old.ray_head.alive() or old.service.alive():
            raise HeadError(
                f"a head already runs from {home} (API {old.api_url}); stop it with `gpucoin down --home {home}` first"
            )
        _clean_up(old, home)
    for port in (opts.ray_port, opts.api_port):
        if _listening(opts.host, port):
            raise HeadError(f"port {port} on {opts.host} is in use; choose another (--port / --api-port)")
    ledger_url = opts.ledger_url or f"sqlite:///{home / 'ledger.db'}"
    genesis, policy = load_genesis_file(opts.genesis) if opts.genesis is not None else (None, None)
    if opts.dev:
        policy = resolve_policy(opts.policy or "local")
    ensure_genesis(ledger_url, coordinator, dev=opts.dev, policy=policy, genesis=genesis)
    token = ensure_token(home_token_path(home))
    temp_dir = short_temp_dir(HEAD_TEMP_PREFIX)
    logs = home / "logs"
    ports = component_ports(PortPool({opts.ray_port, opts.api_port}), head=True)
    dashboard_port = ports["dashboard-port"]
    ray_args = [
        *RAY_START,
        "--head",
        "--num-cpus=0",
        "--num-gpus=0",
        f"--port={opts.ray_port}",
        f"--node-ip-address={opts.host}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        *[f"--{name}={port}" for name, port in ports.items()],
        "--object-store-memory=100000000",
    ]
    started: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        logs.mkdir(parents=True, exist_ok=True)
        ray_head = spawn_ray_node(ray_args, {}, None, temp_dir, token, logs / "ray-head.log", "")
        started.append(ray_head)
        _wait("the Ray head", lambda: _listening(opts.host, opts.ray_port), ray_head, logs / "ray-head.log", deadline)
        ray_address = f"{opts.host}:{opts.ray_port}"
        cfg = ServiceConfig(
            home=home,
            ledger_url=ledger_url,
            dev=opts.dev,
            coordinator_keystore=None if opts.dev else Path(opts.coordinator_keystore).resolve(),
            api_host=opts.host,
            api_port=opts.api_port,
            ray_address=ray_address,
            dashboard_url=f"http://127.0.0.1:{dashboard_port}",
            ray_token_path=token,
        )
        cfg_path = home / "service.json"
        write_private(cfg_path, cfg.model_dump_json(indent=2))
        service = _spawn_service(cfg_path, logs, None if opts.dev else opts.coordinator_password)
        started.append(service)
        api_url = f"http://{opts.host}:{opts.api_port}"
        _wait("the head service", lambda: _answers(api_url), service, logs / "service.log", deadline)
        info = HeadInfo(
            ray_address=ray_address,
            api_url=api_url,
            metrics_url=f"{api_url}/metrics",
            dashboard_url=cfg.dashboard_url,
            token_path=token,
            ray_temp_dir=temp_dir,
            ray_head=ProcessRef.of(ray_head.pid),
            service=ProcessRef.of(service.pid),
            dev=opts.dev,
        )
        write_private(info_path(home), info.model_dump_json(indent=2))
        return info
    except BaseException:
        with sigint_ignored():  # a second Ctrl-C must not leave processes no head.json names
            for proc in reversed(started):
                stop_group(proc.pid, None, STOP_TIMEOUT_S)
            stop_marked_processes(str(temp_dir), 5.0)
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise


def _spawn_service(cfg_path: Path, logs: Path, password: str | None) -> subprocess.Popen:
    # the service needs no Ray variable and none of gpucoin's (GPUCOIN_PASSWORD among them): its
    # settings are in cfg_path, the coordinator's password comes on its stdin
    service_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GPUCOIN_"))}
    return _spawn(
        [sys.executable, "-m", "gpucoin.head.service", str(cfg_path)], service_env, logs / "service.log", password
    )


def _restart_service(info: HeadInfo, home: Path, opts: UpOptions) -> HeadInfo:
    """Start the head service again beside a Ray head that still runs (the service died or was
    killed): same settings (``<home>/service.json``), same ledger; it recovers the jobs its last
    run left (``head.scheduler``). Returns the updated ``HeadInfo``.

    Raises:
        HeadError: the service's settings are gone, or it does not answer within ``START_TIMEOUT_S``.
    """
    cfg_path = home / "service.json"
    if not cfg_path.is_file():
        raise HeadError(
            f"the Ray head of {home} runs but its service settings ({cfg_path}) are gone; `gpucoin down` it"
        )
    cfg = ServiceConfig.model_validate_json(cfg_path.read_text())
    if cfg.dev != opts.dev or (
        not opts.dev and cfg.coordinator_keystore != Path(opts.coordinator_keystore or "").resolve()
    ):
        raise HeadError(
            f"the head of {home} runs "
            + ("a dev network" if cfg.dev else f"with the coordinator keystore {cfg.coordinator_keystore}")
            + ": start its service again with the same --dev / --coordinator"
        )
    service = _spawn_service(cfg_path, home / "logs", None if opts.dev else opts.coordinator_password)
    try:
        _wait(
            "the head service",
            lambda: _answers(info.api_url),
            service,
            home / "logs" / "service.log",
            time.monotonic() + START_TIMEOUT_S,
        )
    except BaseException:
        stop_group(service.pid, None, STOP_TIMEOUT_S)
        raise
    info = info.model_copy(update={"service": ProcessRef.of(service.pid)})
    write_private(info_path(home), info.model_dump_json(indent=2))
    return info


def _clean_up(info: HeadInfo, home: Path) -> None:
    """Remove what a stopped head left: stray processes of its Ray temp dir, the dir, ``head.json``."""
    stop_marked_processes(str(info.ray_temp_dir), 10.0)
    shutil.rmtree(info.ray_temp_dir, ignore_errors=True)
    info_path(home).unlink(missing_ok=True)


def down(home: Path = DEFAULT_HOME) -> HeadInfo:
    """Stop the head started from ``home``: the service first (it finishes its requests and closes
    the ledger), then the Ray head; then whatever still runs from its Ray temp dir.

    Raises:
        HeadError: no head was started from ``home``.
    """
    home = Path(home).expanduser().resolve()
    info = read_info(home)
    if info is None:
        raise HeadError(f"no head runs from {home} (no {INFO_FILE} there)")
    stop_group(info.service.pid, info.service, STOP_TIMEOUT_S)
    stop_group(info.ray_head.pid, info.ray_head, STOP_TIMEOUT_S)
    _clean_up(info, home)
    return info


def api_url_of(address: str | None, home: Path = DEFAULT_HOME) -> str:
    """The head API's base URL: ``address`` (``host:port`` or a URL), else the head started from ``home``.

    Raises:
        HeadError: no address and no head started from ``home``.
    """
    if address:
        url = address.rstrip("/") if "://" in address else f"http://{address.rstrip('/')}"
        if not url.startswith(("http://", "https://")):
            raise HeadError(f"--address {address!r}: expected HOST:PORT or an http(s) URL of a head's API")
        return url
    info = read_info(Path(home).expanduser().resolve())
    if info is None:
        raise HeadError(f"no head runs from {home}: give --address HOST:PORT of a head's API")
    return info.api_url


def fetch_status(api_url: str) -> HeadStatus:
    """``GET /v1/status`` of the head at ``api_url``.

    Raises:
        HeadError: the head cannot be reached, answers with an error, or not with a ``HeadStatus``.
    """
    from gpucoin.head.client import HeadClient

    return HeadClient(api_url).status()
