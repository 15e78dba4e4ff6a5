"""The ledger's emission clock and what closing an epoch mints (pure: no database, no I/O).

Epochs follow the clock: epoch ``e`` is the half-open time span
``[startTime + e x epoch_length_s, startTime + (e + 1) x epoch_length_s)`` after the market's
Genesis ``startTime`` (unix seconds, signed in the Genesis), with the bound policy's
``tokenomics.epoch_length_s``. An interval's charge counts in the epoch the ledger's clock is in
when it is posted; an epoch may be closed only once it has ended, only once, and only after
every epoch closed before it. Closing epoch ``e`` mints ``emission_ugpc(e)`` (never past the hard
cap) pro rata to the payment of every interval charged in ``e``, across all jobs
(``distribute_emission``, Render's rule: emission never depends on what was burned in the epoch).
In ``direct`` mode the workers are paid from escrow instead, and epochs mint nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpucoin.policy.model import TokenomicsPolicy
from gpucoin.policy.tokenomics import Reward, SettledInterval, distribute_emission, emission_ugpc


def epoch_at(time_us: int, start_s: int, epoch_length_s: int) -> int:
    """The epoch that the time ``time_us`` (µs since the Unix epoch) falls in; -1 before ``start_s``.

    Args:
        time_us: a time as the ledger stores it (µs).
        start_s: the Genesis ``startTime`` (unix seconds): the start of epoch 0.
        epoch_length_s: seconds per epoch (> 0).
    """
    offset_us = time_us - start_s * 1_000_000
    if offset_us < 0:
        return -1
    return offset_us // (epoch_length_s * 1_000_000)


def epoch_end_s(epoch: int, start_s: int, epoch_length_s: int) -> int:
    """Unix second at which ``epoch`` ends (the first second of the next one)."""
    return start_s + (epoch + 1) * epoch_length_s


@dataclass(frozen=True)
class EpochPlan:
    """What closing one epoch mints.

    Attributes:
        epoch: the epoch closed.
        emission: µGPC its schedule allows (``emission_ugpc``, capped by the hard cap).
        payments: µGPC charged in it, all jobs together (the denominator of the pro rata split).
        rewards: one per receipt and role (``distribute_emission``); they sum to ``minted``.
    """

    epoch: int
    emission: int
    payments: int
    rewards: tuple[Reward, ...]

    @property
    def minted(self) -> int:
        """µGPC the rewards add up to (<= ``emission``: each reward is floored once)."""
        return sum(r.amount_ugpc for r in self.rewards)


def plan_epoch(
    epoch: int, intervals: Sequence[SettledInterval], tokenomics: TokenomicsPolicy, supply_ugpc: int
) -> EpochPlan:
    """What closing ``epoch`` mints, given every interval charged in it and the supply before.

    Args:
        epoch: the epoch to close (>= 0).
        intervals: every interval charged in it, across all jobs (any order).
        tokenomics: the bound policy's schedule and shares.
        supply_ugpc: µGPC in circulation just before the close (minted - burned).

    Raises:
        ValueError / AmountError: as ``emission_ugpc`` and ``distribute_emission``.
    """
    # direct mode pays the workers from escrow instead of emission (SPEC.md, Money): nothing to mint
    emission = 0 if tokenomics.mode == "direct" else emission_ugpc(epoch, tokenomics, supply_ugpc)
    rewards = tuple(distribute_emission(emission, intervals, tokenomics))
    return EpochPlan(epoch, emission, sum(iv.payment_ugpc for iv in intervals), rewards)
