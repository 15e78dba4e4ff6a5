"""Which transfers a signed message authorizes: one rule per message type (pure: no database, no I/O).

Every transfer names the digest of the signed message that authorizes it, and a message
authorizes exactly the transfers its rule derives from its own fields, the market's Genesis and
policy, and what the ledger holds (``Facts`` and the balances of a ``LedgerState``), once:

    Genesis           GENESIS: each allocation, issuance -> the recipient
    Faucet            FAUCET: ``amount`` to ``recipient``, only in a market whose Genesis is dev
    JobOrder          ESCROW: ``budget`` from the consumer's available account to the job's escrow
    NodeRegistration  BOND: ``stake`` from the provider's available account to its bonded one
    Unbond / Withdraw UNBOND / WITHDRAW: ``amount`` of the provider's own stake (maturity: ``state``)
    Settlement        by its ``subject``: a WorkReceipt (unchecked interval) or a passing
                      VerificationReport (checked interval; its ranks that failed are not
                      paid) -> BURN, TREASURY, PAY of ``paid``;
                      a failing VerificationReport -> SLASH, WHISTLEBLOWER of the cheater's stake,
                      only in a job whose package the policy vets; a passing VerificationReport
                      with ``paid`` = 0 and ``slashed`` > 0, which another verifier's failing
                      report of the same receipt shows false (``verify.recheck``) -> SLASH,
                      WHISTLEBLOWER of its verifier's stake; a void VerificationReport
                      of a job whose package it does not vet -> BURN of ``paid`` (the submitter
                      pays for the dispute, nobody earns from it);
                      the JobOrder -> REFUND of what is left in the escrow; an interval
                      is charged once per attempt, and not once a Rewind superseded it
    EpochClose        MINT_WORKER, MINT_VERIFIER: the epoch's emission, pro rata to its charges

The transfers an operation names for one message must be contiguous and equal (as a multiset)
the rule's ``gpucoin.ledger.plans`` list; ``Ledger.post`` refuses anything else and the audit
replays the same rules over every stored operation, so a row written with plain SQL is caught
too. The signers themselves were checked when each message was admitted
(``gpucoin.ledger.admission``: a Settlement, Faucet, Assignment and EpochClose by the market's
coordinator, every other message by its own signer field).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpucoin.exceptions import LedgerError, StaleEpoch, Unauthorized
from gpucoin.ledger.accounts import BURNED, ISSUANCE, escrow_account, wallet_account
from gpucoin.ledger.epochs import epoch_end_s, plan_epoch
from gpucoin.ledger.facts import Charge, Close, Effect, Facts, GenesisInfo, Msg, Slash, VoidCharge
from gpucoin.ledger.plans import (
    SettlementAmounts,
    charge_amounts,
    plan_bond,
    plan_escrow,
    plan_faucet,
    plan_genesis,
    plan_interval,
    plan_mint,
    plan_refund,
    plan_slash,
    plan_unbond,
    plan_void_charge,
    plan_withdraw,
    slash_split,
)
from gpucoin.ledger.state import LedgerState, apply_operation
from gpucoin.ledger.transfer import Code, Transfer
from gpucoin.money import format_gpc
from gpucoin.policy.tokenomics import SettledInterval
from gpucoin.verify.compare import effective_verdict
from gpucoin.verify.recheck import Opinion, shown_false_by

AUTHORIZES: dict[str, frozenset[Code]] = {
    "Genesis": frozenset({Code.GENESIS}),
    "Faucet": frozenset({Code.FAUCET}),
    "JobOrder": frozenset({Code.ESCROW}),
    "NodeRegistration": frozenset({Code.BOND}),
    "Unbond": frozenset({Code.UNBOND}),
    "Withdraw": frozenset({Code.WITHDRAW}),
    "Settlement": frozenset({Code.BURN, Code.TREASURY, Code.PAY, Code.SLASH, Code.WHISTLEBLOWER, Code.REFUND}),
    "EpochClose": frozenset({Code.MINT_WORKER, Code.MINT_VERIFIER}),
}
"""The transfer codes each primary type may authorize; other types (WorkReceipt,
VerificationReport, Assignment, Rewind, PolicyChange) authorize no transfer."""


@dataclass
class _Op:
    """What the operation being checked has settled so far (its effects apply only if it passes)."""

    effects: list[Effect] = field(default_factory=list)

    def charged(self, key: tuple[str, int, int]) -> Charge | VoidCharge | None:
        return next((e for e in self.effects if isinstance(e, (Charge, VoidCharge)) and e.key == key), None)

    def slashed(self, receipt: str) -> bool:
        return any(isinstance(e, Slash) and e.receipt == receipt for e in self.effects)

    def closed(self, epoch: int) -> bool:
        return any(isinstance(e, Close) and e.epoch == epoch for e in self.effects)


Rule = Callable[[Msg, Facts, LedgerState, _Op], "tuple[list[Transfer], Effect | None]"]


def _genesis(f: Facts) -> GenesisInfo:
    if f.genesis is None:
        raise LedgerError("this ledger has no Genesis: it authorizes no transfer")
    return f.genesis


def _expect(msg: Msg, **fields: Any) -> None:
    """Refuse ``msg`` unless each named field has the given value (naming every difference)."""
    wrong = [f"{k} = {msg[k]} (must be {v})" for k, v in fields.items() if msg[k] != v]
    if wrong:
        raise Unauthorized(f"{msg.type} {msg.digest}: " + "; ".join(wrong))


def _message(f: Facts, digest: str, what: str) -> Msg:
    msg = f.messages.get(digest)
    if msg is None:
        raise Unauthorized(f"{what} {digest} is no recorded message")
    return msg


def _rule_genesis(msg: Msg, f: Facts, state: LedgerState, op: _Op) -> tuple[list[Transfer], Effect | None]:
    if msg.digest != _genesis(f).digest:
        raise Unauthorized(f"Genesis {msg.digest} is not this market's Genesis {_genesis(f).digest}")
    return plan_genesis(msg["allocations"], msg.digest), None


def _rule_faucet(msg: Msg, f: Facts, state: LedgerState, op: _Op) -> tuple[list[Transfer], Effect | None]:
    if not _genesis(f).dev:
        raise Unauthorized(f"Faucet {msg.digest}: this market's Genesis is not dev; a faucet mints nothing here")
    return plan_faucet(msg["recipient"], msg["amount"], msg.digest), None


def _rule_order(msg: Msg, f: Facts, state: LedgerState, op: _Op) -> tuple[list[Transfer], Effect | None]:
    return plan_escrow(msg["jobId"], msg["consumer"], msg["budget"], msg.digest), None


def _rule_registration(msg: Msg, f: Facts, state: LedgerState, op: _Op) -> tuple[list[Transfer], Effect | None]:
    return plan_bond(msg["provider"], msg["stake"], msg.digest), None


def _rule_unbond(msg: Msg, f: Facts, state: LedgerState, op: _Op) -> tuple[list[Transfer], Effect | None]:
    return plan_unbond(msg["provider"], msg["amount"], msg.digest), None


def _rule_withdraw(msg: Msg, f: Facts, state: LedgerState, op: _Op) -> tuple[list[Transfer], Effect | None]:
    return plan_withdraw(msg["provider"], msg["amount"], msg.digest), None


def _rule_settlement(msg: Msg, f: Facts, state: LedgerState, op: _Op) -> tuple[list[Transfer], Effect | None]:
    g = _genesis(f)
    if msg["policyHash"] != g.policy_hash:
        raise Unauthorized(
            f"Settlement {msg.digest} is signed under policy {msg['policyHash']}, not the market's {g.policy_hash}"
        )
    if msg["epoch"] != f.now_epoch:
        raise StaleEpoch(
            f"Settlement {msg.digest} is signed for epoch {msg['epoch']}; the ledger's clock is in epoch {f.now_epoch}"
        )
    subject = _message(f, msg["subject"], f"Settlement {msg.digest}: its subject")
    if _slashes_verifier(msg, subject):
        return _slash_verifier(msg, subject, f, state, op)
    if subject.type == "JobOrder":
        return _refund(msg, subject, state)
    if subject.type == "WorkReceipt" or (subject.type == "VerificationReport" and subject["verdict"] == "pass"):
        return _charge(msg, subject, f, state, op)
    if subject.type == "VerificationReport" and subject["verdict"] in ("fail", "void"):
        receipt = _message(f, subject["receiptDigest"], "the report's receipt")
        vetted = _vetted(f, receipt["jobId"], f"Settlement {msg.digest}")
        if effective_verdict(subject["verdict"], vetted) == "fail":
            return _slash(msg, subject, f, state, op)
        return _void_charge(msg, subject, f, state, op)
    kind = f"{subject['verdict']} {subject.type}" if subject.type == "VerificationReport" else subject.type
    raise Unauthorized(f"Settlement {msg.digest}: a Settlement of a {kind} authorizes no transfer")


def _same_job(msg: Msg, job: str) -> None:
    if msg["jobId"] != job:
        raise Unauthorized(
            f"Settlement {msg.digest} names job {msg['jobId']!r}, but its subject belongs to job {job!r}"
        )


def _charge(msg: Msg, subject: Msg, f: Facts, state: LedgerState, op: _Op) -> tuple[list[Transfer], Effect | None]:
    """An interval charged to its escrow: unchecked (subject: a receipt) or checked (a passing
    report). Of a checked interval every rank passed or was convicted by the same verifier; only
    the ranks that passed are paid (the evidence separated them from the convicted ones)."""
    receipt = (
        subject if subject.type == "WorkReceipt" else _message(f, subject["receiptDigest"], "the report's receipt")
    )
    job, start = receipt["jobId"], receipt["stepStart"]
    _same_job(msg, job)
    where = f"Settlement {msg.digest} (job {job!r} steps {start}-{receipt['stepEnd']})"
    key = _live_interval(f, receipt, where)
    order = _message(f, f.orders.get(job, ""), f"{where}: the JobOrder of job {job!r}")
    ranks = f.interval_receipts.get(key, {})
    if sorted(ranks) != list(range(order["workers"])):
        raise Unauthorized(
            f"{where}: the interval has receipts of ranks {sorted(ranks)}; the job has {order['workers']} ranks"
        )
    receipts = [f.messages[ranks[r]] for r in range(order["workers"])]
    if {r["stepEnd"] for r in receipts} != {receipt["stepEnd"]}:
        raise Unauthorized(
            f"{where}: its ranks' receipts end at different steps {sorted({r['stepEnd'] for r in receipts})}"
        )
    verifier = None
    if subject.type == "VerificationReport":
        verifier = subject["verifier"]
        vetted = _vetted(f, job, where)
        paid_ranks = []
        for r in receipts:
            verdicts = {
                effective_verdict(p["verdict"], vetted)
                for p in (f.messages[d] for d in f.reports.get(r.digest, []))
                if p["verifier"] == verifier
            }
            if "void" in verdicts:  # in an unvetted job a fail too: the interval is void, not charged per rank
                raise Unauthorized(f"{where}: rank {r['rank']}'s receipt was judged void by {verifier}")
            if "fail" in verdicts:
                continue  # convicted: its share is not paid (its own Settlement slashes it)
            if "pass" not in verdicts:
                raise Unauthorized(
                    f"{where}: rank {r['rank']}'s receipt has no passing or failing report by {verifier}"
                )
            paid_ranks.append(r)
        if receipt.digest not in {r.digest for r in paid_ranks}:
            raise Unauthorized(f"{where}: its subject's rank {receipt['rank']} was convicted by {verifier}")
        receipts = paid_ranks
    paid = _chargeable(msg, f, state, op, key, where)
    tokenomics = _genesis(f).policy.tokenomics
    _expect(msg, **charge_amounts(paid, tokenomics).fields())
    workers = [r["worker"] for r in receipts]
    interval = SettledInterval(tuple(r.digest for r in receipts), tuple(workers), verifier, paid)
    plan = plan_interval(job, paid, tokenomics, msg.digest, workers)
    return plan, Charge(msg.digest, job, start, key[2], f.now_epoch, interval)


def _live_interval(f: Facts, receipt: Msg, where: str) -> tuple[str, int, int]:
    """The (job, stepStart, attempt) of ``receipt``'s interval, unless a Rewind superseded it
    (those steps are trained again; what was superseded is never charged)."""
    if receipt.digest not in f.attempts:
        raise Unauthorized(f"{where}: receipt {receipt.digest} is not indexed")
    if f.superseded(receipt):
        raise Unauthorized(
            f"{where}: a Rewind of job {receipt['jobId']!r} superseded the interval (its steps are trained "
            "again); it is charged no more"
        )
    return f.interval_of(receipt)


def _chargeable(msg: Msg, f: Facts, state: LedgerState, op: _Op, key: tuple[str, int, int], where: str) -> int:
    """The Settlement's ``paid``, if the interval ``key`` was never charged (settled or void) and
    the escrow covers it."""
    job = key[0]
    prior = f.charges.get(key) or f.void_charges.get(key) or op.charged(key)
    if prior is not None:
        raise Unauthorized(f"{where}: the interval was already charged by Settlement {prior.settlement}")
    paid = msg["paid"]
    left = state.balances.get(escrow_account(job), 0)
    if not 0 < paid <= left:
        raise Unauthorized(
            f"{where}: charges {paid} µGPC; the escrow holds {left} µGPC (a charge is 1 µGPC to all of it)"
        )
    return paid


def _vetted(f: Facts, job: str, where: str) -> bool:
    """Whether the package the JobOrder of ``job`` signed is on the market policy's vetted list."""
    order = _message(f, f.orders.get(job, ""), f"{where}: the JobOrder of job {job!r}")
    return order["packageHash"] in _genesis(f).policy.verification.vetted_packages


