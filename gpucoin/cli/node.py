"""``gpucoin join``, ``leave``, ``nodes``, ``faucet``: volunteers and the market's nodes."""

from __future__ import annotations

import secrets
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from gpucoin.cli.common import DEFAULT_HOME, fail, wallets_home_option
from gpucoin.cli.wallet import _errors, _one, _password, _wallets_dir, _wallets_opt
from gpucoin.cluster import join as joining
from gpucoin.head import lifecycle
from gpucoin.money import format_gpc, parse_gpc

_address_opt = click.option(
    "--address",
    default=None,
    metavar="HOST:PORT",
    help="The head's API, as `gpucoin up` printed it (default: the head started on this host from its default home).",
)
_wallet_opt = click.option(
    "--wallet",
    "wallet_ref",
    required=True,
    metavar="NAME|ADDRESS",
    help="The volunteer's wallet: a name or address in the wallets directory.",
)
_wallets_home_opt = wallets_home_option
_node_home_opt = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=joining.DEFAULT_HOME,
    show_default=True,
    help="State directory of the nodes this host joins: their records and logs.",
)


@click.command()
@_address_opt
@_wallet_opt
@click.option("--stake", required=True, metavar="GPC", help="Stake to bond now (GPC), slashed if the node cheats.")
@click.option("--ask", required=True, metavar="GPC", help="The node's ask: GPC per worker-hour.")
@click.option("--cpus", type=click.IntRange(1, 1024), default=1, show_default=True, help="CPUs the node offers.")
@click.option("--gpus", type=click.IntRange(0, 64), default=0, show_default=True, help="GPUs the node offers.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="This host's address as the head and other nodes reach it (Ray's node IP).",
)
@click.option("--name", default=None, help="The node's local name (default: node-<6 hex>); `leave` takes it.")
@click.option(
    "--role",
    type=click.Choice(["volunteer", "verifier"]),
    default="volunteer",
    show_default=True,
    help="volunteer: trains job ranks for pay; verifier: replays the intervals the head draws for checking. "
    "Both need --stake of at least the policy's minimum bond: a verifier's report that a second verifier's "
    "re-check shows false is slashed from it.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"The cluster's Ray token file (default: ${joining.TOKEN_FILE_ENV}, else the one `gpucoin up` wrote on "
    "this host).",
)
@_node_home_opt
@_wallets_home_opt
@_wallets_opt
def join(address, wallet_ref, stake, ask, cpus, gpus, host, name, role, token_file, home, wallets_home, wallets_dir):
    """Make this host a volunteer node of a head's cluster; return once it is admitted.

    Starts the node's signing process (the wallet's key, outside Ray) and a Ray worker node that
    joins the head's cluster with its token; signs a NodeRegistration for that Ray node and bonds
    the stake. Refuses a head whose Python, Ray, torch or DeepSpeed versions differ from this
    host's. The wallet's password comes from $GPUCOIN_PASSWORD or a hidden prompt.
    """
    with _errors():
        api_url = lifecycle.api_url_of(address, lifecycle.DEFAULT_HOME)
        info = _one(_wallets_dir(wallets_home, wallets_dir), wallet_ref)
        opts = joining.JoinOptions(
            api_url=api_url,
            keystore=info.path,
            password=_password(f"Password of wallet {info.name}", confirm=False),
            stake_ugpc=parse_gpc(stake),
            ask_ugpc_per_worker_hour=parse_gpc(ask),
            cpus=cpus,
            gpus=gpus,
            host=host,
            name=name,
            token_file=token_file,
            home=home,
            role=role,
        )
        with Console(stderr=True).status("joining") as spinner:
            rec = joining.join(opts, status=spinner.update)
    click.echo(f"joined as {rec.name}: Ray node {rec.node_id}")
    click.echo(f"  provider {rec.provider}, ask {format_gpc(opts.ask_ugpc_per_worker_hour)} GPC/worker-hour")
    click.echo(f"  stop it with gpucoin leave --name {rec.name}")


@click.command()
@click.option("--name", "names", multiple=True, help="A node to stop (repeatable).")
@click.option("--all", "everyone", is_flag=True, help="Every node joined from --home.")
@click.option("--keep-bond", is_flag=True, help="Stop the nodes but leave their stake bonded (no Unbond).")
@_node_home_opt
def leave(names, everyone, keep_bond, home):
    """Stop nodes this host joined, then start unbonding the stake each join bonded.

    Each node's Ray node and signing process stop; then a signed Unbond moves its stake from
    bonded to unbonding, still slashable until it matures (the policy's unbonding epochs), after
    which `gpucoin withdraw` makes it available. The wallet's password comes from $GPUCOIN_PASSWORD
    or a hidden prompt. If the head cannot be reached, the node is stopped all the same and
    `leave` again sends the same Unbond (it is applied once).
    """
    if everyone:
        names = [r.name for r in joining.read_records(home)]
    if not names:
        fail("name a node (--name NAME) or give --all", 2)
    with _errors():
        password = None if keep_bond else _password("Password of the nodes' wallet", confirm=False)
        for n in names:
            rec, view = joining.leave(home, n, password)
            click.echo(f"left: {rec.name} (Ray node {rec.node_id})")
            if view is not None:
                click.echo(
                    f"  unbonding {format_gpc(rec.unbond_amount_ugpc or 0)} GPC of {rec.provider}; withdrawable from "
                    f"epoch {view.next_maturity_epoch} (now {view.epoch}) with `gpucoin withdraw`"
                )


