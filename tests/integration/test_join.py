"""Volunteers join a head from the command line: ``gpucoin up --dev``, then three ``gpucoin join``
volunteers and one verifier as separate processes on loopback, each with its own wallet; an
engineer submits two jobs with ``gpucoin train --address``; one head for the module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from gpucoin.cluster.embedded import PortPool
from gpucoin.cluster.join import JoinRecord, read_records
from gpucoin.exceptions import HeadError
from gpucoin.head.client import HeadClient
from gpucoin.head.ray_state import list_nodes
from gpucoin.head.rayjobs import RayJobs
from gpucoin.head.records import HeadInfo
from gpucoin.head.submit import cancel
from gpucoin.ledger import Ledger
from gpucoin.ledger.accounts import escrow_account
from gpucoin.wallet.keystore import keystore_address, load_keystore
from gpucoin.wallet.messages import Domain, sign
from tests.conftest import TINY_MODEL, write_spec

PASSWORD = "a volunteer's password"
VOLUNTEERS = 3
NODES = VOLUNTEERS + 1  # and one verifier


def gpucoin(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GPUCOIN_"))}
    return subprocess.run(
        [sys.executable, "-m", "gpucoin", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, "GPUCOIN_PASSWORD": PASSWORD, **(env or {})},
    )


@dataclass
class Market:
    head_home: Path
    info: HeadInfo
    node_home: Path
    wallets: Path
    joined: dict[str, subprocess.CompletedProcess]

    @property
    def api(self) -> str:
        return self.info.api_url

    def join_args(self, name: str, wallet: str | None = None, role: str = "volunteer") -> list[str]:
        return [
            "join",
            "--role",
            role,
            "--address",
            self.api,
            "--wallet",
            wallet or name,
            "--wallets-dir",
            str(self.wallets),
            "--stake",
            "500",  # a verifier bonds like a volunteer: a report shown false by a re-check is slashed from it
            "--ask",
            "0.8",
            "--token-file",
            str(self.info.token_path),
            "--home",
            str(self.node_home),
            "--name",
            name,
        ]


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    root = tmp_path_factory.mktemp("market")
    pool = PortPool()
    head_home = root / "head"
    r = gpucoin("up", "--dev", "--home", str(head_home), "--port", str(pool.take()), "--api-port", str(pool.take()))
    assert r.returncode == 0, r.stderr
    info = HeadInfo.model_validate_json((head_home / "head.json").read_text())
    m = Market(head_home, info, root / "nodes", root / "wallets", {})
    try:
        for name in [*(f"vol{i}" for i in range(VOLUNTEERS + 1)), "ver0", "eng"]:  # vol3: for the attacks
            r = gpucoin("wallet", "new", "--name", name, "--wallets-dir", str(m.wallets), "--scrypt-n", "1024")
            assert r.returncode == 0, r.stderr
            address = keystore_address(m.wallets / f"{name}.json")
            r = gpucoin("faucet", address, "600", "--address", m.api)
            assert r.returncode == 0 and "available 600.000000 GPC" in r.stdout, r.stderr
        for i in range(VOLUNTEERS):
            m.joined[f"vol{i}"] = gpucoin(*m.join_args(f"vol{i}"))
        m.joined["ver0"] = gpucoin(*m.join_args("ver0", role="verifier"))
        yield m
    finally:
        gpucoin("leave", "--all", "--home", str(m.node_home))
        gpucoin("down", "--home", str(head_home))


def test_three_volunteers_join_and_bond(market: Market) -> None:
    for name, r in market.joined.items():
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"joined as {name}" in r.stdout
    records = {r.name: r for r in read_records(market.node_home)}
    assert sorted(records) == ["ver0", "vol0", "vol1", "vol2"]
    views = {v.node_id: v for v in HeadClient(market.api).nodes()}
    assert sorted(views) == sorted(r.node_id for r in records.values())
    for rec in records.values():
        v = views[rec.node_id]
        assert v.provider == rec.provider == keystore_address(market.wallets / f"{rec.name}.json")
        assert v.state.value == "alive" and v.ask_ugpc_per_worker_hour == 800_000
        assert (v.role.value, v.bonded_ugpc) == ("verifier" if rec.name == "ver0" else "volunteer", 500_000_000)
    out = gpucoin("nodes", "--address", market.api)
    assert out.returncode == 0 and f"{NODES} nodes" in out.stdout
    audit = gpucoin("ledger", "audit", "--ledger-url", f"sqlite:///{market.head_home / 'ledger.db'}")
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_no_password_reaches_a_node_or_its_signer(market: Market) -> None:
    for rec in read_records(market.node_home):
        procs = []
        for ref in (rec.ray_node, rec.signer):
            p = psutil.Process(ref.pid)
            procs += [p, *p.children(recursive=True)]
        assert len(procs) >= 3
        for p in procs:
            try:
                environ = Path(f"/proc/{p.pid}/environ").read_bytes()
            except (FileNotFoundError, ProcessLookupError):
                continue
            assert PASSWORD.encode() not in environ and b"GPUCOIN_PASSWORD" not in environ, p.cmdline()
        if os.geteuid() == 0:  # as root, Ray's node processes run as the node user, the signer as us
            assert psutil.Process(rec.ray_node.pid).uids().real != 0
            assert psutil.Process(rec.signer.pid).uids().real == 0


def test_two_jobs_run_at_once_on_joined_nodes_settle_and_audit(market: Market, tmp_path) -> None:
    """Two one-worker jobs submitted with ``gpucoin train --address --detach`` are placed on two
    volunteers in one round, run at the same time as Ray jobs whose drivers run on rank 0's node
    (never the head's), are replayed on the verifier node, settle, and the ledger audits clean."""
    spec = write_spec(
        tmp_path / "job",
        {
            **TINY_MODEL,
            "workers: 2": "workers: 1",
            "steps: 400": "steps: 4",
            "checkpoint_interval_steps: 50": "checkpoint_interval_steps: 4",
        },
    )
    ids = []
    for _ in range(2):
        r = gpucoin(
            "train",
            str(spec),
            "--address",
            market.api,
            "--wallet",
            "eng",
            "--home",
            str(market.wallets.parent),
            "--detach",
        )
        assert r.returncode == 0, r.stderr[-3000:]
        ids.append(r.stdout.strip())
    client = HeadClient(market.api)
    deadline = time.monotonic() + 900
    together = False
    while True:
        views = {v.job_id: v for v in client.jobs()}
        together |= all(views[j].state.value == "running" for j in ids)
        if all(views[j].state.ended for j in ids):
            break
        assert time.monotonic() < deadline, {j: (views[j].state, views[j].reason) for j in ids}
        time.sleep(0.5)
    assert together, "both jobs should have run at once (three volunteers, one worker each)"
    (head_id,) = [
        n.node_id for n in list_nodes(market.info.dashboard_url, market.info.token_path).values() if n.is_head
    ]
    rayjobs = RayJobs(market.info.dashboard_url, market.info.token_path)
    for j in ids:
        v = views[j]
        assert v.state.value == "succeeded", (v.reason, gpucoin("logs", j, "--address", market.api).stdout)
        assert v.summary.steps == 4 and v.summary.receipts.signed == 1 and v.summary.receipts.passed == 1
        assert v.summary.refunded_ugpc > 0 and v.summary.burned_ugpc > 0
        assert rayjobs.driver_node(j) == v.node_ids[0] != head_id
    assert not set(views[ids[0]].node_ids) & set(views[ids[1]].node_ids)
    listed = gpucoin("jobs", "--address", market.api, env={"COLUMNS": "250"})
    assert listed.returncode == 0 and all(j in listed.stdout for j in ids) and "succeeded" in listed.stdout
    # what the engineer paid for: the weights, checked against the receipts the ranks signed
    out = tmp_path / "weights"
    pulled = gpucoin("pull", ids[0], "--address", market.api, "-o", str(out))
    assert pulled.returncode == 0, pulled.stderr
    state = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    assert config["step"] == 4 and config["job_id"] == ids[0] and len(config["checkpoint_hashes"]) == 1
    assert state and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values())
    assert any(k.endswith("wte.weight") for k in state), sorted(state)[:5]
    store = market.head_home / "jobs" / ids[1] / "store" / "sha256"
    biggest = max(store.rglob("*"), key=lambda f: f.stat().st_size if f.is_file() else 0)
    biggest.chmod(0o600)
    biggest.write_bytes(b"\0" * biggest.stat().st_size)  # the head's copy no longer what the ranks signed
    refused = gpucoin("pull", ids[1], "--address", market.api, "-o", str(tmp_path / "w2"))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert not (tmp_path / "w2" / "model.safetensors").exists()
    logs = gpucoin("logs", ids[0], "--address", market.api)
    assert logs.returncode == 0 and "replay passed" in logs.stdout, logs.stdout
    audit = gpucoin("ledger", "audit", "--ledger-url", f"sqlite:///{market.head_home / 'ledger.db'}")
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_a_cancelled_job_settles_and_a_killed_head_service_loses_no_receipt(market: Market, tmp_path) -> None:
    """Two long jobs start. The first is cancelled by its consumer (``gpucoin cancel``): it stops at
    its next interval boundary, what was verified is settled, the rest refunded. Then the head
    service is killed with SIGKILL while the second trains, Ray's head left running; ``gpucoin up``
    again starts only the service, which finds the job it ran: its Ray job is stopped, what was not
    settled of the escrow is refunded, every receipt stays in the ledger, the audit passes."""
    spec = write_spec(
        tmp_path / "job",
        {
            **TINY_MODEL,
            "workers: 2": "workers: 1",
            "checkpoint_interval_steps: 50": "checkpoint_interval_steps: 20",  # few intervals, so few replays to wait for
        },
    )
    # the job the service is killed under must outlast the cancelled one's settling on a fast machine
    long_spec = write_spec(tmp_path / "long", {**TINY_MODEL, "workers: 2": "workers: 1", "steps: 400": "steps: 20000"})
    home = str(market.wallets.parent)
    cancelled, killed = [], []
    for ids, job_spec in ((cancelled, spec), (killed, long_spec)):
        r = gpucoin("train", str(job_spec), "--address", market.api, "--wallet", "eng", "--home", home, "--detach")
        assert r.returncode == 0, r.stderr[-3000:]
        ids.append(r.stdout.strip())
    (cancelled,), (job_id,) = cancelled, killed
    client = HeadClient(market.api)
    deadline = time.monotonic() + 600
    while not any("receipts signed" in e.text for e in client.job_events(cancelled)):
        assert time.monotonic() < deadline and not client.job(cancelled).state.ended, client.job(cancelled)
        time.sleep(0.2)
    # at once (every interval trained meanwhile is drawn and replayed before the job settles)
    assert cancel(market.api, cancelled, load_keystore(market.wallets / "eng.json", PASSWORD)).state.value == "running"
    stranger = gpucoin("cancel", cancelled, "--address", market.api, "--wallet", "vol3", "--home", home)
    assert stranger.returncode == 1 and "403" in stranger.stderr, stranger.stderr
    again = gpucoin("cancel", cancelled, "--address", market.api, "--wallet", "eng", "--home", home)
    assert again.returncode == 0 and ("running" in again.stdout or "cancelled" in again.stdout), again  # no harm
    while not (view := client.job(cancelled)).state.ended:
        assert time.monotonic() < deadline, view
        time.sleep(0.5)
    assert view.state.value == "cancelled" and view.summary.steps >= 20 and view.summary.paid_ugpc > 0, view
    assert view.summary.refunded_ugpc > 0 and view.summary.steps < view.steps

    while not any("receipts signed" in e.text for e in client.job_events(job_id)):
        assert time.monotonic() < deadline and not client.job(job_id).state.ended, client.job(job_id)
        time.sleep(0.5)
    assert not client.job(job_id).state.ended  # else the kill below tests nothing
    ledger_url = f"sqlite:///{market.head_home / 'ledger.db'}"
    service = psutil.Process(market.info.service.pid)
    service.kill()
    service.wait(timeout=10)
    with Ledger(ledger_url) as lg:
        receipts = {m.digest for m in lg.messages("WorkReceipt")}
    assert receipts
    r = gpucoin("up", "--dev", "--home", str(market.head_home))
    assert r.returncode == 0, r.stderr[-3000:]
    market.info = HeadInfo.model_validate_json((market.head_home / "head.json").read_text())
    view = HeadClient(market.api).job(job_id)
    assert view.state.value == "failed" and "restarted" in (view.reason or ""), view
    rayjobs = RayJobs(market.info.dashboard_url, market.info.token_path)
    deadline = time.monotonic() + 60
    while rayjobs.status(job_id) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.monotonic() < deadline, rayjobs.status(job_id)
        time.sleep(1)
    with Ledger(ledger_url) as lg:
        assert receipts <= {m.digest for m in lg.messages("WorkReceipt")}
        assert lg.balance(escrow_account(job_id)) == 0 and lg.balance(escrow_account(cancelled)) == 0
        assert lg.audit() == []


