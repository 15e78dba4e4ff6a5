"""The SQL ledger: signed messages and hash-chained double-entry transfers in int µGPC (SPEC.md, Money).

    accounts   account names (wallet_account, escrow_account, ISSUANCE, BURNED, TREASURY)
    transfer   Transfer (one debit/credit of µGPC authorized by a message digest) and Code
    rules      pure rules: apply_transfers, invariants, operation and chain hashes
    models     the sqlmodel tables (STRICT on SQLite)
    store      Ledger: record_message, post, balances, totals, audit
    audit      run_audit: re-check everything from genesis
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
from gpucoin.ledger.store import Ledger
from gpucoin.ledger.transfer import Code, Transfer

__all__ = [
    "BURNED",
    "ISSUANCE",
    "SYSTEM_ACCOUNTS",
    "TREASURY",
    "WALLET_KINDS",
    "BalanceOverflow",
    "Code",
    "Ledger",
    "Transfer",
    "escrow_account",
    "is_valid_account",
    "may_go_negative",
    "wallet_account",
]
