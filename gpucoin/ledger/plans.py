"""The transfers each signed message authorizes, as pure functions (no database, no I/O).

Each ``plan_*`` function names accounts (``gpucoin.ledger.accounts``) and returns the ``Transfer``
list that carries out one authorizing message, every transfer naming that message's digest. The
coordinator posts exactly these lists, and the ledger's authorization rules
(``gpucoin.ledger.authorize``) recompute them from the message and refuse anything else: one
definition serves both. Transfers of 0 µGPC are left out (the ledger refuses them), so a plan may
be empty. Every plan conserves: each transfer debits exactly what it credits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gpucoin.ledger.accounts import BURNED, ISSUANCE, TREASURY, escrow_account, wallet_account
from gpucoin.ledger.transfer import Code, Transfer
from gpucoin.money import check_amount
from gpucoin.policy.model import SlashingPolicy, TokenomicsPolicy
from gpucoin.policy.tokenomics import Reward, slash_amounts, split_payment


@dataclass(frozen=True)
class SettlementAmounts:
    """The µGPC fields of a Settlement: what it moves, by where it goes.

    Attributes:
        paid: charged to the job's escrow (an interval's payment).
        burned: sent to system:burned (the burn share of a payment, or the burned part of a slash).
        treasury: sent to system:treasury.
        minted: always 0 (an epoch's emission is attested by its EpochClose).
        slashed: taken from a cheater's stake.
        refunded: returned from the escrow to the consumer.
    """

    paid: int = 0
    burned: int = 0
    treasury: int = 0
    minted: int = 0
    slashed: int = 0
    refunded: int = 0

    def fields(self) -> dict[str, int]:
        """The Settlement message fields, by name."""
        return {
            "paid": self.paid,
            "burned": self.burned,
            "treasury": self.treasury,
            "minted": self.minted,
            "slashed": self.slashed,
            "refunded": self.refunded,
        }


def charge_amounts(paid: int, tokenomics: TokenomicsPolicy) -> SettlementAmounts:
    """A Settlement charging an interval ``paid`` µGPC: the treasury share, and the rest burned in
    ``burn_and_mint`` mode (paid to the workers, so not burned, in ``direct`` mode)."""
    rest, treasury = split_payment(paid, tokenomics)
    return SettlementAmounts(paid=paid, burned=rest if tokenomics.mode == "burn_and_mint" else 0, treasury=treasury)


def slash_split(stake: int, slashing: SlashingPolicy, *, whistleblower: bool) -> tuple[int, int]:
    """(burned, to the whistleblower) of a slash of a cheater holding ``stake`` µGPC (bonded plus
    unbonding): ``slash_amounts``, with the whistleblower's share burned too when there is none
    to pay (the verifier is the cheater)."""
    burned, whistle = slash_amounts(stake, slashing)
    return (burned, whistle) if whistleblower else (burned + whistle, 0)


def _add(plan: list[Transfer], debit: str, credit: str, amount: int, code: Code, digest: str) -> None:
    if amount > 0:
        plan.append(Transfer(debit, credit, amount, code, digest))


def split_equally(amount: int, ranks: int) -> list[int]:
    """Split ``amount`` µGPC into ``ranks`` parts: equal floors, the remainder to rank 0.

    Raises:
        ValueError: for fewer than one rank.
    """
    if ranks < 1:
        raise ValueError(f"cannot split {amount} µGPC among {ranks} ranks")
    each, remainder = divmod(amount, ranks)
    return [each + (remainder if rank == 0 else 0) for rank in range(ranks)]


def plan_interval(
    job_id: str,
    payment: int,
    tokenomics: TokenomicsPolicy,
    digest: str,
    worker_addresses: Sequence[str] = (),
) -> list[Transfer]:
    """Charge a settled interval's payment to the job's escrow (the Settlement of a receipt).

    The payment is split by ``split_payment``: the treasury share goes escrow -> treasury
    (TREASURY); the rest goes escrow -> burned (BURN) in ``burn_and_mint`` mode, or in ``direct``
    mode escrow -> each worker's available account (PAY) by ``split_equally`` in rank order.

    Args:
        job_id: the job whose escrow pays.
        payment: µGPC charged (the Settlement's ``paid``; the caller caps it at the escrow).
        tokenomics: the policy's mode and shares.
        digest: 0x hex digest of the interval's Settlement.
        worker_addresses: the worker of each rank, rank order; needed in ``direct`` mode only.

    Raises:
        AmountError: for a payment that is not an int64 of µGPC.
        ValueError: in ``direct`` mode with no worker address and something to pay them.
        UnknownAccount: for a bad job id or worker address.
    """
    check_amount(payment)
    escrow = escrow_account(job_id)
    rest, treasury = split_payment(payment, tokenomics)
    plan: list[Transfer] = []
    if tokenomics.mode == "burn_and_mint":
        _add(plan, escrow, BURNED, rest, Code.BURN, digest)
    else:
        workers = list(worker_addresses)
        if rest > 0 and not workers:
            raise ValueError(f"direct mode must pay {rest} µGPC to the workers of job {job_id}, but none were named")
        if workers:
            for address, amount in zip(workers, split_equally(rest, len(workers)), strict=True):
                _add(plan, escrow, wallet_account(address), amount, Code.PAY, digest)
    _add(plan, escrow, TREASURY, treasury, Code.TREASURY, digest)
    return plan


def plan_mint(rewards: Sequence[Reward], digest: str) -> list[Transfer]:
    """Mint an epoch's rewards: issuance -> recipient's available (MINT_WORKER / MINT_VERIFIER).

    Args:
        rewards: from ``distribute_emission``, in its order.
        digest: the epoch's EpochClose, which authorizes every one of them.

    Raises:
        AmountError / UnknownAccount: for a bad amount or address in a reward.
    """
    plan: list[Transfer] = []
    for reward in rewards:
        code = Code.MINT_WORKER if reward.role == "worker" else Code.MINT_VERIFIER
        _add(plan, ISSUANCE, wallet_account(reward.address), check_amount(reward.amount_ugpc), code, digest)
    return plan


def plan_slash(
    cheater: str, verifier: str | None, bonded: int, unbonding: int, burned: int, whistleblower: int, digest: str
) -> list[Transfer]:
    """Take ``burned + whistleblower`` µGPC of a cheater's stake: from its bonded account first,
    then from its unbonding one (still slashable), ``burned`` to system:burned (SLASH) and then
    ``whistleblower`` to the verifier's available account (WHISTLEBLOWER).

    Args:
        cheater: address of the node whose stake is slashed.
        verifier: address of the verifier that proved the fraud; None burns its share too.
        bonded / unbonding: µGPC the cheater has bonded and unbonding now.
        burned / whistleblower: the two parts of the slash (``slash_amounts``).
        digest: the slash's Settlement.

    Raises:
        AmountError: for an amount that is not an int64 of µGPC.
        ValueError: if the slash exceeds the stake, or the verifier is the cheater.
        UnknownAccount: for a bad address.
    """
    for amount in (bonded, unbonding, burned, whistleblower):
        check_amount(amount)
    if burned + whistleblower > bonded + unbonding:
        raise ValueError(f"a slash of {burned + whistleblower} µGPC exceeds the {bonded + unbonding} µGPC staked")
    if verifier is None:
        burned, whistleblower = burned + whistleblower, 0
    elif wallet_account(verifier) == wallet_account(cheater):
        raise ValueError(f"verifier {verifier} cannot be paid for slashing itself")
    sources = [[wallet_account(cheater, "bonded"), bonded], [wallet_account(cheater, "unbonding"), unbonding]]
    plan: list[Transfer] = []
    for code, credit, amount in ((Code.SLASH, BURNED, burned), (Code.WHISTLEBLOWER, verifier, whistleblower)):
        for source in sources:
            part = min(amount, source[1])
            if part:
                _add(plan, source[0], credit if credit == BURNED else wallet_account(credit), part, code, digest)
                source[1] -= part
                amount -= part
    return plan


def plan_void_charge(job_id: str, payment: int, digest: str) -> list[Transfer]:
    """Charge a void interval of a job whose package is not vetted to its escrow and burn all of it
    (BURN): the submitter pays for the dispute, nobody is paid from it (docs/verification.md,
    Vetted job packages). ``digest`` is the Settlement's.

    Raises:
        AmountError / UnknownAccount: for a bad amount or job id.
    """
    plan: list[Transfer] = []
    _add(plan, escrow_account(job_id), BURNED, check_amount(payment), Code.BURN, digest)
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

    ``digest`` is the provider's Unbond. Raises AmountError / UnknownAccount for a bad amount or address.
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
    """Release matured unbonding stake (µGPC): unbonding -> available (WITHDRAW).

    ``digest`` is the provider's Withdraw. Raises AmountError / UnknownAccount for a bad amount or address.
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
    """Mint dev tokens (µGPC) to a wallet: issuance -> available (FAUCET); a dev market only.

    Raises AmountError / UnknownAccount for a bad amount or address.
    """
    plan: list[Transfer] = []
    _add(plan, ISSUANCE, wallet_account(address), check_amount(amount), Code.FAUCET, digest)
    return plan


def plan_genesis(allocations: Sequence[Mapping[str, object]], digest: str) -> list[Transfer]:
    """Mint a Genesis's allocations: issuance -> each recipient's available (GENESIS), in order.

    Args:
        allocations: the Genesis's ``allocations`` (``recipient`` address, ``amount`` µGPC).
        digest: the Genesis's digest.

    Raises:
        AmountError / UnknownAccount: for a bad amount or address.
    """
    plan: list[Transfer] = []
    for a in allocations:
        _add(plan, ISSUANCE, wallet_account(str(a["recipient"])), check_amount(a["amount"]), Code.GENESIS, digest)
    return plan
