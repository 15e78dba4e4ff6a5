"""What a verifier node does for one drawn interval: rebuild, replay, compare, check the end, sign.

1. Rebuild the start checkpoint from the store, file by file against the manifests the previous
   interval's receipts signed (none for step 0: that state follows from the spec's seed). A rank
   whose manifest or file is not stored, not what it signed, or not a loadable DeepSpeed file of
   its own fails, on the receipt that committed to it; the interval itself cannot be replayed
   and is void for its ranks.
2. Replay the interval and compare the ranks' sketches (``compare.compare_interval``, with its
   blame rule).
3. Check the end checkpoint the interval's receipts signed, file by file, against the replayed
   state (``endcheck``).
4. A verdict that convicts on numbers is reproduced in a fresh process (no state left from an
   earlier replay in this worker); if it does not reproduce, the evidence names nobody: void.
5. Unless the job's package is vetted (on the policy's list, and the very package this verifier
   imports), nothing convicts: the submitter's code may compute differently when replayed, or
   have made a worker write or withhold what it did, so every fail becomes void.
6. Sign one VerificationReport per judged receipt with this node's own key.

``judge_interval`` is steps 1-5 on any store (tests run it on a ``ContentStore`` without Ray);
``check_interval`` is the Ray task around it.
"""

from __future__ import annotations

import math
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from gpucoin.exceptions import BadCommittedFile, VerificationError
from gpucoin.runtime.checkpoint import tag_for
from gpucoin.storage.checkpoints import Get, StoreClient, fetch_checkpoint
from gpucoin.storage.manifest import file_owner
from gpucoin.verify.compare import RankVerdict
from gpucoin.wallet.nonces import NonceSource

_NONCES = NonceSource()

REPRODUCE_TIMEOUT_S = 3600.0
"""Bound on the fresh process that reproduces a convicting replay."""


@dataclass(frozen=True)
class ReplayRequest:
    """Everything a verifier needs for one drawn interval [step_start, step_end) of a job.

    Attributes:
        spec: the JobSpec as JSON; data_source: the corpus it trains on; job_id: the job.
        buckets: sketch width B; tolerance: the policy's ``tolerance_rel_l2``.
        committed: (W, K, B) float64 sketches the ranks committed to (their roots were checked on arrival).
        receipts: the interval's WorkReceipt digests, rank order.
        end_manifests: the ``checkpointHash`` each of those receipts signed, rank order.
        start_receipts / start_manifests: the same for the interval before (empty at step 0).
        package_hash: the job's package as its JobOrder signed it; vetted_packages: the policy's
            list. Only a vetted package that is the one this verifier imports can convict.
    """

    spec: dict
    data_source: str
    job_id: str
    step_start: int
    step_end: int
    buckets: int
    committed: np.ndarray
    receipts: tuple[str, ...]
    end_manifests: tuple[str, ...]
    start_receipts: tuple[str, ...]
    start_manifests: tuple[str, ...]
    package_hash: str
    vetted_packages: tuple[str, ...]
    tolerance: float


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


@dataclass(frozen=True)
class ReplayResult:
    """What the verifier hands back: its address, its signed reports (JSON) and the findings behind them."""

    verifier: str
    reports: tuple[str, ...]
    findings: tuple[Finding, ...]


def replay_and_judge(req: ReplayRequest, start_dir: Path | None, end_dir: Path) -> tuple[list[RankVerdict], set[int]]:
    """Steps 2-3: replay from the rebuilt start checkpoint, compare the sketches, check the end files.

    Returns:
        (the ranks' verdicts, the ranks with a broken end file).

    Raises:
        BadCommittedFile: a file of the start checkpoint that is wrong (it names the file).
    """
    from gpucoin.spec import JobSpec
    from gpucoin.verify.compare import compare_interval
    from gpucoin.verify.endcheck import AdamHyper, EndOutcome, check_end_checkpoint, judge_end
    from gpucoin.verify.replay import replay_interval

    spec = JobSpec.model_validate(req.spec)
    opt = spec.deepspeed.optimizer
    replay = replay_interval(spec, req.data_source, start_dir, req.step_start, req.step_end, req.buckets)
    verdicts = compare_interval(req.step_start, req.committed, replay.sketches, req.tolerance)
    h = AdamHyper(replay.last_lr, tuple(opt.betas), opt.eps, opt.weight_decay, replay.end.adam_step)
    checks = check_end_checkpoint(
        end_dir, replay.model, replay.before_last, replay.end, h, spec.deepspeed.zero_stage, spec.workers, req.tolerance
    )
    return judge_end(verdicts, checks), {c.rank for c in checks if c.outcome == EndOutcome.BROKEN}


def _in_fresh_process(req: ReplayRequest, start_dir: Path | None, end_dir: Path) -> tuple[list[RankVerdict], set[int]]:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(replay_and_judge, req, start_dir, end_dir).result(timeout=REPRODUCE_TIMEOUT_S)


def _start_failed(req: ReplayRequest, bad: dict[int, str]) -> list[Finding]:
    """The start checkpoint could not be rebuilt: the ranks whose files are at fault fail on the
    receipts that committed to them; the interval's own receipts are void (nothing to replay from)."""
    why = "; ".join(f"rank {r}: {reason}" for r, reason in sorted(bad.items()))
    out = [
        Finding(d, r, "void", math.inf, f"the start checkpoint could not be rebuilt ({why})")
        for r, d in enumerate(req.receipts)
    ]
    out += [
        Finding(req.start_receipts[r], r, "fail", math.inf, f"start checkpoint of steps {req.step_start}-: {reason}")
        for r, reason in sorted(bad.items())
    ]
    return out


