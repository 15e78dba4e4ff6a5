"""Ledger settlement throughput vs signature recovery alone, on SQLite and PostgreSQL.

Run from the repository root::

    .venv/bin/python -m benchmarks.ledger.run                 # SQLite + PostgreSQL, defaults
    .venv/bin/python benchmarks/ledger/run.py --skip-postgres --receipts 500
    .venv/bin/python -m benchmarks.ledger.run --json out/bench-ledger.json --profile

One run signs N WorkReceipts (and the coordinator's N Settlements of them) before any timing,
then measures, on that same set:

1. the baseline, signature recovery alone: eth-account's
   ``Account.recover_message(encode_typed_data(full_message=r.typed_data()), signature=r.signature)``
   per receipt (and, for information, ``Account._recover_hash(digest, signature)`` from the digest
   alone, and the ledger's own verification of receipt + settlement without any database);
2. settlement, receipts verified and posted: per receipt the ledger checks and stores the
   WorkReceipt and the Settlement that names it (digest recomputed, signature recovered, both
   by ``Ledger.record_messages``) and posts the settlement operation ``plan_interval`` gives
   (BURN + TREASURY in burn_and_mint mode, PAY + TREASURY in direct mode) out of the job's escrow:
   "single" is one ``record_messages`` + one ``post`` per receipt (two transactions), "batched"
   one ``post_batch(operations, messages=...)`` per batch of B receipts (one transaction that
   records the 2B messages and posts the B operations). On SQLite (a file in a temp
   directory) and on PostgreSQL (a fresh ``bench_<random>`` schema per case, dropped afterwards).

Throughput is receipts per second; the ratio is settlement receipts/s over baseline receipts/s.
Settlement verifies 2 signed messages per receipt (the receipt and its Settlement), the baseline 1.
Exit status: 0 if batched settlement reaches ``--min-ratio`` (0.5) of the baseline on every
backend run, 1 if not (the failing backends are printed), 2 on an error (e.g. no PostgreSQL).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import os
import pstats
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:  # `python benchmarks/ledger/run.py` from anywhere
    sys.path.insert(0, str(_REPO))

from eth_account import Account  # noqa: E402
from eth_account.messages import encode_typed_data  # noqa: E402
from sqlalchemy import create_engine, func, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from benchmarks.common import clock, ecc_environment, print_rows  # noqa: E402
from gpucoin.ledger import BURNED, ISSUANCE, TREASURY, Ledger, Operation, escrow_account, wallet_account  # noqa: E402
from gpucoin.ledger.db import normalize_url  # noqa: E402
from gpucoin.ledger.models import MessageRow, TransferRow  # noqa: E402
from gpucoin.ledger.plans import plan_escrow, plan_faucet, plan_interval  # noqa: E402
from gpucoin.ledger.record import check_message  # noqa: E402
from gpucoin.ledger.store import MAX_BATCH  # noqa: E402
from gpucoin.money import MICRO_PER_GPC  # noqa: E402
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, Policy, load_policy, policy_hash  # noqa: E402
from gpucoin.policy.tokenomics import split_payment  # noqa: E402
from gpucoin.wallet.messages import ZERO_BYTES32, Domain, SignedMessage, sign  # noqa: E402

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_POLICY = SHIPPED_POLICIES_DIR / "default.toml"

GPC = MICRO_PER_GPC
COORDINATOR = Account.from_key(b"\x02" * 32)
CONSUMER = Account.from_key(b"\x03" * 32)
WORKER = Account.from_key(b"\x04" * 32)
DOMAIN = Domain(chain_id=31337, verifying_contract=COORDINATOR.address)
JOB = "bench-job"
STEPS_PER_INTERVAL = 10
BASELINE = "baseline: recover_message(encode_typed_data(typed data))"


# -- environment ---------------------------------------------------------------------------


# -- the workload --------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One settled interval: the worker's receipt, the coordinator's Settlement of it, the operation."""

    receipt: SignedMessage
    settlement: SignedMessage
    op: Operation


