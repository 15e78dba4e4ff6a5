"""The ledger's admission rules as a pure function of what it holds (gpucoin.ledger.admission)."""

from __future__ import annotations

import pytest

from gpucoin.exceptions import (
    ConflictError,
    DomainMismatch,
    MessageExpired,
    NoGenesis,
    ReceiptOutOfOrder,
    UnknownParty,
)
from gpucoin.ledger.admission import Admission, AssignmentHead, ReceiptHead, ReceiptKey, superseded
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy
from gpucoin.wallet.messages import ZERO_BYTES32

POLICY = load_policy(SHIPPED_POLICIES_DIR / "local.toml")
DOMAIN = {"name": "gpucoin", "version": "1", "chainId": 31337, "verifyingContract": "0x" + "11" * 20}
COORDINATOR = DOMAIN["verifyingContract"]
ADMIN = "0x" + "33" * 20
WORKER = "0x" + "22" * 20
OTHER = "0x" + "44" * 20


def digest(i: int) -> str:
    return "0x" + f"{i:064x}"


def genesis(**over) -> dict:
    return {
        "coordinator": COORDINATOR,
        "admin": ADMIN,
        "chainId": 31337,
        "dev": True,
        "policyHash": digest(7),
        "startTime": 100,
        "allocations": [],
        **over,
    }


def market(now_s: int = 100, dev: bool = True) -> Admission:
    """An admission state past a Genesis, with job 'j' (2 ranks) and WORKER registered as node 'n1'."""
    a = Admission(domain=None, now_s=now_s, empty=True)
    a.admit_genesis(DOMAIN, genesis(dev=dev, startTime=min(now_s, 100)), digest(100), POLICY)
    a.admit("JobOrder", DOMAIN, {"jobId": "j", "workers": 2, "deadline": 10**9}, digest(101), OTHER)
    a.admit("NodeRegistration", DOMAIN, {"provider": WORKER, "nodeId": "n1", "deadline": 10**9}, digest(102), WORKER)
    return a


def assignment(rank: int = 0, provider: str = WORKER, node: str = "n1", start: int = 0, job: str = "j") -> dict:
    return {"jobId": job, "rank": rank, "provider": provider, "nodeId": node, "fromStep": start}


def receipt(start: int, end: int, previous: str = ZERO_BYTES32, rank: int = 0, worker: str = WORKER) -> dict:
    return {
        "jobId": "j",
        "worker": worker,
        "rank": rank,
        "stepStart": start,
        "stepEnd": end,
        "previousReceipt": previous,
    }


# -- Genesis ---------------------------------------------------------------------------------


def test_nothing_is_admitted_before_a_genesis_and_a_genesis_only_first() -> None:
    with pytest.raises(NoGenesis, match="no Genesis yet"):
        Admission(domain=None, now_s=0, empty=True).admit("Faucet", DOMAIN, {}, digest(1), COORDINATOR)
    with pytest.raises(NoGenesis, match="first message"):
        Admission(domain=None, now_s=100, empty=False).admit_genesis(DOMAIN, genesis(), digest(1), POLICY)
    a = market()
    with pytest.raises(NoGenesis, match="first message"):
        a.admit_genesis(DOMAIN, genesis(), digest(2), POLICY)
    with pytest.raises(NoGenesis, match="only as a ledger's first message"):
        a.admit("Genesis", DOMAIN, genesis(), digest(2), COORDINATOR)


@pytest.mark.parametrize(
    ("over", "error", "why"),
    [
        ({"coordinator": OTHER}, UnknownParty, "not the domain's verifyingContract"),
        ({"chainId": 1}, DomainMismatch, "differs from its domain's"),
        ({"startTime": 101}, ConflictError, "in the future"),
        (
            {"allocations": [{"recipient": WORKER, "amount": 1}, {"recipient": WORKER, "amount": 2}]},
            ConflictError,
            "twice",
        ),
        ({"allocations": [{"recipient": WORKER, "amount": 0}]}, ConflictError, "of 0"),
        (
            {"allocations": [{"recipient": WORKER, "amount": POLICY.tokenomics.hard_cap_ugpc + 1}]},
            ConflictError,
            "hard cap",
        ),
    ],
)
def test_a_bad_genesis_is_refused(over: dict, error: type, why: str) -> None:
    with pytest.raises(error, match=why):
        Admission(domain=None, now_s=100, empty=True).admit_genesis(DOMAIN, genesis(**over), digest(1), POLICY)


