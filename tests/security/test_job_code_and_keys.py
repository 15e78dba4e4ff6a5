"""Job code runs beside no key: a hostile job module, imported by every rank and by the verifier,
looks for keys and passwords in its environment and in every process's ``/proc/<pid>/environ``
(the signers' and the head's included), then asks its node's signer for receipts it was not
assigned and for other kinds of message. It finds no secret and every request is refused; the
job's own receipts still verify and are paid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpucoin.cluster.local import participant
from gpucoin.coordinator.job import LocalOptions, train_local
from gpucoin.policy.model import load_policy
from gpucoin.spec import load_spec
from gpucoin.wallet.keystore import DEV_PASSWORD
from tests.conftest import TINY_MODEL, write_spec

REPO = Path(__file__).resolve().parents[2]
POLICY = load_policy(REPO / "policies" / "local.toml")

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
    report = {"pid": os.getpid(), "own_env": dict(os.environ), "environs": {}, "refused": {}, "signed": []}
    for path in glob.glob("/proc/[0-9]*/environ"):
        try:
            report["environs"][path] = open(path, "rb").read().decode("latin-1")
        except OSError:
            pass
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
'''


def test_job_code_finds_no_key_and_its_signer_signs_nothing_out_of_scope(tmp_path) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    spec_path = write_spec(tmp_path / "job", TINY_MODEL)
    init = spec_path.parent / "__init__.py"
    init.write_text(init.read_text() + HOSTILE)
    env = {"HOSTILE_REPORT_DIR": str(reports)}
    opts = LocalOptions(policy=POLICY, home=tmp_path / "home", node_env={"vol0": env, "vol1": env, "verifier0": env})
    s = train_local(load_spec(spec_path, {"steps": 8, "checkpoint_interval_steps": 4}), opts)
    assert s["stopped"] is None and s["audit"] == "ok" and s["receipts"]["signed"] == 4
    assert s["receipts"]["rejected"] == 0

    found = [json.loads(p.read_text()) for p in reports.glob("*.json")]
    assert sum(r["had_config"] for r in found) >= 2, "the attack did not run in both ranks"
    secrets = [DEV_PASSWORD] + [
        participant(n, tmp_path / "home").account.key.hex().removeprefix("0x") for n in ("vol0", "vol1", "verifier0")
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
