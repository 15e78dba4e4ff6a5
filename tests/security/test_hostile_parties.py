"""Hostile parties around one embedded market: a hostile user environment, a hostile rank and
hostile job code. One market (``LocalMarket``: a head, 2 volunteers, a verifier) runs two jobs
under a user's own Ray state (``~/.ray/auth_token``, a stale ``ray_current_cluster``,
``RAY_AUTH_TOKEN``), its listeners scanned the whole time:

- ``stall-*``, 12 steps: vol1's rank stalls and floods the head's inbox. It is not metered for the
  stall, nor can it push out a co-worker's receipt (the metering and the inbox's rules alone:
  tests/unit/test_meter.py, tests/security/test_inbox_flood.py).
- ``shakespeare_char-*``, 8 steps, with a hostile module appended to the job's package: imported
  by every rank and by the verifier, it looks for keys and passwords in its environment and in
  every process's ``/proc/<pid>/environ`` (the signers' and the head's included), then asks its
  node's signer for receipts it was not assigned and for other kinds of message. It finds no
  secret and every request is refused; the job's own receipts still verify and are paid. In the
  verifier's replay it also tries to convict an honest rank: it asks the signer for a failing
  report outright (refused: reports are signed only on the signer's own verdict), then feeds the
  signer forged evidence, claiming its package is vetted. The signer's verdict on forged evidence
  is a fail, but the job's package is not vetted, so the head and the ledger count it as void:
  nobody is slashed and the submitter pays for the void interval.

Then the market closes, and the cluster was closed throughout: Ray token authentication with
gpucoin's own token, nothing listening beyond loopback, the user's Ray state neither broke the
runs nor was changed. (One market for all of it: each market costs half a minute of the suite.)"""

from __future__ import annotations

import json
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
from gpucoin.cluster.node_user import switching_users
from gpucoin.coordinator.job import LocalMarket, LocalOptions, new_job_id
from gpucoin.ledger.accounts import wallet_account
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy
from gpucoin.runtime.faults import FAULT_FLOOD_ENV, FAULT_STALL_ENV, FAULTS_BY_JOB_ENV
from gpucoin.spec import load_spec
from gpucoin.wallet.keystore import DEV_PASSWORD
from tests.conftest import TINY_MODEL, write_spec

POLICY = load_policy(SHIPPED_POLICIES_DIR / "local.toml")
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
RAY_SERVERS = {"gcs_server", "raylet"}
STALL_S = 15
OWN_TEMP_PREFIXES = ("gpucoin-head-", "gpucoin-node-", "gpucoin-work-", "gpucoin-eval-", "gpucoin-jobcode-")
"""The temp dirs an embedded run makes (its head's, its nodes', the node user's working dir, an evaluation's)."""

pytestmark = pytest.mark.ray