def _void_charge(msg: Msg, report: Msg, f: Facts, state: LedgerState, op: _Op) -> tuple[list[Transfer], Effect | None]:
    """A void interval of a job whose package is not vetted: charged as if it had settled, and
    all of it burned. ``report`` counts as void (a fail does here: ``compare.effective_verdict``)
    and the same verifier judged every rank's receipt (a void names nobody: the whole interval
    is void, whatever the other ranks' reports say)."""
    receipt = _message(f, report["receiptDigest"], "the report's receipt")
    job, start = receipt["jobId"], receipt["stepStart"]
    _same_job(msg, job)
    where = f"Settlement {msg.digest} (void steps {start}-{receipt['stepEnd']} of job {job!r})"
    if _vetted(f, job, where):
        raise Unauthorized(f"{where}: the job runs a vetted package; a void interval of it is nobody's to pay")
    key = _live_interval(f, receipt, where)
    order = _message(f, f.orders[job], f"{where}: the JobOrder")
    ranks = f.interval_receipts.get(key, {})
    if sorted(ranks) != list(range(order["workers"])):
        raise Unauthorized(
            f"{where}: the interval has receipts of ranks {sorted(ranks)}; the job has {order['workers']}"
        )
    if effective_verdict(report["verdict"], vetted=False) != "void":
        raise Unauthorized(f"{where}: cites a {report['verdict']} report, which voids nothing")
    for r in sorted(ranks):
        if not any(f.messages[d]["verifier"] == report["verifier"] for d in f.reports.get(ranks[r], [])):
            raise Unauthorized(f"{where}: rank {r}'s receipt has no report by {report['verifier']}")
    paid = _chargeable(msg, f, state, op, key, where)
    _expect(msg, **SettlementAmounts(paid=paid, burned=paid).fields())
    return plan_void_charge(job, paid, msg.digest), VoidCharge(msg.digest, job, start, key[2], f.now_epoch, paid)


