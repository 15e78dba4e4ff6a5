"""The embedded local cluster: a Ray head and N volunteer nodes as separate Ray nodes on this host.

Each node is one ``ray start --block`` process that we own (its own session, so Ctrl-C
reaches only us); stopping the cluster terminates exactly those processes, never another Ray
cluster on the host (``ray stop`` would stop them all). Every node gets its own ports.

The cluster is closed: Ray token authentication with gpucoin's own token file, every node on
the loopback address (so Ray's servers listen on 127.0.0.1 only, see ``ray_node``), and a Ray
temp dir of its own that is removed on stop, so no ``/tmp/ray/ray_current_cluster`` names a dead
head afterwards (gpucoin.cluster.auth).

Given a ``NodeUser`` (gpucoin runs as root), every node process runs as that unprivileged user
(``gpucoin.cluster.node_user``), in the cluster's temp dir, which it owns, with a copy of the Ray
token of its own; this process, the driver, stays as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpucoin.cluster.auth import driver_env, ensure_token, node_env
from gpucoin.cluster.node_user import NodeUser, chown_tree, kill_processes, node_dir
from gpucoin.cluster.procs import end_processes
from gpucoin.cluster.ray_node import loopback_kept
from gpucoin.exceptions import ClusterError

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
NODE_START_ATTEMPTS = 3
NODE_IP = "127.0.0.1"
"""Every embedded node's Ray node IP: loopback, so nothing of the cluster listens beyond this host."""
NODE_MARKER_PREFIX = "gpucoin_node_"
"""Custom resource each embedded node carries (``gpucoin_node_<name>: 1``) so its Ray node id can be found."""


