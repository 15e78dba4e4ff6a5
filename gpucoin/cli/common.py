"""What every ``gpucoin`` command group shares: the state directory, the ledger URL, one-line errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import click

DEFAULT_HOME = Path(os.environ.get("GPUCOIN_HOME", Path.home() / ".gpucoin" / "local"))
"""The embedded mode's state directory (ledger, dev wallets, checkpoints): $GPUCOIN_HOME or ~/.gpucoin/local."""


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code`` (1: refused or failed, 2: bad usage)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def ledger_url(url: str | None, home: Path) -> str:
    """The ledger to open: ``url`` if given (a SQLite file must exist), else the one under ``home``."""
    if url:
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:" and not Path(url[len("sqlite:///") :]).exists():
            fail(f"no ledger at {url[len('sqlite:///') :]} (a SQLite ledger is created by `gpucoin train`)")
        return url
    db = home / "ledger.db"
    if not db.exists():
        fail(f"no ledger at {db}; run `gpucoin train` first or pass --ledger-url")
    return f"sqlite:///{db}"


url_option = click.option(
    "--ledger-url",
    envvar="GPUCOIN_LEDGER_URL",
    default=None,
    help="Database of the ledger: sqlite:///PATH or postgresql://USER@HOST:PORT/DB (env GPUCOIN_LEDGER_URL; "
    "default: the SQLite file under --home).",
)
"""``--ledger-url``, for every command that reads the ledger."""


wallets_home_option = click.option(
    "--wallets-home",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_HOME,
    help="Where wallets live: <wallets-home>/wallets (default: $GPUCOIN_HOME, else ~/.gpucoin/local).",
)
"""``--wallets-home``, for every command that opens a wallet by name or address."""
