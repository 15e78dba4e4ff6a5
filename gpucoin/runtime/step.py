"""One rank's share of one training step, as the ranks run it and replay re-runs it: one definition.

Replay is exact only while it does what the ranks did, so what both do is written once, here:
the learning rate of the step (``schedule.lr_at``), then for each of the
``gradient_accumulation_steps`` micro-steps the micro-batch of (seed, step, rank, micro-step)
(``data_order``), a forward pass and the gradient of the loss divided by the accumulation steps,
summed over the micro-steps (``torch.autograd.grad``: this rank's local gradient of its share of
the global batch); then the count-sketch of that gradient, which the rank commits to. Where the
gradient goes is the caller's: into the all-reduce on a rank (``surrogate_loss`` through
DeepSpeed's engine, which reduces and steps), into the parameters' ``.grad`` on replay (which
then averages the ranks itself, as the all-reduce does).

A cheat (``runtime.cheats``; tests and demos) departs from this at three points only: the
micro-batch it trains on (``on_batch``), the gradient it feeds into the reduction
(``on_grads``) and the sketch it commits (``on_commit``), in that order; the sketch is taken of
what ``on_grads`` returned. An honest rank and replay pass no cheat and take the same path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gpucoin.runtime.data_order import micro_batch, window_offsets
from gpucoin.runtime.schedule import lr_at
from gpucoin.runtime.sketch import CountSketch
from gpucoin.spec import JobSpec


@dataclass(frozen=True)
class RankStep:
    """What one rank's share of one step computed.

    Attributes:
        loss: the mean of its micro-steps' losses (the step's training loss, nats per token).
        samples: sequences it trained on (``micro_batch_size`` x accumulation steps).
        grads: its local gradient, one tensor per parameter (the parameters' shapes, in their
            order): what it feeds into the reduction.
        sketch: (B,) float64, the count-sketch it commits to for this step.
    """

    loss: float
    samples: int
    grads: list[torch.Tensor]
    sketch: np.ndarray


def job_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters a rank differentiates, sketches and feeds into the reduction, in the model's
    order (``named_parameters()``, the ones ``CountSketch`` is built over).

    Raises:
        ValueError: a parameter that does not require a gradient: the verifier lays out every
            parameter of the ZeRO partitions and the initial state (``verify.consolidate``), which
            DeepSpeed builds over the trainable ones only, so a frozen one is refused up front.
    """
    params = list(model.named_parameters())
    frozen = [n for n, p in params if not p.requires_grad]
    if frozen:
        raise ValueError(f"frozen parameters are not supported (replay lays out every parameter): {frozen[:5]}")
    return params


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
    params: Sequence[tuple[str, torch.nn.Parameter]],
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sketch: CountSketch,
    cheat=None,
) -> RankStep:
    """Run rank ``rank``'s micro-steps of ``step`` on the corpus ``train`` (1-D int64 tensor).

    Args:
        params: ``job_parameters(model)``, the ones ``sketch`` was built over.
        forward: ``(x, y) -> loss``, x and y (B, T) on the CPU; the loss a scalar tensor, the mean
            cross-entropy over the micro-batch.
        sketch: the job's count-sketch (``runtime.sketch``).
        cheat: a ``runtime.cheats.Cheat`` (None: honest, as replay always is).

    Returns:
        The ``RankStep``. No parameter's ``.grad`` is touched.

    Raises:
        ValueError: a cheat's ``on_grads`` returned gradients of other names or shapes (its dtype
            and device are made the parameter's).
    """
    ds, T = spec.deepspeed, spec.model.block_size
    gas = ds.gradient_accumulation_steps
    tensors = [p for _, p in params]
    grads = [torch.zeros_like(p) for p in tensors]
    loss_sum, samples = 0.0, 0
    for micro in range(gas):
        offsets = window_offsets(spec.seed, step, rank, micro, ds.micro_batch_size, len(train), T)
        x, y = micro_batch(train, offsets, T)  # (B, T), (B, T)
        if cheat is not None and hasattr(cheat, "on_batch"):
            x, y = cheat.on_batch(x, y, step, rank)
        loss = forward(x, y)
        local = torch.autograd.grad(loss / gas, tensors, allow_unused=True)
        for g, d in zip(grads, local, strict=True):
            if d is not None:
                g.add_(d)
        loss_sum += loss.item() / gas
        samples += ds.micro_batch_size
    if cheat is not None and hasattr(cheat, "on_grads"):
        grads = _checked(cheat.on_grads(dict(zip((n for n, _ in params), grads, strict=True)), step, rank), params)
    committed = sketch.sketch_grads(grads)
    if cheat is not None and hasattr(cheat, "on_commit"):
        committed = np.asarray(cheat.on_commit(committed, step, rank), dtype=np.float64)
    return RankStep(loss=loss_sum, samples=samples, grads=grads, sketch=committed)