@dataclass
class Workload:
    """Everything signed before timing; the same for every case (each case gets a fresh ledger)."""

    policy: Policy
    payment: int  # µGPC charged per interval
    burn: int  # burn share of one payment (paid to the worker in direct mode)
    treasury: int  # treasury share of one payment
    budget: int  # µGPC faucet to the consumer and escrowed for the job
    genesis: SignedMessage  # the market's: a dev one (its faucet funds the consumer), epochs of the policy
    faucet: SignedMessage
    order: SignedMessage
    registration: SignedMessage  # the worker's NodeRegistration and the coordinator's Assignment of rank 0 to
    assignment: SignedMessage  # it: the ledger admits rank 0's receipts only from the provider assigned
    warmup: list[Item]
    items: list[Item]

    @property
    def all_items(self) -> list[Item]:
        return self.warmup + self.items


def build_workload(n: int, warmup: int, policy: Policy, payment: int) -> Workload:
    """Sign the faucet, the job order and ``warmup + n`` receipts with their Settlements (not timed).

    Mirrors ``gpucoin.coordinator.settle.Coordinator.settle_interval``: the Settlement names the
    receipt's digest as subject (an unchecked interval), carries paid / burned / treasury, epoch 0
    and the policy hash; the operation is ``settle:<receipt digest>`` with the transfers of
    ``plan_interval``. The Genesis starts epoch 0 now: the default policy's day-long epoch 0 covers
    the run.
    """
    nonce = itertools.count(1)
    tok = policy.tokenomics

    def s(account: Any, primary_type: str, **message: Any) -> SignedMessage:
        return sign(account, primary_type, DOMAIN, {**message, "nonce": next(nonce)})

    total = n + warmup
    budget = (total + 1) * payment  # one payment of slack: the escrow stays pending throughout
    genesis = sign(
        COORDINATOR,
        "Genesis",
        DOMAIN,
        dict(
            coordinator=COORDINATOR.address,
            admin=COORDINATOR.address,
            chainId=DOMAIN.chain_id,
            dev=True,
            policyHash=policy_hash(policy),
            startTime=int(time.time()),
            allocations=[],
        ),
    )
    faucet = s(
        COORDINATOR, "Faucet", recipient=CONSUMER.address, amount=budget
    )  # the market's coordinator mints dev funds
    order = s(
        CONSUMER,
        "JobOrder",
        consumer=CONSUMER.address,
        jobId=JOB,
        specHash="0x" + "dd" * 32,
        packageHash="0x" + "cd" * 32,  # the job's package (not vetted: nothing here is slashed)
        workers=1,
        bidPerWorkerHour=2 * GPC,
        budget=budget,
        deadline=2**40,
    )
    registration = s(
        WORKER,
        "NodeRegistration",
        provider=WORKER.address,
        nodeId="bench-node",
        resources="cpu=2",
        askPerWorkerHour=GPC,
        stake=0,
        deadline=2**40,
    )
    assignment = s(
        COORDINATOR, "Assignment", jobId=JOB, rank=0, provider=WORKER.address, nodeId="bench-node", fromStep=0
    )
    burn, treasury = split_payment(payment, tok)
    phash = policy_hash(policy)
    items: list[Item] = []
    left = budget
    previous = ZERO_BYTES32
    for i in range(total):
        step = i * STEPS_PER_INTERVAL
        r = s(
            WORKER,
            "WorkReceipt",
            jobId=JOB,
            worker=WORKER.address,
            rank=0,
            stepStart=step,
            stepEnd=step + STEPS_PER_INTERVAL,
            samples=320,
            computeTimeMs=5000,
            sketchRoot="0x" + "aa" * 32,
            checkpointHash="0x" + "bb" * 32,
            previousReceipt=previous,
        )
        st = s(
            COORDINATOR,
            "Settlement",
            coordinator=COORDINATOR.address,
            jobId=JOB,
            subject=r.digest,
            epoch=0,
            paid=payment,
            burned=burn,
            treasury=treasury,
            minted=0,
            slashed=0,
            refunded=0,
            policyHash=phash,
        )
        transfers = plan_interval(JOB, min(payment, left), tok, st.digest, [WORKER.address])
        left -= payment
        op = Operation(f"settle:{r.digest}", tuple(transfers), f"settle steps {step}-{step + STEPS_PER_INTERVAL}")
        items.append(Item(r, st, op))
        previous = r.digest
    return Workload(
        policy,
        payment,
        burn,
        treasury,
        budget,
        genesis,
        faucet,
        order,
        registration,
        assignment,
        items[:warmup],
        items[warmup:],
    )


