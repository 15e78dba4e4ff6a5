"""EIP-712 messages: digests, signing, recovery and verification (gpucoin.wallet.messages)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_keys import keys
from eth_utils import keccak
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpucoin.exceptions import AmountError, SignatureError
from gpucoin.wallet import (
    MESSAGE_TYPES,
    SECP256K1_N,
    SIGNER_FIELD,
    ZERO_BYTES32,
    Domain,
    MessageAmountError,
    MessageFieldError,
    SignedMessage,
    digest_of,
    digest_of_typed_data,
    distance_e9,
    recover_signer,
    sign,
    validate_message,
    verify,
)

ALICE = Account.from_key(keccak(text="alice"))
BOB = Account.from_key(keccak(text="bob"))
COW = Account.from_key(keccak(text="cow"))
DOMAIN = Domain(chain_id=31337, verifying_contract="0x" + "5e" * 20)


def h32(tag: str) -> str:
    """A 0x-hex bytes32 derived from a tag."""
    return "0x" + keccak(text=tag).hex()


def sample(primary_type: str, signer: str = ALICE.address) -> dict:
    """A valid message of each type, signed-for by ``signer``."""
    return {
        "JobOrder": dict(
            consumer=signer,
            jobId="shakespeare-1",
            specHash=h32("spec"),
            packageHash=h32("package"),
            workers=2,
            bidPerWorkerHour=1_500_000,
            budget=200_000_000,
            nonce=7,
            deadline=1_760_000_000,
        ),
        "NodeRegistration": dict(
            provider=signer,
            nodeId="ab" * 28,
            resources='{"CPU": 2}',
            askPerWorkerHour=800_000,
            stake=500_000_000,
            nonce=1,
            deadline=1_760_000_000,
        ),
        "WorkReceipt": dict(
            jobId="shakespeare-1",
            worker=signer,
            rank=1,
            stepStart=100,
            stepEnd=110,
            samples=320,
            computeTimeMs=5_800,
            sketchRoot=h32("sketch"),
            checkpointHash=h32("ckpt"),
            previousReceipt=ZERO_BYTES32,
            nonce=11,
        ),
        "VerificationReport": dict(
            verifier=signer, receiptDigest=h32("receipt"), verdict="fail", distanceE9=90_000_000, nonce=3
        ),
        "Settlement": dict(
            coordinator=signer,
            jobId="shakespeare-1",
            subject=h32("receipt"),
            epoch=4,
            paid=1_000,
            burned=950,
            treasury=50,
            minted=2_000,
            slashed=0,
            refunded=0,
            policyHash=h32("policy"),
            nonce=12,
        ),
        "PolicyChange": dict(admin=signer, policyHash=h32("policy"), effectiveEpoch=10, nonce=2),
        "Faucet": dict(recipient=BOB.address, amount=1_000_000_000, nonce=1),
        "Genesis": dict(
            coordinator=signer,
            admin=BOB.address,
            chainId=31337,
            dev=False,
            policyHash=h32("policy"),
            startTime=1_760_000_000,
            allocations=[dict(recipient=BOB.address, amount=5_000_000)],
        ),
        "Assignment": dict(jobId="shakespeare-1", rank=1, provider=BOB.address, nodeId="ab" * 28, fromStep=0, nonce=13),
        "Rewind": dict(coordinator=signer, jobId="shakespeare-1", toStep=40, nonce=18),
        "Unbond": dict(provider=signer, amount=100_000_000, nonce=14),
        "Withdraw": dict(provider=signer, amount=100_000_000, nonce=15),
        "JobCancel": dict(consumer=signer, jobId="shakespeare-1", nonce=17),
        "EpochClose": dict(
            coordinator=signer,
            epoch=4,
            emission=5_787_037,
            minted=5_787_035,
            payments=1_000,
            policyHash=h32("policy"),
            nonce=16,
        ),
    }[primary_type]


ALL_TYPES = sorted(MESSAGE_TYPES)


def test_every_type_has_a_sample_and_a_signer_rule():
    assert set(ALL_TYPES) == {
        "JobOrder",
        "NodeRegistration",
        "WorkReceipt",
        "VerificationReport",
        "Settlement",
        "PolicyChange",
        "Faucet",
        "Genesis",
        "Assignment",
        "Rewind",
        "Unbond",
        "Withdraw",
        "EpochClose",
        "JobCancel",
    }
    assert set(SIGNER_FIELD) == set(ALL_TYPES)
    for t in ALL_TYPES:
        assert [f["name"] for f in MESSAGE_TYPES[t]] == list(sample(t))


@pytest.mark.parametrize("primary_type", ALL_TYPES)
def test_sign_verify_recover_round_trip(primary_type):
    signed = sign(ALICE, primary_type, DOMAIN, sample(primary_type))
    assert signed.signer == ALICE.address
    assert verify(signed, expected_signer=ALICE.address, domain=DOMAIN) == ALICE.address
    assert recover_signer(signed.typed_data(), signed.signature) == ALICE.address
    assert signed.digest == digest_of(primary_type, DOMAIN, sample(primary_type))
    # Same bytes as eth-account's own EIP-712 signer (RFC 6979 is deterministic) ...
    ref = Account.sign_typed_data(ALICE.key, full_message=signed.typed_data())
    assert signed.signature == "0x" + ref.signature.hex()
    # ... and eth-account's recovery agrees, so any EIP-712 tool can check our messages.
    assert (
        Account.recover_message(encode_typed_data(full_message=signed.typed_data()), signature=signed.signature)
        == ALICE.address
    )


@pytest.mark.parametrize("primary_type", ALL_TYPES)
def test_signer_recovered_from_typed_data_after_json_round_trip(primary_type):
    signed = sign(BOB, primary_type, DOMAIN, sample(primary_type, BOB.address))
    typed = json.loads(json.dumps(signed.typed_data()))
    assert typed["types"]["EIP712Domain"][0] == {"name": "name", "type": "string"}
    assert typed["primaryType"] == primary_type
    assert digest_of_typed_data(typed) == signed.digest
    assert recover_signer(typed, signed.signature) == BOB.address
    again = SignedMessage.from_json(signed.to_json())
    assert again == signed
    assert verify(again, expected_signer=BOB.address) == BOB.address


EIP712_MAIL = {
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


def test_eip712_spec_mail_example():
    # Digest and signature published in EIP-712 (key = keccak("cow")).
    assert digest_of_typed_data(EIP712_MAIL) == "0xbe609aee343fb3c4b28e1df9e632fca64fcfaede20f02e86244efddf30957bd2"
    sig = (
        "0x4355c47d63924e8a72e509b65029052eb6c299d53a04e167c5775fd466751c9d"
        "07299936d304c153f6443dfa05f40ff007d72911b6f72307f996231605b91562"
        "1c"
    )
    assert COW.address == "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"
    assert recover_signer(EIP712_MAIL, sig) == COW.address


def high_s_twin(signature: str) -> str:
    """The other valid ECDSA signature of the same digest: (r, n - s, v flipped)."""
    raw = bytes.fromhex(signature[2:])
    r, s, v = raw[:32], int.from_bytes(raw[32:64], "big"), raw[64]
    return "0x" + (r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])).hex()


def test_high_s_twin_is_refused():
    signed = sign(ALICE, "WorkReceipt", DOMAIN, sample("WorkReceipt"))
    twin = high_s_twin(signed.signature)
    # The twin is a genuine signature by ALICE: plain ECDSA recovery accepts it ...
    raw = bytes.fromhex(twin[2:])
    sig = keys.Signature(vrs=(raw[64] - 27, int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big")))
    assert sig.recover_public_key_from_msg_hash(bytes.fromhex(signed.digest[2:])).to_checksum_address() == ALICE.address
    # ... and gpucoin refuses it.
    with pytest.raises(SignatureError, match="high s"):
        recover_signer(signed.typed_data(), twin)
    with pytest.raises(SignatureError, match="high s"):
        verify(dataclasses.replace(signed, signature=twin))


@pytest.mark.parametrize("v", [0, 1, 26, 29])
def test_bad_v_is_refused(v):
    signed = sign(ALICE, "Faucet", DOMAIN, sample("Faucet"))
    bad = signed.signature[:-2] + f"{v:02x}"
    with pytest.raises(SignatureError, match="v = "):
        recover_signer(signed.typed_data(), bad)


def test_malformed_signatures_are_refused():
    typed = sign(ALICE, "Faucet", DOMAIN, sample("Faucet")).typed_data()
    for bad in ["0x", "0x" + "00" * 64, "0x" + "00" * 64 + "1b", "0x" + "ff" * 64 + "1b", "zz"]:
        with pytest.raises(SignatureError):
            recover_signer(typed, bad)


def test_signature_by_another_key_is_refused():
    signed = sign(ALICE, "JobOrder", DOMAIN, sample("JobOrder"))
    by_bob = sign(BOB, "JobOrder", DOMAIN, sample("JobOrder"))  # BOB signs an order naming ALICE as consumer
    assert by_bob.digest == signed.digest
    with pytest.raises(SignatureError, match="signer mismatch"):
        verify(dataclasses.replace(signed, signature=by_bob.signature))
    with pytest.raises(SignatureError, match="JobOrder.consumer"):
        verify(by_bob)
    with pytest.raises(SignatureError, match="expected"):
        verify(signed, expected_signer=BOB.address)


def test_faucet_has_no_signer_field_and_is_signed_by_the_faucet_key():
    signed = sign(ALICE, "Faucet", DOMAIN, sample("Faucet"))
    assert signed.message["recipient"] == BOB.address
    assert verify(signed, expected_signer=ALICE.address) == ALICE.address


@pytest.mark.parametrize("primary_type", ALL_TYPES)
def test_one_flipped_field_is_refused(primary_type):
    signed = sign(ALICE, primary_type, DOMAIN, sample(primary_type))
    field = "nonce" if "nonce" in signed.message else "startTime"  # a Genesis has no nonce (one per ledger)
    flipped = dict(signed.message, **{field: signed.message[field] + 1})
    with pytest.raises(SignatureError, match="digest mismatch"):
        verify(dataclasses.replace(signed, message=flipped))
    # Even with the digest recomputed, the signature no longer recovers ALICE.
    forged = dataclasses.replace(signed, message=flipped, digest=digest_of(primary_type, DOMAIN, flipped))
    with pytest.raises(SignatureError, match="signer mismatch"):
        verify(forged)


def test_domain_mismatch_is_refused():
    signed = sign(ALICE, "PolicyChange", DOMAIN, sample("PolicyChange"))
    other_chain = Domain(chain_id=1, verifying_contract=DOMAIN.verifying_contract)
    with pytest.raises(SignatureError, match="domain mismatch"):
        verify(signed, domain=other_chain)
    moved = dataclasses.replace(signed, domain=other_chain.as_dict())
    with pytest.raises(SignatureError, match="digest mismatch"):
        verify(moved)


@pytest.mark.parametrize(
    "primary_type, field, value",
    [
        ("JobOrder", "workers", 2**32),
        ("WorkReceipt", "rank", -1),
        ("WorkReceipt", "nonce", 2**64),
        ("WorkReceipt", "stepEnd", 2**63),  # BIGINT bound on every uint64
        ("WorkReceipt", "samples", True),
        ("WorkReceipt", "computeTimeMs", 1.5),
        ("VerificationReport", "nonce", "7"),
    ],
)
def test_out_of_range_or_mistyped_uint_is_refused(primary_type, field, value):
    msg = dict(sample(primary_type), **{field: value})
    with pytest.raises(MessageFieldError, match=field) as info:
        sign(ALICE, primary_type, DOMAIN, msg)
    assert isinstance(info.value, ValueError) and isinstance(info.value, SignatureError)


@pytest.mark.parametrize("field, value", [("budget", 2**63), ("budget", -5), ("bidPerWorkerHour", 2**64)])
def test_amount_above_bigint_is_an_amount_error(field, value):
    with pytest.raises(MessageAmountError, match=field) as info:
        sign(ALICE, "JobOrder", DOMAIN, dict(sample("JobOrder"), **{field: value}))
    assert isinstance(info.value, AmountError) and isinstance(info.value, ValueError)
    assert sign(ALICE, "JobOrder", DOMAIN, dict(sample("JobOrder"), budget=2**63 - 1)).message["budget"] == 2**63 - 1


def bad_checksum(address: str) -> str:
    """``address`` with the case of its first hex letter flipped: still mixed case, checksum broken."""
    i = next(i for i, c in enumerate(address) if i >= 2 and c.isalpha())
    return address[:i] + address[i].swapcase() + address[i + 1 :]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda m: m.pop("nonce"), "missing"),
        (lambda m: m.update(extra=1), "no field"),
        (lambda m: m.update(consumer="0x1234"), "address"),
        (lambda m: m.update(consumer=bad_checksum(ALICE.address)), "checksum"),
        (lambda m: m.update(specHash="0x" + "11" * 31), "32 bytes"),
        (lambda m: m.update(specHash=b"\x11" * 31), "32 bytes"),
        (lambda m: m.update(specHash="not hex at all, but 32 chars!!!!"), "32 bytes"),
        (lambda m: m.update(jobId=""), "empty"),
        (lambda m: m.update(jobId=7), "string"),
    ],
)
def test_malformed_fields_are_refused(mutate, match):
    msg = sample("JobOrder")
    mutate(msg)
    with pytest.raises(MessageFieldError, match=match):
        sign(ALICE, "JobOrder", DOMAIN, msg)


def test_verdict_and_type_checks():
    with pytest.raises(MessageFieldError, match="verdict"):
        validate_message("VerificationReport", dict(sample("VerificationReport"), verdict="maybe"))
    with pytest.raises(MessageFieldError, match="unknown message type"):
        validate_message("Transfer", {})


def test_canonical_form_and_equal_digest_for_equivalent_spellings():
    msg = dict(sample("JobOrder"), consumer=ALICE.address.lower(), specHash=h32("spec").upper().replace("0X", "0x"))
    canonical = validate_message("JobOrder", msg)
    assert canonical["consumer"] == ALICE.address
    assert canonical["specHash"] == h32("spec")
    assert digest_of("JobOrder", DOMAIN, msg) == digest_of("JobOrder", DOMAIN, sample("JobOrder"))
    as_bytes = dict(sample("JobOrder"), specHash=bytes.fromhex(h32("spec")[2:]))
    assert sign(ALICE, "JobOrder", DOMAIN, as_bytes).message["specHash"] == h32("spec")


def test_typed_data_that_eth_account_would_pad_is_refused():
    typed = sign(ALICE, "WorkReceipt", DOMAIN, sample("WorkReceipt")).typed_data()
    typed["message"]["sketchRoot"] = "0x1234"  # eth-account alone would zero-pad this to 32 bytes
    with pytest.raises(MessageFieldError, match="sketchRoot"):
        digest_of_typed_data(typed)


def test_gpucoin_type_with_other_field_list_is_refused():
    typed = sign(ALICE, "Faucet", DOMAIN, sample("Faucet")).typed_data()
    typed["types"]["Faucet"] = typed["types"]["Faucet"][:2]
    del typed["message"]["nonce"]
    with pytest.raises(MessageFieldError, match="differ"):
        digest_of_typed_data(typed)


def test_from_json_rejects_malformed_parts():
    good = json.loads(sign(ALICE, "Faucet", DOMAIN, sample("Faucet")).to_json())
    for key, value in [("signature", "0x1234"), ("digest", "0x12"), ("signer", "alice"), ("primaryType", "Mail")]:
        with pytest.raises(MessageFieldError):
            SignedMessage.from_json(json.dumps(dict(good, **{key: value})))
    with pytest.raises(MessageFieldError, match="not JSON"):
        SignedMessage.from_json("{")
    with pytest.raises(MessageFieldError, match="keys"):
        SignedMessage.from_json(json.dumps(dict(good, extra=1)))


def test_domain_validation():
    d = Domain(chain_id=5, verifying_contract=("0x" + "5e" * 20).upper().replace("0X", "0x"))
    assert d.as_dict() == {
        "name": "gpucoin",
        "version": "1",
        "chainId": 5,
        "verifyingContract": DOMAIN.verifying_contract,
    }
    assert Domain.from_dict(d.as_dict()) == d
    for bad in [dict(chain_id=-1), dict(chain_id=True), dict(verifying_contract="0x12")]:
        with pytest.raises(MessageFieldError):
            Domain(**{"chain_id": 1, "verifying_contract": DOMAIN.verifying_contract, **bad})
    with pytest.raises(MessageFieldError, match="keys"):
        Domain.from_dict(dict(d.as_dict(), salt="0x00"))


def test_distance_e9():
    assert distance_e9(0.0) == 0
    assert distance_e9(1e-7) == 100
    assert distance_e9(0.09) == 90_000_000
    assert distance_e9(1.3) == 1_300_000_000
    assert distance_e9(1e30) == 2**63 - 1
    assert distance_e9(float("inf")) == 2**63 - 1
    assert distance_e9(float("nan")) == 2**63 - 1
    with pytest.raises(MessageFieldError):
        distance_e9(-0.1)


# --- property: any in-range message of any type signs and recovers -------------------------------

_KEYS = [ALICE, BOB, COW]
_UINT = {"uint32": st.integers(0, 2**32 - 1), "uint64": st.integers(0, 2**63 - 1)}
_ADDRESS = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
_BYTES32 = st.binary(min_size=32, max_size=32).map(lambda b: "0x" + b.hex())
# NUL and lone surrogates (category Cs: JSON can carry them, UTF-8 cannot) are refused
_TEXT = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), min_size=1, max_size=40)
_ALLOCATIONS = st.lists(st.fixed_dictionaries({"recipient": _ADDRESS, "amount": st.integers(0, 2**63 - 1)}), max_size=3)


@st.composite
def _signed_inputs(draw):
    primary_type = draw(st.sampled_from(ALL_TYPES))
    account = draw(st.sampled_from(_KEYS))
    msg = {}
    for f in MESSAGE_TYPES[primary_type]:
        name, typ = f["name"], f["type"]
        if name == SIGNER_FIELD[primary_type]:
            msg[name] = account.address
        elif name == "verdict":
            msg[name] = draw(st.sampled_from(["pass", "fail"]))
        elif typ == "address":
            msg[name] = draw(_ADDRESS)
        elif typ == "bytes32":
            msg[name] = draw(_BYTES32)
        elif typ == "string":
            msg[name] = draw(_TEXT)
        elif typ == "bool":
            msg[name] = draw(st.booleans())
        elif typ == "Allocation[]":
            msg[name] = draw(_ALLOCATIONS)
        else:
            msg[name] = draw(_UINT.get(typ, st.integers(0, 2**63 - 1)))
    domain = Domain(chain_id=draw(st.integers(0, 2**63 - 1)), verifying_contract=draw(_ADDRESS))
    return primary_type, account, domain, msg


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_signed_inputs())
def test_property_sign_then_recover(inputs):
    primary_type, account, domain, msg = inputs
    signed = sign(account, primary_type, domain, msg)
    typed = json.loads(json.dumps(signed.typed_data()))
    assert recover_signer(typed, signed.signature) == account.address
    assert (
        verify(SignedMessage.from_json(signed.to_json()), expected_signer=account.address, domain=domain)
        == account.address
    )
    assert int(signed.signature[66:130], 16) <= SECP256K1_N // 2


def test_a_string_field_with_a_lone_surrogate_is_a_field_error() -> None:
    from gpucoin.wallet.messages import MessageFieldError, validate_message

    registration = {
        "provider": "0x" + "11" * 20,
        "nodeId": "\ud800",
        "resources": "cpu=1",
        "askPerWorkerHour": 1,
        "stake": 1,
        "nonce": 1,
        "deadline": 1,
    }
    with pytest.raises(MessageFieldError, match="nodeId is not valid Unicode text"):
        validate_message("NodeRegistration", registration)


def test_untrusted_json_is_bounded_before_it_is_parsed() -> None:
    from gpucoin.wallet.messages import MAX_JSON_DEPTH, MessageFieldError, SignedMessage, loads_json

    assert loads_json('{"a": ["[[[", {"b": "\\\\\\"{{"}]}') == {"a": ["[[[", {"b": '\\"{{'}]}  # brackets in strings
    assert loads_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) == eval("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    with pytest.raises(MessageFieldError, match="nests deeper"):
        loads_json("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    with pytest.raises(MessageFieldError, match="nests deeper"):  # would crash the interpreter unchecked
        SignedMessage.from_json('{"a":' * 150_000 + "1" + "}" * 150_000)


def test_a_string_field_with_nul_is_refused() -> None:
    from gpucoin.wallet.messages import MessageFieldError, validate_message

    order = {
        "consumer": "0x" + "11" * 20,
        "jobId": "a\x00b",
        "specHash": "0x" + "22" * 32,
        "packageHash": "0x" + "33" * 32,
        "workers": 1,
        "bidPerWorkerHour": 1,
        "budget": 1,
        "nonce": 1,
        "deadline": 1,
    }
    with pytest.raises(MessageFieldError, match="jobId contains a NUL"):
        validate_message("JobOrder", order)
