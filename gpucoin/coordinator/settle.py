"""Every ledger write of the coordinator: sign the authorizing message, record it, post the transfers.

Each write is one ledger operation with a client-chosen id derived from what it settles
(``escrow:<job>``, ``settle:<receipt digest>``, ``mint:<epoch>``...), so a retry after a crash
returns the original result instead of paying twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpucoin.exceptions import InsufficientFunds
from gpucoin.ledger import Ledger, Operation
from gpucoin.ledger.accounts import escrow_account, wallet_account
from gpucoin.money import format_gpc
from gpucoin.policy import settlement as plans
from gpucoin.policy.model import Policy, policy_hash
from gpucoin.policy.tokenomics import Reward, SettledInterval, distribute_emission, emission_ugpc, slash_amounts, split_payment
from gpucoin.wallet.messages import Domain, SignedMessage, sign
from gpucoin.wallet.nonces import NonceSource


@dataclass
class Coordinator:
    """The operator's settlement authority over one ledger.

    Attributes:
        ledger: where every message and transfer goes.
        policy: the incentive policy in force.
        account: the coordinator's key (signs Faucet and Settlement messages).
        domain: the EIP-712 domain every message of this market is signed in.
    """

    ledger: Ledger
    policy: Policy
    account: object
    domain: Domain
    nonces: NonceSource = field(default_factory=NonceSource)

    def __post_init__(self) -> None:
        self.policy_hash = policy_hash(self.policy)

    # -- messages -------------------------------------------------------------
    def _post(self, op_id: str, transfers: list, memo: str, messages: list[SignedMessage]) -> None:
        """Record ``messages`` and post the operation they authorize in one ledger transaction.

        Either both land or neither does (no order without its escrow after a crash); a retry of
        an operation already posted changes nothing but records the messages given.
        """
        self.ledger.post_batch([Operation(op_id, tuple(transfers), memo)], messages=messages)

    def record(self, msg: SignedMessage) -> SignedMessage:
        """Record a message someone else signed (the ledger checks its signature)."""
        self.ledger.record_message(msg)
        return msg

    def _settlement(self, job_id: str, subject: str, epoch: int = 0, **amounts: int) -> SignedMessage:
        """The coordinator's signed Settlement (not recorded yet: it goes in with its operation)."""
        fields = {"paid": 0, "burned": 0, "treasury": 0, "minted": 0, "slashed": 0, "refunded": 0, **amounts}
        return sign(
            self.account,
            "Settlement",
            self.domain,
            {"coordinator": self.account.address, "jobId": job_id, "subject": subject, "epoch": epoch, **fields, "policyHash": self.policy_hash, "nonce": self.nonces.next()},
        )

    # -- writes ---------------------------------------------------------------
    def faucet(self, address: str, amount_ugpc: int, op_id: str) -> None:
        """Dev faucet (embedded local mode only): mint ``amount_ugpc`` to ``address``; once per ``op_id``."""
        if self.ledger.operation(op_id) is not None:
            return
        msg = sign(self.account, "Faucet", self.domain, {"recipient": address, "amount": amount_ugpc, "nonce": self.nonces.next()})
        self._post(op_id, plans.plan_faucet(address, amount_ugpc, msg.digest), "dev faucet", [msg])

    def bond(self, registration: SignedMessage) -> None:
        """Record a volunteer's signed NodeRegistration and bond its stake (available -> bonded)."""
        m = registration.message
        self._post(f"bond:{registration.digest}", plans.plan_bond(m["provider"], m["stake"], registration.digest), f"bond {m['nodeId']}", [registration])

    def escrow(self, order: SignedMessage) -> None:
        """Record an engineer's signed JobOrder and escrow its budget.

        Raises:
            InsufficientFunds: if the consumer's available balance is below the budget (nothing changes).
        """
        m = order.message
        if m["budget"] <= 0:
            raise InsufficientFunds("a job needs a budget above 0 GPC")
        have = self.ledger.balance(wallet_account(m["consumer"]))
        if have < m["budget"]:
            raise InsufficientFunds(f"budget {format_gpc(m['budget'])} GPC exceeds the {format_gpc(have)} GPC available in wallet {m['consumer']}")
        self._post(f"escrow:{m['jobId']}", plans.plan_escrow(m["jobId"], m["consumer"], m["budget"], order.digest), "escrow budget", [order])

    def settle_interval(self, job_id: str, receipts: list[SignedMessage], payment_ugpc: int, epoch: int) -> tuple[int, int, int]:
        """Charge a settled (passed or unchallenged) interval: burn and treasury shares of its payment.

        ``payment_ugpc`` is capped at what is left in escrow; nothing is written when that is 0.

        Returns:
            (charged, burned, treasury) in µGPC; ``burned`` is 0 in ``direct`` mode, where that
            share is paid to the workers instead.
        """
        left = self.ledger.balance(escrow_account(job_id))
        pay = min(payment_ugpc, left)
        if pay == 0:
            return 0, 0, 0
        burn, treasury = split_payment(pay, self.policy.tokenomics)
        subject = receipts[0].digest
        msg = self._settlement(job_id, subject, epoch, paid=pay, burned=burn, treasury=treasury)
        workers = [r.message["worker"] for r in receipts]
        self._post(f"settle:{subject}", plans.plan_interval(job_id, pay, left, self.policy.tokenomics, msg.digest, workers), f"settle steps {receipts[0].message['stepStart']}-{receipts[0].message['stepEnd']}", [msg])
        return pay, (burn if self.policy.tokenomics.mode == "burn_and_mint" else 0), treasury

    def slash(self, job_id: str, cheater: str, verifier: str, report: SignedMessage) -> int:
        """Slash ``fraud_slash_fraction`` of the cheater's bond, the whistleblower share to the verifier.

        The transfers name the failing VerificationReport (``report``, already recorded) as what
        authorized them; a Settlement attests the amount. Returns µGPC slashed (<= the bond).
        """
        bond = self.ledger.balance(wallet_account(cheater, "bonded"))
        burned, whistle = slash_amounts(bond, self.policy.slashing)
        if burned + whistle == 0:
            return 0
        assert burned + whistle <= bond, (burned, whistle, bond)
        msg = self._settlement(job_id, report.message["receiptDigest"], slashed=burned + whistle)
        self._post(f"slash:{report.digest}", plans.plan_slash(cheater, verifier, bond, self.policy.slashing, report.digest), "slash", [msg])
        return burned + whistle

    def mint_epoch(self, epoch: int, job_id: str, intervals: list[SettledInterval]) -> list[Reward]:
        """Close ``epoch``: mint its emission pro rata to the payment of the intervals settled in it.

        Emission comes from the schedule alone (never from what was burned in the epoch); an epoch
        with no settled work mints nothing. Returns the rewards minted.
        """
        if not intervals or self.ledger.operation(f"mint:{epoch}") is not None:
            return []
        supply = self.ledger.totals()["supply"]
        emission = emission_ugpc(epoch, self.policy.tokenomics, supply)
        rewards = [r for r in distribute_emission(emission, intervals, self.policy.tokenomics) if r.amount_ugpc > 0]
        msgs = [self._settlement(job_id, r.receipt_digest, epoch, minted=r.amount_ugpc) for r in rewards]
        if rewards:
            self._post(f"mint:{epoch}", plans.plan_mint(rewards, [m.digest for m in msgs]), f"epoch {epoch} emission", msgs)
        return rewards

    def refund(self, job_id: str, order: SignedMessage) -> int:
        """Return what is left in the job's escrow to the consumer. Returns µGPC refunded."""
        left = self.ledger.balance(escrow_account(job_id))
        if left == 0:
            return 0
        msg = self._settlement(job_id, order.digest, refunded=left)
        self._post(f"refund:{job_id}", plans.plan_refund(job_id, order.message["consumer"], left, msg.digest), "refund unused escrow", [msg])
        return left

