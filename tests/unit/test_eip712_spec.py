"""EIP-712's own example (the ``Mail`` message) through gpucoin's code path.

The expected values are the ones published with EIP-712 in ethereum/EIPs, ``assets/eip-712/Example.js``
(and ``Example.sol``): key = keccak256("cow"), signer 0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826,
domain separator 0xf2cee375..., hashStruct(mail) 0xc52c0ee5..., digest 0xbe609aee...,
signature v = 28, r = 0x4355c47d..., s = 0x07299936.... (An early draft of the EIP had an
``httpOrigin`` domain field and a different digest; these are the values of the final text.)
"""

from __future__ import annotations

import copy

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak

from gpucoin.exceptions import SignatureError
from gpucoin.wallet.messages import (
    SECP256K1_N,
    digest_of_typed_data,
    recover_signer,
    recover_typed,
)

MAIL = {
    "types": {
        "EIP712Domain": [
            {"name": "name", "type": "string"},
            {"name": "version", "type": "string"},
            {"name": "chainId", "type": "uint256"},
            {"name": "verifyingContract", "type": "address"},
        ],
        "Person": [{"name": "name", "type": "string"}, {"name": "wallet", "type": "address"}],
        "Mail": [
            {"name": "from", "type": "Person"},
            {"name": "to", "type": "Person"},
            {"name": "contents", "type": "string"},
        ],
    },
    "primaryType": "Mail",
    "domain": {
        "name": "Ether Mail",
        "version": "1",
        "chainId": 1,
        "verifyingContract": "0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC",
    },
    "message": {
        "from": {"name": "Cow", "wallet": "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"},
        "to": {"name": "Bob", "wallet": "0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB"},
        "contents": "Hello, Bob!",
    },
}

# Published with EIP-712 (assets/eip-712/Example.js and Example.sol).
EIP_DOMAIN_SEPARATOR = "0xf2cee375fa42b42143804025fc449deafd50cc031ca257e0b194a650a912090f"
EIP_MAIL_HASH_STRUCT = "0xc52c0ee5d84264471806290a3f2c4cecfc5490626bf912d01f240d7a274b371e"
EIP_DIGEST = "0xbe609aee343fb3c4b28e1df9e632fca64fcfaede20f02e86244efddf30957bd2"
EIP_SIGNER = "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"
EIP_V = 28
EIP_R = 0x4355C47D63924E8A72E509B65029052EB6C299D53A04E167C5775FD466751C9D
EIP_S = 0x07299936D304C153F6443DFA05F40FF007D72911B6F72307F996231605B91562
EIP_SIGNATURE = "0x" + EIP_R.to_bytes(32, "big").hex() + EIP_S.to_bytes(32, "big").hex() + bytes([EIP_V]).hex()

COW_KEY = keccak(b"cow")
COW = Account.from_key(COW_KEY)


def test_digest_matches_the_eip():
    assert digest_of_typed_data(MAIL) == EIP_DIGEST


def test_digest_matches_plain_eth_account():
    signable = encode_typed_data(full_message=copy.deepcopy(MAIL))
    # EIP-191 version 0x01: header = domainSeparator, body = hashStruct(message).
    assert signable.version == b"\x01"
    assert "0x" + signable.header.hex() == EIP_DOMAIN_SEPARATOR
    assert "0x" + signable.body.hex() == EIP_MAIL_HASH_STRUCT
    assert "0x" + keccak(b"\x19" + signable.version + signable.header + signable.body).hex() == EIP_DIGEST


def test_digest_does_not_depend_on_address_case_or_mutate_input():
    lower = copy.deepcopy(MAIL)
    lower["domain"]["verifyingContract"] = lower["domain"]["verifyingContract"].lower()
    lower["message"]["from"]["wallet"] = lower["message"]["from"]["wallet"].lower()
    before = copy.deepcopy(lower)
    assert digest_of_typed_data(lower) == EIP_DIGEST
    assert lower == before


def test_the_eip_key_is_cows():
    assert COW.address == EIP_SIGNER
    assert MAIL["message"]["from"]["wallet"] == EIP_SIGNER


def test_signing_with_the_eip_key_gives_the_published_signature():
    digest = bytes.fromhex(EIP_DIGEST[2:])
    # The way gpucoin.wallet.messages.sign signs a digest: the account's key object, RFC 6979.
    v_raw, r, s = COW._key_obj.sign_msg_hash(digest).vrs
    assert (27 + v_raw, r, s) == (EIP_V, EIP_R, EIP_S)
    # Plain eth-account agrees, from the digest and from the typed data.
    signed_hash = Account.unsafe_sign_hash(digest, COW_KEY)
    assert (signed_hash.v, signed_hash.r, signed_hash.s) == (EIP_V, EIP_R, EIP_S)
    signed_typed = Account.sign_typed_data(COW_KEY, full_message=copy.deepcopy(MAIL))
    assert "0x" + bytes(signed_typed.signature).hex() == EIP_SIGNATURE
    assert "0x" + bytes(signed_typed.message_hash).hex() == EIP_DIGEST


def test_the_published_s_is_low():
    # gpucoin refuses s > secp256k1n/2 (EIP-2); the EIP's signature is already in low-s form.
    assert 1 <= EIP_S <= SECP256K1_N // 2


def test_project_recovers_the_eip_signer():
    assert recover_signer(MAIL, EIP_SIGNATURE) == EIP_SIGNER
    assert recover_signer(MAIL, bytes.fromhex(EIP_SIGNATURE[2:])) == EIP_SIGNER
    assert recover_typed(MAIL, EIP_SIGNATURE) == (EIP_DIGEST, EIP_SIGNER)
    # Plain eth-account recovers the same signer.
    signable = encode_typed_data(full_message=copy.deepcopy(MAIL))
    assert Account.recover_message(signable, signature=EIP_SIGNATURE) == EIP_SIGNER


def test_high_s_twin_of_the_eip_signature_is_refused():
    twin = "0x" + (EIP_R.to_bytes(32, "big") + (SECP256K1_N - EIP_S).to_bytes(32, "big") + bytes([55 - EIP_V])).hex()
    with pytest.raises(SignatureError, match="high s"):
        recover_signer(MAIL, twin)


@pytest.mark.parametrize(
    "path, value",
    [
        (("message", "contents"), "Hello, Bob?"),
        (("message", "to", "name"), "Rob"),
        (("message", "from", "wallet"), "0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB"),
        (("domain", "chainId"), 5),
        (("domain", "name"), "Ether Mail 2"),
    ],
)
def test_changed_mail_does_not_recover_cow(path, value):
    changed = copy.deepcopy(MAIL)
    node = changed
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert digest_of_typed_data(changed) != EIP_DIGEST
    try:
        recovered = recover_signer(changed, EIP_SIGNATURE)
    except SignatureError:
        return
    assert recovered != EIP_SIGNER
