"""Volunteers join a head from the command line: ``gpucoin up --dev``, then three ``gpucoin join``
as separate processes on loopback, each with its own wallet; one head for the module."""

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

from gpucoin.cluster.embedded import PortPool
from gpucoin.cluster.join import JoinRecord, read_records
from gpucoin.exceptions import HeadError
from gpucoin.head.client import HeadClient
from gpucoin.head.ray_state import list_nodes
from gpucoin.head.records import HeadInfo
from gpucoin.wallet.keystore import keystore_address, load_keystore
from gpucoin.wallet.messages import Domain, sign

PASSWORD = "a volunteer's password"
VOLUNTEERS = 3


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

    def join_args(self, name: str, wallet: str | None = None) -> list[str]:
        return [
            "join",
            "--address",
            self.api,
            "--wallet",
            wallet or name,
            "--wallets-dir",
            str(self.wallets),
            "--stake",
            "500",
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
        for i in range(VOLUNTEERS + 1):  # one more wallet for the attacks
            name = f"vol{i}"
            r = gpucoin("wallet", "new", "--name", name, "--wallets-dir", str(m.wallets), "--scrypt-n", "1024")
            assert r.returncode == 0, r.stderr
            address = keystore_address(m.wallets / f"{name}.json")
            r = gpucoin("faucet", address, "600", "--address", m.api)
            assert r.returncode == 0 and "available 600.000000 GPC" in r.stdout, r.stderr
        for i in range(VOLUNTEERS):
            m.joined[f"vol{i}"] = gpucoin(*m.join_args(f"vol{i}"))
        yield m
    finally:
        gpucoin("leave", "--all", "--home", str(m.node_home))
        gpucoin("down", "--home", str(head_home))


def test_three_volunteers_join_and_bond(market: Market) -> None:
    for name, r in market.joined.items():
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"joined as {name}" in r.stdout
    records = {r.name: r for r in read_records(market.node_home)}
    assert sorted(records) == ["vol0", "vol1", "vol2"]
    views = {v.node_id: v for v in HeadClient(market.api).nodes()}
    assert sorted(views) == sorted(r.node_id for r in records.values())
    for rec in records.values():
        v = views[rec.node_id]
        assert v.provider == rec.provider == keystore_address(market.wallets / f"{rec.name}.json")
        assert v.state.value == "alive" and v.bonded_ugpc == 500_000_000 and v.ask_ugpc_per_worker_hour == 800_000
    out = gpucoin("nodes", "--address", market.api)
    assert out.returncode == 0 and "3 nodes" in out.stdout
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
    assert len(client.nodes()) == VOLUNTEERS


def test_a_join_that_cannot_go_through_says_why_and_leaves_nothing(market: Market, tmp_path) -> None:
    before = {p.pid for p in psutil.process_iter()}
    r = gpucoin(*market.join_args("bad", "vol3"), env={"GPUCOIN_PASSWORD": "wrong"})
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    args = market.join_args("notoken", "vol3")
    i = args.index("--token-file")
    r = gpucoin(*(args[:i] + args[i + 2 :]), env={"HOME": str(tmp_path)})
    assert r.returncode == 1 and "no Ray token" in r.stderr
    assert sorted(x.name for x in read_records(market.node_home)) == ["vol0", "vol1", "vol2"]
    assert len(HeadClient(market.api).nodes()) == VOLUNTEERS
    left = [
        p
        for p in psutil.process_iter(["pid", "cmdline"])
        if p.pid not in before and "gpucoin" in " ".join(p.info["cmdline"] or ())
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
    assert sum(s == "alive" for s in states.values()) == VOLUNTEERS - 1


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
    assert (now.minted_ugpc, now.supply_ugpc, now.jobs) == (status_before.minted_ugpc, status_before.supply_ugpc, 0)
