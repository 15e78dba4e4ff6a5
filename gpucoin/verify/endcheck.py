"""The end of a replay: every file of the interval's end checkpoint against the replayed state.

The sketches show that each rank computed its gradients from the right weights; the end
checkpoint is what the next interval, a resume and the engineer's model start from. Each file
has one writer (``gpucoin.storage.rank_files``) and is judged on its own (``check_end_checkpoint``):

- ``match``: it holds what the honest replay computed (relative L2 within the tolerance);
- ``broken``: missing, refused by the weights-only load or not DeepSpeed's layout for this step:
  its writer failed, whatever else happened;
- ``not_adam``: it differs, and what it holds is not an AdamW step from the replayed state before
  the last step for *any* gradient (the moment it stored implies the gradient; the second moment
  and the weights must follow from it): its writer's own optimizer step is wrong, nobody else's;
- ``diverged``: it differs, but is an AdamW step for some other gradient. The last step's
  gradients were already reduced across ranks when the writer used them, and a co-worker that
  sent the all-reduce something else than it sketched explains it as well as the writer does,
  so the evidence names nobody. Likewise rank 0's module weights under ZeRO 1/2, which are the
  partitions the other ranks broadcast.

Which files are compared:

- rank 0's model-states file: the module weights (and under ZeRO 0, where it holds the whole
  optimizer, Adam's moments);
- rank r's ZeRO 1/2 optimizer file: its partition of the fp32 master weights and of Adam's
  moments (``zero_partitions``), which is what DeepSpeed resumes rank r from.

``compare.judge_end`` folds these into the ranks' verdicts (docs/verification.md, The end checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from gpucoin.exceptions import BadCommittedFile
from gpucoin.storage.manifest import model_states_file, optim_states_file
from gpucoin.verify.compare import EndOutcome, FileCheck, rel_l2, worst_distance
from gpucoin.verify.consolidate import ConsolidatedState, read_model_states, read_optim_shard, zero_partitions


@dataclass(frozen=True)
class AdamHyper:
    """The AdamW step the job runs: lr of the step, betas, eps, decoupled weight decay, and
    Adam's step count after it (its bias correction)."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    step: int


def adam_inconsistency(
    before: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    after: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    h: AdamHyper,
) -> float:
    """How far ``after`` is from being one AdamW step from ``before`` for some gradient.

    The first moment fixes the gradient: ``g = (m1 - b1 m0) / (1 - b1)`` (torch's AdamW lerps
    ``m`` towards ``g`` by ``1 - b1``). From it the second moment must be ``b2 v0 + (1 - b2) g^2``
    and the weights ``w0 (1 - lr wd) - lr / (1 - b1^t) m1 / (sqrt(v1) / sqrt(1 - b2^t) + eps)``
    (``torch.optim.AdamW``, single tensor; the update is compared, not the weights, which hide it).

    Args:
        before / after: flat (n,) weights, first and second moments.

    Returns:
        The larger relative L2 distance of the second moment and of the update; NaN if the
        tensors hold NaN or a negative second moment.
    """
    w0, m0, v0 = (t.double() for t in before)
    w1, m1, v1 = (t.double() for t in after)
    b1, b2 = h.betas
    g = (m1 - b1 * m0) / (1 - b1)
    v_expected = b2 * v0 + (1 - b2) * g * g
    decayed = w0 * (1 - h.lr * h.weight_decay)
    update = -(h.lr / (1 - b1**h.step)) * m1 / (v1.sqrt() / math.sqrt(1 - b2**h.step) + h.eps)
    return worst_distance([rel_l2(v1.numpy(), v_expected.numpy()), rel_l2((w1 - decayed).numpy(), update.numpy())])


