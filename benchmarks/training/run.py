"""What gpucoin costs the training itself: steps per second under ``gpucoin train`` against plain
Ray Train + DeepSpeed, on the same nodes, in one run.

Run from the repository root (as root, like ``make demo``, for the node user)::

    .venv/bin/python -m benchmarks.training.run                  # ~15 minutes on 2 cores
    .venv/bin/python -m benchmarks.training.run --steps 40 --interval-steps 10 --skip-breakdown
    .venv/bin/python -m benchmarks.training.run --json out/bench-training.json

(c) One embedded market (``coordinator.job.LocalMarket``: a head, 2 volunteers, a verifier) on the
local policy with no interval drawn by chance, so no replay shares the ranks' cores while they
train (the head's end check of the last interval runs after the last step, outside the window).
On it, ``--repeat`` pairs of runs, in turn both ways round (baseline then gpucoin, gpucoin then
baseline, ...: a machine whose speed drifts during the run favours neither side). The baseline
(``benchmarks.training.plain``): a Ray Train driver of the same cluster, ranks pinned to the same
2 volunteer nodes, the same model, corpus, DeepSpeed config and checkpoint interval, the
textbook loop, no gpucoin code. The main job under gpucoin: commitments, receipts signed by the
node signers, checkpoints hashed and stored on the head, progress to the head. Steps per second are counted from the end of the first interval
to the last step (one-time start costs left out; both windows hold the same number of
checkpoints): gpucoin's from the head's step events (rank 0's progress, stamped as the head
receives it), the baseline's from rank 0's clock. The ratio divides gpucoin's best rate by the
baseline's best (runs on this shared 2-core machine vary by ~10 % from one to the next; each
pair's own ratio is printed too); the target is >= 0.95. During each run every process's CPU time is sampled (psutil, each second),
and the window's CPU is printed per step by kind of process: the ranks, the head service, the
node signers, the replay worker, Ray's own processes, the rest.

Where the ranks' time goes: the same per-rank operations timed in one process (DeepSpeed over gloo with
one rank, the job's model): a plain step against gpucoin's ``engine_step`` (local gradient by
``torch.autograd.grad``, its sketch, the surrogate backward), the sketch alone, and per interval
the checkpoint's save, its hashing into a content store (``commit_checkpoint``) and the signing
of a WorkReceipt. What they predict per step is printed beside what the run measured.

Exit status 0 when (c) >= ``--target``, 1 when not, 2 on an error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET = 0.95
"""(c) the issue asks for: gpucoin's steps per second over the baseline's."""
BASELINE_TIMEOUT_S = 3600
"""Longest one baseline run may take."""
BREAKDOWN_TIMEOUT_S = 1800.0
"""Longest the one-process breakdown may take."""


CPU_SAMPLE_S = 1.0
"""How often ``CpuSampler`` reads every process's CPU time."""

RAY_SYSTEM = "Ray system (GCS, raylets, dashboards, agents, log monitors)"
LABELS = (
    ("RayTrainWorker", "ranks (Ray Train workers)"),
    ("gpucoin.head.service", "gpucoin head service"),
    ("gpucoin.wallet.signer", "gpucoin node signers"),
    ("gpucoin.verify", "gpucoin replay worker"),
    ("gpucoin.runtime.driver", "job driver"),
    ("benchmarks.training.plain", "job driver"),
    ("ray::", "Ray Train controller and actors"),
    ("gcs_server", RAY_SYSTEM),
    ("raylet", RAY_SYSTEM),
    ("dashboard", RAY_SYSTEM),
    ("log_monitor", RAY_SYSTEM),
    ("runtime_env", RAY_SYSTEM),
    ("gpucoin.cluster.ray_node", RAY_SYSTEM),
)
"""Process command line substring -> what the breakdown calls it (first match wins; Ray titles
its workers and actors ``ray::<class>``)."""


