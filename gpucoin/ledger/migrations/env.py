"""Alembic environment: migrations run on the connection ``gpucoin.ledger.migrate`` hands in.

That connection is already inside the caller's write transaction (BEGIN IMMEDIATE on SQLite, an
advisory lock on PostgreSQL), so concurrent openers of a new ledger migrate it exactly once.
"""

from alembic import context

from gpucoin.ledger.models import SQLModel

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only the `alembic` command line gets here
    raise SystemExit("run migrations through gpucoin.ledger.migrate.upgrade (it supplies the connection)")

context.configure(connection=connection, target_metadata=SQLModel.metadata, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
