"""Bad input to `gpucoin train`: a one-line error, a non-zero exit, and no ledger change.

Each case is refused before any Ray node starts; the ledger already holds history from a
previous (simulated) run, and it must be byte-for-byte the same afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpucoin.cluster.local import fund_engineer, participant
from gpucoin.coordinator.job import LocalOptions, open_ledger
from gpucoin.coordinator.settle import Coordinator
from gpucoin.ledger import Ledger
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "shakespeare_char" / "job.yaml"
EXCERPT = REPO / "tests" / "data" / "shakespeare_excerpt.txt"


@pytest.fixture
def home(tmp_path):
    """A local home whose ledger already has its Genesis and the engineer's faucet grant."""
    policy = load_policy(SHIPPED_POLICIES_DIR / "local.toml")
    coordinator, engineer = participant("coordinator", tmp_path), participant("engineer", tmp_path)
    with open_ledger(LocalOptions(policy=policy, home=tmp_path), coordinator) as lg:
        fund_engineer(Coordinator(lg, policy, coordinator.account, lg.domain), engineer)
    return tmp_path


def _snapshot(home: Path):
    with Ledger(f"sqlite:///{home / 'ledger.db'}") as lg:
        return lg.balances(), [(t.id, t.row_hash) for t in lg.transfers()], [m.digest for m in lg.messages()]


def _train(home: Path, *args: str, spec: Path = JOB):
    return subprocess.run(
        [sys.executable, "-m", "gpucoin", "train", str(spec), "--home", str(home), "--data", str(EXCERPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--workers", "3"], "cannot be placed on 2 local volunteers"),
        (["--budget", "5000"], "exceeds the 1000.000000 GPC available"),
        (["--bid", "-1"], "--bid"),
        (["--bid", "0.5"], "ask above the bid"),
        (["--budget", "1.0000001"], "7 decimals"),
        (["--policy", "default"], "was started with policy 'local' v3, not 'default' v3"),
        (["--data", "/nonexistent/corpus.txt"], "data.source /nonexistent/corpus.txt: no readable file there"),
        (["--cheat", "no_such_cheat"], "--cheat must be MODULE:NAME or one of zero_gradient"),
        (["--cheat", "gpucoin.no_such_module:X"], "--cheat gpucoin.no_such_module:X: No module named"),
        (["--cheat", "gpucoin.runtime.cheats:CheatContext"], "has none of on_batch, on_grads, on_commit"),
        (["--cheat", "half_batch", "--cheat-rank", "2"], "--cheat-rank 2: the job has ranks 0 to 1"),
        (["--cheat", "half_batch", "--address", "127.0.0.1:1"], "--cheat: for the embedded mode only"),
        (["--cheat-rank", "1"], "--cheat-rank goes with --cheat"),
    ],
)
def test_refused_with_one_line_and_no_ledger_change(home, args, expect):
    before = _snapshot(home)
    p = _train(home, *args)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert _snapshot(home) == before


def test_unknown_key_in_spec_is_refused(home, tmp_path):
    from tests.conftest import write_spec

    bad = write_spec(tmp_path / "job", extra="learning_rate: 0.1\n")
    before = _snapshot(home)
    p = _train(home, spec=bad)
    assert p.returncode != 0
    assert p.stderr.strip().count("\n") == 0 and "learning_rate: unknown key" in p.stderr
    assert _snapshot(home) == before


def test_zero_budget_is_refused_before_any_write(home):
    before = _snapshot(home)
    p = _train(home, "--budget", "0")
    assert p.returncode != 0 and "budget_gpc must be > 0" in p.stderr
    assert _snapshot(home) == before


def test_help_explains_every_option():
    top = subprocess.run([sys.executable, "-m", "gpucoin", "--help"], capture_output=True, text=True, timeout=60)
    assert top.returncode == 0 and "train" in top.stdout and "ledger" in top.stdout
    tr = subprocess.run(
        [sys.executable, "-m", "gpucoin", "train", "--help"], capture_output=True, text=True, timeout=60
    )
    assert tr.returncode == 0
    for flag in (
        "--address",
        "--volunteers",
        "--workers",
        "--steps",
        "--bid",
        "--budget",
        "--policy",
        "--summary-json",
        "--home",
    ):
        assert flag in tr.stdout
    assert "overrides" in tr.stdout


def test_every_option_has_a_real_help_text():
    from gpucoin.cli.main import cli

    def walk(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    for path, cmd in walk(cli, "gpucoin"):
        assert cmd.help and len(cmd.help) > 20, path
        for p in cmd.params:
            if p.param_type_name == "option" and p.name not in ("help", "version"):
                assert p.help and len(p.help.split()) >= 4, f"{path} {p.opts}"


@pytest.mark.parametrize(
    "args, code, says",
    [
        (["--detach"], 2, "go with --address"),
        (["--wallet", "engineer"], 2, "go with --address"),
        (["--address", "127.0.0.1:9"], 2, "needs --wallet"),
        (["--address", "ftp://h:1", "--wallet", "engineer"], 1, "expected HOST:PORT"),
        (["--address", "127.0.0.1:9", "--wallet", "engineer"], 1, "cannot reach the head"),
        (["--address", "127.0.0.1:9", "--wallet", "e", "--volunteers", "3"], 2, "--volunteers: for the embedded"),
        (["--address", "127.0.0.1:9", "--wallet", "e", "--policy", "local"], 2, "--policy: for the embedded"),
    ],
    ids=[
        "detach-alone",
        "wallet-alone",
        "address-without-wallet",
        "bad-address",
        "no-head-there",
        "volunteers-with-address",
        "policy-with-address",
    ],
)
def test_submitting_to_a_head_that_cannot_take_it_says_why_in_one_line(home, args, code, says):
    before = _snapshot(home)
    p = subprocess.run(
        [sys.executable, "-m", "gpucoin", "train", str(JOB), "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "GPUCOIN_PASSWORD": "x"},
    )
    assert p.returncode == code and says in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert _snapshot(home) == before
