"""One replay on a verifier node, as the head submits it
(``python -m gpucoin.verify.replay_job API_URL JOB_ID REPLAY_ID``).

The head draws an interval, keeps the ``ReplayRequest`` and submits this as a Ray job pinned
to its verifier node, with the job's package in the runtime env. It reads the request and the
checkpoints from the head's API, replays (``verifier.check_interval``: the node's signing
process judges and signs) and hands the signed reports back. The head checks every report's
signature and what it names: nothing this process says is taken on its word.
"""

from __future__ import annotations

import math


def run(api_url: str, job_id: str, replay_id: str) -> None:
    """Replay the interval the head asked for and post the verifier's reports.

    Raises:
        HeadError: the head cannot be reached or has no such replay.
        VerificationError / WalletError: the replay could not be carried out or signed.
    """
    from gpucoin.head.client import HeadClient
    from gpucoin.runtime.channel import HTTP_RETRY_S, HttpChannel
    from gpucoin.verify.verifier import ReplayRequest, check_interval

    client = HeadClient(api_url, retry_s=HTTP_RETRY_S)
    req = ReplayRequest.from_dict(client.replay_request(job_id, replay_id))
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
    """Entry point: ``API_URL JOB_ID REPLAY_ID``."""
    from gpucoin.runtime.driver import entry_point

    entry_point(run, "python -m gpucoin.verify.replay_job API_URL JOB_ID REPLAY_ID", argv)


if __name__ == "__main__":
    main()
