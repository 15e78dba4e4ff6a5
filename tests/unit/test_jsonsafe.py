"""JSON gpucoin hands out is read exactly by JavaScript's plain ``JSON.parse`` (every integer in it
fits a double exactly), and gpucoin reads it back to the same values and digests."""

import json

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from hypothesis import given, settings
from hypothesis import strategies as st

from gpucoin.jsonsafe import MAX_SAFE_INTEGER, dumps, js_safe, parse_uint_text
from gpucoin.wallet.exported import parse_signed
from gpucoin.wallet.messages import (
    Domain,
    MessageFieldError,
    SignedMessage,
    sign,
    validate_message,
)

KEY = "0x" + "11" * 32
DOMAIN = Domain(chain_id=2**60 + 7, verifying_contract="0x" + "22" * 20)


def js_parse(text: str):
    """What JavaScript's JSON.parse sees: every number a double; refuse one it would get wrong."""

    def number(s: str):
        if int(s) != int(float(s)):
            raise AssertionError(f"JSON.parse would read {s} as {int(float(s))}")
        return int(s)

    return json.loads(text, parse_int=number)


def _receipt(nonce: int, samples: int) -> dict:
    return {
        "jobId": "job-1",
        "worker": Account.from_key(KEY).address,
        "rank": 1,
        "stepStart": 0,
        "stepEnd": 10,
        "samples": samples,
        "computeTimeMs": 5,
        "sketchRoot": "0x" + "aa" * 32,
        "checkpointHash": "0x" + "bb" * 32,
        "previousReceipt": "0x" + "00" * 32,
        "nonce": nonce,
    }


ints = st.integers(min_value=-(2**64), max_value=2**64)
trees = st.recursive(
    st.none() | st.booleans() | ints | st.text(max_size=5),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4),
    max_leaves=20,
)


@given(trees)
@settings(max_examples=300, deadline=None)
def test_every_integer_written_is_one_javascript_reads_exactly(tree):
    js_parse(dumps(tree))


@given(ints)
def test_an_integer_is_a_number_up_to_2_53_and_a_string_above(n):
    out = js_safe(n)
    assert out == (n if abs(n) <= MAX_SAFE_INTEGER else str(n))


def test_bools_stay_bools():
    assert js_safe({"a": True, "b": [False]}) == {"a": True, "b": [False]}


@pytest.mark.parametrize("text", ["9007199254740992", str(2**64 - 1), str(2**256 - 1)])
def test_the_written_strings_parse_back(text):
    assert parse_uint_text(text) == int(text)


@pytest.mark.parametrize(
    "text",
    [
        "9007199254740991",
        "12",
        "0",
        "09007199254740992",
        "+9007199254740992",
        " 1e20",
        "-9007199254740993",
        "9007199254740992.0",
        "1" * 79,
    ],
)
def test_other_strings_are_not_the_form(text):
    assert parse_uint_text(text) is None


@given(nonce=st.integers(0, 2**63 - 1), samples=st.integers(0, 2**63 - 1))
@settings(max_examples=50, deadline=None)
def test_a_signed_message_round_trips_through_javascript_safe_json(nonce, samples):
    signed = sign(Account.from_key(KEY), "WorkReceipt", DOMAIN, _receipt(nonce, samples))
    text = signed.to_json()
    obj = js_parse(text)
    back = SignedMessage.from_dict(obj)
    assert back == signed
    # what a JavaScript EIP-712 verifier does: hash the typed data as parsed, strings and all
    typed = {**back.typed_data(), "message": obj["message"], "domain": obj["domain"]}
    assert Account.recover_message(encode_typed_data(full_message=typed), signature=signed.signature) == signed.signer
    assert parse_signed(text) == signed


def test_a_string_for_a_small_uint_is_refused():
    msg = _receipt(5, 3)
    msg["nonce"] = "5"
    with pytest.raises(MessageFieldError, match="JSON integer"):
        validate_message("WorkReceipt", msg)


def test_a_string_beyond_the_field_is_refused():
    msg = _receipt(5, 3)
    msg["nonce"] = str(2**63)
    with pytest.raises(MessageFieldError, match="outside"):
        validate_message("WorkReceipt", msg)


def test_an_integer_above_2_53_is_still_read():
    """The ledger stores its typed data with integers, and files written before this form exist."""
    assert validate_message("WorkReceipt", _receipt(2**60, 3))["nonce"] == 2**60
