"""``gpucoin verify calibrate``: replay distances of honest and cheating runs on this machine."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from gpucoin.cli.common import fail as _fail
from gpucoin.exceptions import GpucoinError

STAGES = (0, 1, 2)


@click.group()
def verify() -> None:
    """Verification tools: how far honest replays land from what ranks committed, against cheats."""


@verify.command("calibrate")
@click.argument("job_spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--intervals",
    type=click.IntRange(1, 1000),
    default=4,
    show_default=True,
    help="One-step intervals each run trains and replays.",
)
@click.option(
    "--data", "data_source", default=None, metavar="SOURCE", help='Corpus: "pypi" or a .txt path; overrides the spec.'
)
@click.option(
    "--cheats/--no-cheats", default=True, show_default=True, help="Also run each shipped cheat (rank 0, ZeRO 2)."
)
def calibrate(job_spec, intervals, data_source, cheats):
    """Train JOB_SPEC's model here, without Ray, and replay every interval as a verifier does.

    \b
    Honest runs under ZeRO stages 0, 1 and 2, each replayed with 1 and 2 threads; then, under
    ZeRO 2, one run per shipped cheat (gpucoin.runtime.cheats) with rank 0 cheating. Prints the
    spread of each run's relative L2 distances (committed vs replayed sketch, every rank and
    step; for a cheat, the cheating rank's) and the tolerance they suggest beside the policy's
    `tolerance_rel_l2`. Takes a few minutes: one DeepSpeed start per run.
    """
    from gpucoin.coordinator.job import with_data_source
    from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy
    from gpucoin.runtime.cheats import SHIPPED
    from gpucoin.spec import load_spec
    from gpucoin.verify import calibrate as cal

    try:
        loaded = load_spec(job_spec, {"steps": intervals, "checkpoint_interval_steps": 1})
        if data_source is not None:
            path = data_source if data_source == "pypi" else str(Path(data_source).resolve())
            loaded = with_data_source(loaded, path)
    except GpucoinError as e:
        _fail(str(e).strip().splitlines()[0])
    spec, parent = loaded.spec, loaded.module_dir.parent
    source = spec.data.source
    runs = [(f"honest, ZeRO {z}", z, None) for z in STAGES]
    runs += [(name, 2, (name, 0)) for name in SHIPPED] if cheats else []
    honest: list[float] = []
    rows: list[tuple[str, cal.Spread]] = []
    by_cheat: dict[str, list[float]] = {}
    try:
        with (
            tempfile.TemporaryDirectory(prefix="gpucoin-calibrate-") as tmp,
            Progress(console=Console(stderr=True)) as bar,
        ):
            task = bar.add_task("training and replaying", total=len(runs))
            for label, zero, cheat in runs:
                run_spec = spec.model_copy(update={"deepspeed": spec.deepspeed.model_copy(update={"zero_stage": zero})})
                out = Path(tmp) / label.replace(" ", "_").replace(",", "")
                cal.train_ranks(run_spec, parent, source, out, cheat)
                for threads in (1, 2) if cheat is None else (1,):
                    found = cal.replay_distances(run_spec, parent, source, out, threads)
                    if cheat is None:
                        values = [float(x) for iv in found for x in iv.distances.ravel()]
                        honest += values
                        rows.append(
                            (
                                f"{label}, replayed on {threads} thread{'s' if threads > 1 else ''}",
                                cal.Spread.of(values),
                            )
                        )
                    else:
                        values = [float(x) for iv in found for x in iv.distances[0]]
                        by_cheat[label] = values
                        rows.append((f"cheat: {label}", cal.Spread.of(values)))
                bar.advance(task)
    except GpucoinError as e:
        _fail(str(e).strip().splitlines()[0])
    table = Table(title="replay distance (relative L2)")
    table.add_column("run", no_wrap=True)
    for name in ("distances", "smallest", "median", "largest"):
        table.add_column(name, justify="right")
    for label, sp in rows:
        table.add_row(label, str(sp.n), f"{sp.low:.2e}", f"{sp.median:.2e}", f"{sp.high:.2e}")
    console = Console()
    console.print(table)
    for name in ("local", "default"):
        policy = load_policy(SHIPPED_POLICIES_DIR / f"{name}.toml")
        console.print(f"the {name} policy's tolerance_rel_l2: {policy.verification.tolerance_rel_l2:.1e}")
    if by_cheat:
        try:
            tol, why = cal.suggest_tolerance(honest, by_cheat)
            console.print(f"suggested tolerance: {tol:.1e} ({why})")
        except ValueError as e:
            console.print(f"no tolerance to suggest: {e}")
        unpinned = [n for n, d in by_cheat.items() if max(d) == 0.0]
        if unpinned:
            console.print(
                f"{', '.join(unpinned)}: no sketch shows it (its commitment is honest); the replay of the next step "
                "and the end checkpoint void such an interval (docs/verification.md)"
            )
