"""A job's Ray driver, as the head submits it (``python -m gpucoin.runtime.driver API_URL JOB_ID``).

The head places a job, then submits this as a Ray job through the dashboard with the job's
package in its runtime env and its entrypoint pinned to rank 0's node
(``entrypoint_label_selector``), so no job driver runs on the head node. It reads what to start
from the head's API (``GET /v1/jobs/{id}/launch``: the spec, the nodes, the signed Assignments),
starts the ranks with Ray Train (``runtime.trainer.launch``) and waits for them; the ranks talk
to the head over HTTP (``runtime.channel.HttpChannel``). It holds no key and decides nothing the
head does not check: the receipts are signed by each node's signer, the money moves on the head.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def run(api_url: str, job_id: str) -> None:
    """Start job ``job_id``'s ranks and wait for them.

    Raises:
        HeadError: the head cannot be reached or has no launch for the job.
        TrainingError: the ranks failed.
    """
    import ray

    from gpucoin.head.client import HeadClient
    from gpucoin.runtime.channel import HTTP_RETRY_S, HttpChannel
    from gpucoin.runtime.trainer import launch
    from gpucoin.spec import JobSpec

    info = HeadClient(api_url, retry_s=HTTP_RETRY_S).job_launch(job_id)
    spec = JobSpec.model_validate(info.spec)
    # the node's own Ray temp dir, not the head's (which Ray's GCS names, and which this node's
    # user may not write: the driver would abort opening its event log there)
    ray.init(log_to_driver=True, configure_logging=False, _temp_dir=os.environ.get("RAY_TMPDIR"))
    with tempfile.TemporaryDirectory(prefix=f"gpucoin-{job_id}-", dir=os.environ.get("RAY_TMPDIR")) as storage:
        training = launch(
            spec,
            job_id=job_id,
            node_ids=info.node_ids,
            channel=HttpChannel(info.api_url, job_id),
            storage_dir=Path(storage),
            buckets=info.buckets,
            data_source=info.data_source,
            assignments=info.assignments,
            start_step=info.start_step,
            start_manifests=info.start_manifests or None,
            previous=info.previous or None,
            attempt=info.attempt,
            end_step=info.end_step,
        )
        training.join()


def entry_point(run, usage: str, argv: list[str] | None) -> None:
    """Call ``run(*args)`` with the command line's arguments (as many as ``run`` takes); exit 1
    with one line on a gpucoin error, 2 with ``usage`` on a wrong count. What the head submits
    as Ray jobs runs through this."""
    import inspect

    from gpucoin.exceptions import GpucoinError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != len(inspect.signature(run).parameters):
        raise SystemExit(f"usage: {usage}")
    try:
        run(*args)
    except GpucoinError as e:
        raise SystemExit(f"error: {e}") from None


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``API_URL JOB_ID``."""
    entry_point(run, "python -m gpucoin.runtime.driver API_URL JOB_ID", argv)


if __name__ == "__main__":
    main()