HOSTILE = '''

def _attack():
    """Runs at import inside a node's Ray worker (where a signer socket is named)."""
    import glob, inspect, json, os, sys
    sock = os.environ.get("GPUCOIN_SIGNER_SOCKET")
    out_dir = os.environ.get("HOSTILE_REPORT_DIR")
    if not sock or not out_dir:
        return
    from eth_account import Account
    from gpucoin.wallet.messages import sign, Domain
    from gpucoin.wallet.signer import SignerClient
    report = {"pid": os.getpid(), "uid": os.getuid(), "own_env": dict(os.environ), "environs": {},
              "environ_refused": [], "signer_pids": [], "refused": {}, "signed": []}
    for path in glob.glob("/proc/[0-9]*/environ"):
        pid = int(path.split("/")[2])
        try:
            if b"gpucoin.wallet.signer" in open(f"/proc/{pid}/cmdline", "rb").read():
                report["signer_pids"].append(pid)
            report["environs"][path] = open(path, "rb").read().decode("latin-1")
        except OSError:
            report["environ_refused"].append(pid)
    wallets = os.environ["HOSTILE_KEYSTORE_DIR"]
    for what, probe in (("list", lambda: os.listdir(wallets)),
                        ("read", lambda: open(os.path.join(wallets, "vol0.json")).read())):
        try:
            report["keystore_" + what] = str(probe())[:80]
        except OSError as e:
            report["keystore_" + what] = "refused: " + str(e.strerror)
    config = None  # the rank's own config, found by walking the caller's frames
    for frame in inspect.stack():
        c = frame.frame.f_locals.get("config")
        if isinstance(c, dict) and "assignments" in c:
            config = c
    client = SignerClient(sock)
    me = client.address
    tries = {"unbond": ("Unbond", {"provider": me, "amount": 10**12, "nonce": 7}, None),
             "registration": ("NodeRegistration", {"provider": me, "nodeId": "x", "resources": "{}",
                              "askPerWorkerHour": 0, "stake": 0, "nonce": 8, "deadline": 2**40}, None)}
    def receipt(job, rank, start=0, end=4):
        z = "0x" + "00" * 32
        return {"jobId": job, "worker": me, "rank": rank, "stepStart": start, "stepEnd": end, "samples": 1,
                "computeTimeMs": 1, "sketchRoot": z, "checkpointHash": z, "previousReceipt": z, "nonce": 99}
    fake = Account.create()
    if config is not None:
        rank = config.get("_rank_probe", None)
        assignments = config["assignments"]
        own = [a for a in assignments if json.loads(a)["message"]["provider"] == me]
        if own:
            mine = json.loads(own[0])["message"]
            domain = Domain.from_dict(json.loads(own[0])["domain"])
            other_rank = 1 - mine["rank"]
            tries["other_rank"] = ("WorkReceipt", receipt(mine["jobId"], other_rank), own[0])
            tries["other_rank_with_its_assignment"] = ("WorkReceipt", receipt(mine["jobId"], other_rank),
                                                       assignments[other_rank])
            tries["other_job"] = ("WorkReceipt", receipt("some-other-job", mine["rank"]), own[0])
            forged = sign(fake, "Assignment", domain, {"jobId": "some-other-job", "rank": 0, "provider": me,
                          "nodeId": "x", "fromStep": 0, "nonce": 1}).to_json()
            tries["forged_assignment"] = ("WorkReceipt", receipt("some-other-job", 0), forged)
            tries["steps_ahead"] = ("WorkReceipt", receipt(mine["jobId"], mine["rank"], 4, 8), own[0])
    else:
        tries["no_assignment"] = ("WorkReceipt", receipt("any-job", 0), None)
    for name, (kind, msg, asg) in tries.items():
        try:
            client.sign(kind, msg, asg)
            report["signed"].append(name)
        except Exception as e:
            report["refused"][name] = str(e)
    report["had_config"] = config is not None
    with open(os.path.join(out_dir, f"{os.getpid()}.json"), "w") as f:
        json.dump(report, f)

_attack()


def _forge():
    """In the verifier's replay: make its signer convict rank 1 of honest work."""
    import json, os
    out_dir = os.environ.get("HOSTILE_REPORT_DIR")
    if not os.environ.get("HOSTILE_FORGE_FAIL") or not out_dir:
        return
    from gpucoin.verify.judgment import Evidence
    from gpucoin.wallet.signer import SignerClient
    real = SignerClient.judge
    def judge(self, **kw):
        report = {"raw_fail": None}
        try:
            self.sign("VerificationReport", {"verifier": self.address, "receiptDigest": "0x" + "11" * 32,
                                             "verdict": "fail", "distanceE9": 10**9, "nonce": 5})
            report["raw_fail"] = "signed"
        except Exception as e:
            report["raw_fail"] = str(e)
        fake = kw["committed"].copy()
        fake[1] += 1.0
        checks = kw["evidence"].end_checks
        kw["evidence"] = Evidence(replayed=fake, end_checks=checks, replayed_again=fake, end_checks_again=checks)
        kw["vetted"] = True
        reports, findings = real(self, **kw)
        report["verdicts"] = [f.verdict for f in findings]
        with open(os.path.join(out_dir, f"forge-{os.getpid()}.json"), "w") as f:
            json.dump(report, f)
        return reports, findings
    SignerClient.judge = judge

_forge()
'''


