"""The training loop each rank runs inside a Ray Train worker on a volunteer node.

Top to bottom: load the corpus, build the model, wrap it in DeepSpeed, then per interval of
K steps: per step this rank's share (``runtime.step.rank_step``, the code replay runs: the
micro-batches fixed by (seed, step, rank), forward, the local gradient and its sketch), that
gradient fed into DeepSpeed's all-reduce and optimizer step; at the end of
the interval save a DeepSpeed checkpoint into this rank's own scratch directory, put the files
this rank wrote and their manifest into the job's store on the head, sign a WorkReceipt naming
the manifest through this node's signing process (the key is not in this process: job code
runs here) and hand it with the sketches to the head (``runtime.channel``).
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

PROGRESS_EVERY_STEPS = 5
RECEIPT_WAIT_S = 600.0
"""How long a rank waits for a head whose inbox is full of its earlier receipts."""
RECEIPT_RETRY_S = 0.5


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config`` keys: spec (JobSpec dict), job_id, channel (the head:
    ``runtime.channel.JobChannel``), start_step, start_manifests (per rank, the ``checkpointHash`` of the
    receipt that ended at ``start_step``; for resumes), buckets, threads, previous (per-rank digest of the last receipt, for resumes),
    assignments (per rank, the coordinator-signed Assignment JSON the node's signer requires)."""
    import deepspeed
    import ray.train
    import torch

    from gpucoin.exceptions import TrainingError
    from gpucoin.runtime import faults, safe_load
    from gpucoin.runtime.checkpoint import tag_for
    from gpucoin.runtime.dsconfig import deepspeed_config
    from gpucoin.runtime.sketch import CountSketch
    from gpucoin.runtime.step import engine_step, job_parameters
    from gpucoin.spec import JobSpec
    from gpucoin.storage import commit_checkpoint, fetch_checkpoint
    from gpucoin.verify.commitment import sketch_root
    from gpucoin.wallet.nonces import NonceSource
    from gpucoin.wallet.signer import SignerClient

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(config.get("threads", 1))
    spec = JobSpec.model_validate(config["spec"])
    ds = spec.deepspeed
    channel = config["channel"]  # the head: stop flag, progress, receipts, the job's store (runtime.channel)
    signer = SignerClient()
    nonces = NonceSource()

    module = importlib.import_module(spec.module)
    corpus = module.prepare_corpus(config["data_source"], val_fraction=spec.data.val_fraction)
    train = corpus.train

    torch.manual_seed(spec.seed)
    model = module.build_model(spec.model.model_dump(), corpus.vocab_size)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=deepspeed_config(spec)
    )
    safe_load.install(engine)  # a co-worker's checkpoint files are loaded weights-only: they cannot run code
    device = engine.device
    sketch = CountSketch(model.parameters(), config["buckets"], spec.seed)
    params = job_parameters(model)

    # this rank's own files only: the checkpoint others read is the one in the store, checked by hash
    # under the node's Ray temp dir, which goes with the node: a rank that dies leaves nothing in /tmp
    scratch = Path(tempfile.mkdtemp(prefix=f"gpucoin-{config['job_id']}-rank{rank}-", dir=os.environ.get("RAY_TMPDIR")))
    start = config["start_step"]
    if start > 0:
        bad = fetch_checkpoint(
            channel.get,
            config["start_manifests"],
            job_id=config["job_id"],
            step=start,
            zero_stage=ds.zero_stage,
            dest=scratch / tag_for(start),
        )
        if bad:
            raise TrainingError(f"cannot resume from step {start}: {'; '.join(str(e) for e in bad.values())}")
        engine.load_checkpoint(str(scratch), tag=tag_for(start))
    previous = config["previous"][rank]

    faults.scope_to_job(config["job_id"])
    cheat = faults.rank_cheat(rank, spec, train, sketch, [n for n, _ in params], config.get("attempt", 0))

    for s, e in spec.intervals():
        if s < start:
            continue
        if s >= config.get("end_step", spec.steps):
            break  # a group test's re-run trains one interval
        # every rank must agree, or a rank left alone would hang in the next collective
        stop = torch.tensor([int(channel.stop_reason() is not None)], device=device)
        torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
        if stop.item():
            break
        t0 = time.monotonic()
        sketches, losses, samples = [], [], 0
        for step in range(s, e):
            done, lr = engine_step(engine, spec, train, step, rank, params, sketch, cheat)  # replay: rank_step
            samples += done.samples
            sketches.append(done.sketch)
            losses.append(done.loss)
            if rank == 0 and (step % PROGRESS_EVERY_STEPS == 0 or step == e - 1):
                channel.progress(step + 1, done.loss, lr)
        engine.save_checkpoint(str(scratch), tag=tag_for(e))
        tag_dir, put, attack = scratch / tag_for(e), channel.put, faults.checkpoint_attack(e)
        if attack == "withhold":
            put = faults.withholding(put)
        elif attack:
            faults.tamper(tag_dir, attack)
        ckpt_hash = commit_checkpoint(
            put, tag_dir, job_id=config["job_id"], rank=rank, step=e, zero_stage=ds.zero_stage, world=spec.workers
        )
        shutil.rmtree(tag_dir, ignore_errors=True)  # the store holds it now
        sk = np.stack(sketches)  # (K, B) float64
        compute_ms = int((time.monotonic() - t0) * 1000)
        receipt = signer.sign(
            "WorkReceipt",
            {
                "jobId": config["job_id"],
                "worker": signer.address,
                "rank": rank,
                "stepStart": s,
                "stepEnd": e,
                "samples": samples,
                "computeTimeMs": compute_ms,
                "sketchRoot": sketch_root(s, sk),
                "checkpointHash": ckpt_hash,
                "previousReceipt": previous,
                "nonce": nonces.next(),
            },
            config["assignments"][rank],
        )
        previous = receipt.digest
        faults.before_submit(e, channel, rank, receipt.to_json(), sk, losses)
        # Blocking: the receipt is in the head's hands before the next interval starts; a head
        # that is behind (busy) is waited for, a bounded time
        deadline = time.monotonic() + RECEIPT_WAIT_S
        while not (reply := channel.submit_receipt(rank, receipt.to_json(), sk, losses)).accepted:
            if not reply.busy or time.monotonic() > deadline:
                raise TrainingError(f"the job's inbox refused rank {rank}'s receipt for steps {s}-{e}: {reply.reason}")
            time.sleep(RECEIPT_RETRY_S)
    shutil.rmtree(scratch, ignore_errors=True)