@click.command()
@_address_opt
@_wallet_opt
@click.option("--amount", default=None, metavar="GPC", help="How much (default: all that has matured).")
@_wallets_home_opt
@_wallets_opt
def withdraw(address, wallet_ref, amount, wallets_home, wallets_dir):
    """Move matured unbonding stake back to the wallet's available balance (a signed Withdraw)."""
    with _errors():
        api_url = lifecycle.api_url_of(address, lifecycle.DEFAULT_HOME)
        info = _one(_wallets_dir(wallets_home, wallets_dir), wallet_ref)
        view = joining.withdraw(
            api_url,
            info.path,
            _password(f"Password of wallet {info.name}", confirm=False),
            None if amount is None else parse_gpc(amount),
        )
    click.echo(
        f"{view.address}: available {format_gpc(view.available_ugpc)} GPC, bonded {format_gpc(view.bonded_ugpc)} GPC"
    )


@click.command()
@_address_opt
def nodes(address):
    """The market's registered nodes: role, provider, ask, bond, whether Ray sees them alive, and
    their verification record (checks passed / not passed, over every job) with the probability
    that their next interval is replayed. A node whose provider was slashed the policy's
    ban_after_frauds times shows as banned: the market never places it again."""
    from gpucoin.head.client import HeadClient

    with _errors():
        views = HeadClient(lifecycle.api_url_of(address, lifecycle.DEFAULT_HOME)).nodes()
    table = Table("node", "role", "ask GPC/worker-h", "bonded GPC", "state", "checks ok/not", "p(check)")
    table.add_column("provider", overflow="fold")
    for v in views:
        table.add_row(
            v.node_id[:12],
            v.role.value,
            format_gpc(v.ask_ugpc_per_worker_hour),
            format_gpc(v.bonded_ugpc),
            f"{v.state.value}, banned ({v.frauds} frauds)" if v.banned else v.state.value,
            f"{v.checks.passed}/{v.checks.other}",
            f"{v.checks.check_probability:.2f}",
            v.provider,
        )
    Console().print(table)
    click.echo(f"{len(views)} nodes")


@click.command()
@click.argument("recipient", metavar="ADDRESS")
@click.argument("amount", metavar="GPC")
@_address_opt
def faucet(recipient, amount, address):
    """Dev money: mint AMOUNT GPC to ADDRESS (a dev head only; any other head refuses)."""
    from gpucoin.head.client import HeadClient

    with _errors():
        result = HeadClient(lifecycle.api_url_of(address, lifecycle.DEFAULT_HOME)).faucet(
            recipient, parse_gpc(amount), secrets.token_hex(16)
        )
    click.echo(
        f"minted {format_gpc(result.amount_ugpc)} GPC to {result.recipient}; "
        f"available {format_gpc(result.available_ugpc)} GPC"
    )


def train_remote(job_spec: Path, overrides: dict, data_source, address, wallet_ref, detach: bool, home: Path) -> None:
    """``gpucoin train JOB.yaml --address HEAD --wallet W``: submit to a head, then follow (or not)."""
    from gpucoin.coordinator.job import with_data_source
    from gpucoin.head.client import HeadClient
    from gpucoin.head.submit import follow, submit
    from gpucoin.spec import load_spec
    from gpucoin.wallet.keystore import load_keystore

    with _errors():
        api_url = lifecycle.api_url_of(address, lifecycle.DEFAULT_HOME)
        loaded = load_spec(job_spec, overrides)
        if data_source is not None:  # the JobOrder signs the spec with the corpus it names
            loaded = with_data_source(loaded, data_source)
        HeadClient(api_url).status()  # a head that is not there is said before a password is asked
        info = _one(_wallets_dir(home, None), wallet_ref)
        account = load_keystore(info.path, _password(f"Password of wallet {info.name}", confirm=False))
        view = submit(api_url, loaded, account)
    if detach:
        click.echo(view.job_id)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    err.print(f"job {view.job_id} queued; escrowed {format_gpc(view.budget_ugpc)} GPC")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with _errors(), Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("queued", total=view.steps)

        def on_view(v) -> None:
            bar.update(task, completed=v.step, description=f"{v.state.value} step")

        final = follow(
            api_url,
            view.job_id,
            on_event=lambda ev: bar.console.print(ev.text, markup=False, highlight=False),
            on_view=on_view,
        )
    _print_job(final)
    if final.state.value != "succeeded":
        raise SystemExit(1)


