"""Cheat injection, for tests and demos: a rank that departs from the honest step at one of three points.

A cheat is an object with any of these methods, which ``runtime.step.rank_step`` calls at the
points an honest rank computes the same things, in this order:

- ``on_batch(x, y, step, rank) -> (x, y)``: the micro-batch the rank actually trains on
  (x, y: (B, T) int64 token ids and next tokens);
- ``on_grads(grads, step, rank) -> grads``: ``grads`` maps each parameter name to this step's
  local gradient (the parameter's shape), summed over the micro-steps; what it returns is what
  the rank feeds into the all-reduce, and what its sketch is taken of;
- ``on_commit(sketch, step, rank) -> sketch``: the (B,) float64 sketch it commits to.

and optionally ``bind(ctx)``, called once with a ``CheatContext`` before the first step. A
``--cheat MODULE:NAME`` names a cheat object or a class (instantiated with no arguments); a
bare NAME is one of the strategies shipped here (``SHIPPED``), one per way of cheating that
SPEC.md's verification must catch. (torch is imported where a cheat runs, so that the CLI can
name the strategies without it.)
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gpucoin.runtime.data_order import micro_batch, window_offsets
from gpucoin.spec import JobSpec

CHEAT_REF = re.compile(r"^(?:(?P<module>[A-Za-z_][\w.]*):)?(?P<name>[A-Za-z_]\w*)$")
"""``MODULE:NAME`` or a shipped strategy's bare ``NAME``."""


@dataclass(frozen=True)
class CheatContext:
    """What a cheat may know about the job it cheats in (``bind``).

    Attributes:
        spec: the job spec (workers, seed, micro-batch, accumulation).
        train: the train split, (N,) token ids, as every rank reads it.
        names: the model's parameter names, in order (``runtime.step.job_parameters``).
        sketch: ``grads -> (B,) float64``, the job's count-sketch of one gradient per parameter (in
            ``names``' order), as an honest rank commits it.
    """

    spec: JobSpec
    train: object
    names: tuple[str, ...]
    sketch: Callable[[Sequence[object]], np.ndarray]


class ZeroGradient:
    """Skips the work: feeds (and commits to) a zero gradient."""

    def on_grads(self, grads: dict, step: int, rank: int) -> dict:
        import torch

        return {n: torch.zeros_like(g) for n, g in grads.items()}


class RandomGradient:
    """Skips the work: feeds (and commits to) noise of the honest gradient's norm per parameter,
    seeded by (step, rank) so a rerun cheats the same."""

    def on_grads(self, grads: dict, step: int, rank: int) -> dict:
        import torch

        gen = torch.Generator().manual_seed(1_000_003 * step + rank)
        out = {}
        for n, g in grads.items():
            noise = torch.randn(g.shape, generator=gen, dtype=g.dtype)
            out[n] = noise * (g.norm() / noise.norm().clamp_min(1e-12))
        return out


class HalfBatch:
    """Does half the work: trains on the first half of each micro-batch."""

    def on_batch(self, x, y, step: int, rank: int):
        half = max(1, x.shape[0] // 2)
        return x[:half], y[:half]


class StaleGradient:
    """Reuses work: from the second step it trains on, feeds (and commits to) the gradient it
    computed the step before instead of this step's."""

    def __init__(self) -> None:
        self.last: dict | None = None

    def on_grads(self, grads: dict, step: int, rank: int) -> dict:
        stale, self.last = self.last, {n: g.clone() for n, g in grads.items()}
        return grads if stale is None else stale


class CopiedCommitment:
    """Copies a co-worker: trains on the micro-batches of rank ``(rank + 1) % workers`` (its
    gradient and commitment are that rank's), so its own share of the global batch is never
    computed."""

    def bind(self, ctx: CheatContext) -> None:
        self.ctx, self.micro, self.at = ctx, 0, None

    def on_batch(self, x, y, step: int, rank: int):
        spec = self.ctx.spec
        ds, T = spec.deepspeed, spec.model.block_size
        self.micro = self.micro + 1 if self.at == step else 0
        self.at = step
        other = (rank + 1) % spec.workers
        offsets = window_offsets(spec.seed, step, other, self.micro, ds.micro_batch_size, len(self.ctx.train), T)
        return micro_batch(self.ctx.train, offsets, T)


class HonestCommitmentOtherGradient:
    """The cheat no sketch pins on one rank: commits the sketch of its honest gradient but feeds
    the reduction another (zero) one. Every rank's weights then diverge at the next step, and the
    all-reduced sum does not say whose share was wrong (docs/verification.md, Blame)."""

    def bind(self, ctx: CheatContext) -> None:
        self.ctx = ctx
        self.honest: np.ndarray | None = None

    def on_grads(self, grads: dict, step: int, rank: int) -> dict:
        import torch

        self.honest = self.ctx.sketch([grads[n] for n in self.ctx.names])
        return {n: torch.zeros_like(g) for n, g in grads.items()}

    def on_commit(self, sketch: np.ndarray, step: int, rank: int) -> np.ndarray:
        return self.honest


SHIPPED: dict[str, type] = {
    "zero_gradient": ZeroGradient,
    "random_gradient": RandomGradient,
    "half_batch": HalfBatch,
    "stale_gradient": StaleGradient,
    "copied_commitment": CopiedCommitment,
    "honest_commitment_other_gradient": HonestCommitmentOtherGradient,
}
"""The shipped strategies by the bare name ``--cheat`` takes."""

HOOKS = ("on_batch", "on_grads", "on_commit")


def check_ref(ref: str) -> str:
    """``ref`` if it is a shipped name or ``MODULE:NAME`` (nothing imported).

    Raises:
        ValueError: neither, with the shipped names.
    """
    m = CHEAT_REF.match(ref)
    if m is None or (m["module"] is None and m["name"] not in SHIPPED):
        raise ValueError(f"--cheat must be MODULE:NAME or one of {', '.join(SHIPPED)}; got {ref!r}")
    return ref


def load_cheat(ref: str):
    """The cheat ``ref`` names (``check_ref``), a class instantiated.

    Raises:
        ValueError: a malformed reference, or an object with none of the hooks.
        ImportError / AttributeError: no such module or name.
    """
    m = CHEAT_REF.match(check_ref(ref))
    obj = SHIPPED[m["name"]] if m["module"] is None else getattr(importlib.import_module(m["module"]), m["name"])
    if not any(callable(getattr(obj, h, None)) for h in HOOKS):
        raise ValueError(f"cheat {ref!r} has none of {', '.join(HOOKS)}")
    return obj() if isinstance(obj, type) else obj
