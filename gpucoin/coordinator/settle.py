"""Every ledger write of the coordinator: sign the authorizing message, record it, post the transfers.

Each write is one ledger operation whose id names the message that authorizes it
(``escrow:<JobOrder digest>``, ``settle:<Settlement digest>``, ``close:<EpochClose digest>``...):
a retry of the same message returns the original result, and nobody can take an id the
coordinator will need, since nobody knows a digest before the coordinator signs it. That nothing
is paid twice is the ledger's rules' doing (each message authorizes one operation; an interval is
charged once, a receipt's worker slashed once, an epoch closed once). The transfers are the ``gpucoin.ledger.plans``
list of the signed message, the very list the ledger's authorization rules recompute.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpucoin.exceptions import ConflictError, InsufficientFunds, StaleEpoch, Unauthorized
from gpucoin.ledger import Ledger, Operation
from gpucoin.ledger.accounts import escrow_account, wallet_account
from gpucoin.ledger.epochs import EpochPlan, plan_epoch
from gpucoin.ledger.plans import (
    SettlementAmounts,
    charge_amounts,
    plan_bond,
    plan_escrow,
    plan_faucet,
    plan_interval,
    plan_mint,
    plan_refund,
    plan_slash,
    plan_unbond,
    plan_void_charge,
    plan_withdraw,
    slash_split,
)
from gpucoin.ledger.transfer import Transfer
from gpucoin.money import format_gpc
from gpucoin.policy.model import Policy, policy_hash
from gpucoin.wallet.messages import Domain, SignedMessage, sign
from gpucoin.wallet.nonces import NonceSource

STALE_EPOCH_RETRIES = 3
"""Times a Settlement is signed again when the ledger's epoch moved on while it was being signed."""


def genesis_message(
    account: object,
    domain: Domain,
    policy: Policy,
    *,
    dev: bool,
    admin: str | None = None,
    allocations: Sequence[tuple[str, int]] = (),
    start_s: int | None = None,
) -> SignedMessage:
    """A market's Genesis signed by its coordinator ``account`` (the domain's verifyingContract).

    Args:
        dev: a dev market (the embedded local mode): only it admits Faucet messages.
        admin: the address whose PolicyChange messages count (default: the coordinator).
        allocations: (address, µGPC) minted at genesis.
        start_s: unix second at which epoch 0 starts (default: now).
    """
    return sign(
        account,
        "Genesis",
        domain,
        {
            "coordinator": account.address,
            "admin": admin or account.address,
            "chainId": domain.chain_id,
            "dev": dev,
            "policyHash": policy_hash(policy),
            "startTime": int(time.time()) if start_s is None else start_s,
            "allocations": [{"recipient": a, "amount": amount} for a, amount in allocations],
        },
    )


