"""Crash safety: a writer killed with SIGKILL in the middle of a batch leaves no half-applied operation.

A child process (``tests/ledger/crash_worker.py``) posts batches of ``BATCH_SIZE`` operations, each
operation four linked transfers (three faucet mints and a bond that spends one of them), one
``post_batch`` (one database transaction) per batch. The test reads its ``begin``/``done`` lines,
kills it with SIGKILL a seeded fraction of a measured batch duration after a ``begin``, and then,
on a freshly opened ledger, checks: whole batches or nothing, every stored operation with all its
transfer rows, balances exactly those of the committed batches, a clean audit. It does this three
times (each restart re-posts every batch from the first: the committed ones are retries), and
finally posts every batch to completion in-process: the operations committed before keep their
original transfer ids and nothing is counted twice. Runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from sqlmodel import Session, select

from gpucoin.ledger import Ledger
from gpucoin.ledger.models import OperationRow
from tests.ledger import crash_worker as cw
from tests.ledger.helpers import open_market

REPO = Path(__file__).resolve().parents[2]

KILLS = 3
"""How many times a child is killed mid-batch (the k-th kill follows ``begin {FIRST_KILL_BATCH + k}``)."""

FIRST_KILL_BATCH = 2
"""Batch whose ``begin`` the first kill follows: batches before it give the measured batch duration."""

LINE_TIMEOUT_S = 60.0
"""Longest wait for one line of the child (imports and a batch take a few seconds at most)."""


def _start(url: str, stderr: Path) -> tuple[subprocess.Popen[str], queue.Queue[str | None], threading.Thread]:
    """Start a crash worker on ``url``; its stdout lines arrive on the queue (None at EOF), read by the thread.

    Its stderr goes to the file ``stderr`` (a pipe nobody reads could fill up and stall it).
    """
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.ledger.crash_worker", url],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.strip())
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    return proc, lines, reader


def _next_line(proc: subprocess.Popen[str], lines: queue.Queue[str | None], stderr: Path) -> tuple[str, float]:
    """The child's next line and when it arrived (monotonic s); fails on EOF or timeout."""
    try:
        line = lines.get(timeout=LINE_TIMEOUT_S)
    except queue.Empty:
        raise AssertionError(f"crash worker printed nothing for {LINE_TIMEOUT_S} s") from None
    if line is None:
        proc.wait(timeout=LINE_TIMEOUT_S)
        err = stderr.read_text()
        raise AssertionError(f"crash worker ended early (rc {proc.returncode}):\n{err}")
    return line, time.monotonic()


def _stored_operations(ledger: Ledger) -> dict[str, OperationRow]:
    with Session(ledger.engine) as s:
        return {o.op_id: o for o in s.exec(select(OperationRow)).all()}


def _check_crash_state(ledger: Ledger, killed_in: int) -> tuple[int, dict[str, list[int]]]:
    """Assert the ledger after a kill during batch ``killed_in`` holds whole batches only.

    Returns:
        How many batches are committed (``killed_in`` if the kill landed before the commit,
        ``killed_in + 1`` if after it), and each stored operation's transfer ids.
    """
    ops = _stored_operations(ledger)
    per_batch = Counter(int(op_id.split("-")[1]) for op_id in ops)
    n_committed = len(per_batch)
    # whole batches, and a prefix of them: 0 .. n_committed - 1, each with every operation
    assert sorted(per_batch) == list(range(n_committed)), per_batch
    assert set(per_batch.values()) <= {cw.BATCH_SIZE}, per_batch
    assert len(ops) % cw.BATCH_SIZE == 0
    assert n_committed in (killed_in, killed_in + 1), (n_committed, killed_in)

    # every stored operation has all of its transfer rows, with contiguous ids, and no row is orphaned
    rows = ledger.transfers()
    by_op: dict[str, list[int]] = defaultdict(list)
    for t in rows:
        by_op[t.op_id].append(t.id)
    assert set(by_op) == set(ops)
    for op_id, op in ops.items():
        assert op.n_transfers == cw.TRANSFERS_PER_OP
        assert by_op[op_id] == list(range(op.first_transfer_id, op.first_transfer_id + op.n_transfers)), op_id
    assert [t.id for t in rows] == list(range(1, len(ops) * cw.TRANSFERS_PER_OP + 1))

    assert ledger.balances() == cw.expected_balances(n_committed)
    assert ledger.audit() == []
    return n_committed, dict(by_op)


