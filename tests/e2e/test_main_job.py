"""The main job end to end, small: `gpucoin train` on 2 volunteer nodes + a verifier, a tiny model.

Checks what the issue asks of this path: at least one interval replayed, every checked
interval passes with honest workers, the ledger audit is ok, and the money adds up.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gpucoin.ledger import Ledger
from gpucoin.ledger.accounts import BURNED, ISSUANCE, TREASURY

pytestmark = [pytest.mark.e2e, pytest.mark.ray]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`gpucoin train` on a tiny model (2 layers, d=64): 12 steps in 3 intervals of 4, after an
    interrupted DeepSpeed op build left its lock behind."""
    from tests.conftest import TINY_MODEL, plant_stale_build_lock, write_spec

    lock = plant_stale_build_lock()

    home = tmp_path_factory.mktemp("home")
    spec = write_spec(tmp_path_factory.mktemp("job"), TINY_MODEL)
    summary = home / "summary.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpucoin",
            "train",
            str(spec),
            "--home",
            str(home),
            "--steps",
            "12",
            "--interval",
            "4",
            "--summary-json",
            str(summary),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    said = " ".join((proc.stdout + proc.stderr).split())
    assert "left by an interrupted DeepSpeed op build" in said and lock.name in said
    return home, json.loads(summary.read_text()), proc.stdout + proc.stderr


def test_trains_and_replays_honest_intervals(run):
    _, s, out = run
    assert s["steps"] == 12 and s["workers"] == 2
    assert s["receipts"]["signed"] == 2 * 3  # 2 ranks x 3 intervals
    assert s["receipts"]["checked"] >= 1
    assert s["receipts"]["passed"] == s["receipts"]["checked"]
    assert s["receipts"]["failed"] == 0
    assert s["val_loss"] < s["uniform_loss"]  # it learned something in 12 steps
    assert len(s["sample"]) >= 250
    assert s["unsettled_intervals"] == []


def test_ledger_audit_ok_and_money_adds_up(run):
    home, s, _ = run
    assert s["audit"] == "ok"
    m = s["ledger"]
    assert m["paid"] > 0 and m["minted"] > 0 and m["slashed"] == 0
    with Ledger(f"sqlite:///{home / 'ledger.db'}") as lg:
        by_code: dict[str, int] = {}
        for t in lg.transfers():
            by_code[t.code] = by_code.get(t.code, 0) + t.amount
        # what the summary reports is what the ledger holds; a code with nothing to move has no
        # transfer (e.g. the treasury's 10 % of an interval that cost under 10 µGPC on a fast machine)
        total = lambda code: by_code.get(code, 0)  # noqa: E731
        assert total("escrow") == m["escrowed"] == total("burn") + total("treasury") + total("refund")
        assert total("burn") == m["burned"] and total("treasury") == m["treasury"] and total("refund") == m["refunded"]
        assert total("mint_worker") + total("mint_verifier") == m["minted"]
        bal = lg.balances()
        assert sum(bal.values()) == 0
        assert all(v >= 0 for a, v in bal.items() if a != ISSUANCE)
        t = lg.totals()
        assert t["supply"] == t["minted"] - t["burned"] == -bal[ISSUANCE] - bal.get(BURNED, 0)
        assert bal.get(TREASURY, 0) == m["treasury"]
        assert lg.audit() == []
    # and the CLI agrees
    p = subprocess.run(
        [sys.executable, "-m", "gpucoin", "ledger", "audit", "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0 and "audit ok" in p.stdout
    show = subprocess.run(
        [sys.executable, "-m", "gpucoin", "ledger", "show", "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert show.returncode == 0 and "supply" in show.stdout and "escrow" in show.stdout


def test_receipt_signers_recover_from_stored_typed_data_alone(run):
    """Each stored WorkReceipt's signer is recovered by plain eth-account from its stored JSON."""
    from eth_account import Account
    from eth_account.messages import encode_typed_data

    home, s, _ = run
    with Ledger(f"sqlite:///{home / 'ledger.db'}") as lg:
        rows = lg.messages("WorkReceipt")
    assert len(rows) == s["receipts"]["signed"]
    for row in rows:
        typed = json.loads(row.typed_data)
        signer = Account.recover_message(encode_typed_data(full_message=typed), signature=row.signature)
        assert signer == row.signer == typed["message"]["worker"]
