"""``gpucoin join`` / ``leave``: make this host a volunteer node of a head's cluster, and stop it.

A joined node is two process groups of this user that outlive the command: the node's signing
process (its key, outside Ray, ``wallet.signer``) and a Ray worker node (``ray start --block``
through ``cluster.ray_node``) whose processes find the signer through ``GPUCOIN_SIGNER_SOCKET``
and hold no key; as root, the Ray node runs as the unprivileged node user (``cluster.node_user``).
``join`` returns once the node is in Ray, its NodeRegistration signed and admitted by the head
and its stake bonded; it writes a ``JoinRecord`` to ``<home>/nodes/<name>.json`` (0600). Several
joins on one host with one home are several records.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, field_validator

from gpucoin.cluster.auth import driver_env, home_token_path
from gpucoin.cluster.embedded import (
    RAY_START,
    PortPool,
    check_short_temp_dir,
    component_ports,
    short_temp_dir,
    sigint_ignored,
    spawn_ray_node,
    stop_marked_processes,
)
from gpucoin.cluster.node_user import NodeUser, chown_tree, node_dir, prepare_node_user, switching_users
from gpucoin.cluster.procs import ProcessRef, stop_group
from gpucoin.cluster.ray_node import loopback_kept
from gpucoin.exceptions import HeadError
from gpucoin.head.admit import PROVIDER_LABEL
from gpucoin.head.client import HeadClient
from gpucoin.head.lifecycle import DEFAULT_HOME as DEFAULT_HEAD_HOME
from gpucoin.head.lifecycle import read_info, write_private
from gpucoin.head.versions import check_same, versions
from gpucoin.wallet.messages import Domain, sign
from gpucoin.wallet.nonces import NonceSource
from gpucoin.wallet.signer import SOCKET_ENV, socket_dir_for, start_signer

DEFAULT_HOME = Path.home() / ".gpucoin" / "node"
"""The state directory of the nodes this host joins (records, logs)."""

TOKEN_FILE_ENV = "GPUCOIN_RAY_TOKEN_FILE"
"""Where ``join`` reads the cluster's Ray token file from when ``--token-file`` is not given."""

JOIN_TIMEOUT_S = 180.0
"""How long ``join`` waits for the Ray node to show in the cluster."""

STOP_TIMEOUT_S = 30.0
REGISTRATION_TTL_S = 600
MARKER_PREFIX = "gpucoin_join_"
NODE_TEMP_PREFIX = "gpucoin-node-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")


@dataclass(frozen=True)
class JoinOptions:
    """What ``gpucoin join`` was asked for (amounts in µGPC).

    Attributes:
        api_url: the head's API. keystore / password: the volunteer's wallet.
        stake_ugpc: stake to bond now. ask_ugpc_per_worker_hour: the node's ask.
        cpus / gpus: what the Ray node offers. host: this host's address as other nodes reach it.
        name: the node's local name (default: ``node-<6 hex>``). token_file: the cluster's Ray token.
        home: state directory (``DEFAULT_HOME``).
        role: ``volunteer`` (trains ranks) or ``verifier`` (replays drawn intervals; its signer
            judges by the head policy's tolerance).
        env: extra environment of the Ray node's processes (the embedded mode sets a node's
            ``CUDA_VISIBLE_DEVICES`` with it, and tests their fault injection); never a secret.
    """

    api_url: str
    keystore: Path
    password: str
    stake_ugpc: int
    ask_ugpc_per_worker_hour: int
    cpus: int = 1
    gpus: int = 0
    host: str = "127.0.0.1"
    name: str | None = None
    token_file: Path | None = None
    home: Path = DEFAULT_HOME
    role: str = "volunteer"
    env: Mapping[str, str] = field(default_factory=dict)