def engine_step(engine, spec: JobSpec, train, step: int, rank: int, params, sketch: CountSketch, cheat=None):
    """One optimizer step of rank ``rank`` through DeepSpeed's ``engine``: the schedule's learning
    rate, ``rank_step``, its gradient fed into the all-reduce exactly (``surrogate_loss``), then
    DeepSpeed's reduction, clipping and AdamW step. What a rank runs (``runtime.worker``) and what
    ``verify.calibrate`` trains with.

    Args:
        params: ``job_parameters(engine.module)``.

    Raises:
        ValueError: an engine not configured as ``runtime.dsconfig`` does (one accumulation step,
            fp32), on which feeding the gradient this way would not be what replay recomputes.

    Returns:
        (``RankStep``, the learning rate it stepped with).
    """
    # the forward below bypasses the engine's, whose output hooks run ZeRO's backward prologue; that
    # is safe only where every backward is a boundary and nothing is scaled: one accumulation step, fp32
    if engine.gradient_accumulation_steps() != 1 or engine.fp16_enabled() or engine.bfloat16_enabled():
        raise ValueError(
            f"the engine must run one accumulation step in fp32 (runtime.dsconfig), got "
            f"{engine.gradient_accumulation_steps()} steps, fp16 {engine.fp16_enabled()}, bf16 {engine.bfloat16_enabled()}"
        )
    lr = set_lr(engine.optimizer.param_groups, spec, step)
    device = engine.device

    def forward(x, y):  # (B, T), (B, T) -> the micro-batch's mean loss
        # the module itself, not the engine: DeepSpeed 0.19's forward hooks its outputs to run its reduction
        # epilogue when their backward ends, which fired on rank_step's autograd.grad (the gradient reaches
        # DeepSpeed through engine.backward of the surrogate below, which runs the epilogue itself)
        return engine.module(x.to(device), y.to(device))[1]

    done = rank_step(spec, train, step, rank, params, forward, sketch, cheat)
    engine.backward(surrogate_loss([p for _, p in params], done.grads))
    engine.step()  # all-reduce, clip, AdamW
    return done, lr


def surrogate_loss(params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """A scalar whose gradient with respect to each parameter is exactly its ``grads`` entry:
    sum_i <p_i, g_i> with the g_i constant (d/dp_i = 1.0 x g_i, no rounding). Its backward through
    DeepSpeed's engine feeds ``grads`` into the all-reduce from the hooks ZeRO-2 reduces in."""
    return torch.stack([(p * g.detach()).sum() for p, g in zip(params, grads, strict=True)]).sum()


def _checked(returned: dict, params: Sequence[tuple[str, torch.nn.Parameter]]) -> list[torch.Tensor]:
    names = [n for n, _ in params]
    if not isinstance(returned, dict) or sorted(returned) != sorted(names):
        raise ValueError(f"on_grads must return a gradient for each of the {len(names)} parameters and nothing else")
    out = []
    for name, p in params:
        g = returned[name]
        if not isinstance(g, torch.Tensor) or g.shape != p.shape:
            raise ValueError(f"on_grads must return a gradient of shape {tuple(p.shape)} for {name!r}, got {g!r:.80}")
        out.append(g.detach().to(device=p.device, dtype=p.dtype))
    return out