def _flat(named: list[tuple[str, torch.nn.Parameter]], by_name: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([by_name[n].flatten().float() for n, _ in named])


def _dist(held: torch.Tensor, replayed: torch.Tensor) -> float:
    return rel_l2(held.detach().double().numpy(), replayed.detach().double().numpy())


def _judge(
    name: str,
    rank: int,
    distance: float,
    tolerance: float,
    before: tuple[torch.Tensor, ...] | None,
    after: tuple[torch.Tensor, ...] | None,
    h: AdamHyper,
) -> FileCheck:
    if distance <= tolerance:  # NaN is never a match
        return FileCheck(name, rank, EndOutcome.MATCH, distance)
    if before is None:
        return FileCheck(name, rank, EndOutcome.DIVERGED, distance, f"differs from the replay by {distance:.2e}")
    inconsistency = adam_inconsistency(before, after, h)
    if not inconsistency <= tolerance:  # NaN too
        return FileCheck(
            name,
            rank,
            EndOutcome.NOT_ADAM,
            distance,
            f"differs from the replay by {distance:.2e} and is no AdamW step for any gradient ({inconsistency:.2e})",
        )
    return FileCheck(
        name,
        rank,
        EndOutcome.DIVERGED,
        distance,
        f"differs from the replay by {distance:.2e} (an AdamW step for another gradient)",
    )


def check_end_checkpoint(
    tag_dir: str | Path,
    model: torch.nn.Module,
    before_last: ConsolidatedState,
    end: ConsolidatedState,
    h: AdamHyper,
    zero_stage: int,
    world: int,
    tolerance: float,
) -> list[FileCheck]:
    """Compare every file of the checkpoint after ``end.global_steps`` steps in ``tag_dir`` with the replay.

    Args:
        model: the job's model (names, shapes, parameter order).
        before_last / end: the replayed state before and after the interval's last step (``Replay``).
        h: the last step's AdamW hyperparameters.
        tolerance: the policy's ``tolerance_rel_l2``.

    Returns:
        One ``FileCheck`` per file the ranks must write, rank order.
    """
    named = list(model.named_parameters())
    step = end.global_steps
    flat_before = [_flat(named, getattr(before_last, k)) for k in ("weights", "exp_avg", "exp_avg_sq")]
    flat_end = [_flat(named, getattr(end, k)) for k in ("weights", "exp_avg", "exp_avg_sq")]
    checks = []
    name = model_states_file()
    try:
        ms = read_model_states(tag_dir, model, zero_stage, step)
    except BadCommittedFile as exc:
        checks.append(FileCheck(name, 0, EndOutcome.BROKEN, math.inf, exc.reason))
    else:
        d = worst_distance([_dist(ms.weights[k], end.weights[k]) for k in end.weights])
        if ms.exp_avg is None:  # ZeRO 1/2: the weights rank 0 gathered from every partition
            checks.append(_judge(name, 0, d, tolerance, None, None, h))
        else:  # ZeRO 0: rank 0's own step of the whole model
            held = [_flat(named, x) for x in (ms.weights, ms.exp_avg, ms.exp_avg_sq)]
            d = worst_distance([_dist(a, b) for a, b in zip(held, flat_end, strict=True)])
            checks.append(_judge(name, 0, d, tolerance, tuple(flat_before), tuple(held), h))
    if zero_stage == 0:
        return checks
    layout = zero_partitions([(n, p.numel()) for n, p in named], world)
    offset = 0
    for r in range(world):
        n = sum(k for _, k in layout[r])
        part = slice(offset, offset + n)
        offset += n
        name = optim_states_file(r)
        try:
            shard = read_optim_shard(tag_dir, r, layout, step)
        except BadCommittedFile as exc:
            checks.append(FileCheck(name, r, EndOutcome.BROKEN, math.inf, exc.reason))
            continue
        held = (shard.fp32, shard.exp_avg, shard.exp_avg_sq)
        d = worst_distance([_dist(a, b[part]) for a, b in zip(held, flat_end, strict=True)])
        checks.append(_judge(name, r, d, tolerance, tuple(b[part] for b in flat_before), held, h))
    return checks