def _print_job(v) -> None:
    click.echo(f"job {v.job_id}: {v.state.value}" + (f" ({v.reason})" if v.reason else ""))
    if v.summary is not None:
        s = v.summary
        click.echo(
            f"  settled to step {s.steps}/{v.steps}; receipts {s.receipts.signed} signed, {s.receipts.checked} checked, "
            f"{s.receipts.failed} failed; paid {format_gpc(s.paid_ugpc)} GPC, burned {format_gpc(s.burned_ugpc)} GPC, "
            f"refunded {format_gpc(s.refunded_ugpc)} GPC"
        )


@click.command()
@_address_opt
def jobs(address):
    """The head's jobs: state, progress, placement, and why a queued job waits."""
    from gpucoin.head.client import HeadClient

    with _errors():
        views = HeadClient(lifecycle.api_url_of(address, lifecycle.DEFAULT_HOME)).jobs()
    table = Table("job", "state", "step", "workers", "bid GPC/worker-h", "price", "nodes")
    table.add_column("note", overflow="fold")
    for v in views:
        table.add_row(
            v.job_id,
            v.state.value,
            f"{v.step}/{v.steps}",
            str(v.workers),
            format_gpc(v.bid_ugpc_per_worker_hour),
            "-" if v.price_ugpc_per_worker_hour is None else format_gpc(v.price_ugpc_per_worker_hour),
            ", ".join(n[:8] for n in v.node_ids) or "-",
            v.reason or "",
        )
    Console().print(table)
    click.echo(f"{len(views)} jobs")


@click.command()
@click.argument("job_id")
@_address_opt
@click.option("--follow", "-f", "keep", is_flag=True, help="Keep printing new lines until the job ends.")
def logs(job_id, address, keep):
    """What the head logged for JOB_ID: placement, receipts, draws, verdicts, settlement."""
    from gpucoin.head.client import HeadClient
    from gpucoin.head.submit import follow

    with _errors():
        api_url = lifecycle.api_url_of(address, lifecycle.DEFAULT_HOME)
        if keep:
            final = follow(api_url, job_id, on_event=lambda ev: click.echo(ev.text))
            _print_job(final)
            return
        for ev in HeadClient(api_url).job_events(job_id):
            click.echo(ev.text)


@click.command()
@click.argument("job_id")
@_address_opt
@click.option(
    "--output",
    "-o",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory to write model.safetensors and config.json into (default: ./JOB_ID).",
)
def pull(job_id, address, out_dir):
    """Fetch an ended job's final weights as safetensors, checked against the receipts its ranks signed.

    The checkpoint is the end of the last interval settled without a gap from step 0. Every file
    is checked against the hash in the manifest each rank's signed WorkReceipt names, the shards
    are consolidated into one fp32 state dict without unpickling anything but by a weights-only
    load, and no job code runs.
    """
    from gpucoin.head.pull import pull as pull_weights

    with _errors():
        got = pull_weights(lifecycle.api_url_of(address, lifecycle.DEFAULT_HOME), job_id, out_dir or Path(job_id))
    click.echo(f"{got.weights}: {got.tensors} tensors after step {got.step}")
    click.echo(f"{got.config}: the model config and the receipts and checkpoint hashes they came from")


@click.command()
@click.argument("job_id")
@_address_opt
@click.option("--wallet", "wallet_ref", required=True, metavar="NAME|ADDRESS", help="The wallet that ordered the job.")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_HOME,
    help="Where the wallet lives: <home>/wallets (default: $GPUCOIN_HOME, else ~/.gpucoin/local).",
)
def cancel(job_id, address, wallet_ref, home):
    """Cancel JOB_ID with a JobCancel signed by the wallet that ordered it.

    A queued job leaves the queue and its escrow is refunded at once; a running one stops at its
    next interval boundary, what was verified is settled, and the rest of the escrow is refunded.
    """
    from gpucoin.head.client import HeadClient
    from gpucoin.head.submit import cancel as cancel_job
    from gpucoin.wallet.keystore import load_keystore

    with _errors():
        api_url = lifecycle.api_url_of(address, lifecycle.DEFAULT_HOME)
        HeadClient(api_url).job(job_id)
        info = _one(_wallets_dir(home, None), wallet_ref)
        account = load_keystore(info.path, _password(f"Password of wallet {info.name}", confirm=False))
        view = cancel_job(api_url, job_id, account)
    click.echo(f"job {view.job_id}: {view.state.value}" + (f" ({view.reason})" if view.reason else ""))