def _slash(msg: Msg, report: Msg, f: Facts, state: LedgerState, op: _Op) -> tuple[list[Transfer], Effect | None]:
    """The policy's share of a cheater's stake, on a failing report of its receipt, in a job whose
    package the policy vets (in any other job the submitter's code may have computed differently
    under replay: the evidence convicts nobody)."""
    receipt = _message(f, report["receiptDigest"], "the report's receipt")
    _same_job(msg, receipt["jobId"])
    if not _vetted(f, receipt["jobId"], f"Settlement {msg.digest}"):
        raise Unauthorized(
            f"Settlement {msg.digest}: job {receipt['jobId']!r} runs a package the policy does not vet; "
            "a failing report of it slashes nobody"
        )
    if receipt.digest in f.slashed or op.slashed(receipt.digest):
        raise Unauthorized(
            f"Settlement {msg.digest}: the worker of receipt {receipt.digest} was already slashed for it"
        )
    cheater = receipt["worker"]
    verifier = report["verifier"] if report["verifier"] != cheater else None
    return _take_stake(msg, cheater, verifier, f, state), Slash(msg.digest, receipt.digest, report.digest)


def _take_stake(msg: Msg, cheater: str, whistleblower: str | None, f: Facts, state: LedgerState) -> list[Transfer]:
    """The slash the Settlement ``msg`` must carry: the policy's share of ``cheater``'s bonded plus
    unbonding stake (``slash_split``), the whistleblower share to ``whistleblower`` (burned if None)."""
    bonded = state.balances.get(wallet_account(cheater, "bonded"), 0)
    unbonding = state.balances.get(wallet_account(cheater, "unbonding"), 0)
    policy = _genesis(f).policy.slashing
    burned, whistle = slash_split(bonded + unbonding, policy, whistleblower=whistleblower is not None)
    _expect(msg, **SettlementAmounts(burned=burned, slashed=burned + whistle).fields())
    return plan_slash(cheater, whistleblower, bonded, unbonding, burned, whistle, msg.digest)


