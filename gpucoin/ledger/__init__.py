"""The SQL ledger: signed messages and hash-chained double-entry transfers in int µGPC (SPEC.md, Money).

    accounts   account names (wallet_account, escrow_account, ISSUANCE, BURNED, TREASURY)
    transfer   Transfer (one debit/credit of µGPC authorized by a message digest) and Code
    rules      pure rules: apply_transfers, invariants, operation and chain hashes
    state      pure rules of one operation: shapes, escrow pending/post/void, unbonding
    models     the sqlmodel tables (STRICT on SQLite)
    migrate    Alembic: create or upgrade the schema (migrations/)
    store      Ledger: record_message(s), post, post_batch, balances, totals, audit (SQLite, PostgreSQL)
    audit      run_audit: re-check everything from genesis
    export     every signed message and transfer as JSON lines
"""

from gpucoin.ledger.accounts import (
    BURNED,
    ISSUANCE,
    SYSTEM_ACCOUNTS,
    TREASURY,
    WALLET_KINDS,
    escrow_account,
    is_valid_account,
    may_go_negative,
    wallet_account,
)
from gpucoin.ledger.rules import BalanceOverflow
from gpucoin.ledger.state import LedgerState, apply_operation
from gpucoin.ledger.store import Ledger
from gpucoin.ledger.transfer import Code, Operation, Transfer

__all__ = [
    "BURNED",
    "ISSUANCE",
    "SYSTEM_ACCOUNTS",
    "TREASURY",
    "WALLET_KINDS",
    "BalanceOverflow",
    "Code",
    "Ledger",
    "LedgerState",
    "Operation",
    "apply_operation",
    "Transfer",
    "escrow_account",
    "is_valid_account",
    "may_go_negative",
    "wallet_account",
]
