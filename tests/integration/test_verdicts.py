"""The coordinator's handling of a verifier's signed reports, on a real local ledger, without Ray.

A local market is opened as ``gpucoin train`` opens it (dev Genesis, faucet, two registered
volunteers, an escrowed JobOrder, Assignments); ranks' receipts come in through
``JobRun.on_receipt``; the verifier's reports, signed with the verifier's own dev key, through
``JobRun.on_verdict``. Replays are not run: what is under test is what the coordinator does with
their verdicts. The replay dispatch is a recorder.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from gpucoin.cluster.local import fund_engineer, participant, register_volunteer
from gpucoin.coordinator.job import LocalOptions, QuietUI, open_ledger
from gpucoin.coordinator.run import JobRun
from gpucoin.coordinator.settle import Coordinator
from gpucoin.exceptions import SignatureError
from gpucoin.ledger.accounts import BURNED, TREASURY, escrow_account, wallet_account
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy
from gpucoin.policy.tokenomics import interval_payment_ugpc
from gpucoin.spec import load_spec
from gpucoin.storage import sha256_digest
from gpucoin.verify.commitment import sketch_root
from gpucoin.verify.verifier import Finding, ReplayResult
from gpucoin.wallet.messages import ZERO_BYTES32, SignedMessage, distance_e9, sign
from tests.conftest import TINY_MODEL, write_spec

REPO = Path(__file__).resolve().parents[2]
POLICY = load_policy(SHIPPED_POLICIES_DIR / "local.toml")
STAKE = 500_000_000
JOB = "job-1"


class Dispatch:
    """Stands in for the verifier node (``coordinator.run.Replays``): records what would be replayed."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def submit(self, request) -> str:
        self.calls.append((request.step_start, request.step_end))
        return f"ref{len(self.calls)}"

    def result(self, handle, timeout_s):
        return None

    def cancel(self, handle) -> None:
        pass


class Inbox:
    """Stands in for the job's inbox (``coordinator.run.Inbox``): records the stop the ranks would be told."""

    def __init__(self) -> None:
        self.stopped: list[str] = []

    def poll(self) -> list:
        return []

    def stop(self, reason: str) -> None:
        self.stopped.append(reason)


@pytest.fixture
def market(tmp_path):
    yield from _market(tmp_path)


def _market(tmp_path, package: str | None = None):
    opts = LocalOptions(policy=POLICY, home=tmp_path)
    coordinator = participant("coordinator", tmp_path)
    ledger = open_ledger(opts, coordinator)
    coord = Coordinator(ledger, POLICY, coordinator.account, ledger.domain)
    engineer = participant("engineer", tmp_path)
    fund_engineer(coord, engineer)
    vols = [participant(f"vol{i}", tmp_path) for i in range(2)]
    for i, v in enumerate(vols):
        register_volunteer(coord, v, f"node{i}", 800_000, STAKE)
    loaded = load_spec(write_spec(tmp_path / "job", TINY_MODEL), {"steps": 8, "checkpoint_interval_steps": 4})
    order = sign(
        engineer.account,
        "JobOrder",
        coord.domain,
        {
            "consumer": engineer.address,
            "jobId": JOB,
            "specHash": loaded.spec_hash,
            "packageHash": package or loaded.package_hash,
            "workers": 2,
            "bidPerWorkerHour": loaded.spec.bid_ugpc_per_worker_hour,
            "budget": loaded.spec.budget_ugpc,
            "nonce": coord.nonces.next(),
            "deadline": int(time.time()) + 600,
        },
    )
    coord.escrow(order)
    for rank, v in enumerate(vols):
        coord.assign(JOB, rank, v.address, f"node{rank}")
    run = JobRun(
        spec=loaded.spec,
        job_id=JOB,
        coord=coord,
        inbox=Inbox(),
        rank_worker=[v.address for v in vols],
        price_ugpc_per_worker_hour=800_000,
        verifier_address=participant("verifier0", tmp_path).address,
        package_hash=package or loaded.package_hash,
        replays=Dispatch(),
        store=None,
        sketch_dir=tmp_path / "sketches",
        data_source="",
        ui=QuietUI(),
    )
    run.must_check = lambda iv: "under test"  # every interval is drawn; no store to ask
    yield run, vols, participant("verifier0", tmp_path)
    ledger.close()


