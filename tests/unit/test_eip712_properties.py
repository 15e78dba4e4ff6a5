"""Properties of gpucoin's EIP-712 messages, for every primary type in MESSAGE_TYPES.

For random in-range messages (the bounds ``validate_message`` enforces):

- sign then verify returns the signer, and the message's ``SIGNER_FIELD`` is that signer;
- changing any single field of the message or of the domain to another valid value makes ``verify``
  raise, whether the stored digest is left as signed or recomputed for the changed message (then
  the signature recovers some other address or none at all);
- changing any single byte of the 65-byte signature makes ``verify`` raise.
"""

from __future__ import annotations

import dataclasses

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpucoin.exceptions import SignatureError
from gpucoin.wallet.messages import (
    AMOUNT_FIELDS,
    MAX_FIELD_INT,
    MAX_STRING_BYTES,
    MESSAGE_TYPES,
    SECP256K1_N,
    SIGNER_FIELD,
    VERDICTS,
    Domain,
    SignedMessage,
    digest_of,
    recover_signer,
    sign,
    validate_message,
    verify,
)

KEYS = [Account.from_key(keccak(text=f"gpucoin-property-{i}")) for i in range(4)]
"""A few keys derived once (key derivation is slow next to signing)."""

PROPERTY_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

ADDRESSES = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
BYTES32 = st.binary(min_size=32, max_size=32).map(lambda b: "0x" + b.hex())
# Strings of 1 .. MAX_STRING_BYTES UTF-8 bytes: short random text (any code point hypothesis draws
# but NUL, which gpucoin refuses; 1 to 4 bytes each) and texts at or near the byte limit in 1-, 2-,
# 3- and 4-byte characters.
_LONG = [
    "a" * MAX_STRING_BYTES,
    "é" * (MAX_STRING_BYTES // 2),
    "€" * (MAX_STRING_BYTES // 3) + "a",
    "𝄞" * (MAX_STRING_BYTES // 4),
    "a" * (MAX_STRING_BYTES - 2) + "é",
]
STRINGS = st.one_of(
    st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), min_size=1, max_size=48),
    st.sampled_from(_LONG),
    st.text(alphabet="ab€", min_size=1, max_size=MAX_STRING_BYTES // 3),
).filter(lambda s: 1 <= len(s.encode("utf-8")) <= MAX_STRING_BYTES)


def uint_strategy(primary_type: str, name: str, typ: str) -> st.SearchStrategy[int]:
    """Ints within the bound ``validate_message`` enforces: uintN, and at most 2**63 - 1 (BIGINT)."""
    if name in AMOUNT_FIELDS[primary_type]:
        return st.integers(0, MAX_FIELD_INT)
    bits = int(typ.removeprefix("uint"))
    return st.integers(0, min(2**bits - 1, MAX_FIELD_INT))


def field_strategy(primary_type: str, name: str, typ: str) -> st.SearchStrategy:
    """Valid values of one field (the signer field aside)."""
    if primary_type == "VerificationReport" and name == "verdict":
        return st.sampled_from(VERDICTS)
    if typ == "address":
        return ADDRESSES
    if typ == "bytes32":
        return BYTES32
    if typ == "string":
        return STRINGS
    if typ == "bool":
        return st.booleans()
    if typ == "Allocation[]":
        return st.lists(
            st.fixed_dictionaries({"recipient": ADDRESSES, "amount": st.integers(0, MAX_FIELD_INT)}), max_size=4
        )
    assert typ.startswith("uint"), typ
    return uint_strategy(primary_type, name, typ)


DOMAIN_FIELDS = {
    "chainId": (st.integers(0, MAX_FIELD_INT), "uint256"),  # Domain bounds chainId by 2**63 - 1 too
    "verifyingContract": (ADDRESSES, "address"),
    "name": (STRINGS, "string"),
    "version": (STRINGS, "string"),
}
"""Domain fields: (valid values, EIP-712 type)."""


@st.composite
def signing_inputs(draw, primary_type: str):
    """(account, domain, message) of ``primary_type``, its signer field set to the account's address."""
    account = draw(st.sampled_from(KEYS))
    message = {}
    for f in MESSAGE_TYPES[primary_type]:
        name, typ = f["name"], f["type"]
        if name == SIGNER_FIELD[primary_type]:
            message[name] = account.address
        else:
            message[name] = draw(field_strategy(primary_type, name, typ))
    domain = Domain(chain_id=draw(DOMAIN_FIELDS["chainId"][0]), verifying_contract=draw(ADDRESSES))
    return account, domain, message


def _xor_hex(data: st.DataObject, old: str, label: str) -> str:
    """``old`` (0x-hex of n bytes) XOR a drawn non-zero n-byte mask: a different value of the same kind."""
    raw = bytes.fromhex(old[2:])
    mask = data.draw(st.binary(min_size=len(raw), max_size=len(raw)), label=label)
    if not any(mask):
        mask = bytes(len(raw) - 1) + b"\x01"
    return "0x" + bytes(a ^ b for a, b in zip(raw, mask, strict=True)).hex()


def other_value(data: st.DataObject, strategy: st.SearchStrategy, typ: str, old, label: str):
    """Another valid value of a field of type ``typ`` whose valid values ``strategy`` draws.

    Built to differ from ``old`` (no filtering, so hypothesis never gives up on a draw): uints move by
    a drawn non-zero step modulo their range, addresses and bytes32 are XORed with a non-zero mask,
    strings are redrawn and get a different first character if they come out equal.
    """
    if typ.startswith("uint"):
        hi = min(2 ** int(typ.removeprefix("uint")) - 1, MAX_FIELD_INT)
        return (old + data.draw(st.integers(1, hi), label=label)) % (hi + 1)
    if typ in ("address", "bytes32"):
        return _xor_hex(data, old, label)
    if typ == "bool":
        return not old
    if typ.endswith("[]"):  # one more item, or the first one's amount moved
        if not old or data.draw(st.booleans(), label=label):
            return [*old, {"recipient": _xor_hex(data, "0x" + "00" * 20, label), "amount": 1}]
        first = {**old[0], "amount": (old[0]["amount"] + 1) % (MAX_FIELD_INT + 1)}
        return [first, *old[1:]]
    new = data.draw(strategy, label=label)
    if new == old:
        new = ("b" if old[0] != "b" else "c") + old[1:]  # never longer in UTF-8 bytes
    return new


def assert_refused(signed: SignedMessage, signer: str) -> None:
    """``verify`` raises SignatureError (or a subclass) for ``signed``."""
    with pytest.raises(SignatureError):
        verify(signed)
    with pytest.raises(SignatureError):
        verify(signed, expected_signer=signer)


def assert_changed_is_refused(signed: SignedMessage, signer: str, *, message=None, domain=None) -> None:
    """``signed`` with ``message`` / ``domain`` replaced is refused, with the old or a recomputed digest."""
    message = signed.message if message is None else message
    domain = signed.domain if domain is None else domain
    stale = dataclasses.replace(signed, message=message, domain=domain)
    assert_refused(stale, signer)
    fresh_digest = digest_of(signed.primary_type, domain, message)
    assert fresh_digest != signed.digest
    fresh = dataclasses.replace(stale, digest=fresh_digest)
    assert_refused(fresh, signer)
    try:
        recovered = recover_signer(fresh.typed_data(), signed.signature)
    except SignatureError:
        return
    assert recovered != signer


@pytest.mark.parametrize("primary_type", sorted(MESSAGE_TYPES))
@PROPERTY_SETTINGS
@given(data=st.data())
def test_sign_then_verify_and_any_change_is_refused(primary_type, data):
    account, domain, message = data.draw(signing_inputs(primary_type), label="inputs")
    signed = sign(account, primary_type, domain, message)
    signer = account.address

    # sign -> verify returns the signer; the signature is low-s with v in {27, 28}.
    assert signed.signer == signer
    assert verify(signed) == signer
    assert verify(signed, expected_signer=signer, domain=domain) == signer
    assert recover_signer(signed.typed_data(), signed.signature) == signer
    # and so does plain eth-account, nested Allocation[] structs included
    assert (
        Account.recover_message(encode_typed_data(full_message=signed.typed_data()), signature=signed.signature)
        == signer
    )
    field = SIGNER_FIELD[primary_type]
    if field is not None:
        assert signed.message[field] == signer
    raw = bytes.fromhex(signed.signature[2:])
    assert len(raw) == 65 and raw[64] in (27, 28)
    assert 1 <= int.from_bytes(raw[32:64], "big") <= SECP256K1_N // 2

    # Any single message field changed to another valid value.
    for f in MESSAGE_TYPES[primary_type]:
        name, typ = f["name"], f["type"]
        old = signed.message[name]
        if primary_type == "VerificationReport" and name == "verdict":
            new = next(v for v in VERDICTS if v != old)
        elif name == field and data.draw(st.booleans(), label=f"{name}: another cached key"):
            new = data.draw(st.sampled_from([k.address for k in KEYS if k.address != signer]), label=f"new {name}")
        else:
            new = other_value(data, field_strategy(primary_type, name, typ), typ, old, f"new {name}")
        changed = validate_message(primary_type, {**signed.message, name: new})
        assert changed[name] != old
        assert_changed_is_refused(signed, signer, message=changed)

    # Any single domain field changed to another valid value.
    for key, (strategy, typ) in DOMAIN_FIELDS.items():
        old = signed.domain[key]
        new = other_value(data, strategy, typ, old, f"new domain {key}")
        changed_domain = Domain.from_dict({**signed.domain, key: new}).as_dict()
        assert changed_domain[key] != old
        assert_changed_is_refused(signed, signer, domain=changed_domain)

    # Any single byte of the signature changed (every position, a drawn non-zero XOR mask).
    mask = data.draw(st.integers(1, 255), label="mask")
    for i in range(65):
        flipped = raw[:i] + bytes([raw[i] ^ mask]) + raw[i + 1 :]
        bad = dataclasses.replace(signed, signature="0x" + flipped.hex())
        with pytest.raises(SignatureError):
            verify(bad)
        try:
            recovered = recover_signer(signed.typed_data(), flipped)
        except SignatureError:
            continue
        assert recovered != signer
