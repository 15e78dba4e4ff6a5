"""Read a DeepSpeed ZeRO 0/1/2 checkpoint back as one process's weights and AdamW state.

Under ZeRO 1/2 each rank saved only its partition of the flat fp32 parameters and of Adam's
moments; the model-states file names, per rank, where each parameter's fragment lies in that
partition (``param_slice_mappings``, the same map DeepSpeed's ``ds_to_universal`` reads).
Concatenating a parameter's fragments in rank order gives the whole tensor.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import torch

from gpucoin.exceptions import VerificationError
from gpucoin.runtime.safe_load import safe_torch_load


@dataclass
class ConsolidatedState:
    """The full training state at a checkpoint.

    Attributes:
        weights: parameter name -> fp32 tensor (the module's state dict).
        exp_avg / exp_avg_sq: parameter name -> Adam first / second moment, shaped as the parameter.
        adam_step: optimizer steps taken so far (Adam's bias-correction count).
        global_steps: DeepSpeed's step counter at the checkpoint.
        partitions: ZeRO 1/2: per rank, the (parameter name, numel) fragments of its partition in
            partition order (what DeepSpeed's gradient clipping iterates); None for ZeRO 0.
    """

    weights: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    adam_step: int
    global_steps: int
    partitions: list[list[tuple[str, int]]] | None = None


ZERO_ALIGNMENT_FACTOR = 2
"""DeepSpeed 0.19's ``nccl_start_alignment_factor``: a ZeRO 1/2 flat group is padded to a
multiple of this times the world size (``stage_1_and_2.py``)."""


def zero_partitions(params: list[tuple[str, int]], world: int) -> list[list[tuple[str, int]]]:
    """The (parameter name, numel) fragments of each rank's ZeRO 1/2 partition, as DeepSpeed 0.19
    lays them out: the parameters flattened in order (one group, no per-parameter padding: the
    default ``parameter_alignment: false``), padded at the end to a multiple of
    ``ZERO_ALIGNMENT_FACTOR x world``, cut into ``world`` equal partitions.

    What ``load_consolidated`` reads from a checkpoint's ``param_slice_mappings``, computed from
    the model alone: the replay of an interval that starts at step 0 needs it before any
    checkpoint exists (``tests/security/test_checkpoint_safety.py`` compares the two).

    Args:
        params: the model's (name, numel), in ``named_parameters()`` order.
        world: data-parallel ranks.

    Raises:
        ValueError: for fewer than one rank.
    """
    if world < 1:
        raise ValueError(f"a partition needs at least one rank, got {world}")
    total = sum(n for _, n in params)
    alignment = ZERO_ALIGNMENT_FACTOR * world
    size = -(-total // alignment) * alignment // world  # each rank's partition
    out: list[list[tuple[str, int]]] = []
    for r in range(world):
        lo, hi, offset, frags = r * size, (r + 1) * size, 0, []
        for name, n in params:
            overlap = min(hi, offset + n) - max(lo, offset)
            if overlap > 0:
                frags.append((name, overlap))
            offset += n
        out.append(frags)
    return out


def initial_state(model: torch.nn.Module, zero_stage: int, world: int) -> ConsolidatedState:
    """The training state before step 0: the model's weights as built (the spec's seed set
    first), Adam's moments zero, and the ZeRO 1/2 partition layout (``zero_partitions``).

    Derived, not read from a worker's step-0 checkpoint: nobody signs that one, so a rank that
    overwrote it could otherwise frame the ranks that trained from the true initialization.
    """
    named = dict(model.named_parameters())
    weights = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    zeros = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named.items()}
    layout = zero_partitions([(n, p.numel()) for n, p in named.items()], world) if zero_stage in (1, 2) else None
    return ConsolidatedState(weights, zeros, {n: z.clone() for n, z in zeros.items()}, 0, 0, layout)


def _load(path: str) -> dict:
    # a worker wrote it: a weights-only load, which cannot run code (gpucoin.runtime.safe_load)
    state = safe_torch_load(path)
    if not isinstance(state, dict):
        raise VerificationError(f"{path} holds a {type(state).__name__}, not a DeepSpeed state dict")
    return state


def load_consolidated(tag_dir: str, param_names: list[str]) -> ConsolidatedState:
    """Consolidate the checkpoint in ``tag_dir`` (one DeepSpeed tag) into full tensors.

    Args:
        param_names: the model's ``named_parameters()`` names in order (tied weights once); ZeRO 0
            checkpoints index Adam's state by this order and record no names of their own.

    Raises:
        UnsafeCheckpoint: a file that a weights-only load refuses (it would run code).
        VerificationError: if files are missing or the fragments do not add up to the shapes.
    """
    model_files = glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt"))
    if len(model_files) != 1:
        raise VerificationError(f"{tag_dir}: expected one mp_rank_*_model_states.pt, found {len(model_files)}")
    ms = _load(model_files[0])
    weights = {k: v.float().clone() for k, v in ms["module"].items()}
    shapes: dict[str, torch.Size] = {}
    for group in ms["param_shapes"] or []:
        shapes.update(group)
    if not shapes:  # ZeRO 0 records no param_shapes
        shapes = {n: weights[n].shape for n in param_names}
    optim_files = sorted(
        glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*_mp_rank_00_optim_states.pt")),
        key=lambda p: int(os.path.basename(p).split("zero_pp_rank_")[1].split("_")[0]),
    )
    if not optim_files:  # ZeRO 0: a plain torch optimizer state in the model-states file
        return _from_unpartitioned(ms, weights, shapes)
    frags: dict[str, dict[str, list[torch.Tensor]]] = {name: {"exp_avg": [], "exp_avg_sq": []} for name in shapes}
    adam_step = None
    partitions: list[list[tuple[str, int]]] = []
    for f in optim_files:
        osd = _load(f)["optimizer_state_dict"]
        base = osd["base_optimizer_state"]
        partitions.append(
            [(name, frag.numel) for mapping in osd["param_slice_mappings"] for name, frag in mapping.items()]
        )
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            st = base["state"].get(g)
            for name, frag in mapping.items():
                for key in ("exp_avg", "exp_avg_sq"):
                    # before the first optimizer step Adam has no state: its moments are zero
                    piece = st[key].narrow(0, frag.start, frag.numel) if st else torch.zeros(frag.numel)
                    frags[name][key].append(piece)
            if st:
                adam_step = int(st["step"])
    exp_avg, exp_avg_sq = {}, {}
    for name, shape in shapes.items():
        for key, out in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            flat = torch.cat(frags[name][key]) if frags[name][key] else torch.empty(0)
            if flat.numel() != shape.numel():
                raise VerificationError(
                    f"{tag_dir}: {name} {key} fragments hold {flat.numel()} numbers, shape {tuple(shape)} needs {shape.numel()}"
                )
            out[name] = flat.view(shape).clone()
    return ConsolidatedState(weights, exp_avg, exp_avg_sq, adam_step or 0, int(ms["global_steps"]), partitions)


def _from_unpartitioned(ms: dict, weights: dict, shapes: dict) -> ConsolidatedState:
    osd = ms["optimizer"]
    if osd is None:
        raise VerificationError("checkpoint has no optimizer state")
    names = list(shapes)
    params = [i for g in osd["param_groups"] for i in g["params"]]
    exp_avg, exp_avg_sq, adam_step = {}, {}, 0
    for idx, name in zip(params, names, strict=True):
        st = osd["state"].get(idx)
        if st is None:  # before the first step Adam has no state yet
            exp_avg[name] = torch.zeros(shapes[name])
            exp_avg_sq[name] = torch.zeros(shapes[name])
            continue
        exp_avg[name], exp_avg_sq[name], adam_step = st["exp_avg"].clone(), st["exp_avg_sq"].clone(), int(st["step"])
    return ConsolidatedState(weights, exp_avg, exp_avg_sq, adam_step, int(ms["global_steps"]))