# -- measurements --------------------------------------------------------------------------


@dataclass
class Result:
    """One measured case."""

    case: str
    kind: str  # "baseline", "info" or "settlement"
    receipts: int
    messages_verified: int
    seconds: float
    cpu_seconds: float
    samples: list[float] = field(default_factory=list)  # seconds of every repeat (best is reported)
    backend: str | None = None
    mode: str | None = None
    batch_size: int | None = None
    ratio: float | None = None  # receipts/s over the baseline's receipts/s
    audit_seconds: float | None = None
    checks: str | None = None

    @property
    def rate(self) -> float:
        return self.receipts / self.seconds if self.seconds > 0 else float("inf")

    def as_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "receipts_per_s": self.rate,
            "messages_verified_per_s": self.messages_verified / self.seconds,
        }


def recover_typed_data_eth_account(items: Sequence[Item]) -> None:
    """The baseline: eth-account recovers each receipt's signer from its full typed data."""
    for it in items:
        r = it.receipt
        signer = Account.recover_message(encode_typed_data(full_message=r.typed_data()), signature=r.signature)
        if signer != r.signer:
            raise AssertionError(f"recovered {signer}, expected {r.signer}")


def recover_digest_eth_account(pairs: Sequence[tuple[bytes, str, str]]) -> None:
    """For information: eth-account recovers each signer from the 32-byte digest alone."""
    for digest, signature, expected in pairs:
        signer = Account._recover_hash(digest, signature=signature)
        if signer != expected:
            raise AssertionError(f"recovered {signer}, expected {expected}")


def verify_like_the_ledger(items: Sequence[Item]) -> None:
    """For information: the ledger's own check of receipt + Settlement, no database.

    ``gpucoin.ledger.record.check_message`` is what ``record_messages`` runs on every message before
    it opens a transaction (canonical JSON of the typed data, digest recomputed from it, signature
    recovered, signer field compared: ``gpucoin.ledger.authenticity.verify_typed_message``).
    """
    check = check_message
    for it in items:
        check(it.receipt)
        check(it.settlement)


BaselineSpec = tuple[str, str, int, Callable[[], Any], Callable[[], Any]]
"""(case name, kind, messages verified per receipt, warm-up call, measured call)."""


def baseline_specs(work: Workload) -> list[BaselineSpec]:
    """The baseline and the information-only verification rates, as calls to time."""
    digest_pairs = [
        (bytes.fromhex(it.receipt.digest[2:]), it.receipt.signature, it.receipt.signer) for it in work.items
    ]
    warm_pairs = [(bytes.fromhex(it.receipt.digest[2:]), it.receipt.signature, it.receipt.signer) for it in work.warmup]
    specs: list[BaselineSpec] = [
        (
            BASELINE,
            "baseline",
            1,
            lambda: recover_typed_data_eth_account(work.warmup),
            lambda: recover_typed_data_eth_account(work.items),
        ),
        (
            "info: _recover_hash(digest) only",
            "info",
            1,
            lambda: recover_digest_eth_account(warm_pairs),
            lambda: recover_digest_eth_account(digest_pairs),
        ),
    ]
    specs.append(
        (
            "info: ledger verification only, no DB (2 msgs/receipt)",
            "info",
            2,
            lambda: verify_like_the_ledger(work.warmup),
            lambda: verify_like_the_ledger(work.items),
        )
    )
    return specs


def sample_baselines(specs: Sequence[BaselineSpec], repeat: int, samples: dict[str, list[tuple[float, float]]]) -> None:
    """Time every spec ``repeat`` times (after its warm-up), appending (wall s, CPU s) to ``samples``."""
    for name, _kind, _per, warm, measure in specs:
        for _ in range(repeat):
            warm()
            samples.setdefault(name, []).append(clock(measure)[:2])


def baseline_results(
    specs: Sequence[BaselineSpec], samples: dict[str, list[tuple[float, float]]], n: int
) -> list[Result]:
    """One Result per spec: its fastest sample."""
    results = []
    for name, kind, per_receipt, _warm, _measure in specs:
        wall, cpu = min(samples[name])
        results.append(Result(name, kind, n, per_receipt * n, wall, cpu, [s[0] for s in samples[name]]))
    return results


