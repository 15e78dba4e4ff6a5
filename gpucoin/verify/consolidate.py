"""Read a DeepSpeed ZeRO 0/1/2 checkpoint back as one process's weights and AdamW state.

Under ZeRO 1/2 each rank saved only its partition of the flat fp32 parameters and of Adam's
moments; the model-states file names, per rank, where each parameter's fragment lies in that
partition (``param_slice_mappings``, the same map DeepSpeed's ``ds_to_universal`` reads).
Concatenating a parameter's fragments in rank order gives the whole tensor.

Workers wrote these files, so each is loaded weights-only and checked against what the model and
DeepSpeed's layout (``zero_partitions``) say it must hold; whatever is wrong raises
``BadCommittedFile`` naming the one file, and so the one rank, at fault.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from gpucoin.exceptions import BadCommittedFile
from gpucoin.runtime.safe_load import UnsafeCheckpoint, safe_torch_load
from gpucoin.storage.manifest import model_states_file, optim_states_file


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


def _load(tag_dir: Path, name: str) -> dict:
    path = tag_dir / name
    if not path.is_file():
        raise BadCommittedFile(name, f"missing from {tag_dir}")
    try:
        # a worker wrote it: a weights-only load, which cannot run code (gpucoin.runtime.safe_load)
        state = safe_torch_load(path)
    except UnsafeCheckpoint as exc:
        raise BadCommittedFile(name, str(exc)) from None
    if not isinstance(state, dict):
        raise BadCommittedFile(name, f"holds a {type(state).__name__}, not a DeepSpeed state dict")
    return state


@contextmanager
def _layout_of(name: str) -> Iterator[None]:
    """Anything malformed while reading file ``name`` is that file's fault."""
    try:
        yield
    except BadCommittedFile:
        raise
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, RuntimeError) as exc:
        raise BadCommittedFile(name, f"not DeepSpeed's layout: {type(exc).__name__}: {str(exc)[:200]}") from None


def _tensor(x: object, numel: int, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.numel() < numel or not x.is_floating_point():
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a flat float tensor of at least {numel} numbers, got {got}")
    return x.detach().narrow(0, 0, numel).float()


def _step(x: object, step: int, what: str) -> None:
    got = x.item() if isinstance(x, torch.Tensor) and x.numel() == 1 else x
    if not isinstance(got, (int, float)) or isinstance(got, bool) or got != step:
        raise ValueError(f"{what} is {got!r}, the checkpoint is after step {step}")


def _adam_state(states: dict, idx: int, step: int) -> dict | None:
    """Adam's state of parameter (or flat group) ``idx``; None before the first step, when Adam has none."""
    st = states.get(idx)
    if st is None and step > 0:
        raise ValueError(f"Adam has no state for {idx} after step {step}")
    return st


@dataclass
class ModelStates:
    """What rank 0's model-states file holds.

    Attributes:
        weights: the module's state dict, fp32, shaped as the model's.
        exp_avg / exp_avg_sq: ZeRO 0 only (the whole optimizer is in this file): Adam's moments
            by parameter name; None under ZeRO 1/2.
    """

    weights: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor] | None = None
    exp_avg_sq: dict[str, torch.Tensor] | None = None


@dataclass
class OptimShard:
    """What rank r's ZeRO 1/2 optimizer file holds of its partition: (n,) fp32 master weights and
    Adam moments, n the partition's numbers without the padding (``zero_partitions``)."""

    fp32: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


def read_model_states(tag_dir: str | Path, model: torch.nn.Module, zero_stage: int, step: int) -> ModelStates:
    """Read and check rank 0's ``mp_rank_00_model_states.pt`` against the model and the step.

    Raises:
        BadCommittedFile: (naming the file) missing, refused by the weights-only load, weights not
            the model's names and shapes, ``global_steps`` not ``step``, or (ZeRO 0) an optimizer
            state that is not AdamW's for these parameters at ``step``.
    """
    name = model_states_file()
    ms = _load(Path(tag_dir), name)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    with _layout_of(name):
        module = ms["module"]
        if not isinstance(module, dict) or {k: getattr(v, "shape", None) for k, v in module.items()} != expected:
            raise ValueError("its weights are not the model's names and shapes")
        weights = {k: v.float().clone() for k, v in module.items()}
        _step(ms["global_steps"], step, "global_steps")
        if zero_stage in (1, 2):
            return ModelStates(weights)
        osd = ms["optimizer"]
        named = list(model.named_parameters())
        params = [i for g in osd["param_groups"] for i in g["params"]]
        if sorted(params) != list(range(len(named))):
            raise ValueError(f"the optimizer's parameters are {params}, the model has {len(named)}")
        exp_avg, exp_avg_sq = {}, {}
        for idx, (pname, p) in zip(params, named, strict=True):
            st = _adam_state(osd["state"], idx, step)
            if st is not None:
                _step(st["step"], step, f"Adam's step of {pname}")
            for key, out in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                t = st[key] if st is not None else torch.zeros(p.shape)
                if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                    raise ValueError(f"{key} of {pname} is not shaped {tuple(p.shape)}")
                out[pname] = t.float().clone()
        return ModelStates(weights, exp_avg, exp_avg_sq)