def _registration(market: Market, wallet: str, node_id: str) -> dict:
    status = HeadClient(market.api).status()
    account = load_keystore(market.wallets / f"{wallet}.json", PASSWORD)
    msg = sign(
        account,
        "NodeRegistration",
        Domain(chain_id=status.chain_id, verifying_contract=status.coordinator),
        {
            "provider": account.address,
            "nodeId": node_id,
            "resources": '{"CPU": 64, "GPU": 8}',
            "askPerWorkerHour": 1,
            "stake": 0,
            "nonce": time.time_ns(),
            "deadline": int(time.time()) + 600,
        },
    )
    return json.loads(msg.to_json())


def test_the_head_node_and_another_volunteers_node_cannot_be_claimed(market: Market) -> None:
    ray_nodes = list_nodes(market.info.dashboard_url, market.info.token_path)  # the head's own view
    (head_id,) = [n.node_id for n in ray_nodes.values() if n.is_head]
    vol0: JoinRecord = next(r for r in read_records(market.node_home) if r.name == "vol0")
    client = HeadClient(market.api)
    with pytest.raises(HeadError, match="403.*head node"):
        client.register(_registration(market, "vol3", head_id))
    with pytest.raises(HeadError, match=f"403.*registered by {vol0.provider}"):
        client.register(_registration(market, "vol3", vol0.node_id))
    assert len(client.nodes()) == NODES


