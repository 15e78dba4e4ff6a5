"""``gpucoin pull JOB``: what the engineer paid for, as safetensors, checked against what the ranks signed.

The head's summary of an ended job names the checkpoint it vouches for (the end of the last
interval settled without a gap) by the WorkReceipts of that interval. ``pull`` checks each
receipt's signature and that it is this job's, for that step, one per rank; fetches every file
its ``checkpointHash`` manifest names from the head, each checked against its hash
(``storage.fetch_checkpoint``); consolidates the DeepSpeed shards into one fp32 state dict
without unpickling anything but by a weights-only load (``coordinator.evaluate.consolidated_weights``)
and runs no job code; and writes ``model.safetensors`` with ``config.json`` (the model config,
the job, the step, the receipts and manifests it came from, the safetensors file's sha256).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gpucoin.exceptions import HeadError, SignatureError, VerificationError
from gpucoin.head.client import HeadClient
from gpucoin.runtime.checkpoint import tag_for
from gpucoin.spec import JobSpec
from gpucoin.storage import fetch_checkpoint
from gpucoin.wallet.messages import Domain, SignedMessage, verify


@dataclass(frozen=True)
class Pulled:
    """Where ``pull`` wrote the weights: ``weights`` (safetensors), ``config`` (JSON), the
    checkpoint's ``step`` and the number of tensors."""

    weights: Path
    config: Path
    step: int
    tensors: int


def pull(api_url: str, job_id: str, out_dir: Path) -> Pulled:
    """Fetch, check and convert job ``job_id``'s final checkpoint into ``out_dir``.

    Raises:
        HeadError: the head cannot be reached, has no such job, the job has not ended or
            settled no step.
        SignatureError: a receipt the head named is not signed by its worker, or not this job's
            receipt for that step and rank.
        VerificationError: a file of the checkpoint is missing or not what its manifest names.
    """
    from safetensors.torch import save_file

    from gpucoin.coordinator.evaluate import consolidated_weights

    client = HeadClient(api_url, retry_s=10.0)
    head = client.status()
    view = client.job(job_id)
    if view.summary is None:
        raise HeadError(f"job {job_id} is {view.state.value}: its weights can be pulled once it has ended")
    step = view.summary.steps
    if step == 0:
        raise HeadError(f"job {job_id} settled no step: there is nothing to pull")
    spec = JobSpec.model_validate(view.spec)
    receipts = _checked_receipts(
        view.summary.checkpoint_receipts,
        job_id,
        step,
        spec.workers,
        Domain(chain_id=head.chain_id, verifying_contract=head.coordinator),
    )
    manifests = [r.message["checkpointHash"] for r in receipts]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpucoin-pull-") as tmp:
        tag_dir = Path(tmp) / tag_for(step)
        bad = fetch_checkpoint(
            lambda d: client.job_get(job_id, d),
            manifests,
            job_id=job_id,
            step=step,
            zero_stage=spec.deepspeed.zero_stage,
            dest=tag_dir,
        )
        if bad:
            raise VerificationError(
                f"the checkpoint after step {step} cannot be rebuilt: {'; '.join(map(str, bad.values()))}"
            )
        state = consolidated_weights(spec, tag_dir, step)
    weights = out_dir / "model.safetensors"
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(weights))
    config = out_dir / "config.json"
    config.write_text(
        json.dumps(
            {
                "job_id": job_id,
                "step": step,
                "module": spec.module,
                "model": spec.model.model_dump(mode="json"),
                "receipts": [r.digest for r in receipts],
                "checkpoint_hashes": manifests,
                "safetensors_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            },
            indent=2,
        )
        + "\n"
    )
    return Pulled(weights=weights, config=config, step=step, tensors=len(state))


def _checked_receipts(texts: list[str], job_id: str, step: int, workers: int, domain: Domain) -> list[SignedMessage]:
    """The receipts ``texts``, each verified: signed by its ``worker`` in ``domain``, of ``job_id``,
    ending at ``step``, ranks 0..workers-1 in order."""
    if len(texts) != workers:
        raise SignatureError(f"the head names {len(texts)} receipts for a job of {workers} ranks")
    out = []
    for rank, text in enumerate(texts):
        r = SignedMessage.from_json(text)
        verify(r, expected_signer=r.message.get("worker"), domain=domain)
        m = r.message
        if r.primary_type != "WorkReceipt" or (m["jobId"], m["rank"], m["stepEnd"]) != (job_id, rank, step):
            raise SignatureError(f"receipt {r.digest} is not job {job_id}'s receipt of rank {rank} for step {step}")
        out.append(r)
    return out
