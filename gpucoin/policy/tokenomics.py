"""The token arithmetic of a policy: payments, splits, emission, rewards, slashes, check rates.

Pure functions on ints of µGPC (no floats in money, no I/O). Every division floors, and each
function says where the remainder goes so that sums are exact (SPEC.md, Money).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from gpucoin.money import check_amount
from gpucoin.policy.model import BPS, SlashingPolicy, TokenomicsPolicy

MS_PER_HOUR = 3_600_000
"""Milliseconds in one hour: prices are per worker-hour, wall time is metered in ms."""


def _count(name: str, value: int, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def interval_payment_ugpc(price_ugpc_per_worker_hour: int, workers: int, wall_ms: int) -> int:
    """µGPC an interval costs: ``price x workers x wall_ms // 3_600_000``.

    SPEC.md's ``clearing_price x W x t / 3600`` with t the coordinator's wall-clock
    milliseconds (not what the workers claim), floored to whole µGPC.

    Args:
        price_ugpc_per_worker_hour: the job's clearing price, µGPC per worker-hour.
        workers: ranks of the job (W).
        wall_ms: wall time of the interval on the coordinator's clock, ms.

    Raises:
        AmountError: for a price that is not an int64 of µGPC, or a result above int64.
        ValueError: for a negative or non-int ``workers`` / ``wall_ms``.
    """
    check_amount(price_ugpc_per_worker_hour)
    _count("workers", workers)
    _count("wall_ms", wall_ms)
    return check_amount(price_ugpc_per_worker_hour * workers * wall_ms // MS_PER_HOUR)


def split_payment(payment: int, tokenomics: TokenomicsPolicy) -> tuple[int, int]:
    """Split a settled payment (µGPC) into ``(burn, treasury)``; ``burn + treasury == payment``.

    ``treasury = payment x treasury_share_bps // 10_000`` and the rest, rounding included, is
    the burn share (in ``direct`` mode that share is paid to the workers instead of burned).

    Raises:
        AmountError: for a payment that is not an int64 of µGPC.
    """
    check_amount(payment)
    treasury = payment * tokenomics.treasury_share_bps // BPS
    return payment - treasury, treasury


def emission_ugpc(epoch: int, tokenomics: TokenomicsPolicy, supply_ugpc: int) -> int:
    """µGPC epoch ``epoch`` may mint given the current supply (minted - burned).

    ``initial_emission_ugpc`` halved (floored) once per ``emission_halving_epochs`` elapsed,
    and never more than ``hard_cap_ugpc - supply_ugpc`` (0 once the supply is at the cap), so
    minting it can never take the supply past the cap.

    Raises:
        ValueError: for a negative or non-int epoch.
        AmountError: for a supply that is not an int64 of µGPC.
    """
    _count("epoch", epoch)
    check_amount(supply_ugpc)
    halvings = epoch // tokenomics.emission_halving_epochs
    initial = tokenomics.initial_emission_ugpc
    scheduled = 0 if halvings >= initial.bit_length() else initial >> halvings
    return max(0, min(scheduled, tokenomics.hard_cap_ugpc - supply_ugpc))


@dataclass(frozen=True)
class SettledInterval:
    """One interval settled in an epoch, as the emission sees it.

    Attributes:
        receipt_digests: 0x hex digest of each rank's WorkReceipt, in rank order.
        workers: address of the worker of each rank, in rank order (same length).
        verifier: address of the verifier that replayed it and passed it, or None if unchecked.
        payment_ugpc: µGPC this interval's consumer paid (``interval_payment_ugpc``, capped at escrow).

    Raises:
        ValueError: for no ranks, lengths that differ, or a negative payment.
    """

    receipt_digests: tuple[str, ...]
    workers: tuple[str, ...]
    verifier: str | None
    payment_ugpc: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "receipt_digests", tuple(self.receipt_digests))
        object.__setattr__(self, "workers", tuple(self.workers))
        if not self.receipt_digests:
            raise ValueError("a settled interval needs at least one rank")
        if len(self.workers) != len(self.receipt_digests):
            raise ValueError(f"{len(self.receipt_digests)} receipt digests but {len(self.workers)} worker addresses")
        if len(set(self.receipt_digests)) != len(self.receipt_digests):
            raise ValueError("an interval lists the same receipt digest twice")
        check_amount(self.payment_ugpc)


@dataclass(frozen=True)
class Reward:
    """µGPC of emission to mint to one address for one receipt.

    Attributes:
        address: the recipient (worker of the rank, or the interval's verifier).
        amount_ugpc: µGPC, > 0.
        role: ``"worker"`` (MINT_WORKER) or ``"verifier"`` (MINT_VERIFIER).
        receipt_digest: the rank's WorkReceipt digest this reward is for; the Settlement of
            that receipt attests it.
    """

    address: str
    amount_ugpc: int
    role: Literal["worker", "verifier"]
    receipt_digest: str


_ROLE_ORDER = {"worker": 0, "verifier": 1}


def distribute_emission(
    emission: int, intervals: Sequence[SettledInterval], tokenomics: TokenomicsPolicy
) -> list[Reward]:
    """Share an epoch's emission among the workers and verifiers of its settled intervals.

    Interval i, with payment p_i out of the epoch's total P and R_i ranks, earns
    ``emission x p_i / P`` (pro rata to the payment it caused: SPEC.md, Money). Of that, each
    rank's worker gets ``worker_share_bps / 10_000 / R_i`` and, if the interval was checked,
    its verifier gets ``verifier_share_bps / 10_000 / R_i`` per rank: one reward per receipt
    and role, so each receipt's Settlement attests everything it minted. An unchecked
    interval's verifier share is not minted. Each reward is its exact share floored once, so it
    is within 1 µGPC below it and the total never exceeds ``emission``. Zero rewards are left
    out; an epoch with no payment mints nothing.

    Args:
        emission: µGPC the epoch mints (``emission_ugpc``).
        intervals: the epoch's settled intervals; receipt digests unique across all of them.
        tokenomics: gives ``worker_share_bps`` and ``verifier_share_bps``.

    Returns:
        Rewards sorted by (receipt digest, worker before verifier): the same list for any order
        of ``intervals``.

    Raises:
        AmountError: for an emission that is not an int64 of µGPC.
        ValueError: for a receipt digest that appears in two intervals.
    """
    check_amount(emission)
    seen: set[str] = set()
    for iv in intervals:
        dup = seen.intersection(iv.receipt_digests)
        if dup:
            raise ValueError(f"receipt digest {sorted(dup)[0]} appears in two settled intervals")
        seen.update(iv.receipt_digests)
    total = sum(iv.payment_ugpc for iv in intervals)
    if emission == 0 or total == 0:
        return []
    rewards: list[Reward] = []
    for iv in intervals:
        ranks = len(iv.receipt_digests)
        denom = total * BPS * ranks
        worker_each = emission * iv.payment_ugpc * tokenomics.worker_share_bps // denom
        verifier_each = emission * iv.payment_ugpc * tokenomics.verifier_share_bps // denom
        for digest, worker in zip(iv.receipt_digests, iv.workers, strict=True):
            if worker_each > 0:
                rewards.append(Reward(worker, worker_each, "worker", digest))
            if iv.verifier is not None and verifier_each > 0:
                rewards.append(Reward(iv.verifier, verifier_each, "verifier", digest))
    rewards.sort(key=lambda r: (r.receipt_digest, _ROLE_ORDER[r.role]))
    return rewards


def slash_amounts(bond: int, slashing: SlashingPolicy) -> tuple[int, int]:
    """Split the slash of a bond of ``bond`` µGPC into ``(burned, whistleblower)`` µGPC.

    The slash is ``bond x fraud_slash_fraction_bps // 10_000``; the whistleblower (the verifier
    that proved the fraud) gets ``slash x whistleblower_share_bps // 10_000`` and the rest,
    rounding included, burns. ``burned + whistleblower <= bond`` always (SPEC.md, Money).

    Raises:
        AmountError: for a bond that is not an int64 of µGPC.
    """
    check_amount(bond)
    slashed = bond * slashing.fraud_slash_fraction_bps // BPS
    whistleblower = slashed * slashing.whistleblower_share_bps // BPS
    return slashed - whistleblower, whistleblower
