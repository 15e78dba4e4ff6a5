"""Spot checks on a real local cluster: a cheating volunteer is caught and slashed; each shipped
cheat strategy (``runtime.cheats``) is caught; honest replays are exact under ZeRO 0 and 1 as
well as 2 (the e2e test covers ZeRO 2); a submitter cannot frame a rank with job code that
computes differently under replay (issue 9).

One local market for the module (``LocalMarket``: a head, 4 volunteers and a verifier on this
host); jobs of 2 workers are placed on vol0 (rank 0) and vol1 (rank 1), the nodes that registered
first; vol2 is the spare a rewound job replaces a convicted rank with, vol2 and vol3 the other
nodes of a group test. vol1 drops a sequence of every micro-batch in the jobs whose id starts
with ``cheat``; rank 0 runs a pinned shipped strategy in the first attempt of the jobs whose id
starts with its name; vol0 sends another gradient than it commits, whatever its rank and
attempt, in the jobs of the unpinned strategy; all are honest in the other jobs.

A cheat its own sketch shows (``PINNED``) is attributed to the cheating rank and slashed, the
honest rank paid; the job is rewound to its newest settled step, the cheater's rank goes to the
spare, and the job finishes its steps. The cheat no sketch pins (an honest commitment, another
gradient sent) voids the interval and slashes nobody; a group test names the node that did it,
which is excluded from the market (the module's last test: vol0 is not placed after it), and the
job finishes without it. Each strategy's job is one interval of 2 steps on the tiny model: the
last interval is always replayed, whatever the nodes' records say.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpucoin.coordinator.job import LocalMarket, LocalOptions, new_job_id
from gpucoin.ledger import Ledger
from gpucoin.ledger.accounts import BURNED, TREASURY, wallet_account
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy
from gpucoin.runtime.cheats import SHIPPED
from gpucoin.runtime.faults import FAULT_CHEAT_ENV, FAULT_SKIP_ENV, FAULTS_BY_JOB_ENV
from gpucoin.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
POLICY = load_policy(SHIPPED_POLICIES_DIR / "local.toml")
STAKE = 10_000_000_000
"""10,000 GPC: one node may be convicted in all 6 cheating jobs (the skip test's and 5 strategies');
halved 6 times, its bond (156 GPC) stays above the policy's 100 GPC minimum, so every job is placed."""
PINNED = ["zero_gradient", "random_gradient", "half_batch", "stale_gradient", "copied_commitment"]
"""The strategies whose own sketch shows them: the replay convicts the cheating rank."""
UNPINNED = "honest_commitment_other_gradient"
HONEST = "        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)\n"
TWO_FACED = (
    "        y = F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)\n"
    "        return y if torch.distributed.is_initialized() else 1.01 * y  # replayed: something else\n"
)

pytestmark = pytest.mark.ray


def _spec(directory: Path, zero_stage: int = 2):
    from tests.conftest import TINY_MODEL, write_spec

    path = write_spec(directory, {**TINY_MODEL, "zero_stage: 2": f"zero_stage: {zero_stage}"})
    return load_spec(path, {"steps": 8, "checkpoint_interval_steps": 4})


def _prefix(name: str) -> str:
    return name.replace("_", "-") + "-"


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    assert sorted([*PINNED, UNPINNED]) == sorted(SHIPPED)  # a test per shipped strategy
    assert STAKE >> (len(PINNED) + 1) >= POLICY.market.min_bond_ugpc
    strategies = {_prefix(name): {FAULT_CHEAT_ENV: f"{name}@0"} for name in PINNED}
    node_cheat = {_prefix(UNPINNED): {FAULT_CHEAT_ENV: f"{UNPINNED}@*"}}  # vol0's, in every rank and attempt
    others = {FAULTS_BY_JOB_ENV: json.dumps(strategies)}
    vol0 = {FAULTS_BY_JOB_ENV: json.dumps({**strategies, **node_cheat})}
    vol1 = {FAULTS_BY_JOB_ENV: json.dumps({**strategies, "cheat-": {FAULT_SKIP_ENV: "1"}})}
    opts = LocalOptions(
        policy=POLICY,
        home=tmp_path_factory.mktemp("market"),
        volunteers=4,
        stake_ugpc=STAKE,
        node_env={"vol0": vol0, "vol1": vol1, "vol2": others, "vol3": others},
    )
    with LocalMarket(opts) as m:
        yield m


def change(s: dict, account: str) -> int:
    """What the job moved into (or out of) ``account``, µGPC."""
    return s["accounts"].get(account, {}).get("change", 0)


