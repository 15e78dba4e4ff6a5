"""Concurrency: 8 processes spend one wallet's balance at the same moment.

Each process (spawned, not forked: the parent holds connections) opens its own ``Ledger`` on the
test's database, warms its connection, waits at a shared Barrier so all of them start together,
then posts its spends and reports each outcome (``ok`` or the exception's class name) through a
Queue. The eight processes are spawned once per module and reused by its tests (importing the
ledger in eight fresh interpreters is most of the cost); each test's run opens fresh ledgers.
Exactly the affordable spends succeed, the rest fail with ``InsufficientFunds``, no balance is ever
negative (checked by replaying the stored transfers in ledger order) and the audit passes. Runs on
SQLite and on PostgreSQL (where writers serialize on the chain head row lock).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from gpucoin.ledger import Code, Ledger, Transfer, escrow_account
from tests.ledger.helpers import CONSUMER, GPC, Signer, avail, bonded, fund, open_market

N_PROCS = 8

WAIT_S = 60.0
"""Bound on every wait for a child: start-up (imports, connecting), its report, its exit."""

Plan = list[tuple[str, tuple[Transfer, ...]]]
"""One process's spends, in order: (operation id, transfers)."""


def _spender(index: int, inbox: Any, ready: Any, barrier: Any, results: Any) -> None:
    """Child process: for each ``(url, plan)`` from ``inbox`` (None ends it), open that ledger, report
    ready, wait at ``barrier`` with every other spender and the parent, post ``plan``, report outcomes.

    Puts ``(index, "ready")`` or ``(index, "error", text)`` on ``ready`` and ``(index, outcomes,
    (t_first_post, t_last_return))`` on ``results``, where each outcome is ``(op_id, "ok" | class
    name, detail)``. Module-level so that the spawn start method can import it.
    """
    while (task := inbox.get(timeout=WAIT_S * 10)) is not None:
        url, plan = task
        try:
            ledger = Ledger(url)
            ledger.balance(avail(CONSUMER))  # a warm pooled connection: the race is the posts, not the connects
        except BaseException as exc:
            ready.put((index, "error", f"{type(exc).__name__}: {exc}"))
            raise
        ready.put((index, "ready"))
        try:
            barrier.wait(WAIT_S)
            outcomes = []
            t0 = time.time()
            for op_id, transfers in plan:
                try:
                    ledger.post(op_id, transfers)
                    outcomes.append((op_id, "ok", ""))
                except Exception as exc:  # reported to the parent, which asserts on the class
                    outcomes.append((op_id, type(exc).__name__, str(exc)))
            results.put((index, outcomes, (t0, time.time())))
        finally:
            ledger.close()


class Spenders:
    """``N_PROCS`` spawned spender processes, reused by the tests of this module (spawning is the slow part).

    Each ``run`` hands every process one plan and a ledger URL; each process opens its own
    ``Ledger`` on it. Any failure kills the processes; the next ``run`` starts new ones.
    """

    def __init__(self) -> None:
        self.procs: list[Any] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # not fork: the parent holds database connections
        self.ready, self.results = ctx.Queue(), ctx.Queue()
        self.barrier = ctx.Barrier(N_PROCS + 1)  # the spenders and the parent, which releases them
        self.inboxes = [ctx.Queue() for _ in range(N_PROCS)]
        self.procs = [
            ctx.Process(
                target=_spender,
                args=(i, self.inboxes[i], self.ready, self.barrier, self.results),
                name=f"spender-{i}",
                daemon=True,
            )
            for i in range(N_PROCS)
        ]
        for p in self.procs:
            p.start()

    def run(self, url: str, plans: list[Plan]) -> tuple[dict[str, tuple[str, str]], list[tuple[float, float]]]:
        """Run ``plans`` (one per process) against ``url``, all released at once; every wait is bounded.

        Returns:
            The outcome of every operation id (class name or ``"ok"``, and the error text), and each
            process's (first post started, last post returned) wall-clock times.
        """
        assert len(plans) == N_PROCS
        if not self.procs:
            self._start()
        outcomes: dict[str, tuple[str, str]] = {}
        windows: list[tuple[float, float]] = []
        try:
            for inbox, plan in zip(self.inboxes, plans, strict=True):
                inbox.put((url, plan))
            for _ in plans:
                msg = self.ready.get(timeout=WAIT_S)
                assert msg[1] == "ready", f"spender {msg[0]} failed to open the ledger: {msg[2]}"
            self.barrier.wait(WAIT_S)  # everyone is connected and waiting: release them together
            for _ in plans:
                index, got, window = self.results.get(timeout=WAIT_S)
                outcomes.update({op_id: (what, detail) for op_id, what, detail in got})
                windows.append(window)
        except BaseException:
            self.close()
            raise
        return outcomes, windows

    def close(self) -> None:
        """Stop the processes: ask them to end, wait a bounded time, kill any left."""
        procs, self.procs = self.procs, []
        for p, inbox in zip(procs, self.inboxes, strict=False):
            if p.is_alive():
                inbox.put(None)
        deadline = time.monotonic() + 10
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        for q in (self.ready, self.results, *self.inboxes) if procs else ():
            q.close()
            q.cancel_join_thread()


