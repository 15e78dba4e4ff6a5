"""Fixtures for the ledger suite: every test that takes ``ledger_url`` or ``ledger`` runs twice,
on a fresh SQLite file and on a fresh schema of the PostgreSQL at ``GPUCOIN_TEST_POSTGRES``
(default ``postgresql://postgres@127.0.0.1:5432/test``; CI starts that server).

A PostgreSQL test gets its own schema (``search_path`` set through the URL), dropped afterwards,
so tests never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from gpucoin.ledger import Ledger
from tests.ledger.helpers import open_market

PG_BASE = os.environ.get("GPUCOIN_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def _pg_admin() -> Any:
    try:
        engine = create_engine(PG_BASE, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # no server: fail loudly, the suite promises both backends
        pytest.fail(
            f"PostgreSQL at {PG_BASE} is not reachable ({type(exc).__name__}); start it with "
            "`scripts/ensure-postgres` or set GPUCOIN_TEST_POSTGRES"
        )
    return engine


def make_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """Yield the URL of a fresh, empty ledger database on ``backend``; drop it afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger' / 'ledger.db'}"
        return
    admin = _pg_admin()
    schema = "t_" + uuid.uuid4().hex[:16]
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def ledger_url(backend: str, tmp_path: Path) -> Iterator[str]:
    yield from make_url(backend, tmp_path)


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    """A fresh ledger with a dev market's Genesis (``helpers.open_market``), on a test clock (``ledger.clock``)."""
    led = open_market(ledger_url)
    yield led
    led.close()
