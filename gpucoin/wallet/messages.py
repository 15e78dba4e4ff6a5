"""EIP-712 typed messages that authorize every economic action in gpucoin (SPEC.md, Signed messages).

Each message is a struct of one primary type in ``MESSAGE_TYPES``, signed under the domain
``{name: "gpucoin", version: "1", chainId, verifyingContract}``; chainId comes from the policy and
verifyingContract is the coordinator's settlement address. Any EIP-712 tool (eth-account, web3.py,
ethers.js, a hardware wallet) computes the same digest and recovers the same signer.

Units in messages: amounts are int µGPC (``gpucoin.money``), times are unix seconds, durations
``computeTimeMs`` milliseconds, ``samples`` a count of training samples, steps are optimizer steps
with ``stepEnd`` exclusive. ``bytes32`` fields are held as lowercase 0x-hex strings (66 chars) so a
message is plain JSON; addresses are held checksummed.

Messages are canonical: ``validate_message`` accepts each field in one form only (ints as ``int``,
bytes32 as 32 bytes or 0x + 64 hex, addresses as 0x + 40 hex with a valid checksum when mixed-case)
and returns the normal form, so one digest never stands for two different stored messages. Every
uint64 field is also bounded by 2**63 - 1 because the ledger stores them as SQL BIGINT.

Signatures are 65 bytes ``r || s || v`` with ``v`` in {27, 28}. A signature with ``s`` above
secp256k1n/2 is refused (its low-s twin is the only accepted form, as Ethereum's EIP-2 rule), so a
third party cannot mint a second valid signature for the same message.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from Crypto.Hash import keccak as _pycryptodome_keccak
from eth_account.messages import encode_typed_data
from eth_utils import to_checksum_address

from gpucoin.exceptions import AmountError, SignatureError
from gpucoin.jsonsafe import MAX_SAFE_INTEGER, parse_uint_text
from gpucoin.jsonsafe import dumps as js_safe_dumps
from gpucoin.money import MAX_AMOUNT_UGPC

try:  # coincurve is libsecp256k1: much faster recovery than eth_keys' pure-Python backend
    import coincurve as _coincurve
except ImportError:  # pragma: no cover - exercised only where coincurve is absent
    _coincurve = None

__all__ = [
    "Domain",
    "MESSAGE_TYPES",
    "STRUCT_TYPES",
    "MAX_ARRAY_ITEMS",
    "EIP712_DOMAIN_TYPE",
    "SIGNER_FIELD",
    "AMOUNT_FIELDS",
    "VERDICTS",
    "ZERO_BYTES32",
    "MAX_FIELD_INT",
    "SECP256K1_N",
    "MessageFieldError",
    "MessageAmountError",
    "SignedMessage",
    "validate_message",
    "type_string",
    "build_typed_data",
    "digest_of",
    "digest_of_typed_data",
    "sign",
    "recover_signer",
    "recover_typed",
    "verify",
    "distance_e9",
    "checksum_address",
    "parse_address",
]


def keccak(data: bytes) -> bytes:
    """keccak256 of ``data`` (32 bytes): pycryptodome's, which eth-hash wraps, called directly."""
    return _pycryptodome_keccak.new(digest_bits=256, data=data).digest()


checksum_address = lru_cache(maxsize=4096)(to_checksum_address)
"""EIP-55 checksum address (str) of an address text, cached (``eth_utils.to_checksum_address``; its
pure-Python keccak dominated verification). Raises ValueError for text that is not an address."""

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
"""Order of the secp256k1 group; a signature's ``s`` must be in [1, SECP256K1_N // 2]."""

MAX_FIELD_INT = 2**63 - 1
"""Largest value of any uint64 message field: the ledger stores them as SQL BIGINT."""

MAX_STRING_BYTES = 4096
"""Longest string field, in UTF-8 bytes (ids, resource descriptions, verdicts)."""

ZERO_BYTES32 = "0x" + "00" * 32
"""The ``previousReceipt`` of a rank's first receipt."""

VERDICTS = ("pass", "fail", "void")
"""The values of ``VerificationReport.verdict``: ``pass``, ``fail`` (this rank's own commitment
disagrees with the replay where a co-worker's agrees: evidence against it), ``void`` (the ranks
diverged together, so the evidence names nobody: docs/verification.md, Blame)."""


def _fields(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"name": n, "type": t} for t, n in pairs]


EIP712_DOMAIN_TYPE: list[dict[str, str]] = _fields(
    ("string", "name"), ("string", "version"), ("uint256", "chainId"), ("address", "verifyingContract")
)
"""The ``EIP712Domain`` type of every gpucoin message, in EIP-712's canonical field order."""

