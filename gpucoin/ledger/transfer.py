"""The unit of every money movement: one double-entry transfer of µGPC."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from gpucoin.exceptions import UnknownAccount
from gpucoin.ledger.accounts import is_valid_account
from gpucoin.money import check_amount


class Code(str, Enum):
    """Why a transfer happened; stored with it."""

    GENESIS = "genesis"  # issuance -> wallet available: an allocation of the market's Genesis
    FAUCET = "faucet"  # issuance -> wallet available (a dev market only)
    BOND = "bond"  # available -> bonded
    UNBOND = "unbond"  # bonded -> unbonding
    WITHDRAW = "withdraw"  # unbonding -> available, after the unbonding period
    ESCROW = "escrow"  # consumer available -> job escrow
    BURN = "burn"  # job escrow -> burned: the burn share of a settled interval's payment
    TREASURY = "treasury"  # job escrow -> treasury: the treasury share of that payment
    PAY = "pay"  # job escrow -> worker available: `direct` mode payment
    MINT_WORKER = "mint_worker"  # issuance -> worker available: epoch emission
    MINT_VERIFIER = "mint_verifier"  # issuance -> verifier available: epoch emission
    SLASH = "slash"  # cheater bonded -> burned
    WHISTLEBLOWER = "whistleblower"  # cheater bonded -> verifier available
    REFUND = "refund"  # job escrow -> consumer available, at the end of the job


@dataclass(frozen=True)
class Transfer:
    """Move ``amount`` µGPC from ``debit`` to ``credit``, authorized by the signed message ``digest``.

    Attributes:
        debit: account that loses ``amount`` (see ``gpucoin.ledger.accounts``).
        credit: account that gains ``amount``.
        amount: µGPC, an int in [1, 2**63 - 1].
        code: why (``Code``).
        digest: 0x-prefixed hex EIP-712 digest of the signed message that authorized it.

    Raises:
        AmountError: for an amount that is not a positive int64.
        UnknownAccount: for an account name of no known form, or debit == credit.
    """

    debit: str
    credit: str
    amount: int
    code: Code
    digest: str

    def __post_init__(self) -> None:
        check_amount(self.amount, allow_zero=False)
        for acct in (self.debit, self.credit):
            if not is_valid_account(acct):
                raise UnknownAccount(f"not a ledger account: {acct!r}")
        if self.debit == self.credit:
            raise UnknownAccount(f"a transfer needs two different accounts, got {self.debit!r} twice")
        if not (isinstance(self.digest, str) and self.digest.startswith("0x") and len(self.digest) == 66):
            raise ValueError(f"digest must be 0x + 64 hex digits, got {self.digest!r}")
        object.__setattr__(self, "code", Code(self.code))


MAX_OP_ID_LEN = 256
"""Longest operation id accepted, in characters."""

MAX_MEMO_LEN = 1024
"""Longest memo accepted, in characters (printable, no NUL: PostgreSQL text cannot hold it)."""


@dataclass(frozen=True)
class Operation:
    """One operation: linked transfers applied all or nothing under a client-chosen id.

    Attributes:
        op_id: 1-256 printable characters, chosen by the client so a retry is safe: the same id
            with the same content returns the original result, with other content is a conflict.
        transfers: applied in order; at least one.
        memo: free text stored with it (part of its content): at most ``MAX_MEMO_LEN`` printable
            characters (newlines and tabs allowed).

    The emission epoch an operation falls in is the ledger's own (its clock and its Genesis), never
    the caller's.

    Raises:
        LedgerError: for a bad id or memo, no transfers, or an item that is not a Transfer.
    """

    op_id: str
    transfers: tuple[Transfer, ...]
    memo: str = ""

    def __post_init__(self) -> None:
        from gpucoin.exceptions import LedgerError

        op_id = self.op_id
        if not isinstance(op_id, str) or not 1 <= len(op_id) <= MAX_OP_ID_LEN or not op_id.isprintable():
            raise LedgerError(f"operation id must be 1-{MAX_OP_ID_LEN} printable characters, got {op_id!r}")
        if not isinstance(self.memo, str):
            raise LedgerError(f"memo must be text, got {type(self.memo).__name__}")
        if len(self.memo) > MAX_MEMO_LEN or not all(c.isprintable() or c in "\n\t" for c in self.memo):
            raise LedgerError(f"memo must be at most {MAX_MEMO_LEN} printable characters, got {self.memo[:40]!r}")
        try:
            self.memo.encode("utf-8")
        except UnicodeEncodeError:
            raise LedgerError(f"memo is not valid Unicode text (a lone surrogate): {self.memo[:40]!r}") from None
        transfers = tuple(self.transfers)
        if not transfers:
            raise LedgerError(f"operation {op_id!r} has no transfers")
        for i, t in enumerate(transfers):
            if not isinstance(t, Transfer):
                raise LedgerError(f"operation {op_id!r}: transfer #{i} is a {type(t).__name__}, not a Transfer")
        object.__setattr__(self, "transfers", transfers)