def test_sigkill_mid_batch_leaves_whole_batches_and_retries_are_idempotent(ledger_url: str, tmp_path: Path) -> None:
    rng = random.Random(20240611)
    open_market(ledger_url).close()  # the Genesis; each batch records its own messages

    ids_seen: dict[str, list[int]] = {}  # op id -> transfer ids, as read after each crash
    durations: list[float] = []  # measured begin -> done of fresh batches
    mid_batch = 0  # kills that landed before the batch committed
    for k in range(KILLS):
        kill_batch = FIRST_KILL_BATCH + k
        stderr = tmp_path / f"worker-{k}.err"
        proc, lines, reader = _start(ledger_url, stderr)
        try:
            line, _ = _next_line(proc, lines, stderr)
            assert line == "ready", line
            begun_at: dict[int, float] = {}
            while True:
                line, at = _next_line(proc, lines, stderr)
                word, num, *rest = line.split()
                b = int(num)
                if word == "begin":
                    begun_at[b] = at
                    if b == kill_batch:
                        break
                    continue
                assert word == "done", line
                first, last = map(int, rest)
                if k == 0:  # every batch of the first run is fresh
                    durations.append(at - begun_at[b])
                else:  # a batch committed before is a retry: the original ids come back
                    ids = [i for n in range(cw.BATCH_SIZE) for i in ids_seen.get(f"op-{b}-{n}", [])]
                    if ids:
                        assert (first, last) == (ids[0], ids[-1]), (b, first, last)
            delay = rng.uniform(0.1, 0.75) * min(durations)
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=LINE_TIMEOUT_S) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=LINE_TIMEOUT_S)
            reader.join(timeout=LINE_TIMEOUT_S)  # EOF follows the child's death
            if proc.stdout is not None and not reader.is_alive():
                proc.stdout.close()

        ledger = Ledger(ledger_url)  # "after restart": a fresh engine, as a new process would open it
        try:
            n_committed, by_op = _check_crash_state(ledger, kill_batch)
        finally:
            ledger.close()
        mid_batch += n_committed == kill_batch
        for op_id, ids in ids_seen.items():  # nothing committed before a crash changes in a later one
            assert by_op[op_id] == ids, op_id
        ids_seen = by_op
        print(
            f"kill {k}: {delay * 1000:.0f} ms into batch {kill_batch} "
            f"(batches take {min(durations) * 1000:.0f}-{max(durations) * 1000:.0f} ms); "
            f"{n_committed} batches committed"
        )

    # at least one kill must have hit the open transaction (a kill that lands just after the commit
    # is legal, but then the test would not show what it is meant to)
    assert mid_batch >= 1, f"no kill landed mid-batch (batch durations {durations})"

    # re-run every batch to completion: the committed operations are idempotent retries
    digests = [m.digest for m in cw.messages()]
    ledger = Ledger(ledger_url)
    try:
        for b in range(cw.N_BATCHES):
            ops = cw.batch(b, digests)
            result = ledger.post_batch(ops, messages=cw.batch_messages(b))
            for op, ids in zip(ops, result, strict=True):
                if op.op_id in ids_seen:
                    assert ids == ids_seen[op.op_id], op.op_id
                assert len(ids) == cw.TRANSFERS_PER_OP
        stored = _stored_operations(ledger)
        assert len(stored) == cw.N_BATCHES * cw.BATCH_SIZE
        n_rows = cw.N_BATCHES * cw.BATCH_SIZE * cw.TRANSFERS_PER_OP
        assert [t.id for t in ledger.transfers()] == list(range(1, n_rows + 1))
        assert ledger.balances() == cw.expected_balances(cw.N_BATCHES)  # nothing double-counted
        assert ledger.audit() == []

        # and once more, all of it: nothing changes
        again = [ledger.post_batch(cw.batch(b, digests), messages=cw.batch_messages(b)) for b in range(cw.N_BATCHES)]
        assert [i for r in again for ids in r for i in ids] == list(range(1, n_rows + 1))
        assert ledger.balances() == cw.expected_balances(cw.N_BATCHES)
        assert len(ledger.transfers()) == n_rows
    finally:
        ledger.close()
