"""The Ray node processes gpucoin starts on a host (``gpucoin up``'s head, ``gpucoin join``'s
nodes, and so the embedded mode's): ports, temp dirs, the ``ray start`` command line, stopping.

Each node is one ``ray start --block`` process in a session of its own (so Ctrl-C reaches only
the command that started it); stopping ends exactly those processes and what still runs from
their temp dir, never another Ray cluster on the host (``ray stop`` would stop them all). Every
node gets its own ports (``PortPool``) and a short temp dir of its own, removed when it stops.
Given a ``NodeUser`` (gpucoin runs as root), a node process runs as that unprivileged user
(``gpucoin.cluster.node_user``).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from gpucoin.cluster.auth import node_env
from gpucoin.cluster.node_user import NodeUser
from gpucoin.cluster.procs import end_processes
from gpucoin.exceptions import ClusterError

NODE_IP = "127.0.0.1"
"""The embedded mode's Ray node IP: loopback, so nothing of its cluster listens beyond this host."""


@contextlib.contextmanager
def sigint_ignored():
    """Ignore SIGINT, and SIGTERM and SIGHUP (which ``gpucoin train`` turns into Ctrl-C), inside
    the block: a clean-up is not cut short. Main thread only; elsewhere signals are not ours to set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
