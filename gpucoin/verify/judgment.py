"""From what a replay found to the verdict on each receipt (pure: numpy only, no torch, no I/O).

A verifier's replay runs the submitter's code, so the process that replays only gathers
``Evidence``: the replayed sketches, each end-checkpoint file against the replayed state, the
files that could not be fetched as signed and, when the first replay convicts on numbers, a
second replay from a fresh process. ``decide`` turns that into ``Finding``s; the verifier's
signing process runs it (``wallet.signer``), on committed sketches it checked against the signed
receipts and with the policy's tolerance it was started with, and signs the reports. Tests run
the same ``decide`` without a signer (``verifier.judge_interval``).

The rules (docs/verification.md): a start-checkpoint file at fault fails the receipt that
committed to it and voids the interval (nothing to replay from); otherwise the sketches are
compared and judged by the first mismatching step (``compare.compare_interval``), the end files
folded in (``compare.judge_end``), an end file not stored as signed fails its writer; a
conviction on numbers that the fresh replay does not reproduce names nobody (void); and in a job
of an unvetted package nothing convicts (``compare.effective_verdict``).
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field, replace

import numpy as np

from gpucoin.verify.compare import (
    EndOutcome,
    FileCheck,
    RankVerdict,
    compare_interval,
    effective_verdict,
    judge_end,
)

MAX_EVIDENCE_NUMBERS = 8 * 2**20
"""Most float64 numbers one array of evidence may hold (64 MiB)."""


@dataclass(frozen=True)
class Finding:
    """The verdict on one receipt, with the reason people read (the report signs verdict and distance).

    Attributes:
        receipt: the judged WorkReceipt's digest; rank: its rank.
        verdict: ``pass``, ``fail`` or ``void`` (``compare.RankVerdict``).
        distance: largest relative L2 distance found (``inf`` for a file that cannot serve).
        reason: why it did not pass, or None.
    """

    receipt: str
    rank: int
    verdict: str
    distance: float
    reason: str | None = None

    def to_dict(self) -> dict:
        return {
            "receipt": self.receipt,
            "rank": self.rank,
            "verdict": self.verdict,
            "distance": self.distance,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Finding":
        return cls(d["receipt"], int(d["rank"]), d["verdict"], float(d["distance"]), d.get("reason"))


@dataclass(frozen=True)
class Evidence:
    """What the replay of one interval of a W-rank job found, before any verdict.

    Attributes:
        start_faults: rank -> why the start-checkpoint file it committed to cannot serve; when
            any, nothing was replayed and the rest is empty.
        replayed: (W, K, B) float64 sketches the replay computed, or None.
        end_checks: each end-checkpoint file against the replayed state (``endcheck``).
        end_faults: rank -> why its end file is not stored as it signed.
        replayed_again / end_checks_again: the same from a fresh process, when the first
            replay convicted on numbers (None otherwise).
    """

    start_faults: dict[int, str] = field(default_factory=dict)
    replayed: np.ndarray | None = None
    end_checks: tuple[FileCheck, ...] = ()
    end_faults: dict[int, str] = field(default_factory=dict)
    replayed_again: np.ndarray | None = None
    end_checks_again: tuple[FileCheck, ...] | None = None

    def to_dict(self) -> dict:
        """JSON-able form (arrays as base64 of little-endian float64 with their shape)."""
        return {
            "start_faults": {str(r): why for r, why in self.start_faults.items()},
            "replayed": encode_array(self.replayed),
            "end_checks": [_check_dict(c) for c in self.end_checks],
            "end_faults": {str(r): why for r, why in self.end_faults.items()},
            "replayed_again": encode_array(self.replayed_again),
            "end_checks_again": None
            if self.end_checks_again is None
            else [_check_dict(c) for c in self.end_checks_again],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Evidence":
        """Parse ``to_dict``'s form.

        Raises:
            ValueError: anything malformed (wrong types, bad base64, a shape that does not fit).
        """
        try:
            again = d["end_checks_again"]
            return cls(
                start_faults={int(r): str(why) for r, why in d["start_faults"].items()},
                replayed=decode_array(d["replayed"]),
                end_checks=tuple(_check(c) for c in d["end_checks"]),
                end_faults={int(r): str(why) for r, why in d["end_faults"].items()},
                replayed_again=decode_array(d["replayed_again"]),
                end_checks_again=None if again is None else tuple(_check(c) for c in again),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed evidence: {e!r}") from None


def _check_dict(c: FileCheck) -> dict:
    return {"name": c.name, "rank": c.rank, "outcome": str(c.outcome), "distance": c.distance, "reason": c.reason}


def _check(d: dict) -> FileCheck:
    return FileCheck(str(d["name"]), int(d["rank"]), EndOutcome(d["outcome"]), float(d["distance"]), d["reason"])


def encode_array(a: np.ndarray | None) -> dict | None:
    """A float64 array as ``{"shape": [...], "b64": ...}`` (None stays None)."""
    if a is None:
        return None
    a = np.ascontiguousarray(a, dtype="<f8")
    return {"shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


def decode_array(d: dict | None) -> np.ndarray | None:
    """Inverse of ``encode_array``.

    Raises:
        ValueError: a shape that is not non-negative ints, over ``MAX_EVIDENCE_NUMBERS``, or bytes that do not fit it.
    """
    if d is None:
        return None
    shape = d["shape"]
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"an array's shape must be a list of non-negative ints, got {shape!r}")
    count = math.prod(shape)
    if count > MAX_EVIDENCE_NUMBERS:
        raise ValueError(f"an array of {count} numbers is over the bound of {MAX_EVIDENCE_NUMBERS}")
    raw = base64.b64decode(d["b64"], validate=True)
    if len(raw) != 8 * count:
        raise ValueError(f"{len(raw)} bytes do not hold a float64 array of shape {shape}")
    return np.frombuffer(raw, dtype="<f8").reshape(shape).astype(np.float64)


def convicts_on_numbers(verdicts: list[RankVerdict], broken: set[int]) -> bool:
    """Whether a rank fails on its numbers (not on a file that cannot serve): only such a
    conviction needs the fresh-process replay."""
    return any(v.verdict == "fail" and r not in broken for r, v in enumerate(verdicts))


def first_verdicts(
    step_start: int, committed: np.ndarray, ev: Evidence, tolerance: float
) -> tuple[list[RankVerdict], set[int]]:
    """The ranks' verdicts from the first replay and the end files, and the ranks whose end file is broken."""
    return _verdicts(step_start, committed, ev.replayed, ev.end_checks, ev.end_faults, tolerance)


