"""The ``gpucoin`` command. Commands only parse, call the library and render."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click
from rich.console import Console

from gpucoin.cli import head as head_cli
from gpucoin.cli import node as node_cli
from gpucoin.cli import verify as verify_cli
from gpucoin.cli.common import DEFAULT_HOME
from gpucoin.cli.common import fail as _fail
from gpucoin.cli.common import ledger_url as _ledger_url
from gpucoin.cli.common import url_option as _url_opt
from gpucoin.cli.wallet import wallet
from gpucoin.exceptions import AmountError, GpucoinError
from gpucoin.jsonsafe import dumps as js_safe_dumps
from gpucoin.runtime.cheats import SHIPPED as SHIPPED_CHEATS


def _terminate_as_interrupt() -> None:
    """Make SIGTERM and SIGHUP stop a run the way Ctrl-C does (cluster stopped, escrow refunded)."""

    def handler(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def _internal_error(e: BaseException, home: Path) -> str:
    """Write the traceback under ``home`` and return a one-line message pointing to it."""
    import traceback

    path = home / "last-error.log"
    try:
        home.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(e)))
        where = f" (traceback in {path})"
    except OSError:
        where = ""
    text = str(e).strip().splitlines()
    return f"internal error: {type(e).__name__}: {text[-1] if text else ''}{where}"


def _cheat_setting(ref: str, rank: int, workers: int) -> str:
    """``--cheat REF --cheat-rank R`` as the volunteers' ``REF@R``, once the cheat loads here (a
    typo is said now, not by a rank mid-job)."""
    from gpucoin.runtime.cheats import load_cheat

    if rank >= workers:
        _fail(f"--cheat-rank {rank}: the job has ranks 0 to {workers - 1}", 2)
    try:
        load_cheat(ref)
    except (ValueError, ImportError, AttributeError) as e:
        _fail(f"--cheat {ref}: {e}", 2)
    return f"{ref}@{rank}"


def _gpc_option(value: str | None, flag: str) -> str | None:
    if value is None:
        return None
    from gpucoin.money import parse_gpc

    try:
        parse_gpc(value)
    except AmountError as e:
        _fail(f"{flag}: {e}", 2)
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gpucoin")
def cli() -> None:
    """gpucoin: an open market for deep-learning training compute.

    Volunteers bond GPC and lend their machines as Ray nodes; engineers submit DeepSpeed
    training jobs with a bid; workers sign EIP-712 receipts; a sample of the work is replayed
    and checked; receipts drive minting, burning and slashing in an SQL ledger.

    Amounts on the command line are GPC with at most 6 decimals (1 GPC = 10^6 µGPC).
    """


@cli.command()
@click.argument("job_spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--address",
    default=None,
    metavar="HEAD",
    help="A running head's API (HOST:PORT, as `gpucoin up` printed it): submit the job to its market. Without "
    "it, the embedded mode: a private head on this host with dev volunteers joined to it and dev wallets.",
)
@click.option(
    "--wallet",
    "wallet_ref",
    default=None,
    metavar="NAME|ADDRESS",
    help="With --address: the wallet that signs the JobOrder and pays (in --home's wallets directory).",
)
@click.option("--detach", is_flag=True, help="With --address: print the job id once it is queued and return.")
@click.option(
    "--volunteers",
    default=2,
    show_default=True,
    type=click.IntRange(1, 16),
    help="Embedded mode: volunteer Ray nodes to start (each is one worker slot).",
)
@click.option(
    "--workers", type=click.IntRange(1, 256), default=None, help="Data-parallel ranks; overrides `workers` in the spec."
)
@click.option("--steps", type=click.IntRange(1), default=None, help="Optimizer steps; overrides `steps` in the spec.")
@click.option(
    "--interval",
    "interval",
    type=click.IntRange(1),
    default=None,
    help="Steps per checkpoint interval (one receipt per rank each); overrides `checkpoint_interval_steps`.",
)
@click.option(
    "--bid",
    default=None,
    metavar="GPC",
    help="Highest price you pay, GPC per worker-hour; overrides `bid_gpc_per_worker_hour`.",
)
@click.option(
    "--budget",
    default=None,
    metavar="GPC",
    help="Most the job may cost, GPC, escrowed up front (unused part refunded); overrides `budget_gpc`.",
)
@click.option(
    "--data",
    "data_source",
    default=None,
    metavar="SOURCE",
    help='Corpus: "pypi" or a .txt path; overrides `data.source`.',
)
@click.option(
    "--policy",
    "policy_ref",
    default="local",
    show_default=True,
    metavar="NAME|FILE",
    help="Incentive policy of a new local market: a shipped one by name (local: 10 s epochs; default) or a TOML "
    "file; an existing local ledger keeps the policy its Genesis names.",
)
@click.option(
    "--stake", default="500", show_default=True, metavar="GPC", help="Embedded mode: stake each dev volunteer bonds."
)
@click.option(
    "--ask",
    default="0.8",
    show_default=True,
    metavar="GPC",
    help="Embedded mode: each dev volunteer's ask, GPC per worker-hour.",
)
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_HOME,
    show_default=True,
    help="Embedded mode: the private head's home (ledger, dev wallets, job checkpoints, logs; env GPUCOIN_HOME).",
)
@click.option(
    "--head-port",
    type=click.IntRange(1024, 65535),
    default=None,
    help="Embedded mode: GCS port of the private head's Ray head (default: a free port; 6379 is often Redis).",
)
@click.option(
    "--cheat",
    "cheat_ref",
    default=None,
    metavar="MODULE:NAME",
    help="Embedded mode, for tests and demos: rank --cheat-rank cheats as the object NAME of an importable MODULE "
    "says (its on_batch, on_grads, on_commit; gpucoin.runtime.cheats), or one of the shipped strategies by name: "
    + ", ".join(SHIPPED_CHEATS)
    + ". Once caught, the cheater is slashed, the job rewinds to its newest settled step and a spare volunteer "
    "trains that rank from there (so --volunteers is at least the workers + 1 unless given). Refused with "
    "--address: a submitter cannot make another's volunteer cheat (a volunteer of a test network may, by joining "
    "with GPUCOIN_CHEAT=REF@RANK in its environment).",
)
@click.option(
    "--cheat-rank",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Embedded mode: the rank that runs --cheat.",
)
@click.option(
    "--summary-json",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the summary as JSON to this file.",
)
def train(
    job_spec,
    address,
    wallet_ref,
    detach,
    volunteers,
    workers,
    steps,
    interval,
    bid,
    budget,
    data_source,
    policy_ref,
    stake,
    ask,
    home,
    head_port,
    cheat_ref,
    cheat_rank,
    summary_json,
):
    """Train JOB_SPEC (a job YAML) on volunteer nodes, spot-check it and settle it in the ledger.

    \b
    With no --address (the embedded mode): the same path as a real market, every party on this
    host. It funds dev wallets from the dev faucet, starts a private head (`gpucoin up --dev
    --home HOME` on free ports), joins --volunteers volunteer nodes (each bonds --stake, asks
    --ask) and one verifier node (`gpucoin join`), and submits the job as --address does: the
    head escrows the budget, its market places the job, DeepSpeed trains it, every rank signs a
    WorkReceipt per interval, drawn intervals are replayed on the verifier, the ledger burns,
    mints, slashes and refunds, and the head evaluates the final checkpoint. Then the nodes
    leave, the head goes down and a summary is printed. Everything started is stopped at the
    end, also on Ctrl-C or an error, and what is left in escrow is refunded.

    \b
    With --address HOST:PORT and --wallet W: submits to a running head (`gpucoin up`): uploads
    the job's package, signs the JobOrder with W, the head escrows the budget and queues the
    job, its market places it on joined volunteers; then follows it (--detach: prints the job
    id and returns; `gpucoin jobs`, `logs`, `cancel`, `pull` take it from there).
    """
    from gpucoin.cli.render import RichUI, render_summary
    from gpucoin.coordinator.job import LocalOptions, train_local, with_data_source
    from gpucoin.money import parse_gpc
    from gpucoin.policy.model import resolve_policy
    from gpucoin.spec import load_spec

    bid, budget = _gpc_option(bid, "--bid"), _gpc_option(budget, "--budget")
    stake, ask = _gpc_option(stake, "--stake"), _gpc_option(ask, "--ask")
    if address is None and (wallet_ref is not None or detach):
        _fail("--wallet and --detach go with --address (a running head); the embedded mode uses dev wallets", 2)
    if address is not None:
        ctx = click.get_current_context()
        local_only = [
            "volunteers",
            "policy_ref",
            "stake",
            "ask",
            "head_port",
            "summary_json",
            "cheat_ref",
            "cheat_rank",
        ]
        given = [n for n in local_only if ctx.get_parameter_source(n) != click.core.ParameterSource.DEFAULT]
        if given:
            flags = ", ".join("--" + n.removesuffix("_ref").replace("_", "-") for n in given)
            _fail(f"{flags}: for the embedded mode only; a head's market has its own nodes and policy", 2)
    overrides = {
        "workers": workers,
        "steps": steps,
        "checkpoint_interval_steps": interval,
        "bid_gpc_per_worker_hour": bid,
        "budget_gpc": budget,
    }
    if data_source is not None and data_source != "pypi":
        data_source = str(Path(data_source).resolve())  # a path on the command line is relative to here
    console = Console()
    if address is not None:
        if wallet_ref is None:
            _fail("--address needs --wallet: the wallet that signs the JobOrder and pays for the job", 2)
        node_cli.train_remote(job_spec, overrides, data_source, address, wallet_ref, detach, home)
        return
    _terminate_as_interrupt()
    try:
        loaded = load_spec(job_spec, overrides)
        if data_source is not None:
            loaded = with_data_source(loaded, data_source)
        policy = resolve_policy(policy_ref)
        if cheat_ref is None and click.get_current_context().get_parameter_source("cheat_rank") != (
            click.core.ParameterSource.DEFAULT
        ):
            _fail("--cheat-rank goes with --cheat (the strategy that rank runs)", 2)
        cheat = None if cheat_ref is None else _cheat_setting(cheat_ref, cheat_rank, loaded.spec.workers)
        if cheat is not None and click.get_current_context().get_parameter_source("volunteers") == (
            click.core.ParameterSource.DEFAULT
        ):
            volunteers = max(volunteers, loaded.spec.workers + 1)  # a spare to replace the cheater after the rewind
        opts = LocalOptions(
            policy=policy,
            home=home,
            volunteers=volunteers,
            stake_ugpc=parse_gpc(stake),
            ask_ugpc_per_worker_hour=parse_gpc(ask),
            head_port=head_port,
            cheat=cheat,
        )
        summary = train_local(loaded, opts, RichUI())
    except GpucoinError as e:
        _fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    except KeyboardInterrupt:
        _fail("interrupted; the local cluster was stopped and unused escrow refunded", 130)
    except Exception as e:  # noqa: BLE001 - anything unforeseen: one line here, the traceback in a file
        _fail(_internal_error(e, home))
    render_summary(console, summary)
    if summary_json is not None:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(js_safe_dumps(summary, indent=2) + "\n")
    if summary["audit"] != "ok":
        sys.exit(3)
    if summary["state"] != "succeeded":
        sys.exit(1)  # the summary says why: stopped early (a fraud, a rank lost) or failed


@cli.group()
def ledger() -> None:
    """Inspect and audit the ledger (default: the embedded mode's SQLite ledger)."""


_home_opt = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_HOME,
    show_default=True,
    help="Embedded mode state directory (env GPUCOIN_HOME).",
)


