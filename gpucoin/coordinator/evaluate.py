"""The end-of-job evaluation: validation loss and a text sample from the last checkpoint."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from gpucoin.runtime.checkpoint import tag_for
from gpucoin.runtime.safe_load import safe_torch_load, verified_copy
from gpucoin.spec import JobSpec

SAMPLE_CHARS = 300


def evaluate(spec: JobSpec, module, corpus, ckpt_dir: Path, step: int) -> tuple[float, str]:
    """Validation loss (nats/char, mean over ``eval_batches`` micro-batches) and ~300 generated characters.

    The weights are the DeepSpeed checkpoint after ``step`` steps, consolidated with DeepSpeed's
    ``get_fp32_state_dict_from_zero_checkpoint`` (ZeRO 1/2, on a ``verified_copy``) or read whole
    (ZeRO 0); workers wrote those files, so nothing of them is unpickled but by a weights-only load
    (``gpucoin.runtime.safe_load``).

    Raises:
        UnsafeCheckpoint: a checkpoint file a weights-only load refuses.
    """
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from gpucoin.runtime.data_order import eval_offsets, micro_batch

    tag_dir = Path(ckpt_dir) / tag_for(step)
    if spec.deepspeed.zero_stage == 0:
        state = safe_torch_load(tag_dir / "mp_rank_00_model_states.pt")["module"]
    else:
        # DeepSpeed's consolidation loads with plain pickle: hand it a private copy that passed the safe load
        with (
            verified_copy(tag_dir) as checked,
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):  # it prints per shard
            state = get_fp32_state_dict_from_zero_checkpoint(str(checked), tag=tag_for(step))
    model = module.build_model(spec.model.model_dump(), corpus.vocab_size)
    model.load_state_dict(state)
    model.eval()
    T, B = spec.model.block_size, spec.deepspeed.micro_batch_size
    losses = []
    with torch.no_grad():
        for i in range(spec.eval_batches):
            x, y = micro_batch(corpus.val, eval_offsets(spec.seed, i, B, len(corpus.val), T), T)  # (B, T)
            losses.append(model(x, y)[1].item())
        g = torch.Generator().manual_seed(spec.seed)
        start = torch.tensor([corpus.encode("\n")], dtype=torch.long)  # (1, 1)
        out = model.generate(start, SAMPLE_CHARS, temperature=0.8, top_k=None, generator=g)  # (1, 1 + SAMPLE_CHARS)
    return float(np.mean(losses)), corpus.decode(out[0, 1:].tolist())
