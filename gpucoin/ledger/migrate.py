"""Create or upgrade a ledger's schema with Alembic (migrations in ``gpucoin/ledger/migrations``).

``upgrade`` runs inside one write transaction of the caller's connection: on SQLite it began
with BEGIN IMMEDIATE, on PostgreSQL it first takes a transaction-scoped advisory lock, so many
processes opening the same new ledger at once migrate it exactly once (PostgreSQL DDL is
transactional; SQLite's is too). A ledger created before the migrations existed (tables but no
``alembic_version``) is stamped at revision 0001, the schema it has, and upgraded from there.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
"""Where the Alembic environment and revision scripts live (shipped inside the package)."""

PG_LOCK_KEY = 0x6770_7563_6F69_6E  # "gpucoin" in ASCII: an app-specific advisory lock key
"""Key of the PostgreSQL advisory lock held while migrating."""


def _config(conn: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = conn
    return cfg


def head_revision() -> str:
    """The newest revision id among the migration scripts (e.g. ``"0002"``)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None, "the migrations directory has no revision"
    return head


def current_revision(conn: Connection) -> str | None:
    """The revision the database behind ``conn`` is at, or None for no Alembic history."""
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(conn: Connection) -> None:
    """Bring the schema behind ``conn`` to the head revision; a no-op when it is already there.

    Must be called inside a transaction of ``conn`` that the caller commits.
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_LOCK_KEY})")
    current = current_revision(conn)
    if current == head_revision():
        return
    cfg = _config(conn)
    if current is None and inspect(conn).has_table("transfer"):
        command.stamp(cfg, "0001")
    command.upgrade(cfg, "head")
