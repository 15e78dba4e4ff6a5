"""The local market's ledger file across gpucoin upgrades (SQLite, no Ray): a ledger bound to a
policy of an older schema is kept aside and a new one begun; a corrupt one is never moved aside."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from gpucoin.cluster.local import participant
from gpucoin.coordinator.job import LocalOptions, open_ledger
from gpucoin.exceptions import LedgerError, StoredPolicyOutdated
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy

REPO = Path(__file__).resolve().parents[2]
POLICY = load_policy(SHIPPED_POLICIES_DIR / "local.toml")


def _rewrite_policy_body(db: Path, rewrite) -> None:
    """What an older gpucoin left (or a tamperer wrote): the stored policy's body changed in place."""
    with sqlite3.connect(db) as conn:
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger' AND tbl_name='policy'"):
            conn.execute(f'DROP TRIGGER "{name}"')
        (body,) = conn.execute("SELECT body FROM policy").fetchone()
        conn.execute("UPDATE policy SET body = ?", (rewrite(body),))


def _ledger_made(home: Path) -> Path:
    open_ledger(LocalOptions(policy=POLICY, home=home), participant("coordinator", home)).close()
    return home / "ledger.db"


def _without_metering(body: str) -> str:
    data = json.loads(body)
    del data["metering"]  # the policy schema before [metering] existed
    return json.dumps(data)


def test_a_ledger_of_an_older_policy_schema_is_kept_aside_and_a_new_one_begun(tmp_path) -> None:
    db = _ledger_made(tmp_path)
    _rewrite_policy_body(db, _without_metering)
    ledger = open_ledger(LocalOptions(policy=POLICY, home=tmp_path), participant("coordinator", tmp_path))
    try:
        assert ledger.policy == POLICY
    finally:
        ledger.close()
    (aside,) = tmp_path.glob("ledger-older-policy-schema-*.db")
    with sqlite3.connect(aside) as conn:
        (body,) = conn.execute("SELECT body FROM policy").fetchone()
    assert "metering" not in json.loads(body)


def test_a_ledger_whose_stored_policy_is_not_json_is_refused_not_moved_aside(tmp_path) -> None:
    db = _ledger_made(tmp_path)
    _rewrite_policy_body(db, lambda body: body[:-5])
    with pytest.raises(LedgerError, match="does not parse") as info:
        open_ledger(LocalOptions(policy=POLICY, home=tmp_path), participant("coordinator", tmp_path))
    assert not isinstance(info.value, StoredPolicyOutdated)
    assert db.exists() and not list(tmp_path.glob("ledger-older-policy-schema-*.db"))