def _settle(ledger: Ledger, items: Sequence[Item], mode: str, batch_size: int) -> None:
    """Verify, store and post ``items``: one transaction per call of the ledger."""
    if mode == "single":
        for it in items:
            ledger.record_messages([it.receipt, it.settlement])
            ledger.post(it.op.op_id, it.op.transfers, it.op.memo)
        return
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        ledger.post_batch([it.op for it in chunk], messages=[m for it in chunk for m in (it.receipt, it.settlement)])


def _setup(ledger: Ledger, work: Workload) -> None:
    """Record the Genesis, the worker's registration and assignment, faucet the consumer and escrow
    the budget (not timed)."""
    ledger.init_genesis(work.genesis, work.policy)
    ledger.record_messages([work.faucet, work.order, work.registration, work.assignment])
    ledger.post("faucet:consumer", plan_faucet(CONSUMER.address, work.budget, work.faucet.digest), memo="dev faucet")
    ledger.post(
        f"escrow:{JOB}", plan_escrow(JOB, CONSUMER.address, work.budget, work.order.digest), memo="escrow budget"
    )


def _check(ledger: Ledger, work: Workload) -> str:
    """Audit the ledger and check the balances N settlements imply; a one-line summary or AssertionError."""
    problems = ledger.audit()
    if problems:
        raise AssertionError(f"{ledger.backend}: audit found {len(problems)} problem(s): " + "; ".join(problems[:5]))
    k = len(work.all_items)
    direct = work.policy.tokenomics.mode == "direct"
    n_transfers = sum(len(it.op.transfers) for it in work.all_items)
    expected = {
        ISSUANCE: -work.budget,
        wallet_account(CONSUMER.address): 0,
        escrow_account(JOB): work.budget - k * work.payment,
        BURNED: 0 if direct else k * work.burn,
        TREASURY: k * work.treasury,
        wallet_account(WORKER.address): k * work.burn if direct else 0,
    }
    got = {acct: ledger.balance(acct) for acct in expected}
    if got != expected:
        bad = {a: (got[a], expected[a]) for a in expected if got[a] != expected[a]}
        raise AssertionError(f"{ledger.backend}: balances (got, expected) differ: {bad}")
    with ledger.engine.connect() as conn:
        n_msgs = conn.execute(select(func.count()).select_from(MessageRow.__table__)).scalar_one()
        n_rows = conn.execute(select(func.count()).select_from(TransferRow.__table__)).scalar_one()
    if (n_msgs, n_rows) != (5 + 2 * k, 2 + n_transfers):
        raise AssertionError(
            f"{ledger.backend}: {n_msgs} messages and {n_rows} transfers stored, "
            f"expected {5 + 2 * k} and {2 + n_transfers}"
        )
    return f"audit ok; {n_msgs} msgs, {n_rows} transfers, balances ok"


def settlement_case(
    url: str, work: Workload, mode: str, batch_size: int, profiler: cProfile.Profile | None = None
) -> tuple[float, float, float, str]:
    """One case on a fresh ledger at ``url``: (wall s, CPU s, audit s, check summary)."""
    ledger = Ledger(url)
    try:
        _setup(ledger, work)
        _settle(ledger, work.warmup, mode, batch_size)  # warm-up: pool, statement caches, page cache
        if profiler is not None:
            profiler.enable()
        try:
            wall, cpu, _ = clock(lambda: _settle(ledger, work.items, mode, batch_size))
        finally:
            if profiler is not None:
                profiler.disable()
        t0 = time.perf_counter()
        summary = _check(ledger, work)
        return wall, cpu, time.perf_counter() - t0, summary
    finally:
        ledger.close()


# -- databases -----------------------------------------------------------------------------


@contextmanager
def sqlite_database(tmpdir: Path, name: str) -> Iterator[str]:
    """A fresh SQLite file in ``tmpdir`` (removed with the temp directory)."""
    path = tmpdir / f"{name}-{uuid.uuid4().hex[:8]}.db"
    yield f"sqlite:///{path}"