# -- every message ---------------------------------------------------------------------------


def test_domain_must_be_the_markets_and_the_error_names_the_field() -> None:
    with pytest.raises(DomainMismatch, match=r"chainId=1\); this ledger's domain has chainId=31337"):
        market().admit("Faucet", {**DOMAIN, "chainId": 1}, {}, digest(1), COORDINATOR)


@pytest.mark.parametrize("kind", ["JobOrder", "NodeRegistration"])
def test_deadline_is_inclusive(kind: str) -> None:
    message = {"jobId": "k", "workers": 1, "provider": WORKER, "nodeId": "n2", "deadline": 200}
    market(now_s=200).admit(kind, DOMAIN, message, digest(1), WORKER)
    with pytest.raises(MessageExpired, match="passed 1 s ago"):
        market(now_s=201).admit(kind, DOMAIN, message, digest(1), WORKER)


def test_one_order_per_job() -> None:
    with pytest.raises(ConflictError, match=f"already has a JobOrder \\({digest(101)}\\)"):
        market().admit("JobOrder", DOMAIN, {"jobId": "j", "workers": 1, "deadline": 10**9}, digest(2), WORKER)


@pytest.mark.parametrize("kind", ["Settlement", "Faucet", "Assignment", "EpochClose"])
def test_only_the_markets_coordinator_signs_coordinator_messages(kind: str) -> None:
    with pytest.raises(UnknownParty, match=f"signed by {WORKER}, not by this market's coordinator {COORDINATOR}"):
        market().admit(kind, DOMAIN, {}, digest(1), WORKER)


def test_only_the_admin_changes_the_policy_and_only_a_dev_market_has_a_faucet() -> None:
    market().admit("PolicyChange", DOMAIN, {}, digest(1), ADMIN)
    with pytest.raises(UnknownParty, match="not by this market's admin"):
        market().admit("PolicyChange", DOMAIN, {}, digest(1), COORDINATOR)
    market(dev=True).admit("Faucet", DOMAIN, {}, digest(1), COORDINATOR)
    with pytest.raises(UnknownParty, match="not dev"):
        market(dev=False).admit("Faucet", DOMAIN, {}, digest(1), COORDINATOR)


# -- assignments and receipts ----------------------------------------------------------------


def test_an_assignment_names_a_known_job_rank_and_registered_node() -> None:
    cases = [
        (assignment(job="nope"), UnknownParty, "no JobOrder for job 'nope'"),
        (assignment(rank=2), UnknownParty, "rank 2 of job 'j', which has 2 ranks"),
        (assignment(provider=OTHER), UnknownParty, "no recorded NodeRegistration of node 'n1'"),
        (assignment(node="n9"), UnknownParty, "no recorded NodeRegistration of node 'n9'"),
    ]
    for message, error, why in cases:
        with pytest.raises(error, match=why):
            market().admit("Assignment", DOMAIN, message, digest(1), COORDINATOR)
    a = market()
    with pytest.raises(ConflictError, match="leave steps nobody may receipt"):
        a.admit("Assignment", DOMAIN, assignment(start=4), digest(1), COORDINATOR)
    a.admit("Assignment", DOMAIN, assignment(), digest(1), COORDINATOR)
    assert a.assignments[("j", 0)] == AssignmentHead(WORKER, "n1", 0, digest(1))
    a.admit("Assignment", DOMAIN, assignment(), digest(2), COORDINATOR)  # a replacement before any receipt


