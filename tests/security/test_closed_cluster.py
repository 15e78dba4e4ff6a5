"""The embedded cluster is closed: Ray token authentication with gpucoin's own token, nothing
listening beyond loopback, and the user's own Ray state (``~/.ray/auth_token``, a stale
``ray_current_cluster``, ``RAY_AUTH_TOKEN``) neither breaks a run nor is changed by it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest

from gpucoin.cluster.auth import home_token_path
from gpucoin.coordinator.job import LocalOptions, train_local
from gpucoin.policy.model import load_policy
from gpucoin.spec import load_spec
from tests.conftest import TINY_MODEL, write_spec

REPO = Path(__file__).resolve().parents[2]
POLICY = load_policy(REPO / "policies" / "local.toml")
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
RAY_SERVERS = {"gcs_server", "raylet"}

pytestmark = pytest.mark.ray


class ListenerScan(threading.Thread):
    """Every TCP listener of this process and its descendants (the Ray nodes we start, their
    workers and the job's code), polled every ``period_s`` until stopped."""

    def __init__(self, period_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period_s = period_s
        self.seen: set[tuple[str, str, int]] = set()  # (process name, address, port)
        self.halt = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.halt.wait(self.period_s):
            for p in [me, *me.children(recursive=True)]:
                try:
                    name = p.name()
                    conns = p.net_connections(kind="inet")
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                for c in conns:
                    if c.status == psutil.CONN_LISTEN:
                        self.seen.add((name, c.laddr.ip, c.laddr.port))


def test_a_run_listens_on_loopback_only_and_leaves_the_users_ray_state_alone(tmp_path, monkeypatch) -> None:
    user_home = tmp_path / "user"
    (user_home / ".ray").mkdir(parents=True)
    user_token = user_home / ".ray" / "auth_token"
    user_token.write_text("the-users-own-ray-token")  # what a plain ray.init() writes on first use
    # TMPDIR decides Ray's default temp dir (<TMPDIR>/ray); short, as Ray's unix sockets go under it
    user_tmp = Path(tempfile.mkdtemp(prefix="gct-", dir="/tmp"))
    (user_tmp / "ray").mkdir()
    stale = user_tmp / "ray" / "ray_current_cluster"
    stale.write_text("127.0.0.1:1")  # a dead head a user's ray.init() would try to reach
    monkeypatch.setenv("HOME", str(user_home))
    monkeypatch.setenv("TMPDIR", str(user_tmp))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a-token-for-some-other-cluster")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    system_ray = Path("/tmp/ray")
    system_before = set(os.listdir(system_ray)) if system_ray.is_dir() else set()
    own_before = {d for d in os.listdir("/tmp") if d.startswith("gpucoin-ray-")}
    home = tmp_path / "gpucoin"

    scan = ListenerScan()
    scan.start()
    try:
        s = train_local(
            load_spec(write_spec(tmp_path / "job", TINY_MODEL), {"steps": 8, "checkpoint_interval_steps": 4}),
            LocalOptions(policy=POLICY, home=home),
        )
    finally:
        scan.halt.set()
        scan.join()
    try:
        assert s["stopped"] is None and s["audit"] == "ok" and s["receipts"]["signed"] == 4

        ray_listeners = {x for x in scan.seen if x[0] in RAY_SERVERS}
        assert ray_listeners, f"the scan found no Ray listener at all: {sorted(scan.seen)}"
        exposed = sorted(x for x in scan.seen if x[1] not in LOOPBACK)
        assert not exposed, f"listening beyond loopback: {exposed}"

        assert user_token.read_text() == "the-users-own-ray-token"
        assert sorted(os.listdir(user_home / ".ray")) == ["auth_token"]
        assert stale.read_text() == "127.0.0.1:1" and sorted(os.listdir(user_tmp / "ray")) == ["ray_current_cluster"]
        if system_ray.is_dir():
            assert set(os.listdir(system_ray)) <= system_before, "the run left Ray state in /tmp/ray"
        own_after = {d for d in os.listdir("/tmp") if d.startswith("gpucoin-ray-")}
        assert own_after <= own_before, f"own Ray temp dir left: {own_after - own_before}"
        for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR"):
            assert k not in os.environ, f"{k} leaked into the caller's environment"
        assert os.environ["RAY_AUTH_TOKEN"] == "a-token-for-some-other-cluster"

        token_file = home_token_path(home)
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text()
        assert len(token) >= 64
        for log in (home / "jobs").rglob("*.log"):
            assert token not in log.read_text(errors="replace"), f"the Ray token is in {log}"
    finally:
        shutil.rmtree(user_tmp, ignore_errors=True)


def test_the_cluster_refuses_a_client_without_its_token(tmp_path) -> None:
    """A process on this host that does not hold gpucoin's token cannot use the cluster; the same
    process with the token (read from the 0600 file) can, so the refusal is the token's."""
    from gpucoin.cluster.embedded import EmbeddedCluster

    token_path = tmp_path / "tok"
    with EmbeddedCluster(tmp_path / "logs", [], auth_token_path=token_path) as cluster:
        probe = f"import ray\nray.init(address='{cluster.address}')\nprint('CONNECTED', ray.cluster_resources())\n"

        def connect(token: str) -> subprocess.CompletedProcess:
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
            # Ray's own switch for a loopback driver address (else it dials the host's public IP)
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
            return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)

        guess = connect("0" * 64)
        assert guess.returncode != 0 and "CONNECTED" not in guess.stdout
        assert "token" in guess.stderr.lower(), guess.stderr[-2000:]
        holder = connect(token_path.read_text())
        assert holder.returncode == 0 and "CONNECTED" in holder.stdout, holder.stderr[-2000:]
