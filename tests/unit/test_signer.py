"""A node's signing process signs only its own assigned (job, rank) receipts, in step order, once;
never another kind of message; and its password never passes through an environment."""

from __future__ import annotations

import os

import numpy as np
import pytest
from eth_account import Account

from gpucoin.verify.commitment import sketch_root
from gpucoin.verify.judgment import Evidence, encode_array
from gpucoin.wallet.keystore import DEV_PASSWORD, dev_account
from gpucoin.wallet.messages import Domain, SignedMessage, sign, verify
from gpucoin.wallet.signer import MAX_REQUEST_BYTES, SignerClient, SigningRefused, SigningScope, start_signer

DOMAIN = Domain(chain_id=31337, verifying_contract="0x" + "5e" * 20)
COORD = Account.from_key("0x" + "0c" * 32)
ME = Account.from_key("0x" + "01" * 32)
OTHER = Account.from_key("0x" + "02" * 32)
TOLERANCE = 1e-3


def assignment(job="job-a", rank=0, provider=ME.address, from_step=0, signer=COORD, domain=DOMAIN, nonce=1) -> str:
    msg = {"jobId": job, "rank": rank, "provider": provider, "nodeId": "n0", "fromStep": from_step, "nonce": nonce}
    return sign(signer, "Assignment", domain, msg).to_json()


def receipt(job="job-a", rank=0, start=0, end=4, worker=ME.address) -> dict:
    return {
        "jobId": job,
        "worker": worker,
        "rank": rank,
        "stepStart": start,
        "stepEnd": end,
        "samples": 64,
        "computeTimeMs": 10,
        "sketchRoot": "0x" + "00" * 32,
        "checkpointHash": "0x" + "00" * 32,
        "previousReceipt": "0x" + "00" * 32,
        "nonce": start + 1,
    }


def scope(role="volunteer") -> SigningScope:
    return SigningScope(ME.address, COORD.address, DOMAIN, role, TOLERANCE if role == "verifier" else None)


def test_an_assigned_rank_gets_its_receipts_in_step_order() -> None:
    s = scope()
    s.admit("WorkReceipt", receipt(start=0, end=4), assignment())
    s.admit("WorkReceipt", receipt(start=4, end=8), assignment())
    assert s.next_start == {SignedMessage.from_json(assignment()).digest: 8}


@pytest.mark.parametrize(
    ("what", "message", "assignment_json", "why"),
    [
        ("another rank", receipt(rank=1), assignment(rank=0), "rank"),
        ("another job", receipt(job="job-b"), assignment(job="job-a"), "job"),
        ("another worker", receipt(worker=OTHER.address), assignment(), "worker"),
        ("no assignment", receipt(), None, "Assignment"),
        ("an assignment of another provider", receipt(), assignment(provider=OTHER.address), "provider"),
        ("an assignment the coordinator did not sign", receipt(), assignment(signer=ME), "verify"),
        (
            "an assignment of another market",
            receipt(),
            assignment(domain=Domain(1, DOMAIN.verifying_contract)),
            "verify",
        ),
        ("steps before the assignment", receipt(start=0), assignment(from_step=4), "start at step 4"),
        ("an empty range", receipt(start=0, end=0), assignment(), "start at step 0"),
    ],
)
def test_out_of_scope_receipts_are_refused(what, message, assignment_json, why) -> None:
    s = scope()
    with pytest.raises(SigningRefused, match=why):
        s.admit("WorkReceipt", message, assignment_json)
    assert s.next_start == {}, what


def test_the_same_steps_are_never_signed_twice() -> None:
    s = scope()
    s.admit("WorkReceipt", receipt(start=0, end=4), assignment())
    for start, end in ((0, 4), (0, 8), (2, 6), (8, 12)):
        with pytest.raises(SigningRefused, match="start at step 4"):
            s.admit("WorkReceipt", receipt(start=start, end=end), assignment())


def test_after_a_rewind_a_new_assignment_signs_its_steps_again_and_the_old_one_goes_on_no_differently() -> None:
    """The ledger admits a second Assignment of a rank only from a coordinator's Rewind on: the
    steps from its ``fromStep`` are signed again under it, once; under the first nothing changes."""
    s = scope()
    first = assignment()
    for start in (0, 4, 8):
        s.admit("WorkReceipt", receipt(start=start, end=start + 4), first)
    again = assignment(from_step=4, nonce=2)
    with pytest.raises(SigningRefused, match="start at step 4"):
        s.admit("WorkReceipt", receipt(start=0, end=4), again)
    s.admit("WorkReceipt", receipt(start=4, end=8), again)
    with pytest.raises(SigningRefused, match="start at step 8"):
        s.admit("WorkReceipt", receipt(start=4, end=8), again)
    with pytest.raises(SigningRefused, match="start at step 12"):
        s.admit("WorkReceipt", receipt(start=4, end=8), first)