def _false_by(f: Facts, report: Msg, where: str) -> tuple[Opinion, ...]:
    """The recorded reports that show ``report`` false (``verify.recheck``: fails of its receipt by
    other verifiers recorded after it), verdicts as they count in its job; empty if none do."""
    receipt = _message(f, report["receiptDigest"], f"{where}: the report's receipt")
    vetted = _vetted(f, receipt["jobId"], where)
    opinions = [
        Opinion(d, f.messages[d]["verifier"], effective_verdict(f.messages[d]["verdict"], vetted))
        for d in f.reports.get(receipt.digest, [])
    ]
    mine = Opinion(report.digest, report["verifier"], effective_verdict(report["verdict"], vetted))
    try:
        return shown_false_by(mine, opinions, receipt["worker"])
    except ValueError as e:  # the loader did not index the report itself
        raise Unauthorized(f"{where}: {e}") from None


def _slashes_verifier(msg: Msg, subject: Msg) -> bool:
    """Whether a Settlement of ``subject`` is the slash of a verifier (a passing report, nothing
    paid, something slashed) rather than a charge (which pays > 0)."""
    return (
        subject.type == "VerificationReport"
        and subject["verdict"] == "pass"
        and msg["paid"] == 0
        and msg["slashed"] > 0
    )


def _slash_verifier(
    msg: Msg, report: Msg, f: Facts, state: LedgerState, op: _Op
) -> tuple[list[Transfer], Effect | None]:
    """The policy's share of a verifier's stake, on a passing report of its that another
    verifier's failing report of the same receipt showed false (``verify.recheck``); the
    whistleblower share goes to the first such verifier. Only in a job whose package the policy
    vets (in any other, a fail counts as void and shows nothing false)."""
    receipt = _message(f, report["receiptDigest"], "the report's receipt")
    _same_job(msg, receipt["jobId"])
    false_by = _false_by(f, report, f"Settlement {msg.digest}")
    if not false_by:
        raise Unauthorized(
            f"Settlement {msg.digest}: no other verifier's failing report of receipt {receipt.digest} shows "
            f"{report['verifier']}'s pass false (in a job of a vetted package); it slashes nobody"
        )
    if report.digest in f.slashed or op.slashed(report.digest):
        raise Unauthorized(
            f"Settlement {msg.digest}: the verifier of report {report.digest} was already slashed for it"
        )
    plan = _take_stake(msg, report["verifier"], false_by[0].verifier, f, state)
    return plan, Slash(msg.digest, report.digest, false_by[0].digest)


