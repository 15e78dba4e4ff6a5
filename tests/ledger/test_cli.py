"""``gpucoin ledger show / export / audit`` on both backends, including audits of tampered rows.

The commands run through click's test runner in this process, against a real ledger database.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from typing import Any

import pytest
from click.testing import CliRunner
from eth_account import Account
from eth_account.messages import encode_typed_data

from gpucoin.cli.main import cli
from gpucoin.ledger import Ledger
from tests.conftest import exact_double
from tests.ledger.helpers import (
    CONSUMER,
    ESCROW,
    GPC,
    WORKER,
    Market,
    Signer,
    avail,
    normal_history,
    raw_sql,
    tamper,
    unbonding,
)


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def history(ledger: Ledger) -> Ledger:
    s = Signer(start=2**60)  # nonces as wallets draw them: most above 2**53 - 1
    normal_history(ledger, s)
    Market(ledger, s).unbond(WORKER, 100 * GPC)  # the worker still has 250 GPC bonded after its slash
    return ledger


def test_show_lists_balances_and_transfers(history: Ledger, ledger_url: str) -> None:
    r = run("ledger", "show", "--ledger-url", ledger_url)
    assert r.exit_code == 0, r.output
    assert avail(CONSUMER) in r.output and "990" in r.output and "refund-1" in r.output
    r = run("ledger", "show", WORKER.address, "--ledger-url", ledger_url, "--limit", "3")
    assert r.exit_code == 0, r.output
    assert unbonding(WORKER) in r.output and "last 3 transfers" in r.output and CONSUMER.address not in r.output
    r = run("ledger", "show", "wallet:nobody", "--ledger-url", ledger_url)
    assert r.exit_code == 1 and r.output.startswith("error: ") and "Traceback" not in r.output


def test_export_lets_anyone_reverify_messages_and_the_chain_without_gpucoin(
    history: Ledger, ledger_url: str, tmp_path
) -> None:
    out = tmp_path / "ledger.jsonl"
    r = run("ledger", "export", "--format", "jsonl", "--ledger-url", ledger_url, "-o", str(out))
    assert r.exit_code == 0, r.output
    # read as JavaScript's plain JSON.parse would: every number a double, none of them rounded
    records = [json.loads(line, parse_int=exact_double) for line in out.read_text().splitlines()]
    assert records[0]["kind"] == "header" and records[0]["format"] == "gpucoin-ledger-export-v3"
    messages = [x for x in records if x["kind"] == "message"]
    transfers = [x for x in records if x["kind"] == "transfer"]
    assert len(messages) == len(history.messages()) and len(transfers) == len(history.transfers()) == 12
    big = [m for m in messages if isinstance(m["typed_data"]["message"].get("nonce"), str)]
    assert big, "no nonce above 2**53 - 1: the test shows nothing about how they are written"
    for m in messages:  # plain eth-account recovers every signer from the exported typed data, strings and all
        signable = encode_typed_data(full_message=m["typed_data"])
        assert Account.recover_message(signable, signature=m["signature"]) == m["signer"]
    prev = "00" * 32
    for t in transfers:  # the documented chain rule, with hashlib and json only
        fields = [
            "gpucoin-transfer-v1",
            t["id"],
            t["op_id"],
            t["seq"],
            t["debit"],
            t["credit"],
            t["amount"],
            t["code"],
            t["digest"],
            t["created_at"],
        ]
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert t["prev_hash"] == prev
        prev = hashlib.sha256(bytes.fromhex(prev) + text.encode()).hexdigest()
        assert t["row_hash"] == prev
    balances: dict[str, int] = {}
    for t in transfers:
        balances[t["debit"]] = balances.get(t["debit"], 0) - t["amount"]
        balances[t["credit"]] = balances.get(t["credit"], 0) + t["amount"]
    assert {k: v for k, v in balances.items()} == history.balances()


def test_export_cut_short_by_a_pipe_ends_quietly(history: Ledger, ledger_url: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpucoin", "ledger", "export", "--ledger-url", ledger_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the first line, as after `| head -0`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert err == ""


def test_audit_passes_on_an_honest_ledger(history: Ledger, ledger_url: str) -> None:
    r = run("ledger", "audit", "--ledger-url", ledger_url)
    assert r.exit_code == 0, r.output
    assert "audit ok: 12 transfers" in r.output


TAMPERS = [
    # (what, plain SQL, the start of the problem line that must name the row)
    ("transfer amount", "UPDATE transfer SET amount = amount - 1 WHERE id = 6", "transfer #6 "),
    ("transfer debit account", f"UPDATE transfer SET debit = '{avail(WORKER)}' WHERE id = 4", "transfer #4 "),
    ("transfer credit account", f"UPDATE transfer SET credit = '{avail(WORKER)}' WHERE id = 11", "transfer #11 "),
    ("transfer code", "UPDATE transfer SET code = 'pay' WHERE id = 5", "transfer #5 "),
    ("message signature", "UPDATE message SET signature = :sig WHERE id = 3", "message #3 "),
    ("message signer", f"UPDATE message SET signer = '{CONSUMER.address}' WHERE id = 2", "message #2 "),
    (
        "message typed data",
        "UPDATE message SET typed_data = replace(typed_data, :old, :new) WHERE id = 3",
        "message #3 ",
    ),
    (
        "account balance",
        f"UPDATE account SET balance = balance + 5 WHERE name = '{avail(CONSUMER)}'",
        f"account {avail(CONSUMER)}",
    ),
    ("escrow amount", f"UPDATE escrow SET amount = amount + 1 WHERE account = '{ESCROW}'", f"escrow {ESCROW}"),
    (
        "unbonding amount",
        f"UPDATE unbonding SET amount = amount + 1 WHERE account = '{unbonding(WORKER)}'",
        f"unbonding {unbonding(WORKER)}",
    ),
    ("operation memo", "UPDATE operation SET memo = 'x' WHERE op_id = 'settle-1'", "operation 'settle-1'"),
    (
        "receipt range",
        "UPDATE work_receipt SET step_end = 12 WHERE step_start = 0",
        "work_receipt (job 'job-1', rank 0, step 0, attempt 0)",
    ),
    ("job order row", "DELETE FROM job_order", "job_order 'job-1'"),
    ("message order", "UPDATE message SET id = 1000 WHERE primary_type = 'JobOrder'", "message #"),
]


@pytest.mark.parametrize("what,sql,named", TAMPERS, ids=[t[0] for t in TAMPERS])
def test_audit_fails_and_names_a_row_changed_with_plain_sql(
    history: Ledger, ledger_url: str, what: str, sql: str, named: str
) -> None:
    params: dict[str, Any] = {}
    if ":old" in sql:
        params = {"old": '"amount":600000000', "new": '"amount":700000000'}
    if ":sig" in sql:
        sig = raw_sql(history, "SELECT signature FROM message WHERE id = 3")[0][0]
        params["sig"] = sig[:20] + ("1" if sig[20] != "1" else "2") + sig[21:]
    tamper(history, sql, params)
    r = run("ledger", "audit", "--ledger-url", ledger_url)
    assert r.exit_code == 1, r.output
    problems = [line[len("problem: ") :] for line in r.output.splitlines() if line.startswith("problem: ")]
    assert any(p.startswith(named) for p in problems), (what, problems)
    assert "audit failed" in r.output
