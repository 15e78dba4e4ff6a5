"""A job's replay worker on its verifier node, as the head submits it
(``python -m gpucoin.verify.replay_job API_URL JOB_ID GENERATION VERIFIER``).

When the head draws a job's first replay it submits this as a Ray job pinned to the job's
verifier node, with the job's package in the runtime env. It runs the job's drawn replays one at a time, oldest
first, as the head lists them (``GET /v1/jobs/{id}/replays``): reads each request and the
checkpoints from the head's API, replays (``verifier.check_interval``: the node's signing process
judges and signs) and hands the signed reports back. One process for the job's whole life saves
every replay but the first the start of a Ray job and the imports of torch and the job's code
(~15 s each on a 2-core host); a replay that would convict is still reproduced in a fresh
process (``verifier.gather_evidence``), so nothing this process kept from an earlier replay can
convict anyone. It exits when the job no longer runs, after ``IDLE_EXIT_S`` without work, or
with an error on a replay that could not run (the head then fails that replay and starts the
next generation for the rest). The head checks every report's signature and what it names:
nothing this process says is taken on its word.
"""

from __future__ import annotations

import math
import time

POLL_S = 0.5
"""Pause between two asks for work that found none (each ask is a long poll the head holds up to
``WAIT_S``)."""

WAIT_S = 8.0
"""How long the head holds one ask while there is no work (``GET /replays?wait_s=``)."""

IDLE_EXIT_S = 600.0
"""The worker exits after this long without a replay to run (the head starts another when a
replay is drawn and none runs)."""


def run(api_url: str, job_id: str, generation: str, verifier: str) -> None:
    """Run job ``job_id``'s drawn replays of ``verifier`` (this node's address) until it ends;
    ``generation`` numbers this worker among the job's replay workers on this node (the head
    starts the next when one dies). A job re-checked by a second verifier has a worker there too,
    which lists only that verifier's replays.

    Raises:
        HeadError: the head cannot be reached.
        VerificationError / WalletError: a replay could not be carried out or signed.
    """
    from gpucoin.head.client import HeadClient
    from gpucoin.runtime.channel import HTTP_RETRY_S
    from gpucoin.runtime.faults import scope_to_job

    scope_to_job(job_id)  # a test's verifier may misbehave in one job only (runtime.faults)
    client = HeadClient(api_url, retry_s=HTTP_RETRY_S)
    gen = int(generation)
    done: set[str] = set()
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < IDLE_EXIT_S:
        queue = client.replay_queue(job_id, verifier, wait_s=WAIT_S)
        if not queue.open:
            return
        todo = [rid for rid in queue.pending if rid not in done]
        if not todo:
            time.sleep(POLL_S)
            continue
        done.add(todo[0])
        replay_one(client, api_url, job_id, todo[0], gen)
        idle_since = time.monotonic()


def replay_one(client, api_url: str, job_id: str, replay_id: str, generation: int) -> None:
    """Replay the interval the head drew as ``replay_id`` and post the verifier's reports.

    Raises:
        HeadError: the head cannot be reached or has no such replay.
        VerificationError / WalletError: the replay could not be carried out or signed.
    """
    from gpucoin.runtime.channel import HttpChannel
    from gpucoin.verify.verifier import ReplayRequest, check_interval

    req = ReplayRequest.from_dict(client.replay_request(job_id, replay_id, worker=generation))
    result = check_interval(req, HttpChannel(api_url, job_id))
    findings = []
    for f in result.findings:
        d = f.to_dict()
        d["distance"] = d["distance"] if math.isfinite(d["distance"]) else None  # JSON has no infinity
        findings.append(d)
    client.replay_result(
        job_id, replay_id, {"verifier": result.verifier, "reports": list(result.reports), "findings": findings}
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``API_URL JOB_ID GENERATION``."""
    from gpucoin.runtime.driver import entry_point

    entry_point(run, "python -m gpucoin.verify.replay_job API_URL JOB_ID GENERATION VERIFIER", argv)


if __name__ == "__main__":
    main()