def deliver(run: JobRun, vols, start: int) -> list[SignedMessage]:
    """Every rank's signed receipt for the interval at ``start``, admitted by the coordinator."""
    out = []
    for rank, v in enumerate(vols):
        prev = run.intervals.get(start - 4)
        sk = np.random.default_rng(start * 10 + rank).normal(size=(4, POLICY.verification.sketch_buckets))
        receipt = sign(
            v.account,
            "WorkReceipt",
            run.coord.domain,
            {
                "jobId": JOB,
                "worker": v.address,
                "rank": rank,
                "stepStart": start,
                "stepEnd": start + 4,
                "samples": 4 * run.spec.deepspeed.micro_batch_size * run.spec.deepspeed.gradient_accumulation_steps,
                "computeTimeMs": 10,
                "sketchRoot": sketch_root(start, sk),
                "checkpointHash": sha256_digest(f"manifest {rank} {start}".encode()),
                "previousReceipt": prev.receipts[rank].digest if prev else ZERO_BYTES32,
                "nonce": run.coord.nonces.next(),
            },
        )
        run.on_receipt(rank, receipt.to_json(), sk)
        out.append(receipt)
    return out


def verdict(verifier, run: JobRun, judged: list[tuple[SignedMessage, str]]) -> ReplayResult:
    """The verifier's signed reports of ``judged`` (receipt, verdict) pairs."""
    reports, findings = [], []
    for receipt, v in judged:
        d = 0.0 if v == "pass" else math.inf
        reports.append(
            sign(
                verifier.account,
                "VerificationReport",
                run.coord.domain,
                {
                    "verifier": verifier.address,
                    "receiptDigest": receipt.digest,
                    "verdict": v,
                    "distanceE9": distance_e9(d),
                    "nonce": run.coord.nonces.next(),
                },
            ).to_json()
        )
        findings.append(Finding(receipt.digest, receipt.message["rank"], v, d, None if v == "pass" else "why"))
    return ReplayResult(verifier.address, tuple(reports), tuple(findings))


def test_a_rank_convicted_by_both_checks_its_checkpoint_bounds_is_slashed_once(market) -> None:
    run, vols, verifier = market
    first = deliver(run, vols, 0)
    second = deliver(run, vols, 4)
    assert run.replays.calls == [(0, 4), (4, 8)]
    run.on_verdict(run.intervals[0], verdict(verifier, run, [(first[0], "pass"), (first[1], "fail")]))
    # the replay of 4-8 was already running: its start file is rank 1's, so it convicts rank 1 again
    again = [(second[0], "void"), (second[1], "void"), (first[1], "fail")]
    run.intervals[4].outcome = "pending"
    run.on_verdict(run.intervals[4], verdict(verifier, run, again))
    slash = STAKE * POLICY.slashing.fraud_slash_fraction_bps // 10_000
    ledger = run.coord.ledger
    assert run.money["slashed"] == slash
    assert ledger.balance(wallet_account(vols[1].address, "bonded")) == STAKE - slash
    assert ledger.balance(wallet_account(vols[0].address, "bonded")) == STAKE
    # only rank 0's share of steps 0-4 is charged: the evidence cleared it; steps 4-8 are void
    assert run.money["paid"] == interval_payment_ugpc(run.price_ugpc_per_worker_hour, 1, run.intervals[0].wall_ms)
    assert run.last_settled_step() == 0
    assert ledger.audit() == []


def test_reports_about_other_receipts_are_refused(market) -> None:
    run, vols, verifier = market
    first = deliver(run, vols, 0)
    second = deliver(run, vols, 4)
    with pytest.raises(SignatureError, match="not one it was asked about"):
        run.on_verdict(run.intervals[0], verdict(verifier, run, [(first[0], "pass"), (second[1], "pass")]))
    with pytest.raises(SignatureError, match="interval before"):  # only a conviction may reach back
        run.on_verdict(
            run.intervals[4], verdict(verifier, run, [(second[0], "pass"), (second[1], "pass"), (first[0], "pass")])
        )
    with pytest.raises(SignatureError, match="every receipt"):
        run.on_verdict(run.intervals[0], verdict(verifier, run, [(first[0], "pass")]))
    impostor = participant("vol0", run.sketch_dir.parent)  # a rank signing its own verdicts
    with pytest.raises(SignatureError):
        run.on_verdict(run.intervals[0], verdict(impostor, run, [(first[0], "pass"), (first[1], "pass")]))
    assert run.money["paid"] == 0 and run.money["slashed"] == 0


