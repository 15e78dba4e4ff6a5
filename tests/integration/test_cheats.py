"""Each shipped cheat strategy (``runtime.cheats``), run by one rank of an embedded market's job,
is caught by the replay: a cheat its own sketch shows is attributed to the cheating rank and
slashed, the honest rank paid; the cheat no sketch pins (an honest commitment, another gradient
sent) voids the interval and slashes nobody. The audit passes after each.

One local market for the module (``LocalMarket``: a head, 2 volunteers and a verifier); the
cheat is set on both volunteers for the jobs whose id starts with its name, so rank 0 cheats on
whichever node it is placed. Each job is one interval of 2 steps on the tiny model: the last
interval is always replayed, whatever the nodes' records say.
"""

from __future__ import annotations

import json

import pytest

from gpucoin.coordinator.job import LocalMarket, LocalOptions, new_job_id
from gpucoin.ledger.accounts import wallet_account
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy
from gpucoin.runtime.cheats import SHIPPED
from gpucoin.runtime.faults import FAULT_CHEAT_ENV, FAULTS_BY_JOB_ENV
from gpucoin.spec import load_spec

POLICY = load_policy(SHIPPED_POLICIES_DIR / "local.toml")
STAKE = 4_000_000_000
"""4000 GPC: a node may be rank 0 of every cheating job; 5 slashes of half its bond leave it above the minimum."""
PINNED = ["zero_gradient", "random_gradient", "half_batch", "stale_gradient", "copied_commitment"]
"""The strategies whose own sketch shows them: the replay convicts the cheating rank."""
UNPINNED = "honest_commitment_other_gradient"

pytestmark = pytest.mark.ray


def _prefix(name: str) -> str:
    return name.replace("_", "-") + "-"


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    assert sorted([*PINNED, UNPINNED]) == sorted(SHIPPED)  # a test per shipped strategy
    by_job = {_prefix(name): {FAULT_CHEAT_ENV: f"{name}@0"} for name in SHIPPED}
    env = {FAULTS_BY_JOB_ENV: json.dumps(by_job)}
    opts = LocalOptions(
        policy=POLICY,
        home=tmp_path_factory.mktemp("market"),
        stake_ugpc=STAKE,
        node_env={"vol0": env, "vol1": env},
    )
    with LocalMarket(opts) as m:
        yield m


def _run(market, tmp_path, name: str) -> dict:
    from tests.conftest import TINY_MODEL, write_spec

    loaded = load_spec(write_spec(tmp_path / "job", TINY_MODEL), {"steps": 2, "checkpoint_interval_steps": 2})
    return market.run(loaded, job_id=new_job_id(_prefix(name).rstrip("-")))


def _rank_workers(market, s: dict) -> list[str]:
    from gpucoin.ledger import Ledger

    with Ledger(f"sqlite:///{market.opts.home / 'ledger.db'}") as lg:
        receipts = [json.loads(r.typed_data)["message"] for r in lg.messages("WorkReceipt")]
    mine = sorted((m["rank"], m["worker"]) for m in receipts if m["jobId"] == s["job_id"])
    return [w for _, w in mine]


def change(s: dict, account: str) -> int:
    return s["accounts"].get(account, {}).get("change", 0)


@pytest.mark.parametrize("name", PINNED)
def test_a_cheat_its_own_sketch_shows_is_pinned_on_its_rank_and_slashed(market, tmp_path, name) -> None:
    s = _run(market, tmp_path, name)
    cheater, honest = _rank_workers(market, s)
    assert s["intervals"] == [
        {
            "steps": [0, 2],
            "outcome": "failed",
            "ranks": [0],
            "wall_ms": s["intervals"][0]["wall_ms"],
            "check_probability": 1.0,
        }
    ]
    assert s["receipts"]["failed"] == 1 and s["receipts"]["passed"] == 0
    bond = s["accounts"][wallet_account(cheater, "bonded")]["before"]  # less after an earlier test's slash
    slash = bond * POLICY.slashing.fraud_slash_fraction_bps // 10_000
    assert s["ledger"]["slashed"] == slash > 0 and change(s, wallet_account(cheater, "bonded")) == -slash
    assert change(s, wallet_account(honest, "bonded")) == 0
    # the evidence separates them: the honest rank is paid its share, the cheater nothing
    assert change(s, wallet_account(honest)) > 0 and change(s, wallet_account(cheater)) == 0
    assert s["nodes"][cheater]["clean_streak"] == 0 and s["nodes"][cheater]["check_probability"] == 1.0
    assert s["audit"] == "ok"


def test_the_cheat_no_sketch_pins_voids_the_interval_and_slashes_nobody(market, tmp_path) -> None:
    s = _run(market, tmp_path, UNPINNED)
    cheater, honest = _rank_workers(market, s)
    assert [iv["outcome"] for iv in s["intervals"]] == ["void"] and "ranks" not in s["intervals"][0]
    assert s["receipts"]["failed"] == 0 and s["ledger"]["slashed"] == 0
    assert change(s, wallet_account(cheater, "bonded")) == change(s, wallet_account(honest, "bonded")) == 0
    # both are checked as new from now on: a void is not a clean record
    assert s["nodes"][cheater]["clean_streak"] == s["nodes"][honest]["clean_streak"] == 0
    assert s["audit"] == "ok"
