"""``gpucoin up`` / ``status`` / ``down``: one head for the module, started and stopped by the CLI
as separate processes, as an operator runs it: a network from a Genesis file (``--genesis FILE
--coordinator WALLET``, the password from ``$GPUCOIN_PASSWORD``), not a dev one, as the embedded
mode's tests start dev heads already. The Genesis file's rules without Ray:
tests/ledger/test_genesis_file.py."""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpucoin.cluster.embedded import PortPool
from gpucoin.head.records import HeadInfo

PASSWORD = "the coordinator's own password"
FAST_SCRYPT_N = "1024"
ALICE = "0x" + "a1" * 20


def gpucoin(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpucoin", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**_env(), **env},
        stdin=subprocess.DEVNULL,
    )


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GPUCOIN_"))}


@dataclass
class Head:
    home: Path
    info: HeadInfo
    up: subprocess.CompletedProcess
    wallets: Path
    genesis: Path


def _up(home: Path, wallets: Path, *args: str, password: str = PASSWORD) -> subprocess.CompletedProcess:
    return gpucoin(
        "up", "--home", str(home), "--coordinator", "coord", "--wallets-home", str(wallets), *args,
        GPUCOIN_PASSWORD=password,
    )  # fmt: skip


def _start(home: Path, wallets: Path, genesis: Path, ray_port: int, api_port: int, *args: str) -> Head:
    r = _up(home, wallets, "--port", str(ray_port), "--api-port", str(api_port), *args)
    assert r.returncode == 0, r.stderr + r.stdout
    return Head(home, HeadInfo.model_validate_json((home / "head.json").read_text()), r, wallets, genesis)


@pytest.fixture(scope="module")
def ports() -> tuple[int, int]:
    pool = PortPool()
    return pool.take(), pool.take()


