"""The baseline of ``benchmarks/training``: the job under plain Ray Train + DeepSpeed, no gpucoin code.

Run by ``benchmarks.training.run`` as a Ray driver of the benchmark's market (its token in the
environment)::

    python -m benchmarks.training.plain CONFIG.json OUT.json

CONFIG: ``address`` (the Ray GCS), ``node_ids`` (rank r on node r, the nodes the gpucoin run
used), ``package_dir`` (the job's package, shipped in the runtime env as gpucoin ships it),
``module``, ``model``, ``data_source``, ``val_fraction``, ``seed``, ``micro_batch_size``,
``block_size``, ``steps``, ``checkpoint_interval_steps``, ``lr`` and ``ds_config`` (the DeepSpeed
config dict gpucoin gives the same job: ZeRO stage, fp32, torch's AdamW, clipping). OUT gets rank
0's wall clock after each step (unix seconds, one per step), which rank 0 writes into
``storage_dir``.

The loop is the textbook one: random windows of the corpus, ``engine(x, y)``,
``engine.backward(loss)``, ``engine.step()``, and a DeepSpeed checkpoint to the rank's local disk
every ``checkpoint_interval_steps``. None of gpucoin runs in the workers: no sketch, no
``autograd.grad`` path, no hashing or upload of the checkpoint, no receipt, no signer, no head.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def train_loop(config: dict) -> None:
    """Ray Train entry point of each rank (``config``: as the module docstring says)."""
    import importlib
    import os
    import shutil
    import tempfile
    import time

    import deepspeed
    import numpy as np
    import ray.train
    import torch

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    module = importlib.import_module(config["module"])
    corpus = module.prepare_corpus(config["data_source"], val_fraction=config["val_fraction"])
    train = corpus.train  # (N,) int64
    torch.manual_seed(config["seed"])
    model = module.build_model(config["model"], corpus.vocab_size)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config["ds_config"])
    B, T = config["micro_batch_size"], config["block_size"]
    gen = torch.Generator().manual_seed(config["seed"] * 1000 + rank)
    scratch = tempfile.mkdtemp(prefix="plain-", dir=os.environ.get("RAY_TMPDIR"))
    times = []
    for step in range(config["steps"]):
        for group in engine.optimizer.param_groups:
            group["lr"] = config["lr"]
        ix = torch.randint(len(train) - T - 1, (B,), generator=gen).numpy()
        chunk = torch.from_numpy(train[ix[:, None] + np.arange(T + 1)[None, :]].astype(np.int64))  # (B, T+1)
        x, y = chunk[:, :-1].to(engine.device), chunk[:, 1:].to(engine.device)  # (B, T), (B, T)
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        if (step + 1) % config["checkpoint_interval_steps"] == 0:
            engine.save_checkpoint(scratch, tag=f"step{step + 1:08d}")
        times.append(time.time())
    shutil.rmtree(scratch, ignore_errors=True)
    if rank == 0:  # Ray Train 2's Result keeps metrics only beside a checkpoint: a file instead
        Path(config["storage_dir"], "times.json").write_text(json.dumps({"times": times, "loss": float(loss.item())}))


def main(argv: list[str]) -> None:
    """``CONFIG.json OUT.json``: train, write rank 0's per-step times to OUT."""
    import ray
    import ray.cloudpickle
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg_path, out_path = argv
    config = json.loads(Path(cfg_path).read_text())
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers do not have this file
    ray.init(
        address=config["address"],
        log_to_driver=False,
        runtime_env={"py_modules": [config["package_dir"]]},
    )
    gpus = {n["NodeID"]: n.get("Resources", {}).get("GPU", 0) for n in ray.nodes() if n.get("Alive")}
    use_gpu = all(gpus.get(nid, 0) >= 1 for nid in config["node_ids"])
    storage = Path(config["storage_dir"])
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=len(config["node_ids"]),
            use_gpu=use_gpu,
            resources_per_worker={"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1},
            label_selector=[{"ray.io/node-id": nid} for nid in config["node_ids"]],
        ),
        run_config=RunConfig(
            name="plain",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=0),
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
        ),
    )
    trainer.fit()
    Path(out_path).write_text((storage / "times.json").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