def test_a_join_that_cannot_go_through_says_why_and_leaves_nothing(market: Market, tmp_path) -> None:
    before = {p.pid for p in psutil.process_iter()}
    r = gpucoin(*market.join_args("bad", "vol3"), env={"GPUCOIN_PASSWORD": "wrong"})
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    args = market.join_args("notoken", "vol3")
    i = args.index("--token-file")
    r = gpucoin(*(args[:i] + args[i + 2 :]), env={"HOME": str(tmp_path)})
    assert r.returncode == 1 and "no Ray token" in r.stderr
    assert sorted(x.name for x in read_records(market.node_home)) == ["ver0", "vol0", "vol1", "vol2"]
    assert len(HeadClient(market.api).nodes()) == NODES
    # what a join starts: its signer and its Ray node (Ray itself may start idle workers meanwhile)
    started_by_join = ("gpucoin.wallet.signer", "gpucoin.cluster.ray_node", "gpucoin join")
    left = [
        p
        for p in psutil.process_iter(["pid", "cmdline"])
        if p.pid not in before and any(m in " ".join(p.info["cmdline"] or ()) for m in started_by_join)
    ]
    assert left == []


def test_leave_stops_the_node_and_the_head_sees_it_gone(market: Market) -> None:
    rec = next(r for r in read_records(market.node_home) if r.name == "vol2")
    r = gpucoin("leave", "--name", "vol2", "--home", str(market.node_home))
    assert r.returncode == 0 and "left: vol2" in r.stdout, r.stderr
    assert "unbonding 500.000000 GPC" in r.stdout
    assert not rec.ray_node.alive() and not rec.signer.alive() and not rec.temp_dir.exists()
    account = HeadClient(market.api).account(rec.provider)
    assert (account.bonded_ugpc, account.unbonding_ugpc, account.withdrawable_ugpc) == (0, 500_000_000, 0)
    early = gpucoin("withdraw", "--address", market.api, "--wallet", "vol2", "--wallets-dir", str(market.wallets))
    assert (
        early.returncode == 1
        and "nothing withdrawable" in early.stderr
        and "500.000000 GPC is unbonding" in early.stderr
    )
    deadline = time.monotonic() + 60
    while True:
        states = {v.node_id: v.state.value for v in HeadClient(market.api).nodes()}
        if states[rec.node_id] == "gone":
            break
        assert time.monotonic() < deadline, states
        time.sleep(1)
    assert sum(s == "alive" for s in states.values()) == NODES - 1


