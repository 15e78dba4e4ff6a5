"""Processes gpucoin started and must end: references that survive a pid's reuse, and
terminate-wait-kill with bounds."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field


class ProcessRef(BaseModel):
    """A process gpucoin started: its pid and start time (``psutil.Process.create_time``, unix
    seconds), so a pid the OS has since given to another process is never signalled."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pid: int = Field(ge=1)
    create_time: float = Field(ge=0)

    @classmethod
    def of(cls, pid: int) -> "ProcessRef":
        """The reference of the running process ``pid``."""
        import psutil

        return cls(pid=pid, create_time=psutil.Process(pid).create_time())

    def alive(self) -> bool:
        """Whether the process still runs (same pid, same start time, not a zombie)."""
        import psutil

        try:
            p = psutil.Process(self.pid)
            return abs(p.create_time() - self.create_time) < 0.01 and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def stop_group(pid: int, ref: ProcessRef | None, timeout_s: float) -> None:
    """SIGTERM the process group ``pid`` leads (a process started in a session of its own), wait
    up to ``timeout_s`` for its leader, then SIGKILL the group.

    With ``ref``, nothing is signalled unless the leader is still the process ``ref`` names.
    """
    if ref is not None and not ref.alive():
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)  # our own child: reap it
            if done:
                break
        except ChildProcessError:  # not ours (another command started it): poll instead
            if ref is None or not ref.alive():
                break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # what is left in the group, or a leader past its time


def end_processes(found: Iterable, timeout_s: float) -> int:
    """SIGTERM every ``psutil.Process`` in ``found``, wait up to ``timeout_s`` seconds, SIGKILL
    what is left and reap it (5 s more at most).

    Returns:
        How many processes were given.
    """
    import psutil

    procs = list(found)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    return len(procs)
