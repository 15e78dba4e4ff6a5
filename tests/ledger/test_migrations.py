"""The schema comes from Alembic migrations: they match the ORM models, upgrade an old ledger,
and downgrade cleanly. On both backends."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

from gpucoin.exceptions import NoGenesis
from gpucoin.ledger import Ledger, migrate
from gpucoin.ledger.models import LEDGER_TABLES
from tests.ledger.helpers import CONSUMER, ESCROW, Signer, normal_history, raw_sql


def test_the_head_revision_matches_the_orm_models(ledger: Ledger) -> None:
    with ledger.engine.connect() as conn:
        assert migrate.current_revision(conn) == migrate.head_revision()
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    ours = {t.name for t in LEDGER_TABLES}
    relevant = [d for d in diff if not (d[0] == "remove_table" and d[1].name not in ours)]
    assert relevant == []


def test_opening_a_ledger_again_does_not_migrate_twice(ledger: Ledger) -> None:
    normal_history(ledger, Signer())
    again = Ledger(ledger.url)
    assert again.balances() == ledger.balances() and again.audit() == []
    again.close()


def test_a_ledger_from_before_the_migrations_is_stamped_upgraded_and_its_escrows_rebuilt(ledger: Ledger) -> None:
    """Downgraded to 0001 it loses its market row (0003) and so its Genesis: upgraded again it keeps its
    money and escrows, and the audit says the one thing wrong with it."""
    normal_history(ledger, Signer())
    balances = ledger.balances()
    with ledger.engine.connect() as conn:
        with conn.begin():
            command.downgrade(migrate._config(conn), "0001")
    raw_sql(ledger, "DROP TABLE alembic_version")  # as a ledger written before Alembic was used
    assert not any(r[0] == "escrow" for r in raw_sql(ledger, _TABLES[ledger.backend]))
    upgraded = Ledger(ledger.url)
    assert upgraded.balances() == balances
    assert raw_sql(upgraded, "SELECT account, phase FROM escrow") == [(ESCROW, "voided")]
    problems = upgraded.audit()
    assert len(problems) == 1 and problems[0].startswith("market: the ledger has no Genesis"), problems
    with pytest.raises(NoGenesis):  # and it admits nothing new
        upgraded.record_message(Signer(100).faucet(CONSUMER, 1))
    upgraded.close()


_TABLES = {
    "sqlite": "SELECT name FROM sqlite_master WHERE type = 'table'",
    "postgresql": "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()",
}


def test_a_ledger_from_before_rewinds_keeps_its_rows_as_attempt_0_and_stays_append_only(ledger: Ledger) -> None:
    """Revision 0007 rebuilds work_receipt, interval_charge and void_charge on SQLite (a UNIQUE
    constraint cannot change in place there): the rows, their CHECKs and the append-only
    triggers survive, and the old rows are of attempt 0."""
    normal_history(ledger, Signer())
    before = raw_sql(ledger, "SELECT digest, job_id, rank, step_start, step_end FROM work_receipt ORDER BY digest")
    charges = raw_sql(ledger, "SELECT settlement, step_start FROM interval_charge ORDER BY settlement")
    with ledger.engine.connect() as conn:
        with conn.begin():
            command.downgrade(migrate._config(conn), "0006")
    assert "attempt" not in {c for (c,) in raw_sql(ledger, _COLUMNS[ledger.backend])}
    upgraded = Ledger(ledger.url)
    try:
        rows = raw_sql(
            upgraded, "SELECT digest, job_id, rank, step_start, step_end, attempt FROM work_receipt ORDER BY digest"
        )
        assert [tuple(r[:5]) for r in rows] == [tuple(r) for r in before] and {r[5] for r in rows} == {0}
        assert raw_sql(upgraded, "SELECT settlement, step_start FROM interval_charge ORDER BY settlement") == charges
        assert before and charges
        for sql in (
            "UPDATE work_receipt SET step_end = step_end + 1",
            "DELETE FROM interval_charge",
            "INSERT INTO work_receipt (digest, job_id, rank, step_start, step_end) VALUES ('x', 'j', 0, 5, 5)",
        ):
            with pytest.raises(Exception, match="append-only|ck_work_receipt_steps|CHECK|FOREIGN KEY|foreign key"):
                raw_sql(upgraded, sql)
        assert upgraded.audit() == []
    finally:
        upgraded.close()


_COLUMNS = {
    "sqlite": "SELECT name FROM pragma_table_info('work_receipt')",
    "postgresql": "SELECT column_name FROM information_schema.columns WHERE table_name = 'work_receipt'",
}
