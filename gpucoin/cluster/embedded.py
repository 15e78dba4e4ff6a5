"""The embedded local cluster: a Ray head and N volunteer nodes as separate Ray nodes on this host.

Each node is one ``ray start --block`` process that we own (its own session, so Ctrl-C
reaches only us); stopping the cluster terminates exactly those processes, never another Ray
cluster on the host (``ray stop`` would stop them all). Every node gets its own ports.

The cluster is closed: Ray token authentication with gpucoin's own token file, every node on
the loopback address (so Ray's servers listen on 127.0.0.1 only, see ``ray_node``), and a Ray
temp dir of its own that is removed on stop, so no ``/tmp/ray/ray_current_cluster`` names a dead
head afterwards (gpucoin.cluster.auth).
"""

from __future__ import annotations

import contextlib
import json
import os
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (never Redis' 6379)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 6379:
            return port
    raise ClusterError("could not find a free TCP port on 127.0.0.1 in 100 tries")


def short_temp_dir(prefix: str) -> Path:
    """A new private (0700) directory under /tmp: short, because unix socket paths placed in it
    may hold at most 107 bytes (a user's ``TMPDIR`` may be much longer)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None))


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
    ):
        self.runtime_env = runtime_env
        self.workdir = Path(workdir)
        self.auth_token_path = Path(auth_token_path) if auth_token_path else self.workdir / "ray_auth_token"
        self.temp_dir: Path | None = None
        self._driver_env = contextlib.ExitStack()
        self.node_specs = [NodeSpec("head", num_cpus=0)] + list(nodes)
        self.port = head_port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, RunningNode] = {}

    def __enter__(self) -> "EmbeddedCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _launch(self, spec: NodeSpec, head: bool) -> RunningNode:
        assert self.temp_dir is not None
        args = [
            sys.executable,
            "-m",
            "gpucoin.cluster.ray_node",
            "start",
            "--block",
            "--disable-usage-stats",
            f"--num-cpus={spec.num_cpus}",
            f"--num-gpus={0 if spec.gpu is None else 1}",
        ]
        args += [
            f"--resources={json.dumps({NODE_MARKER_PREFIX + spec.name: 1})}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--object-store-memory=200000000",
        ]
        if head:
            args += [
                "--head",
                f"--port={self.port}",
                f"--node-ip-address={NODE_IP}",
                f"--temp-dir={self.temp_dir}",
                "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}",
            ]
        else:
            args += [f"--address={self.address}", f"--node-ip-address={NODE_IP}"]
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / f"ray-{spec.name}.log"
        # Nothing is left to drain when we stop a node: skip Ray's 30 s graceful drain.
        env = node_env(
            {**os.environ, **spec.env, "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
            self.auth_token_path,
            self.temp_dir,
        )
        # nodes share one host: each sees only its own GPU, or none
        env["CUDA_VISIBLE_DEVICES"] = "" if spec.gpu is None else str(spec.gpu)
        log = log_path.open("wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
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
        self._driver_env.enter_context(driver_env(self.auth_token_path, self.temp_dir))
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

    def _stop(self) -> None:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001 - stopping must go on whatever the driver's state
            pass
        order = [n for name, n in self.nodes.items() if name != "head"] + (
            [self.nodes["head"]] if "head" in self.nodes else []
        )
        for n in order:
            if n.process.poll() is None:
                try:
                    os.killpg(n.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for n in order:
            try:
                n.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(n.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                n.process.wait(timeout=5)
        self.nodes.clear()
        self._driver_env.close()
        if self.temp_dir is not None:
            self._stop_stragglers(deadline)
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def _stop_stragglers(self, deadline: float) -> None:
        """Terminate what outlived its node (Ray workers in sessions of their own): every process
        whose command line names this cluster's temp dir, which no other process's does."""
        import psutil

        mark = str(self.temp_dir)
        me = os.getpid()
        left = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if p.info["pid"] != me and any(mark in a for a in p.info["cmdline"] or ()):
                left.append(p)
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(left, timeout=max(1.0, min(10.0, deadline - time.monotonic())))
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
