"""On a real cluster: a rank that stalls is not metered for it, and its flood of the head's inbox
drops no co-worker's receipt (the metering and the inbox's rules alone: tests/unit/test_meter.py,
tests/security/test_inbox_flood.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpucoin.cluster.local import participant
from gpucoin.coordinator.job import LocalOptions, train_local
from gpucoin.ledger import Ledger
from gpucoin.ledger.accounts import wallet_account
from gpucoin.policy.model import load_policy
from gpucoin.runtime.faults import FAULT_FLOOD_ENV, FAULT_STALL_ENV
from gpucoin.spec import load_spec
from tests.conftest import TINY_MODEL, write_spec

REPO = Path(__file__).resolve().parents[2]
POLICY = load_policy(REPO / "policies" / "local.toml")
STALL_S = 25

pytestmark = pytest.mark.ray


def test_a_stalling_flooding_rank_raises_no_bill_and_drops_no_receipt(tmp_path) -> None:
    """vol1 (rank 1) sends 400 hostile submissions before each receipt and sleeps 25 s before
    handing in steps 4-8. Steps 4-8 and 8-12 each take a few seconds of compute: metered on the
    coordinator's clock as before, one of them would hold the whole stall."""
    opts = LocalOptions(
        policy=POLICY,
        home=tmp_path,
        node_env={"vol1": {FAULT_STALL_ENV: f"{STALL_S}@8", FAULT_FLOOD_ENV: "400"}},
    )
    s = train_local(
        load_spec(write_spec(tmp_path / "job", TINY_MODEL), {"steps": 12, "checkpoint_interval_steps": 4}), opts
    )
    assert s["stopped"] is None and s["audit"] == "ok"
    assert s["receipts"]["signed"] == 6 and s["receipts"]["rejected"] == 0
    assert all(iv["outcome"] in ("passed", "unchecked") for iv in s["intervals"]), s["intervals"]
    later = [iv["wall_ms"] for iv in s["intervals"][1:]]
    assert max(later) < STALL_S * 1000, later
    assert 0 < s["ledger"]["escrowed"] - s["ledger"]["refunded"]
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as lg:  # both ranks were paid: no receipt was lost
        for name in ("vol0", "vol1"):
            assert lg.balance(wallet_account(participant(name, tmp_path).address)) > 0