class CpuSampler:
    """Every process's CPU seconds (user + system), read every ``CPU_SAMPLE_S`` in a thread, so
    the CPU a run's window took can be split by process kind (``LABELS``)."""

    def __init__(self) -> None:
        import threading

        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    @staticmethod
    def _label(proc) -> str:
        # read each time: a Ray worker starts as default_worker.py and then retitles itself ray::<class>
        if proc.pid == os.getpid():
            return "this process (following the job)"
        try:
            text = " ".join(proc.cmdline()) or proc.name()
        except Exception:  # noqa: BLE001 - gone, or not ours to read
            text = ""
        return next((name for key, name in LABELS if key in text), "other")

    def _read(self) -> dict[int, tuple[str, float]]:
        import psutil

        out = {}
        for proc in psutil.process_iter():
            try:
                t = proc.cpu_times()
                out[proc.pid] = (self._label(proc), t.user + t.system)
            except Exception:  # noqa: BLE001 - exited between listing and reading
                continue
        return out

    def _loop(self) -> None:
        for _ in range(10**7):  # bounded: ~115 days at 1 s
            self.samples.append((time.time(), self._read()))
            if self._stop.wait(CPU_SAMPLE_S):
                return

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds by label between the samples nearest to unix times ``t0`` and ``t1`` (a
        process started in between counts from 0 and is labelled as the later sample saw it)."""
        if not self.samples:
            return {}
        first = min(self.samples, key=lambda s: abs(s[0] - t0))[1]
        last = min(self.samples, key=lambda s: abs(s[0] - t1))[1]
        out: dict[str, float] = {}
        for pid, (label, cpu) in last.items():
            # the label read at the start: a process exiting at the end shows no command line
            label, before = first.get(pid, (label, 0.0))
            out[label] = out.get(label, 0.0) + max(cpu - before, 0.0)
        return out


def _window_rate(points: list[tuple[int, float]], first: int, last: int) -> float:
    """Steps per second between the points (steps done, unix s) at ``first`` and ``last`` steps.

    Raises:
        RuntimeError: a point is missing.
    """
    at = dict(points)
    if first not in at or last not in at:
        raise RuntimeError(f"no time recorded at step {first} or {last} (have {sorted(at)[:3]}...{sorted(at)[-3:]})")
    return (last - first) / (at[last] - at[first])


def gpucoin_points(api_url: str, job_id: str) -> list[tuple[int, float]]:
    """(steps done, unix s) of the job's step events on the head."""
    from gpucoin.head.client import HeadClient
    from gpucoin.head.records import EventKind

    client, points, after = HeadClient(api_url), [], 0
    for _ in range(100_000):  # pages of events; bounded
        page = client.job_events(job_id, after)
        if not page:
            return points
        after = page[-1].seq
        points += [(e.progress.step, e.time_ms / 1000) for e in page if e.kind == EventKind.STEP and e.progress]
    raise RuntimeError("too many event pages")