def test_a_void_replay_checks_the_interval_that_wrote_its_start(market) -> None:
    run, vols, verifier = market
    run.must_check = lambda iv: None  # nothing forces a draw ...
    run.policy = POLICY.model_copy(
        update={
            "verification": POLICY.verification.model_copy(
                update={"check_probability": 0.0, "new_node_check_probability": 0.0}
            )
        }
    )
    deliver(run, vols, 0)
    assert run.intervals[0].outcome == "unchecked" and run.intervals[0].settled  # ... so 0-4 settled unchecked
    run.must_check = lambda iv: "the last interval"
    second = deliver(run, vols, 4)
    run.on_verdict(run.intervals[4], verdict(verifier, run, [(second[0], "void"), (second[1], "void")]))
    assert run.intervals[4].outcome == "void" and run.stopped
    assert run.replays.calls == [(4, 8), (0, 4)] and run.intervals[0].outcome == "pending"
    paid = run.money["paid"]
    first = [run.intervals[0].receipts[r] for r in range(2)]
    run.on_verdict(run.intervals[0], verdict(verifier, run, [(first[0], "pass"), (first[1], "pass")]))
    assert run.intervals[0].outcome == "passed" and run.money["paid"] == paid  # not charged twice
    assert run.coord.ledger.audit() == []


def test_a_void_interval_of_an_unvetted_package_is_charged_to_its_submitter_and_burned(tmp_path) -> None:
    market = _market(tmp_path, package="0x" + "ab" * 32)
    run, vols, verifier = next(market)
    assert not run.vetted
    run.t_interval = time.monotonic() - 60  # the interval took a minute of the coordinator's clock
    first = deliver(run, vols, 0)
    ledger = run.coord.ledger
    before = ledger.balances()
    run.on_verdict(run.intervals[0], verdict(verifier, run, [(first[0], "void"), (first[1], "void")]))
    after = ledger.balances()
    charged = run.money["paid"]
    assert charged > 0 and run.intervals[0].outcome == "void" and run.stopped
    assert after[BURNED] - before.get(BURNED, 0) == charged  # all of it burned, no treasury cut
    assert after.get(TREASURY, 0) == before.get(TREASURY, 0)
    assert all(after.get(wallet_account(v.address), 0) == before.get(wallet_account(v.address), 0) for v in vols)
    assert after[escrow_account(JOB)] == before[escrow_account(JOB)] - charged
    now = ledger.current_epoch()
    assert ledger.epoch_charges(now) == ledger.epoch_charges(now - 1) == []  # it earns no emission
    assert run.money["slashed"] == 0
    assert ledger.audit() == []
    market.close()


def test_the_ranks_the_evidence_clears_are_paid_for_the_interval_that_convicted_another(market) -> None:
    run, vols, verifier = market
    run.t_interval = time.monotonic() - 60
    first = deliver(run, vols, 0)
    run.on_verdict(run.intervals[0], verdict(verifier, run, [(first[0], "pass"), (first[1], "fail")]))
    ledger = run.coord.ledger
    assert run.intervals[0].outcome == "failed" and run.money["slashed"] > 0
    paid = run.money["paid"]
    whole = interval_payment_ugpc(run.price_ugpc_per_worker_hour, 2, run.intervals[0].wall_ms)
    assert 0 < paid <= whole // 2 + 1  # rank 0's share only
    (charge,) = ledger.epoch_charges(ledger.current_epoch()) or ledger.epoch_charges(ledger.current_epoch() - 1)
    assert charge.interval.workers == (vols[0].address,) and charge.interval.payment_ugpc == paid
    assert ledger.audit() == []


def _rechecked(run: JobRun, tmp_path) -> tuple:
    """``run`` with every replayed interval re-checked by a second verifier; both verifiers bonded."""
    first, second = participant("verifier0", tmp_path), participant("verifier1", tmp_path)
    for i, v in enumerate((first, second)):
        register_volunteer(run.coord, v, f"verifier-node{i}", 0, STAKE)
    run.policy = POLICY.model_copy(
        update={"verification": POLICY.verification.model_copy(update={"recheck_share_bps": 10_000})}
    )
    run.recheck, run.recheck_address = Dispatch(), second.address
    return first, second