@contextlib.contextmanager
def sigint_ignored():
    """Ignore SIGINT inside the block (main thread only; elsewhere signals are not ours to set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections (``[low, high]``, Linux'
    ``net.ipv4.ip_local_port_range``; IANA's 49152–65535 where that file is missing)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


class PortPool:
    """Free TCP ports on 127.0.0.1, each handed out at most once.

    Ray refuses to start a node when two of its components are given the same port, and two
    separate "bind to port 0, close" probes may well return the same port (CI saw
    ``node_manager`` and ``client_server`` both given 48149). A pool remembers what it gave, so
    all the ports of one cluster differ even before any node listens on them. It picks ports
    between Ray's worker ports (10002–19999 by default) and the kernel's ephemeral range, so an
    outgoing connection opened after the probe cannot take a port before its node binds it;
    where that gap is too small it falls back to ports the kernel picks.

    Args:
        taken: ports never to hand out (Redis' 6379 is always among them).
    """

    MAX_TRIES = 200
    LOWEST = 20000
    MIN_GAP = 1000

    def __init__(self, taken: set[int] | None = None):
        self.given: set[int] = {6379} | set(taken or ())
        low = ephemeral_port_range()[0]
        self.candidates = range(self.LOWEST, low) if low - self.LOWEST >= self.MIN_GAP else None
        self._random = random.Random()

    def _probe(self) -> int | None:
        port = self._random.choice(self.candidates) if self.candidates else 0
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
        except OSError:
            return None

    def take(self) -> int:
        """A port nothing listens on now and this pool has not handed out before.

        Raises:
            ClusterError: if ``MAX_TRIES`` probes find none.
        """
        for _ in range(self.MAX_TRIES):
            port = self._probe()
            if port is not None and port not in self.given:
                self.given.add(port)
                return port
        raise ClusterError(f"could not find a free TCP port on 127.0.0.1 in {self.MAX_TRIES} tries")


RAY_START = (sys.executable, "-m", "gpucoin.cluster.ray_node", "start", "--block", "--disable-usage-stats")
"""The start of every ``ray start`` command line gpucoin runs (``cluster.ray_node`` keeps a loopback IP)."""


def component_ports(pool: PortPool, head: bool) -> dict[str, int]:
    """A port from ``pool`` for each of a node's listening components, by ``ray start`` flag name.

    A head's include Ray's client server and the dashboard: the dashboard process runs even with
    ``--include-dashboard=false`` (the job and state APIs), on 8265 with no retry unless told,
    so a second cluster on the host would fail.
    """
    names = [
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    ]
    if head:
        names += ["ray-client-server-port", "dashboard-port"]
    return {name: pool.take() for name in names}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (never Redis' 6379)."""
    return PortPool().take()


def _temp_root() -> str:
    return "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()


def short_temp_dir(prefix: str) -> Path:
    """A new private (0700) directory under /tmp: short, because unix socket paths placed in it
    may hold at most 107 bytes (a user's ``TMPDIR`` may be much longer)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_temp_root()))


def check_short_temp_dir(path: Path | str, prefix: str) -> Path:
    """``path`` if it names a directory ``short_temp_dir(prefix)`` could have made: ``<temp
    root>/<prefix><something>``. A record naming any other path (``/``, a home) is refused before
    gpucoin ends the processes that name it or removes it.

    Raises:
        ValueError: naming the path and what was expected.
    """
    p = Path(path)
    root = _temp_root()
    if not (p.is_absolute() and str(p.parent) == root and p.name.startswith(prefix) and len(p.name) > len(prefix)):
        raise ValueError(f"{path} is not a {prefix}* directory of {root}")
    return p


@dataclass
class NodeSpec:
    """One Ray node to start.

    Attributes:
        name: short name (``head``, ``vol0``, ``verifier0``), also its marker resource.
        num_cpus: logical CPUs Ray may schedule on it.
        env: extra environment for the node's processes (e.g. the volunteer's keystore path).
        gpu: index of the host GPU this node owns (``CUDA_VISIBLE_DEVICES``), or None for none.
    """

    name: str
    num_cpus: int = 1
    env: dict[str, str] = field(default_factory=dict)
    gpu: int | None = None


@dataclass
class RunningNode:
    """A started node: its spec, its ``ray start --block`` process and, once known, its Ray node id."""

    spec: NodeSpec
    process: subprocess.Popen
    log_path: Path
    node_id: str | None = None


class EmbeddedCluster:
    """Start and stop a multi-node Ray cluster on this host.

    Use as a context manager; ``address`` is ``127.0.0.1:<port>`` of the head's GCS.

    Args:
        workdir: where node logs go.
        nodes: the non-head nodes (volunteers and verifiers).
        head_port: GCS port of the head (default: a free one; never 6379, where Redis may listen).
        runtime_env: this driver's job-level Ray runtime env (Ray uploads local ``py_modules``
            directories, such as a job's package, only at this level).
        auth_token_path: gpucoin's Ray token file (created 0600 if missing; default
            ``<workdir>/ray_auth_token``).
        node_user: the OS user every node process runs as (None: this process's user).

    Raises:
        ClusterError: if a node does not come up within ``START_TIMEOUT_S`` (its log's tail is quoted).
    """

    def __init__(
        self,
        workdir: Path,
        nodes: list[NodeSpec],
        head_port: int | None = None,
        runtime_env: dict | None = None,
        auth_token_path: Path | None = None,
        node_user: NodeUser | None = None,
    ):
        self.runtime_env = runtime_env
        self.node_user = node_user
        self.workdir = Path(workdir)
        self.auth_token_path = Path(auth_token_path) if auth_token_path else self.workdir / "ray_auth_token"
        self.temp_dir: Path | None = None
        self.ray_dir: Path | None = None
        self._node_token_path = self.auth_token_path
        self._driver_env = contextlib.ExitStack()
        self.node_specs = [NodeSpec("head", num_cpus=0)] + list(nodes)
        self._ports = PortPool({head_port} if head_port else None)
        self.port = head_port or self._ports.take()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, RunningNode] = {}
        self._driver_threads: list[threading.Thread] = []

    def __enter__(self) -> "EmbeddedCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def port_args(self, head: bool) -> list[str]:
        """``ray start`` flags giving one node's components ports no other node of this cluster has."""
        return [f"--{name}={port}" for name, port in component_ports(self._ports, head).items()]

    def _launch(self, spec: NodeSpec, head: bool) -> RunningNode:
        assert self.temp_dir is not None
        args = [
            *RAY_START,
            f"--num-cpus={spec.num_cpus}",
            f"--num-gpus={0 if spec.gpu is None else 1}",
        ]
        args += [
            f"--resources={json.dumps({NODE_MARKER_PREFIX + spec.name: 1})}",
            *self.port_args(head),
            "--object-store-memory=200000000",
        ]
        if head:
            args += [
                "--head",
                f"--port={self.port}",
                f"--node-ip-address={NODE_IP}",
                f"--temp-dir={self.ray_dir}",
                "--include-dashboard=false",
            ]
        else:
            args += [f"--address={self.address}", f"--node-ip-address={NODE_IP}"]
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / f"ray-{spec.name}.log"
        # nodes share one host: each sees only its own GPU, or none
        visible = "" if spec.gpu is None else str(spec.gpu)
        proc = spawn_ray_node(args, spec.env, self.node_user, self.ray_dir, self._node_token_path, log_path, visible)
        return RunningNode(spec, proc, log_path)

    def _check_alive(self) -> None:
        for n in self.nodes.values():
            if n.process.poll() is not None:
                tail = n.log_path.read_text(errors="replace")[-1500:]
                raise ClusterError(
                    f"ray node {n.spec.name} exited with {n.process.returncode} while starting; log tail:\n{tail}"
                )

    def start(self) -> None:
        """Start the head, then every node, and wait until all are alive in the GCS; connect this process."""
        import ray

        ensure_token(self.auth_token_path)
        self.temp_dir = short_temp_dir("gpucoin-ray-")  # Ray's unix sockets live under it
        self.ray_dir = self.temp_dir
        self._node_token_path = self.auth_token_path
        if self.node_user is not None:
            # Ray's dir is the node user's, inside ours; the nodes get their own copy of the token
            self.ray_dir = node_dir(self.temp_dir, self.node_user, "r")
            self._node_token_path = self.ray_dir / "auth_token"
            shutil.copyfile(self.auth_token_path, self._node_token_path)
            chown_tree(self._node_token_path, self.node_user)
        self._driver_env.enter_context(driver_env(self.auth_token_path, self.ray_dir))
        self.nodes["head"] = self._launch(self.node_specs[0], head=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            self._check_alive()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"the Ray head did not listen on {self.address} within {START_TIMEOUT_S:.0f} s"
                    ) from None
                time.sleep(0.5)
        with loopback_kept():
            ray.init(
                address=self.address,
                log_to_driver=False,
                configure_logging=False,
                runtime_env=self.runtime_env,
                _node_ip_address=NODE_IP,
            )
        # One node at a time: nodes started together on one host race in the shared session dir.
        for spec in self.node_specs[1:]:
            for attempt in range(1, NODE_START_ATTEMPTS + 1):
                self.nodes[spec.name] = self._launch(spec, head=False)
                try:
                    self._wait_for_nodes(deadline)
                    break
                except ClusterError:
                    # `ray start` gives a raylet a fixed 30 s to register; on a loaded host it may
                    # miss that and exit. Start it again, a bounded number of times.
                    if self.nodes[spec.name].process.poll() is None or attempt == NODE_START_ATTEMPTS:
                        raise
                    del self.nodes[spec.name]

    def _wait_for_nodes(self, deadline: float) -> None:
        import ray

        while True:
            self._check_alive()
            found = {}
            for n in ray.nodes():
                if not n.get("Alive"):
                    continue
                for key in n.get("Resources", {}):
                    if key.startswith(NODE_MARKER_PREFIX):
                        found[key[len(NODE_MARKER_PREFIX) :]] = n["NodeID"]
            if all(name in found for name in self.nodes):
                for name, node in self.nodes.items():
                    node.node_id = found[name]
                return
            if time.monotonic() > deadline:
                missing = sorted(set(self.nodes) - set(found))
                raise ClusterError(f"Ray nodes {missing} did not join within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.5)

    def node_id(self, name: str) -> str:
        """Ray node id of the started node ``name``."""
        return self.nodes[name].node_id  # type: ignore[return-value]

    def stop(self) -> None:
        """Disconnect and terminate every node this cluster started (non-head first); bounded wait, then kill.

        A second Ctrl-C while this runs is ignored, so the clean-up is not cut short.
        """
        with sigint_ignored():
            self._stop()

    def track_driver_thread(self, thread: threading.Thread) -> None:
        """Have ``stop`` wait for ``thread`` (one of this driver's threads that calls Ray, such as
        a Ray Train ``fit``) before it disconnects the driver: ``ray.shutdown()`` while another
        thread is inside Ray frees what that thread still uses, and the process aborts."""
        self._driver_threads.append(thread)

    def _stop(self) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        workers = [n for name, n in self.nodes.items() if name != "head"]
        # the nodes first: a driver thread waiting on their work then fails and returns
        self._terminate(workers, deadline)
        for t in self._driver_threads:
            t.join(max(0.1, deadline - time.monotonic()))
        busy = [t.name for t in self._driver_threads if t.is_alive()]
        try:
            import ray

            if ray.is_initialized() and not busy:
                ray.shutdown()
        except Exception:  # noqa: BLE001 - stopping must go on whatever the driver's state
            pass
        self._terminate([self.nodes["head"]] if "head" in self.nodes else [], deadline)
        self.nodes.clear()
        self._driver_threads.clear()
        self._driver_env.close()
        if self.node_user is not None:
            kill_processes(self.node_user)  # its uid is ours alone: nothing of it outlives the cluster
        if self.temp_dir is not None:
            stop_marked_processes(str(self.temp_dir), max(1.0, min(10.0, deadline - time.monotonic())))
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    @staticmethod
    def _terminate(nodes: list[RunningNode], deadline: float) -> None:
        """SIGTERM each node's process group, wait until ``deadline`` (monotonic s), then SIGKILL."""
        for n in nodes:
            if n.process.poll() is None:
                try:
                    os.killpg(n.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for n in nodes:
            try:
                n.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(n.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                n.process.wait(timeout=5)


def stop_marked_processes(mark: str, timeout_s: float) -> int:
    """Terminate every process but this one whose command line names ``mark`` (a cluster's temp
    dir, which no other process's names): Ray workers that outlived their node in sessions of
    their own. Waits ``timeout_s``, then kills what is left.

    Returns:
        How many processes were found.
    """
    import psutil

    me = os.getpid()
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] != me and any(mark in a for a in p.info["cmdline"] or ()):
            left.append(p)
    return end_processes(left, timeout_s)


def spawn_ray_node(
    args: list[str],
    extra_env: dict[str, str],
    node_user: NodeUser | None,
    ray_dir: Path,
    token_path: Path,
    log_path: Path,
    cuda_visible: str | None,
) -> subprocess.Popen:
    """Start ``args`` (a ``ray start --block`` command line) in a session of its own, logging to ``log_path``.

    Its environment is this process's without any ``GPUCOIN_*`` variable (a password, a key)
    but ``extra_env`` and, as this user, the cache dir; with the cluster's Ray token and temp dir
    (``auth.node_env``); Ray's 30 s graceful drain skipped (nothing is left to drain when gpucoin
    stops a node); ``CUDA_VISIBLE_DEVICES`` set to ``cuda_visible`` ("" for none; None leaves it
    as it is). With ``node_user``, it runs as that user, in
    ``ray_dir``, with its own home's caches.
    """
    kept = ("GPUCOIN_CACHE_DIR",) if node_user is None else ()
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPUCOIN_") or k in kept}
    base.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    as_user: dict = {}
    if node_user is not None:
        # the node user keeps its caches in its own home, its temp files in /tmp
        for key in ("TMPDIR", "XDG_CACHE_HOME", "TORCH_EXTENSIONS_DIR"):
            base.pop(key, None)
        base.update(node_user.env())
        as_user = {**node_user.popen_kwargs(), "cwd": ray_dir}
    env = node_env({**base, **extra_env}, token_path, ray_dir)
    # a Ray job's entrypoint says ``python``: this interpreter, whatever the caller's PATH
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    if cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible
    with log_path.open("wb") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, **as_user)
