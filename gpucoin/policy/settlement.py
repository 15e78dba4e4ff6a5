"""Settlement planning: turn the policy's numbers into the ledger transfers that carry them out.

Each ``plan_*`` function is pure: it names accounts (``gpucoin.ledger.accounts``) and returns
the ``Transfer`` list one ledger operation posts, every transfer naming the digest of the
signed message that authorized it. Transfers of 0 µGPC are left out (the ledger refuses them),
so a plan may be empty. Every plan conserves: each transfer debits exactly what it credits.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpucoin.ledger.accounts import BURNED, ISSUANCE, TREASURY, escrow_account, wallet_account
from gpucoin.ledger.transfer import Code, Transfer
from gpucoin.money import check_amount
from gpucoin.policy.model import SlashingPolicy, TokenomicsPolicy
from gpucoin.policy.tokenomics import Reward, slash_amounts, split_payment


def _add(plan: list[Transfer], debit: str, credit: str, amount: int, code: Code, digest: str) -> None:
    if amount > 0:
        plan.append(Transfer(debit, credit, amount, code, digest))


def plan_interval(
    job_id: str,
    payment: int,
    escrow_left: int,
    tokenomics: TokenomicsPolicy,
    digest: str,
    worker_addresses: Sequence[str] = (),
) -> list[Transfer]:
    """Charge a settled interval's payment to the job's escrow.

    The charge is ``min(payment, escrow_left)`` µGPC (never above the escrow), split by
    ``split_payment``: the treasury share goes escrow -> treasury (TREASURY); the rest goes
    escrow -> burned (BURN) in ``burn_and_mint`` mode, or in ``direct`` mode escrow -> each
    worker's available account (PAY) in equal parts, the remainder to the first worker (rank 0).

    Args:
        job_id: the job whose escrow pays.
        payment: µGPC the interval costs (``interval_payment_ugpc``).
        escrow_left: µGPC still in the job's escrow.
        tokenomics: the policy's mode and shares.
        digest: 0x hex digest authorizing it (the interval's Settlement).
        worker_addresses: the worker of each rank, rank order; needed in ``direct`` mode only.

    Raises:
        AmountError: for a payment or escrow that is not an int64 of µGPC.
        ValueError: in ``direct`` mode with no worker address and something to pay them.
        UnknownAccount: for a bad job id or worker address.
    """
    check_amount(payment)
    check_amount(escrow_left)
    escrow = escrow_account(job_id)
    rest, treasury = split_payment(min(payment, escrow_left), tokenomics)
    plan: list[Transfer] = []
    if tokenomics.mode == "burn_and_mint":
        _add(plan, escrow, BURNED, rest, Code.BURN, digest)
    else:
        workers = list(worker_addresses)
        if rest > 0 and not workers:
            raise ValueError(f"direct mode must pay {rest} µGPC to the workers of job {job_id}, but none were named")
        if workers:
            each, remainder = divmod(rest, len(workers))
            for rank, address in enumerate(workers):
                amount = each + (remainder if rank == 0 else 0)
                _add(plan, escrow, wallet_account(address), amount, Code.PAY, digest)
    _add(plan, escrow, TREASURY, treasury, Code.TREASURY, digest)
    return plan


def plan_mint(rewards: Sequence[Reward], settlement_digests: Sequence[str]) -> list[Transfer]:
    """Mint each reward: issuance -> recipient's available (MINT_WORKER / MINT_VERIFIER).

    Args:
        rewards: from ``distribute_emission``.
        settlement_digests: the digest of the Settlement that authorizes each reward, parallel
            to ``rewards``.

    Raises:
        ValueError: if the two sequences differ in length.
        AmountError / UnknownAccount: for a bad amount or address in a reward.
    """
    if len(rewards) != len(settlement_digests):
        raise ValueError(f"{len(rewards)} rewards but {len(settlement_digests)} settlement digests")
    plan: list[Transfer] = []
    for reward, digest in zip(rewards, settlement_digests, strict=True):
        code = Code.MINT_WORKER if reward.role == "worker" else Code.MINT_VERIFIER
        _add(plan, ISSUANCE, wallet_account(reward.address), check_amount(reward.amount_ugpc), code, digest)
    return plan


def plan_slash(cheater: str, verifier: str | None, bond: int, slashing: SlashingPolicy, digest: str) -> list[Transfer]:
    """Slash a cheater's bond (``slash_amounts``).

    Cheater's bonded -> burned (SLASH) and cheater's bonded -> the verifier's available
    (WHISTLEBLOWER).

    With no verifier (fraud proven another way) the whistleblower share burns too.

    Args:
        cheater: address of the node whose bond is slashed.
        verifier: address of the verifier that proved the fraud, or None.
        bond: µGPC currently bonded by the cheater.
        digest: the failing VerificationReport's digest.

    Raises:
        AmountError: for a bond that is not an int64 of µGPC.
        ValueError: if the verifier is the cheater (it would win back part of its own slash).
        UnknownAccount: for a bad address.
    """
    bonded = wallet_account(cheater, "bonded")
    burned, whistleblower = slash_amounts(bond, slashing)
    if verifier is None:
        burned, whistleblower = burned + whistleblower, 0
    elif wallet_account(verifier) == wallet_account(cheater):
        raise ValueError(f"verifier {verifier} cannot be paid for slashing itself")
    plan: list[Transfer] = []
    _add(plan, bonded, BURNED, burned, Code.SLASH, digest)
    if verifier is not None:
        _add(plan, bonded, wallet_account(verifier), whistleblower, Code.WHISTLEBLOWER, digest)
    return plan


def plan_refund(job_id: str, consumer: str, escrow_left: int, digest: str) -> list[Transfer]:
    """Return what is left in a job's escrow to its consumer (REFUND), at the end of the job.

    Raises:
        AmountError / UnknownAccount: for a bad amount, job id or address.
    """
    plan: list[Transfer] = []
    _add(plan, escrow_account(job_id), wallet_account(consumer), check_amount(escrow_left), Code.REFUND, digest)
    return plan


def plan_escrow(job_id: str, consumer: str, budget: int, digest: str) -> list[Transfer]:
    """Move a job's budget (µGPC) from the consumer's available account to the job's escrow (ESCROW).

    ``digest`` is the JobOrder's. Raises AmountError / UnknownAccount for a bad amount, job id or address.
    """
    plan: list[Transfer] = []
    _add(plan, wallet_account(consumer), escrow_account(job_id), check_amount(budget), Code.ESCROW, digest)
    return plan


def plan_bond(provider: str, stake: int, digest: str) -> list[Transfer]:
    """Bond a volunteer's stake (µGPC): available -> bonded (BOND); ``digest`` is the NodeRegistration's.

    Raises AmountError / UnknownAccount for a bad amount or address.
    """
    plan: list[Transfer] = []
    _add(plan, wallet_account(provider), wallet_account(provider, "bonded"), check_amount(stake), Code.BOND, digest)
    return plan


def plan_unbond(provider: str, amount: int, digest: str) -> list[Transfer]:
    """Start unbonding stake (µGPC): bonded -> unbonding (UNBOND), still slashable until withdrawn.

    Raises AmountError / UnknownAccount for a bad amount or address.
    """
    plan: list[Transfer] = []
    _add(
        plan,
        wallet_account(provider, "bonded"),
        wallet_account(provider, "unbonding"),
        check_amount(amount),
        Code.UNBOND,
        digest,
    )
    return plan


def plan_withdraw(provider: str, amount: int, digest: str) -> list[Transfer]:
    """Release unbonded stake (µGPC) after ``unbonding_epochs``: unbonding -> available (WITHDRAW).

    Raises AmountError / UnknownAccount for a bad amount or address.
    """
    plan: list[Transfer] = []
    _add(
        plan,
        wallet_account(provider, "unbonding"),
        wallet_account(provider),
        check_amount(amount),
        Code.WITHDRAW,
        digest,
    )
    return plan


def plan_faucet(address: str, amount: int, digest: str) -> list[Transfer]:
    """Mint dev tokens (µGPC) to a wallet: issuance -> available (FAUCET); embedded local mode only.

    Raises AmountError / UnknownAccount for a bad amount or address.
    """
    plan: list[Transfer] = []
    _add(plan, ISSUANCE, wallet_account(address), check_amount(amount), Code.FAUCET, digest)
    return plan
