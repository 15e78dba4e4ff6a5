"""Is a stored message authentic: its digest, its signature and its signer (pure: no database).

The check ``Ledger.record_messages`` runs on each message before storing it, and
``gpucoin ledger audit`` runs again on every stored one.
"""

from __future__ import annotations

from typing import Any

from gpucoin.ledger.models import MessageRow
from gpucoin.wallet.messages import loads_json


def verify_message(row: MessageRow) -> tuple[dict[str, Any] | None, str | None]:
    """Check one stored message against its own typed data.

    Parses the stored canonical JSON (depth- and size-bounded: a stored row is as hostile as any
    input) and runs ``verify_typed_message`` on it with the row's columns.

    Returns:
        (the parsed typed data, or None if it is not a JSON object; the problem, or None if it holds).
    """
    try:
        typed = loads_json(row.typed_data)
    except (TypeError, ValueError) as exc:
        return None, f"typed data is not JSON ({exc})"
    problem = verify_typed_message(
        typed,
        primary_type=row.primary_type,
        nonce=row.nonce,
        digest=row.digest,
        signature=row.signature,
        signer=row.signer,
    )
    return (typed if isinstance(typed, dict) else None), problem


def verify_typed_message(
    typed: Any, *, primary_type: str, nonce: str | None, digest: str, signature: str, signer: str
) -> str | None:
    """Check parsed typed data against the columns stored beside it; None if it holds, else the problem.

    Checks: the digest recomputes (EIP-712, ``gpucoin.wallet.messages.recover_typed``); the
    signature (65 bytes, 0x-hex) recovers to ``signer`` (a checksum address; high-s signatures are
    refused); the message's own signer field (``SIGNER_FIELD``, e.g. ``JobOrder.consumer``) is
    that signer; ``primary_type`` and ``nonce`` (decimal text, or None) match the typed data.
    """
    from gpucoin.wallet.messages import SIGNER_FIELD, recover_typed

    if not isinstance(typed, dict):
        return "typed data is not a JSON object"
    if typed.get("primaryType") != primary_type:
        return f"primary type {primary_type!r} but the typed data says {typed.get('primaryType')!r}"
    body = typed.get("message")
    if isinstance(body, dict) and "nonce" in body:
        raw = body["nonce"]
        try:
            in_body = str(int(raw, 0) if isinstance(raw, str) else int(raw))
        except (TypeError, ValueError):
            return f"nonce {raw!r} is not an integer"
        if in_body != nonce:
            return f"stored nonce {nonce!r} but the typed data says {in_body}"
    elif nonce is not None:
        return f"stored nonce {nonce!r} but the typed data has none"
    try:
        recomputed, recovered = recover_typed(typed, signature)
    except Exception as exc:  # malformed typed data or signature is a finding, not a crash
        return f"digest or signature does not check ({type(exc).__name__}: {exc})"
    if recomputed != digest.lower():
        return f"digest recomputes to {recomputed}, stored {digest}"
    if recovered != signer:
        return f"signature recovers to {recovered}, stored signer {signer}"
    field = SIGNER_FIELD.get(primary_type)
    if field is not None and (not isinstance(body, dict) or body.get(field) != recovered):
        claimed = body.get(field) if isinstance(body, dict) else None
        return f"{primary_type}.{field} is {claimed} but the message was signed by {recovered}"
    return None
