"""Ray jobs the head submits through its dashboard (HTTP and JSON only: the head is no Ray driver).

A placed job's driver (``runtime.driver``) and its replay worker (``verify.replay_job``) run as
Ray jobs with ``submission_id`` chosen by the head (the job id; ``<job id>~replays~<n>``, which no job id can be), so a
restarted head finds them again, and with ``entrypoint_label_selector`` pinning the entrypoint
to a volunteer's or the verifier's node: without it Ray runs every driver on the head node.
The job's package goes in the runtime env's ``py_modules`` (Ray uploads it once, by content).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from gpucoin.exceptions import HeadError, TrainingError

LOG_TAIL_CHARS = 2000
"""How much of a failed Ray job's log a message quotes."""


class RayJobs:
    """Submit, watch and stop Ray jobs on the cluster whose dashboard is ``dashboard_url``.

    Raises (every method):
        HeadError: the dashboard cannot be reached or refuses.
    """

    def __init__(self, dashboard_url: str, token_path: Path):
        self.dashboard_url = dashboard_url
        self.token_path = Path(token_path)
        self._client = None
        self._lock = threading.Lock()

    def client(self):
        from ray.job_submission import JobSubmissionClient

        with self._lock:
            if self._client is None:
                token = self.token_path.read_text().strip()
                try:
                    self._client = JobSubmissionClient(self.dashboard_url, headers={"Authorization": f"Bearer {token}"})
                except (ConnectionError, RuntimeError, ValueError) as e:
                    raise HeadError(f"cannot reach Ray's job API at {self.dashboard_url}: {e}") from None
            return self._client

    def submit(
        self, submission_id: str, module_args: list[str], node_id: str, module_dir: Path, env: dict | None = None
    ) -> None:
        """Run ``python -m <module_args...>`` as Ray job ``submission_id`` on node ``node_id`` with
        the job's package ``module_dir`` importable. A job of that id already there is kept
        (a retry after a restart submits nothing twice)."""
        import shlex

        if self.status(submission_id) is not None:
            return
        entrypoint = "python -m " + " ".join(shlex.quote(a) for a in module_args)
        runtime_env = {"py_modules": [str(module_dir)], "env_vars": dict(env or {})}
        try:
            self.client().submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env=runtime_env,
                entrypoint_num_cpus=0,
                entrypoint_label_selector={"ray.io/node-id": node_id},
            )
        except (RuntimeError, ValueError, ConnectionError) as e:
            raise HeadError(f"Ray refused job {submission_id}: {str(e).strip().splitlines()[-1]}") from None

    def status(self, submission_id: str) -> str | None:
        """Ray's ``JobStatus`` value of ``submission_id`` (``PENDING``, ``RUNNING``, ``SUCCEEDED``,
        ``FAILED``, ``STOPPED``), or None if Ray has no such job."""
        try:
            return str(self.client().get_job_status(submission_id).value)
        except RuntimeError as e:
            if "does not exist" in str(e) or "404" in str(e):
                return None
            raise HeadError(f"cannot read Ray job {submission_id}: {str(e).strip().splitlines()[-1]}") from None
        except ConnectionError as e:
            raise HeadError(f"cannot reach Ray's job API: {e}") from None

    def driver_node(self, submission_id: str) -> str | None:
        """The Ray node id its entrypoint runs (or ran) on, once known."""
        try:
            return self.client().get_job_info(submission_id).driver_node_id or None
        except (RuntimeError, ConnectionError) as e:
            raise HeadError(f"cannot read Ray job {submission_id}: {e}") from None

    def logs_tail(self, submission_id: str) -> str:
        """The last ``LOG_TAIL_CHARS`` of the job's log, else of Ray's message about it ('' if
        neither can be read)."""
        try:
            return self.client().get_job_logs(submission_id)[-LOG_TAIL_CHARS:]
        except (RuntimeError, ConnectionError):
            pass
        try:
            return (self.client().get_job_info(submission_id).message or "")[-LOG_TAIL_CHARS:]
        except (RuntimeError, ConnectionError):
            return ""

    def stop_prefixed(self, prefix: str) -> int:
        """Stop every unfinished Ray job whose submission id starts with ``prefix``; how many."""
        try:
            found = [j.submission_id for j in self.client().list_jobs() if (j.submission_id or "").startswith(prefix)]
        except (RuntimeError, ConnectionError):
            return 0
        for sid in found:
            self.stop(sid)
        return len(found)

    def stop(self, submission_id: str) -> None:
        """Ask Ray to stop the job (no-op for one that ended or does not exist)."""
        try:
            self.client().stop_job(submission_id)
        except (RuntimeError, ConnectionError):
            pass


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class RayJobTraining:
    """A job's training as its Ray job (``coordinator.run.JobRun.run``'s ``training``); Ray is
    asked at most every ``ask_every_s`` seconds (``alive`` is called on every loop of the run)."""

    jobs: RayJobs
    submission_id: str
    ask_every_s: float = 2.0
    _status: str | None = None
    _asked_s: float = -1e9

    def alive(self) -> bool:
        """True until the Ray job ended (a dashboard that cannot be read counts as still running)."""
        import time

        if self._status not in TERMINAL and time.monotonic() - self._asked_s >= self.ask_every_s:
            self._asked_s = time.monotonic()
            try:
                self._status = self.jobs.status(self.submission_id)
            except HeadError:
                return True
        return self._status not in TERMINAL

    def join(self) -> None:
        """Raise ``TrainingError`` with the log's last line if the Ray job did not succeed."""
        status = self.jobs.status(self.submission_id)
        if status == "SUCCEEDED":
            return
        lines = [x for x in self.jobs.logs_tail(self.submission_id).splitlines() if x.strip()]
        raise TrainingError(f"the job's Ray driver ended {status}: {lines[-1] if lines else 'no log'}")
