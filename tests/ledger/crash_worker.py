"""Child process of ``tests/ledger/test_crash.py``: posts deterministic operation batches to a ledger.

Run as ``python -m tests.ledger.crash_worker URL`` from the repository root. It opens the ledger,
prints ``ready``, then for each batch ``b`` in ``range(N_BATCHES)`` prints ``begin b``, posts the
batch with one ``Ledger.post_batch`` (one database transaction) and prints ``done b FIRST LAST``
(the first and last transfer id the batch returned); every line is flushed at once. The test kills
it with SIGKILL between a ``begin`` and its ``done``.

Everything is deterministic: the operation ids (``op-{batch}-{i}``), the transfers and their
amounts, and the signed messages (fixed keys and nonces; eth-account signatures are RFC 6979, so
re-signing gives the identical digest), so a re-run after a crash posts exactly the same content
under the same ids; each batch records its messages in its own transaction.
"""

from __future__ import annotations

import functools
import sys
from collections import Counter

from gpucoin.ledger import ISSUANCE, Code, Ledger, Operation, Transfer
from gpucoin.wallet.messages import SignedMessage
from tests.ledger.helpers import CONSUMER, VERIFIER, WORKER, Signer, avail, bonded

BATCH_SIZE = 200
"""Operations per batch (each with its own four signed messages: one message authorizes one operation)."""

N_BATCHES = 5
"""Batches a full run posts."""

TRANSFERS_PER_OP = 4
"""Linked transfers in every operation (three faucet mints and a bond that spends one of them)."""


@functools.lru_cache(maxsize=1)
def messages() -> list[SignedMessage]:
    """The signed messages the transfers cite, four per operation in batch order: a Faucet to each
    of consumer, worker and verifier, and a NodeRegistration of the worker whose stake is the bond."""
    s = Signer(start=9000)
    out: list[SignedMessage] = []
    for b in range(N_BATCHES):
        for i in range(BATCH_SIZE):
            c, w, v, bond = amounts(b, i)
            out += [s.faucet(CONSUMER, c), s.faucet(WORKER, w), s.faucet(VERIFIER, v), s.registration(bond, who=WORKER)]
    return out


def batch_messages(b: int) -> list[SignedMessage]:
    """The messages batch ``b`` cites, recorded in the same transaction as its operations (as the
    coordinator records a decision with the operation it authorizes)."""
    return messages()[4 * b * BATCH_SIZE : 4 * (b + 1) * BATCH_SIZE]


def amounts(b: int, i: int) -> tuple[int, int, int, int]:
    """µGPC minted to consumer, worker and verifier, and bonded by the worker, in op ``i`` of batch ``b``."""
    k = b * BATCH_SIZE + i
    to_worker = 10 + k % 13
    return 1 + k % 7, to_worker, 3 + k % 5, 1 + k % to_worker  # the bond spends part of this op's mint


def batch(b: int, digests: list[str]) -> list[Operation]:
    """The operations of batch ``b``; ``digests`` are those of ``messages()``, in order."""
    consumer, worker, verifier, worker_bonded = avail(CONSUMER), avail(WORKER), avail(VERIFIER), bonded(WORKER)
    ops = []
    for i in range(BATCH_SIZE):
        c, w, v, bond = amounts(b, i)
        faucet_c, faucet_w, faucet_v, reg = digests[4 * (b * BATCH_SIZE + i) :][:4]
        transfers = (
            Transfer(ISSUANCE, consumer, c, Code.FAUCET, faucet_c),
            Transfer(ISSUANCE, worker, w, Code.FAUCET, faucet_w),
            Transfer(ISSUANCE, verifier, v, Code.FAUCET, faucet_v),
            Transfer(worker, worker_bonded, bond, Code.BOND, reg),
        )
        ops.append(Operation(f"op-{b}-{i}", transfers, memo=f"batch {b} op {i}"))
    return ops


def expected_balances(n_batches: int) -> dict[str, int]:
    """Every account's balance once batches ``0 .. n_batches - 1`` were each applied exactly once."""
    consumer, worker, verifier, worker_bonded = avail(CONSUMER), avail(WORKER), avail(VERIFIER), bonded(WORKER)
    bal: Counter[str] = Counter()
    for b in range(n_batches):
        for i in range(BATCH_SIZE):
            c, w, v, bond = amounts(b, i)
            bal[ISSUANCE] -= c + w + v
            bal[consumer] += c
            bal[worker] += w - bond
            bal[verifier] += v
            bal[worker_bonded] += bond
    return dict(bal)


def main(argv: list[str]) -> int:
    url = argv[0]
    digests = [m.digest for m in messages()]
    ledger = Ledger(url)
    print("ready", flush=True)
    for b in range(N_BATCHES):
        ops = batch(b, digests)  # built before ``begin``: the window between the lines is the post alone
        msgs = batch_messages(b)
        print(f"begin {b}", flush=True)
        ids = ledger.post_batch(ops, messages=msgs)
        print(f"done {b} {ids[0][0]} {ids[-1][-1]}", flush=True)
    ledger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
