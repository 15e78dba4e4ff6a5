"""Replay distances measured on this machine: honest intervals against the shipped cheats.

``train_ranks`` trains a job on this host without Ray: one process per rank, DeepSpeed over gloo,
each step the one ranks run (``runtime.step.engine_step``, a cheat's hooks included when given),
a DeepSpeed checkpoint and the committed sketches at every interval's end. ``replay_distances``
then replays every interval as a verifier does (``verify.replay.replay_interval``) and measures
each rank's relative L2 distance per step (``compare.rel_l2``). ``gpucoin verify calibrate``
prints both for honest runs (ZeRO stages 0-2, replays with 1 and 2 threads) beside each shipped
cheat, and the tolerance they suggest; the tests count honest replays that would fail.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpucoin.exceptions import VerificationError
from gpucoin.spec import JobSpec

RANK_TIMEOUT_S = 1800.0
"""How long the ranks of one calibration run may take together before they are killed."""


@dataclass(frozen=True)
class IntervalDistances:
    """One replayed interval: ``distances`` (W, K), each rank's relative L2 distance per step
    between the sketch it committed and the replay's; ``train_cpu_s``: CPU seconds the ranks spent
    on it together (steps and checkpoint); ``replay_cpu_s``: CPU seconds its replay took (loading
    the start checkpoint included)."""

    start: int
    end: int
    distances: np.ndarray
    train_cpu_s: float
    replay_cpu_s: float


def free_port() -> int:
    """A free TCP port on loopback (DeepSpeed's ``MASTER_PORT`` for ranks of this host)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankSetup:
    """One rank of ``spec`` built in this process as the workers build it: ``train`` the corpus's
    train split (token ids), ``model`` and its DeepSpeed ``engine``, ``params`` its
    (name, parameter) list (``runtime.step.job_parameters``), ``sketch`` its count-sketch."""

    train: np.ndarray
    model: object
    engine: object
    params: list
    sketch: object


def build_rank(spec: JobSpec, data_source: str, buckets: int) -> RankSetup:
    """Import the job's module, load its corpus, seed and build its model, start DeepSpeed over
    gloo (``MASTER_ADDR``/``PORT``, ``RANK``, ``WORLD_SIZE`` already set) and a sketch of
    ``buckets`` numbers: what ``train_ranks``' ranks and ``benchmarks/training``'s one-process
    timing both run."""
    import deepspeed
    import torch

    from gpucoin.runtime.dsconfig import deepspeed_config
    from gpucoin.runtime.sketch import CountSketch
    from gpucoin.runtime.step import job_parameters

    module = importlib.import_module(spec.module)
    corpus = module.prepare_corpus(data_source, val_fraction=spec.data.val_fraction)
    torch.manual_seed(spec.seed)  # as the workers build it
    model = module.build_model(spec.model.model_dump(), corpus.vocab_size)
    deepspeed.init_distributed(dist_backend="gloo")
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=deepspeed_config(spec)
    )
    return RankSetup(
        corpus.train, model, engine, job_parameters(model), CountSketch(model.parameters(), buckets, spec.seed)
    )


