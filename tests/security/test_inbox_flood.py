"""A rank flooding the head's inbox never drops nor blocks a co-worker's receipt (the inbox's own
rules, without Ray; the cluster run is in test_hostile_parties.py)."""

from __future__ import annotations

import numpy as np
import pytest
from eth_account import Account

from gpucoin.runtime.inbox import MAX_PENDING_PER_RANK, InboxConfig, JobInbox, ProgressEvent, ReceiptEvent
from gpucoin.verify.commitment import sketch_root
from gpucoin.wallet.messages import ZERO_BYTES32, Domain, sign

DOMAIN = Domain(31337, "0x" + "11" * 20)
HONEST, ATTACKER = Account.from_key("0x" + "01" * 32), Account.from_key("0x" + "02" * 32)
K, B = 4, 16
CONFIG = InboxConfig("job-1", DOMAIN.as_dict(), (HONEST.address, ATTACKER.address), K, B, 100)


def receipt(account, rank: int, start: int = 0, job: str = "job-1", nonce: int = 1) -> tuple[str, np.ndarray, list]:
    sk = np.random.default_rng(start + rank).normal(size=(K, B))
    msg = {
        "jobId": job,
        "worker": account.address,
        "rank": rank,
        "stepStart": start,
        "stepEnd": start + K,
        "samples": 128,
        "computeTimeMs": 10,
        "sketchRoot": sketch_root(start, sk),
        "checkpointHash": "0x" + "ab" * 32,
        "previousReceipt": ZERO_BYTES32,
        "nonce": nonce,
    }
    return sign(account, "WorkReceipt", DOMAIN, msg).to_json(), sk, [1.0] * K


def flood(inbox: JobInbox, n: int) -> None:
    """Everything the attacker (rank 1) can send in ``n`` rounds, none of it a valid rank-0 receipt."""
    own_json, own_sk, losses = receipt(ATTACKER, 1)
    as_rank0_json, _, _ = receipt(ATTACKER, 0)
    for i in range(n):
        inbox.submit_receipt(0, as_rank0_json, own_sk, losses)  # its own key, a co-worker's rank
        inbox.submit_receipt(0, own_json, own_sk, losses)
        inbox.submit_receipt(1, own_json + " " * 100_000, own_sk, losses)
        inbox.submit_receipt(1, own_json, np.zeros((K, B * 64)), losses)
        inbox.submit_receipt(1, own_json, own_sk.astype(np.float32), losses)
        inbox.submit_receipt(1, own_json, own_sk, ["x"] * K)
        inbox.submit_receipt(1, "{" * 5000, own_sk, losses)
        inbox.submit_receipt(1, receipt(ATTACKER, 1, job="job-2")[0], own_sk, losses)
        inbox.submit_receipt(7, own_json, own_sk, losses)
        inbox.submit_receipt(True, own_json, own_sk, losses)
        inbox.submit_receipt(1, receipt(ATTACKER, 1, nonce=i + 2)[0], own_sk, losses)  # fills only its own queue
        inbox.progress(10**9, float("nan"), 0.0)


def test_a_flood_from_one_rank_never_drops_nor_blocks_a_co_workers_receipt() -> None:
    inbox = JobInbox(CONFIG)
    honest_json, sk, losses = receipt(HONEST, 0)
    assert inbox.submit_receipt(0, honest_json, sk, losses).accepted
    flood(inbox, 2000)
    later_json, later_sk, _ = receipt(HONEST, 0, start=K, nonce=2)
    assert inbox.submit_receipt(0, later_json, later_sk, losses).accepted
    events = inbox.poll()
    rank0 = [ev.receipt_json for ev in events if isinstance(ev, ReceiptEvent) and ev.rank == 0]
    assert rank0 == [honest_json, later_json]
    rank1 = [ev for ev in events if isinstance(ev, ReceiptEvent) and ev.rank == 1]
    assert len(rank1) == MAX_PENDING_PER_RANK  # the attacker's own queue is all it filled
    assert not [ev for ev in events if isinstance(ev, ProgressEvent)]
    assert inbox.refused == 2000 * 11 - MAX_PENDING_PER_RANK


@pytest.mark.parametrize(
    "args, reason",
    [
        ((0, *receipt(ATTACKER, 0)), "signer|expected"),
        ((1, receipt(ATTACKER, 1)[0] + " " * 9000, *receipt(ATTACKER, 1)[1:]), "at most 8192"),
        ((1, receipt(ATTACKER, 1)[0], np.zeros((K + 1, B)), [1.0] * (K + 1)), r"\(steps <= 4, 16\)"),
        ((1, receipt(ATTACKER, 1)[0], np.zeros((K, B)), [1.0] * (K - 1)), "one per step"),
        ((1, receipt(ATTACKER, 1, job="job-2")[0], *receipt(ATTACKER, 1)[1:]), "names job 'job-2'"),
        ((2, *receipt(ATTACKER, 1)), "no rank 2"),
    ],
)
def test_each_hostile_submission_is_refused_with_its_reason_and_nothing_kept(args, reason) -> None:
    inbox = JobInbox(CONFIG)
    reply = inbox.submit_receipt(*args)
    assert not reply.accepted and not reply.busy  # refused for what it is: trying again will not help
    assert __import__("re").search(reason, reply.reason), reply.reason
    assert inbox.poll() == []


def test_a_rank_ahead_of_the_coordinator_is_told_busy_and_its_receipt_taken_later() -> None:
    inbox = JobInbox(CONFIG)
    queued = [receipt(ATTACKER, 1, nonce=n + 2) for n in range(MAX_PENDING_PER_RANK)]
    assert all(inbox.submit_receipt(1, *r).accepted for r in queued)
    one_more = receipt(ATTACKER, 1, nonce=99)
    reply = inbox.submit_receipt(1, *one_more)
    assert not reply.accepted and reply.busy and "waiting" in reply.reason
    assert len(inbox.poll()) == MAX_PENDING_PER_RANK  # the coordinator takes what waits ...
    assert inbox.submit_receipt(1, *one_more).accepted  # ... and the rank's retry goes in


def test_progress_keeps_only_the_latest_report() -> None:
    inbox = JobInbox(CONFIG)
    for step in range(1, 51):
        inbox.progress(step, 2.5, 1e-3)
    inbox.progress(0, 1.0, 1e-3)
    assert inbox.poll() == [ProgressEvent(50, 2.5, 1e-3)]
    assert inbox.poll() == []
