"""The ledger's pure rules: applying transfers to balances, invariants, content and chain hashes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpucoin.exceptions import AmountError, InsufficientFunds, LedgerError, UnknownAccount
from gpucoin.ledger.accounts import BURNED, ISSUANCE, TREASURY, escrow_account, wallet_account
from gpucoin.ledger.rules import (
    GENESIS_HASH,
    INT64_MAX,
    BalanceOverflow,
    apply_transfers,
    canonical_json,
    chain_hash,
    check_balances,
    operation_hash,
    supply_of,
)
from gpucoin.ledger.transfer import Code, Transfer

ALICE = wallet_account("0x" + "11" * 20)
BOB = wallet_account("0x" + "22" * 20)
ALICE_BONDED = wallet_account("0x" + "11" * 20, "bonded")
ESCROW = escrow_account("job-1")
D = "0x" + "ab" * 32


def tr(debit: str, credit: str, amount: int, code: Code = Code.FAUCET, digest: str = D) -> Transfer:
    return Transfer(debit, credit, amount, code, digest)


def test_issuance_may_go_negative_and_the_sum_stays_zero() -> None:
    out = apply_transfers({}, [tr(ISSUANCE, ALICE, 700), tr(ISSUANCE, BOB, 300)])
    assert out == {ISSUANCE: -1000, ALICE: 700, BOB: 300}
    assert sum(out.values()) == 0
    assert check_balances(out) == []
    assert supply_of(out) == 1000


def test_overdraft_is_refused_and_nothing_is_applied() -> None:
    start = {ISSUANCE: -100, ALICE: 100}
    ops = [tr(ALICE, BOB, 60, Code.ESCROW), tr(ALICE, ESCROW, 41, Code.ESCROW)]
    with pytest.raises(InsufficientFunds) as e:
        apply_transfers(start, ops)
    # the message carries the numbers: what was asked, what there was, the shortfall
    assert "41" in str(e.value) and "40" in str(e.value) and "short by 1" in str(e.value)
    assert ALICE in str(e.value)
    assert start == {ISSUANCE: -100, ALICE: 100}  # the input map is untouched


def test_debits_are_checked_against_running_balances_in_order() -> None:
    start = {ISSUANCE: -50, ALICE: 50}
    # Alice -> Bob, then Bob (who had nothing) -> escrow: fine in this order...
    ok = apply_transfers(start, [tr(ALICE, BOB, 50, Code.ESCROW), tr(BOB, ESCROW, 50, Code.ESCROW)])
    assert ok == {ISSUANCE: -50, ALICE: 0, BOB: 0, ESCROW: 50}
    # ...but not the other way round, even though the net effect is the same.
    with pytest.raises(InsufficientFunds):
        apply_transfers(start, [tr(BOB, ESCROW, 50, Code.ESCROW), tr(ALICE, BOB, 50, Code.ESCROW)])


@pytest.mark.parametrize("acct", [BURNED, TREASURY, ESCROW, ALICE_BONDED])
def test_no_account_but_issuance_goes_below_zero(acct: str) -> None:
    with pytest.raises(InsufficientFunds):
        apply_transfers({}, [tr(acct, ALICE, 1)])


@pytest.mark.parametrize("amount", [0, -1, 2**63, 1.5, True, "5"])
def test_bad_amounts_are_refused(amount: object) -> None:
    with pytest.raises(AmountError):
        tr(ISSUANCE, ALICE, amount)  # type: ignore[arg-type]


def test_a_forged_transfer_amount_is_refused_too() -> None:
    t = tr(ISSUANCE, ALICE, 5)
    object.__setattr__(t, "amount", -5)  # bypass the frozen dataclass's own check
    with pytest.raises(AmountError):
        apply_transfers({}, [t])


def test_bad_accounts_are_refused() -> None:
    with pytest.raises(UnknownAccount):
        tr("wallet:nobody:available", ALICE, 1)
    with pytest.raises(UnknownAccount):
        tr(ALICE, ALICE, 1)


def test_balance_overflow_is_an_error_never_a_rounding() -> None:
    start = {ISSUANCE: -INT64_MAX, ALICE: INT64_MAX}
    with pytest.raises(BalanceOverflow) as e:
        apply_transfers(start, [tr(ISSUANCE, ALICE, 1)])
    assert isinstance(e.value, LedgerError) and isinstance(e.value, AmountError)
    assert str(INT64_MAX + 1) in str(e.value)
    # issuance itself is bounded below by the 64-bit range
    with pytest.raises(BalanceOverflow):
        apply_transfers({ISSUANCE: -(2**63) + 1, ALICE: 2**63 - 1}, [tr(ISSUANCE, BOB, 2)])


def test_empty_and_foreign_operations_are_refused() -> None:
    with pytest.raises(LedgerError):
        apply_transfers({}, [])
    with pytest.raises(LedgerError):
        apply_transfers({}, [(ISSUANCE, ALICE, 1, "faucet", D)])  # type: ignore[list-item]


def test_check_balances_names_every_broken_invariant() -> None:
    problems = check_balances({ISSUANCE: -10, ALICE: 15, BOB: -5, BURNED: 1})
    assert any(BOB in p and "below zero" in p for p in problems)
    assert any("sum to 1" in p for p in problems)
    assert not any(ISSUANCE in p for p in problems)
    assert any("not an integer" in p for p in check_balances({ISSUANCE: -1.0, ALICE: 1}))


def test_supply_excludes_issuance_and_burned() -> None:
    bal = apply_transfers(
        {},
        [
            tr(ISSUANCE, ALICE, 1000),
            tr(ALICE, ESCROW, 400, Code.ESCROW),
            tr(ESCROW, BURNED, 300, Code.BURN),
            tr(ESCROW, TREASURY, 100, Code.TREASURY),
        ],
    )
    minted, burned = -bal[ISSUANCE], bal[BURNED]
    assert supply_of(bal) == minted - burned == 700


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([ISSUANCE, ALICE, BOB, ESCROW, BURNED]),
            st.sampled_from([ISSUANCE, ALICE, BOB, ESCROW, BURNED]),
            st.integers(min_value=1, max_value=10**12),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_any_accepted_history_keeps_every_invariant(moves: list[tuple[str, str, int]]) -> None:
    bal: dict[str, int] = {}
    for debit, credit, amount in moves:
        if debit == credit:
            continue
        before = dict(bal)
        try:
            bal = apply_transfers(bal, [tr(debit, credit, amount)])
        except InsufficientFunds:
            assert bal == before
            continue
    assert check_balances(bal) == []
    assert sum(bal.values()) == 0


def test_operation_hash_covers_order_amount_memo_but_not_digest_case() -> None:
    a, b = tr(ISSUANCE, ALICE, 5), tr(ISSUANCE, BOB, 6)
    h = operation_hash([a, b], "m")
    assert h == operation_hash([tr(ISSUANCE, ALICE, 5, digest=D.upper().replace("0X", "0x")), b], "m")
    assert h != operation_hash([b, a], "m")
    assert h != operation_hash([a, b], "other memo")
    assert h != operation_hash([tr(ISSUANCE, ALICE, 4), b], "m")
    assert len(h) == 64


def test_chain_hash_links_rows_and_covers_every_field() -> None:
    row = dict(id=1, op_id="op", seq=0, debit=ISSUANCE, credit=ALICE, amount=5, code="faucet", digest=D, created_at=7)
    h1 = chain_hash(GENESIS_HASH, **row)
    assert h1 == chain_hash(GENESIS_HASH, **row)
    for key, other in [
        ("id", 2),
        ("op_id", "op2"),
        ("seq", 1),
        ("debit", BOB),
        ("credit", BOB),
        ("amount", 6),
        ("code", "bond"),
        ("digest", "0x" + "cd" * 32),
        ("created_at", 8),
    ]:
        assert chain_hash(GENESIS_HASH, **{**row, key: other}) != h1, key
    assert chain_hash(h1, **row) != h1  # the previous hash is part of it
    with pytest.raises(TypeError):
        chain_hash(GENESIS_HASH, **{**row, "amount": 5.0})  # a REAL amount never hashes like an int
    with pytest.raises(ValueError):
        chain_hash("ab", **row)


def test_canonical_json_is_canonical() -> None:
    assert canonical_json({"b": 1, "a": [b"\x01\xff", "é"]}) == '{"a":["0x01ff","é"],"b":1}'
    assert canonical_json({"a": 1, "b": 2}) == canonical_json({"b": 2, "a": 1})
    with pytest.raises(TypeError):
        canonical_json({"x": 0.5})
