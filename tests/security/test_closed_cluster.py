"""The embedded cluster is closed: Ray token authentication with gpucoin's own token, nothing
listening beyond loopback, and the user's own Ray state (``~/.ray/auth_token``, a stale
``ray_current_cluster``, ``RAY_AUTH_TOKEN``) neither breaks a run nor is changed by it.

The same run has a hostile rank: it stalls and floods the head's inbox, and is not metered for the
stall nor can it push out a co-worker's receipt (the metering and the inbox's rules alone:
tests/unit/test_meter.py, tests/security/test_inbox_flood.py). One run serves both, as each costs
a minute of the suite."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from gpucoin.cluster.auth import home_token_path
from gpucoin.cluster.local import participant
from gpucoin.coordinator.job import LocalOptions, train_local
from gpucoin.ledger import Ledger
from gpucoin.ledger.accounts import wallet_account
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy
from gpucoin.runtime.faults import FAULT_FLOOD_ENV, FAULT_STALL_ENV
from gpucoin.spec import load_spec
from tests.conftest import TINY_MODEL, write_spec

REPO = Path(__file__).resolve().parents[2]
POLICY = load_policy(SHIPPED_POLICIES_DIR / "local.toml")
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
RAY_SERVERS = {"gcs_server", "raylet"}
STALL_S = 15
OWN_TEMP_PREFIXES = ("gpucoin-head-", "gpucoin-node-", "gpucoin-work-", "gpucoin-eval-", "gpucoin-jobcode-")
"""The temp dirs an embedded run makes (its head's, its nodes', the node user's working dir, an evaluation's)."""

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


@dataclass
class Run:
    summary: dict
    home: Path
    scan: ListenerScan
    user_home: Path
    user_token: Path
    user_tmp: Path
    stale: Path
    system_before: set[str]
    own_before: set[str]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run of 12 steps under a user's own Ray state, its listeners scanned; vol1 (rank 1)
    sends 400 hostile submissions before each receipt and sleeps STALL_S before handing in steps 4-8."""
    tmp = tmp_path_factory.mktemp("closed")
    user_home = tmp / "user"
    (user_home / ".ray").mkdir(parents=True)
    user_token = user_home / ".ray" / "auth_token"
    user_token.write_text("the-users-own-ray-token")  # what a plain ray.init() writes on first use
    # TMPDIR decides Ray's default temp dir (<TMPDIR>/ray); short, as Ray's unix sockets go under it
    user_tmp = Path(tempfile.mkdtemp(prefix="gct-", dir="/tmp"))
    (user_tmp / "ray").mkdir()
    stale = user_tmp / "ray" / "ray_current_cluster"
    stale.write_text("127.0.0.1:1")  # a dead head a user's ray.init() would try to reach
    system_ray = Path("/tmp/ray")
    system_before = set(os.listdir(system_ray)) if system_ray.is_dir() else set()
    own_before = {d for d in os.listdir("/tmp") if d.startswith(OWN_TEMP_PREFIXES)}
    home = tmp / "gpucoin"
    opts = LocalOptions(
        policy=POLICY, home=home, node_env={"vol1": {FAULT_STALL_ENV: f"{STALL_S}@8", FAULT_FLOOD_ENV: "400"}}
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(user_home))
        mp.setenv("TMPDIR", str(user_tmp))
        mp.setenv("RAY_AUTH_TOKEN", "a-token-for-some-other-cluster")
        mp.delenv("RAY_AUTH_MODE", raising=False)
        scan = ListenerScan()
        scan.start()
        try:
            spec = load_spec(write_spec(tmp / "job", TINY_MODEL), {"steps": 12, "checkpoint_interval_steps": 4})
            s = train_local(spec, opts)
        finally:
            scan.halt.set()
            scan.join()
        try:
            yield Run(s, home, scan, user_home, user_token, user_tmp, stale, system_before, own_before)
        finally:
            shutil.rmtree(user_tmp, ignore_errors=True)


def test_a_run_listens_on_loopback_only_and_leaves_the_users_ray_state_alone(run: Run) -> None:
    s = run.summary
    assert s["audit"] == "ok" and s["receipts"]["signed"] == 6

    ray_listeners = {x for x in run.scan.seen if x[0] in RAY_SERVERS}
    assert ray_listeners, f"the scan found no Ray listener at all: {sorted(run.scan.seen)}"
    exposed = sorted(x for x in run.scan.seen if x[1] not in LOOPBACK)
    assert not exposed, f"listening beyond loopback: {exposed}"

    assert run.user_token.read_text() == "the-users-own-ray-token"
    assert sorted(os.listdir(run.user_home / ".ray")) == ["auth_token"]
    assert run.stale.read_text() == "127.0.0.1:1"
    assert sorted(os.listdir(run.user_tmp / "ray")) == ["ray_current_cluster"]
    system_ray = Path("/tmp/ray")
    if system_ray.is_dir():
        assert set(os.listdir(system_ray)) <= run.system_before, "the run left Ray state in /tmp/ray"
    own_after = {d for d in os.listdir("/tmp") if d.startswith(OWN_TEMP_PREFIXES)}
    assert own_after <= run.own_before, f"own Ray temp dir left: {own_after - run.own_before}"
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR"):
        assert k not in os.environ, f"{k} leaked into the caller's environment"
    assert os.environ["RAY_AUTH_TOKEN"] == "a-token-for-some-other-cluster"

    token_file = home_token_path(run.home)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text()
    assert len(token) >= 64
    for log in (run.home / "jobs").rglob("*.log"):
        assert token not in log.read_text(errors="replace"), f"the Ray token is in {log}"


def test_a_stalling_flooding_rank_raises_no_bill_and_drops_no_receipt(run: Run) -> None:
    """Steps 4-8 and 8-12 each take a few seconds of compute: metered on the coordinator's clock
    as before, one of them would hold the whole stall."""
    s = run.summary
    assert s["stopped"] is None and s["audit"] == "ok"
    assert s["receipts"]["signed"] == 6 and s["receipts"]["rejected"] == 0
    assert all(iv["outcome"] in ("passed", "unchecked") for iv in s["intervals"]), s["intervals"]
    later = [iv["wall_ms"] for iv in s["intervals"][1:]]
    assert max(later) < STALL_S * 1000, later
    assert 0 < s["ledger"]["escrowed"] - s["ledger"]["refunded"]
    with Ledger(f"sqlite:///{run.home / 'ledger.db'}") as lg:  # both ranks were paid: no receipt was lost
        for name in ("vol0", "vol1"):
            assert lg.balance(wallet_account(participant(name, run.home).address)) > 0
