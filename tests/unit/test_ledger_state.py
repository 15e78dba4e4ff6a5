"""The pure money rules of one operation (``gpucoin.ledger.state``): shapes, escrow, unbonding."""

from __future__ import annotations

import pytest
from eth_account import Account

from gpucoin.exceptions import InsufficientFunds, LedgerError, RuleViolation
from gpucoin.ledger import BURNED, ISSUANCE, TREASURY, Code, LedgerState, Transfer, apply_operation
from gpucoin.ledger.accounts import escrow_account, wallet_account
from gpucoin.ledger.state import SHAPES, apply_in_place

A = Account.from_key(b"\x11" * 32).address
B = Account.from_key(b"\x12" * 32).address
D = "0x" + "ab" * 32
E = escrow_account("job-7")


def t(debit: str, credit: str, amount: int, code: Code) -> Transfer:
    return Transfer(debit, credit, amount, code, D)


def av(a: str) -> str:
    return wallet_account(a)


def bd(a: str) -> str:
    return wallet_account(a, "bonded")


def ub(a: str) -> str:
    return wallet_account(a, "unbonding")


def funded(amount: int = 100) -> LedgerState:
    return apply_operation(LedgerState(), [t(ISSUANCE, av(A), amount, Code.FAUCET)])


def test_every_code_has_a_shape_and_other_shapes_are_refused() -> None:
    assert set(SHAPES) == set(Code)
    s = funded()
    bad = [
        t(av(A), BURNED, 1, Code.BURN),  # a burn comes from an escrow, not a wallet
        t(av(A), bd(B), 1, Code.BOND),  # bonding moves stake inside one wallet
        t(bd(A), av(A), 1, Code.WHISTLEBLOWER),  # a wallet cannot be paid its own slash
        t(av(A), ISSUANCE, 1, Code.REFUND),  # nothing is credited back to issuance
        t(ISSUANCE, bd(A), 1, Code.MINT_WORKER),  # mints land in available
    ]
    for bad_t in bad:
        with pytest.raises(RuleViolation, match=bad_t.code.value):
            apply_operation(s, [bad_t])


def test_escrow_is_pending_then_posted_in_parts_then_voided_with_the_whole_remainder() -> None:
    s = apply_operation(funded(), [t(av(A), E, 60, Code.ESCROW)])
    assert s.escrows[E].phase == "pending" and s.escrows[E].amount == 60 and s.escrows[E].source == av(A)
    with pytest.raises(RuleViolation, match="created once"):
        apply_operation(s, [t(av(A), E, 1, Code.ESCROW)])
    s = apply_operation(s, [t(E, BURNED, 9, Code.BURN), t(E, TREASURY, 1, Code.TREASURY), t(E, av(B), 5, Code.PAY)])
    assert s.balances[E] == 45 and s.escrows[E].phase == "pending"
    with pytest.raises(RuleViolation, match="whole remainder, 45"):
        apply_operation(s, [t(E, av(A), 44, Code.REFUND)])
    with pytest.raises(RuleViolation, match="returns the budget to"):
        apply_operation(s, [t(E, av(B), 45, Code.REFUND)])
    s = apply_operation(s, [t(E, av(A), 45, Code.REFUND)])
    assert s.escrows[E].phase == "voided" and s.balances[E] == 0 and s.balances[av(A)] == 85
    s = apply_operation(s, [t(ISSUANCE, av(B), 5, Code.FAUCET)])
    with pytest.raises(RuleViolation, match="voided"):
        apply_operation(s, [t(E, BURNED, 1, Code.BURN)])


def test_an_escrow_spent_to_zero_is_posted_and_closed() -> None:
    s = apply_operation(funded(), [t(av(A), E, 10, Code.ESCROW), t(E, BURNED, 10, Code.BURN)])
    assert s.escrows[E].phase == "posted"
    with pytest.raises(RuleViolation, match="never created"):
        apply_operation(s, [t(escrow_account("other"), BURNED, 1, Code.BURN)])


def test_unbonded_stake_is_withdrawable_only_after_the_unbonding_period() -> None:
    s = apply_operation(funded(), [t(av(A), bd(A), 100, Code.BOND)])
    s = apply_operation(s, [t(bd(A), ub(A), 30, Code.UNBOND)], epoch=5, unbonding_epochs=3)
    s = apply_operation(s, [t(bd(A), ub(A), 20, Code.UNBOND)], epoch=6, unbonding_epochs=3)
    assert s.unbonding[ub(A)] == {8: 30, 9: 20}
    with pytest.raises(RuleViolation, match="needs the current epoch"):
        apply_operation(s, [t(ub(A), av(A), 1, Code.WITHDRAW)])
    with pytest.raises(RuleViolation, match="only 0 µGPC has matured"):
        apply_operation(s, [t(ub(A), av(A), 1, Code.WITHDRAW)], epoch=7)
    with pytest.raises(RuleViolation, match="only 30 µGPC"):
        apply_operation(s, [t(ub(A), av(A), 31, Code.WITHDRAW)], epoch=8)
    # a slash of unbonding stake takes the newest maturity first, leaving matured stake withdrawable
    s = apply_operation(s, [t(ub(A), BURNED, 25, Code.SLASH)])
    assert s.unbonding[ub(A)] == {8: 25}
    s = apply_operation(s, [t(ub(A), av(A), 25, Code.WITHDRAW)], epoch=9)
    assert s.unbonding[ub(A)] == {} and s.balances[ub(A)] == 0 and s.balances[av(A)] == 25


def test_a_slash_never_takes_more_than_the_bond() -> None:
    s = apply_operation(funded(), [t(av(A), bd(A), 40, Code.BOND)])
    with pytest.raises(InsufficientFunds, match="short by 1"):
        apply_operation(s, [t(bd(A), BURNED, 30, Code.SLASH), t(bd(A), av(B), 11, Code.WHISTLEBLOWER)])
    s2 = apply_operation(s, [t(bd(A), BURNED, 30, Code.SLASH), t(bd(A), av(B), 10, Code.WHISTLEBLOWER)])
    assert s2.balances[bd(A)] == 0 and s2.balances[av(B)] == 10


def test_an_operation_is_all_or_nothing_and_never_changes_its_input() -> None:
    s = funded(10)
    before = s.copy()
    with pytest.raises(InsufficientFunds):
        apply_operation(s, [t(av(A), E, 5, Code.ESCROW), t(E, BURNED, 6, Code.BURN)])
    assert s == before
    with pytest.raises(LedgerError, match="at least one transfer"):
        apply_operation(s, [])
    apply_in_place(s, [t(av(A), E, 5, Code.ESCROW)])
    assert s.balances[E] == 5 and s.escrows[E].phase == "pending"