@pytest.fixture(scope="module")
def head(tmp_path_factory, ports):
    """A network whose Genesis allocates 1,000.5 GPC to ALICE, on the local policy."""
    tmp = tmp_path_factory.mktemp("head")
    home, wallets = tmp / "head", tmp / "operator"
    made = gpucoin(
        "wallet", "new", "--name", "coord", "--home", str(wallets), "--scrypt-n", FAST_SCRYPT_N,
        GPUCOIN_PASSWORD=PASSWORD,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    genesis = tmp / "genesis.toml"
    genesis.write_text(f'policy = "local"\n\n[[allocations]]\naddress = "{ALICE}"\namount = "1000.5"\n')
    h = _start(home, wallets, genesis, *ports, "--genesis", str(genesis))
    yield h
    if (home / "head.json").exists():
        gpucoin("down", "--home", str(home))


def _tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []


def test_up_prints_where_the_head_is_and_keeps_its_record_private(head: Head) -> None:
    out = head.up.stdout
    assert f"gpucoin join --address {head.info.api_url}" in out
    assert head.info.metrics_url in out and head.info.ray_address in out
    assert stat.S_IMODE((head.home / "head.json").stat().st_mode) == 0o600
    token = head.info.token_path.read_text()
    assert stat.S_IMODE(head.info.token_path.stat().st_mode) == 0o600
    for log in (head.home / "logs").iterdir():
        assert token not in log.read_text(errors="replace"), f"the Ray token is in {log}"
    assert token not in out and token not in head.up.stderr


def test_a_second_up_from_the_same_home_is_refused(head: Head) -> None:
    pool = PortPool()
    r = _up(head.home, head.wallets, "--port", str(pool.take()), "--api-port", str(pool.take()))
    assert r.returncode == 1 and "already runs" in r.stderr and "Traceback" not in r.stderr


def test_status_reports_the_market_its_genesis_made(head: Head) -> None:
    for args in (["--home", str(head.home)], ["--address", head.info.api_url.removeprefix("http://")]):
        r = gpucoin("status", *args)
        assert r.returncode == 0, r.stderr
        assert "chain 31337," in r.stdout and "(dev)" not in r.stdout and "local v3" in r.stdout
        assert head.info.ray_address in r.stdout and "1000.500000 GPC" in r.stdout


def test_the_faucet_is_refused_by_a_network_that_is_not_dev(head: Head) -> None:
    r = gpucoin("faucet", ALICE, "5", "--address", head.info.api_url)
    assert r.returncode == 1 and "only on a dev network" in r.stderr and "Traceback" not in r.stderr


def test_metrics_are_prometheus_text(head: Head) -> None:
    with urllib.request.urlopen(head.info.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("gpucoin_minted_ugpc", "gpucoin_burned_ugpc", "gpucoin_slashed_ugpc", "gpucoin_messages"):
        assert families[name].type == "counter", name
    for name in ("gpucoin_supply_ugpc", "gpucoin_bonded_stake_ugpc", "gpucoin_epoch"):
        assert families[name].type == "gauge", name
    genesis = [s for s in families["gpucoin_messages"].samples if s.labels == {"type": "Genesis"}]
    assert [s.value for s in genesis] == [1.0]


def test_the_ray_head_needs_the_token_and_offers_no_cpus(head: Head) -> None:
    probe = (
        "import ray\n"
        f"ray.init(address='{head.info.ray_address}', log_to_driver=False)\n"
        "print('CONNECTED', ray.cluster_resources().get('CPU', 0), ray.cluster_resources().get('GPU', 0))\n"
    )

    def connect(token: str) -> subprocess.CompletedProcess:
        env = {**_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)

    guess = connect("0" * 64)  # a process of this host without gpucoin's token: refused for the token
    assert guess.returncode != 0 and "CONNECTED" not in guess.stdout
    assert "token" in guess.stderr.lower(), guess.stderr[-2000:]
    holder = connect(head.info.token_path.read_text())
    assert holder.returncode == 0, holder.stderr[-2000:]
    assert "CONNECTED 0 0" in holder.stdout


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def test_a_loopback_head_listens_on_loopback_only(head: Head) -> None:
    pids = {p.pid for ref in (head.info.ray_head, head.info.service) for p in _tree(ref.pid)}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert any(c.laddr.port == int(head.info.ray_address.rsplit(":", 1)[1]) for c in listening)
    assert any(c.laddr.port == int(head.info.api_url.rsplit(":", 1)[1]) for c in listening)
    outside = [(c.pid, c.laddr) for c in listening if not _loopback(c.laddr.ip)]
    assert outside == []


def test_down_stops_everything_and_up_resumes_the_same_market(head: Head, ports) -> None:
    before = gpucoin("status", "--home", str(head.home)).stdout
    pids = {p.pid for ref in (head.info.ray_head, head.info.service) for p in _tree(ref.pid)}
    r = gpucoin("down", "--home", str(head.home))
    assert r.returncode == 0 and "head stopped" in r.stdout, r.stderr
    assert not (head.home / "head.json").exists() and not head.info.ray_temp_dir.exists()
    assert [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE] == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(head.info.api_url.rsplit(":", 1)[1])), timeout=1)

    # refused before anything starts: a wrong password, no password, another Genesis, --dev on its home
    wrong = _up(head.home, head.wallets, password="not it")
    assert wrong.returncode == 1 and "password" in wrong.stderr and "Traceback" not in wrong.stderr
    none = _up(head.home, head.wallets, password="")
    assert none.returncode == 2 and "GPUCOIN_PASSWORD is set but empty" in none.stderr
    other = head.genesis.with_name("other.toml")
    other.write_text(head.genesis.read_text().replace("1000.5", "1000.6"))
    r = _up(head.home, head.wallets, "--genesis", str(other))
    assert r.returncode == 1 and "another Genesis" in r.stderr and "allocations" in r.stderr
    r = gpucoin("up", "--dev", "--home", str(head.home))
    assert r.returncode == 1 and "market of coordinator" in r.stderr
    assert not (head.home / "head.json").exists()

    again = _start(head.home, head.wallets, head.genesis, *ports)  # no --genesis: the ledger has it
    try:
        after = gpucoin("status", "--home", str(head.home)).stdout
        coordinator = [line for line in before.splitlines() if "coordinator" in line]
        assert coordinator and coordinator == [line for line in after.splitlines() if "coordinator" in line]
        with urllib.request.urlopen(again.info.metrics_url, timeout=10) as resp:
            assert 'gpucoin_messages_total{type="Genesis"} 1.0' in resp.read().decode()  # not a second Genesis
        for log in (head.home / "logs").iterdir():
            assert PASSWORD not in log.read_text(errors="replace"), f"the coordinator's password is in {log}"
        assert PASSWORD not in (head.home / "service.json").read_text()
    finally:
        assert gpucoin("down", "--home", str(head.home)).returncode == 0


def test_up_refuses_what_it_cannot_do_in_one_line(tmp_path) -> None:
    r = gpucoin("up", "--home", str(tmp_path / "h"))
    assert r.returncode == 1 and "--dev" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        r = gpucoin("up", "--dev", "--home", str(tmp_path / "h"), "--port", str(taken))
    assert r.returncode == 1 and f"port {taken}" in r.stderr and "in use" in r.stderr
    r = gpucoin("down", "--home", str(tmp_path / "h"))
    assert r.returncode == 1 and "no head runs" in r.stderr
    r = gpucoin("status", "--address", "file:///etc/passwd")
    assert r.returncode == 1 and "http" in r.stderr
