"""The SQL ledger: signed messages and hash-chained double-entry transfers in int µGPC (SPEC.md, Money).

Pure rules (no database, no I/O):

    accounts     account names (wallet_account, escrow_account, ISSUANCE, BURNED, TREASURY)
    transfer     Transfer (one debit/credit of µGPC authorized by a message digest) and Code
    rules        apply_transfers, invariants, operation and chain hashes
    state        the money rules of one operation: shapes, escrow pending/post/void, unbonding
    admission    which signed messages the ledger admits (Genesis first, domain, signers, ...)
    plans        the transfers each signed message authorizes
    facts        what the authorization rules read
    authorize    one authorization rule per message type; authorize_operation
    epochs       the epoch clock and what closing an epoch mints
    authenticity a stored message's digest, signature and signer

On the database:

    models       the sqlmodel tables (STRICT on SQLite); migrate: Alembic (migrations/)
    db           engines, transactions, bulk inserts; market: the stored Genesis and policy
    record       checking, admitting and storing messages; post: authorizing and posting operations
    store        Ledger: init_genesis, record_message(s), post, post_batch, reads, audit
    audit        run_audit: re-check everything from genesis with the same rules
    export       every signed message, policy and transfer as JSON lines
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