def test_a_receipt_comes_only_from_the_provider_its_rank_is_assigned_to() -> None:
    a = market()
    a.admit("NodeRegistration", DOMAIN, {"provider": OTHER, "nodeId": "n2", "deadline": 10**9}, digest(3), OTHER)
    with pytest.raises(UnknownParty, match="has no recorded Assignment"):
        a.admit("WorkReceipt", DOMAIN, receipt(0, 4), digest(1), WORKER)
    a.admit("Assignment", DOMAIN, assignment(), digest(4), COORDINATOR)
    with pytest.raises(UnknownParty, match=f"assigned to {WORKER}"):
        a.admit("WorkReceipt", DOMAIN, receipt(0, 4, worker=OTHER), digest(1), OTHER)
    a.admit("WorkReceipt", DOMAIN, receipt(0, 4), digest(5), WORKER)
    with pytest.raises(ConflictError, match="reassign receipted steps"):
        a.admit("Assignment", DOMAIN, assignment(provider=OTHER, node="n2", start=2), digest(6), COORDINATOR)
    a.admit("Assignment", DOMAIN, assignment(provider=OTHER, node="n2", start=4), digest(6), COORDINATOR)
    with pytest.raises(UnknownParty, match=f"assigned to {OTHER} from step 4"):  # WORKER was replaced
        a.admit("WorkReceipt", DOMAIN, receipt(4, 8, digest(5)), digest(7), WORKER)
    a.admit("WorkReceipt", DOMAIN, receipt(4, 8, digest(5), worker=OTHER), digest(7), OTHER)


def test_receipts_tile_each_rank_from_zero_and_chain() -> None:
    a = market()
    a.admit("Assignment", DOMAIN, assignment(rank=0), digest(10), COORDINATOR)
    a.admit("Assignment", DOMAIN, assignment(rank=1), digest(11), COORDINATOR)
    with pytest.raises(ReceiptOutOfOrder, match="empty"):
        a.admit("WorkReceipt", DOMAIN, receipt(0, 0), digest(1), WORKER)
    a.admit("WorkReceipt", DOMAIN, receipt(0, 4), digest(1), WORKER)
    a.admit("WorkReceipt", DOMAIN, receipt(0, 4, rank=1), digest(2), WORKER)  # another rank starts its own chain
    for bad, why in [
        (receipt(2, 6, digest(1)), "overlaps"),
        (receipt(5, 8, digest(1)), "gap"),
        (receipt(4, 8, digest(2)), "is not job 'j' rank 0's latest receipt"),
    ]:
        with pytest.raises(ReceiptOutOfOrder, match=why):
            a.admit("WorkReceipt", DOMAIN, bad, digest(9), WORKER)
    a.admit("WorkReceipt", DOMAIN, receipt(4, 8, digest(1)), digest(3), WORKER)
    assert a.receipt_heads[("j", 0)] == ReceiptHead(8, digest(3))
    assert a.receipts == {
        ReceiptKey("j", 0, 0, 0): (4, digest(1)),
        ReceiptKey("j", 1, 0, 0): (4, digest(2)),
        ReceiptKey("j", 0, 4, 0): (8, digest(3)),
    }


# -- references ------------------------------------------------------------------------------


def test_reports_settlements_unbonds_name_what_the_ledger_holds() -> None:
    a = market()
    a.admit("Assignment", DOMAIN, assignment(), digest(10), COORDINATOR)
    a.admit("WorkReceipt", DOMAIN, receipt(0, 4), digest(11), WORKER)
    report = {"verifier": OTHER, "receiptDigest": digest(11), "verdict": "fail"}
    with pytest.raises(UnknownParty, match="no recorded WorkReceipt"):
        a.admit("VerificationReport", DOMAIN, {**report, "receiptDigest": digest(101)}, digest(1), OTHER)
    a.admit("VerificationReport", DOMAIN, report, digest(12), OTHER)
    assert a.reported[digest(12)] == (digest(11), OTHER, "fail")
    for subject in (digest(11), digest(12), digest(101)):  # a receipt, a report of it, the order: all of job 'j'
        a.admit("Settlement", DOMAIN, {"jobId": "j", "subject": subject}, digest(int(subject, 16) + 1000), COORDINATOR)
    with pytest.raises(UnknownParty, match="its subject is of job 'j'"):
        a.admit("Settlement", DOMAIN, {"jobId": "k", "subject": digest(11)}, digest(2), COORDINATOR)
    with pytest.raises(UnknownParty, match="is no recorded"):
        a.admit("Settlement", DOMAIN, {"jobId": "j", "subject": digest(102)}, digest(2), COORDINATOR)  # a registration
    a.admit("Unbond", DOMAIN, {"provider": WORKER}, digest(3), WORKER)
    with pytest.raises(UnknownParty, match="no recorded NodeRegistration"):
        a.admit("Withdraw", DOMAIN, {"provider": OTHER}, digest(4), OTHER)