def _refund(msg: Msg, order: Msg, state: LedgerState) -> tuple[list[Transfer], Effect | None]:
    """What is left in the job's escrow, back to the consumer."""
    job = order["jobId"]
    _same_job(msg, job)
    left = state.balances.get(escrow_account(job), 0)
    _expect(msg, **SettlementAmounts(refunded=left).fields())
    return plan_refund(job, order["consumer"], left, msg.digest), None


def _rule_close(msg: Msg, f: Facts, state: LedgerState, op: _Op) -> tuple[list[Transfer], Effect | None]:
    g = _genesis(f)
    e = msg["epoch"]
    where = f"EpochClose {msg.digest} (epoch {e})"
    if msg["policyHash"] != g.policy_hash:
        raise Unauthorized(f"{where} is signed under policy {msg['policyHash']}, not the market's {g.policy_hash}")
    if e >= f.now_epoch:
        end = epoch_end_s(e, g.start_s, g.policy.tokenomics.epoch_length_s)
        raise Unauthorized(
            f"{where}: the epoch ends at unix second {end}; the ledger's clock is in epoch {f.now_epoch}"
        )
    if e in f.closed or op.closed(e):
        raise Unauthorized(f"{where}: the epoch is already closed")
    last = max([f.last_closed, *(c.epoch for c in op.effects if isinstance(c, Close))])
    if e < last:
        raise Unauthorized(f"{where}: epoch {last} is already closed; epochs close in order")
    charges = f.epoch_charges.get(e, [])
    if not charges:
        raise Unauthorized(f"{where}: no interval was charged in it, so it mints nothing")
    supply = -(state.balances.get(ISSUANCE, 0) + state.balances.get(BURNED, 0))
    plan = plan_epoch(e, [c.interval for c in charges], g.policy.tokenomics, supply)
    _expect(msg, emission=plan.emission, minted=plan.minted, payments=plan.payments)
    return plan_mint(plan.rewards, msg.digest), Close(msg.digest, e, plan.emission, plan.minted, plan.payments)