@dataclass
class Coordinator:
    """The operator's settlement authority over one ledger.

    Attributes:
        ledger: where every message and transfer goes (its Genesis names this coordinator).
        policy: the incentive policy in force (the ledger's).
        account: the coordinator's key (signs Faucet, Assignment, Settlement and EpochClose messages).
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
    def _post(self, op_id: str, transfers: list[Transfer], memo: str, messages: list[SignedMessage]) -> None:
        """Record ``messages`` and post the operation they authorize in one ledger transaction.

        Either both land or neither does (no order without its escrow after a crash); a retry of
        an operation already posted changes nothing but records the messages given.
        """
        self.ledger.post_batch([Operation(op_id, tuple(transfers), memo)], messages=messages)

    def record(self, msg: SignedMessage) -> SignedMessage:
        """Record a message someone else signed (the ledger checks its signature and admission)."""
        self.ledger.record_message(msg)
        return msg

    def _settlement(self, job_id: str, subject: str, amounts: SettlementAmounts) -> SignedMessage:
        """The coordinator's signed Settlement in the ledger's current epoch (recorded with its operation)."""
        return sign(
            self.account,
            "Settlement",
            self.domain,
            {
                "coordinator": self.account.address,
                "jobId": job_id,
                "subject": subject,
                "epoch": self.ledger.current_epoch(),
                **amounts.fields(),
                "policyHash": self.policy_hash,
                "nonce": self.nonces.next(),
            },
        )

    def _settle(
        self, kind: str, job_id: str, subject: str, amounts: SettlementAmounts, plan, memo: str
    ) -> SignedMessage:
        """Sign a Settlement of ``subject`` and post ``plan(digest)`` as operation ``<kind>:<digest>``;
        signed again if the epoch moved on. At most once comes from the ledger's rules (an interval
        is charged once, a receipt's worker slashed once, an escrow refunded once), not the id."""
        for attempt in range(STALE_EPOCH_RETRIES):
            msg = self._settlement(job_id, subject, amounts)
            try:
                self._post(f"{kind}:{msg.digest}", plan(msg.digest), memo, [msg])
                return msg
            except StaleEpoch:
                if attempt + 1 == STALE_EPOCH_RETRIES:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    # -- writes ---------------------------------------------------------------
    def faucet(self, address: str, amount_ugpc: int, op_id: str) -> None:
        """Dev faucet (a dev market only): mint ``amount_ugpc`` to ``address``; once per ``op_id``."""
        if self.ledger.operation(op_id) is not None:
            return
        msg = sign(
            self.account,
            "Faucet",
            self.domain,
            {"recipient": address, "amount": amount_ugpc, "nonce": self.nonces.next()},
        )
        self._post(op_id, plan_faucet(address, amount_ugpc, msg.digest), "dev faucet", [msg])

    def bond(self, registration: SignedMessage) -> None:
        """Record a volunteer's signed NodeRegistration and bond its stake (available -> bonded)."""
        m = registration.message
        self._post(
            f"bond:{registration.digest}",
            plan_bond(m["provider"], m["stake"], registration.digest),
            f"bond {m['nodeId']}",
            [registration],
        )

    def unbond(self, msg: SignedMessage) -> None:
        """Record a provider's signed Unbond and move that much stake bonded -> unbonding (the ledger
        checks the signer, the bond and when it matures)."""
        m = msg.message
        self._post(f"unbond:{msg.digest}", plan_unbond(m["provider"], m["amount"], msg.digest), "unbond", [msg])

    def withdraw(self, msg: SignedMessage) -> None:
        """Record a provider's signed Withdraw and release that much matured stake unbonding -> available."""
        m = msg.message
        self._post(f"withdraw:{msg.digest}", plan_withdraw(m["provider"], m["amount"], msg.digest), "withdraw", [msg])

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
            raise InsufficientFunds(
                f"budget {format_gpc(m['budget'])} GPC exceeds the {format_gpc(have)} GPC available in wallet {m['consumer']}"
            )
        self._post(
            f"escrow:{order.digest}",
            plan_escrow(m["jobId"], m["consumer"], m["budget"], order.digest),
            "escrow budget",
            [order],
        )

    def assign(self, job_id: str, rank: int, provider: str, node_id: str, from_step: int = 0) -> SignedMessage:
        """Sign and record the Assignment of ``rank`` of ``job_id`` to ``provider``'s node ``node_id``
        from ``from_step`` on: the ledger admits that rank's receipts from this provider only."""
        msg = sign(
            self.account,
            "Assignment",
            self.domain,
            {
                "jobId": job_id,
                "rank": rank,
                "provider": provider,
                "nodeId": node_id,
                "fromStep": from_step,
                "nonce": self.nonces.next(),
            },
        )
        return self.record(msg)

    def rewind(self, job_id: str, to_step: int) -> SignedMessage:
        """Sign and record a Rewind of ``job_id`` to ``to_step``: the job's live receipts from there
        on are superseded and its ranks receipt those steps again, under new Assignments from
        ``to_step`` (docs/protocol.md, Rewind). Settle what the superseded receipts earn first:
        a superseded interval is charged no more.

        Raises:
            ConflictError: ``to_step`` is not 0 or a step where every rank's live receipts end,
                or nothing lies past it. UnknownParty: the job has no JobOrder.
        """
        msg = sign(
            self.account,
            "Rewind",
            self.domain,
            {"coordinator": self.account.address, "jobId": job_id, "toStep": to_step, "nonce": self.nonces.next()},
        )
        return self.record(msg)

    def settle_interval(
        self, job_id: str, receipts: list[SignedMessage], reports: list[SignedMessage] | None, payment_ugpc: int
    ) -> tuple[int, int, int, int]:
        """Charge a settled interval to the escrow: burn and treasury (or pay, in direct mode) shares.

        Args:
            receipts: the interval's receipts, rank order (of a checked interval whose other ranks
                the verifier convicted: the ranks that passed, who alone are paid).
            reports: the verifier's passing reports of them (same order), or None if unchecked.
            payment_ugpc: what the interval costs; capped at what is left in escrow, and nothing is
                written when that is 0.

        Returns:
            (charged, burned, treasury) in µGPC and the epoch the charge counts in; ``burned`` is
            0 in ``direct`` mode, where that share is paid to the workers instead.
        """
        left = self.ledger.balance(escrow_account(job_id))
        pay = min(payment_ugpc, left)
        if pay == 0:
            return 0, 0, 0, -1
        amounts = charge_amounts(pay, self.policy.tokenomics)
        subject = (reports[0] if reports else receipts[0]).digest
        workers = [r.message["worker"] for r in receipts]
        tok = self.policy.tokenomics
        steps = f"{receipts[0].message['stepStart']}-{receipts[0].message['stepEnd']}"
        msg = self._settle(
            "settle",
            job_id,
            subject,
            amounts,
            lambda d: plan_interval(job_id, pay, tok, d, workers),
            f"settle steps {steps}",
        )
        return pay, amounts.burned, amounts.treasury, msg.message["epoch"]

    def charge_void(self, job_id: str, reports: list[SignedMessage], payment_ugpc: int) -> tuple[int, int]:
        """Charge a void interval of a job whose package the policy does not vet, and burn all of
        it: the submitter pays for the dispute its code may have caused, nobody earns from it.

        Args:
            reports: the verifier's reports of the interval's receipts (recorded), the first one
                void (a fail in such a job counts as void: ``compare.effective_verdict``).
            payment_ugpc: what the interval would have cost; capped at what is left in escrow, and
                nothing is written when that is 0.

        Returns:
            (charged, the epoch it was charged in); -1 for the epoch if nothing was charged.
        """
        pay = min(payment_ugpc, self.ledger.balance(escrow_account(job_id)))
        if pay == 0:
            return 0, -1
        msg = self._settle(
            "void",
            job_id,
            reports[0].digest,
            SettlementAmounts(paid=pay, burned=pay),
            lambda d: plan_void_charge(job_id, pay, d),
            "charge a void interval, burned",
        )
        return pay, msg.message["epoch"]

    def slash(self, job_id: str, report: SignedMessage) -> int:
        """Slash ``fraud_slash_fraction`` of the stake (bonded, then unbonding) of the worker whose
        receipt the failing ``report`` (already recorded) names; the whistleblower share goes to
        its verifier. Returns µGPC slashed (<= the stake)."""
        receipt = self.ledger.message(report.message["receiptDigest"])
        assert receipt is not None, "a failing report names a recorded receipt (the ledger admitted it)"
        cheater, verifier = receipt.signer, report.message["verifier"]
        paid_to = verifier if verifier != cheater else None
        return self._take_stake("slash", job_id, report.digest, cheater, paid_to, "slash")

    def slash_verifier(self, job_id: str, report: SignedMessage, shown_by: SignedMessage) -> int:
        """Slash ``fraud_slash_fraction`` of the stake of the verifier of ``report``, which the
        re-check report ``shown_by`` (both recorded) showed false (``verify.recheck``); the
        whistleblower share goes to ``shown_by``'s verifier. Returns µGPC slashed (<= the stake;
        0, and nothing written, for a verifier with no stake)."""
        return self._take_stake(
            "slash-verifier",
            job_id,
            report.digest,
            report.message["verifier"],
            shown_by.message["verifier"],
            "slash a verifier whose report a re-check showed false",
        )

    def _take_stake(
        self, kind: str, job_id: str, subject: str, cheater: str, whistleblower: str | None, memo: str
    ) -> int:
        """Settle ``subject`` as the slash of ``fraud_slash_fraction`` of ``cheater``'s stake
        (bonded, then unbonding), the whistleblower share to ``whistleblower`` (burned if None).
        Returns µGPC slashed (0, and nothing written, for no stake)."""
        bonded = self.ledger.balance(wallet_account(cheater, "bonded"))
        unbonding = self.ledger.balance(wallet_account(cheater, "unbonding"))
        burned, whistle = slash_split(bonded + unbonding, self.policy.slashing, whistleblower=whistleblower is not None)
        if burned + whistle == 0:
            return 0
        assert burned + whistle <= bonded + unbonding, (burned, whistle, bonded, unbonding)
        self._settle(
            kind,
            job_id,
            subject,
            SettlementAmounts(burned=burned, slashed=burned + whistle),
            lambda d: plan_slash(cheater, whistleblower, bonded, unbonding, burned, whistle, d),
            memo,
        )
        return burned + whistle

    def close_epochs(self) -> list[EpochPlan]:
        """Close every epoch that has ended and had intervals charged, in order, for the whole ledger.

        Each close mints the epoch's emission pro rata to every interval charged in it, across all
        jobs (``gpucoin.ledger.epochs.plan_epoch``), under one signed EpochClose. An epoch another
        process closed first is skipped. Returns the plans of the epochs this call closed.
        """
        closed: list[EpochPlan] = []
        for epoch in self.ledger.closable_epochs():
            supply = self.ledger.totals()["supply"]
            plan = plan_epoch(
                epoch, [c.interval for c in self.ledger.epoch_charges(epoch)], self.policy.tokenomics, supply
            )
            if not plan.rewards:
                continue  # nothing to mint (the hard cap is reached): nothing to post
            msg = sign(
                self.account,
                "EpochClose",
                self.domain,
                {
                    "coordinator": self.account.address,
                    "epoch": epoch,
                    "emission": plan.emission,
                    "minted": plan.minted,
                    "payments": plan.payments,
                    "policyHash": self.policy_hash,
                    "nonce": self.nonces.next(),
                },
            )
            try:
                self._post(f"close:{msg.digest}", plan_mint(plan.rewards, msg.digest), f"epoch {epoch} emission", [msg])
            except (ConflictError, Unauthorized):
                if self.ledger.epoch_close(epoch) is not None:
                    continue  # closed by another coordinator process in between
                raise
            closed.append(plan)
        return closed

    def refund(self, job_id: str, order: SignedMessage) -> int:
        """Return what is left in the job's escrow to the consumer. Returns µGPC refunded."""
        left = self.ledger.balance(escrow_account(job_id))
        if left == 0:
            return 0
        consumer = order.message["consumer"]
        self._settle(
            "refund",
            job_id,
            order.digest,
            SettlementAmounts(refunded=left),
            lambda d: plan_refund(job_id, consumer, left, d),
            "refund unused escrow",
        )
        return left
