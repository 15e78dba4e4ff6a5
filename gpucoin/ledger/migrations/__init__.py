"""Alembic migrations of the ledger schema; run by ``gpucoin.ledger.migrate.upgrade``."""
