"""Spot checks on a real local cluster: a cheating volunteer is caught and slashed; honest
replays are exact under ZeRO 0 and 1 as well as 2 (the e2e test covers ZeRO 2).

Each case runs `train_local` in this process (Ray head + 2 volunteers + 1 verifier on this host).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpucoin.cluster.local import participant
from gpucoin.coordinator.job import LocalOptions, train_local
from gpucoin.ledger import Ledger
from gpucoin.ledger.accounts import BURNED, wallet_account
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy
from gpucoin.runtime.faults import FAULT_SKIP_ENV
from gpucoin.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
POLICY = load_policy(SHIPPED_POLICIES_DIR / "local.toml")
STAKE = 500_000_000

pytestmark = pytest.mark.ray


def _spec(directory: Path, zero_stage: int = 2):
    from tests.conftest import TINY_MODEL, write_spec

    path = write_spec(directory, {**TINY_MODEL, "zero_stage: 2": f"zero_stage: {zero_stage}"})
    return load_spec(path, {"steps": 8, "checkpoint_interval_steps": 4})


def test_cheating_volunteer_is_caught_slashed_and_the_job_stopped(tmp_path):
    opts = LocalOptions(policy=POLICY, home=tmp_path, stake_ugpc=STAKE, node_env={"vol1": {FAULT_SKIP_ENV: "1"}})
    s = train_local(_spec(tmp_path / "job"), opts)
    cheater, honest, verifier = (participant(n, tmp_path).address for n in ("vol1", "vol0", "verifier0"))

    assert s["receipts"]["failed"] == 1 and s["receipts"]["passed"] == 0
    assert s["stopped"] and "failed the replay of steps 0-4" in s["stopped"]
    assert [iv["outcome"] for iv in s["intervals"]][0] == "failed"
    assert all(iv["outcome"] in ("void", "open") for iv in s["intervals"][1:])
    slash = STAKE * POLICY.slashing.fraud_slash_fraction_bps // 10_000
    whistle = slash * POLICY.slashing.whistleblower_share_bps // 10_000
    assert s["ledger"]["slashed"] == slash
    # the consumer pays the honest rank's share of the failed interval (the evidence cleared it),
    # nothing for the cheater's share or the void intervals after it
    paid = s["ledger"]["paid"]
    assert 0 < paid and s["ledger"]["refunded"] == s["ledger"]["escrowed"] - paid
    assert s["audit"] == "ok"
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as lg:
        assert lg.balance(wallet_account(cheater, "bonded")) == STAKE - slash
        assert lg.balance(wallet_account(honest, "bonded")) == STAKE
        assert lg.balance(wallet_account(cheater)) == 0  # no emission for a convicted rank
        assert lg.balance(wallet_account(honest)) > 0 and s["ledger"]["minted"] > 0
        assert lg.balance(wallet_account(verifier)) >= whistle
        assert lg.balance(BURNED) == slash - whistle + s["ledger"]["burned"]
        reports = [r for r in lg.messages("VerificationReport")]
        assert sorted(__import__("json").loads(r.typed_data)["message"]["verdict"] for r in reports) == ["fail", "pass"]


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_honest_replay_is_exact_under_zero_stage(tmp_path, zero_stage):
    s = train_local(_spec(tmp_path / "job", zero_stage), LocalOptions(policy=POLICY, home=tmp_path))
    assert s["receipts"]["checked"] >= 1 and s["receipts"]["failed"] == 0
    assert s["receipts"]["passed"] == s["receipts"]["checked"]
    assert s["max_replay_distance"] == 0.0
    assert s["audit"] == "ok"