@contextmanager
def postgres_database(base: str) -> Iterator[str]:
    """A fresh ``bench_<random>`` schema on the server at ``base``, as a URL whose search_path is it; dropped after."""
    admin = create_engine(normalize_url(base), isolation_level="AUTOCOMMIT")
    schema = "bench_" + uuid.uuid4().hex[:16]
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        url = make_url(normalize_url(base)).update_query_dict({"options": f"-csearch_path={schema}"})
        try:
            yield url.render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    finally:
        admin.dispose()


def check_postgres(base: str) -> str | None:
    """None if the server answers, else why not."""
    try:
        engine = create_engine(normalize_url(base))
        try:
            with engine.connect() as conn:
                return None if conn.execute(text("SELECT 1")).scalar_one() == 1 else "SELECT 1 failed"
        finally:
            engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means: not usable
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return f"{type(exc).__name__}: {reason[-1] if reason else ''}"


def server_version(base: str) -> str:
    engine = create_engine(normalize_url(base))
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("SHOW server_version")).scalar_one())
    finally:
        engine.dispose()


# -- profile -------------------------------------------------------------------------------

_BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("secp256k1 recovery (coincurve / libsecp256k1)", ("coincurve", "_libsecp256k1")),
    ("keccak (eth_hash / pycryptodome)", ("eth_hash", "Crypto/", "keccak", "_pysha3", "sha3")),
    ("EIP-712 build / validate / hash (gpucoin.wallet)", ("gpucoin/wallet",)),
    ("eth_utils (checksum, hex)", ("eth_utils", "eth_typing", "hexbytes")),
    ("json encode / decode", ("json/", "_json")),
    ("gpucoin.ledger (rules, state, hashes, store)", ("gpucoin/ledger", "gpucoin/money")),
    ("SQLAlchemy / sqlmodel (statement building, ORM, results)", ("sqlalchemy", "sqlmodel", "pydantic")),
    ("sqlite3 driver (execute, commit, fsync)", ("sqlite3",)),
    ("psycopg driver + wait on the server", ("psycopg",)),
    (
        "isinstance / ABC checks (rules._plain's Mapping test, ...)",
        ("builtins.isinstance", "_abc_instancecheck", "<frozen abc>"),
    ),
]

_PHASES: list[tuple[str, str, str]] = [
    ("Ledger.record_messages (verify + store messages)", "gpucoin/ledger/store.py", "record_messages"),
    ("  record.check_message (all checks, per message)", "gpucoin/ledger/record.py", "check_message"),
    ("    SignedMessage.typed_data (build + validate)", "gpucoin/wallet/messages.py", "typed_data"),
    ("    rules.canonical_json (all callers)", "gpucoin/ledger/rules.py", "canonical_json"),
    ("    eth_utils to_checksum_address (all callers)", "eth_utils/address.py", "to_checksum_address"),
    ("    MessageRow(...) construction", "MessageRow", "__init__"),
    ("    authenticity.verify_typed_message", "gpucoin/ledger/authenticity.py", "verify_typed_message"),
    ("      messages.recover_typed", "gpucoin/wallet/messages.py", "recover_typed"),
    ("        _digest_bytes (validate + EIP-712 hash)", "gpucoin/wallet/messages.py", "_digest_bytes"),
    ("        _recover_from_digest (secp256k1 + address)", "gpucoin/wallet/messages.py", "_recover_from_digest"),
    ("  record.insert_messages (admission + SQL)", "gpucoin/ledger/record.py", "insert_messages"),
    ("Ledger.post_batch (post operations)", "gpucoin/ledger/store.py", "post_batch"),
    ("  post.apply_batch", "gpucoin/ledger/post.py", "apply_batch"),
    ("    post.load_facts (what the rules read)", "gpucoin/ledger/post.py", "load_facts"),
    ("    authorize.authorize_operation", "gpucoin/ledger/authorize.py", "authorize_operation"),
    ("    rules.chain_hash", "gpucoin/ledger/rules.py", "chain_hash"),
    ("    state.apply_operation", "gpucoin/ledger/state.py", "apply_operation"),
    ("transaction commits (SQLAlchemy Connection.commit)", "sqlalchemy/engine/base.py", "_commit_impl"),
]
"""(label, file path part, function name) of the functions whose cumulative time the profile shows."""