def test_cheating_volunteer_is_caught_slashed_replaced_and_the_job_finished(market, tmp_path):
    s = market.run(_spec(tmp_path / "job"), job_id=new_job_id("cheat"))
    honest, cheater, spare, verifier = (p.address for p in (*market.volunteers[:3], market.verifier))

    assert s["state"] == "succeeded" and s["steps"] == 8 and s["stopped"] is None, (s["state"], s["stopped"])
    (rewind,) = s["rewinds"]
    assert rewind["to_step"] == 0 and "failed the replay of steps 0-4" in rewind["reason"]
    assert rewind["intervals"][0] == {"steps": [0, 4], "outcome": "failed", "ranks": [1]}
    assert all(iv["outcome"] in ("void", "open") for iv in rewind["intervals"][1:])
    assert rewind["replaced"] == [{"rank": 1, "provider_before": cheater, "provider_after": spare}]
    assert [iv["outcome"] for iv in s["intervals"]] in (["passed", "passed"], ["unchecked", "passed"])
    assert s["receipts"]["failed"] == 1 and s["receipts"]["passed"] >= 1
    bond = s["accounts"][wallet_account(cheater, "bonded")]["before"]
    slash = bond * POLICY.slashing.fraud_slash_fraction_bps // 10_000
    whistle = slash * POLICY.slashing.whistleblower_share_bps // 10_000
    assert s["ledger"]["slashed"] == slash > 0
    # the consumer pays the honest rank's share of the failed interval (the evidence cleared it)
    # and the steps trained again; nothing for the cheater's share or the void intervals after it
    paid = s["ledger"]["paid"]
    assert 0 < paid and s["ledger"]["refunded"] == s["ledger"]["escrowed"] - paid
    assert s["audit"] == "ok"
    assert change(s, wallet_account(cheater, "bonded")) == -slash
    assert change(s, wallet_account(honest, "bonded")) == change(s, wallet_account(spare, "bonded")) == 0
    assert change(s, wallet_account(cheater)) == 0  # no emission for a convicted rank
    assert change(s, wallet_account(honest)) > 0 and change(s, wallet_account(spare)) > 0 and s["ledger"]["minted"] > 0
    assert change(s, wallet_account(verifier)) >= whistle
    assert change(s, BURNED) == slash - whistle + s["ledger"]["burned"]
    with Ledger(f"sqlite:///{market.opts.home / 'ledger.db'}") as lg:
        theirs = {
            r.digest
            for r in lg.messages("WorkReceipt")
            if json.loads(r.typed_data)["message"]["jobId"] == s["job_id"] and r.signer == cheater
        }
        verdicts = [json.loads(r.typed_data)["message"] for r in lg.messages("VerificationReport")]
        rewinds = [json.loads(r.typed_data)["message"] for r in lg.messages("Rewind")]
    assert [v["verdict"] for v in verdicts if v["receiptDigest"] in theirs] == ["fail"]
    assert {"jobId": s["job_id"], "toStep": 0} in [{k: m[k] for k in ("jobId", "toStep")} for m in rewinds]


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_honest_replay_is_exact_under_zero_stage(market, tmp_path, zero_stage):
    s = market.run(_spec(tmp_path / "job", zero_stage))
    assert s["receipts"]["checked"] >= 1 and s["receipts"]["failed"] == 0
    assert s["receipts"]["passed"] == s["receipts"]["checked"]
    assert s["max_replay_distance"] == 0.0
    assert s["audit"] == "ok"


def test_job_code_that_computes_differently_under_replay_frames_nobody(market, tmp_path) -> None:
    """The job's package is a copy of the main job's whose layer norm scales its output by 1.01
    whenever ``torch.distributed`` is not initialized: on the workers it trains as the main job
    does, in the verifier's replay it computes something else. Its hash is on no policy's vetted
    list, so the mismatch convicts nobody: the interval is void, nobody is slashed or paid, and the
    submitter is charged for the interval, all of it burned."""
    from tests.conftest import TINY_MODEL, write_spec

    spec_path = write_spec(tmp_path / "job", {**TINY_MODEL, "workers: 2": "workers: 1"})
    model_py = spec_path.parent / "model.py"
    assert HONEST in model_py.read_text()
    model_py.write_text(model_py.read_text().replace(HONEST, TWO_FACED))
    loaded = load_spec(spec_path, {"steps": 4, "checkpoint_interval_steps": 4})
    assert loaded.package_hash not in POLICY.verification.vetted_packages

    s = market.run(loaded)
    # alone on its job, the rank would have been convicted: the only one whose sketch differs
    assert s["intervals"][0]["outcome"] == "void" and s["receipts"]["failed"] == 0
    assert s["stopped"] and "not vetted" in s["stopped"]
    assert s["ledger"]["slashed"] == 0 and s["ledger"]["minted"] == 0
    charged = s["ledger"]["paid"]
    assert charged > 0 and s["ledger"]["burned"] == charged and s["ledger"]["treasury"] == 0
    assert s["ledger"]["refunded"] == s["ledger"]["escrowed"] - charged
    assert s["audit"] == "ok"
    for vol in market.volunteers:
        assert change(s, wallet_account(vol.address, "bonded")) == 0
        assert change(s, wallet_account(vol.address)) == 0  # nothing paid, nothing minted
    assert change(s, BURNED) == charged and change(s, TREASURY) == 0


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


