"""The end-of-job evaluation: validation loss and a text sample from the last checkpoint.

The head rebuilds the checkpoint (``rebuilt_checkpoint``); a child process runs the job's code
on it (``evaluate_checkpoint``, via ``coordinator.jobcode``).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gpucoin.exceptions import VerificationError
from gpucoin.runtime.checkpoint import tag_for
from gpucoin.runtime.safe_load import safe_torch_load, verified_copy
from gpucoin.spec import JobSpec
from gpucoin.storage.checkpoints import Get, fetch_checkpoint

SAMPLE_CHARS = 300


@contextlib.contextmanager
def rebuilt_checkpoint(spec: JobSpec, get: Get, job_id: str, manifests: list[str], step: int) -> Iterator[Path | None]:
    """The DeepSpeed checkpoint after ``step`` steps, rebuilt in a private temp dir from the store
    by the manifests the ranks signed (``fetch_checkpoint``); None after 0 steps. Yields the tag
    dir; it is removed on exit.

    Args:
        get: the job's store ``get``; manifests: per rank, the ``checkpointHash`` of its receipt
            for the interval that ended at ``step`` (empty for step 0).

    Raises:
        VerificationError: a file that is not stored as signed.
    """
    if step == 0:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="gpucoin-eval-") as tmp:
        tag_dir = Path(tmp) / tag_for(step)
        bad = fetch_checkpoint(
            get, manifests, job_id=job_id, step=step, zero_stage=spec.deepspeed.zero_stage, dest=tag_dir
        )
        if bad:
            raise VerificationError(
                f"the checkpoint after step {step} cannot be rebuilt: {'; '.join(map(str, bad.values()))}"
            )
        yield tag_dir


def evaluate_checkpoint(spec: JobSpec, module, corpus, tag_dir: Path | None, step: int) -> tuple[float, str]:
    """Validation loss (nats/char, mean over ``eval_batches`` micro-batches) and ~300 generated characters.

    Runs the job's code: only in a child process of the head (``coordinator.jobcode``). The
    weights are the checkpoint in ``tag_dir`` (``rebuilt_checkpoint``), consolidated with
    DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (ZeRO 1/2, on a ``verified_copy``)
    or read whole (ZeRO 0); workers wrote those files, so nothing of them is unpickled but by a
    weights-only load (``gpucoin.runtime.safe_load``). After 0 steps (``tag_dir`` None) the model
    is the one the spec's seed builds.

    Raises:
        VerificationError: a file that a weights-only load refuses.
    """
    import torch

    if tag_dir is None:
        torch.manual_seed(spec.seed)
        return _evaluate(spec, module, corpus, None)
    return _evaluate(spec, module, corpus, consolidated_weights(spec, tag_dir, step))


def consolidated_weights(spec: JobSpec, tag_dir: Path, step: int) -> dict:
    """The model's fp32 weights (parameter name -> tensor) in the DeepSpeed checkpoint ``tag_dir``
    of ``step`` steps, whatever its ZeRO stage, loaded as ``evaluate_checkpoint`` says (no file is
    unpickled but by a weights-only load). Runs no job code.

    Raises:
        VerificationError: a file that a weights-only load refuses.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if spec.deepspeed.zero_stage == 0:
        return safe_torch_load(tag_dir / "mp_rank_00_model_states.pt")["module"]
    # DeepSpeed's consolidation loads with plain pickle: hand it a private copy that passed the safe load
    with (
        verified_copy(tag_dir) as checked,
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):  # it prints per shard
        return get_fp32_state_dict_from_zero_checkpoint(str(checked), tag=tag_for(step))


def _evaluate(spec: JobSpec, module, corpus, state: dict | None) -> tuple[float, str]:
    import torch

    from gpucoin.runtime.data_order import eval_offsets, micro_batch

    model = module.build_model(spec.model.model_dump(), corpus.vocab_size)
    if state is not None:
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
