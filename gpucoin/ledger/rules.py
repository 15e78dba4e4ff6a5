"""The ledger's rules as pure functions: no database, no I/O (SPEC.md, Money).

- ``apply_transfers``: move µGPC between accounts of a balance map, refusing an overdraft of
  any account but ``system:issuance`` and any balance that leaves the signed 64-bit range.
- ``check_balances`` / ``supply_of``: the invariants a balance map must keep (sum zero, no user
  account below zero, supply = minted - burned).
- ``operation_hash`` / ``chain_hash``: the content hash that makes an operation id idempotent
  and the hash chain that links every transfer row to the one before it.

Every amount and balance is an int of µGPC.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gpucoin.exceptions import AmountError, InsufficientFunds, LedgerError
from gpucoin.ledger.accounts import BURNED, ISSUANCE, may_go_negative
from gpucoin.ledger.transfer import Code, Transfer
from gpucoin.money import check_amount

INT64_MIN = -(2**63)
"""Lowest balance a BIGINT column holds, in µGPC (only ``system:issuance`` goes below zero)."""

INT64_MAX = 2**63 - 1
"""Highest balance a BIGINT column holds, in µGPC."""

GENESIS_HASH = "00" * 32
"""``prev_hash`` of the first transfer row: 32 zero bytes as 64 hex digits."""

MINT_CODES = frozenset({Code.MINT_WORKER, Code.MINT_VERIFIER})
"""Codes of transfers that mint (debit ``system:issuance`` as epoch emission)."""

SLASH_CODES = frozenset({Code.SLASH, Code.WHISTLEBLOWER})
"""Codes of transfers that take a cheater's bond (burned or paid to the verifier)."""


class BalanceOverflow(LedgerError, AmountError):
    """A transfer would take a balance outside the signed 64-bit range; nothing is applied.

    Both a ``LedgerError`` (the write is refused) and an ``AmountError`` (an overflowing amount),
    so callers catching either see it.
    """


def apply_transfers(balances: Mapping[str, int], transfers: Sequence[Transfer]) -> dict[str, int]:
    """Apply ``transfers`` in order to a copy of ``balances`` and return the new map.

    Args:
        balances: account name -> balance in µGPC; an account missing from it has 0.
        transfers: the transfers of one operation, applied one after another; each debit is
            checked against the running balance (the result of the transfers before it).

    Returns:
        A new dict: ``balances`` plus every account the transfers touch, with its new balance.
        ``balances`` itself is never modified, so on any error nothing is applied.

    Raises:
        LedgerError: for an empty operation or an item that is not a ``Transfer``.
        AmountError: for an amount outside [1, 2**63 - 1] µGPC.
        InsufficientFunds: if an account other than ``system:issuance`` would go below zero.
        BalanceOverflow: if a balance would leave [-2**63, 2**63 - 1] µGPC.
    """
    if len(transfers) == 0:
        raise LedgerError("an operation needs at least one transfer, got none")
    new = dict(balances)
    for i, t in enumerate(transfers):
        if not isinstance(t, Transfer):
            raise LedgerError(f"transfer #{i} is a {type(t).__name__}, not a Transfer")
        # Transfer checks this on construction; re-check because a frozen dataclass can be forged.
        check_amount(t.amount, allow_zero=False)
        debit_after = new.get(t.debit, 0) - t.amount
        credit_after = new.get(t.credit, 0) + t.amount
        if debit_after < 0 and not may_go_negative(t.debit):
            raise InsufficientFunds(
                f"transfer #{i} ({t.code.value}) debits {t.amount} µGPC from {t.debit}, "
                f"which has {new.get(t.debit, 0)} µGPC (short by {-debit_after} µGPC)"
            )
        if debit_after < INT64_MIN:
            raise BalanceOverflow(
                f"transfer #{i} ({t.code.value}) takes {t.debit} to {debit_after} µGPC, below {INT64_MIN}"
            )
        if credit_after > INT64_MAX:
            raise BalanceOverflow(
                f"transfer #{i} ({t.code.value}) takes {t.credit} to {credit_after} µGPC, above {INT64_MAX}"
            )
        new[t.debit] = debit_after
        new[t.credit] = credit_after
    return new