def _bucket(filename: str, name: str) -> str:
    where = f"{filename} {name}".replace("\\", "/")
    for label, needles in _BUCKETS:
        if any(n in where for n in needles):
            return label
    return "other Python"


def profile_report(profiler: cProfile.Profile, wall: float, top: int = 20) -> str:
    """Self time grouped by library, then the top functions by self time and by cumulative time."""
    stats = pstats.Stats(profiler)
    groups: dict[str, float] = {}
    total = 0.0
    for (filename, _line, name), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        groups[_bucket(filename, name)] = groups.get(_bucket(filename, name), 0.0) + tottime
        total += tottime
    lines = [f"cumulative time of the main steps (profiled wall {wall:.2f} s, profiler overhead included):"]
    for label, path_part, func_name in _PHASES:
        hits = [
            (nc, ct)
            for (filename, _line, name), (_cc, nc, _tt, ct, _callers) in stats.stats.items()  # type: ignore[attr-defined]
            if name == func_name and path_part in filename.replace("\\", "/")
        ]
        if hits:
            calls, cum = sum(h[0] for h in hits), sum(h[1] for h in hits)
            lines.append(f"  {cum:8.3f} s  {100 * cum / wall if wall else 0:5.1f} %  {calls:7d} calls  {label}")
    lines.append(f"\nself time by library (sum {total:.2f} s):")
    for label, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {t:8.3f} s  {100 * t / total if total else 0:5.1f} %  {label}")
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).strip_dirs().sort_stats(key).print_stats(top)
        body = buf.getvalue()
        start = body.find("   ncalls")
        lines.append(f"\ntop {top} by {key}:")
        lines.append(body[start:].rstrip() if start >= 0 else body.rstrip())
    return "\n".join(lines)


# -- output --------------------------------------------------------------------------------