ROGUE = """
import json, os, sys
import ray

addr, node_id, paths = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ray.init(address=addr, log_to_driver=False)


@ray.remote(num_cpus=0)
def probe(paths):
    out = {"uid": os.getuid(), "env": sorted(k for k in os.environ if "PASSWORD" in k or "KEY" in k)}
    for name, path in paths.items():
        try:
            with open(path, "rb") as f:
                f.read(16)
            out[name] = "read"
        except OSError as e:
            out[name] = "refused: " + str(e.strerror)
    from gpucoin.wallet.signer import SignerClient

    client = SignerClient(os.environ["GPUCOIN_SIGNER_SOCKET"])
    me = client.address
    z = "0x" + "00" * 32
    tries = {
        "unbond": ("Unbond", {"provider": me, "amount": 1, "nonce": 5}),
        "withdraw": ("Withdraw", {"provider": me, "amount": 1, "nonce": 6}),
        "receipt": ("WorkReceipt", {"jobId": "rogue", "worker": me, "rank": 0, "stepStart": 0, "stepEnd": 4,
                                     "samples": 1, "computeTimeMs": 1, "sketchRoot": z, "checkpointHash": z,
                                     "previousReceipt": z, "nonce": 7}),
    }
    for name, (kind, msg) in tries.items():
        try:
            client.sign(kind, msg, None)
            out[name] = "signed"
        except Exception as e:  # noqa: BLE001
            out[name] = "refused: " + str(e)[:120]
    return json.dumps(out)


print("REPORT " + ray.get(probe.options(label_selector={"ray.io/node-id": node_id}).remote(paths)))
"""


