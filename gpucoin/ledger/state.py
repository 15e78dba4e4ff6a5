"""The money rules of one operation as a pure function over the ledger's state (no database, no I/O).

``apply_operation`` is the single place that decides whether an operation of linked transfers
may be applied; ``Ledger.post`` runs it inside the database transaction on the rows it locked,
and ``gpucoin ledger audit`` replays every stored operation through it from genesis.

The state an operation reads and writes:

- balances, µGPC per account (``gpucoin.ledger.rules.apply_transfers``: no account but
  ``system:issuance`` below zero, every balance within int64);
- job escrows, each a two-phase transfer in TigerBeetle's sense (pending / post / void): an
  ESCROW transfer creates the pending hold of a job's budget; BURN, TREASURY and PAY post parts
  of it; REFUND voids the rest, and must return the whole remainder to the wallet it came from.
  A hold that is voided, or fully posted, is closed: nothing moves in or out of it again;
- unbonding stake per wallet, by the epoch at which it matures: UNBOND adds an entry maturing
  ``unbonding_epochs`` after the operation's epoch; WITHDRAW takes only matured stake, oldest
  first; a slash of unbonding stake (it stays slashable) takes the newest first.

Every transfer must also have the shape its code allows (``SHAPES``): which kinds of account it
may debit and credit and whether both belong to the same wallet. Nothing is ever credited to
``system:issuance``, so minted = -balance(issuance) and supply = minted - burned hold by shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from gpucoin.exceptions import LedgerError, RuleViolation
from gpucoin.ledger.accounts import account_kind, account_owner
from gpucoin.ledger.rules import apply_transfers
from gpucoin.ledger.transfer import Code, Transfer

EscrowPhase = Literal["pending", "posted", "voided"]


@dataclass(frozen=True)
class Shape:
    """What a transfer of one code may move: debit and credit account kinds, and ownership.

    Attributes:
        debit: account kinds it may debit (``gpucoin.ledger.accounts.account_kind``).
        credit: account kinds it may credit.
        owner: ``"same"`` if debit and credit must belong to one wallet, ``"other"`` if they must
            not, None if it does not matter.
    """

    debit: frozenset[str]
    credit: frozenset[str]
    owner: Literal["same", "other"] | None = None


def _shape(debit: str, credit: str, owner: Literal["same", "other"] | None = None) -> Shape:
    return Shape(frozenset(debit.split("|")), frozenset(credit.split("|")), owner)


SHAPES: dict[Code, Shape] = {
    Code.GENESIS: _shape("issuance", "available"),
    Code.FAUCET: _shape("issuance", "available"),
    Code.BOND: _shape("available", "bonded", "same"),
    Code.UNBOND: _shape("bonded", "unbonding", "same"),
    Code.WITHDRAW: _shape("unbonding", "available", "same"),
    Code.ESCROW: _shape("available", "escrow"),
    Code.BURN: _shape("escrow", "burned"),
    Code.TREASURY: _shape("escrow", "treasury"),
    Code.PAY: _shape("escrow", "available"),
    Code.REFUND: _shape("escrow", "available"),
    Code.MINT_WORKER: _shape("issuance", "available"),
    Code.MINT_VERIFIER: _shape("issuance", "available"),
    Code.SLASH: _shape("bonded|unbonding", "burned"),
    Code.WHISTLEBLOWER: _shape("bonded|unbonding", "available", "other"),
}
"""The accounts each code may move between (SPEC.md, Money); anything else is a RuleViolation."""

ESCROW_POST_CODES = frozenset({Code.BURN, Code.TREASURY, Code.PAY})
"""Codes that post part of a pending escrow."""


@dataclass(frozen=True)
class Escrow:
    """A job's escrow: the pending hold of its budget (µGPC) and what became of it.

    Attributes:
        source: the wallet ``available`` account the budget came from (a void returns it there).
        amount: µGPC held by the ESCROW transfer.
        phase: ``pending`` while it can be posted or voided; ``posted`` once fully spent;
            ``voided`` once the remainder was refunded.
    """

    source: str
    amount: int
    phase: EscrowPhase = "pending"


@dataclass
class LedgerState:
    """The part of the ledger's state an operation touches (or all of it, in the audit).

    Attributes:
        balances: account -> µGPC; a missing account has 0.
        escrows: escrow account -> its ``Escrow``; a missing one was never created.
        unbonding: unbonding account -> {maturity epoch: µGPC still unbonding}.
    """

    balances: dict[str, int] = field(default_factory=dict)
    escrows: dict[str, Escrow] = field(default_factory=dict)
    unbonding: dict[str, dict[int, int]] = field(default_factory=dict)

    def copy(self) -> LedgerState:
        """A copy deep enough that applying an operation to it never changes this one."""
        return LedgerState(dict(self.balances), dict(self.escrows), {k: dict(v) for k, v in self.unbonding.items()})

    def subset(self, accounts: set[str]) -> LedgerState:
        """A copy holding only what concerns ``accounts`` (cheap: O(len(accounts)))."""
        return LedgerState(
            {a: self.balances[a] for a in accounts if a in self.balances},
            {a: self.escrows[a] for a in accounts if a in self.escrows},
            {a: dict(self.unbonding[a]) for a in accounts if a in self.unbonding},
        )

    def merge(self, part: LedgerState) -> None:
        """Overwrite this state with everything ``part`` holds (the result of an operation on a subset)."""
        self.balances.update(part.balances)
        self.escrows.update(part.escrows)
        for acct, entries in part.unbonding.items():
            self.unbonding[acct] = dict(entries)


def check_shape(t: Transfer, index: int = 0) -> None:
    """Refuse a transfer whose accounts do not fit its code (``SHAPES``).

    Raises:
        RuleViolation: naming the transfer's index, code and accounts.
    """
    shape = SHAPES[Code(t.code)]
    debit_kind, credit_kind = account_kind(t.debit), account_kind(t.credit)
    where = f"transfer #{index} ({Code(t.code).value} {t.debit} -> {t.credit})"
    if debit_kind not in shape.debit or credit_kind not in shape.credit:
        raise RuleViolation(
            f"{where}: a {Code(t.code).value} moves {'|'.join(sorted(shape.debit))} -> "
            f"{'|'.join(sorted(shape.credit))}, not {debit_kind} -> {credit_kind}"
        )
    same = account_owner(t.debit) == account_owner(t.credit)
    if shape.owner == "same" and not same:
        raise RuleViolation(f"{where}: both accounts must belong to one wallet")
    if shape.owner == "other" and same:
        raise RuleViolation(f"{where}: a wallet cannot be paid from its own slashed stake")


def _take(entries: dict[int, int], amount: int, *, oldest_first: bool) -> None:
    """Remove ``amount`` µGPC from unbonding ``entries`` (epoch -> µGPC), in place."""
    for epoch in sorted(entries, reverse=not oldest_first):
        if amount == 0:
            break
        part = min(amount, entries[epoch])
        entries[epoch] -= part
        amount -= part
        if entries[epoch] == 0:
            del entries[epoch]
    if amount:
        raise LedgerError(f"unbonding entries short by {amount} µGPC (entries and balance disagree)")


def apply_operation(
    state: LedgerState,
    transfers: Sequence[Transfer],
    *,
    epoch: int | None = None,
    unbonding_epochs: int = 0,
) -> LedgerState:
    """Apply one operation's transfers, in order and all or nothing, to a copy of ``state``.

    Args:
        state: at least every balance, escrow and unbonding entry the transfers touch.
        transfers: the linked transfers of one operation.
        epoch: the current emission epoch; required by UNBOND and WITHDRAW.
        unbonding_epochs: epochs (policy ``bonding.unbonding_epochs``) before UNBONDed stake
            may be withdrawn.

    Returns:
        The new state; ``state`` is left unchanged, so on any error nothing is applied.

    Raises:
        RuleViolation: a transfer of the wrong shape; an ESCROW into a job escrow that already
            exists; a post or void of an escrow that is not pending; a REFUND that is not the
            whole remainder or goes to another wallet; an UNBOND or WITHDRAW without an epoch;
            a WITHDRAW of more than has matured.
        InsufficientFunds / BalanceOverflow / LedgerError / AmountError: as ``apply_transfers``.
    """
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
        raise LedgerError(f"epoch must be a non-negative integer, got {epoch!r}")
    if isinstance(unbonding_epochs, bool) or not isinstance(unbonding_epochs, int) or unbonding_epochs < 0:
        raise LedgerError(f"unbonding_epochs must be a non-negative integer, got {unbonding_epochs!r}")
    if not transfers:
        raise LedgerError("an operation needs at least one transfer, got none")
    new = state.copy()
    for i, t in enumerate(transfers):
        if not isinstance(t, Transfer):
            raise LedgerError(f"transfer #{i} is a {type(t).__name__}, not a Transfer")
        check_shape(t, i)
        code = Code(t.code)
        where = f"transfer #{i} ({code.value})"
        esc = new.escrows.get(t.debit)
        if code is Code.ESCROW and t.credit in new.escrows:
            raise RuleViolation(f"{where}: {t.credit} already holds a budget; a job's escrow is created once")
        if account_kind(t.debit) == "escrow" and (esc is None or esc.phase != "pending"):
            phase = "never created" if esc is None else esc.phase
            raise RuleViolation(f"{where}: {t.debit} is {phase}, not pending; it cannot be posted or voided")
        new.balances = apply_transfers(new.balances, [t])

        if code is Code.ESCROW:
            new.escrows[t.credit] = Escrow(source=t.debit, amount=t.amount)
        elif esc is not None:
            if code is Code.REFUND:
                if t.credit != esc.source:
                    raise RuleViolation(f"{where}: a void returns the budget to {esc.source}, not {t.credit}")
                if new.balances[t.debit] != 0:
                    raise RuleViolation(
                        f"{where}: a void refunds the whole remainder, {new.balances[t.debit] + t.amount} µGPC, "
                        f"not {t.amount} µGPC"
                    )
                new.escrows[t.debit] = replace(esc, phase="voided")
            elif new.balances[t.debit] == 0:
                new.escrows[t.debit] = replace(esc, phase="posted")

        if code is Code.UNBOND:
            if epoch is None:
                raise RuleViolation(f"{where}: unbonding needs the current epoch")
            entries = new.unbonding.setdefault(t.credit, {})
            entries[epoch + unbonding_epochs] = entries.get(epoch + unbonding_epochs, 0) + t.amount
        elif code is Code.WITHDRAW:
            if epoch is None:
                raise RuleViolation(f"{where}: withdrawing needs the current epoch")
            entries = new.unbonding.setdefault(t.debit, {})
            matured = sum(v for e, v in entries.items() if e <= epoch)
            if t.amount > matured:
                raise RuleViolation(
                    f"{where}: {t.amount} µGPC asked from {t.debit} at epoch {epoch}, only {matured} µGPC "
                    f"has matured (next maturity: epoch {min((e for e in entries if e > epoch), default=None)})"
                )
            _take(entries, t.amount, oldest_first=True)
        elif account_kind(t.debit) == "unbonding":  # a slash of stake still unbonding
            _take(new.unbonding.setdefault(t.debit, {}), t.amount, oldest_first=False)
    return new


def touched_accounts(transfers: Sequence[Transfer]) -> set[str]:
    """Every account the transfers debit or credit."""
    return {t.debit for t in transfers} | {t.credit for t in transfers}


def apply_in_place(
    state: LedgerState, transfers: Sequence[Transfer], *, epoch: int | None = None, unbonding_epochs: int = 0
) -> None:
    """``apply_operation`` on the part of ``state`` the transfers touch, merged back into ``state``.

    O(transfers), not O(accounts): for replaying a whole ledger. On any error ``state`` is unchanged.
    """
    names = {t.debit for t in transfers if isinstance(t, Transfer)} | {
        t.credit for t in transfers if isinstance(t, Transfer)
    }
    part = apply_operation(state.subset(names), transfers, epoch=epoch, unbonding_epochs=unbonding_epochs)
    state.merge(part)


def unbonding_total(entries: Mapping[int, int]) -> int:
    """µGPC still unbonding in ``entries`` (epoch -> µGPC); equals the unbonding account's balance."""
    return sum(entries.values())
