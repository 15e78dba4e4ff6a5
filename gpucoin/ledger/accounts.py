"""Names of ledger accounts, and which of them may go below zero.

An account name is text the ledger stores as-is:

    wallet:<checksum address>:available   spendable tokens of a wallet
    wallet:<checksum address>:bonded      stake bonded by a volunteer (slashable)
    wallet:<checksum address>:unbonding   stake on its way back to available
    job:<job id>:escrow                   a job's budget, held until settled or refunded
    system:issuance                       source of every mint; its balance is minus all minted
    system:burned                         sink of every burn and slash
    system:treasury                       the policy's treasury share

Only ``system:issuance`` may go below zero (SPEC.md, Money).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

from eth_utils import is_address

from gpucoin.exceptions import UnknownAccount
from gpucoin.wallet.messages import checksum_address as to_checksum_address

ISSUANCE = "system:issuance"
BURNED = "system:burned"
TREASURY = "system:treasury"
SYSTEM_ACCOUNTS = (ISSUANCE, BURNED, TREASURY)

WalletKind = Literal["available", "bonded", "unbonding"]
WALLET_KINDS: tuple[str, ...] = ("available", "bonded", "unbonding")

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def wallet_account(address: str, kind: WalletKind = "available") -> str:
    """Name the ``kind`` account of the wallet at ``address`` (any case; stored checksummed).

    Raises:
        UnknownAccount: if ``address`` is not a 20-byte hex address or ``kind`` is unknown.
    """
    if not is_address(address):
        raise UnknownAccount(f"not an Ethereum address: {address!r}")
    if kind not in WALLET_KINDS:
        raise UnknownAccount(f"unknown wallet account kind {kind!r}; expected one of {WALLET_KINDS}")
    return f"wallet:{to_checksum_address(address)}:{kind}"


def escrow_account(job_id: str) -> str:
    """Name the escrow account of job ``job_id`` (1-128 of ``[A-Za-z0-9_.-]``).

    Raises:
        UnknownAccount: for a job id outside that alphabet or length.
    """
    if not _JOB_ID.match(job_id):
        raise UnknownAccount(f"not a valid job id: {job_id!r}")
    return f"job:{job_id}:escrow"


def may_go_negative(account: str) -> bool:
    """True only for ``system:issuance``, whose balance is minus everything ever minted."""
    return account == ISSUANCE


def is_valid_account(account: str) -> bool:
    """True if ``account`` is a name of one of the forms in this module's docstring."""
    return isinstance(account, str) and _valid_name(account)


@lru_cache(maxsize=1 << 16)
def _valid_name(account: str) -> bool:
    """``is_valid_account`` of a str, cached: every transfer checks both its accounts, and an EIP-55
    checksum is a keccak."""
    if account in SYSTEM_ACCOUNTS:
        return True
    parts = account.split(":")
    if len(parts) == 3 and parts[0] == "wallet":
        return is_address(parts[1]) and parts[1] == to_checksum_address(parts[1]) and parts[2] in WALLET_KINDS
    if len(parts) == 3 and parts[0] == "job":
        return bool(_JOB_ID.match(parts[1])) and parts[2] == "escrow"
    return False


def account_kind(account: str) -> str:
    """The kind of a valid account name: ``available``, ``bonded``, ``unbonding``, ``escrow``,
    ``issuance``, ``burned`` or ``treasury``.

    Raises:
        UnknownAccount: for a name of no known form.
    """
    if not is_valid_account(account):
        raise UnknownAccount(f"not a ledger account: {account!r}")
    if account in SYSTEM_ACCOUNTS:
        return account.split(":")[1]
    return account.split(":")[2]


def account_owner(account: str) -> str | None:
    """The wallet address (checksummed) or job id an account belongs to; None for a system account."""
    if account in SYSTEM_ACCOUNTS:
        return None
    return account.split(":")[1]