@ledger.command()
@_url_opt
@_home_opt
def audit(ledger_url, home):
    """Re-check the ledger from its Genesis: every signature and signer, every message's admission,
    every transfer authorized by the message it cites (amounts, accounts, epochs), the hash chain,
    balances summing to zero with no negative user account, supply = minted - burned <= the
    policy's hard cap. Exits non-zero naming each problem."""
    from gpucoin.ledger import Ledger

    try:
        with Ledger(_ledger_url(ledger_url, home)) as lg:
            problems = lg.audit()
            n = len(lg.transfers())
    except GpucoinError as e:
        _fail(str(e))
    if problems:
        for p in problems:
            click.echo(f"problem: {p}", err=True)
        _fail(f"audit failed: {len(problems)} problem(s)", 1)
    click.echo(f"audit ok: {n} transfers re-checked from genesis")


@ledger.command()
@click.argument("account", required=False)
@_url_opt
@_home_opt
@click.option(
    "--limit", default=20, show_default=True, type=click.IntRange(1, 10000), help="Most recent transfers to list."
)
def show(account, ledger_url, home, limit):
    """Balances and the most recent transfers, in GPC, as tables.

    ACCOUNT is a full account name (wallet:0x..:available, job:ID:escrow, system:burned, ...),
    a wallet address (its available, bonded and unbonding accounts) or omitted (every account).
    """
    from rich.table import Table

    from gpucoin.ledger import Ledger
    from gpucoin.ledger.accounts import is_valid_account
    from gpucoin.money import format_gpc

    console = Console()
    try:
        with Ledger(_ledger_url(ledger_url, home)) as lg:
            if account is None:
                accounts, balances = None, lg.balances()
            elif is_valid_account(account):
                accounts, balances = [account], {account: lg.balance(account)}
            else:
                from gpucoin.ledger.accounts import WALLET_KINDS, wallet_account

                accounts = [wallet_account(account, kind) for kind in WALLET_KINDS]
                balances = {a: lg.balance(a) for a in accounts}
            if accounts is None:
                rows = lg.transfers(limit=limit)
            else:
                rows = sorted(
                    {r.id: r for a in accounts for r in lg.transfers(account=a, limit=limit)}.values(),
                    key=lambda r: r.id,
                )[-limit:]
            totals = lg.totals()
    except GpucoinError as e:
        _fail(str(e))
    t = Table(title="balances (GPC)")
    t.add_column("account")
    t.add_column("balance", justify="right")
    for a, b in sorted(balances.items()):
        t.add_row(a, format_gpc(b))
    console.print(t)
    tr = Table(title=f"last {len(rows)} transfers")
    for c in ("id", "op", "code", "debit", "credit", "GPC"):
        tr.add_column(c, justify="right" if c in ("id", "GPC") else "left")
    for r in rows:
        tr.add_row(str(r.id), r.op_id, r.code, r.debit, r.credit, format_gpc(r.amount))
    console.print(tr)
    console.print(
        "supply {} GPC = minted {} - burned {}".format(
            format_gpc(totals["supply"]), format_gpc(totals["minted"]), format_gpc(totals["burned"])
        )
    )