def supply_of(balances: Mapping[str, int]) -> int:
    """Tokens in circulation, µGPC: the sum of every balance except issuance and burned.

    With balances summing to zero this equals minted - burned, where minted is minus the
    issuance balance (as long as nothing was ever credited back to issuance).
    """
    return sum(v for k, v in balances.items() if k not in (ISSUANCE, BURNED))


def check_balances(balances: Mapping[str, int]) -> list[str]:
    """List every invariant a balance map breaks; empty means it is sound.

    Checks: the sum of all balances is zero; no account but ``system:issuance`` is below zero;
    every balance fits [-2**63, 2**63 - 1] µGPC; every balance is an int (never a float).
    """
    problems: list[str] = []
    for acct in sorted(balances):
        v = balances[acct]
        if isinstance(v, bool) or not isinstance(v, int):
            problems.append(f"account {acct}: balance {v!r} is not an integer of µGPC")
            continue
        if v < 0 and not may_go_negative(acct):
            problems.append(f"account {acct}: balance {v} µGPC is below zero")
        if not INT64_MIN <= v <= INT64_MAX:
            problems.append(f"account {acct}: balance {v} µGPC is outside the 64-bit range")
    total = sum(v for v in balances.values() if isinstance(v, int))
    if total != 0:
        problems.append(f"balances sum to {total} µGPC, not 0")
    return problems


def canonical_json(obj: Any) -> str:
    """Render ``obj`` as canonical JSON: sorted keys, no spaces, UTF-8 kept, bytes as 0x-hex.

    Used for stored typed data and for every hash the ledger computes, so equal content always
    gives equal text. Floats are refused (no float carries money or a signed field).

    Raises:
        TypeError: for a float or an object JSON cannot represent.
    """
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


_ATOMS = frozenset({str, int, bool, type(None)})
"""Types ``_plain`` passes through unchanged (checked by exact type: the hot path of every hash)."""


def _plain(obj: Any) -> Any:
    """Turn bytes into 0x-hex and tuples into lists, recursively; refuse floats."""
    t = type(obj)
    if t in _ATOMS:
        return obj
    if t is dict:
        return {k if type(k) is str else str(k): _plain(v) for k, v in obj.items()}
    if t is list or t is tuple:
        return [_plain(v) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return "0x" + bytes(obj).hex()
    if isinstance(obj, float):
        raise TypeError(f"canonical JSON refuses floats, got {obj!r}")
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Code):
        return obj.value
    return obj


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def transfer_fields(t: Transfer) -> list[Any]:
    """The canonical fields of one transfer as a JSON-ready list (digest in lower case)."""
    return [t.debit, t.credit, t.amount, Code(t.code).value, t.digest.lower()]


def operation_hash(transfers: Iterable[Transfer], memo: str) -> str:
    """Hash of an operation's content (its transfers in order, and its memo) as 64 hex digits.

    Two posts with the same operation id are the same operation exactly when this is equal.
    """
    return operation_hash_of_fields([transfer_fields(t) for t in transfers], memo)


def operation_hash_of_fields(fields: Sequence[Sequence[Any]], memo: str) -> str:
    """``operation_hash`` from each transfer's ``transfer_fields`` list (as rows store them), in order.

    Raises:
        TypeError: if a field is a float (e.g. an amount a database turned into REAL).
    """
    return _sha256_hex(canonical_json(["gpucoin-operation-v1", memo, [list(f) for f in fields]]))


def chain_hash(
    prev_hash: str,
    *,
    id: int,
    op_id: str,
    seq: int,
    debit: str,
    credit: str,
    amount: int,
    code: str,
    digest: str,
    created_at: int,
) -> str:
    """Row hash of a transfer: sha256(previous row hash bytes || canonical JSON of its fields).

    Args:
        prev_hash: the previous row's hash (64 hex digits), ``GENESIS_HASH`` for the first row.
        id, op_id, seq, debit, credit, amount, code, digest, created_at: the row as stored
            (amount in µGPC, created_at in µs since the Unix epoch).

    Returns:
        64 lower-case hex digits.

    Raises:
        ValueError: if ``prev_hash`` is not 64 hex digits.
    """
    prev = bytes.fromhex(prev_hash)
    if len(prev) != 32:
        raise ValueError(f"prev_hash must be 32 bytes, got {len(prev)}")
    fields = canonical_json(["gpucoin-transfer-v1", id, op_id, seq, debit, credit, amount, code, digest, created_at])
    return hashlib.sha256(prev + fields.encode("utf-8")).hexdigest()
