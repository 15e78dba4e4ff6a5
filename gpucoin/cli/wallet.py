"""``gpucoin wallet``: encrypted keystores in a wallets directory, and their ledger balances.

The commands parse, call ``gpucoin.wallet.keystore`` and ``gpucoin.ledger``, and render. Secrets
come only from hidden prompts or environment variables, never from arguments (those land in shell
history and in ``ps``), and no command prints a private key, a password or the text of an
exception it did not write itself.

The hidden option ``--scrypt-n`` of ``new`` and ``import`` sets a lighter scrypt work factor; it
exists for the test suite (one default-strength encryption takes about a second) and is not shown
in ``--help``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from gpucoin.cli.common import DEFAULT_HOME, url_option
from gpucoin.cli.common import fail as _fail
from gpucoin.cli.common import ledger_url as resolve_ledger_url
from gpucoin.exceptions import GpucoinError

PASSWORD_ENV = "GPUCOIN_PASSWORD"
PRIVATE_KEY_ENV = "GPUCOIN_PRIVATE_KEY"
WALLETS_DIR_ENV = "GPUCOIN_WALLETS_DIR"


@contextmanager
def _errors() -> Iterator[None]:
    """Turn gpucoin's errors into one line and a non-zero exit; never show a traceback.

    Anything unforeseen is reported by its type only: an exception's text could carry key material.
    """
    try:
        yield
    except (click.ClickException, click.Abort):
        raise
    except GpucoinError as e:
        text = str(e).strip().splitlines()
        _fail(text[0] if text else type(e).__name__)
    except Exception as e:  # noqa: BLE001
        _fail(f"internal error: {type(e).__name__} (details withheld: a wallet command never prints exception text)")


def _wallets_dir(home: Path, wallets_dir: Path | None) -> Path:
    return wallets_dir if wallets_dir is not None else home / "wallets"


_home_opt = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_HOME,
    help="State directory: wallets under <home>/wallets, the SQLite ledger at <home>/ledger.db "
    "(default: $GPUCOIN_HOME, else ~/.gpucoin/local).",
)
_wallets_opt = click.option(
    "--wallets-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar=WALLETS_DIR_ENV,
    default=None,
    help=f"Directory of keystores, one <name>.json per wallet (env {WALLETS_DIR_ENV}; default: <home>/wallets).",
)
_url_opt = url_option
_name_opt = click.option(
    "--name",
    default=None,
    help="Wallet name: letters, digits, _ . - (up to 64). Default: the first free wallet-N.",
)
_scrypt_opt = click.option(
    "--scrypt-n",
    type=click.IntRange(2),
    default=None,
    hidden=True,
    help="scrypt work factor N of the new keystore, for tests only (default: DEFAULT_SCRYPT_N).",
)


def _password(prompt: str, *, confirm: bool) -> str:
    """The password from $GPUCOIN_PASSWORD, else a hidden prompt (typed twice if ``confirm``)."""
    value = os.environ.get(PASSWORD_ENV)
    if value is not None:
        if not value:
            _fail(f"{PASSWORD_ENV} is set but empty", 2)
        return value
    return click.prompt(
        prompt, hide_input=True, confirmation_prompt="Repeat the password" if confirm else False, err=True
    )


@click.group()
def wallet() -> None:
    """Create, import and inspect wallets: encrypted keystores (JSON v3, scrypt), one file each.

    \b
    Keystores live in --wallets-dir (default <home>/wallets; the embedded mode's dev wallets
    are there too). Passwords are read from a hidden prompt, or from the environment variable
    GPUCOIN_PASSWORD if it is set. Keep the keystore file and its password: without both the
    wallet cannot be used, and neither can be recovered.
    """


@wallet.command()
@_name_opt
@_home_opt
@_wallets_opt
@_scrypt_opt
def new(name, home, wallets_dir, scrypt_n):
    """Create a wallet with a fresh random key and write its encrypted keystore.

    The password is asked twice (input hidden), or read from the environment variable
    GPUCOIN_PASSWORD. The address is printed; the key never is.
    """
    from gpucoin.wallet.keystore import DEFAULT_SCRYPT_N, check_new_wallet, create_wallet, next_wallet_name

    folder = _wallets_dir(home, wallets_dir)
    with _errors():
        name = name if name is not None else next_wallet_name(folder)
        check_new_wallet(folder, name)  # before the prompt: a taken name costs no typing
        password = _password(f"Password for the new wallet {name}", confirm=True)
        info = create_wallet(folder, name, password, scrypt_n=scrypt_n or DEFAULT_SCRYPT_N)
    click.echo(f"created wallet {info.name} {info.address}")
    click.echo(
        f"keystore {info.path} (scrypt n={info.work}); back it up and keep the password: neither can be recovered"
    )


@wallet.command("import")
@click.option(
    "--keystore",
    "keystore",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Import this JSON v3 keystore (e.g. from geth); it is re-encrypted with the same password under scrypt.",
)
@_name_opt
@_home_opt
@_wallets_opt
@_scrypt_opt
def import_(keystore, name, home, wallets_dir, scrypt_n):
    """Import a wallet from a private key or from an existing keystore file.

    Without --keystore, the private key (64 hex digits, 0x optional) is read from a hidden
    prompt or from the environment variable GPUCOIN_PRIVATE_KEY. It is never taken as an
    argument: that would leave it in your shell history and in the process list. The new
    keystore's password is asked twice, or read from GPUCOIN_PASSWORD.

    With --keystore FILE, the password is FILE's own (asked once, or GPUCOIN_PASSWORD); the new
    keystore is encrypted with it too, and FILE is left unchanged.

    An address that is already a wallet in the directory is refused.
    """
    from gpucoin.wallet.keystore import (
        DEFAULT_SCRYPT_N,
        check_new_wallet,
        import_keystore,
        import_private_key,
        keystore_address,
        next_wallet_name,
        parse_private_key,
    )

    folder = _wallets_dir(home, wallets_dir)
    scrypt_n = scrypt_n or DEFAULT_SCRYPT_N
    with _errors():
        name = name if name is not None else next_wallet_name(folder)
        check_new_wallet(folder, name)
        if keystore is not None:
            if os.environ.get(PRIVATE_KEY_ENV):
                _fail(f"both --keystore and {PRIVATE_KEY_ENV} are given; import one of them", 2)
            check_new_wallet(folder, name, keystore_address(keystore))
            password = _password(f"Password of {keystore}", confirm=False)
            info = import_keystore(folder, name, keystore, password, scrypt_n=scrypt_n)
            how = f"from {keystore}"
        else:
            key = os.environ.get(PRIVATE_KEY_ENV)
            if key is None:
                key = click.prompt("Private key (hex, input hidden)", hide_input=True, err=True)
            check_new_wallet(folder, name, parse_private_key(key).address)
            password = _password(f"Password for the new wallet {name}", confirm=True)
            info = import_private_key(folder, name, key, password, scrypt_n=scrypt_n)
            how = "from a private key"
    click.echo(f"imported wallet {info.name} {info.address} {how}")
    click.echo(f"keystore {info.path} (scrypt n={info.work})")


@wallet.command("list")
@_home_opt
@_wallets_opt
def list_(home, wallets_dir):
    """The wallets of the wallets directory: name, address, keystore file."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from gpucoin.wallet.keystore import list_wallets

    folder = _wallets_dir(home, wallets_dir)
    with _errors():
        infos = list_wallets(folder)
    if not infos:
        click.echo(f"no wallets in {folder}; create one with `gpucoin wallet new`")
        return
    t = Table(title=escape(f"wallets in {folder}"))
    t.add_column("name", no_wrap=True)
    t.add_column("address", no_wrap=True)
    t.add_column("keystore", overflow="fold")
    for i in infos:
        t.add_row(escape(i.name), i.address or "[red]unreadable[/]", escape(str(i.path)))
    console = Console()
    console.print(t)
    for i in infos:
        if i.problem:
            console.print(f"[red]unreadable[/]: {escape(i.problem)}", highlight=False)


