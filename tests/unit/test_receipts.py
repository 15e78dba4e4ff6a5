"""The coordinator's admission rules for WorkReceipts and their sketches (pure, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from eth_account import Account

from gpucoin.coordinator.receipts import ReceiptRejected, check_receipt
from gpucoin.verify.commitment import sketch_root
from gpucoin.wallet.messages import ZERO_BYTES32, Domain, sign

DOMAIN = Domain(31337, "0x" + "11" * 20)
WORKER = Account.from_key("0x" + "01" * 32)
OTHER = Account.from_key("0x" + "02" * 32)
K, B = 4, 16


def _receipt(account=WORKER, sketches=None, step_start=8, previous=ZERO_BYTES32, rank=1, job="job-1", domain=DOMAIN):
    sk = np.arange(K * B, dtype=np.float64).reshape(K, B) if sketches is None else sketches
    msg = {
        "jobId": job,
        "worker": account.address,
        "rank": rank,
        "stepStart": step_start,
        "stepEnd": step_start + K,
        "samples": 128,
        "computeTimeMs": 1000,
        "sketchRoot": sketch_root(step_start, np.nan_to_num(sk).astype(np.float64)),
        "checkpointHash": "0x" + "ab" * 32,
        "previousReceipt": previous,
        "nonce": 7,
    }
    return sign(account, "WorkReceipt", domain, msg), sk


def _check(receipt, sk, **kw):
    args = dict(
        job_id="job-1",
        rank=1,
        worker=WORKER.address,
        step_start=8,
        step_end=8 + K,
        buckets=B,
        samples=128,
        elapsed_ms=5000,
        previous_digest=None,
        already_have=False,
        domain=DOMAIN,
    )
    args.update(kw)
    check_receipt(receipt, sk, **args)


def test_a_good_receipt_is_admitted():
    _check(*_receipt())


@pytest.mark.parametrize(
    "make, kw, match",
    [
        (lambda: _receipt(account=OTHER), {}, "signer|expected"),
        (lambda: _receipt(domain=Domain(1, "0x" + "11" * 20)), {}, "domain"),
        (lambda: _receipt(job="job-2"), {}, "expected 'job-1'"),
        (lambda: _receipt(rank=0), {}, "rank"),
        (lambda: _receipt(step_start=12), {}, "covers steps 12-16"),
        (lambda: _receipt(), {"already_have": True}, "already sent"),
        (lambda: _receipt(), {"previous_digest": "0x" + "cd" * 32}, "does not chain"),
        (lambda: _receipt(), {"samples": 256}, "claims 128 samples, the spec gives 256"),
        (lambda: _receipt(), {"elapsed_ms": -10}, "claims 1000 ms of compute, only -10 ms"),
        (lambda: _receipt(sketches=np.zeros((K, B + 1))), {}, "must be a"),
        (lambda: _receipt(sketches=np.zeros((K, B), dtype=np.float32)), {}, "must be a"),
        (lambda: _receipt(sketches=np.full((K, B), np.nan)), {}, "NaN"),
    ],
)
def test_refused_receipts(make, kw, match):
    receipt, sk = make()
    with pytest.raises(ReceiptRejected, match=match):
        _check(receipt, sk, **kw)


def test_sketches_that_do_not_hash_to_the_signed_root_are_refused():
    receipt, sk = _receipt()
    tampered = sk.copy()
    tampered[0, 0] += 1.0
    with pytest.raises(ReceiptRejected, match="sketch root"):
        _check(receipt, tampered)
