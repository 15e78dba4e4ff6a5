"""``gpucoin pull`` takes the checkpoint hashes only from receipts signed by their workers, of this
job, for the step pulled, one per rank in order."""

from __future__ import annotations

import pytest
from eth_account import Account

from gpucoin.exceptions import SignatureError
from gpucoin.head.pull import _checked_receipts
from gpucoin.wallet.messages import Domain, SignedMessage, sign

DOMAIN = Domain(chain_id=31337, verifying_contract=Account.from_key(b"\x02" * 32).address)
W0, W1 = Account.from_key(b"\x04" * 32), Account.from_key(b"\x06" * 32)
Z = "0x" + "00" * 32


def receipt(worker, rank: int, job: str = "job-1", end: int = 8, domain: Domain = DOMAIN) -> str:
    return sign(
        worker,
        "WorkReceipt",
        domain,
        {
            "jobId": job,
            "worker": worker.address,
            "rank": rank,
            "stepStart": end - 4,
            "stepEnd": end,
            "samples": 64,
            "computeTimeMs": 10,
            "sketchRoot": Z,
            "checkpointHash": "0x" + f"{rank + 1:02x}" * 32,
            "previousReceipt": Z,
            "nonce": 1 + rank,
        },
    ).to_json()


def test_receipts_of_the_job_step_and_ranks_pass():
    got = _checked_receipts([receipt(W0, 0), receipt(W1, 1)], "job-1", 8, 2, DOMAIN)
    assert [r.message["checkpointHash"][:4] for r in got] == ["0x01", "0x02"]


@pytest.mark.parametrize(
    "texts, why",
    [
        (lambda: [receipt(W0, 0)], "2 ranks"),
        (lambda: [receipt(W1, 1), receipt(W0, 0)], "rank 0"),
        (lambda: [receipt(W0, 0, job="other"), receipt(W1, 1)], "not job job-1"),
        (lambda: [receipt(W0, 0, end=4), receipt(W1, 1)], "for step 8"),
        (
            lambda: [
                receipt(W0, 0, domain=Domain(chain_id=1, verifying_contract=DOMAIN.verifying_contract)),
                receipt(W1, 1),
            ],
            "domain",
        ),
    ],
    ids=["too-few", "ranks-swapped", "other-job", "other-step", "other-market"],
)
def test_receipts_that_do_not_name_this_checkpoint_are_refused(texts, why):
    with pytest.raises(SignatureError, match=why):
        _checked_receipts(texts(), "job-1", 8, 2, DOMAIN)


def test_a_receipt_signed_by_someone_else_than_its_worker_is_refused():
    forged = SignedMessage.from_json(receipt(W0, 0))
    other = SignedMessage.from_json(receipt(W1, 0))
    swapped = SignedMessage.from_dict({**forged.to_dict(), "signature": other.signature, "signer": other.signer})
    with pytest.raises(SignatureError):
        _checked_receipts([swapped.to_json(), receipt(W1, 1)], "job-1", 8, 2, DOMAIN)