class JoinRecord(BaseModel):
    """A node this host joined (``<home>/nodes/<name>.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    node_id: str
    provider: str
    api_url: str
    ray_address: str
    ray_node: ProcessRef
    signer: ProcessRef
    temp_dir: Path
    registration: str
    keystore: Path
    stake_ugpc: int
    unbond_amount_ugpc: int | None = None
    unbond_nonce: int | None = None

    @field_validator("temp_dir")
    @classmethod
    def _a_node_temp_dir(cls, v: Path) -> Path:
        # ``leave`` ends every process naming it and removes it: never a path a record was edited to
        return check_short_temp_dir(v, NODE_TEMP_PREFIX)


def record_path(home: Path, name: str) -> Path:
    """Where the record of node ``name`` lives."""
    return Path(home) / "nodes" / f"{name}.json"


def read_records(home: Path) -> list[JoinRecord]:
    """Every node record under ``home`` (unreadable ones skipped), by name."""
    out = []
    for p in sorted((Path(home) / "nodes").glob("*.json")):
        try:
            out.append(JoinRecord.model_validate_json(p.read_text()))
        except (OSError, ValueError):
            continue
    return out


def find_token(token_file: Path | None, api_url: str) -> Path:
    """The cluster's Ray token file: ``token_file``, else ``$GPUCOIN_RAY_TOKEN_FILE``, else the one
    ``gpucoin up`` wrote on this host for the head at ``api_url``.

    Raises:
        HeadError: none of them names a readable file.
    """
    given = token_file or (Path(os.environ[TOKEN_FILE_ENV]) if os.environ.get(TOKEN_FILE_ENV) else None)
    if given is not None:
        if not Path(given).is_file():
            raise HeadError(f"no Ray token file at {given}")
        return Path(given)
    info = read_info(DEFAULT_HEAD_HOME)
    if info is not None and info.api_url == api_url.rstrip("/"):
        return home_token_path(DEFAULT_HEAD_HOME)
    raise HeadError(
        f"no Ray token for {api_url}: give --token-file (the head's <home>/ray/auth_token) or set {TOKEN_FILE_ENV}"
    )


def join(opts: JoinOptions, status=lambda text: None) -> JoinRecord:
    """Make this host a node of the head at ``opts.api_url``; return once it is admitted and bonded.

    Args:
        opts: what to join with.
        status: called with a short line before each long step (the CLI shows it).

    Raises:
        HeadError: the head is unreachable, runs other versions, refuses the registration; no token.
        WalletError: the keystore does not unlock.
        ClusterError: the Ray node does not start or join within ``JOIN_TIMEOUT_S``.
        Whatever was started is stopped again.
    """
    from gpucoin.wallet.keystore import load_keystore

    if opts.role not in ("volunteer", "verifier"):
        raise HeadError(f"a node's role is volunteer or verifier, not {opts.role!r}")
    client = HeadClient(opts.api_url)
    head = client.status()
    check_same(head.versions, versions())
    token = find_token(opts.token_file, client.api_url)
    account = load_keystore(opts.keystore, opts.password)
    name = opts.name or f"node-{secrets.token_hex(3)}"
    if not _NAME.match(name):
        raise HeadError(f"node name {name!r}: 1-40 of letters, digits, '_' and '-', starting with a letter or digit")
    home = Path(opts.home).expanduser().resolve()
    path = record_path(home, name)
    old = _read(path)
    if old is not None:
        if old.ray_node.alive() or old.signer.alive():
            raise HeadError(f"a node named {name!r} already runs from {home}; `gpucoin leave --name {name}` first")
        _clean_up(old, home)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    logs = home / "logs" / name
    logs.mkdir(parents=True, exist_ok=True)
    domain = Domain(chain_id=head.chain_id, verifying_contract=head.coordinator)
    user = None
    if switching_users():
        status("preparing the node user")
        user, _ = prepare_node_user()
    temp_dir = short_temp_dir(NODE_TEMP_PREFIX)
    started: list[int] = []
    try:
        ray_dir, node_token = _node_dirs(temp_dir, token, user)
        status("starting the node's signing process")
        sockets = temp_dir / "sign"
        sockets.mkdir(mode=0o700)
        socket_dir_for(sockets, user)
        signer = start_signer(
            opts.keystore,
            opts.password,
            sockets / "signer.sock",
            head.coordinator,
            domain,
            opts.role,
            head.tolerance_rel_l2 if opts.role == "verifier" else None,
            user,
            logs / "signer.log",
        )
        started.append(signer.process.pid)
        marker = MARKER_PREFIX + secrets.token_hex(8)
        args = [
            *RAY_START,
            f"--address={head.ray_address}",
            f"--node-ip-address={opts.host}",
            # else the node takes the head's temp dir, which on the head's own host is not ours to write
            f"--temp-dir={ray_dir}",
            f"--num-cpus={opts.cpus}",
            f"--num-gpus={opts.gpus}",
            f"--resources={json.dumps({marker: 1})}",
            f"--labels={PROVIDER_LABEL}={account.address}",  # fixed for the node's life: the head admits by it
            *[f"--{name}={port}" for name, port in component_ports(PortPool(), head=False).items()],
            "--object-store-memory=200000000",
        ]
        status(f"starting a Ray node and joining {head.ray_address}")
        proc = spawn_ray_node(
            args,
            {**opts.env, SOCKET_ENV: str(signer.socket_path)},
            user,
            ray_dir,
            node_token,
            logs / "ray-node.log",
            "" if opts.gpus == 0 else None,
        )
        started.append(proc.pid)
        node_id = _wait_for_node(head.ray_address, opts.host, token, temp_dir, marker, proc, logs / "ray-node.log")
        status("registering with the head and bonding the stake")
        reg = sign(
            account,
            "NodeRegistration",
            domain,
            {
                "provider": account.address,
                "nodeId": node_id,
                "resources": json.dumps({"CPU": opts.cpus, "GPU": opts.gpus, "role": opts.role}, sort_keys=True),
                "askPerWorkerHour": opts.ask_ugpc_per_worker_hour,
                "stake": opts.stake_ugpc,
                "nonce": NonceSource().next(),
                "deadline": int(time.time()) + REGISTRATION_TTL_S,
            },
        )
        client.register(reg.to_dict())
        rec = JoinRecord(
            name=name,
            node_id=node_id,
            provider=account.address,
            api_url=client.api_url,
            ray_address=head.ray_address,
            ray_node=ProcessRef.of(proc.pid),
            signer=ProcessRef.of(signer.process.pid),
            temp_dir=temp_dir,
            registration=reg.digest,
            keystore=Path(opts.keystore).resolve(),
            stake_ugpc=opts.stake_ugpc,
        )
        write_private(path, rec.model_dump_json(indent=2))
        return rec
    except BaseException:
        with sigint_ignored():  # a second Ctrl-C must not leave processes no node record names
            for pid in reversed(started):
                stop_group(pid, None, STOP_TIMEOUT_S)
            stop_marked_processes(str(temp_dir), 5.0)
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise


def _node_dirs(temp_dir: Path, token: Path, user: NodeUser | None) -> tuple[Path, Path]:
    """The Ray node's dir and its token file: ours, or (as root) the node user's own, inside ours."""
    if user is None:
        return temp_dir, token
    ray_dir = node_dir(temp_dir, user, "r")
    node_token = ray_dir / "auth_token"
    shutil.copyfile(token, node_token)
    os.chmod(node_token, 0o600)
    chown_tree(node_token, user)
    return ray_dir, node_token


def _wait_for_node(ray_address: str, host: str, token: Path, temp_dir: Path, marker: str, proc, log: Path) -> str:
    """The Ray node id of the node carrying resource ``marker``, once it is alive in the GCS.

    A driver here needs a raylet at ``host``: until this node's is up (the head may be on another
    host), connecting fails, and is tried again.

    Raises:
        ClusterError: the node process exits, or the node is not in the GCS within ``JOIN_TIMEOUT_S``.
    """
    import ray

    from gpucoin.exceptions import ClusterError

    driver_dir = temp_dir / "driver"
    driver_dir.mkdir(mode=0o700)
    deadline = time.monotonic() + JOIN_TIMEOUT_S

    def check() -> None:
        if proc.poll() is not None:
            lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
            raise ClusterError(
                f"the Ray node exited with {proc.returncode} while joining: {lines[-1] if lines else 'no output'}"
                f" (log: {log})"
            )
        if time.monotonic() > deadline:
            raise ClusterError(f"the Ray node did not join {ray_address} within {JOIN_TIMEOUT_S:.0f} s")

    with driver_env(token, driver_dir), loopback_kept():
        while not ray.is_initialized():
            check()
            try:
                ray.init(
                    address=ray_address,
                    _node_ip_address=host,
                    log_to_driver=False,
                    configure_logging=False,
                    logging_level="ERROR",
                )
            except (ConnectionError, RuntimeError, ValueError):
                time.sleep(1.0)
        try:
            while True:
                for n in ray.nodes():
                    if n.get("Alive") and marker in n.get("Resources", {}):
                        return n["NodeID"]
                check()
                time.sleep(0.5)
        finally:
            ray.shutdown()


def _read(path: Path) -> JoinRecord | None:
    try:
        return JoinRecord.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise HeadError(f"{path} is not a node record ({str(e).splitlines()[0]}); remove it") from None


def _clean_up(rec: JoinRecord, home: Path) -> None:
    stop_marked_processes(str(rec.temp_dir), 10.0)
    shutil.rmtree(rec.temp_dir, ignore_errors=True)
    record_path(home, rec.name).unlink(missing_ok=True)


def leave(home: Path, name: str, password: str | None) -> tuple[JoinRecord, object | None]:
    """Stop the node ``name`` this host joined from ``home`` (its Ray node, its signer, whatever
    still runs from its temp dir), then start unbonding the stake its join bonded.

    The Unbond's amount and nonce are written to the node's record before it is sent, so a retry
    after a lost answer sends the same message, which the ledger applies once; the record goes
    when the head has applied it.

    Args:
        password: the wallet's, to sign the Unbond; None keeps the stake bonded.

    Returns:
        (the record, the provider's ``AccountView`` after unbonding, or None if nothing was unbonded).

    Raises:
        HeadError: no such node; the head refuses or cannot be reached (the node is stopped
            all the same; ``leave`` again retries the same Unbond).
        WalletError: the keystore does not unlock.
    """
    from gpucoin.wallet.keystore import load_keystore

    home = Path(home).expanduser().resolve()
    path = record_path(home, name)
    rec = _read(path)
    if rec is None:
        raise HeadError(f"no node named {name!r} was joined from {home}")
    stop_group(rec.ray_node.pid, rec.ray_node, STOP_TIMEOUT_S)
    stop_group(rec.signer.pid, rec.signer, STOP_TIMEOUT_S)
    stop_marked_processes(str(rec.temp_dir), 10.0)
    shutil.rmtree(rec.temp_dir, ignore_errors=True)
    view = None
    if password is not None:
        account = load_keystore(rec.keystore, password)
        client = HeadClient(rec.api_url)
        if rec.unbond_nonce is None:
            bonded = client.account(rec.provider).bonded_ugpc
            rec = rec.model_copy(
                update={"unbond_amount_ugpc": min(rec.stake_ugpc, bonded), "unbond_nonce": NonceSource().next()}
            )
            write_private(path, rec.model_dump_json(indent=2))
        if rec.unbond_amount_ugpc:
            status = client.status()
            msg = sign(
                account,
                "Unbond",
                Domain(chain_id=status.chain_id, verifying_contract=status.coordinator),
                {"provider": rec.provider, "amount": rec.unbond_amount_ugpc, "nonce": rec.unbond_nonce},
            )
            view = client.unbond(msg.to_dict())
    path.unlink(missing_ok=True)
    return rec, view


def withdraw(api_url: str, keystore: Path, password: str, amount_ugpc: int | None = None):
    """Move the wallet's matured unbonding stake back to its available balance.

    Args:
        amount_ugpc: how much (None: all that has matured).

    Returns:
        The wallet's ``AccountView`` after it.

    Raises:
        HeadError: nothing has matured yet (when it will is named), or the head refuses.
        WalletError: the keystore does not unlock.
    """
    from gpucoin.money import format_gpc
    from gpucoin.wallet.keystore import load_keystore

    account = load_keystore(keystore, password)
    client = HeadClient(api_url)
    status = client.status()
    view = client.account(account.address)
    amount = view.withdrawable_ugpc if amount_ugpc is None else amount_ugpc
    if amount == 0:
        later = f"; {format_gpc(view.unbonding_ugpc)} GPC is unbonding" if view.unbonding_ugpc else ""
        when = (
            f", the next from epoch {view.next_maturity_epoch} (now {view.epoch})" if view.next_maturity_epoch else ""
        )
        raise HeadError(f"nothing withdrawable for {account.address} yet{later}{when}")
    msg = sign(
        account,
        "Withdraw",
        Domain(chain_id=status.chain_id, verifying_contract=status.coordinator),
        {"provider": account.address, "amount": amount, "nonce": NonceSource().next()},
    )
    return client.withdraw(msg.to_dict())
