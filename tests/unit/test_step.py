"""``runtime.step.rank_step``, the one definition of a rank's share of a step that the ranks
(through DeepSpeed) and replay (through the plain model) both call: the micro-batches of
(seed, step, rank, micro-step), the loss divided by the accumulation steps, the schedule's
learning rate. Without Ray or DeepSpeed: that a rank's replay reproduces its DeepSpeed run bit
for bit is what the Ray tests assert (distance 0.0 under ZeRO 0, 1 and 2)."""

from __future__ import annotations

import numpy as np
import torch

from gpucoin.runtime.data_order import micro_batch, window_offsets
from gpucoin.runtime.schedule import lr_at
from gpucoin.runtime.step import rank_step, set_lr
from gpucoin.spec import load_spec
from tests.conftest import write_spec


def _spec(tmp_path):
    """The main job's spec (block size 128, micro-batch 32, its AdamW schedule), 80 steps (40 of warmup)."""
    return load_spec(write_spec(tmp_path / "job"), {"steps": 80, "checkpoint_interval_steps": 4}).spec


def _toy(vocab: int = 65):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(vocab, 8)
    head = torch.nn.Linear(8, vocab)

    def loss_of(x, y):  # (B, T), (B, T) -> mean cross-entropy
        logits = head(emb(x))  # (B, T, vocab)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    return [emb.weight, head.weight, head.bias], loss_of


def test_a_rank_step_is_the_gradient_of_its_micro_batches_mean_loss(tmp_path) -> None:
    spec = _spec(tmp_path)
    spec = spec.model_copy(update={"deepspeed": spec.deepspeed.model_copy(update={"gradient_accumulation_steps": 3})})
    ds, T = spec.deepspeed, spec.model.block_size
    train = np.random.default_rng(0).integers(0, 65, 50_000, dtype=np.uint16)  # the train split's token ids
    params, loss_of = _toy()

    done = rank_step(spec, train, 7, 1, loss_of, lambda scaled: scaled.backward())
    got = [p.grad.clone() for p in params]

    for p in params:
        p.grad = None
    batches = [
        micro_batch(train, window_offsets(spec.seed, 7, 1, m, ds.micro_batch_size, len(train), T), T) for m in range(3)
    ]
    losses = [loss_of(x, y) for x, y in batches]
    (sum(losses) / 3).backward()
    for g, p in zip(got, params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-9)
    assert abs(done.loss - sum(x.item() for x in losses) / 3) < 1e-6
    assert done.samples == 3 * ds.micro_batch_size

    # another rank or step trains on other data
    for p in params:
        p.grad = None
    rank_step(spec, train, 7, 0, loss_of, lambda scaled: scaled.backward())
    assert not torch.equal(params[1].grad, got[1])


def test_a_batch_fault_changes_what_the_rank_trains_on_not_what_it_counts(tmp_path) -> None:
    spec = _spec(tmp_path)
    train = np.random.default_rng(0).integers(0, 65, 50_000, dtype=np.uint16)  # the train split's token ids
    _, loss_of = _toy()
    seen = []

    def half(x, y, step, rank):
        seen.append((x.shape[0], step, rank))
        return x[: x.shape[0] // 2], y[: y.shape[0] // 2]

    def forward(x, y):
        seen.append(("fwd", x.shape[0]))
        return loss_of(x, y)

    done = rank_step(spec, train, 3, 0, forward, lambda scaled: None, half)
    B = spec.deepspeed.micro_batch_size
    gas = spec.deepspeed.gradient_accumulation_steps
    assert seen == [(B, 3, 0), ("fwd", B // 2)] * gas
    assert done.samples == gas * B  # what it claims, as a cheating rank's receipt does


def test_set_lr_sets_every_group_to_the_schedule(tmp_path) -> None:
    spec = _spec(tmp_path)
    opt = spec.deepspeed.optimizer
    groups = [{"lr": 0.0}, {"lr": 1.0}]
    for step in (0, opt.warmup_steps, spec.steps - 1):
        lr = set_lr(groups, spec, step)
        assert lr == lr_at(step, spec.steps, opt.lr, opt.min_lr, opt.warmup_steps)
        assert [g["lr"] for g in groups] == [lr, lr]
