"""``gpucoin up``, ``gpucoin down``, ``gpucoin status``: run a head and ask it how the market stands."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from gpucoin.cli.common import fail, wallets_home_option
from gpucoin.cli.wallet import _password, _wallets_dir, _wallets_opt
from gpucoin.exceptions import GpucoinError
from gpucoin.head import lifecycle
from gpucoin.money import format_gpc

_home_opt = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=lifecycle.DEFAULT_HOME,
    show_default=True,
    envvar="GPUCOIN_HEAD_HOME",
    help="The head's state directory: ledger, dev wallets, Ray token, logs, head.json (env GPUCOIN_HEAD_HOME).",
)


@click.command()
@click.option("--dev", is_flag=True, help="A development network: a dev Genesis, dev coordinator key and faucet.")
@click.option(
    "--genesis",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Start a new network from this Genesis file (TOML: policy, admin, [[allocations]] address/amount in "
    "GPC), signed by --coordinator. Only for a ledger without a Genesis; given again, it must be the same.",
)
@click.option(
    "--coordinator",
    "coordinator_ref",
    default=None,
    metavar="NAME|ADDRESS",
    help="The coordinator's wallet (not with --dev): its key signs the Genesis, Assignments and Settlements "
    "and stays in the head service's process. Its password comes from $GPUCOIN_PASSWORD or a hidden prompt.",
)
@click.option(
    "--policy",
    default=None,
    metavar="NAME|FILE",
    help="The policy a new dev network's Genesis names: a shipped one by name or a TOML file "
    "(default: local; a ledger that has a Genesis keeps its own; with --genesis, the file names it).",
)
@click.option(
    "--ledger-url",
    envvar="GPUCOIN_LEDGER_URL",
    default=None,
    help="Ledger database: sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB (env GPUCOIN_LEDGER_URL; "
    "default: ledger.db under --home).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address other hosts reach this one at: Ray's node IP and the API's. Loopback admits joins "
    "from this host only.",
)
@click.option(
    "--port",
    "ray_port",
    type=click.IntRange(1, 65535),
    default=lifecycle.DEFAULT_RAY_PORT,
    show_default=True,
    help="The Ray head's GCS port (the address volunteers join).",
)
@click.option(
    "--api-port",
    type=click.IntRange(1, 65535),
    default=lifecycle.DEFAULT_API_PORT,
    show_default=True,
    help="The head's HTTP API port (status, metrics).",
)
@_home_opt
@wallets_home_option
@_wallets_opt
def up(dev, genesis, coordinator_ref, policy, ledger_url, host, ray_port, api_port, home, wallets_home, wallets_dir):
    """Start the head and return once it is ready.

    The head is a Ray head node (token authentication, no CPUs or GPUs for tasks, Ray's dashboard
    on loopback) and the gpucoin head service (ledger, coordinator key, HTTP API, Prometheus
    metrics), each in a process of its own that outlives this command. `gpucoin down` stops them.

    A network starts either as a dev network (--dev) or from a Genesis file (--genesis FILE
    --coordinator WALLET); after that, `gpucoin up --coordinator WALLET` (or `--dev`) resumes it
    from the same --home and ledger.
    """
    keystore = password = None
    try:
        if coordinator_ref is not None and not dev:
            from gpucoin.wallet.keystore import find_wallet

            info = find_wallet(_wallets_dir(wallets_home, wallets_dir), coordinator_ref)
            keystore = info.path
            password = _password(f"Password of wallet {info.name}", confirm=False)
        opts = lifecycle.UpOptions(
            home=home,
            dev=dev,
            policy=policy,
            genesis=genesis,
            # with --dev a --coordinator is refused by lifecycle.up, so it is passed on unopened
            coordinator_keystore=keystore or (Path(coordinator_ref) if coordinator_ref else None),
            coordinator_password=password,
            ledger_url=ledger_url,
            host=host,
            ray_port=ray_port,
            api_port=api_port,
        )
        with Console(stderr=True).status("starting the Ray head and the head service"):
            info = lifecycle.up(opts)
    except GpucoinError as e:
        fail(str(e))
    click.echo(f"head is up{' (dev network)' if info.dev else ''}")
    click.echo(f"  volunteers join  gpucoin join --address {info.api_url}   (Ray {info.ray_address})")
    click.echo(f"  API              {info.api_url}")
    click.echo(f"  metrics          {info.metrics_url}")
    click.echo(f"  Ray token        {info.token_path}")
    click.echo(f"  stop it with     gpucoin down --home {Path(home).expanduser()}")


@click.command()
@_home_opt
def down(home):
    """Stop the head started from --home: the service first, then the Ray head."""
    try:
        info = lifecycle.down(home)
    except GpucoinError as e:
        fail(str(e))
    click.echo(f"head stopped (was {info.api_url})")


@click.command()
@click.option("--address", default=None, metavar="HOST:PORT", help="The head's API (default: the head of --home).")
@_home_opt
def status(address, home):
    """How the market stands: the head, its policy, epoch, supply, jobs and nodes."""
    try:
        s = lifecycle.fetch_status(lifecycle.api_url_of(address, home))
    except GpucoinError as e:
        fail(str(e))
    table = Table(show_header=False, box=None)
    table.add_row("network", f"chain {s.chain_id}{' (dev)' if s.dev else ''}, gpucoin {s.gpucoin_version}")
    table.add_row("Ray", s.ray_address)
    table.add_row("coordinator", s.coordinator)
    table.add_row("policy", f"{s.policy.name} v{s.policy.version} ({s.policy.hash[:18]}…)")
    table.add_row("epoch", str(s.epoch))
    table.add_row("supply", f"{format_gpc(s.supply_ugpc)} GPC")
    table.add_row("minted / burned", f"{format_gpc(s.minted_ugpc)} / {format_gpc(s.burned_ugpc)} GPC")
    table.add_row("slashed", f"{format_gpc(s.slashed_ugpc)} GPC")
    table.add_row("jobs / nodes", f"{s.jobs} / {s.nodes}")
    Console().print(table)