def test_a_lazy_pass_is_caught_by_the_recheck_and_the_interval_settles_on_the_rechecks_reports(
    market, tmp_path
) -> None:
    run, vols, _ = market
    lazy, honest = _rechecked(run, tmp_path)
    receipts = deliver(run, vols, 0)
    lazy_result = verdict(lazy, run, [(receipts[0], "pass"), (receipts[1], "pass")])
    run.on_verdict(run.intervals[0], lazy_result)
    # nothing is settled on the first reports while the second verifier replays the interval
    assert run.recheck.calls == [(0, 4)] and run.counts["rechecked"] == 1
    assert run.intervals[0].outcome == "pending" and not run.intervals[0].settled and run.money["paid"] == 0
    assert run.intervals[0].first is lazy_result  # waiting for the second verifier
    run.on_verdict(run.intervals[0], verdict(honest, run, [(receipts[0], "fail"), (receipts[1], "pass")]))
    ledger = run.coord.ledger
    slash = STAKE * POLICY.slashing.fraud_slash_fraction_bps // 10_000
    assert run.verifiers_slashed == {lazy.address: slash}
    assert ledger.balance(wallet_account(lazy.address, "bonded")) == STAKE - slash
    assert ledger.balance(wallet_account(honest.address, "bonded")) == STAKE
    # judged on the re-check: rank 0 convicted and slashed, rank 1 paid its share
    assert run.intervals[0].outcome == "failed" and run.intervals[0].failed_ranks == [0]
    assert ledger.balance(wallet_account(vols[0].address, "bonded")) == STAKE - slash
    assert run.money["slashed"] == 2 * slash
    assert run.money["paid"] == interval_payment_ugpc(run.price_ugpc_per_worker_hour, 1, run.intervals[0].wall_ms)
    assert ledger.audit() == []


def test_a_recheck_that_agrees_settles_the_interval_once_and_slashes_nobody(market, tmp_path) -> None:
    run, vols, _ = market
    first, second = _rechecked(run, tmp_path)
    receipts = deliver(run, vols, 0)
    run.on_verdict(run.intervals[0], verdict(first, run, [(r, "pass") for r in receipts]))
    run.on_verdict(run.intervals[0], verdict(second, run, [(r, "pass") for r in receipts]))
    assert run.intervals[0].outcome == "passed" and run.verifiers_slashed == {} and run.money["slashed"] == 0
    assert run.money["paid"] == interval_payment_ugpc(run.price_ugpc_per_worker_hour, 2, run.intervals[0].wall_ms)
    assert run.coord.ledger.audit() == []


def test_no_interval_settles_past_one_whose_replay_runs_and_its_failure_voids_them(market) -> None:
    """An unchecked interval's challenge window lasts until every earlier replay is back: it
    trained on the state that replay judges."""
    run, vols, verifier = market
    run.must_check = lambda iv: "under test" if iv.start == 0 else None
    run.policy = POLICY.model_copy(
        update={
            "verification": POLICY.verification.model_copy(
                update={"check_probability": 0.0, "new_node_check_probability": 0.0}
            )
        }
    )
    first = deliver(run, vols, 0)
    deliver(run, vols, 4)
    assert [run.intervals[s].outcome for s in (0, 4)] == ["pending", "held"]  # window 0 s, still held
    run.settle_held(force=False)
    assert run.money["paid"] == 0
    run.on_verdict(run.intervals[0], verdict(verifier, run, [(first[0], "pass"), (first[1], "fail")]))
    assert run.intervals[4].outcome == "void" and not run.intervals[4].settled
    assert run.money["paid"] == interval_payment_ugpc(run.price_ugpc_per_worker_hour, 1, run.intervals[0].wall_ms)
    assert run.coord.ledger.audit() == []


def test_a_recheck_whose_reports_do_not_check_leaves_the_first_result_standing(market, tmp_path) -> None:
    run, vols, _ = market
    first, _ = _rechecked(run, tmp_path)
    receipts = deliver(run, vols, 0)
    run.on_verdict(run.intervals[0], verdict(first, run, [(r, "pass") for r in receipts]))
    forged = verdict(first, run, [(receipts[0], "fail"), (receipts[1], "pass")])  # not the second verifier's key
    run.on_verdict(run.intervals[0], forged)  # no exception: the job goes on
    assert run.intervals[0].outcome == "passed" and run.intervals[0].settled and run.intervals[0].first is None
    assert run.verifiers_slashed == {} and run.money["slashed"] == 0
    assert run.coord.ledger.audit() == []


def test_a_framing_fail_the_recheck_passes_still_stands_and_the_rechecker_is_not_slashed(market, tmp_path) -> None:
    run, vols, _ = market
    framer, honest = _rechecked(run, tmp_path)
    receipts = deliver(run, vols, 0)
    run.on_verdict(run.intervals[0], verdict(framer, run, [(receipts[0], "fail"), (receipts[1], "pass")]))
    run.on_verdict(run.intervals[0], verdict(honest, run, [(r, "pass") for r in receipts]))
    assert run.verifiers_slashed == {}  # the pass came after the fail: the framer's word slashes no verifier
    assert run.intervals[0].outcome == "failed" and run.intervals[0].failed_ranks == [0]
    assert run.coord.ledger.audit() == []