@pytest.mark.parametrize("kind", ["NodeRegistration", "Unbond", "Withdraw", "JobOrder", "Faucet", "Assignment"])
def test_no_other_message_kind_is_signed(kind) -> None:
    for role in ("volunteer", "verifier"):
        with pytest.raises(SigningRefused, match="never signs"):
            scope(role).admit(kind, {}, assignment())


def test_a_report_is_signed_only_on_the_signers_own_verdict() -> None:
    report = {"verifier": ME.address, "receiptDigest": "0x" + "11" * 32, "verdict": "fail", "distanceE9": 0}
    for role in ("volunteer", "verifier"):
        with pytest.raises(SigningRefused, match="own verdict"):
            scope(role).admit("VerificationReport", report, None)
    with pytest.raises(SigningRefused, match="does not judge"):
        scope("volunteer").judge(judge_request())
    with pytest.raises(SigningRefused, match="does not sign WorkReceipts"):
        scope("verifier").admit("WorkReceipt", receipt(), assignment())
    with pytest.raises(ValueError, match="tolerance"):
        SigningScope(ME.address, COORD.address, DOMAIN, "verifier")


# -- judging: two workers, one interval of K steps, B buckets ------------------------------
WORKERS = (Account.from_key("0x" + "a1" * 32), Account.from_key("0x" + "a2" * 32))
K, B = 4, 16


def committed_sketches(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, K, B))  # (W, K, B)


def signed_receipts(
    committed: np.ndarray, start: int = 4, job: str = "job-a", signers=WORKERS, previous: list[str] | None = None
) -> list[str]:
    out = []
    for r, w in enumerate(signers):
        msg = {
            **receipt(job=job, rank=r, start=start, end=start + K, worker=WORKERS[r].address),
            "sketchRoot": sketch_root(start, committed[r]),
        }
        if previous:
            msg["previousReceipt"] = previous[r]
        out.append(sign(w, "WorkReceipt", DOMAIN, msg).to_json())
    return out


def judge_request(replayed=None, sketches=None, **changes) -> dict:
    committed = committed_sketches() if sketches is None else sketches
    replayed = committed if replayed is None else replayed
    req = {
        "step_start": 4,
        "committed": encode_array(committed),
        "evidence": Evidence(replayed=replayed).to_dict(),
        "receipts": signed_receipts(committed),
        "start_receipts": [],
        "assignments": [assignment(rank=r, provider=w.address, from_step=0) for r, w in enumerate(WORKERS)],
        "vetted": True,
    }
    req.update(changes)
    return req


def test_the_verifier_signer_judges_by_its_own_comparison() -> None:
    s = scope("verifier")
    honest = s.judge(judge_request())
    assert [f.verdict for f in honest] == ["pass", "pass"]
    # rank 1's replayed sketch differs from what it committed: rank 1 fails (a fresh replay agrees)
    committed = committed_sketches(1)
    replayed = committed.copy()
    replayed[1, 0] += 1.0
    ev = Evidence(replayed=replayed, replayed_again=replayed, end_checks_again=())
    found = s.judge(judge_request(sketches=committed, evidence=ev.to_dict()))
    assert [f.verdict for f in found] == ["pass", "fail"]
    # without a reproduction the conviction names nobody; and in an unvetted job a fail is void
    for seed, changes, expected in ((2, {}, ["void", "void"]), (3, {"vetted": False}, ["pass", "void"])):
        committed = committed_sketches(seed)
        replayed = committed.copy()
        replayed[1, 0] += 1.0
        again = {} if not changes else {"replayed_again": replayed, "end_checks_again": ()}
        ev = Evidence(replayed=replayed, **again)
        found = s.judge(judge_request(sketches=committed, evidence=ev.to_dict(), **changes))
        assert [f.verdict for f in found] == expected


