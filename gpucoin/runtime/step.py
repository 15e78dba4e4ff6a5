"""One rank's share of one training step, as the ranks run it and replay re-runs it: one definition.

Replay is exact only while it does what the ranks did, so what both do is written once, here:
the learning rate of the step (``schedule.lr_at``), then for each of the
``gradient_accumulation_steps`` micro-steps the micro-batch of (seed, step, rank, micro-step)
(``data_order``), a forward pass, and a backward pass of the loss divided by the accumulation
steps (the gradient of this rank's share of the global batch). Where the backward goes is the
caller's: into DeepSpeed's engine on a rank (which reduces and steps), into the plain model on
replay (which then averages the ranks itself, as the all-reduce does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gpucoin.runtime.data_order import micro_batch, window_offsets
from gpucoin.runtime.schedule import lr_at
from gpucoin.spec import JobSpec

Batch = tuple  # (x, y): (B, T) int64 token ids and their (B, T) next tokens
OnBatch = Callable[[object, object, int, int], Batch]
"""``on_batch(x, y, step, rank) -> (x, y)``: what the rank actually trains on (a fault's hook;
honest ranks and replay pass none)."""


@dataclass(frozen=True)
class RankStep:
    """What one rank's share of one step computed.

    Attributes:
        loss: the mean of its micro-steps' losses (the step's training loss, nats per token).
        samples: sequences it trained on (``micro_batch_size`` x accumulation steps).
    """

    loss: float
    samples: int


def set_lr(param_groups: Iterable[dict], spec: JobSpec, step: int) -> float:
    """Set the schedule's learning rate of ``step`` (0-based) on every param group; return it."""
    opt = spec.deepspeed.optimizer
    lr = lr_at(step, spec.steps, opt.lr, opt.min_lr, opt.warmup_steps)
    for group in param_groups:
        group["lr"] = lr
    return lr


def rank_step(
    spec: JobSpec,
    train,
    step: int,
    rank: int,
    forward: Callable[[object, object], object],
    backward: Callable[[object], None],
    on_batch: OnBatch | None = None,
) -> RankStep:
    """Run rank ``rank``'s micro-steps of ``step`` on the corpus ``train`` (1-D int64 tensor).

    Args:
        forward: ``(x, y) -> loss``, x and y (B, T) on the CPU; the loss a scalar tensor, the mean
            cross-entropy over the micro-batch.
        backward: takes the loss divided by the accumulation steps and back-propagates it
            (a rank's DeepSpeed engine: ``backward(..., scale_wrt_gas=False)`` then ``step()``).
        on_batch: a fault's hook on the micro-batch (None: honest).

    Returns:
        The ``RankStep``.
    """
    ds, T = spec.deepspeed, spec.model.block_size
    gas = ds.gradient_accumulation_steps
    loss_sum, samples = 0.0, 0
    for micro in range(gas):
        offsets = window_offsets(spec.seed, step, rank, micro, ds.micro_batch_size, len(train), T)
        x, y = micro_batch(train, offsets, T)  # (B, T), (B, T)
        if on_batch is not None:
            x, y = on_batch(x, y, step, rank)
        loss = forward(x, y)
        backward(loss / gas)
        loss_sum += loss.item() / gas
        samples += ds.micro_batch_size
    return RankStep(loss=loss_sum, samples=samples)
