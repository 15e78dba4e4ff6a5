"""Which training windows each rank reads at each step: a pure function of (seed, step, rank, micro-step).

Workers choose nothing (SPEC.md, Verification 1): a verifier replaying step ``s`` recomputes
exactly the micro-batches every rank read, from the job seed alone.
"""

from __future__ import annotations

import numpy as np


def window_offsets(
    seed: int, step: int, rank: int, micro_step: int, batch_size: int, data_len: int, block_size: int
) -> np.ndarray:
    """Start offsets of the ``batch_size`` windows rank ``rank`` reads at (``step``, ``micro_step``).

    Uses numpy's Philox generator keyed by the four integers, so the result does not depend on
    anything read or drawn before.

    Returns:
        int64 array of shape (batch_size,), each in [0, data_len - block_size - 1).

    Raises:
        ValueError: if the corpus is shorter than two windows or an index is negative.
    """
    if data_len < block_size + 2:
        raise ValueError(f"corpus of {data_len} tokens is too short for block_size {block_size}")
    if min(seed, step, rank, micro_step) < 0:
        raise ValueError(f"seed/step/rank/micro_step must be >= 0, got {(seed, step, rank, micro_step)}")
    rng = np.random.Generator(np.random.Philox(key=[seed % 2**64, (step << 32) | (rank << 16) | micro_step]))
    return rng.integers(0, data_len - block_size - 1, size=batch_size, dtype=np.int64)


def micro_batch(tokens: np.ndarray, offsets: np.ndarray, block_size: int):
    """Inputs and next-token targets for the windows at ``offsets``.

    Args:
        tokens: 1-D array of token ids (the train split).
        offsets: (B,) int64 window starts from ``window_offsets``.

    Returns:
        (x, y): two torch int64 tensors of shape (B, T) with T = block_size; y is x shifted by one.
    """
    import torch

    idx = offsets[:, None] + np.arange(block_size + 1)[None, :]  # (B, T+1)
    chunk = torch.from_numpy(tokens[idx].astype(np.int64))
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def eval_offsets(seed: int, batch_index: int, batch_size: int, data_len: int, block_size: int) -> np.ndarray:
    """Windows of validation micro-batch ``batch_index`` (a fixed set, so losses are comparable)."""
    return window_offsets(seed ^ 0x5EED_E7A1, 0, 0, batch_index, batch_size, data_len, block_size)
