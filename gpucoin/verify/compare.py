"""Compare committed gradient sketches with replayed ones and judge the ranks (pure; numpy only).

Distances are relative L2, ``||committed - replayed|| / ||replayed||``: honest fp32 replays on
CPU differ by ~1e-7, a rank that skipped 1/32 of its batch by ~0.09 (SPEC.md, Verification 3).
Never an absolute threshold (Proof-of-Learning's absolute weight thresholds were forged
cheaply, Fang et al. 2022).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace

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


def effective_verdict(verdict: str, vetted: bool) -> str:
    """What a verifier's ``verdict`` on a receipt counts as: in a job whose package the policy does
    not vet, a ``fail`` is ``void``, since the submitter's code may compute differently when
    replayed (or have made the verifier's replay report anything); the head, the ledger's slash and
    void-charge rules and the verifier apply this one rule.

    Args:
        verdict: ``pass``, ``fail`` or ``void``; vetted: the JobOrder's package is on the policy's list.
    """
    return "void" if verdict == "fail" and not vetted else verdict


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


class EndOutcome(enum.StrEnum):
    """How one end-checkpoint file compares with the replay (module docstring)."""

    MATCH = "match"
    BROKEN = "broken"
    NOT_ADAM = "not_adam"
    DIVERGED = "diverged"


@dataclass(frozen=True)
class FileCheck:
    """One end-checkpoint file against the replay.

    Attributes:
        name: the file; rank: its writer.
        outcome: see ``EndOutcome``.
        distance: largest relative L2 distance of what it holds from the replayed state
            (``inf`` if broken).
        reason: what is wrong with it, or None for a match.
    """

    name: str
    rank: int
    outcome: EndOutcome
    distance: float
    reason: str | None = None


def worst_distance(distances: list[float]) -> float:
    """The largest distance; NaN if any is NaN (Python's ``max`` would skip it and pass a NaN file)."""
    return math.nan if any(math.isnan(d) for d in distances) else max(distances)


def judge_end(verdicts: list[RankVerdict], checks: list[FileCheck]) -> list[RankVerdict]:
    """The ranks' verdicts once the end checkpoint is judged too.

    - A ``broken`` file fails its writer, whatever the sketches said.
    - If the sketches passed every rank, a ``not_adam`` file fails its writer; a ``diverged``
      file fails its writer in a job of one rank (nobody else touched its state) and otherwise
      voids the interval for every rank not failed (the evidence names nobody).
    - If the sketches already failed or voided, the replay's end state is not the job's, so
      only broken files count.

    Args:
        verdicts: the sketches' verdicts, rank order (``compare_interval``).
        checks: ``check_end_checkpoint``'s files.
    """
    out = list(verdicts)

    def fail(c: FileCheck) -> None:
        v = out[c.rank]
        out[c.rank] = replace(
            v, verdict="fail", max_distance=worst_distance([v.max_distance, c.distance]), reason=f"{c.name}: {c.reason}"
        )

    sketches_passed = all(v.verdict == "pass" for v in verdicts)
    for c in checks:
        if c.outcome == EndOutcome.BROKEN or (sketches_passed and c.outcome == EndOutcome.NOT_ADAM):
            fail(c)
    diverged = [c for c in checks if c.outcome == EndOutcome.DIVERGED] if sketches_passed else []
    if diverged and len(out) == 1:
        for c in diverged:
            fail(c)
    elif diverged:
        why = "; ".join(f"{c.name}: {c.reason}" for c in diverged)
        out = [v if v.verdict == "fail" else replace(v, verdict="void", reason=why) for v in out]
    for c in checks:
        if c.outcome == EndOutcome.MATCH and out[c.rank].verdict == "pass":
            out[c.rank] = replace(out[c.rank], max_distance=max(out[c.rank].max_distance, c.distance))
    return out
