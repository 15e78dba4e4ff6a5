"""A node's signing process signs only its own assigned (job, rank) receipts, in step order, once;
never another kind of message; and its password never passes through an environment."""

from __future__ import annotations

import os

import pytest
from eth_account import Account

from gpucoin.wallet.keystore import DEV_PASSWORD, dev_account
from gpucoin.wallet.messages import Domain, sign, verify
from gpucoin.wallet.signer import SignerClient, SigningRefused, SigningScope, start_signer

DOMAIN = Domain(chain_id=31337, verifying_contract="0x" + "5e" * 20)
COORD = Account.from_key("0x" + "0c" * 32)
ME = Account.from_key("0x" + "01" * 32)
OTHER = Account.from_key("0x" + "02" * 32)


def assignment(job="job-a", rank=0, provider=ME.address, from_step=0, signer=COORD, domain=DOMAIN) -> str:
    msg = {"jobId": job, "rank": rank, "provider": provider, "nodeId": "n0", "fromStep": from_step, "nonce": 1}
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
    return SigningScope(ME.address, COORD.address, DOMAIN, role)


def test_an_assigned_rank_gets_its_receipts_in_step_order() -> None:
    s = scope()
    s.admit("WorkReceipt", receipt(start=0, end=4), assignment())
    s.admit("WorkReceipt", receipt(start=4, end=8), assignment())
    assert s.next_start == {("job-a", 0): 8}


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


@pytest.mark.parametrize("kind", ["NodeRegistration", "Unbond", "Withdraw", "JobOrder", "Faucet", "Assignment"])
def test_no_other_message_kind_is_signed(kind) -> None:
    for role in ("volunteer", "verifier"):
        with pytest.raises(SigningRefused, match="never signs"):
            scope(role).admit(kind, {}, assignment())


def test_reports_only_from_a_verifier_and_only_in_its_own_name() -> None:
    report = {"verifier": ME.address, "receiptDigest": "0x" + "11" * 32, "verdict": "pass", "distanceE9": 0}
    with pytest.raises(SigningRefused, match="does not sign VerificationReports"):
        scope("volunteer").admit("VerificationReport", report, None)
    with pytest.raises(SigningRefused, match="its verifier"):
        scope("verifier").admit("VerificationReport", {**report, "verifier": OTHER.address}, None)
    scope("verifier").admit("VerificationReport", report, None)
    with pytest.raises(SigningRefused, match="does not sign WorkReceipts"):
        scope("verifier").admit("WorkReceipt", receipt(), assignment())


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
            client._call({"op": "sign", "type": "WorkReceipt", "message": {"x": "y" * 70_000}})
        assert client.address == acct.address  # still serving after the refusals
    finally:
        proc.stop()


def test_a_wrong_password_does_not_start_a_signer(tmp_path) -> None:
    dev_account("vol0", tmp_path / "wallets")
    with pytest.raises(Exception, match="did not start"):
        start_signer(tmp_path / "wallets" / "vol0.json", "wrong", tmp_path / "s.sock", COORD.address, DOMAIN)