def test_a_rogue_client_with_the_token_gets_no_key_no_money_and_no_pay(market: Market) -> None:
    """A Ray client holding the cluster's token runs a task of its own on a volunteer's node: the
    node's signer signs nothing for it, the head's ledger, keys and the signer's environment are
    out of its reach, and nothing on the ledger moves (no market path pays a task nobody placed)."""
    vol0 = next(r for r in read_records(market.node_home) if r.name == "vol0")
    client = HeadClient(market.api)
    # the earlier jobs' emission is minted as their epochs end on the clock: let it be, first
    deadline = time.monotonic() + 60
    with Ledger(f"sqlite:///{market.head_home / 'ledger.db'}") as lg:
        while lg.closable_epochs() or lg.epoch_charges(lg.current_epoch()):
            assert time.monotonic() < deadline, lg.closable_epochs()
            time.sleep(0.5)
    before = {r.provider: client.account(r.provider) for r in read_records(market.node_home)}
    status_before = client.status()
    paths = {
        "head_ledger": str(market.head_home / "ledger.db"),
        "head_coordinator_key": str(market.head_home / "wallets" / "coordinator.json"),
        "signer_environ": f"/proc/{vol0.signer.pid}/environ",
        "head_service_environ": f"/proc/{market.info.service.pid}/environ",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GPUCOIN_"))}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=market.info.token_path.read_text(),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    )
    r = subprocess.run(
        [sys.executable, "-c", ROGUE, market.info.ray_address, vol0.node_id, json.dumps(paths)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.split("REPORT ", 1)[1])
    assert report["env"] == [], report
    for what in ("unbond", "withdraw", "receipt"):
        assert report[what].startswith("refused"), report
    if os.geteuid() == 0:  # the task runs as the node user: the head's and the signer's files are root's
        assert report["uid"] != 0
        for what in paths:
            assert report[what].startswith("refused"), report
    after = {r.provider: client.account(r.provider) for r in read_records(market.node_home)}
    money = {"available_ugpc", "bonded_ugpc", "unbonding_ugpc"}
    assert {a: v.model_dump(include=money) for a, v in after.items()} == {
        a: v.model_dump(include=money) for a, v in before.items()
    }
    now = client.status()
    assert (now.minted_ugpc, now.supply_ugpc, now.jobs) == (
        status_before.minted_ugpc,
        status_before.supply_ugpc,
        status_before.jobs,
    )
