"""Launch a job's ranks with Ray Train, gang-placed on exactly the Ray nodes the market chose."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from gpucoin.exceptions import TrainingError
from gpucoin.runtime.worker import train_loop_per_worker
from gpucoin.spec import JobSpec


@dataclass
class TrainingRun:
    """A Ray Train run going on in a background thread; ``join`` waits and re-raises its failure."""

    thread: threading.Thread
    error: list[BaseException] = field(default_factory=list)

    def alive(self) -> bool:
        """True while the run is going on."""
        return self.thread.is_alive()

    def join(self, timeout_s: float | None = None) -> None:
        """Wait up to ``timeout_s`` seconds; raise ``TrainingError`` if the run failed."""
        self.thread.join(timeout_s)
        if self.error:
            e = self.error[0]
            raise TrainingError(
                f"training failed on the workers: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            ) from e


def launch(
    spec: JobSpec,
    *,
    job_id: str,
    node_ids: list[str],
    channel,
    storage_dir: Path,
    buckets: int,
    data_source: str,
    start_step: int = 0,
    start_manifests: list[str] | None = None,
    previous: list[str] | None = None,
    assignments: list[str],
    threads_per_worker: int = 1,
    attempt: int = 0,
    end_step: int | None = None,
) -> TrainingRun:
    """Start the job's ``len(node_ids)`` ranks, rank r on Ray node ``node_ids[r]``.

    Placement uses Ray Train's ``ScalingConfig(label_selector=[{"ray.io/node-id": id}, ...])``:
    one selector per rank, so Ray places every rank on exactly the node the market chose, or
    not at all. Gloo on CPU, NCCL when the nodes have GPUs (Ray Train picks the backend).

    The job's package must be in the driver's job-level runtime env (``py_modules``), which is
    the only level where Ray uploads a local directory.

    Args:
        assignments: per rank, the coordinator-signed Assignment (JSON) that rank's node signer
            needs before it signs that rank's receipts.
        channel: how the ranks reach the head (``runtime.channel``): the stop flag, progress,
            receipts, and the job's store, where they put their checkpoints.
        storage_dir: Ray Train's own run directory.
        start_step / start_manifests / previous: to resume after ``start_step`` steps: per rank,
            the ``checkpointHash`` and the digest of the receipt that ended there.
        attempt: how many Rewinds of the job came before this launch (a test cheat set with
            ``runtime.faults.FAULT_CHEAT_ENV`` for a rank runs in attempt 0 only).
        end_step: the ranks stop at this step (an interval boundary; None: the job's end), as
            a group test's re-run of one interval does.

    Returns:
        A ``TrainingRun``; progress and receipts go through ``channel``.

    Raises:
        TrainingError: for a placement or resume point that does not fit the job.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from gpucoin.runtime.rendezvous import torch_config

    if len(node_ids) != spec.workers:
        raise TrainingError(f"{len(node_ids)} nodes placed for a job of {spec.workers} workers")
    if start_step and len(start_manifests or []) != spec.workers:
        raise TrainingError(f"resuming at step {start_step} needs one checkpoint manifest per rank ({spec.workers})")
    zero = "0x" + "00" * 32
    config = {
        "spec": spec.model_dump(mode="json"),
        "job_id": job_id,
        "start_step": start_step,
        "start_manifests": list(start_manifests or []),
        "channel": channel,
        "buckets": buckets,
        "threads": threads_per_worker,
        "data_source": data_source,
        "previous": previous or [zero] * spec.workers,
        "assignments": list(assignments),
        "attempt": attempt,
        "end_step": spec.steps if end_step is None else end_step,
    }
    # GPUs only if every chosen node has one: then Ray Train sets up NCCL, otherwise gloo on CPU
    gpus = {n["NodeID"]: n.get("Resources", {}).get("GPU", 0) for n in ray.nodes() if n.get("Alive")}
    use_gpu = all(gpus.get(nid, 0) >= 1 for nid in node_ids)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=torch_config(),
        scaling_config=ScalingConfig(
            num_workers=spec.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1},
            label_selector=[{"ray.io/node-id": nid} for nid in node_ids],
        ),
        run_config=RunConfig(
            name=job_id,
            storage_path=str(storage_dir),
            failure_config=FailureConfig(max_failures=0),
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads_per_worker)}},
        ),
    )
    run = TrainingRun(thread=threading.Thread(target=lambda: None))

    def _fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the caller through join()
            run.error.append(e)

    run.thread = threading.Thread(target=_fit, name=f"train-{job_id}", daemon=True)
    run.thread.start()
    return run