MESSAGE_TYPES: dict[str, list[dict[str, str]]] = {
    "JobOrder": _fields(
        ("address", "consumer"),
        ("string", "jobId"),
        ("bytes32", "specHash"),
        ("bytes32", "packageHash"),
        ("uint32", "workers"),
        ("uint64", "bidPerWorkerHour"),
        ("uint64", "budget"),
        ("uint64", "nonce"),
        ("uint64", "deadline"),
    ),
    "NodeRegistration": _fields(
        ("address", "provider"),
        ("string", "nodeId"),
        ("string", "resources"),
        ("uint64", "askPerWorkerHour"),
        ("uint64", "stake"),
        ("uint64", "nonce"),
        ("uint64", "deadline"),
    ),
    "WorkReceipt": _fields(
        ("string", "jobId"),
        ("address", "worker"),
        ("uint32", "rank"),
        ("uint64", "stepStart"),
        ("uint64", "stepEnd"),
        ("uint64", "samples"),
        ("uint64", "computeTimeMs"),
        ("bytes32", "sketchRoot"),
        ("bytes32", "checkpointHash"),
        ("bytes32", "previousReceipt"),
        ("uint64", "nonce"),
    ),
    "VerificationReport": _fields(
        ("address", "verifier"),
        ("bytes32", "receiptDigest"),
        ("string", "verdict"),
        ("uint64", "distanceE9"),
        ("uint64", "nonce"),
    ),
    "Settlement": _fields(
        ("address", "coordinator"),
        ("string", "jobId"),
        ("bytes32", "subject"),
        ("uint64", "epoch"),
        ("uint64", "paid"),
        ("uint64", "burned"),
        ("uint64", "treasury"),
        ("uint64", "minted"),
        ("uint64", "slashed"),
        ("uint64", "refunded"),
        ("bytes32", "policyHash"),
        ("uint64", "nonce"),
    ),
    "PolicyChange": _fields(
        ("address", "admin"),
        ("bytes32", "policyHash"),
        ("uint64", "effectiveEpoch"),
        ("uint64", "nonce"),
    ),
    "Faucet": _fields(("address", "recipient"), ("uint64", "amount"), ("uint64", "nonce")),
    "Genesis": _fields(
        ("address", "coordinator"),
        ("address", "admin"),
        ("uint256", "chainId"),
        ("bool", "dev"),
        ("bytes32", "policyHash"),
        ("uint64", "startTime"),
        ("Allocation[]", "allocations"),
    ),
    "Assignment": _fields(
        ("string", "jobId"),
        ("uint32", "rank"),
        ("address", "provider"),
        ("string", "nodeId"),
        ("uint64", "fromStep"),
        ("uint64", "nonce"),
    ),
    "Rewind": _fields(
        ("address", "coordinator"),
        ("string", "jobId"),
        ("uint64", "toStep"),
        ("uint64", "nonce"),
    ),
    "Unbond": _fields(("address", "provider"), ("uint64", "amount"), ("uint64", "nonce")),
    "Withdraw": _fields(("address", "provider"), ("uint64", "amount"), ("uint64", "nonce")),
    "JobCancel": _fields(("address", "consumer"), ("string", "jobId"), ("uint64", "nonce")),
    "EpochClose": _fields(
        ("address", "coordinator"),
        ("uint64", "epoch"),
        ("uint64", "emission"),
        ("uint64", "minted"),
        ("uint64", "payments"),
        ("bytes32", "policyHash"),
        ("uint64", "nonce"),
    ),
}
"""EIP-712 field lists per primary type (the ``types[primaryType]`` entry of the typed data).

Amounts are µGPC, ``deadline`` and ``startTime`` unix seconds, ``computeTimeMs`` milliseconds,
``stepEnd`` exclusive, ``toStep`` the step a job's ranks train from again after a ``Rewind``
(the receipts from there on are superseded), ``distanceE9`` the relative L2 distance x 1e9 (see ``distance_e9``).
``Faucet`` exists only in a market whose Genesis says ``dev``. docs/protocol.md says what each
type authorizes.
"""

STRUCT_TYPES: dict[str, list[dict[str, str]]] = {
    "Allocation": _fields(("address", "recipient"), ("uint64", "amount")),
}
"""Struct types that primary types reference (``Genesis.allocations`` is an ``Allocation[]``)."""

MAX_ARRAY_ITEMS = 1000
"""Most items an array field holds (``Genesis.allocations``): bounds a message's size."""

SIGNER_FIELD: dict[str, str | None] = {
    "JobOrder": "consumer",
    "NodeRegistration": "provider",
    "WorkReceipt": "worker",
    "VerificationReport": "verifier",
    "Settlement": "coordinator",
    "PolicyChange": "admin",
    "Faucet": None,  # signed by the market's coordinator, for the recipient
    "Genesis": "coordinator",
    "Assignment": None,  # signed by the market's coordinator, naming the provider
    "Rewind": "coordinator",
    "Unbond": "provider",
    "Withdraw": "provider",
    "EpochClose": "coordinator",
    "JobCancel": "consumer",
}
"""The address field that must equal the signer, per primary type (None: no such field)."""

AMOUNT_FIELDS: dict[str, frozenset[str]] = {
    "JobOrder": frozenset({"bidPerWorkerHour", "budget"}),
    "NodeRegistration": frozenset({"askPerWorkerHour", "stake"}),
    "WorkReceipt": frozenset(),
    "VerificationReport": frozenset(),
    "Settlement": frozenset({"paid", "burned", "treasury", "minted", "slashed", "refunded"}),
    "PolicyChange": frozenset(),
    "Faucet": frozenset({"amount"}),
    "Genesis": frozenset(),
    "Assignment": frozenset(),
    "Rewind": frozenset(),
    "Unbond": frozenset({"amount"}),
    "Withdraw": frozenset({"amount"}),
    "EpochClose": frozenset({"emission", "minted", "payments"}),
    "JobCancel": frozenset(),
    "Allocation": frozenset({"amount"}),
}
"""The µGPC fields per primary or struct type; out of range they raise ``MessageAmountError``."""


