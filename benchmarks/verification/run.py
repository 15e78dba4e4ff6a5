"""What verification costs and what it catches, on this machine.

Run from the repository root::

    .venv/bin/python -m benchmarks.verification.run               # ~3 minutes on 2 cores
    .venv/bin/python -m benchmarks.verification.run --intervals 3 --interval-steps 5 --tiny
    .venv/bin/python -m benchmarks.verification.run --json out/bench-verification.json
    .venv/bin/python -m benchmarks.verification.run --skip-cost   # (b) only, seconds

(a) Cost. The main job's model (``--tiny``: the tests' tiny model), 2 ranks, ZeRO 2, trained here
without Ray by ``gpucoin.verify.calibrate.train_ranks`` (the ranks' own ``engine_step``, a
DeepSpeed checkpoint at every interval's end), then every interval replayed as a verifier does
(``replay_distances``: the start checkpoint loaded, every rank's share of every step recomputed).
Measured in the same run: the CPU seconds the 2 ranks spent on each interval together and the
CPU seconds its replay took, the first interval left out of both (one-time start costs). Their
ratio is what verification costs per replayed interval, so the verification CPU share at a check
probability p is ratio x p: the target is ratio <= 1.2 (verification at most 1.2 x the check
share). Printed for the default policy's established-node and new-node probabilities.

(b) Detection. ``--jobs`` simulated jobs of ``--job-intervals`` intervals each, on a node whose
record holds it at the default policy's floor (``verify.sampling.check_probability`` of a long
clean record); a cheater departs in each interval with probability c; each interval is drawn by
the head's own draw (``verify.sampling.is_checked``: HMAC of fresh receipt digests with a secret)
and the job counts as caught if any cheating interval is drawn. Compared with the theory
1 - (1 - c p)^n (each interval cheated and drawn independently; for m cheating intervals,
1 - (1 - p)^m) within 3 binomial standard errors. The head's rule that the last interval is
always checked is left out here (it only raises detection).

Exit status 0 when (a) and (b) hold, 1 when not, 2 on an error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

COST_TARGET = 1.2
Z_LIMIT = 3.0


def cost(args) -> dict:
    """(a): the ranks' training CPU against the replay CPU, per interval."""
    from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy
    from gpucoin.spec import load_spec
    from gpucoin.verify.calibrate import replay_distances, train_ranks
    from tests.conftest import EXCERPT, TINY_MODEL, write_spec

    tmp = Path(tempfile.mkdtemp(prefix="gpucoin-bench-verification-"))
    try:
        job = write_spec(tmp / "job", TINY_MODEL if args.tiny else {})
        steps = args.interval_steps * (args.intervals + 1)
        loaded = load_spec(job, {"steps": steps, "checkpoint_interval_steps": args.interval_steps})
        spec, parent = loaded.spec, loaded.module_dir.parent
        print(
            f"(a) training {steps} steps ({args.intervals + 1} intervals) of {spec.workers} ranks, ZeRO "
            f"{spec.deepspeed.zero_stage}, {'tiny' if args.tiny else 'main job'} model ...",
            flush=True,
        )
        train_ranks(spec, parent, str(EXCERPT), tmp / "out")
        replay_distances(spec, parent, str(EXCERPT), tmp / "out")  # warm-up: imports, allocator
        found = replay_distances(spec, parent, str(EXCERPT), tmp / "out")[1:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    train_s = sum(iv.train_cpu_s for iv in found)
    replay_s = sum(iv.replay_cpu_s for iv in found)
    ratio = replay_s / train_s
    worst = max(float(iv.distances.max()) for iv in found)
    policy = load_policy(SHIPPED_POLICIES_DIR / "default.toml").verification
    rows = []
    print(
        f"    ranks' training CPU {train_s:.2f} s, replay CPU {replay_s:.2f} s over {len(found)} intervals: "
        f"replay/train = {ratio:.3f} (target <= {COST_TARGET}); largest replay distance {worst:.1e}"
    )
    for label, p in (("established node", policy.check_probability), ("new node", policy.new_node_check_probability)):
        rows.append({"nodes": label, "check_probability": p, "verification_share": ratio * p})
        print(
            f"    default policy, {label}: p = {p:.3f} -> verification CPU / training CPU = {ratio * p:.4f} "
            f"= {ratio:.2f} x the check share"
        )
    return {
        "train_cpu_s": train_s,
        "replay_cpu_s": replay_s,
        "ratio": ratio,
        "intervals": len(found),
        "largest_distance": worst,
        "shares": rows,
        "ok": ratio <= COST_TARGET and worst == 0.0,
    }


def detection(args) -> dict:
    """(b): simulated detection rate against 1 - (1 - c p)^n."""
    import random

    from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy
    from gpucoin.verify.sampling import VerificationRecord, check_probability, is_checked

    policy = load_policy(SHIPPED_POLICIES_DIR / "default.toml").verification
    p = check_probability(policy, VerificationRecord(passed=1000, clean_streak=1000))
    rng = random.Random(args.seed)
    secret = rng.randbytes(32)  # the coordinator's secret, fixed by --seed so a run reproduces
    n, rows, ok = args.job_intervals, [], True
    print(f"(b) {args.jobs} jobs x {n} intervals, established node: p = {p}")
    for c in (0.05, 0.2, 0.5, 1.0):
        caught = 0
        for _ in range(args.jobs):
            for _ in range(n):
                cheats = rng.random() < c
                digests = ["0x" + rng.randbytes(32).hex() for _ in range(2)]  # the interval's 2 receipts
                if cheats and is_checked(secret, digests, p):
                    caught += 1
                    break
        rate = caught / args.jobs
        theory = 1 - (1 - c * p) ** n
        se = math.sqrt(theory * (1 - theory) / args.jobs) or 1 / args.jobs
        z = (rate - theory) / se
        ok &= abs(z) <= Z_LIMIT
        rows.append({"cheat_rate": c, "detected": rate, "theory": theory, "z": z})
        print(f"    c = {c:.2f}: detected {rate:.4f}, theory {theory:.4f}, z = {z:+.2f} (|z| <= {Z_LIMIT})")
    return {"check_probability": p, "rows": rows, "ok": ok}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--intervals", type=int, default=4, help="measured intervals (one more is trained first)")
    ap.add_argument("--interval-steps", type=int, default=10, help="optimizer steps per interval")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny model instead of the main job's")
    ap.add_argument("--jobs", type=int, default=4000, help="simulated jobs per cheat rate")
    ap.add_argument("--job-intervals", type=int, default=20, help="intervals per simulated job")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-cost", action="store_true", help="(b) only: seconds, for iterating")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    from gpucoin.exceptions import GpucoinError

    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    try:
        out = {"cost": {"ok": True, "skipped": True} if args.skip_cost else cost(args), "detection": detection(args)}
    except (GpucoinError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    ok = out["cost"]["ok"] and out["detection"]["ok"]
    print("ok" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
