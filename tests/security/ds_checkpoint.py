"""Child process of ``tests/security/test_checkpoint_safety.py``: real DeepSpeed checkpoints, one rank.

    python -m tests.security.ds_checkpoint save DIR STAGE      # one AdamW step of a tiny model, then
                                                              # save_checkpoint(DIR, tag "step00000001")
    python -m tests.security.ds_checkpoint resume DIR STAGE    # a fresh engine with gpucoin's safe
                                                              # checkpoint engine loads DIR's checkpoint

``resume`` prints ``resumed <global steps>`` or ``refused <error class>: <message>`` and exits 0:
what a co-worker resuming from a checkpoint another rank wrote does (``gpucoin.runtime.worker``).
DeepSpeed runs on gloo with world size 1, in this process only.
"""

from __future__ import annotations

import os
import sys

TAG = "step00000001"


def engine(stage: int):
    import deepspeed
    import torch

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    eng, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return eng


def main(argv: list[str]) -> int:
    import torch

    mode, path, stage = argv[0], argv[1], int(argv[2])
    eng = engine(stage)
    if mode == "save":
        x, y = torch.randn(2, 8), torch.randn(2, 4)
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