class MessageFieldError(SignatureError, ValueError):
    """A message, domain or signature that is malformed: unknown or missing field, wrong type,
    int out of its range, bad address or bytes32, unknown primary type."""


class MessageAmountError(AmountError, SignatureError):
    """A µGPC field of a message that is not an int in [0, 2**63 - 1] (``gpucoin.money``)."""


_HEX_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_HEX_BYTES32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
_HEX_SIGNATURE = re.compile(r"^0x[0-9a-fA-F]{130}$")
_UINT_TYPE = re.compile(r"^uint(\d+)$")


def parse_address(value: Any, what: str) -> str:
    """Checksum form of a 0x-hex address; mixed case must be a valid EIP-55 checksum.

    Raises:
        MessageFieldError: for anything else, naming ``what``.
    """
    if not isinstance(value, str) or not _HEX_ADDRESS.match(value):
        raise MessageFieldError(f"{what} must be a 0x-prefixed 20-byte hex address, got {value!r}")
    body = value[2:]
    checksummed = checksum_address(value)
    if checksummed != value and body != body.lower() and body != body.upper():
        raise MessageFieldError(f"{what} {value} has a wrong EIP-55 checksum (mixed case)")
    return checksummed


def _bytes32(value: Any, what: str) -> str:
    """Lowercase 0x-hex form of 32 bytes given as ``bytes`` or 0x + 64 hex digits."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 32:
            raise MessageFieldError(f"{what} must be 32 bytes, got {len(value)} bytes")
        return "0x" + bytes(value).hex()
    if not isinstance(value, str) or not _HEX_BYTES32.match(value):
        raise MessageFieldError(f"{what} must be 32 bytes as 0x + 64 hex digits, got {value!r}")
    return value.lower()


def _from_text(value: Any, what: str) -> Any:
    """The int a JavaScript-safe decimal string stands for (``gpucoin.jsonsafe``); anything else unchanged.

    Raises:
        MessageFieldError: for a string that is not the canonical decimal of an integer above 2**53 - 1.
    """
    if not isinstance(value, str):
        return value
    n = parse_uint_text(value)
    if n is None:
        raise MessageFieldError(
            f"{what} = {value!r}: a uint is a JSON integer, or the decimal string (digits only, no leading"
            f" zero) of one above {MAX_SAFE_INTEGER}"
        )
    return n


def _uint(value: Any, bits: int, what: str, *, amount: bool) -> int:
    """``value`` if it is an int within uintN (and within BIGINT for N = 64), or the decimal string
    of one above 2**53 - 1 (the form JSON gpucoin writes gives it, ``gpucoin.jsonsafe``)."""
    value = _from_text(value, what)
    if amount:
        try:
            return _check_amount_field(value, what)
        except AmountError as e:
            raise MessageAmountError(str(e)) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageFieldError(f"{what} must be an int, got {value!r}")
    hi = min(2**bits - 1, MAX_FIELD_INT)
    if not 0 <= value <= hi:
        raise MessageFieldError(f"{what} = {value} is outside uint{bits} range [0, {hi}]")
    return value


def _check_amount_field(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AmountError(f"{what} must be an int of µGPC, got {value!r}")
    if not 0 <= value <= MAX_AMOUNT_UGPC:
        raise AmountError(f"{what} = {value} µGPC is outside [0, {MAX_AMOUNT_UGPC}] (the ledger's BIGINT)")
    return value


MAX_JSON_DEPTH = 8
"""Deepest nesting of arrays and objects ``loads_json`` accepts (a signed message nests 3 deep)."""

MAX_JSON_CHARS = 1 << 20
"""Longest JSON text ``loads_json`` accepts, in characters (a signed message is a few kB)."""


def loads_json(text: str | bytes) -> Any:
    """``json.loads`` of untrusted text, refusing it first if it nests deeper than ``MAX_JSON_DEPTH``.

    Needed because eth-account's import of py_ecc raises Python's recursion limit to 100000: a
    few hundred kB of ``[[[...`` would then crash the process in C instead of raising.

    Raises:
        MessageFieldError: for text that is too long, too deep, or not JSON.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise MessageFieldError("JSON text is not UTF-8") from None
    if not isinstance(text, str):
        raise MessageFieldError(f"expected JSON text, got {type(text).__name__}")
    if len(text) > MAX_JSON_CHARS:
        raise MessageFieldError(f"JSON text of {len(text)} characters; at most {MAX_JSON_CHARS}")
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise MessageFieldError(f"JSON nests deeper than {MAX_JSON_DEPTH} levels")
        elif ch in "]}":
            depth -= 1
    try:
        return json.loads(text)
    except ValueError as e:
        raise MessageFieldError(f"not JSON: {e}") from None


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise MessageFieldError(f"{what} must be a string, got {value!r}")
    if not value:
        raise MessageFieldError(f"{what} must not be empty")
    if "\x00" in value:  # PostgreSQL text cannot hold NUL; refused on every backend alike
        raise MessageFieldError(f"{what} contains a NUL character")
    try:
        n = len(value.encode("utf-8", errors="strict"))
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"): JSON can carry it, UTF-8 cannot
        raise MessageFieldError(f"{what} is not valid Unicode text (it holds a lone surrogate)") from None
    if n > MAX_STRING_BYTES:
        raise MessageFieldError(f"{what} is {n} bytes of UTF-8; at most {MAX_STRING_BYTES}")
    return value


def _known_type(primary_type: Any) -> list[dict[str, str]]:
    if not isinstance(primary_type, str) or primary_type not in MESSAGE_TYPES:
        raise MessageFieldError(f"unknown message type {primary_type!r}; expected one of {sorted(MESSAGE_TYPES)}")
    return MESSAGE_TYPES[primary_type]


def validate_message(primary_type: str, message: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``message`` against ``MESSAGE_TYPES[primary_type]`` and return its canonical form.

    The result has exactly the type's fields in the type's order: ints, checksum addresses,
    lowercase 0x-hex bytes32, non-empty strings of at most 4096 UTF-8 bytes, booleans, and
    lists of at most ``MAX_ARRAY_ITEMS`` structs (``STRUCT_TYPES``) in the same canonical form.
    ``VerificationReport.verdict`` must be one of ``VERDICTS``.

    Raises:
        MessageFieldError: unknown primary type, unknown or missing field, wrong value type,
            uintN out of range (any uint64 above 2**63 - 1), bad address or bytes32.
        MessageAmountError: a µGPC field that is not an int in [0, 2**63 - 1].
    """
    out = _validate_struct(primary_type, _known_type(primary_type), message, primary_type)
    if primary_type == "VerificationReport" and out["verdict"] not in VERDICTS:
        raise MessageFieldError(f"VerificationReport.verdict must be one of {VERDICTS}, got {out['verdict']!r}")
    return out


def _validate_struct(type_name: str, fields: list[dict[str, str]], message: Any, where: str) -> dict[str, Any]:
    """The canonical form of one struct value of type ``type_name``, named ``where`` in errors."""
    if not isinstance(message, Mapping):
        raise MessageFieldError(f"{where} message must be a mapping, got {type(message).__name__}")
    names = [f["name"] for f in fields]
    unknown = sorted(set(message) - set(names), key=str)
    if unknown:
        raise MessageFieldError(f"{where} has no field(s) {unknown}; its fields are {names}")
    missing = [n for n in names if n not in message]
    if missing:
        raise MessageFieldError(f"{where} is missing field(s) {missing}")
    amounts = AMOUNT_FIELDS[type_name]
    out: dict[str, Any] = {}
    for f in fields:
        name, typ, value = f["name"], f["type"], message[f["name"]]
        what = f"{where}.{name}"
        if typ == "address":
            out[name] = parse_address(value, what)
        elif typ == "bytes32":
            out[name] = _bytes32(value, what)
        elif typ == "string":
            out[name] = _string(value, what)
        elif typ == "bool":
            if not isinstance(value, bool):
                raise MessageFieldError(f"{what} must be true or false, got {value!r}")
            out[name] = value
        elif typ.endswith("[]"):
            out[name] = _array(typ[:-2], value, what)
        else:
            m = _UINT_TYPE.match(typ)
            assert m is not None, typ  # MESSAGE_TYPES holds only these kinds
            out[name] = _uint(value, int(m.group(1)), what, amount=name in amounts)
    return out


def _array(item_type: str, value: Any, what: str) -> list[dict[str, Any]]:
    """The canonical form of an array of ``STRUCT_TYPES[item_type]`` values (at most ``MAX_ARRAY_ITEMS``)."""
    if not isinstance(value, (list, tuple)):
        raise MessageFieldError(f"{what} must be a list, got {type(value).__name__}")
    if len(value) > MAX_ARRAY_ITEMS:
        raise MessageFieldError(f"{what} has {len(value)} items; at most {MAX_ARRAY_ITEMS}")
    fields = STRUCT_TYPES[item_type]
    return [_validate_struct(item_type, fields, item, f"{what}[{i}]") for i, item in enumerate(value)]


@dataclass(frozen=True)
class Domain:
    """The EIP-712 domain separator's fields for gpucoin messages.

    Attributes:
        chain_id: the chain id the policy names (uint256; bounded here by 2**63 - 1).
        verifying_contract: the coordinator's settlement address (stored checksummed).
        name: "gpucoin". version: "1".

    Raises:
        MessageFieldError: on construction, for a bad chain id, address, name or version.
    """

    chain_id: int
    verifying_contract: str
    name: str = "gpucoin"
    version: str = "1"

    def __post_init__(self) -> None:
        object.__setattr__(self, "chain_id", _from_text(self.chain_id, "domain chainId"))
        if isinstance(self.chain_id, bool) or not isinstance(self.chain_id, int):
            raise MessageFieldError(f"domain chainId must be an int, got {self.chain_id!r}")
        if not 0 <= self.chain_id <= MAX_FIELD_INT:
            raise MessageFieldError(f"domain chainId = {self.chain_id} is outside [0, {MAX_FIELD_INT}]")
        object.__setattr__(
            self, "verifying_contract", parse_address(self.verifying_contract, "domain verifyingContract")
        )
        _string(self.name, "domain name")
        _string(self.version, "domain version")

    def as_dict(self) -> dict[str, Any]:
        """The ``domain`` object of EIP-712 typed data: name, version, chainId, verifyingContract."""
        return {
            "name": self.name,
            "version": self.version,
            "chainId": self.chain_id,
            "verifyingContract": self.verifying_contract,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Domain":
        """Inverse of ``as_dict``; exactly the four keys.

        Raises:
            MessageFieldError: for missing or extra keys or bad values.
        """
        if not isinstance(d, Mapping):
            raise MessageFieldError(f"domain must be a mapping, got {type(d).__name__}")
        keys = {"name", "version", "chainId", "verifyingContract"}
        if set(d) != keys:
            raise MessageFieldError(f"domain must have exactly the keys {sorted(keys)}, got {sorted(d, key=str)}")
        return cls(
            chain_id=d["chainId"], verifying_contract=d["verifyingContract"], name=d["name"], version=d["version"]
        )


def _domain_dict(domain: Domain | Mapping[str, Any]) -> dict[str, Any]:
    return (domain if isinstance(domain, Domain) else Domain.from_dict(domain)).as_dict()


def typed_data_types(primary_type: str) -> dict[str, list[dict[str, str]]]:
    """The ``types`` object of a gpucoin message's typed data: EIP712Domain, ``primary_type`` and the
    struct types it references (fresh copies).

    Raises:
        KeyError: for a primary type not in ``MESSAGE_TYPES``.
    """
    types = {
        "EIP712Domain": [dict(f) for f in EIP712_DOMAIN_TYPE],
        primary_type: [dict(f) for f in MESSAGE_TYPES[primary_type]],
    }
    for name in _referenced(primary_type):
        types[name] = [dict(f) for f in STRUCT_TYPES[name]]
    return types


def _referenced(primary_type: str) -> list[str]:
    """The struct types a primary type's fields reference, sorted by name (EIP-712 ``encodeType`` order)."""
    return sorted({f["type"].removesuffix("[]") for f in MESSAGE_TYPES[primary_type]} & set(STRUCT_TYPES))


def build_typed_data(
    primary_type: str, domain: Domain | Mapping[str, Any], message: Mapping[str, Any]
) -> dict[str, Any]:
    """The full EIP-712 typed data (``eth_signTypedData_v4`` JSON) of a gpucoin message.

    Returns ``{"types": {"EIP712Domain": ..., primary_type: ...}, "primaryType", "domain", "message"}``
    with the message in canonical form (``validate_message``).

    Raises:
        MessageFieldError / MessageAmountError: as ``validate_message`` and ``Domain``.
    """
    canonical = validate_message(primary_type, message)
    return {
        "types": typed_data_types(primary_type),
        "primaryType": primary_type,
        "domain": _domain_dict(domain),
        "message": canonical,
    }


def _digest_of_valid(primary_type: str, domain: Domain, message: Mapping[str, Any]) -> bytes:
    """keccak256(0x19 0x01 || domainSeparator || hashStruct(message)) of a message ``validate_message`` returned."""
    return keccak(b"\x19\x01" + _domain_separator(domain) + _hash_struct(primary_type, message))


def _digest_bytes(typed_data: Mapping[str, Any]) -> bytes:
    """keccak256(0x19 0x01 || domainSeparator || hashStruct(message)) of any EIP-712 typed data."""
    if not isinstance(typed_data, Mapping):
        raise MessageFieldError(f"typed data must be a mapping, got {type(typed_data).__name__}")
    for key in ("types", "domain", "message"):
        if key not in typed_data:
            raise MessageFieldError(f"typed data has no {key!r}")
    types = typed_data["types"]
    if not isinstance(types, Mapping):
        raise MessageFieldError("typed data 'types' must be a mapping")
    primary = typed_data.get("primaryType")
    if primary in MESSAGE_TYPES:
        # A gpucoin type must be ours exactly, with a canonical message: one digest, one stored message.
        declared = {k: v for k, v in types.items() if k != "EIP712Domain"}
        if declared != {primary: MESSAGE_TYPES[primary], **{n: STRUCT_TYPES[n] for n in _referenced(primary)}}:
            raise MessageFieldError(f"typed data declares types for {primary} that differ from gpucoin's")
        if "EIP712Domain" in types and list(types["EIP712Domain"]) != EIP712_DOMAIN_TYPE:
            raise MessageFieldError("typed data declares an EIP712Domain that differs from gpucoin's")
        # Hash the validated form: eth-account would silently pad short bytes32 or parse "0x.." as uint.
        return _digest_of_valid(
            primary, Domain.from_dict(typed_data["domain"]), validate_message(primary, typed_data["message"])
        )
    try:
        full = {k: typed_data[k] for k in ("types", "domain", "message", "primaryType") if k in typed_data}
        signable = encode_typed_data(full_message=full)
        # EIP-191 version 0x01: keccak256(0x19 || 0x01 || domainSeparator || hashStruct(message))
        return bytes(keccak(b"\x19" + signable.version + signable.header + signable.body))
    except Exception as e:  # eth-account raises ValueError, KeyError, TypeError, eth-abi errors
        raise MessageFieldError(f"malformed EIP-712 typed data: {type(e).__name__}: {e}") from None


_ALL_TYPES: dict[str, list[dict[str, str]]] = {**MESSAGE_TYPES, **STRUCT_TYPES, "EIP712Domain": EIP712_DOMAIN_TYPE}


def type_string(type_name: str) -> str:
    """EIP-712 ``encodeType`` of a gpucoin type: ``Name(type name,...)`` followed by the struct
    types it references, sorted by name (e.g. Genesis's ends with ``Allocation(...)``)."""

    def one(name: str) -> str:
        return f"{name}(" + ",".join(f"{f['type']} {f['name']}" for f in _ALL_TYPES[name]) + ")"

    refs = _referenced(type_name) if type_name in MESSAGE_TYPES else []
    return one(type_name) + "".join(one(r) for r in refs)


_TYPE_HASHES: dict[str, bytes] = {name: keccak(type_string(name).encode()) for name in _ALL_TYPES}
"""keccak256 of each gpucoin type string (EIP-712 ``typeHash``)."""


def _encode_value(kind: str, value: Any) -> bytes:
    """EIP-712 ``encodeData`` of one field of a validated message: 32 bytes.

    Strings hash to keccak256 of their UTF-8 bytes; addresses are left-padded; uintN and bool
    are big-endian; bytes32 are as-is; an array of structs is keccak256 of its items'
    ``hashStruct`` concatenated (EIP-712, Definition of encodeData).
    """
    if kind == "string":
        return keccak(value.encode("utf-8"))
    if kind == "address":
        return bytes(12) + bytes.fromhex(value[2:])
    if kind == "bytes32":
        return bytes.fromhex(value[2:])
    if kind.endswith("[]"):
        return keccak(b"".join(_hash_struct(kind[:-2], item) for item in value))
    return int(value).to_bytes(32, "big")  # bool / uint32 / uint64 / uint256, already range-checked


def _hash_struct(type_name: str, message: Mapping[str, Any]) -> bytes:
    """EIP-712 ``hashStruct`` of a validated gpucoin message or struct value."""
    parts = [_TYPE_HASHES[type_name]]
    parts.extend(_encode_value(f["type"], message[f["name"]]) for f in _ALL_TYPES[type_name])
    return keccak(b"".join(parts))


_SEPARATORS: dict[Domain, bytes] = {}
"""Domain separators already computed (a process sees one or two domains)."""


def _domain_separator(domain: Domain) -> bytes:
    """EIP-712 ``domainSeparator`` = hashStruct(EIP712Domain) of ``domain``, cached."""
    sep = _SEPARATORS.get(domain)
    if sep is None:
        sep = _hash_struct("EIP712Domain", domain.as_dict())
        if len(_SEPARATORS) < 64:
            _SEPARATORS[domain] = sep
    return sep


def digest_of_typed_data(typed_data: Mapping[str, Any]) -> str:
    """EIP-712 digest (0x + 64 hex) of full typed data, as any EIP-712 tool computes it.

    Works for any typed data (e.g. EIP-712's own ``Mail`` example). For a gpucoin primary type the
    declared types must be exactly ``MESSAGE_TYPES`` and the message must pass ``validate_message``
    (address and hex case do not change the digest).

    Raises:
        MessageFieldError / MessageAmountError: malformed typed data or an invalid gpucoin message.
    """
    return "0x" + _digest_bytes(typed_data).hex()


def digest_of(primary_type: str, domain: Domain | Mapping[str, Any], message: Mapping[str, Any]) -> str:
    """EIP-712 digest (0x + 64 hex) of a gpucoin message, after validating it.

    Raises:
        MessageFieldError / MessageAmountError: as ``validate_message`` and ``Domain``.
    """
    return digest_of_typed_data(build_typed_data(primary_type, domain, message))


@dataclass(frozen=True)
class SignedMessage:
    """A gpucoin message with its EIP-712 digest and its signer's signature.

    Attributes:
        primary_type: a key of ``MESSAGE_TYPES``.
        domain: the domain dict (``Domain.as_dict()``).
        message: canonical message fields (bytes32 as 0x-hex, addresses checksummed).
        digest: 0x + 64 hex, the EIP-712 digest that was signed.
        signature: 0x + 130 hex, ``r || s || v`` with low s and v in {27, 28}.
        signer: checksum address of the key that signed.

    ``verify`` checks that these agree; constructing one checks nothing.
    """

    primary_type: str
    domain: dict
    message: dict
    digest: str
    signature: str
    signer: str

    def typed_data(self) -> dict[str, Any]:
        """The full EIP-712 typed data (types incl. EIP712Domain, primaryType, domain, message).

        Raises:
            MessageFieldError / MessageAmountError: if the held message or domain is malformed.
        """
        return build_typed_data(self.primary_type, self.domain, self.message)

    def to_dict(self) -> dict[str, Any]:
        """The six attributes under their JSON names (what ``from_dict`` reads back)."""
        return {
            "primaryType": self.primary_type,
            "domain": self.domain,
            "message": self.message,
            "digest": self.digest,
            "signature": self.signature,
            "signer": self.signer,
        }

    def to_json(self) -> str:
        """Deterministic JSON text (sorted keys, no spaces) of ``to_dict``; an integer above
        2**53 - 1 is written as its decimal string, so JavaScript reads it exactly (``gpucoin.jsonsafe``)."""
        return js_safe_dumps(
            self.to_dict(),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, s: str | bytes) -> "SignedMessage":
        """Parse ``to_json`` output, checking the shape of every part (not the signature itself).

        Raises:
            MessageFieldError / MessageAmountError: bad JSON, unknown type, malformed domain,
                message, digest (0x + 64 hex), signature (0x + 130 hex) or signer address.
        """
        return cls.from_dict(loads_json(s))

    @classmethod
    def from_dict(cls, d: Any) -> "SignedMessage":
        """The signed message of the parsed ``to_json`` object ``d``, checked as ``from_json`` does.

        Raises:
            MessageFieldError / MessageAmountError: as ``from_json``.
        """
        keys = {"primaryType", "domain", "message", "digest", "signature", "signer"}
        if not isinstance(d, dict) or set(d) != keys:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise MessageFieldError(f"signed message JSON must have exactly the keys {sorted(keys)}, got {got}")
        primary = d["primaryType"]
        message = validate_message(primary, d["message"])
        domain = Domain.from_dict(d["domain"]).as_dict()
        digest = _bytes32(d["digest"], "digest")
        if not isinstance(d["signature"], str) or not _HEX_SIGNATURE.match(d["signature"]):
            raise MessageFieldError(f"signature must be 0x + 130 hex digits (65 bytes), got {d['signature']!r}")
        signer = parse_address(d["signer"], "signer")
        return cls(primary, domain, message, digest, d["signature"].lower(), signer)


def _normalize_low_s(v_raw: int, r: int, s: int) -> tuple[int, int, int]:
    """(v in {0, 1}, r, s) with s moved to the lower half of the group order (EIP-2)."""
    if s > SECP256K1_N // 2:
        return v_raw ^ 1, r, SECP256K1_N - s
    return v_raw, r, s


def sign(account: Any, primary_type: str, domain: Domain, message: Mapping[str, Any]) -> SignedMessage:
    """Validate ``message``, hash it under ``domain`` (EIP-712) and sign the digest with ``account``.

    ``account`` is an eth-account ``LocalAccount``; its already-derived key object signs the digest
    (deterministic RFC 6979 signature, identical to ``Account.sign_typed_data``). Any other eth-account
    ``BaseAccount`` is asked to ``unsafe_sign_hash`` the digest.

    Raises:
        MessageFieldError / MessageAmountError: as ``validate_message`` and ``Domain``.
    """
    typed = build_typed_data(primary_type, domain, message)  # validates the message and domain
    digest = _digest_of_valid(primary_type, Domain.from_dict(typed["domain"]), typed["message"])
    key_obj = getattr(account, "_key_obj", None)
    if key_obj is not None:
        v_raw, r, s = key_obj.sign_msg_hash(digest).vrs
    else:
        signed = account.unsafe_sign_hash(digest)
        v_raw, r, s = signed.v - 27 if signed.v >= 27 else signed.v, signed.r, signed.s
    v_raw, r, s = _normalize_low_s(v_raw, r, s)
    signature = "0x" + r.to_bytes(32, "big").hex() + s.to_bytes(32, "big").hex() + bytes([27 + v_raw]).hex()
    return SignedMessage(
        primary_type=primary_type,
        domain=typed["domain"],
        message=typed["message"],
        digest="0x" + digest.hex(),
        signature=signature,
        signer=to_checksum_address(account.address),
    )


def _split_signature(signature: Any) -> tuple[int, int, int]:
    """(recovery id in {0, 1}, r, s) of a 65-byte signature, refusing malleable or invalid forms."""
    if isinstance(signature, (bytes, bytearray)):
        raw = bytes(signature)
    elif isinstance(signature, str) and _HEX_SIGNATURE.match(signature):
        raw = bytes.fromhex(signature[2:])
    else:
        raise SignatureError(f"signature must be 65 bytes (0x + 130 hex digits), got {signature!r:.80}")
    if len(raw) != 65:
        raise SignatureError(f"signature must be 65 bytes, got {len(raw)}")
    r, s, v = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big"), raw[64]
    if v not in (27, 28):
        raise SignatureError(f"signature v = {v}; must be 27 or 28")
    if not 1 <= r < SECP256K1_N:
        raise SignatureError("signature r is outside [1, secp256k1n)")
    if not 1 <= s <= SECP256K1_N // 2:
        if s > SECP256K1_N // 2 and s < SECP256K1_N:
            raise SignatureError("signature has high s (s > secp256k1n/2): malleable form refused")
        raise SignatureError("signature s is outside [1, secp256k1n/2]")
    return v - 27, r, s


def _recover_from_digest(digest: bytes, recid: int, r: int, s: int) -> str:
    if _coincurve is not None:
        try:
            pub = _coincurve.PublicKey.from_signature_and_message(
                r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([recid]), digest, hasher=None
            )
        except Exception as e:  # coincurve raises ValueError/Exception when no key recovers
            raise SignatureError(f"no public key recovers from this signature: {e}") from None
        return checksum_address("0x" + keccak(pub.format(compressed=False)[1:])[-20:].hex())
    from eth_keys import keys  # pragma: no cover - fallback without coincurve
    from eth_keys.exceptions import BadSignature  # pragma: no cover

    try:  # pragma: no cover
        return keys.Signature(vrs=(recid, r, s)).recover_public_key_from_msg_hash(digest).to_checksum_address()
    except (BadSignature, ValueError) as e:  # pragma: no cover
        raise SignatureError(f"no public key recovers from this signature: {e}") from None


def recover_signer(typed_data: Mapping[str, Any], signature: str | bytes) -> str:
    """Checksum address of the key that signed ``typed_data``, from the typed data alone.

    The digest is recomputed (``digest_of_typed_data``); ``signature`` is 65 bytes ``r || s || v``.

    Raises:
        SignatureError: v not 27/28, r or s out of range, high s (malleable twin), or no key recovers.
        MessageFieldError / MessageAmountError: malformed typed data.
    """
    return recover_typed(typed_data, signature)[1]


def recover_typed(typed_data: Mapping[str, Any], signature: str | bytes) -> tuple[str, str]:
    """(digest as 0x + 64 hex, signer's checksum address) of signed typed data, hashing it once.

    Raises:
        SignatureError / MessageFieldError / MessageAmountError: as ``recover_signer``.
    """
    recid, r, s = _split_signature(signature)
    digest = _digest_bytes(typed_data)
    return "0x" + digest.hex(), _recover_from_digest(digest, recid, r, s)


def verify(signed: SignedMessage, *, expected_signer: str | None = None, domain: Domain | None = None) -> str:
    """Check a signed message end to end and return its signer's checksum address.

    Checks, in order: the message and domain are well-formed and canonical; the recomputed digest
    equals ``signed.digest``; the signature has low s and v in {27, 28}; the recovered signer equals
    ``signed.signer``, the message's own address field (``SIGNER_FIELD``) and ``expected_signer``
    if given; the domain equals ``domain`` if given.

    Raises:
        SignatureError: naming the first check that failed (``MessageFieldError`` for malformed parts).
    """
    if not isinstance(signed, SignedMessage):
        raise MessageFieldError(f"expected a SignedMessage, got {type(signed).__name__}")
    typed = signed.typed_data()
    if typed["message"] != signed.message:
        raise SignatureError(f"{signed.primary_type} message is not in canonical form")
    if typed["domain"] != signed.domain:
        raise SignatureError("domain is not in canonical form")
    # typed_data() validated the message and domain: hash them as they are, not validating twice
    recid, r, s = _split_signature(signed.signature)
    raw_digest = _digest_of_valid(signed.primary_type, Domain.from_dict(typed["domain"]), typed["message"])
    digest, recovered = "0x" + raw_digest.hex(), _recover_from_digest(raw_digest, recid, r, s)
    if not isinstance(signed.digest, str) or digest != signed.digest.lower():
        raise SignatureError(f"digest mismatch: message hashes to {digest}, signed message says {signed.digest}")
    claimed = parse_address(signed.signer, "signer")
    if recovered != claimed:
        raise SignatureError(f"signer mismatch: signature recovers {recovered}, signed message says {claimed}")
    field = SIGNER_FIELD[signed.primary_type]
    if field is not None and typed["message"][field] != recovered:
        raise SignatureError(
            f"{signed.primary_type}.{field} is {typed['message'][field]} but the message was signed by {recovered}"
        )
    if expected_signer is not None and parse_address(expected_signer, "expected signer") != recovered:
        raise SignatureError(f"signed by {recovered}, expected {to_checksum_address(expected_signer)}")
    if domain is not None and domain.as_dict() != typed["domain"]:
        raise SignatureError(f"domain mismatch: signed under {typed['domain']}, expected {domain.as_dict()}")
    return recovered


def distance_e9(relative_distance: float) -> int:
    """``VerificationReport.distanceE9`` of a relative L2 distance: round(d x 1e9), capped at 2**63 - 1.

    NaN and +inf map to the cap (a replay that diverged is as far as it gets).

    Raises:
        MessageFieldError: for a negative distance.
    """
    d = float(relative_distance)
    if math.isnan(d) or d == math.inf:
        return MAX_FIELD_INT
    if d < 0:
        raise MessageFieldError(f"a relative distance cannot be negative, got {relative_distance!r}")
    scaled = d * 1e9
    if scaled >= MAX_FIELD_INT:
        return MAX_FIELD_INT
    return min(round(scaled), MAX_FIELD_INT)