def _first_out_for_recheck(run: JobRun, vols, tmp_path) -> tuple:
    """Both intervals' receipts in; the first verifier passed 0-4, which is out for its re-check."""
    first, second = _rechecked(run, tmp_path)
    a, b = deliver(run, vols, 0), deliver(run, vols, 4)
    run.on_verdict(run.intervals[0], verdict(first, run, [(r, "pass") for r in a]))
    assert run.intervals[0].first is not None
    return first, second, a, b


def test_a_late_verdict_on_an_interval_already_convicted_pays_nothing_and_slashes_once(market, tmp_path) -> None:
    """Interval 0 is out for its re-check when the check of 4-8 convicts its rank 1 (its start
    file): the re-check's pass must not overturn that."""
    run, vols, _ = market
    first, second, a, b = _first_out_for_recheck(run, vols, tmp_path)
    run.on_verdict(run.intervals[4], verdict(first, run, [(b[0], "void"), (b[1], "void"), (a[1], "fail")]))
    run.on_verdict(run.intervals[4], verdict(second, run, [(b[0], "void"), (b[1], "void"), (a[1], "fail")]))
    assert run.intervals[0].outcome == "failed"
    paid = run.money["paid"]
    run.on_verdict(run.intervals[0], verdict(second, run, [(r, "pass") for r in a]))
    assert run.intervals[0].outcome == "failed" and not run.intervals[0].settled and run.money["paid"] == paid
    slash = STAKE * POLICY.slashing.fraud_slash_fraction_bps // 10_000
    assert run.money["slashed"] == slash  # rank 1, once
    assert run.coord.ledger.audit() == []


def test_a_later_pass_waits_for_an_earlier_recheck_and_is_voided_when_it_fails(market, tmp_path) -> None:
    run, vols, _ = market
    lazy, honest, a, b = _first_out_for_recheck(run, vols, tmp_path)
    run.on_verdict(run.intervals[4], verdict(lazy, run, [(r, "pass") for r in b]))
    run.on_verdict(run.intervals[4], verdict(honest, run, [(r, "pass") for r in b]))  # 4-8's re-check agrees
    assert run.intervals[4].outcome == "passed" and not run.intervals[4].settled  # 0-4 is still out
    run.on_verdict(run.intervals[0], verdict(honest, run, [(a[0], "fail"), (a[1], "pass")]))
    assert run.intervals[0].outcome == "failed" and run.intervals[4].outcome == "void"
    assert not run.intervals[4].settled
    assert run.money["paid"] == interval_payment_ugpc(run.price_ugpc_per_worker_hour, 1, run.intervals[0].wall_ms)
    assert run.coord.ledger.audit() == []


def test_after_a_rewind_the_kept_ranks_old_receipt_is_refused_and_the_steps_settle_again(market, tmp_path) -> None:
    """Rank 1 is convicted in steps 0-4; the head rewinds to 0 and puts a third volunteer on rank 1.
    Rank 0 sending its superseded receipt again (a no-op on the ledger, which already holds it)
    must not take the place of its new one: it is refused, and the re-run settles on the new
    receipts, each attempt charged once."""
    run, vols, verifier = market
    first = deliver(run, vols, 0)
    run.intervals[0].pending = None  # the replay is back (``collect_replays`` clears it before ``on_verdict``)
    run.on_verdict(run.intervals[0], verdict(verifier, run, [(first[0], "pass"), (first[1], "fail")]))
    assert run.rewind_point() == (0, [1])
    spare = participant("vol2", tmp_path)
    register_volunteer(run.coord, spare, "node2", 800_000, STAKE)
    run.coord.rewind(JOB, 0)
    workers = [vols[0], spare]
    assignments = tuple(run.coord.assign(JOB, r, w.address, f"node{r * 2}").to_json() for r, w in enumerate(workers))
    run.restart(0, [w.address for w in workers], assignments, Inbox(), time.monotonic())
    assert run.rewinds[0].failed_ranks == {"0-4": [1]} and run.rewinds[0].replaced == {
        1: (vols[1].address, spare.address)
    }
    rejected = run.counts["rejected"]
    run.on_receipt(0, first[0].to_json(), np.zeros((4, POLICY.verification.sketch_buckets)))
    assert run.counts["rejected"] == rejected + 1 and run.intervals[0].receipts == {}
    again = deliver(run, workers, 0)
    assert [run.intervals[0].receipts[r].digest for r in (0, 1)] == [r.digest for r in again]
    run.intervals[0].pending = None
    run.on_verdict(run.intervals[0], verdict(verifier, run, [(again[0], "pass"), (again[1], "pass")]))
    assert run.intervals[0].outcome == "passed" and run.intervals[0].settled
    assert run.coord.ledger.audit() == []