def _verdicts(step_start, committed, replayed, checks, end_faults, tolerance) -> tuple[list[RankVerdict], set[int]]:
    if replayed is None:
        raise ValueError("evidence without a replay and without a start fault")
    verdicts = judge_end(compare_interval(step_start, committed, replayed, tolerance), list(checks))
    broken = {c.rank for c in checks if c.outcome == EndOutcome.BROKEN}
    for r, why in end_faults.items():  # its commitment is false whatever the replay shows
        verdicts[r] = replace(verdicts[r], verdict="fail", max_distance=math.inf, reason=f"end checkpoint: {why}")
        broken.add(r)
    return verdicts, broken


def decide(
    step_start: int,
    committed: np.ndarray,
    ev: Evidence,
    tolerance: float,
    receipts: tuple[str, ...],
    start_receipts: tuple[str, ...],
    vetted: bool,
    reproduce: bool = True,
) -> list[Finding]:
    """The findings for an interval's receipts (rank order), then a failing one for each receipt
    of the interval before whose start-checkpoint file is at fault.

    Args:
        committed: (W, K, B) float64 sketches the ranks committed to (checked against their receipts).
        tolerance: the policy's ``tolerance_rel_l2``.
        receipts / start_receipts: digests of this interval's receipts and of the one before (rank order).
        vetted: the job's package is vetted (else nothing convicts and the interval before is not judged).
        reproduce: a conviction on numbers stands only if ``ev.replayed_again`` reproduces it.

    Raises:
        ValueError: evidence that does not fit (a shape, a rank out of range).
    """
    W = len(receipts)
    ranks = set(ev.start_faults) | set(ev.end_faults) | {c.rank for c in ev.end_checks}
    if not all(0 <= r < W for r in ranks):
        raise ValueError(f"evidence names ranks {sorted(ranks)} of a {W}-rank job")
    if ev.start_faults:
        if len(start_receipts) != W:
            raise ValueError("a start fault at step 0, where there is no start checkpoint")
        why = "; ".join(f"rank {r}: {reason}" for r, reason in sorted(ev.start_faults.items()))
        out = [
            Finding(d, r, "void", math.inf, f"the start checkpoint could not be rebuilt ({why})")
            for r, d in enumerate(receipts)
        ]
        out += [
            Finding(start_receipts[r], r, "fail", math.inf, f"start checkpoint of steps {step_start}-: {reason}")
            for r, reason in sorted(ev.start_faults.items())
        ]
    else:
        verdicts, broken = first_verdicts(step_start, committed, ev, tolerance)
        if reproduce and convicts_on_numbers(verdicts, broken):
            again = None
            if ev.replayed_again is not None and ev.end_checks_again is not None:
                again, _ = _verdicts(
                    step_start, committed, ev.replayed_again, ev.end_checks_again, ev.end_faults, tolerance
                )
            if again is None or [v.verdict for r, v in enumerate(again) if r not in broken] != [
                v.verdict for r, v in enumerate(verdicts) if r not in broken
            ]:
                why = "the convicting replay did not reproduce in a fresh process"
                verdicts = [
                    v if r in broken else replace(v, verdict="void", reason=why) for r, v in enumerate(verdicts)
                ]
        out = [Finding(receipts[r], r, v.verdict, v.max_distance, v.reason) for r, v in enumerate(verdicts)]
    if vetted:
        return out
    why = "the job's package is not vetted: its code may compute differently under replay"
    own = set(receipts)
    return [
        replace(f, verdict=effective_verdict(f.verdict, vetted), reason=f"{why} ({f.reason})")
        if f.verdict == "fail"
        else f
        for f in out
        if f.receipt in own
    ]