def _one(folder: Path, name_or_address: str | None):
    """The wallet named, or the only wallet of ``folder`` when none is named."""
    from gpucoin.wallet.keystore import find_wallet, keystore_info, list_wallets

    if name_or_address is not None:
        return find_wallet(folder, name_or_address)
    infos = list_wallets(folder)
    if not infos:
        _fail(f"no wallets in {folder}; create one with `gpucoin wallet new`")
    if len(infos) > 1:
        _fail(f"{len(infos)} wallets in {folder}; name one: {', '.join(i.name for i in infos)}", 2)
    return keystore_info(infos[0].path)


@wallet.command()
@click.argument("wallet_ref", metavar="[NAME|ADDRESS]", required=False)
@_home_opt
@_wallets_opt
def show(wallet_ref, home, wallets_dir):
    """A wallet's name, address, keystore file and KDF (without decrypting it).

    Without NAME|ADDRESS, the only wallet of the directory.
    """
    from gpucoin.wallet.keystore import is_dev_keystore

    folder = _wallets_dir(home, wallets_dir)
    with _errors():
        info = _one(folder, wallet_ref)
        dev = is_dev_keystore(info.path)
    click.echo(f"name      {info.name}")
    click.echo(f"address   {info.address}")
    click.echo(f"keystore  {info.path}")
    work = f"n={info.work}" if info.kdf == "scrypt" else f"c={info.work}"
    click.echo(f"kdf       {info.kdf} ({work})")
    if dev:
        click.echo("note      a dev wallet of the embedded local mode: its password is public, it protects nothing")