def print_table(results: Sequence[Result], out: Any = sys.stdout) -> None:
    headers = ["case", "receipts", "msgs verified", "seconds", "CPU s", "receipts/s", "msgs/s", "x baseline"]
    rows = []
    for r in results:
        rows.append(
            [
                r.case,
                str(r.receipts),
                str(r.messages_verified),
                f"{r.seconds:.3f}",
                f"{r.cpu_seconds:.3f}",
                f"{r.rate:,.0f}",
                f"{r.messages_verified / r.seconds:,.0f}",
                f"{r.ratio:.2f}" if r.ratio is not None else "",
            ]
        )
    print_rows(headers, rows, out=out)


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ledger.run",
        description="Ledger settlement throughput (receipts verified and posted per second) on SQLite and "
        "PostgreSQL, single and batched, next to a baseline of eth-account signature recovery alone.",
    )
    p.add_argument(
        "--receipts",
        type=int,
        default=1000,
        metavar="N",
        help="receipts settled in each timed section (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=200,
        metavar="B",
        help="receipts per batch in the batched cases (default: %(default)s)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=50,
        metavar="W",
        help="extra receipts settled untimed before each timed section (default: %(default)s)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        metavar="R",
        help="time the baseline (R times before and R times after the settlement cases) and each batched "
        "case (a fresh database each) R times and keep the fastest (default: %(default)s)",
    )
    p.add_argument(
        "--single-repeat",
        type=int,
        default=1,
        metavar="R",
        help="the same for the single cases, which are ~10x slower (default: %(default)s)",
    )
    p.add_argument(
        "--postgres",
        default=os.environ.get("GPUCOIN_BENCH_POSTGRES", DEFAULT_POSTGRES),
        metavar="URL",
        help="PostgreSQL server (a fresh bench_<random> schema per case is created and dropped) "
        "(default: $GPUCOIN_BENCH_POSTGRES or %(default)s)",
    )
    p.add_argument("--skip-postgres", action="store_true", help="measure SQLite only")
    p.add_argument(
        "--skip-single",
        action="store_true",
        help="measure only the batched cases (the single ones take most of the run's time)",
    )
    p.add_argument(
        "--policy",
        type=Path,
        default=DEFAULT_POLICY,
        help="policy TOML whose tokenomics shape the settlement (default: gpucoin/policies/default.toml)",
    )
    p.add_argument(
        "--mode",
        choices=["burn_and_mint", "direct"],
        default=None,
        help="override the policy's tokenomics.mode: BURN+TREASURY or PAY+TREASURY per settlement",
    )
    p.add_argument(
        "--payment",
        type=int,
        default=GPC,
        metavar="UGPC",
        help="µGPC charged per settled interval (default: %(default)s = 1 GPC)",
    )
    p.add_argument(
        "--min-ratio",
        type=float,
        default=0.5,
        help="batched settlement must reach this fraction of the baseline (default: %(default)s)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile a batched run per backend (done anyway for a backend below --min-ratio)",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.receipts < 1:
        p.error("--receipts must be at least 1")
    if not 1 <= args.batch_size <= MAX_BATCH // 2:
        p.error(f"--batch-size must be in [1, {MAX_BATCH // 2}] (a batch records 2 messages per receipt)")
    if args.warmup < 0 or args.repeat < 1 or args.single_repeat < 1:
        p.error("--warmup must be >= 0, --repeat and --single-repeat >= 1")
    if args.payment < 1:
        p.error("--payment must be at least 1 µGPC")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        env = ecc_environment(["SQLAlchemy", "psycopg"])
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env["loadavg_at_start"] = list(os.getloadavg())
    policy = load_policy(args.policy)
    if args.mode is not None and args.mode != policy.tokenomics.mode:
        policy = policy.model_copy(update={"tokenomics": policy.tokenomics.model_copy(update={"mode": args.mode})})
    backends = ["sqlite"] if args.skip_postgres else ["sqlite", "postgresql"]
    if "postgresql" in backends:
        problem = check_postgres(args.postgres)
        if problem is not None:
            print(
                f"error: PostgreSQL at {make_url(normalize_url(args.postgres)).render_as_string()} is not "
                f"reachable ({problem}); start it or pass --postgres URL or --skip-postgres",
                file=sys.stderr,
            )
            return 2
        env["postgresql_server"] = server_version(args.postgres)

    print(
        f"eth-account {env['eth_account']}, eth-keys {env['eth_keys']} with backend {env['eth_keys_backend']} "
        f"(coincurve {env['coincurve']}); python {env['python']}, {env['cpus']} CPUs"
    )
    t0 = time.perf_counter()
    work = build_workload(args.receipts, args.warmup, policy, args.payment)
    sign_s = time.perf_counter() - t0
    per_op = len(work.items[0].op.transfers)
    codes = "+".join(t.code.value.upper() for t in work.items[0].op.transfers)
    print(
        f"signed {len(work.all_items)} WorkReceipts + {len(work.all_items)} Settlements "
        f"({args.warmup} of each for warm-up) in {sign_s:.1f} s, untimed; tokenomics mode "
        f"{policy.tokenomics.mode}: {per_op} transfers per settlement ({codes})"
    )
    if "postgresql" in backends:
        print(f"PostgreSQL {env['postgresql_server']} at {make_url(normalize_url(args.postgres)).render_as_string()}")
    print()

    # The baseline is sampled before and after the settlement cases and the fastest sample kept,
    # so load that comes and goes on the machine during the run cannot flatter the ratio.
    specs = baseline_specs(work)
    baseline_samples: dict[str, list[tuple[float, float]]] = {}
    sample_baselines(specs, args.repeat, baseline_samples)
    print(
        f"  baseline (first {args.repeat} sample(s)): "
        f"{len(work.items) / min(baseline_samples[BASELINE])[0]:9,.0f} receipts/s",
        flush=True,
    )

    settled: list[Result] = []
    profiles: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="gpucoin-bench-") as tmp:
        tmpdir = Path(tmp)

        def database(backend: str, name: str) -> Any:
            return sqlite_database(tmpdir, name) if backend == "sqlite" else postgres_database(args.postgres)

        for backend in backends:
            for mode in ("batched",) if args.skip_single else ("single", "batched"):
                samples: list[tuple[float, float, float, str]] = []
                for _ in range(args.single_repeat if mode == "single" else args.repeat):
                    with database(backend, mode) as url:
                        samples.append(settlement_case(url, work, mode, args.batch_size))
                wall, cpu, audit_s, summary = min(samples)
                label = f"{backend} {mode}" + (f" (B={args.batch_size})" if mode == "batched" else "")
                res = Result(
                    f"settle: {label}",
                    "settlement",
                    len(work.items),
                    2 * len(work.items),
                    wall,
                    cpu,
                    [s[0] for s in samples],
                    backend,
                    mode,
                    args.batch_size if mode == "batched" else None,
                    audit_seconds=audit_s,
                    checks=summary,
                )
                settled.append(res)
                print(f"  {res.case:<34} {res.rate:9,.0f} receipts/s   [{summary}; audit {audit_s:.2f} s]", flush=True)

        sample_baselines(specs, args.repeat, baseline_samples)
        results = baseline_results(specs, baseline_samples, len(work.items)) + settled
        baseline_rate = results[0].rate
        for r in results:
            r.ratio = r.rate / baseline_rate

        failing = [
            r.backend for r in results if r.mode == "batched" and r.ratio is not None and r.ratio < args.min_ratio
        ]
        for backend in backends:
            if args.profile or backend in failing:
                profiler = cProfile.Profile()
                with database(backend, "profile") as url:
                    wall, *_ = settlement_case(url, work, "batched", args.batch_size, profiler)
                profiles[backend] = profile_report(profiler, wall)

    print()
    print_table(results)
    print()
    print("receipts/s: receipts verified and posted per second (settle rows) or receipts whose signer was recovered")
    print("per second (baseline and info rows). Settlement verifies 2 signed messages per receipt (the WorkReceipt")
    print("and its Settlement: digest recomputed from the stored typed data, signature recovered) and posts one")
    print(f"{per_op}-transfer operation per receipt; the baseline recovers 1. 'x baseline' = receipts/s over the")
    print(f"baseline's {baseline_rate:,.0f} receipts/s. single: 2 transactions per receipt (record_messages + post);")
    print(f"batched: 1 per {args.batch_size} receipts (post_batch with messages=). CPU s is this process only")
    print("(the PostgreSQL server's work is not in it).")
    for backend, report in profiles.items():
        print(f"\n== profile: {backend} batched (B={args.batch_size}, {len(work.items)} receipts) ==")
        print(report)

    verdicts = {}
    for r in results:
        if r.mode == "batched":
            ok = r.ratio is not None and r.ratio >= args.min_ratio
            verdicts[r.backend] = {"ratio": r.ratio, "min_ratio": args.min_ratio, "ok": ok}
    print()
    for backend, v in verdicts.items():
        status = "PASS" if v["ok"] else "FAIL"
        print(
            f"{status}: {backend} batched settlement runs at {v['ratio']:.2f}x the baseline (needs >= {args.min_ratio})"
        )
    total_s = time.perf_counter() - started
    env["loadavg_at_end"] = list(os.getloadavg())
    print(
        f"total {total_s:.1f} s; load average {env['loadavg_at_start'][0]:.2f} at start, "
        f"{env['loadavg_at_end'][0]:.2f} at end ({env['cpus']} CPUs: above ~0.5 the numbers are noisy)"
    )

    if args.json is not None:
        doc = {
            "benchmark": "ledger settlement vs signature recovery",
            "config": {
                "receipts": args.receipts,
                "batch_size": args.batch_size,
                "warmup": args.warmup,
                "repeat": args.repeat,
                "single_repeat": args.single_repeat,
                "backends": backends,
                "policy": str(args.policy),
                "tokenomics_mode": policy.tokenomics.mode,
                "transfers_per_settlement": per_op,
                "payment_ugpc": args.payment,
                "min_ratio": args.min_ratio,
                "postgres": make_url(normalize_url(args.postgres)).render_as_string()
                if "postgresql" in backends
                else None,
            },
            "environment": env,
            "signing_seconds": sign_s,
            "baseline_receipts_per_s": baseline_rate,
            "results": [r.as_json() for r in results],
            "verdicts": verdicts,
            "ok": all(v["ok"] for v in verdicts.values()),
            "profiles": profiles,
            "total_seconds": total_s,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")

    failed = [b for b, v in verdicts.items() if not v["ok"]]
    if failed:
        print(f"below {args.min_ratio}x the baseline: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