@pytest.mark.parametrize(
    ("what", "changes", "why"),
    [
        ("sketches that are not the committed ones", {"committed": encode_array(committed_sketches(9))}, "sketchRoot"),
        (
            "a receipt signed by another key",
            {"receipts": signed_receipts(committed_sketches(), signers=WORKERS[::-1])},
            "rank 0",
        ),
        ("a receipt of another job", {"receipts": signed_receipts(committed_sketches(), job="job-b")}, "job"),
        ("an interval other than the receipts'", {"step_start": 8}, "steps"),
        (
            "an assignment the coordinator did not sign",
            {"assignments": [assignment(rank=r, provider=w.address, signer=ME) for r, w in enumerate(WORKERS)]},
            "verify",
        ),
        (
            "assignments out of rank order",
            {"assignments": [assignment(rank=1 - r, provider=w.address) for r, w in enumerate(WORKERS)]},
            "expected",
        ),
        ("no assignments", {"assignments": []}, "assignments"),
    ],
)
def test_a_judge_request_that_does_not_check_out_is_refused(what, changes, why) -> None:
    s = scope("verifier")
    with pytest.raises(SigningRefused, match=why):
        s.judge(judge_request(**changes))
    assert s.judged == set(), what


def test_a_start_fault_fails_the_receipt_the_interval_chains_to() -> None:
    prev = signed_receipts(committed_sketches(6), start=0)  # steps 0-4
    prev_digests = [SignedMessage.from_json(x).digest for x in prev]
    committed = committed_sketches(5)
    cur = signed_receipts(committed, previous=prev_digests)
    ev = Evidence(start_faults={1: "its optimizer file is not what it signed"}).to_dict()
    found = scope("verifier").judge(judge_request(sketches=committed, receipts=cur, start_receipts=prev, evidence=ev))
    assert [f.verdict for f in found] == ["void", "void", "fail"] and found[2].receipt == prev_digests[1]
    # a start receipt the interval does not chain to (anyone can sign one) is refused
    stranger = signed_receipts(committed_sketches(7), start=0)
    with pytest.raises(SigningRefused, match="chains to"):
        scope("verifier").judge(judge_request(sketches=committed, receipts=cur, start_receipts=stranger, evidence=ev))


def test_a_receipt_is_judged_once() -> None:
    s = scope("verifier")
    s.judge(judge_request())
    with pytest.raises(SigningRefused, match="judged before"):
        s.judge(judge_request())


def test_evidence_that_does_not_fit_is_refused() -> None:
    s = scope("verifier")
    with pytest.raises(ValueError, match="shape"):
        s.judge(judge_request(replayed=np.zeros((2, K, B + 1))))
    with pytest.raises(ValueError, match="do not hold"):
        s.judge(
            judge_request(
                evidence={
                    **Evidence(replayed=committed_sketches()).to_dict(),
                    "replayed": {"shape": [2, K, B], "b64": ""},
                }
            )
        )
    with pytest.raises(ValueError, match="malformed"):
        s.judge(judge_request(evidence={"replayed": None}))
    assert s.judged == set()


def test_the_signing_process_serves_its_scope_over_its_socket(tmp_path) -> None:
    """The real process: password on a pipe (not in its environment), an owner-only socket, scope enforced."""
    acct = dev_account("vol0", tmp_path / "wallets")
    sock = tmp_path / "s.sock"
    proc = start_signer(tmp_path / "wallets" / "vol0.json", DEV_PASSWORD, sock, COORD.address, DOMAIN)
    try:
        assert os.stat(sock).st_mode & 0o077 == 0  # no one but its owner can connect
        environ = open(f"/proc/{proc.process.pid}/environ", "rb").read()
        assert DEV_PASSWORD.encode() not in environ and DEV_PASSWORD not in " ".join(proc.process.args)
        client = SignerClient(str(sock))
        assert client.address == acct.address
        good = client.sign("WorkReceipt", receipt(worker=acct.address), assignment(provider=acct.address))
        assert verify(good, expected_signer=acct.address, domain=DOMAIN) == acct.address
        with pytest.raises(SigningRefused, match="rank"):
            client.sign("WorkReceipt", receipt(rank=1, worker=acct.address), assignment(provider=acct.address))
        with pytest.raises(SigningRefused, match="never signs"):
            client.sign("Unbond", {"provider": acct.address, "amount": 1, "nonce": 1})
        with pytest.raises(SigningRefused, match="over"):
            client._call({"op": "sign", "type": "WorkReceipt", "message": {"x": "y" * (MAX_REQUEST_BYTES + 1)}})
        assert client.address == acct.address  # still serving after the refusals
    finally:
        proc.stop()


def test_a_wrong_password_does_not_start_a_signer(tmp_path) -> None:
    dev_account("vol0", tmp_path / "wallets")
    with pytest.raises(Exception, match="did not start"):
        start_signer(tmp_path / "wallets" / "vol0.json", "wrong", tmp_path / "s.sock", COORD.address, DOMAIN)
