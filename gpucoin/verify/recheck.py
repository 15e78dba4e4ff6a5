"""Verifiers are checked too: which VerificationReport a re-check shows false (pure: no I/O).

A verifier is paid a share of an interval's emission whether it replayed or only signed "pass"
(the verifier's dilemma, Luu et al., CCS 2015). So a policy share of the intervals a verifier
judged (``verification.recheck_share_bps``, drawn with the coordinator's secret after the first
reports are recorded, ``is_rechecked``) is replayed again by a second verifier node that is
neither in the job nor the first verifier, and a report the re-check shows false slashes its
verifier's bond like a cheating worker's (``ledger.authorize``, with the coordinator acting on
the same rule, ``coordinator.run``).

The rule, per receipt, each verdict as it counts in the job (``compare.effective_verdict``: in a
job whose package the policy does not vet a fail is void, so nothing there is shown false): a
**pass is shown false by another verifier's fail of the same receipt recorded after it**
(neither verifier being the receipt's worker). One bonded verifier's fail, reproduced in a fresh
process, is the evidence that convicts a worker (docs/verification.md); the pass said those same
numbers were right. A fail or a void is never shown false here.

"Recorded after": the re-check comes after the report it checks, so a lazy first verifier is
caught by an honest re-checker, while an honest re-checker that passes what a framing first
verifier failed is not slashed on the framer's word (the framer's fail still convicts the worker,
as any fail does; a third verifier's tie-break, overruling a fail by two passes, is not built).
The rule is monotone: recording order never changes, and a report shown false stays so whatever
is recorded later, so the ledger's audit, replaying each Settlement against what was recorded by
then, reaches the decision the ledger reached.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from gpucoin.verify.sampling import is_checked

BPS = 10_000


@dataclass(frozen=True)
class Opinion:
    """One VerificationReport on a receipt, as the rule reads it.

    Attributes:
        digest: the report's EIP-712 digest.
        verifier: its signer's checksum address.
        verdict: ``pass``, ``fail`` or ``void`` as it counts in the job (``compare.effective_verdict``).
    """

    digest: str
    verifier: str
    verdict: str


def shown_false_by(report: Opinion, opinions: Sequence[Opinion], worker: str) -> tuple[Opinion, ...]:
    """The reports that show ``report`` false (module docstring): for a pass, the first fail of
    each other verifier on the same receipt recorded after it, in recording order; empty for
    anything else or when none did. Its verifier is slashed on them; the first one's verifier is
    the whistleblower.

    Args:
        report: one report on a receipt.
        opinions: every report on that receipt, in recording order, ``report`` among them.
        worker: the receipt's signer (its own reports count for nothing, nor is a report of its own
            shown false).

    Raises:
        ValueError: ``report`` is not among ``opinions``.
    """
    at = next((i for i, o in enumerate(opinions) if o.digest == report.digest), None)
    if at is None:
        raise ValueError(f"report {report.digest} is not among the reports it is judged against")
    if report.verdict != "pass" or report.verifier == worker:
        return ()
    first: dict[str, Opinion] = {}
    for o in opinions[at + 1 :]:
        if o.verdict == "fail" and o.verifier not in (worker, report.verifier):
            first.setdefault(o.verifier, o)
    return tuple(first.values())


def is_rechecked(secret: bytes, receipt_digests: list[str], share_bps: int) -> bool:
    """True if the interval whose ranks signed ``receipt_digests`` is replayed again by a second
    verifier: a draw with probability ``share_bps`` / 10,000, by the same keyed hash as the
    spot check (``sampling.is_checked``) under a key of its own, so it is independent of that draw.

    Raises:
        ValueError: ``share_bps`` outside 0-10,000.
    """
    if not 0 <= share_bps <= BPS:
        raise ValueError(f"recheck share must be 0-{BPS} bps, got {share_bps}")
    key = hashlib.sha256(b"gpucoin recheck\x00" + secret).digest()
    return is_checked(key, receipt_digests, share_bps / BPS)
