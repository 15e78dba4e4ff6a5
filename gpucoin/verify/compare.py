"""Compare committed gradient sketches with replayed ones (pure; numpy only).

Distances are relative L2, ``||committed - replayed|| / ||replayed||``: honest fp32 replays on
CPU differ by ~1e-7, a rank that skipped 1/32 of its batch by ~0.09 (SPEC.md, Verification 3).
Never an absolute threshold (Proof-of-Learning's absolute weight thresholds were forged
cheaply, Fang et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-30


def rel_l2(committed: np.ndarray, replayed: np.ndarray) -> float:
    """Relative L2 distance of two same-shaped arrays; 0.0 when both are zero, inf when only replayed is.

    Raises:
        ValueError: if the shapes differ.
    """
    a, b = np.asarray(committed, dtype=np.float64), np.asarray(replayed, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"sketch shapes differ: committed {a.shape}, replayed {b.shape}")
    num, den = float(np.linalg.norm(a - b)), float(np.linalg.norm(b))
    if den < _EPS:
        return 0.0 if num < _EPS else float("inf")
    return num / den


@dataclass(frozen=True)
class RankVerdict:
    """The outcome for one rank of a checked interval.

    Attributes:
        rank: data-parallel rank.
        verdict: ``pass``; ``fail`` (evidence against this rank: ``blame``); ``void`` (the ranks
            diverged together, the evidence names nobody).
        max_distance: largest per-step relative L2 distance up to the first mismatch.
        first_bad_step: absolute step of the first mismatch, or None.
        reason: why it did not pass, for people (the signed report carries the verdict and distance).
    """

    rank: int
    verdict: str
    max_distance: float
    first_bad_step: int | None
    reason: str | None = None

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


def blame(bad_at_first: list[bool]) -> list[str]:
    """Who the first mismatching step convicts: the verdict of each rank.

    Up to the first step where any rank's sketch mismatches, every rank's weights were the
    replay's. There, a rank whose own local gradient disagrees with the replay while a co-worker's
    agrees computed its gradient wrongly from correct weights: ``fail``, and the others ``pass``.
    If every rank of a job of several ranks disagrees at once, the shared state itself may have
    been corrupted (one rank's poisoned contribution to the all-reduce reaches every rank), so
    the evidence names nobody: all ``void``. A job of one rank has no co-worker and no all-reduce
    with another party: nobody but that rank touched its state, so its mismatch is its own.

    Args:
        bad_at_first: per rank, whether its sketch mismatches at the first mismatching step.

    Returns:
        One verdict per rank.
    """
    if not any(bad_at_first):
        return ["pass"] * len(bad_at_first)
    if all(bad_at_first) and len(bad_at_first) > 1:
        return ["void"] * len(bad_at_first)
    return ["fail" if bad else "pass" for bad in bad_at_first]


def compare_interval(
    step_start: int, committed: np.ndarray, replayed: np.ndarray, tolerance: float
) -> list[RankVerdict]:
    """Compare per rank and per step, and judge by the first mismatching step (``blame``).

    Args:
        step_start: the interval's first step (for naming the first bad step).
        committed: (R, K, B) sketches the ranks committed to, R ranks, K steps, B buckets.
        replayed: (R, K, B) sketches the verifier recomputed.
        tolerance: largest relative L2 distance that passes (the policy's ``tolerance_rel_l2``).

    Returns:
        One verdict per rank. Later steps of honest ranks are compared from already-diverged
        weights and are not held against them.

    Raises:
        ValueError: for mismatched shapes or a non-positive tolerance.
    """
    if tolerance <= 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    committed, replayed = np.asarray(committed, dtype=np.float64), np.asarray(replayed, dtype=np.float64)
    if committed.shape != replayed.shape or committed.ndim != 3:
        raise ValueError(f"expected two (R, K, B) arrays of one shape, got {committed.shape} and {replayed.shape}")
    R, K, _ = committed.shape
    dist = np.array([[rel_l2(committed[r, k], replayed[r, k]) for k in range(K)] for r in range(R)])  # (R, K)
    bad = ~(dist <= tolerance)  # NaN is a mismatch, never a pass
    if not bad.any():
        return [RankVerdict(r, "pass", float(dist[r].max()), None) for r in range(R)]
    first_k = int(np.argmax(bad.any(axis=0)))
    verdicts = blame([bool(bad[r, first_k]) for r in range(R)])
    step = step_start + first_k
    reasons = {
        "pass": None,
        "fail": f"its sketch of step {step} differs from the replay",
        "void": f"every rank's sketch of step {step} differs from the replay: the shared state diverged",
    }
    # up to the first bad step every rank's weights were the replay's, so only that step judges
    return [
        RankVerdict(
            r, verdicts[r], float(dist[r, : first_k + 1].max()), step if bad[r, first_k] else None, reasons[verdicts[r]]
        )
        for r in range(R)
    ]