def test_superseded_is_a_later_rewind_to_the_receipts_first_step_or_earlier() -> None:
    assert not superseded(0, 10, [])
    assert superseded(0, 10, [10]) and superseded(0, 10, [0]) and not superseded(0, 10, [20])
    assert not superseded(1, 10, [10])  # recorded after that rewind: the re-run itself
    assert superseded(1, 10, [10, 5]) and not superseded(2, 10, [10, 5])


def rewind(to_step: int) -> dict:
    return {"coordinator": COORDINATOR, "jobId": "j", "toStep": to_step}


def test_a_rewind_supersedes_the_ranks_receipts_from_its_step_and_they_go_on_from_there() -> None:
    """Two ranks trained 0-4 and 4-8; a Rewind to 4 lets them receipt 4-8 again, chained to their
    receipts ending at 4; the superseded chain cannot go on; a Rewind goes back only to where
    every rank's live receipts end, and must supersede something."""
    a = market()
    a.admit("Assignment", DOMAIN, assignment(0), digest(103), COORDINATOR)
    a.admit("Assignment", DOMAIN, assignment(1), digest(104), COORDINATOR)
    a.admit("WorkReceipt", DOMAIN, receipt(0, 4), digest(1), WORKER)
    a.admit("WorkReceipt", DOMAIN, receipt(0, 4, rank=1), digest(2), WORKER)
    a.admit("WorkReceipt", DOMAIN, receipt(4, 8, digest(1)), digest(3), WORKER)
    a.admit("WorkReceipt", DOMAIN, receipt(4, 8, digest(2), rank=1), digest(4), WORKER)
    with pytest.raises(UnknownParty, match="not by this market's coordinator"):
        a.admit("Rewind", DOMAIN, rewind(4), digest(10), WORKER)
    with pytest.raises(ConflictError, match="rank 0 has no live receipt ending at step 6"):
        a.admit("Rewind", DOMAIN, rewind(6), digest(10), COORDINATOR)
    with pytest.raises(ConflictError, match="supersedes nothing"):
        a.admit("Rewind", DOMAIN, rewind(8), digest(10), COORDINATOR)
    with pytest.raises(UnknownParty, match="no JobOrder for job 'k'"):
        a.admit("Rewind", DOMAIN, {**rewind(4), "jobId": "k"}, digest(10), COORDINATOR)
    a.admit("Rewind", DOMAIN, rewind(4), digest(10), COORDINATOR)
    assert a.rewound[digest(10)] == ("j", 1, 4) and a.rewind_steps["j"] == [4]
    assert a.receipt_heads[("j", 0)] == ReceiptHead(4, digest(1))
    with pytest.raises(ReceiptOutOfOrder, match="the next must start at step 4"):  # the superseded chain ends
        a.admit("WorkReceipt", DOMAIN, receipt(8, 12, digest(3)), digest(11), WORKER)
    a.admit("WorkReceipt", DOMAIN, receipt(4, 8, digest(1)), digest(11), WORKER)  # 4-8 again
    assert a.receipts[ReceiptKey("j", 0, 4, 1)] == (8, digest(11))
    a.admit("Rewind", DOMAIN, rewind(0), digest(12), COORDINATOR)  # back to the start: no receipt is live
    assert ("j", 0) not in a.receipt_heads and ("j", 1) not in a.receipt_heads
    with pytest.raises(ConflictError, match="rank 0 has no live receipt ending at step 4"):
        a.admit("Rewind", DOMAIN, rewind(4), digest(13), COORDINATOR)  # what ends at 4 is superseded
    a.admit("WorkReceipt", DOMAIN, receipt(0, 4), digest(13), WORKER)
    assert a.receipts[ReceiptKey("j", 0, 0, 2)] == (4, digest(13))