def baseline(market, loaded, node_ids: list[str], data_source: str, work: Path) -> list[tuple[int, float]]:
    """Run ``benchmarks.training.plain`` on ``node_ids`` over the corpus at ``data_source`` (staged
    for the nodes); (steps done, unix s) of its rank 0."""
    from gpucoin.cluster.auth import node_env
    from gpucoin.cluster.node_user import chown_tree
    from gpucoin.cluster.ray_node import LOCAL_ONLY_ENV
    from gpucoin.runtime.dsconfig import deepspeed_config

    spec = loaded.spec
    storage = Path(tempfile.mkdtemp(prefix="plain-train-", dir=work))
    if market.nodes.user is not None:  # Ray Train's workers run as the node user and write here
        chown_tree(storage, market.nodes.user)
    config = {
        "address": market.info.ray_address,
        "node_ids": node_ids,
        "package_dir": str(loaded.module_dir),
        "module": spec.module,
        "model": spec.model.model_dump(),
        "data_source": data_source,
        "val_fraction": spec.data.val_fraction,
        "seed": spec.seed,
        "micro_batch_size": spec.deepspeed.micro_batch_size,
        "block_size": spec.model.block_size,
        "steps": spec.steps,
        "checkpoint_interval_steps": spec.checkpoint_interval_steps,
        "lr": spec.deepspeed.optimizer.lr,
        "ds_config": deepspeed_config(spec),
        "storage_dir": str(storage),
    }
    cfg, out = work / "plain-config.json", work / "plain-out.json"
    cfg.write_text(json.dumps(config))
    # a loopback cluster: Ray would otherwise swap 127.0.0.1 for the host's IP, where nothing listens
    env = {**node_env(dict(os.environ), market.info.token_path, market.info.ray_temp_dir), LOCAL_ONLY_ENV: "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.training.plain", str(cfg), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=BASELINE_TIMEOUT_S,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the plain Ray Train run failed:\n{proc.stderr[-4000:]}")
    times = json.loads(out.read_text())["times"]
    return [(i + 1, t) for i, t in enumerate(times)]


def _breakdown_child(spec_json: str, package_parent: str, data_source: str, buckets: int, steps: int, queue) -> None:
    """The per-rank operations timed in one process (see the module docstring)."""
    from gpucoin.verify.calibrate import build_rank, free_port

    port = free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    sys.path.insert(0, package_parent)
    import numpy as np
    import torch
    from eth_account import Account

    from gpucoin.runtime.checkpoint import tag_for
    from gpucoin.runtime.step import engine_step
    from gpucoin.spec import JobSpec
    from gpucoin.storage import ContentStore, commit_checkpoint
    from gpucoin.wallet.messages import Domain, sign

    torch.set_num_threads(1)
    spec = JobSpec.model_validate_json(spec_json)
    spec = spec.model_copy(update={"workers": 1})  # one rank's share, its config for a world of 1
    r = build_rank(spec, data_source, buckets)
    train, engine, params, sketch = r.train, r.engine, r.params, r.sketch
    B, T = spec.deepspeed.micro_batch_size, spec.model.block_size
    gen = torch.Generator().manual_seed(0)

    def plain() -> None:
        ix = torch.randint(len(train) - T - 1, (B,), generator=gen).numpy()
        chunk = torch.from_numpy(train[ix[:, None] + np.arange(T + 1)[None, :]].astype(np.int64))  # (B, T+1)
        x, y = chunk[:, :-1], chunk[:, 1:]
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()

    def timed(fn, n: int) -> float:
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    step_no = iter(range(10**9))

    def ours() -> None:
        engine_step(engine, spec, train, next(step_no), 0, params, sketch)

    plain(), ours()  # warm-up
    spent = {"plain_step_s": 0.0, "gpucoin_step_s": 0.0}
    for _ in range(steps):  # interleaved, so load that comes and goes falls on both alike
        for key, fn in (("plain_step_s", plain), ("gpucoin_step_s", ours)):
            t0 = time.perf_counter()
            fn()
            spent[key] += time.perf_counter() - t0
    out = {key: s / steps for key, s in spent.items()}
    grads = [torch.randn_like(p) for _, p in params]
    out["sketch_s"] = timed(lambda: sketch.sketch_grads(grads), steps)
    work = Path(tempfile.mkdtemp(prefix="gpucoin-bench-breakdown-"))
    try:
        out["save_checkpoint_s"] = timed(lambda: engine.save_checkpoint(str(work / "ckpt"), tag=tag_for(1)), 3)
        store = ContentStore(work / "store")
        out["commit_checkpoint_s"] = timed(
            lambda: commit_checkpoint(
                store.put,
                work / "ckpt" / tag_for(1),
                job_id="bench",
                rank=0,
                step=1,
                zero_stage=spec.deepspeed.zero_stage,
                world=1,
            ),
            3,
        )
        out["checkpoint_bytes"] = sum(f.stat().st_size for f in (work / "ckpt" / tag_for(1)).iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    acct = Account.create()
    domain = Domain(chain_id=31337, verifying_contract=acct.address)
    receipt = {
        "jobId": "bench",
        "worker": acct.address,
        "rank": 0,
        "stepStart": 0,
        "stepEnd": 50,
        "samples": 1600,
        "computeTimeMs": 1000,
        "sketchRoot": "0x" + "11" * 32,
        "checkpointHash": "0x" + "22" * 32,
        "previousReceipt": "0x" + "00" * 32,
        "nonce": 1,
    }
    out["sign_receipt_s"] = timed(lambda: sign(acct, "WorkReceipt", domain, receipt), 20)
    queue.put(out)


def breakdown(loaded, data_source: str, buckets: int, steps: int) -> dict:
    """Time the per-rank operations in a spawned process (DeepSpeed's process group stays there),
    with a sketch of ``buckets`` numbers (the policy's ``sketch_buckets``).

    Raises:
        RuntimeError: the process ended without an answer, or gave none within ``BREAKDOWN_TIMEOUT_S``.
    """
    import multiprocessing
    import queue as queues

    ctx = multiprocessing.get_context("spawn")
    answers = ctx.Queue()
    args = (loaded.spec.model_dump_json(), str(loaded.module_dir.parent), data_source, buckets, steps, answers)
    proc = ctx.Process(target=_breakdown_child, args=args)
    proc.start()
    deadline = time.monotonic() + BREAKDOWN_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            try:
                return answers.get(timeout=5)
            except queues.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"the breakdown process ended with exit code {proc.exitcode}") from None
        raise RuntimeError(f"the breakdown gave no answer within {BREAKDOWN_TIMEOUT_S:.0f} s")
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", type=Path, default=REPO / "jobs" / "shakespeare_char" / "job.yaml")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per run (default 150)")
    ap.add_argument("--interval-steps", type=int, default=None, help="checkpoint interval (default: the job's)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="pairs of runs, in the order baseline, gpucoin, gpucoin, baseline, baseline, ... (default 3)",
    )
    ap.add_argument("--breakdown-steps", type=int, default=20, help="steps timed per row of the breakdown")
    ap.add_argument("--skip-breakdown", action="store_true")
    ap.add_argument("--target", type=float, default=TARGET)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    from gpucoin.coordinator.job import LocalMarket, LocalOptions, _data_source
    from gpucoin.exceptions import GpucoinError
    from gpucoin.head.client import HeadClient
    from gpucoin.head.records import JobState
    from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy
    from gpucoin.spec import load_spec

    overrides = {"steps": args.steps}
    if args.interval_steps:
        overrides["checkpoint_interval_steps"] = args.interval_steps
    loaded = load_spec(args.job, overrides)
    spec = loaded.spec
    k, n = spec.checkpoint_interval_steps, spec.steps
    if args.repeat < 1:
        print(f"error: --repeat {args.repeat} must be at least 1", file=sys.stderr)
        return 2
    if n < 2 * k:
        print(f"error: --steps {n} must cover at least 2 intervals of {k} steps", file=sys.stderr)
        return 2
    local = load_policy(SHIPPED_POLICIES_DIR / "local.toml")
    never_drawn = local.model_copy(
        update={
            "verification": local.verification.model_copy(
                update={"check_probability": 0.0, "new_node_check_probability": 0.0}
            )
        }
    )
    print(
        f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}; job {spec.name}: {n} steps, "
        f"interval {k}, {spec.workers} ranks, ZeRO {spec.deepspeed.zero_stage}, micro-batch "
        f"{spec.deepspeed.micro_batch_size}; measured from step {k} to {n}",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through LocalMarket, which stops its nodes
    work = Path(tempfile.mkdtemp(prefix="gpucoin-bench-training-"))
    work.chmod(0o755)
    result: dict = {"steps": n, "interval_steps": k, "window": [k, n]}
    try:
        opts = LocalOptions(policy=never_drawn, home=work / "market")
        with LocalMarket(opts) as market:
            vols = [v.node_id for v in HeadClient(market.info.api_url).nodes() if v.role.value == "volunteer"]
            staged = market.nodes.stage(_data_source(loaded))  # once, for every baseline run

            def run_one(which: str) -> list[tuple[int, float]]:
                if which == "baseline":
                    return baseline(market, loaded, vols, staged, work)
                summary = market.run(loaded)
                if summary["state"] != JobState.SUCCEEDED.value:
                    raise RuntimeError(f"the gpucoin run ended {summary['state']}: {summary.get('stopped')}")
                return gpucoin_points(market.info.api_url, summary["job_id"])

            runs = []
            # pairs in turn both ways round (ABBA): a machine that speeds up or slows down during the
            # run favours neither side
            order = [w for i in range(args.repeat) for w in (("baseline", "gpucoin"), ("gpucoin", "baseline"))[i % 2]]
            for which in order:
                t0 = time.monotonic()
                with CpuSampler() as sampler:
                    points = run_one(which)
                rate = _window_rate(points, k, n)
                at = dict(points)
                cpu = sampler.between(at[k], at[n])
                wall = time.monotonic() - t0
                runs.append({"run": which, "steps_per_s": rate, "wall_s": wall, "cpu_s": cpu, "points": points})
                print(f"    {which:8s}: {rate:.3f} steps/s ({1 / rate:.3f} s/step), run {wall:.0f} s", flush=True)
                for label, sec in sorted(cpu.items(), key=lambda kv: -kv[1]):
                    if sec / (n - k) >= 0.001:
                        print(f"        {label:62s} {sec / (n - k) * 1000:7.1f} ms CPU per step", flush=True)
            if not args.skip_breakdown:  # in this process's user: the corpus where it is
                print("where the time goes (one rank, one process) ...", flush=True)
                buckets = never_drawn.verification.sketch_buckets
                result["breakdown"] = breakdown(loaded, _data_source(loaded), buckets, args.breakdown_steps)
    except (GpucoinError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours = max(r["steps_per_s"] for r in runs if r["run"] == "gpucoin")
    base = max(r["steps_per_s"] for r in runs if r["run"] == "baseline")
    ratio = ours / base
    pairs = [
        next(r for r in runs[i : i + 2] if r["run"] == "gpucoin")["steps_per_s"]
        / next(r for r in runs[i : i + 2] if r["run"] == "baseline")["steps_per_s"]
        for i in range(0, len(runs), 2)
    ]
    result.update(runs=runs, ratio=ratio, pairwise=pairs, target=args.target, ok=ratio >= args.target)
    print(
        f"(c) gpucoin / plain Ray Train + DeepSpeed = {ours:.3f} / {base:.3f} = {ratio:.3f} (target >= {args.target}); "
        f"pair by pair {', '.join(f'{r:.3f}' for r in pairs)}"
    )
    if "breakdown" in result:
        b = result["breakdown"]
        per_step = {
            "plain step": b["plain_step_s"],
            "gpucoin engine_step": b["gpucoin_step_s"],
            "  of which the sketch": b["sketch_s"],
            "checkpoint save / interval": b["save_checkpoint_s"] / k,
            "checkpoint hash + store / interval": b["commit_checkpoint_s"] / k,
            "receipt signing / interval": b["sign_receipt_s"] / k,
        }
        for name, s in per_step.items():
            print(f"    {name:36s} {s * 1000:8.2f} ms per step")
        plain = b["plain_step_s"] + b["save_checkpoint_s"] / k
        ours_pred = b["gpucoin_step_s"] + (b["save_checkpoint_s"] + b["commit_checkpoint_s"] + b["sign_receipt_s"]) / k
        result["predicted_ratio"] = plain / ours_pred
        print(
            f"    (c) these predict {plain / ours_pred:.3f}, the run measured {ratio:.3f} (checkpoint "
            f"{b['checkpoint_bytes'] / 1e6:.1f} MB per rank; not in the prediction: progress and receipts over "
            f"HTTP, the signer, the head's work on the same 2 cores)"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print("ok" if result["ok"] else "NOT met")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
