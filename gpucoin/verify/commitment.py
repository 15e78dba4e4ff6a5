"""What a WorkReceipt's ``sketchRoot`` commits to (pure: numpy and keccak, no torch, so the
head's inbox and a verifier's signer check it without loading torch)."""

from __future__ import annotations

import numpy as np
from eth_utils import keccak


def sketch_root(step_start: int, sketches: np.ndarray) -> str:
    """Commitment to an interval's sketches: 0x keccak256 of the start step and the (K, B) float64 bytes.

    Raises:
        ValueError: if ``sketches`` is not a 2-D float64 array.
    """
    if sketches.ndim != 2 or sketches.dtype != np.float64:
        raise ValueError(f"sketches must be (K, B) float64, got {sketches.shape} {sketches.dtype}")
    header = step_start.to_bytes(8, "big") + sketches.shape[0].to_bytes(4, "big") + sketches.shape[1].to_bytes(4, "big")
    return "0x" + keccak(header + np.ascontiguousarray(sketches, dtype="<f8").tobytes()).hex()