@ledger.command()
@_url_opt
@_home_opt
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl"]),
    default="jsonl",
    show_default=True,
    help="Output format: one JSON object per line.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write to this file instead of standard output (written whole, then renamed into place).",
)
def export(ledger_url, home, fmt, output):
    """Every signed message, operation and transfer, to re-verify the ledger with your own tools.

    The first line is a header; then messages (with full EIP-712 typed data, digest, signature,
    signer), operations and transfers (with the hash chain). docs/ledger.md says how to check them.
    """
    from gpucoin.ledger import Ledger

    def write(stream) -> int:
        n = 0
        with Ledger(_ledger_url(ledger_url, home)) as lg:
            for record in lg.export():
                stream.write(js_safe_dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
                n += 1
        return n

    try:
        if output is None:
            write(sys.stdout)
            return
        tmp = output.with_name(output.name + ".part")
        output.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as f:
            n = write(f)
        tmp.replace(output)
        click.echo(f"exported {n} records to {output}", err=True)
    except GpucoinError as e:
        _fail(str(e))
    except BrokenPipeError:
        raise  # output cut short by a pipe (`| head`): click ends quietly, as Unix tools do
    except OSError as e:
        _fail(f"cannot write {output}: {e.strerror}")


cli.add_command(wallet)
cli.add_command(verify_cli.verify)
cli.add_command(head_cli.up)
cli.add_command(head_cli.down)
cli.add_command(head_cli.status)
for _command in (
    node_cli.join,
    node_cli.leave,
    node_cli.withdraw,
    node_cli.nodes,
    node_cli.faucet,
    node_cli.jobs,
    node_cli.logs,
    node_cli.pull,
    node_cli.cancel,
):
    cli.add_command(_command)


@cli.group()
def receipt() -> None:
    """Check signed messages (WorkReceipts and the other gpucoin EIP-712 types) offline."""


@receipt.command("verify")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--signer",
    "expected_signer",
    default=None,
    metavar="ADDRESS",
    help="Also require the message to be signed by this address.",
)
@click.option(
    "--chain-id",
    type=click.IntRange(0),
    default=None,
    help="Also require this EIP-712 domain chainId (needs --verifying-contract).",
)
@click.option(
    "--verifying-contract",
    default=None,
    metavar="ADDRESS",
    help="Also require this domain verifyingContract, the coordinator's settlement address (needs --chain-id).",
)
def receipt_verify(file, expected_signer, chain_id, verifying_contract):
    """Check one exported signed message and print its signer and verdict.

    FILE holds one signed message as JSON: what a worker sends (SignedMessage JSON: primaryType,
    domain, message, digest, signature, signer) or one message record of `gpucoin ledger export`.
    The digest is recomputed from the typed data (EIP-712), the signature must have low s and
    recover the stated signer, and the message's own signer field (e.g. WorkReceipt.worker)
    must be that signer. Exit status: 0 valid, 1 invalid, 2 unreadable input.
    """
    from gpucoin.wallet.exported import MAX_FILE_BYTES, NotJSON, check_signed, parse_signed
    from gpucoin.wallet.messages import Domain, parse_address

    if (chain_id is None) != (verifying_contract is None):
        _fail("--chain-id and --verifying-contract go together (they name one domain)", 2)
    if expected_signer is not None:
        try:
            parse_address(expected_signer, "--signer")
        except GpucoinError as e:
            _fail(f"--signer: not an address ({e})", 2)
    try:
        if file.stat().st_size > MAX_FILE_BYTES:
            _fail(f"{file} is larger than {MAX_FILE_BYTES} bytes; expected one signed message", 2)
        text = file.read_text(encoding="utf-8-sig")  # a byte-order mark some editors write is not content
    except OSError as e:
        _fail(f"cannot read {file}: {e.strerror}", 2)
    except UnicodeDecodeError:
        _fail(f"{file} is not UTF-8 text", 2)
    try:
        domain = None if chain_id is None else Domain(chain_id=chain_id, verifying_contract=verifying_contract)
    except GpucoinError as e:
        _fail(str(e), 2)
    try:
        signed = parse_signed(text)
    except NotJSON as e:
        _fail(f"{file}: {e}", 2)
    except GpucoinError as e:  # read, but not a well-formed gpucoin message: that is the verdict
        click.echo(f"verdict    INVALID: {e}")
        sys.exit(1)
    verdict = check_signed(signed, expected_signer=expected_signer, domain=domain)
    d = signed.domain
    click.echo(f"type       {signed.primary_type}")
    click.echo(f"digest     {signed.digest}")
    click.echo(
        f"domain     {d['name']} v{d['version']}, chainId {d['chainId']}, verifyingContract {d['verifyingContract']}"
    )
    click.echo(f"signer     {verdict.recovered or 'none (no key recovers from this signature)'}")
    if verdict.valid:
        click.echo(f"verdict    valid: signed by {verdict.recovered}")
        return
    click.echo(f"verdict    INVALID: {verdict.reason}")
    sys.exit(1)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="gpucoin")


if __name__ == "__main__":
    main()