@wallet.command()
@click.argument("wallet_ref", metavar="[NAME|ADDRESS]", required=False)
@_url_opt
@_home_opt
@_wallets_opt
def balance(wallet_ref, ledger_url, home, wallets_dir):
    """Available, bonded and unbonding balances in the ledger, in GPC and µGPC.

    NAME is a wallet of the directory; ADDRESS may be any address, a wallet here or not.
    Without either, every wallet of the directory.
    """
    import re

    from eth_utils import to_checksum_address
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from gpucoin.ledger import WALLET_KINDS, Ledger, wallet_account
    from gpucoin.money import format_gpc
    from gpucoin.wallet.keystore import find_wallet, list_wallets

    folder = _wallets_dir(home, wallets_dir)
    with _errors():
        if wallet_ref is None:
            infos = list_wallets(folder)
            if not infos:
                _fail(f"no wallets in {folder}; create one with `gpucoin wallet new`")
            owners = [(i.name, i.address) for i in infos if i.address is not None]
            for i in infos:
                if i.address is None:
                    click.echo(f"skipped {i.path}: {i.problem}", err=True)
        elif re.fullmatch(r"0x[0-9a-fA-F]{40}", wallet_ref):
            known = {i.address.lower(): i.name for i in list_wallets(folder) if i.address}
            owners = [(known.get(wallet_ref.lower()), wallet_ref)]
        else:
            info = find_wallet(folder, wallet_ref)
            owners = [(info.name, info.address)]
        url = resolve_ledger_url(ledger_url, home)
        rows = []
        with Ledger(url) as lg:
            for name, address in owners:
                amounts = {kind: lg.balance(wallet_account(address, kind)) for kind in WALLET_KINDS}
                rows.append((name, to_checksum_address(address), amounts))
    console = Console()
    for name, address, amounts in rows:
        console.print(
            f"[bold]{name}[/] {address}" if name else f"{address} [dim](no wallet in {escape(str(folder))})[/]",
            highlight=False,
        )
        t = Table()
        t.add_column("account")
        t.add_column("GPC", justify="right")
        t.add_column("µGPC", justify="right")
        for kind in (*WALLET_KINDS, "total"):
            micro = sum(amounts.values()) if kind == "total" else amounts[kind]
            t.add_row(kind, format_gpc(micro), str(micro), end_section=kind == WALLET_KINDS[-1])
        console.print(t)