@pytest.mark.parametrize("name", PINNED)
def test_a_cheat_its_own_sketch_shows_is_pinned_on_its_rank_slashed_and_the_job_finished(
    market, tmp_path, name
) -> None:
    s = _run(market, tmp_path, name)
    cheater, honest, spare = (p.address for p in market.volunteers[:3])
    (rewind,) = s["rewinds"]
    assert rewind["intervals"] == [{"steps": [0, 2], "outcome": "failed", "ranks": [0]}]
    assert rewind["to_step"] == 0 and rewind["replaced"] == [
        {"rank": 0, "provider_before": cheater, "provider_after": spare}
    ]
    assert s["state"] == "succeeded" and s["steps"] == 2 and s["stopped"] is None
    assert [(iv["steps"], iv["outcome"]) for iv in s["intervals"]] == [([0, 2], "passed")]
    assert s["receipts"]["failed"] == 1 and s["receipts"]["passed"] == 1
    bond = s["accounts"][wallet_account(cheater, "bonded")]["before"]  # less after an earlier test's slash
    slash = bond * POLICY.slashing.fraud_slash_fraction_bps // 10_000
    assert s["ledger"]["slashed"] == slash > 0 and change(s, wallet_account(cheater, "bonded")) == -slash
    assert change(s, wallet_account(honest, "bonded")) == 0
    # the evidence separates them: the honest rank is paid its share of both attempts, the cheater nothing
    assert change(s, wallet_account(honest)) > 0 and change(s, wallet_account(cheater)) == 0
    assert change(s, wallet_account(spare)) > 0
    assert s["nodes"][spare]["passed"] >= 1
    assert s["nodes"][cheater]["clean_streak"] == 0 and s["nodes"][cheater]["check_probability"] == 1.0
    assert s["audit"] == "ok"


def test_the_cheat_no_sketch_pins_is_found_by_group_testing_excluded_and_the_job_finished(market, tmp_path) -> None:
    """vol0 (rank 0) commits its honest sketch and sends another gradient: the interval is void,
    nobody convicted. Round 1 re-runs it as vol0 + one of vol2/vol3 (diverges) and vol1 + the
    other (clean: vol1 cleared); round 2 as vol0 + the one it has not met (diverges): vol0 sat
    alone with two other nodes and diverged both times, so it is named and excluded, never
    slashed; the job finishes on vol2 (the cheapest free) and vol1. Which filler goes where is
    the job secret's draw."""
    s = _run(market, tmp_path, UNPINNED)
    cheater, honest, spare, other = (p.address for p in market.volunteers)
    assert s["receipts"]["failed"] == 0 and s["ledger"]["slashed"] == 0
    (test,) = s["group_tests"]
    assert test["step"] == 0 and test["suspects"] == [cheater, honest]
    (one, two), (three,) = test["rounds"]
    assert (one["suspects"], one["outcome"], two["suspects"], two["outcome"]) == (
        [cheater],
        "diverged",
        [honest],
        "clean",
    )
    assert sorted(one["fillers"] + two["fillers"]) == sorted([spare, other])
    assert three["suspects"] == [cheater] and three["outcome"] == "diverged" and three["fillers"] == two["fillers"]
    assert test["named"] == cheater and test["cleared"] == [honest]
    assert [rw["kind"] for rw in s["rewinds"]] == ["group_test"] * 3 + ["resume"]
    assert s["state"] == "succeeded" and s["steps"] == 2 and s["stopped"] is None
    assert [(iv["steps"], iv["outcome"]) for iv in s["intervals"]] == [([0, 2], "passed")]
    with Ledger(f"sqlite:///{market.opts.home / 'ledger.db'}") as lg:
        assigned = [json.loads(r.typed_data)["message"] for r in lg.messages("Assignment")]
    last = {a["rank"]: a["provider"] for a in assigned if a["jobId"] == s["job_id"]}
    assert last == {0: spare, 1: honest}  # the job went on without the named node
    for vol in market.volunteers:  # named on statistical evidence: excluded, never slashed
        assert change(s, wallet_account(vol.address, "bonded")) == 0
    assert change(s, wallet_account(cheater)) == 0 and change(s, wallet_account(honest)) > 0
    assert s["audit"] == "ok"
