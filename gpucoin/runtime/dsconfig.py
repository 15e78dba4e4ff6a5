"""The DeepSpeed config a job spec implies (fp32, torch's AdamW, ZeRO stage from the spec)."""

from __future__ import annotations

from gpucoin.spec import JobSpec


def deepspeed_config(spec: JobSpec) -> dict:
    """DeepSpeed's JSON config for ``spec`` with ``spec.workers`` data-parallel ranks.

    ``torch_adam: true`` makes DeepSpeed step with ``torch.optim.AdamW``, the optimizer a
    verifier replays with (SPEC.md, Verification 4). The learning rate here is only the start;
    workers set ``lr_at(step)`` on every step, as the replay does.
    """
    ds = spec.deepspeed
    opt = ds.optimizer
    # the ranks accumulate the micro-steps' gradients themselves (``runtime.step.rank_step``) and
    # hand DeepSpeed one gradient per step: to DeepSpeed every step is one micro-step of the rank's share
    return {
        "train_micro_batch_size_per_gpu": ds.micro_batch_size * ds.gradient_accumulation_steps,
        "gradient_accumulation_steps": 1,
        "train_batch_size": spec.global_batch_size,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": list(opt.betas),
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": ds.zero_stage},
        "gradient_clipping": opt.gradient_clipping,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
