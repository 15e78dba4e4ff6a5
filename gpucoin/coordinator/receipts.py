"""Admission of a rank's WorkReceipt and sketches by the coordinator (pure: no Ray, no I/O).

A receipt is accepted once, for the interval and rank it names, signed by the worker the market
placed on that rank, chained to that rank's previous receipt, with sketches of the right shape,
all finite, that hash to the signed sketch root, claiming exactly the samples the spec gives a
rank per interval and no more compute time than passed on the coordinator's clock since the
interval could start. Anything else is refused before it is recorded.
"""

from __future__ import annotations

import numpy as np

from gpucoin.exceptions import SignatureError
from gpucoin.verify.commitment import sketch_root
from gpucoin.wallet.messages import ZERO_BYTES32, Domain, SignedMessage, verify

COMPUTE_TIME_SLACK_MS = 1000
"""Allowance for the rank's clock running faster than the head's over one interval."""


class ReceiptRejected(SignatureError):
    """A WorkReceipt (or its sketches) the coordinator refuses; nothing was recorded."""


def check_signed(receipt: SignedMessage, *, job_id: str, rank: int, worker: str, domain: Domain) -> None:
    """Raise ``ReceiptRejected`` unless ``receipt`` is a WorkReceipt for ``job_id`` and ``rank``
    signed by ``worker`` in ``domain``: what the head's inbox checks before it keeps anything, and
    the first rules of ``check_receipt``."""
    try:
        verify(receipt, expected_signer=worker, domain=domain)
    except SignatureError as e:
        raise ReceiptRejected(f"rank {rank}: {e}") from None
    if receipt.primary_type != "WorkReceipt":
        raise ReceiptRejected(f"rank {rank}: expected a WorkReceipt, got a {receipt.primary_type}")
    m = receipt.message
    if m["jobId"] != job_id or m["rank"] != rank:
        raise ReceiptRejected(f"receipt names job {m['jobId']!r} rank {m['rank']}, expected {job_id!r} rank {rank}")


def check_receipt(
    receipt: SignedMessage,
    sketches: np.ndarray,
    *,
    job_id: str,
    rank: int,
    worker: str,
    step_start: int,
    step_end: int,
    buckets: int,
    samples: int,
    elapsed_ms: int,
    previous_digest: str | None,
    already_have: bool,
    domain: Domain,
) -> None:
    """Raise ``ReceiptRejected`` naming the first rule ``receipt`` breaks; return None if it is admissible.

    Args:
        sketches: what the rank sent with the receipt, expected (step_end - step_start, buckets) float64.
        worker: address the market placed on ``rank``.
        samples: sequences one rank trains per interval (K x gradient accumulation x micro-batch).
        elapsed_ms: ms on the coordinator's clock since the interval could start (``Meter.elapsed_ms``).
        step_start / step_end: the interval the coordinator expects next from this rank.
        previous_digest: digest of this rank's receipt for the interval before (None for the first).
        already_have: the coordinator already holds a receipt from this rank for this interval.
    """
    check_signed(receipt, job_id=job_id, rank=rank, worker=worker, domain=domain)
    m = receipt.message
    if (m["stepStart"], m["stepEnd"]) != (step_start, step_end):
        raise ReceiptRejected(
            f"rank {rank}: receipt covers steps {m['stepStart']}-{m['stepEnd']}, expected {step_start}-{step_end}"
        )
    if already_have:
        raise ReceiptRejected(f"rank {rank} already sent a receipt for steps {step_start}-{step_end}")
    if m["samples"] != samples:
        raise ReceiptRejected(f"rank {rank}: receipt claims {m['samples']} samples, the spec gives {samples}")
    if m["computeTimeMs"] > elapsed_ms + COMPUTE_TIME_SLACK_MS:
        raise ReceiptRejected(
            f"rank {rank}: receipt claims {m['computeTimeMs']} ms of compute, only {elapsed_ms} ms passed on the "
            "coordinator's clock"
        )
    expected_prev = previous_digest or ZERO_BYTES32
    if m["previousReceipt"] != expected_prev:
        raise ReceiptRejected(f"rank {rank}: previousReceipt {m['previousReceipt']} does not chain to {expected_prev}")
    shape = (step_end - step_start, buckets)
    if not isinstance(sketches, np.ndarray) or sketches.shape != shape or sketches.dtype != np.float64:
        got = getattr(sketches, "shape", type(sketches).__name__)
        raise ReceiptRejected(f"rank {rank}: sketches must be a {shape} float64 array, got {got}")
    if not np.isfinite(sketches).all():
        raise ReceiptRejected(f"rank {rank}: sketches contain NaN or infinity")
    if sketch_root(step_start, sketches) != m["sketchRoot"]:
        raise ReceiptRejected(f"rank {rank}: the sketches sent do not hash to the signed sketch root")
