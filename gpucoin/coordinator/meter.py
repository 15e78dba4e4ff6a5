"""Metering an interval's worker time so that stalling earns nothing (pure: no Ray, no I/O).

The bill of an interval is ``price x workers x metered time`` (``policy.tokenomics``). Wall time
on the coordinator's clock would let one rank buy time for everyone: sleeping before it hands in
its receipt, or inside a step (every rank then waits for it in the next all-reduce). So:

- only the coordinator starts the meter (when it launches the ranks) and reads the clock: a rank's
  receipt is stamped when it arrives at the head's inbox, never with a time the rank names;
- an interval runs from the arrival of the *last* receipt of the interval before (or the launch),
  when every rank can go on, to the arrival of the *first* receipt of this one: the fastest
  rank's time. A rank that stalls before handing in holds its co-workers only until the next
  interval, whose start moves with it; and its own late receipt is never the first;
- after the first interval (which also holds the start-up), the metered time is at most
  ``pace_slack_bps`` of the job's best pace per step so far, which bounds a stall that holds
  every rank (inside a step, or between receipt and the next all-reduce);
- a rank whose receipt has not arrived ``interval_timeout_s`` after its interval could start is a
  lost node.

What this does not bound: a rank that is slow from the first step on sets the job's best pace
itself (docs/security.md, Residual risks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpucoin.policy.model import MeteringPolicy


@dataclass
class Meter:
    """The meter of one job's intervals, from its receipts' arrival times on the coordinator's clock (seconds).

    Attributes:
        workers: ranks in the job; steps_per_interval: K (the most steps of an interval).
        policy: the timeout and the pace slack.
        started_s: when the coordinator launched the ranks (the meter's start for every rank).
    """

    workers: int
    steps_per_interval: int
    policy: MeteringPolicy
    started_s: float
    last_close_s: float = field(init=False)
    best_ms_per_step: float | None = field(default=None, init=False)
    intervals_metered: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.workers < 1 or self.steps_per_interval < 1:
            raise ValueError(
                f"workers = {self.workers} and steps_per_interval = {self.steps_per_interval} must be >= 1"
            )
        self.last_close_s = self.started_s

    def elapsed_ms(self, arrived_s: float) -> int:
        """ms from the open interval's start (the last receipt of the one before, or the launch) to ``arrived_s``."""
        return max(0, round((arrived_s - self.last_close_s) * 1000))

    def close(self, arrivals_s: dict[int, float], steps: int) -> int:
        """Meter one interval of ``steps`` optimizer steps from every rank's receipt arrival time; return its metered ms.

        Args:
            arrivals_s: rank -> arrival time (s, coordinator clock) of its receipt for the interval,
                one per rank.
            steps: optimizer steps in the interval (K, or fewer for a job's last).

        Raises:
            ValueError: unless ``arrivals_s`` has exactly the ranks 0..workers-1 and 1 <= steps <= K.
        """
        if sorted(arrivals_s) != list(range(self.workers)):
            raise ValueError(
                f"an interval closes with one receipt per rank 0..{self.workers - 1}, got {sorted(arrivals_s)}"
            )
        if not 1 <= steps <= self.steps_per_interval:
            raise ValueError(f"an interval has 1..{self.steps_per_interval} steps, got {steps}")
        metered = self.elapsed_ms(min(arrivals_s.values()))
        if self.best_ms_per_step is not None:
            cap = int(self.best_ms_per_step * steps * self.policy.pace_slack_bps // 10_000)
            metered = min(metered, cap)
        if self.intervals_metered > 0:  # the first interval holds the start-up: no measure of the pace
            pace = metered / steps
            self.best_ms_per_step = pace if self.best_ms_per_step is None else min(self.best_ms_per_step, pace)
        self.intervals_metered += 1
        self.last_close_s = max(self.last_close_s, *arrivals_s.values())
        return metered

    def restart(self, started_s: float) -> None:
        """The ranks were launched again at ``started_s`` (after a Rewind): the next interval is
        metered from there, its start-up capped by the pace measured so far."""
        self.last_close_s = max(self.last_close_s, started_s)

    def overdue(self, now_s: float, waiting: set[int]) -> list[int]:
        """The ranks of ``waiting`` (those missing from the open interval) if it started more than
        ``interval_timeout_s`` before ``now_s``, else none."""
        return sorted(waiting) if now_s - self.last_close_s > self.policy.interval_timeout_s else []
