"""The ledger's admission rules as a pure function of what it holds (gpucoin.ledger.admission)."""

from __future__ import annotations

import pytest

from gpucoin.exceptions import ConflictError, DomainMismatch, MessageExpired, ReceiptOutOfOrder, UnknownParty
from gpucoin.ledger.admission import Admission, ReceiptHead
from gpucoin.wallet.messages import ZERO_BYTES32

DOMAIN = {"name": "gpucoin", "version": "1", "chainId": 31337, "verifyingContract": "0x" + "11" * 20}
WORKER = "0x" + "22" * 20
COORDINATOR = DOMAIN["verifyingContract"]


def receipt(start: int, end: int, previous: str = ZERO_BYTES32, job: str = "j", rank: int = 0) -> dict:
    return {"jobId": job, "worker": WORKER, "rank": rank, "stepStart": start, "stepEnd": end, "previousReceipt": previous}


def digest(i: int) -> str:
    return "0x" + f"{i:064x}"


def test_domain_must_be_the_markets_and_the_error_names_the_field() -> None:
    a = Admission(domain=DOMAIN, now_s=0)
    with pytest.raises(DomainMismatch, match=r"chainId=1\); this ledger's domain has chainId=31337"):
        a.admit("Faucet", {**DOMAIN, "chainId": 1}, {}, digest(1), COORDINATOR)
    Admission(domain=None, now_s=0).admit("Faucet", {**DOMAIN, "chainId": 1}, {}, digest(1), WORKER)  # unbound: any


@pytest.mark.parametrize("kind", ["JobOrder", "NodeRegistration"])
def test_deadline_is_inclusive(kind: str) -> None:
    message = {"jobId": "j", "provider": WORKER, "deadline": 100}
    Admission(domain=None, now_s=100).admit(kind, DOMAIN, message, digest(1), WORKER)
    with pytest.raises(MessageExpired, match="passed 1 s ago"):
        Admission(domain=None, now_s=101).admit(kind, DOMAIN, message, digest(1), WORKER)


def test_one_order_per_job() -> None:
    a = Admission(domain=None, now_s=0)
    a.admit("JobOrder", DOMAIN, {"jobId": "j", "deadline": 1}, digest(1), WORKER)
    with pytest.raises(ConflictError, match=f"already has a JobOrder \\({digest(1)}\\)"):
        a.admit("JobOrder", DOMAIN, {"jobId": "j", "deadline": 1}, digest(2), WORKER)


def test_receipts_tile_each_rank_from_zero_and_chain() -> None:
    a = Admission(domain=None, now_s=0, jobs={"j": digest(0)}, nodes={WORKER})
    with pytest.raises(ReceiptOutOfOrder, match="empty"):
        a.admit("WorkReceipt", DOMAIN, receipt(0, 0), digest(1), WORKER)
    a.admit("WorkReceipt", DOMAIN, receipt(0, 4), digest(1), WORKER)
    a.admit("WorkReceipt", DOMAIN, receipt(0, 4, rank=1), digest(2), WORKER)  # another rank starts its own chain
    for bad, why in [(receipt(2, 6, digest(1)), "overlaps"), (receipt(5, 8, digest(1)), "gap"),
                     (receipt(4, 8, digest(2)), "is not job 'j' rank 0's latest receipt")]:
        with pytest.raises(ReceiptOutOfOrder, match=why):
            a.admit("WorkReceipt", DOMAIN, bad, digest(9), WORKER)
    a.admit("WorkReceipt", DOMAIN, receipt(4, 8, digest(1)), digest(3), WORKER)
    assert a.receipt_heads[("j", 0)] == ReceiptHead(8, digest(3))
    assert a.receipts == {("j", 0, 0): (4, digest(1)), ("j", 1, 0): (4, digest(2)), ("j", 0, 4): (8, digest(3))}


def test_receipts_need_a_known_job_and_worker() -> None:
    with pytest.raises(UnknownParty, match="no JobOrder for job 'j'"):
        Admission(domain=None, now_s=0, nodes={WORKER}).admit("WorkReceipt", DOMAIN, receipt(0, 4), digest(1), WORKER)
    with pytest.raises(UnknownParty, match="no recorded NodeRegistration"):
        Admission(domain=None, now_s=0, jobs={"j": digest(0)}).admit("WorkReceipt", DOMAIN, receipt(0, 4), digest(1), WORKER)


@pytest.mark.parametrize("kind", ["Settlement", "Faucet"])
def test_only_the_markets_coordinator_settles_or_mints_dev_funds(kind: str) -> None:
    Admission(domain=DOMAIN, now_s=0).admit(kind, DOMAIN, {}, digest(1), COORDINATOR)
    with pytest.raises(UnknownParty, match=f"signed by {WORKER}, not by this market's coordinator {COORDINATOR}"):
        Admission(domain=DOMAIN, now_s=0).admit(kind, DOMAIN, {}, digest(1), WORKER)
    Admission(domain=None, now_s=0).admit(kind, DOMAIN, {}, digest(1), WORKER)  # an unbound ledger knows no coordinator
