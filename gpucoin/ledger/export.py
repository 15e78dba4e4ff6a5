"""Export a ledger as JSON lines: every signed message, operation and transfer (``gpucoin ledger export``).

The export holds everything needed to re-verify the ledger with one's own tools, without gpucoin:

- ``{"kind": "header", "format": "gpucoin-ledger-export-v3", "schema": <revision>, ...}`` first;
- one ``{"kind": "policy", "hash", "policy"}`` per policy the ledger applies (the Genesis names it
  by ``policyHash``; ``hash`` is keccak256 of the canonical JSON of ``policy``, sorted keys, no
  spaces), so a reader can recompute what every Settlement and EpochClose may move;
- one ``{"kind": "message", ...}`` per signed message, in recording order, with its full EIP-712
  typed data (``typed_data``, the ``eth_signTypedData_v4`` JSON), ``digest``, ``signature`` and
  ``signer``: ``eth_account.Account.recover_message(encode_typed_data(full_message=typed_data),
  signature=signature)`` returns ``signer``;
- one ``{"kind": "operation", ...}`` per operation (id, content hash, memo, epoch, its transfer
  id range), in ledger order;
- one ``{"kind": "transfer", ...}`` per transfer, in id order, with ``prev_hash`` and ``row_hash``:
  ``row_hash = sha256(bytes.fromhex(prev_hash) + canonical_json(["gpucoin-transfer-v1", id, op_id,
  seq, debit, credit, amount, code, digest, created_at]))``, where canonical JSON has sorted keys,
  no spaces and UTF-8 text (``gpucoin.ledger.rules.chain_hash``); the first row's prev_hash is 64
  zeros. Amounts are integers of µGPC (1 GPC = 10**6 µGPC).

Every integer above 2**53 - 1 (uint64 nonces, most of all) is written as its decimal string, any
other as a JSON number (``gpucoin.jsonsafe``), so JavaScript's plain ``JSON.parse`` reads every
value exactly; EIP-712 libraries take the strings as uints as they are, and a chain hash is over
the integer the string stands for. (v2 wrote every integer as a number.)

Rows are read in one read transaction and streamed, so memory does not grow with the ledger.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlmodel import Session, select

from gpucoin.ledger.models import MessageRow, OperationRow, PolicyRow, TransferRow
from gpucoin.wallet.messages import loads_json

EXPORT_FORMAT = "gpucoin-ledger-export-v3"
"""The ``format`` of the header line; a change in any record's fields gets a new version."""

_BATCH = 5000
"""Rows fetched from the database at a time."""


def iter_export(session: Session, schema_revision: str | None) -> Iterator[dict[str, Any]]:
    """Yield the export's records (see the module docstring) from the ledger behind ``session``."""
    yield {"kind": "header", "format": EXPORT_FORMAT, "schema": schema_revision, "amount_unit": "µGPC"}
    for p in session.exec(select(PolicyRow).order_by(PolicyRow.hash)):
        yield {"kind": "policy", "hash": p.hash, "policy": loads_json(p.body)}
    for m in session.exec(select(MessageRow).order_by(MessageRow.id).execution_options(yield_per=_BATCH)):
        yield {
            "kind": "message",
            "id": m.id,
            "digest": m.digest,
            "primary_type": m.primary_type,
            "signer": m.signer,
            "nonce": m.nonce,
            "signature": m.signature,
            "typed_data": loads_json(m.typed_data),
            "recorded_at_us": m.recorded_at,
        }
    for op in session.exec(
        select(OperationRow).order_by(OperationRow.first_transfer_id).execution_options(yield_per=_BATCH)
    ):
        yield {
            "kind": "operation",
            "op_id": op.op_id,
            "content_hash": op.content_hash,
            "memo": op.memo,
            "epoch": op.epoch,
            "unbonding_epochs": op.unbonding_epochs,
            "first_transfer_id": op.first_transfer_id,
            "n_transfers": op.n_transfers,
            "created_at_us": op.created_at,
        }
    for t in session.exec(select(TransferRow).order_by(TransferRow.id).execution_options(yield_per=_BATCH)):
        yield {
            "kind": "transfer",
            "id": t.id,
            "op_id": t.op_id,
            "seq": t.seq,
            "debit": t.debit,
            "credit": t.credit,
            "amount": t.amount,
            "code": t.code,
            "digest": t.digest,
            "created_at": t.created_at,
            "prev_hash": t.prev_hash,
            "row_hash": t.row_hash,
        }