RULES: dict[str, Rule] = {
    "Genesis": _rule_genesis,
    "Faucet": _rule_faucet,
    "JobOrder": _rule_order,
    "NodeRegistration": _rule_registration,
    "Unbond": _rule_unbond,
    "Withdraw": _rule_withdraw,
    "Settlement": _rule_settlement,
    "EpochClose": _rule_close,
}
"""One rule per authorizing primary type (``AUTHORIZES`` names the codes each may carry)."""


def _key(t: Transfer) -> tuple[str, str, int, str]:
    return (t.debit, t.credit, t.amount, Code(t.code).value)


def _show(transfers: Sequence[Transfer] | Counter, limit: int = 4) -> str:
    keys = list(transfers.elements()) if isinstance(transfers, Counter) else [_key(t) for t in transfers]
    shown = ", ".join(f"{c} {format_gpc(a)} GPC {d} -> {cr}" for d, cr, a, c in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"[{shown}{more}]" if keys else "nothing"


def groups_of(transfers: Sequence[Transfer]) -> list[tuple[str, int, list[Transfer]]]:
    """The transfers of one operation as runs citing one digest: (digest, index of the first, run).

    Raises:
        Unauthorized: if the transfers citing one digest are not contiguous.
    """
    runs: list[tuple[str, int, list[Transfer]]] = []
    seen: set[str] = set()
    for i, t in enumerate(transfers):
        d = t.digest.lower()
        if runs and runs[-1][0] == d:
            runs[-1][2].append(t)
            continue
        if d in seen:
            raise Unauthorized(
                f"transfer #{i} cites {d} apart from the other transfers that cite it; keep them together"
            )
        seen.add(d)
        runs.append((d, i, [t]))
    return runs


def accounts_read(msg: Msg, f: Facts) -> set[str]:
    """Accounts whose balance the rule of ``msg`` reads besides those its transfers touch
    (a loader must lock and read them too). Unknown references read nothing (the rule refuses)."""
    if msg.type == "EpochClose":
        return {ISSUANCE, BURNED}
    if msg.type != "Settlement":
        return set()
    subject = f.messages.get(msg["subject"])
    if subject is None:
        return set()
    if subject.type in ("JobOrder", "WorkReceipt"):
        return {escrow_account(subject["jobId"])}
    receipt = f.messages.get(subject["receiptDigest"]) if subject.type == "VerificationReport" else None
    if receipt is None:
        return set()
    if _slashes_verifier(msg, subject):
        return {wallet_account(subject["verifier"], "bonded"), wallet_account(subject["verifier"], "unbonding")}
    if subject["verdict"] in ("pass", "void"):
        return {escrow_account(receipt["jobId"])}
    return {wallet_account(receipt["worker"], "bonded"), wallet_account(receipt["worker"], "unbonding")}


def authorize_operation(
    state: LedgerState, facts: Facts, transfers: Sequence[Transfer]
) -> tuple[LedgerState, list[Effect], set[str]]:
    """Check that every transfer of one operation is authorized by the message it cites, and apply it.

    For each run of transfers citing one message (``groups_of``), in order: the message is
    recorded and has authorized no operation before; its type may authorize each transfer's code
    (``AUTHORIZES``); the run equals what its rule derives (``RULES``) from the state left by the
    runs before it; then the money rules apply it (``gpucoin.ledger.state.apply_operation``, with
    the ledger's current epoch and the policy's unbonding period).

    An operation that mints must also leave the supply (minted - burned) within the policy's
    hard cap.

    Args:
        state: at least every balance, escrow and unbonding entry the transfers touch and the
            rules read (``accounts_read``), and the balances of issuance and burned.
        facts: what the rules read (``gpucoin.ledger.facts``); not modified.
        transfers: the operation's transfers.

    Returns:
        (the new state, the operation's effects, the digests it used); ``state`` is unchanged.
        The caller applies the effects with ``facts.apply`` once the whole operation passed.

    Raises:
        Unauthorized: a transfer its message does not authorize (see the module docstring).
        StaleEpoch: a Settlement signed for another epoch than ``facts.now_epoch``.
        LedgerError: a digest naming no recorded message, or a ledger with no Genesis.
        RuleViolation / InsufficientFunds / BalanceOverflow: as ``apply_operation``.
    """
    genesis = _genesis(facts)
    unbonding_epochs = genesis.policy.bonding.unbonding_epochs
    op = _Op()
    used: set[str] = set()
    for digest, first, run in groups_of(transfers):
        msg = facts.messages.get(digest)
        if msg is None:
            raise LedgerError(f"transfer #{first} cites {digest}, which names no recorded message")
        span = f" #{first}" if len(run) == 1 else f"s #{first}-#{first + len(run) - 1}"
        where = f"transfer{span} (citing {msg.type} {digest})"
        allowed = AUTHORIZES.get(msg.type, frozenset())
        for i, t in enumerate(run, start=first):
            if Code(t.code) not in allowed:
                kinds = ", ".join(sorted(c.value for c in allowed)) or "no transfer"
                raise Unauthorized(f"transfer #{i} ({Code(t.code).value}) cites a {msg.type}, which authorizes {kinds}")
        if digest in facts.used:
            raise Unauthorized(f"{where}: that message already authorized an operation; each authorizes one")
        expected, effect = RULES[msg.type](msg, facts, state, op)
        want, got = Counter(map(_key, expected)), Counter(map(_key, run))
        if want != got:
            raise Unauthorized(
                f"{where}: the message authorizes {_show(expected)}; missing {_show(want - got)}, "
                f"not authorized {_show(got - want)}"
            )
        try:
            state = apply_operation(state, run, epoch=facts.now_epoch, unbonding_epochs=unbonding_epochs)
        except LedgerError as exc:
            raise type(exc)(f"{where}: {exc}") from None
        if effect is not None:
            op.effects.append(effect)
        used.add(digest)
    if any(t.debit == ISSUANCE for t in transfers):
        supply = -(state.balances.get(ISSUANCE, 0) + state.balances.get(BURNED, 0))
        cap = genesis.policy.tokenomics.hard_cap_ugpc
        if supply > cap:
            raise Unauthorized(f"it would take the supply to {supply} µGPC, above the hard cap {cap} µGPC")
    return state, op.effects, used