class ListenerScan(threading.Thread):
    """Every TCP listener of this process and its descendants (the Ray nodes we start, their
    workers and the job's code), polled every ``period_s`` until stopped: one read of the host's
    socket table a poll (a table per process, as the flood fills it, starved the run it watched)."""

    def __init__(self, period_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period_s = period_s
        self.seen: set[tuple[str, str, int]] = set()  # (process name, address, port)
        self.halt = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        names: dict[int, str] = {}
        while not self.halt.wait(self.period_s):
            try:
                tree = {me.pid, *(p.pid for p in me.children(recursive=True))}
                listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for c in listening:
                if c.pid in tree:
                    try:
                        name = names.setdefault(c.pid, psutil.Process(c.pid).name())
                    except psutil.Error:
                        continue
                    self.seen.add((name, c.laddr.ip, c.laddr.port))


@dataclass
class Runs:
    stall: dict
    """The summary of the job with the stalling, flooding rank."""
    hostile: dict
    """The summary of the job with the hostile module."""
    reports: Path
    """Where the hostile module wrote what it found (``<pid>.json``, ``forge-<pid>.json``)."""
    home: Path
    scan: ListenerScan
    user_home: Path
    user_token: Path
    user_tmp: Path
    stale: Path
    system_before: set[str]
    own_before: set[str]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two jobs on one market under a user's own Ray state, its listeners scanned until it closed.
    In ``stall-*`` jobs vol1 (rank 1) sends 400 hostile submissions before each receipt and sleeps
    STALL_S before handing in steps 4-8; every node has the hostile module's drop box, the
    verifier's forgery armed. The drop box is writable by the node user (tmp dirs are root's only
    when the tests run as root)."""
    tmp = tmp_path_factory.mktemp("hostile")
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
    reports = Path(tempfile.mkdtemp(prefix="gpucoin-test-reports-", dir="/tmp"))
    os.chmod(reports, 0o1777)
    home = tmp / "gpucoin"
    drop = {"HOSTILE_REPORT_DIR": str(reports), "HOSTILE_KEYSTORE_DIR": str(home / "wallets")}
    stall = {"stall-": {FAULT_STALL_ENV: f"{STALL_S}@8", FAULT_FLOOD_ENV: "400"}}
    node_env = {
        "vol0": drop,
        "vol1": {**drop, FAULTS_BY_JOB_ENV: json.dumps(stall)},
        "verifier0": {**drop, "HOSTILE_FORGE_FAIL": "1"},
    }
    stall_spec = load_spec(write_spec(tmp / "job", TINY_MODEL), {"steps": 12, "checkpoint_interval_steps": 4})
    hostile_path = write_spec(tmp / "hostile", TINY_MODEL)
    init = hostile_path.parent / "__init__.py"
    init.write_text(init.read_text() + HOSTILE)
    hostile_spec = load_spec(hostile_path, {"steps": 8, "checkpoint_interval_steps": 4})
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HOME", str(user_home))
            mp.setenv("TMPDIR", str(user_tmp))
            mp.setenv("RAY_AUTH_TOKEN", "a-token-for-some-other-cluster")
            mp.delenv("RAY_AUTH_MODE", raising=False)
            scan = ListenerScan()
            scan.start()
            try:
                with LocalMarket(LocalOptions(policy=POLICY, home=home, node_env=node_env)) as market:
                    stall_s = market.run(stall_spec, job_id=new_job_id("stall"))
                    hostile_s = market.run(hostile_spec)
            finally:
                scan.halt.set()
                scan.join()
            yield Runs(
                stall_s,
                hostile_s,
                reports,
                home,
                scan,
                user_home,
                user_token,
                user_tmp,
                stale,
                system_before,
                own_before,
            )
    finally:
        shutil.rmtree(user_tmp, ignore_errors=True)
        shutil.rmtree(reports, ignore_errors=True)


def test_a_run_listens_on_loopback_only_and_leaves_the_users_ray_state_alone(runs: Runs) -> None:
    s = runs.stall
    assert s["audit"] == "ok" and s["receipts"]["signed"] == 6

    ray_listeners = {x for x in runs.scan.seen if x[0] in RAY_SERVERS}
    assert ray_listeners, f"the scan found no Ray listener at all: {sorted(runs.scan.seen)}"
    exposed = sorted(x for x in runs.scan.seen if x[1] not in LOOPBACK)
    assert not exposed, f"listening beyond loopback: {exposed}"

    assert runs.user_token.read_text() == "the-users-own-ray-token"
    assert sorted(os.listdir(runs.user_home / ".ray")) == ["auth_token"]
    assert runs.stale.read_text() == "127.0.0.1:1"
    assert sorted(os.listdir(runs.user_tmp / "ray")) == ["ray_current_cluster"]
    system_ray = Path("/tmp/ray")
    if system_ray.is_dir():
        assert set(os.listdir(system_ray)) <= runs.system_before, "the run left Ray state in /tmp/ray"
    own_after = {d for d in os.listdir("/tmp") if d.startswith(OWN_TEMP_PREFIXES)}
    assert own_after <= runs.own_before, f"own Ray temp dir left: {own_after - runs.own_before}"
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR"):
        assert k not in os.environ, f"{k} leaked into the caller's environment"
    assert os.environ["RAY_AUTH_TOKEN"] == "a-token-for-some-other-cluster"

    token_file = home_token_path(runs.home)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text()
    assert len(token) >= 64
    for log in (runs.home / "jobs").rglob("*.log"):
        assert token not in log.read_text(errors="replace"), f"the Ray token is in {log}"


def test_a_stalling_flooding_rank_raises_no_bill_and_drops_no_receipt(runs: Runs) -> None:
    """Steps 4-8 and 8-12 each take a few seconds of compute: metered on the coordinator's clock
    as before, one of them would hold the whole stall."""
    s = runs.stall
    assert s["stopped"] is None and s["audit"] == "ok"
    assert s["receipts"]["signed"] == 6 and s["receipts"]["rejected"] == 0
    assert all(iv["outcome"] in ("passed", "unchecked") for iv in s["intervals"]), s["intervals"]
    later = [iv["wall_ms"] for iv in s["intervals"][1:]]
    assert max(later) < STALL_S * 1000, later
    assert 0 < s["ledger"]["escrowed"] - s["ledger"]["refunded"]
    for name in ("vol0", "vol1"):  # both ranks were paid: no receipt was lost
        assert s["accounts"][wallet_account(participant(name, runs.home).address)]["change"] > 0


def test_job_code_finds_no_key_and_its_signer_signs_nothing_out_of_scope(runs: Runs) -> None:
    s, reports, home = runs.hostile, runs.reports, runs.home
    assert s["audit"] == "ok" and s["receipts"]["signed"] >= 2 and s["receipts"]["rejected"] == 0

    found = [json.loads(p.read_text()) for p in reports.glob("[0-9]*.json")]
    assert sum(r["had_config"] for r in found) >= 2, "the attack did not run in both ranks"
    secrets = [DEV_PASSWORD] + [
        participant(n, home).account.key.hex().removeprefix("0x") for n in ("vol0", "vol1", "verifier0")
    ]
    for r in found:
        assert r["signed"] == [], f"a signer signed {r['signed']} for job code"
        assert len(r["refused"]) >= 3 if r["had_config"] else r["refused"]
        assert "GPUCOIN_NODE_KEYSTORE" not in json.dumps(r["own_env"])
        signer_envs = [e for e in r["environs"].values() if "gpucoin" in e.lower() or "PYTEST" in e]
        assert signer_envs, "the attack read no gpucoin process's environment"
        for where, text in [("own env", json.dumps(r["own_env"]))] + list(r["environs"].items()):
            for secret in secrets:
                assert secret not in text, f"a secret is readable in {where}"
        if switching_users():  # root: job code runs as the node user, apart from keys and the head
            assert r["uid"] != 0
            assert r["keystore_list"].startswith("refused") and r["keystore_read"].startswith("refused"), r
            assert r["signer_pids"] and set(r["signer_pids"]) <= set(r["environ_refused"])
            assert os.getpid() in r["environ_refused"], "the head's environment was readable"


def test_job_code_cannot_make_the_verifier_convict_honest_work(runs: Runs) -> None:
    s, reports, home = runs.hostile, runs.reports, runs.home

    forged = [json.loads(p.read_text()) for p in reports.glob("forge-*.json")]
    assert forged, "the forgery did not run in the verifier"
    for f in forged:
        assert "own verdict" in f["raw_fail"]
        assert f["verdicts"] == ["pass", "fail"]  # the signer's verdict on what it was handed
    assert s["audit"] == "ok" and s["receipts"]["failed"] == 0 and s["receipts"]["void"] >= 1
    assert s["ledger"]["slashed"] == 0 and "void" in (s["stopped"] or "")
    assert s["ledger"]["burned"] > 0  # the submitter paid for the void interval, all of it burned
    vols = {participant(n, home).address for n in ("vol0", "vol1")}
    for account, change in s["accounts"].items():
        if any(v.lower() in account.lower() for v in vols):
            assert "bonded" not in account or change["change"] >= 0, f"{account} lost bond: {change}"
