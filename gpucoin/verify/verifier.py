"""What a verifier node does for one drawn interval: check the checkpoint, replay, compare, sign.

Runs as a Ray task on a node that is not one of the job's workers; it signs one
VerificationReport per receipt with that node's own key.
"""

from __future__ import annotations

import os

import numpy as np

from gpucoin.exceptions import VerificationError
from gpucoin.wallet.nonces import NonceSource

_NONCES = NonceSource()


def check_interval(
    spec_dict: dict,
    data_source: str,
    ckpt_dir: str,
    step_start: int,
    step_end: int,
    buckets: int,
    committed: np.ndarray,
    receipt_digests: list[str],
    start_hash: str | None,
    tolerance: float,
    domain: dict,
) -> dict:
    """Replay [step_start, step_end) and judge each rank's committed sketches.

    Args:
        committed: (W, K, B) sketches the ranks committed to (their sketch roots were checked on arrival).
        receipt_digests: each rank's WorkReceipt digest, rank order.
        start_hash: content hash the previous interval's receipts named for the start checkpoint
            (None for step 0, whose state the replay derives from the spec's seed: no worker's
            file is read for it).
        tolerance: the policy's ``tolerance_rel_l2``.

    Returns:
        ``{"reports": [VerificationReport JSON, one per rank, rank order], "verifier": address}``; the
        coordinator judges by these signed reports alone.

    Raises:
        VerificationError: if the start checkpoint is missing or its hash differs from the receipts.
    """
    from gpucoin.runtime.checkpoint import check_hash, tag_for
    from gpucoin.runtime.worker import load_node_account
    from gpucoin.spec import JobSpec
    from gpucoin.verify.compare import compare_interval
    from gpucoin.verify.replay import replay_interval
    from gpucoin.wallet.messages import Domain, distance_e9, sign

    spec = JobSpec.model_validate(spec_dict)
    tag_dir = None  # step 0: the state follows from the spec's seed, no worker's file is read
    if step_start > 0:
        tag_dir = os.path.join(ckpt_dir, tag_for(step_start))
        if not os.path.isdir(tag_dir):
            raise VerificationError(f"start checkpoint {tag_dir} is missing")
        if start_hash is None:
            raise VerificationError(f"no receipt names the hash of the start checkpoint {tag_dir}")
        check_hash(tag_dir, start_hash)
    replayed = replay_interval(spec, data_source, tag_dir, step_start, step_end, buckets)
    verdicts = compare_interval(step_start, committed, replayed, tolerance)
    account = load_node_account()
    reports = []
    for v, digest in zip(verdicts, receipt_digests, strict=True):
        report = sign(
            account,
            "VerificationReport",
            Domain.from_dict(domain),
            {
                "verifier": account.address,
                "receiptDigest": digest,
                "verdict": v.verdict,
                "distanceE9": distance_e9(v.max_distance),
                "nonce": _NONCES.next(),
            },
        )
        reports.append(report.to_json())
    return {
        "reports": reports,
        "verifier": account.address,
    }
