"""A submitter cannot frame a rank with job code that computes differently under replay (issue 9).

The job's package is a copy of the main job's whose layer norm scales its output by 1.01 whenever
``torch.distributed`` is not initialized: on the workers it trains as the main job does, in the
verifier's replay it computes something else. Its hash is on no policy's vetted list, so the
mismatch convicts nobody: the interval is void, nobody is slashed or paid, and the submitter is
charged for the interval, all of it burned. One job on a local Ray cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpucoin.cluster.local import participant
from gpucoin.coordinator.job import LocalOptions, train_local
from gpucoin.ledger import Ledger
from gpucoin.ledger.accounts import BURNED, TREASURY, wallet_account
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy
from gpucoin.spec import load_spec
from tests.conftest import TINY_MODEL, write_spec

REPO = Path(__file__).resolve().parents[2]
POLICY = load_policy(SHIPPED_POLICIES_DIR / "local.toml")
STAKE = 500_000_000
HONEST = "        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)\n"
TWO_FACED = (
    "        y = F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)\n"
    "        return y if torch.distributed.is_initialized() else 1.01 * y  # replayed: something else\n"
)

pytestmark = pytest.mark.ray


def test_job_code_that_computes_differently_under_replay_frames_nobody(tmp_path) -> None:
    spec_path = write_spec(tmp_path / "job", {**TINY_MODEL, "workers: 2": "workers: 1"})
    model_py = spec_path.parent / "model.py"
    assert HONEST in model_py.read_text()
    model_py.write_text(model_py.read_text().replace(HONEST, TWO_FACED))
    loaded = load_spec(spec_path, {"steps": 4, "checkpoint_interval_steps": 4})
    assert loaded.package_hash not in POLICY.verification.vetted_packages

    s = train_local(loaded, LocalOptions(policy=POLICY, home=tmp_path, stake_ugpc=STAKE))
    # alone on its job, the rank would have been convicted: the only one whose sketch differs
    assert s["intervals"][0]["outcome"] == "void" and s["receipts"]["failed"] == 0
    assert s["stopped"] and "not vetted" in s["stopped"]
    assert s["ledger"]["slashed"] == 0 and s["ledger"]["minted"] == 0
    charged = s["ledger"]["paid"]
    assert charged > 0 and s["ledger"]["burned"] == charged and s["ledger"]["treasury"] == 0
    assert s["ledger"]["refunded"] == s["ledger"]["escrowed"] - charged
    assert s["audit"] == "ok"
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as lg:
        for name in ("vol0", "vol1"):
            who = participant(name, tmp_path).address
            assert lg.balance(wallet_account(who, "bonded")) == STAKE
            assert lg.balance(wallet_account(who)) == 0  # nothing paid, nothing minted
        assert lg.balance(BURNED) == charged and lg.balance(TREASURY) == 0