def read_optim_shard(tag_dir: str | Path, rank: int, layout: list[list[tuple[str, int]]], step: int) -> OptimShard:
    """Read and check rank ``rank``'s ZeRO 1/2 optimizer file against the layout and the step.

    Args:
        layout: ``zero_partitions`` of the model for the job's world size.

    Raises:
        BadCommittedFile: (naming the file) missing, refused by the weights-only load, a
            ``param_slice_mappings`` other than ``layout[rank]``, tensors too short, or Adam's
            step not ``step``.
    """
    name = optim_states_file(rank)
    state = _load(Path(tag_dir), name)
    with _layout_of(name):
        osd = state["optimizer_state_dict"]
        mappings = osd["param_slice_mappings"]
        got, offset = [], 0
        for mapping in mappings:
            for pname, frag in mapping.items():
                if frag.start != offset:
                    raise ValueError(f"fragment {pname} starts at {frag.start}, expected {offset}")
                got.append((pname, frag.numel))
                offset += frag.numel
        if len(mappings) != 1 or got != layout[rank]:
            raise ValueError(f"its partition is {got[:4]}..., DeepSpeed lays out {layout[rank][:4]}...")
        n = sum(k for _, k in layout[rank])
        st = _adam_state(osd["base_optimizer_state"]["state"], 0, step)
        fp32 = _tensor(osd["single_partition_of_fp32_groups"][0], n, "the fp32 partition")
        if st is None:
            return OptimShard(fp32, torch.zeros(n), torch.zeros(n))
        _step(st["step"], step, "Adam's step")
        return OptimShard(fp32, _tensor(st["exp_avg"], n, "exp_avg"), _tensor(st["exp_avg_sq"], n, "exp_avg_sq"))


def load_consolidated(
    tag_dir: str | Path, model: torch.nn.Module, zero_stage: int, world: int, step: int
) -> ConsolidatedState:
    """Consolidate the checkpoint after ``step`` steps in ``tag_dir`` (one DeepSpeed tag) into full tensors.

    The weights are what DeepSpeed resumes from: under ZeRO 0 the model-states file's; under
    ZeRO 1/2 the ranks' fp32 partitions (``load_checkpoint`` restores the module from them, and
    DeepSpeed's ``zero_to_fp32`` reads them too), so each number has exactly one writer.

    Every file is read weights-only and checked against what the model and DeepSpeed's layout
    say it must hold (``read_model_states``, ``read_optim_shard``), so a file that is wrong is
    named, and with it the rank that wrote it (``gpucoin.storage.file_owner``).

    Args:
        model: the job's model as built (names, shapes, parameter order); not modified.
        zero_stage / world: the job's ZeRO stage and data-parallel ranks.

    Raises:
        BadCommittedFile: naming the first file that is missing or wrong.
    """
    named = list(model.named_parameters())
    ms = read_model_states(tag_dir, model, zero_stage, step)
    if zero_stage == 0:
        return ConsolidatedState(ms.weights, ms.exp_avg, ms.exp_avg_sq, step, step)
    layout = zero_partitions([(n, p.numel()) for n, p in named], world)
    shards = [read_optim_shard(tag_dir, r, layout, step) for r in range(world)]
    flat = {key: torch.cat([getattr(s, key) for s in shards]) for key in ("fp32", "exp_avg", "exp_avg_sq")}
    by_param: dict[str, dict[str, torch.Tensor]] = {key: {} for key in flat}
    offset = 0
    for pname, p in named:
        n = p.numel()
        for key in flat:
            by_param[key][pname] = flat[key][offset : offset + n].view(p.shape).clone()
        offset += n
    return ConsolidatedState(
        _state_dict(model, by_param["fp32"], ms.weights),
        by_param["exp_avg"],
        by_param["exp_avg_sq"],
        step,
        step,
        layout,
    )


def _state_dict(
    model: torch.nn.Module, params: dict[str, torch.Tensor], module: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The model's state dict with every parameter (tied ones under each of their names) from
    ``params``, and anything else (buffers) from the model-states file's ``module``."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {
        k: params[name_of[id(v)]] if id(v) in name_of else module[k]
        for k, v in model.state_dict(keep_vars=True).items()
    }
