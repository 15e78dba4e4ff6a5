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

This process imports the submitter's code, so it only gathers ``judgment.Evidence`` (steps 1-4's
replays and file checks); the verdicts (steps 2-5's rules, ``judgment.decide``) and the
signatures (6) come from the node's signing process, which checks the committed sketches against
the signed receipts itself (``wallet.signer``). ``judge_interval`` runs the same ``decide`` on any
store without a signer (tests run it on a ``ContentStore`` without Ray); ``check_interval`` is
the Ray task.
"""

from __future__ import annotations

import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from gpucoin.exceptions import BadCommittedFile, VerificationError
from gpucoin.runtime.checkpoint import tag_for
from gpucoin.storage.checkpoints import Get, fetch_checkpoint
from gpucoin.storage.manifest import file_owner
from gpucoin.verify.compare import FileCheck
from gpucoin.verify.judgment import Evidence, Finding, convicts_on_numbers, decide, first_verdicts

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
        receipt_messages / start_receipt_messages: the signed WorkReceipts (JSON) behind
            ``receipts`` / ``start_receipts``, and assignments: each rank's coordinator-signed
            Assignment (JSON): what the verifier's signer checks before it judges (``check_interval``
            needs them; ``judge_interval`` does not).
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
    receipt_messages: tuple[str, ...] = ()
    start_receipt_messages: tuple[str, ...] = ()
    assignments: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """As JSON-ready data (``committed`` as nested lists; floats round-trip exactly through JSON)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["committed"] = np.asarray(self.committed, dtype=np.float64).tolist()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "ReplayRequest":
        """Inverse of ``to_dict``.

        Raises:
            VerificationError: a field is missing or of the wrong shape.
        """
        try:
            kw = {f.name: data[f.name] for f in fields(cls) if f.name in data}
            kw["committed"] = np.asarray(data["committed"], dtype=np.float64)
            if kw["committed"].ndim != 3:
                raise ValueError(f"committed must be (W, K, B), got {kw['committed'].shape}")
            for f in fields(cls):
                if isinstance(kw.get(f.name), list):
                    kw[f.name] = tuple(kw[f.name])
            return cls(**kw)
        except (KeyError, TypeError, ValueError) as e:
            raise VerificationError(f"a replay request that does not parse: {e}") from None


@dataclass(frozen=True)
class ReplayResult:
    """What the verifier hands back: its address, its signed reports (JSON) and the findings behind them."""

    verifier: str
    reports: tuple[str, ...]
    findings: tuple[Finding, ...]


def replay_checks(
    req: ReplayRequest, start_dir: Path | None, end_dir: Path
) -> tuple[np.ndarray, tuple[FileCheck, ...]]:
    """Steps 2-3's work: replay from the rebuilt start checkpoint and check the end files.

    Returns:
        ((W, K, B) float64 replayed sketches, each end file against the replayed state).

    Raises:
        BadCommittedFile: a file of the start checkpoint that is wrong (it names the file).
    """
    from gpucoin.spec import JobSpec
    from gpucoin.verify.endcheck import AdamHyper, check_end_checkpoint
    from gpucoin.verify.replay import replay_interval

    spec = JobSpec.model_validate(req.spec)
    opt = spec.deepspeed.optimizer
    replay = replay_interval(spec, req.data_source, start_dir, req.step_start, req.step_end, req.buckets)
    h = AdamHyper(replay.last_lr, tuple(opt.betas), opt.eps, opt.weight_decay, replay.end.adam_step)
    checks = check_end_checkpoint(
        end_dir, replay.model, replay.before_last, replay.end, h, spec.deepspeed.zero_stage, spec.workers, req.tolerance
    )
    return np.asarray(replay.sketches, dtype=np.float64), tuple(checks)


def _in_fresh_process(
    req: ReplayRequest, start_dir: Path | None, end_dir: Path
) -> tuple[np.ndarray, tuple[FileCheck, ...]]:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(replay_checks, req, start_dir, end_dir).result(timeout=REPRODUCE_TIMEOUT_S)


def imported_package_hash(module: str) -> str | None:
    """``gpucoin.spec.package_hash`` of the package ``module`` names as this process would import
    it (found, not executed), or None if it is no package on the path."""
    import importlib.util

    from gpucoin.spec import package_hash

    found = importlib.util.find_spec(module)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    return package_hash(Path(locations[0])) if len(locations) == 1 else None


def is_vetted(req: ReplayRequest) -> bool:
    """Step 5's condition: the JobOrder's package is on the policy's list and is the package this
    process imports."""
    from gpucoin.spec import JobSpec

    module = JobSpec.model_validate(req.spec).module
    return req.package_hash in req.vetted_packages and imported_package_hash(module) == req.package_hash


def judge_interval(req: ReplayRequest, get: Get, workdir: Path, fresh_process: bool = True) -> list[Finding]:
    """Steps 1-5 of the module docstring for one interval, without a signer: ``gather_evidence``
    then ``judgment.decide`` (what the verifier's signer runs).

    Args:
        get: the store's ``get`` (``ContentStore.get`` or ``HttpChannel.get``).
        workdir: an empty private directory for the rebuilt checkpoints.
        fresh_process: reproduce a convicting replay in a fresh process (step 4).

    Returns:
        A finding for each of the interval's receipts (rank order), then one for each receipt of
        the interval before whose start-checkpoint file is at fault.

    Raises:
        VerificationError: a request whose lists do not have one entry per rank.
        ObjectCorrupted: the store's own bytes do not hash to their names (the head's fault).
    """
    ev = gather_evidence(req, get, workdir, fresh_process)
    return decide(
        req.step_start,
        req.committed,
        ev,
        req.tolerance,
        req.receipts,
        req.start_receipts,
        is_vetted(req),
        reproduce=fresh_process,
    )


def gather_evidence(req: ReplayRequest, get: Get, workdir: Path, fresh_process: bool = True) -> Evidence:
    """Steps 1-4's work: rebuild, replay, check the end files and, if that convicts on numbers,
    replay again in a fresh process.

    Raises:
        VerificationError / ObjectCorrupted: as ``judge_interval``.
    """
    from gpucoin.spec import JobSpec

    spec = JobSpec.model_validate(req.spec)
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
            return Evidence(start_faults={r: str(e) for r, e in bad.items()})
    end_dir = workdir / "end" / tag_for(req.step_end)
    end_bad = fetch_checkpoint(
        get, list(req.end_manifests), job_id=req.job_id, step=req.step_end, zero_stage=stage, dest=end_dir
    )
    try:
        replayed, checks = replay_checks(req, start_dir, end_dir)
    except BadCommittedFile as exc:
        return Evidence(start_faults={file_owner(exc.name, stage, W): str(exc)})
    ev = Evidence(replayed=replayed, end_checks=checks, end_faults={r: str(e) for r, e in end_bad.items()})
    if fresh_process and convicts_on_numbers(*first_verdicts(req.step_start, req.committed, ev, req.tolerance)):
        again, again_checks = _in_fresh_process(req, start_dir, end_dir)
        ev = replace(ev, replayed_again=again, end_checks_again=again_checks)
    return ev


def check_interval(req: ReplayRequest, store) -> ReplayResult:
    """The Ray task a verifier node runs: ``gather_evidence`` on the head's store, then the node's
    signing process judges it (``judgment.decide``) and signs one VerificationReport per finding
    (neither the key nor the verdict is this process's: it ran the submitter's code).

    Args:
        store: the job's store as the verifier reaches it (``runtime.channel.JobChannel``).

    Raises:
        WalletError: the signer refused the request (``SigningRefused``) or cannot be reached.
    """
    from gpucoin.runtime.faults import lazy_verifier
    from gpucoin.wallet.signer import SignerClient

    signer = SignerClient()
    if lazy_verifier():  # a test's dishonest verifier: "replays" nothing, so every sketch matches
        ev = Evidence(replayed=np.array(req.committed, dtype=np.float64))
    else:
        with tempfile.TemporaryDirectory(prefix="gpucoin-replay-") as tmp:
            ev = gather_evidence(req, store.get, Path(tmp))
    reports, findings = signer.judge(
        step_start=req.step_start,
        committed=req.committed,
        evidence=ev,
        receipts=req.receipt_messages,
        start_receipts=req.start_receipt_messages,
        assignments=req.assignments,
        vetted=is_vetted(req),
    )
    return ReplayResult(signer.address, tuple(reports), tuple(findings))