def imported_package_hash(module: str) -> str | None:
    """``gpucoin.spec.package_hash`` of the package ``module`` names as this process would import
    it (found, not executed), or None if it is no package on the path."""
    import importlib.util

    from gpucoin.spec import package_hash

    found = importlib.util.find_spec(module)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    return package_hash(Path(locations[0])) if len(locations) == 1 else None


def judge_interval(req: ReplayRequest, get: Get, workdir: Path, fresh_process: bool = True) -> list[Finding]:
    """Steps 1-5 of the module docstring for one interval.

    Args:
        get: the store's ``get`` (``ContentStore.get`` or ``StoreClient.get``).
        workdir: an empty private directory for the rebuilt checkpoints.
        fresh_process: reproduce a convicting replay in a fresh process (step 4).

    Returns:
        A finding for each of the interval's receipts (rank order), then one for each receipt of
        the interval before whose start-checkpoint file is at fault.

    Raises:
        VerificationError: a request whose lists do not have one entry per rank.
        ObjectCorrupted: the store's own bytes do not hash to their names (the head's fault).
    """
    from gpucoin.spec import JobSpec

    spec = JobSpec.model_validate(req.spec)
    vetted = req.package_hash in req.vetted_packages and imported_package_hash(spec.module) == req.package_hash
    findings = _judge(req, spec, get, workdir, fresh_process)
    if vetted:
        return findings
    # nothing convicts: the interval's own receipts are void, the interval before is not judged
    why = "the job's package is not vetted: its code may compute differently under replay"
    own = set(req.receipts)
    return [
        replace(f, verdict="void", reason=f"{why} ({f.reason})") if f.verdict == "fail" else f
        for f in findings
        if f.receipt in own
    ]


def _judge(req: ReplayRequest, spec, get: Get, workdir: Path, fresh_process: bool) -> list[Finding]:
    W, stage = spec.workers, spec.deepspeed.zero_stage
    starts = 0 if req.step_start == 0 else W
    want = {"receipts": W, "end_manifests": W, "start_receipts": starts, "start_manifests": starts}
    got = {k: len(getattr(req, k)) for k in want}
    if got != want:
        raise VerificationError(
            f"a replay request of a {W}-rank job from step {req.step_start}: {got}, expected {want}"
        )
    start_dir = None
    if req.step_start > 0:
        start_dir = workdir / "start" / tag_for(req.step_start)
        bad = fetch_checkpoint(
            get, list(req.start_manifests), job_id=req.job_id, step=req.step_start, zero_stage=stage, dest=start_dir
        )
        if bad:
            return _start_failed(req, {r: str(e) for r, e in bad.items()})
    end_dir = workdir / "end" / tag_for(req.step_end)
    end_bad = fetch_checkpoint(
        get, list(req.end_manifests), job_id=req.job_id, step=req.step_end, zero_stage=stage, dest=end_dir
    )
    try:
        verdicts, broken = replay_and_judge(req, start_dir, end_dir)
    except BadCommittedFile as exc:
        return _start_failed(req, {file_owner(exc.name, stage, W): str(exc)})
    for r, exc in end_bad.items():  # its commitment is false whatever the replay shows
        verdicts[r] = replace(verdicts[r], verdict="fail", max_distance=math.inf, reason=f"end checkpoint: {exc}")
        broken.add(r)
    on_numbers = [r for r, v in enumerate(verdicts) if v.verdict == "fail" and r not in broken]
    if fresh_process and on_numbers:
        again, _ = _in_fresh_process(req, start_dir, end_dir)
        if [v.verdict for r, v in enumerate(again) if r not in broken] != [
            v.verdict for r, v in enumerate(verdicts) if r not in broken
        ]:
            why = "the convicting replay did not reproduce in a fresh process"
            verdicts = [v if r in broken else replace(v, verdict="void", reason=why) for r, v in enumerate(verdicts)]
    return [Finding(req.receipts[r], r, v.verdict, v.max_distance, v.reason) for r, v in enumerate(verdicts)]


def check_interval(req: ReplayRequest, store: object) -> ReplayResult:
    """The Ray task a verifier node runs: ``judge_interval`` on the head's store, each finding
    signed as a VerificationReport by this node's signing process (the key is not in this process).

    Args:
        store: the job's ``ContentStore`` actor handle.
    """
    from gpucoin.wallet.messages import distance_e9
    from gpucoin.wallet.signer import SignerClient

    signer = SignerClient()
    with tempfile.TemporaryDirectory(prefix="gpucoin-replay-") as tmp:
        findings = judge_interval(req, StoreClient(store).get, Path(tmp))
    reports = [
        signer.sign(
            "VerificationReport",
            {
                "verifier": signer.address,
                "receiptDigest": f.receipt,
                "verdict": f.verdict,
                "distanceE9": distance_e9(f.distance),
                "nonce": _NONCES.next(),
            },
        ).to_json()
        for f in findings
    ]
    return ReplayResult(signer.address, tuple(reports), tuple(findings))
