"""Read and check one exported signed message (``gpucoin receipt verify FILE``).

Two shapes are read, both plain JSON (a file holding one object, or a JSON-lines file holding
exactly one non-empty line):

- ``SignedMessage.to_json()``: ``{"primaryType", "domain", "message", "digest", "signature",
  "signer"}``, what a worker sends the coordinator;
- a message record of ``gpucoin ledger export``: ``{"kind": "message", "typed_data": {...},
  "digest", "signature", "signer", ...}`` (``typed_data`` is the ``eth_signTypedData_v4`` JSON).

The check is ``gpucoin.wallet.messages.verify``: canonical fields and domain, the digest
recomputed (EIP-712), the signature's low s and v, the recovered signer equal to the stated
signer and to the message's own signer field, and optionally an expected signer and domain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpucoin.exceptions import SignatureError
from gpucoin.wallet.messages import (
    MESSAGE_TYPES,
    Domain,
    MessageFieldError,
    SignedMessage,
    loads_json,
    typed_data_types,
    verify,
)

MAX_FILE_BYTES = 1 << 20
"""Largest file read (1 MiB): a signed message is a few kB."""


class NotJSON(MessageFieldError):
    """The input is not one JSON object at all (as opposed to a malformed signed message)."""


@dataclass(frozen=True)
class Verdict:
    """What checking one signed message found.

    Attributes:
        message: the message as read.
        valid: True if every check passed.
        recovered: checksum address the signature recovers to (None if it recovers nothing).
        reason: why it is invalid ("" when valid).
    """

    message: SignedMessage
    valid: bool
    recovered: str | None
    reason: str


def parse_signed(text: str) -> SignedMessage:
    """The signed message in ``text`` (either shape of the module docstring).

    Raises:
        NotJSON: for text that is not one JSON object.
        MessageFieldError / MessageAmountError: for an object of neither shape, or whose parts
            are malformed (unknown type, bad domain, field out of range, bad hex).
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    try:
        obj = loads_json(text if len(lines) != 1 else lines[0])
    except MessageFieldError as e:
        raise NotJSON(f"not a JSON object ({e}); expected one signed message") from None
    if not isinstance(obj, dict):
        raise NotJSON(f"expected one JSON object, got {type(obj).__name__}")
    if obj.get("kind") == "message" or "typed_data" in obj:
        return _from_export(obj)
    return SignedMessage.from_dict(obj)


def _from_export(record: dict[str, Any]) -> SignedMessage:
    typed = record.get("typed_data")
    if isinstance(typed, str):
        typed = loads_json(typed)
    if not isinstance(typed, dict):
        raise MessageFieldError("an exported message record needs a typed_data object")
    primary = typed.get("primaryType")
    if primary in MESSAGE_TYPES and typed.get("types") != typed_data_types(primary):
        # what other tools hash is the record's own typed data: it must declare gpucoin's types
        raise MessageFieldError(f"typed_data declares types for {primary} that differ from gpucoin's")
    missing = [k for k in ("digest", "signature", "signer") if k not in record]
    if missing:
        raise MessageFieldError(f"the exported message record has no {', '.join(missing)}")
    shaped = {
        "primaryType": typed.get("primaryType"),
        "domain": typed.get("domain"),
        "message": typed.get("message"),
        "digest": record["digest"],
        "signature": record["signature"],
        "signer": record["signer"],
    }
    return SignedMessage.from_dict(shaped)


def check_signed(signed: SignedMessage, *, expected_signer: str | None = None, domain: Domain | None = None) -> Verdict:
    """Check ``signed`` (``messages.verify``) and say what was found; never raises for a bad signature.

    Args:
        expected_signer: if given, the message must be signed by this address.
        domain: if given, the message must be signed in this EIP-712 domain.
    """
    try:
        recovered = verify(signed, expected_signer=expected_signer, domain=domain)
    except SignatureError as e:
        return Verdict(signed, False, _recover_quietly(signed), str(e))
    return Verdict(signed, True, recovered, "")


def _recover_quietly(signed: SignedMessage) -> str | None:
    from gpucoin.wallet.messages import recover_typed

    try:
        return recover_typed(signed.typed_data(), signed.signature)[1]
    except SignatureError:
        return None
