"""`gpucoin receipt verify FILE`: signer and verdict of one exported signed message (no Ray)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpucoin.cli.main import cli
from gpucoin.wallet.messages import SECP256K1_N, SignedMessage
from tests.ledger.helpers import COORDINATOR, WORKER, Signer, open_market


@pytest.fixture
def receipt() -> SignedMessage:
    return Signer().receipt(0)


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["receipt", "verify", *args])
    return result.exit_code, result.output


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "msg.json"
    path.write_text(text)
    return str(path)


def test_a_valid_receipt_prints_its_signer(tmp_path: Path, receipt: SignedMessage) -> None:
    code, out = run(write(tmp_path, receipt.to_json()))
    assert code == 0, out
    assert f"signer     {WORKER.address}" in out and f"verdict    valid: signed by {WORKER.address}" in out
    assert receipt.digest in out and "chainId 31337" in out
    code, out = run(
        write(tmp_path, receipt.to_json()),
        "--signer",
        WORKER.address,
        "--chain-id",
        "31337",
        "--verifying-contract",
        COORDINATOR.address,
    )
    assert code == 0, out


def test_a_record_of_ledger_export_verifies(tmp_path: Path) -> None:
    s = Signer()
    with open_market(f"sqlite:///{tmp_path / 'l.db'}") as led:
        led.record_message(s.faucet(WORKER, 5))
        record = next(r for r in led.export() if r["kind"] == "message" and r["primary_type"] == "Faucet")
    code, out = run(write(tmp_path, json.dumps(record)))
    assert code == 0 and "type       Faucet" in out and "valid" in out, out


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda d: d["message"].update(stepEnd=11), "digest mismatch"),
        (lambda d: d.update(signer=COORDINATOR.address), f"signature recovers {WORKER.address}"),
        (lambda d: d.update(signature=_high_s_twin(d["signature"])), "high s"),
        (lambda d: d["message"].update(samples=2**63), r"samples = 9223372036854775808 is outside"),
    ],
    ids=["field changed", "other signer claimed", "high-s twin", "uint64 above 2**63-1"],
)
def test_an_invalid_message_gets_its_reason_and_exit_1(tmp_path: Path, receipt: SignedMessage, change, reason) -> None:
    d = json.loads(receipt.to_json())
    change(d)
    code, out = run(write(tmp_path, json.dumps(d)))
    assert code == 1, out
    assert "verdict    INVALID" in out
    assert re.search(reason, out), out


def test_an_expected_signer_or_domain_that_differs_is_invalid(tmp_path: Path, receipt: SignedMessage) -> None:
    code, out = run(write(tmp_path, receipt.to_json()), "--signer", COORDINATOR.address)
    assert code == 1 and f"expected {COORDINATOR.address}" in out, out
    code, out = run(write(tmp_path, receipt.to_json()), "--chain-id", "1", "--verifying-contract", COORDINATOR.address)
    assert code == 1 and "domain mismatch" in out, out


def test_unreadable_input_is_a_usage_error(tmp_path: Path, receipt: SignedMessage) -> None:
    code, out = run(write(tmp_path, "{not json"))
    assert code == 2 and "not a JSON object" in out and "Traceback" not in out
    code, out = run(str(tmp_path / "missing.json"))
    assert code == 2 and "cannot read" in out
    code, out = run(write(tmp_path, receipt.to_json()), "--chain-id", "1")
    assert code == 2 and "go together" in out
    code, out = run(write(tmp_path, receipt.to_json()), "--signer", "bob")
    assert code == 2 and "not an address" in out


def _high_s_twin(signature: str) -> str:
    raw = bytes.fromhex(signature[2:])
    s = int.from_bytes(raw[32:64], "big")
    twin = raw[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - raw[64]])  # v: 27 <-> 28
    return "0x" + twin.hex()


def test_a_bad_checksum_signer_is_a_usage_error_and_a_bom_is_fine(tmp_path: Path, receipt: SignedMessage) -> None:
    wrong_case = WORKER.address[:2] + WORKER.address[2:].swapcase()
    code, out = run(write(tmp_path, receipt.to_json()), "--signer", wrong_case)
    assert code == 2 and "EIP-55" in out, out
    path = tmp_path / "bom.json"
    path.write_text("\ufeff" + receipt.to_json(), encoding="utf-8")
    code, out = run(str(path))
    assert code == 0 and "valid" in out, out


def test_deep_json_is_refused_not_a_crash(tmp_path: Path) -> None:
    code, out = run(write(tmp_path, "[" * 200_000 + "]" * 200_000))
    assert code == 2 and "nests deeper than" in out, out


def test_an_export_record_with_altered_types_is_invalid(tmp_path: Path) -> None:
    s = Signer()
    with open_market(f"sqlite:///{tmp_path / 'l.db'}") as led:
        led.record_message(s.faucet(WORKER, 5))
        record = next(r for r in led.export() if r["kind"] == "message" and r["primary_type"] == "Faucet")
    record["typed_data"]["types"]["Faucet"][1]["type"] = "uint256"  # what other tools would hash differently
    code, out = run(write(tmp_path, json.dumps(record)))
    assert code == 1 and "differ from gpucoin's" in out, out
