"""Child process of ``tests/security/test_checkpoint_safety.py``: real DeepSpeed checkpoints, one rank.

    python -m tests.security.ds_checkpoint save DIR STAGE [RANK WORLD PORT]
        # one AdamW step of a tiny model, then save_checkpoint(DIR, tag "step00000001"); with
        # RANK WORLD PORT, one of WORLD processes (gloo on 127.0.0.1:PORT) that do it together
    python -m tests.security.ds_checkpoint resume DIR STAGE
        # a fresh engine with gpucoin's safe checkpoint engine loads DIR's checkpoint

``resume`` prints ``resumed <global steps>`` or ``refused <error class>: <message>`` and exits 0:
what a co-worker resuming from a checkpoint another rank wrote does (``gpucoin.runtime.worker``).
DeepSpeed runs on gloo, world size 1 unless given.
"""

from __future__ import annotations

import os
import sys

TAG = "step00000001"


def model():
    """The tiny model, built after ``torch.manual_seed(0)`` (as a job's model is after its seed)."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))  # 229 numbers: odd


def engine(stage: int, rank: int = 0, world: int = 1, port: int | None = None):
    import deepspeed

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port or 29500 + os.getpid() % 1000)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    net = model()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    eng, _, _, _ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)
    return eng


def main(argv: list[str]) -> int:
    import torch

    mode, path, stage = argv[0], argv[1], int(argv[2])
    rank, world, port = (int(a) for a in argv[3:6]) if len(argv) >= 6 else (0, 1, None)
    eng = engine(stage, rank, world, port)
    if mode == "save":
        eng.save_checkpoint(path, tag="step00000000")  # the state before step 0, as workers save it
        x, y = torch.randn(2, 8), torch.randn(2, 5)
        loss = torch.nn.functional.mse_loss(eng(x), y)
        eng.backward(loss)
        eng.step()
        eng.save_checkpoint(path, tag=TAG)
        print("saved", flush=True)
        return 0
    from gpucoin.runtime import safe_load
    from gpucoin.runtime.safe_load import UnsafeCheckpoint

    safe_load.install(eng)
    try:
        eng.load_checkpoint(path, tag=TAG)
    except UnsafeCheckpoint as exc:
        print(f"refused {type(exc).__name__}: {exc}", flush=True)
        return 0
    print(f"resumed {eng.global_steps}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
