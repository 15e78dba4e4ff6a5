"""Job code runs beside no key: a hostile job module, imported by every rank and by the verifier,
looks for keys and passwords in its environment and in every process's ``/proc/<pid>/environ``
(the signers' and the head's included), then asks its node's signer for receipts it was not
assigned and for other kinds of message. It finds no secret and every request is refused; the
job's own receipts still verify and are paid.

In the verifier's replay the same module also tries to convict an honest rank: it asks the
signer for a failing report outright (refused: reports are signed only on the signer's own
verdict) and then feeds the signer forged evidence, claiming its package is vetted. The signer's
verdict on forged evidence is a fail, but the job's package is not vetted, so the head and the
ledger count it as void: nobody is slashed and the submitter pays for the void interval."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from gpucoin.cluster.local import participant
from gpucoin.cluster.node_user import switching_users
from gpucoin.coordinator.job import LocalOptions, train_local
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy
from gpucoin.spec import load_spec
from gpucoin.wallet.keystore import DEV_PASSWORD
from tests.conftest import TINY_MODEL, write_spec

REPO = Path(__file__).resolve().parents[2]
POLICY = load_policy(SHIPPED_POLICIES_DIR / "local.toml")

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


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One run of 8 steps with HOSTILE appended to the job's package on every node, the verifier's
    forgery armed: (summary, the attack's drop box, the run's home). The drop box is writable by
    the node user (tmp dirs are root's only when the tests run as root)."""
    reports = Path(tempfile.mkdtemp(prefix="gpucoin-test-reports-", dir="/tmp"))
    os.chmod(reports, 0o1777)
    tmp = tmp_path_factory.mktemp("hostile")
    spec_path = write_spec(tmp / "job", TINY_MODEL)
    init = spec_path.parent / "__init__.py"
    init.write_text(init.read_text() + HOSTILE)
    home = tmp / "home"
    env = {"HOSTILE_REPORT_DIR": str(reports), "HOSTILE_KEYSTORE_DIR": str(home / "wallets")}
    node_env = {"vol0": env, "vol1": env, "verifier0": {**env, "HOSTILE_FORGE_FAIL": "1"}}
    opts = LocalOptions(policy=POLICY, home=home, node_env=node_env)
    try:
        yield train_local(load_spec(spec_path, {"steps": 8, "checkpoint_interval_steps": 4}), opts), reports, home
    finally:
        shutil.rmtree(reports, ignore_errors=True)


def test_job_code_finds_no_key_and_its_signer_signs_nothing_out_of_scope(hostile) -> None:
    s, reports, home = hostile
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


def test_job_code_cannot_make_the_verifier_convict_honest_work(hostile) -> None:
    s, reports, home = hostile

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