def _rank_main(
    rank: int, world: int, port: int, spec_json: str, package_parent: str, data_source: str, out: str, cheat
) -> None:
    """One rank of ``train_ranks`` (a spawned process)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = "0"
    sys.path.insert(0, package_parent)
    import torch

    from gpucoin.runtime.cheats import load_cheat
    from gpucoin.runtime.checkpoint import tag_for
    from gpucoin.runtime.step import engine_step

    torch.set_num_threads(1)
    spec = JobSpec.model_validate_json(spec_json)
    r = build_rank(spec, data_source, BUCKETS)
    train, engine, params, sketch = r.train, r.engine, r.params, r.sketch
    ref, cheat_rank = cheat if cheat else (None, -1)
    bound = None
    if ref is not None and rank == cheat_rank:
        from gpucoin.runtime.cheats import CheatContext

        bound = load_cheat(ref)
        if callable(getattr(bound, "bind", None)):
            bound.bind(CheatContext(spec, train, tuple(n for n, _ in params), sketch.sketch_grads))
    for s, e in spec.intervals():
        t0 = time.process_time()
        sketches = [
            engine_step(engine, spec, train, step, rank, params, sketch, bound)[0].sketch for step in range(s, e)
        ]
        engine.save_checkpoint(out, tag=tag_for(e))
        np.save(Path(out) / f"rank{rank}-step{s:08d}.npy", np.stack(sketches))  # (K, B)
        np.save(Path(out) / f"rank{rank}-step{s:08d}-cpu.npy", np.array([time.process_time() - t0]))


BUCKETS = 256
"""Sketch width of a calibration run (the shipped policies' ``sketch_buckets``)."""


def train_ranks(
    spec: JobSpec, package_parent: Path, data_source: str, out: Path, cheat: tuple[str, int] | None = None
) -> None:
    """Train ``spec`` on this host, ``spec.workers`` processes over gloo, into ``out``.

    Args:
        package_parent: the directory the job's module is imported from.
        cheat: (``runtime.cheats`` reference, rank) of a rank that cheats, or None.

    Raises:
        VerificationError: a rank failed or ran past ``RANK_TIMEOUT_S``.
    """
    out.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    args = (spec.workers, port, spec.model_dump_json(), str(package_parent), data_source, str(out), cheat)
    procs = [ctx.Process(target=_rank_main, args=(r, *args)) for r in range(spec.workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(RANK_TIMEOUT_S)
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if bad:
        raise VerificationError(f"calibration ranks failed (rank, exit code): {bad}")


def replay_distances(
    spec: JobSpec, package_parent: Path, data_source: str, out: Path, threads: int = 1
) -> list[IntervalDistances]:
    """Replay every interval ``train_ranks`` wrote into ``out`` from its start checkpoint.

    Returns:
        One ``IntervalDistances`` per interval, in order.
    """
    from gpucoin.runtime.checkpoint import tag_for
    from gpucoin.verify.compare import rel_l2
    from gpucoin.verify.replay import replay_interval

    if str(package_parent) not in sys.path:
        sys.path.insert(0, str(package_parent))
    found = []
    for s, e in spec.intervals():
        committed = np.stack([np.load(out / f"rank{r}-step{s:08d}.npy") for r in range(spec.workers)])  # (W, K, B)
        tag_dir = None if s == 0 else str(out / tag_for(s))
        t0 = time.process_time()
        replayed = replay_interval(spec, data_source, tag_dir, s, e, BUCKETS, threads).sketches  # (W, K, B)
        replay_cpu = time.process_time() - t0
        d = np.array([[rel_l2(committed[r, k], replayed[r, k]) for k in range(e - s)] for r in range(spec.workers)])
        train_cpu = sum(float(np.load(out / f"rank{r}-step{s:08d}-cpu.npy")[0]) for r in range(spec.workers))
        found.append(IntervalDistances(s, e, d, train_cpu, replay_cpu))
    return found


CROSS_HARDWARE_NOISE = 1e-7
"""Relative L2 an honest replay on other hardware may show per step (another BLAS, a GPU replaying
CPU work; SPEC.md, Verification 3): the floor a suggested tolerance keeps above, even where the
honest replays here were exact."""


@dataclass(frozen=True)
class Spread:
    """Distances of one kind of run: count, smallest, median, largest (relative L2)."""

    n: int
    low: float
    median: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        """Raises: ValueError for no values."""
        if not values:
            raise ValueError("no distances to summarize")
        a = np.asarray(values, dtype=np.float64)
        return cls(n=len(a), low=float(a.min()), median=float(np.median(a)), high=float(a.max()))


def suggest_tolerance(honest: list[float], cheats: dict[str, list[float]]) -> tuple[float, str]:
    """The tolerance the measured distances suggest, and why, in one line.

    The geometric mean of the largest honest distance (at least ``CROSS_HARDWARE_NOISE``) and the
    smallest non-zero distance of any cheat (a 0 is a step where the cheat did not depart, such as
    a stale gradient's first; a cheat whose distances are all 0, the one no sketch pins, is left
    out: no tolerance catches it), so both sides keep the same factor of margin.

    Raises:
        ValueError: no honest distance, or no cheat above the honest ones (nothing separates them).
    """
    if not honest:
        raise ValueError("no honest distances")
    noise = max(max(honest), CROSS_HARDWARE_NOISE)
    shown = {name: min(x for x in d if x > 0) for name, d in cheats.items() if d and max(d) > 0}
    if not shown:
        raise ValueError("no cheat showed in its sketches")
    name, smallest = min(shown.items(), key=lambda kv: kv[1])
    if smallest <= noise:
        raise ValueError(f"{name}'s smallest distance {smallest:.2e} is not above the honest {noise:.2e}")
    tol = float(np.sqrt(noise * smallest))
    return tol, (
        f"geometric mean of the honest bound {noise:.1e} (largest honest {max(honest):.1e}, at least "
        f"{CROSS_HARDWARE_NOISE:.0e}) and the smallest cheat distance {smallest:.2e} ({name}): "
        f"{smallest / tol:.0f}x margin each way"
    )
