"""Replay one checkpoint interval honestly, in one process, and recompute every rank's sketches.

From the checkpoint at the interval's start: for each step, for each rank, run that rank's
share of the step as the rank ran it (``runtime.step.rank_step``, the one definition both
call), sketch the rank's local gradient, then average the
ranks' gradients (the all-reduce), clip exactly as DeepSpeed does, and take torch's AdamW step,
which is what DeepSpeed ran with ``torch_adam: true`` (SPEC.md, Verification 4).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
import torch

from gpucoin.exceptions import VerificationError
from gpucoin.runtime.sketch import CountSketch
from gpucoin.runtime.step import job_parameters, rank_step, set_lr
from gpucoin.spec import JobSpec
from gpucoin.verify.clipping import clip_zero0_, clip_zero12_
from gpucoin.verify.consolidate import ConsolidatedState, initial_state, load_consolidated


@dataclass
class Replay:
    """What an honest replay of one interval computed.

    Attributes:
        sketches: (W, K, B) float64, every rank's sketch of every step.
        end: the training state after the interval's last step (what its end checkpoint must hold).
        model: the model (names, shapes, parameter order) holding the end weights.
        before_last: the state before the last optimizer step (``endcheck`` asks whether a file
            that differs from ``end`` is an AdamW step from it at all).
        last_lr: the learning rate of the last step.
    """

    sketches: np.ndarray
    end: ConsolidatedState
    model: torch.nn.Module
    before_last: ConsolidatedState
    last_lr: float


def replay_interval(
    spec: JobSpec, data_source: str, tag_dir: str | None, step_start: int, step_end: int, buckets: int, threads: int = 1
) -> Replay:
    """Recompute the sketches of steps [step_start, step_end) for every rank, and the state after them.

    Args:
        spec: the job spec (model, optimizer, seed, workers W, micro-batch, accumulation).
        data_source: the corpus source the job trained on.
        tag_dir: DeepSpeed checkpoint tag directory of the state after ``step_start`` steps; not
            read for ``step_start == 0``, whose state follows from the seed (``initial_state``).
        buckets: sketch width B (the policy's ``sketch_buckets``).

    Returns:
        The ``Replay``: (W, K, B) sketches, K = step_end - step_start, and the end state.

    Raises:
        BadCommittedFile: a file of the start checkpoint that is missing or wrong (it names the file).
        VerificationError: if an interval after step 0 comes without its start checkpoint.
    """
    torch.set_num_threads(threads)
    ds, opt = spec.deepspeed, spec.deepspeed.optimizer
    module = importlib.import_module(spec.module)
    corpus = module.prepare_corpus(data_source, val_fraction=spec.data.val_fraction)
    train = corpus.train
    torch.manual_seed(spec.seed)  # as the workers build it: the weights before step 0 follow from the seed
    model = module.build_model(spec.model.model_dump(), corpus.vocab_size)
    named = dict(model.named_parameters())
    if step_start == 0:  # derived, never read from a worker's file (nobody signed the step-0 checkpoint)
        state = initial_state(model, ds.zero_stage, spec.workers)
    else:
        if tag_dir is None:
            raise VerificationError(f"the interval starts at step {step_start}: its start checkpoint is needed")
        state = load_consolidated(tag_dir, model, ds.zero_stage, spec.workers, step_start)
    model.load_state_dict(state.weights)
    params = list(named.values())
    optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    for name, p in named.items():
        optimizer.state[p] = {
            "step": torch.tensor(float(state.adam_step)),
            "exp_avg": state.exp_avg[name].clone(),
            "exp_avg_sq": state.exp_avg_sq[name].clone(),
        }
    sketch = CountSketch(model.parameters(), buckets, spec.seed)
    W, K = spec.workers, step_end - step_start
    out = np.zeros((W, K, buckets), dtype=np.float64)
    trainable = job_parameters(model)  # what the ranks differentiate and sketch, in order (all of them)

    def forward(x, y):  # (B, T), (B, T) -> the micro-batch's mean loss
        return model(x, y)[1]

    for k, step in enumerate(range(step_start, step_end)):
        set_lr(optimizer.param_groups, spec, step)
        total = [torch.zeros_like(p) for _, p in trainable]
        for rank in range(W):
            done = rank_step(spec, train, step, rank, trainable, forward, sketch)  # what rank ``rank`` ran
            out[rank, k] = done.sketch
            for t, g in zip(total, done.grads, strict=True):
                t.add_(g)
        for t, (_, p) in zip(total, trainable, strict=True):
            p.grad = t.div_(W)  # the data-parallel all-reduce (mean)
        if opt.gradient_clipping > 0:
            if state.partitions is not None:
                clip_zero12_({n: p.grad for n, p in named.items()}, state.partitions, opt.gradient_clipping)
            else:
                clip_zero0_([p.grad for p in params], opt.gradient_clipping, W)
        if step == step_end - 1:
            before_last = _snapshot(model, optimizer, state.adam_step + k, step, state.partitions)
        optimizer.step()
    end = _snapshot(model, optimizer, state.adam_step + K, step_end, state.partitions)
    return Replay(out, end, model, before_last, optimizer.param_groups[0]["lr"])


def _snapshot(
    model: torch.nn.Module, optimizer: torch.optim.AdamW, adam_step: int, step: int, partitions
) -> ConsolidatedState:
    named = dict(model.named_parameters())
    moments = {key: {n: optimizer.state[p][key].clone() for n, p in named.items()} for key in ("exp_avg", "exp_avg_sq")}
    return ConsolidatedState(
        weights={k: v.detach().float().clone() for k, v in model.state_dict().items()},
        exp_avg=moments["exp_avg"],
        exp_avg_sq=moments["exp_avg_sq"],
        adam_step=adam_step,
        global_steps=step,
        partitions=partitions,
    )