@pytest.fixture(scope="module")
def spenders() -> Iterator[Spenders]:
    pool = Spenders()
    try:
        yield pool
    finally:
        pool.close()


def max_in_flight(windows: list[tuple[float, float]]) -> int:
    """Most processes that were inside their posts at one moment."""
    events = sorted([(t0, 1) for t0, _ in windows] + [(t1, -1) for _, t1 in windows])
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def assert_never_negative(ledger: Ledger, account: str) -> None:
    """Replay every transfer touching ``account`` in ledger order: its running balance never dips below 0."""
    running = 0
    for t in ledger.transfers(account):
        running += t.amount if t.credit == account else -t.amount
        assert running >= 0, f"{account} went to {running} µGPC at transfer {t.id}"
    assert running == ledger.balance(account)


def test_eight_processes_spend_the_same_balance_once(ledger_url: str, spenders: Spenders) -> None:
    """8 escrows of X at once against 5 X: exactly 5 succeed, 3 get InsufficientFunds, the wallet ends at 0."""
    x = 7 * GPC
    affordable = 5
    s = Signer()
    ledger = open_market(ledger_url, time.time)  # the spenders post on the real clock
    try:
        fund(ledger, s, CONSUMER, affordable * x, "faucet-consumer")
        orders = [s.order(budget=x, job=f"job-{i}") for i in range(N_PROCS)]
        assert ledger.record_messages(orders) == N_PROCS
        plans = [
            [(f"escrow-{i}", (Transfer(avail(CONSUMER), escrow_account(f"job-{i}"), x, Code.ESCROW, o.digest),))]
            for i, o in enumerate(orders)
        ]

        outcomes, windows = spenders.run(ledger_url, plans)

        kinds = Counter(what for what, _ in outcomes.values())
        assert kinds == {"ok": affordable, "InsufficientFunds": N_PROCS - affordable}, outcomes
        assert max_in_flight(windows) >= 2, windows  # the posts really raced
        print(f"{max_in_flight(windows)} of {N_PROCS} posts in flight at once; {dict(kinds)}")
        assert ledger.balance(avail(CONSUMER)) == 0
        for i in range(N_PROCS):
            won = outcomes[f"escrow-{i}"][0] == "ok"
            assert ledger.balance(escrow_account(f"job-{i}")) == (x if won else 0)
            assert (ledger.operation(f"escrow-{i}") is not None) == won
        assert len(ledger.transfers()) == 1 + affordable
        assert all(b >= 0 for name, b in ledger.balances().items() if name != "system:issuance")
        assert_never_negative(ledger, avail(CONSUMER))
        assert ledger.audit() == []
    finally:
        ledger.close()


def test_eight_processes_each_spending_in_a_loop_drain_exactly_the_balance(ledger_url: str, spenders: Spenders) -> None:
    """8 processes x 10 bonds of 1 µGPC against 37 µGPC: exactly 37 succeed in total."""
    balance, attempts = 37, 10
    s = Signer()
    ledger = open_market(ledger_url, time.time)  # the spenders post on the real clock
    try:
        fund(ledger, s, CONSUMER, balance, "faucet-consumer")
        regs = [[s.registration(1, who=CONSUMER, node=f"n{i}-{k}") for k in range(attempts)] for i in range(N_PROCS)]
        ledger.record_messages([r for row in regs for r in row])  # one registration authorizes one bond
        plans = [
            [
                (f"bond-{i}-{k}", (Transfer(avail(CONSUMER), bonded(CONSUMER), 1, Code.BOND, regs[i][k].digest),))
                for k in range(attempts)
            ]
            for i in range(N_PROCS)
        ]

        outcomes, windows = spenders.run(ledger_url, plans)

        assert len(outcomes) == N_PROCS * attempts
        kinds = Counter(what for what, _ in outcomes.values())
        assert kinds == {"ok": balance, "InsufficientFunds": N_PROCS * attempts - balance}, kinds
        assert max_in_flight(windows) >= 2, windows
        won = {op_id for op_id, (what, _) in outcomes.items() if what == "ok"}
        print(
            f"{max_in_flight(windows)} of {N_PROCS} processes posting at once; {dict(kinds)}; "
            f"per process: {sorted(Counter(op.split('-')[1] for op in won).values())}"
        )
        assert ledger.balance(avail(CONSUMER)) == 0
        assert ledger.balance(bonded(CONSUMER)) == balance
        stored = {t.op_id for t in ledger.transfers()} - {"faucet-consumer"}
        assert stored == won
        assert_never_negative(ledger, avail(CONSUMER))
        assert ledger.audit() == []
    finally:
        ledger.close()
