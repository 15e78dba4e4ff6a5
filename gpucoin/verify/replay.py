"""Replay one checkpoint interval honestly, in one process, and recompute every rank's sketches.

From the checkpoint at the interval's start: for each step, for each rank, run that rank's
micro-batches (fixed by seed, step, rank), sketch the rank's local gradient, then average the
ranks' gradients (the all-reduce), clip exactly as DeepSpeed does, and take torch's AdamW step,
which is what DeepSpeed ran with ``torch_adam: true`` (SPEC.md, Verification 4).
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from gpucoin.exceptions import VerificationError
from gpucoin.runtime.data_order import micro_batch, window_offsets
from gpucoin.runtime.schedule import lr_at
from gpucoin.runtime.sketch import CountSketch
from gpucoin.spec import JobSpec
from gpucoin.verify.clipping import clip_zero0_, clip_zero12_
from gpucoin.verify.consolidate import initial_state, load_consolidated


def replay_interval(
    spec: JobSpec, data_source: str, tag_dir: str | None, step_start: int, step_end: int, buckets: int, threads: int = 1
) -> np.ndarray:
    """Recompute the sketches of steps [step_start, step_end) for every rank.

    Args:
        spec: the job spec (model, optimizer, seed, workers W, micro-batch, accumulation).
        data_source: the corpus source the job trained on.
        tag_dir: DeepSpeed checkpoint tag directory of the state after ``step_start`` steps; not
            read for ``step_start == 0``, whose state follows from the seed (``initial_state``).
        buckets: sketch width B (the policy's ``sketch_buckets``).

    Returns:
        (W, K, B) float64 sketches, K = step_end - step_start.

    Raises:
        VerificationError: if the checkpoint is not at ``step_start`` or cannot be read.
    """
    torch.set_num_threads(threads)
    ds, opt = spec.deepspeed, spec.deepspeed.optimizer
    module = importlib.import_module(spec.module)
    corpus = module.prepare_corpus(data_source, val_fraction=spec.data.val_fraction)
    train, T = corpus.train, spec.model.block_size
    torch.manual_seed(spec.seed)  # as the workers build it: the weights before step 0 follow from the seed
    model = module.build_model(spec.model.model_dump(), corpus.vocab_size)
    named = dict(model.named_parameters())
    if step_start == 0:  # derived, never read from a worker's file (nobody signed the step-0 checkpoint)
        state = initial_state(model, ds.zero_stage, spec.workers)
    else:
        if tag_dir is None:
            raise VerificationError(f"the interval starts at step {step_start}: its start checkpoint is needed")
        state = load_consolidated(tag_dir, list(named))
    if state.global_steps != step_start:
        raise VerificationError(f"{tag_dir} is at step {state.global_steps}, the interval starts at {step_start}")
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
    for k, step in enumerate(range(step_start, step_end)):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, spec.steps, opt.lr, opt.min_lr, opt.warmup_steps)
        total = [torch.zeros_like(p) for p in params]
        for rank in range(W):
            optimizer.zero_grad(set_to_none=True)
            for micro in range(ds.gradient_accumulation_steps):
                offsets = window_offsets(spec.seed, step, rank, micro, ds.micro_batch_size, len(train), T)
                x, y = micro_batch(train, offsets, T)  # (B, T), (B, T)
                _, loss = model(x, y)
                (loss / ds.gradient_accumulation_steps).backward()
            out[rank, k] = sketch.sketch_params_grad()
            for t, p in zip(total, params, strict=True):
                if p.grad is not None:
                    t.add_(p.grad)
        for t, p in zip(total, params, strict=True):
            p.grad = t.div_(W)  # the data-parallel all-reduce (mean)
        if opt.gradient_clipping > 0:
            if state.partitions is not None:
                clip_zero12_({n: p.grad for n, p in named.items()}, state.partitions, opt.gradient_clipping)
            else:
                clip_zero0_([p.grad for p in params], opt.gradient_clipping, W)
        optimizer.step()
    return out
