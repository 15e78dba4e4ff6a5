"""Verifiers are checked too (issue 12): a false verifier report is caught by the second
verifier's re-check and slashes the verifier, on a real local cluster.

One local market (``LocalMarket``: a head, 2 volunteers and 2 verifiers on this host) under the
local policy with every replayed interval re-checked (``recheck_share_bps`` = 10,000). In the
job, rank 0 sends a zero gradient (``runtime.cheats``), and ``verifier0`` signs "pass" on every
receipt without replaying (``runtime.faults.FAULT_LAZY_VERIFIER_ENV``). The head asks the
verifier that registered first (``verifier0``) first; the re-check by ``verifier1`` fails rank 0
after it: the lazy pass is shown false (``verify.recheck``), its verifier's bond is slashed with
the whistleblower share to the honest verifier, the cheater is slashed on the honest verifier's
fail and the honest rank is paid on its pass; the audit replays the same rules.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpucoin.coordinator.job import LocalMarket, LocalOptions, new_job_id
from gpucoin.ledger import Ledger
from gpucoin.ledger.accounts import wallet_account
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy
from gpucoin.runtime.faults import FAULT_CHEAT_ENV, FAULT_LAZY_VERIFIER_ENV, FAULTS_BY_JOB_ENV
from gpucoin.spec import load_spec

BASE = load_policy(SHIPPED_POLICIES_DIR / "local.toml")
POLICY = BASE.model_copy(update={"verification": BASE.verification.model_copy(update={"recheck_share_bps": 10_000})})
STAKE = 1_000_000_000  # 1,000 GPC each, volunteers and verifiers

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    cheat = {FAULTS_BY_JOB_ENV: json.dumps({"lazy-": {FAULT_CHEAT_ENV: "zero_gradient@0"}})}
    lazy = {FAULTS_BY_JOB_ENV: json.dumps({"lazy-": {FAULT_LAZY_VERIFIER_ENV: "1"}})}
    opts = LocalOptions(
        policy=POLICY,
        home=tmp_path_factory.mktemp("market"),
        verifiers=2,
        stake_ugpc=STAKE,
        node_env={"vol0": cheat, "vol1": cheat, "verifier0": lazy},
    )
    with LocalMarket(opts) as m:
        yield m


def change(s: dict, account: str) -> int:
    return s["accounts"].get(account, {}).get("change", 0)


def test_a_lazy_pass_is_caught_by_the_second_verifier_and_slashes_its_verifier(market, tmp_path: Path) -> None:
    from tests.conftest import TINY_MODEL, write_spec

    loaded = load_spec(write_spec(tmp_path / "job", TINY_MODEL), {"steps": 2, "checkpoint_interval_steps": 2})
    s = market.run(loaded, job_id=new_job_id("lazy"))
    lazy, honest_verifier = (v.address for v in market.verifiers)
    with Ledger(f"sqlite:///{market.opts.home / 'ledger.db'}") as lg:
        receipts = {r.digest: json.loads(r.typed_data)["message"] for r in lg.messages("WorkReceipt")}
        mine = {d: m for d, m in receipts.items() if m["jobId"] == s["job_id"]}
        reports = [json.loads(r.typed_data)["message"] for r in lg.messages("VerificationReport")]
    cheater = next(m["worker"] for m in mine.values() if m["rank"] == 0)
    honest = next(m["worker"] for m in mine.values() if m["rank"] == 1)
    verdicts = sorted(
        (mine[r["receiptDigest"]]["rank"], r["verifier"], r["verdict"]) for r in reports if r["receiptDigest"] in mine
    )
    # both verifiers judged both receipts: the lazy one passed everything, the honest one failed rank 0
    assert verdicts == sorted(
        [(0, lazy, "pass"), (1, lazy, "pass"), (0, honest_verifier, "fail"), (1, honest_verifier, "pass")]
    )
    assert s["receipts"]["rechecked"] == 1 and s["receipts"]["failed"] == 1
    assert s["intervals"][0]["outcome"] == "failed" and s["intervals"][0]["ranks"] == [0]
    # the lazy verifier loses the policy's share of its bond; the honest one gets the whistleblower share
    fraction, share = POLICY.slashing.fraud_slash_fraction_bps, POLICY.slashing.whistleblower_share_bps
    lazy_bond = s["accounts"][wallet_account(lazy, "bonded")]["before"]
    cheater_bond = s["accounts"][wallet_account(cheater, "bonded")]["before"]
    lazy_slash, cheater_slash = lazy_bond * fraction // 10_000, cheater_bond * fraction // 10_000
    assert s["verifiers_slashed"] == {lazy: lazy_slash} and lazy_slash > 0
    assert change(s, wallet_account(lazy, "bonded")) == -lazy_slash
    assert change(s, wallet_account(honest_verifier, "bonded")) == 0
    whistles = lazy_slash * share // 10_000 + cheater_slash * share // 10_000
    assert change(s, wallet_account(honest_verifier)) >= whistles
    assert change(s, wallet_account(lazy)) == 0  # no whistleblower share, no emission for a shown-false report
    # the cheater is slashed on the honest verifier's fail, the honest rank paid on its pass
    assert change(s, wallet_account(cheater, "bonded")) == -cheater_slash
    assert s["ledger"]["slashed"] == lazy_slash + cheater_slash
    assert change(s, wallet_account(honest)) > 0 and change(s, wallet_account(cheater)) == 0
    assert s["audit"] == "ok"
