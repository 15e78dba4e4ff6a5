"""``runtime.step.rank_step``, the one definition of a rank's share of a step that the ranks
(through DeepSpeed) and replay (through the plain model) both call: the micro-batches of
(seed, step, rank, micro-step), the loss divided by the accumulation steps, the schedule's
learning rate. Without Ray or DeepSpeed: that a rank's replay reproduces its DeepSpeed run bit
for bit is what the Ray tests assert (distance 0.0 under ZeRO 0, 1 and 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpucoin.runtime.data_order import micro_batch, window_offsets
from gpucoin.runtime.schedule import lr_at
from gpucoin.runtime.sketch import CountSketch
from gpucoin.runtime.step import job_parameters, rank_step, set_lr, surrogate_loss
from gpucoin.spec import load_spec
from tests.conftest import write_spec


def _spec(tmp_path):
    """The main job's spec (block size 128, micro-batch 32, its AdamW schedule), 80 steps (40 of warmup)."""
    return load_spec(write_spec(tmp_path / "job"), {"steps": 80, "checkpoint_interval_steps": 4}).spec


class Toy(torch.nn.Module):
    """An embedding and a linear head: (B, T) token ids -> (B, T, vocab) logits."""

    def __init__(self, vocab: int = 65) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, vocab)

    def forward(self, x, y):  # (B, T), (B, T) -> mean cross-entropy
        logits = self.head(self.emb(x))  # (B, T, vocab)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def _setup(tmp_path, gas: int = 1):
    spec = _spec(tmp_path)
    spec = spec.model_copy(update={"deepspeed": spec.deepspeed.model_copy(update={"gradient_accumulation_steps": gas})})
    train = np.random.default_rng(0).integers(0, 65, 50_000, dtype=np.uint16)  # the train split's token ids
    model = Toy()
    return spec, train, model, list(model.named_parameters()), CountSketch(model.parameters(), 64, spec.seed)


def test_a_rank_step_is_the_gradient_of_its_micro_batches_mean_loss_and_its_sketch(tmp_path) -> None:
    spec, train, model, params, sketch = _setup(tmp_path, gas=3)
    ds, T = spec.deepspeed, spec.model.block_size

    done = rank_step(spec, train, 7, 1, params, model, sketch)
    assert all(p.grad is None for _, p in params)  # where the gradient goes is the caller's

    batches = [
        micro_batch(train, window_offsets(spec.seed, 7, 1, m, ds.micro_batch_size, len(train), T), T) for m in range(3)
    ]
    losses = [model(x, y) for x, y in batches]
    (sum(losses) / 3).backward()
    for g, (_, p) in zip(done.grads, params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-9)
    assert np.array_equal(done.sketch, sketch.sketch_grads(done.grads))
    assert abs(done.loss - sum(x.item() for x in losses) / 3) < 1e-6
    assert done.samples == 3 * ds.micro_batch_size

    # another rank or step trains on other data
    other = rank_step(spec, train, 7, 0, params, model, sketch)
    assert not torch.equal(other.grads[1], done.grads[1])


def test_the_surrogate_feeds_exactly_the_given_gradient(tmp_path) -> None:
    _, _, model, params, _ = _setup(tmp_path)
    grads = [torch.randn_like(p) * 1e-3 for _, p in params]
    surrogate_loss([p for _, p in params], grads).backward()
    assert all(torch.equal(p.grad, g) for (_, p), g in zip(params, grads, strict=True))  # bit for bit


def test_a_cheats_hooks_run_where_an_honest_rank_computes_and_in_order(tmp_path) -> None:
    spec, train, model, params, sketch = _setup(tmp_path, gas=2)
    B = spec.deepspeed.micro_batch_size
    seen = []
    honest = rank_step(spec, train, 3, 0, params, model, sketch)

    class Recorder:
        def on_batch(self, x, y, step, rank):
            seen.append(("batch", x.shape[0], step, rank))
            return x[: B // 2], y[: B // 2]

        def on_grads(self, grads, step, rank):
            seen.append(("grads", tuple(grads), step, rank))
            self.sent = {n: 2 * g for n, g in grads.items()}
            return self.sent

        def on_commit(self, committed, step, rank):
            seen.append(("commit", step, rank))
            self.sketched = committed.copy()
            return committed + 1.0

    cheat = Recorder()
    done = rank_step(spec, train, 3, 0, params, model, sketch, cheat)
    names = tuple(n for n, _ in params)
    assert seen == [("batch", B, 3, 0), ("batch", B, 3, 0), ("grads", names, 3, 0), ("commit", 3, 0)]
    assert all(torch.equal(g, cheat.sent[n]) for n, g in zip(names, done.grads, strict=True))  # what it feeds
    assert np.array_equal(cheat.sketched, sketch.sketch_grads(done.grads))  # the sketch of what on_grads returned
    assert np.array_equal(done.sketch, cheat.sketched + 1.0)  # then what on_commit returned is committed
    assert done.samples == honest.samples == 2 * B  # what it claims, as a cheating rank's receipt does
    assert not torch.equal(done.grads[1], 2 * honest.grads[1])  # it trained on half the batch


def test_gradients_of_another_shape_from_a_cheat_are_refused(tmp_path) -> None:
    spec, train, model, params, sketch = _setup(tmp_path)

    class Bad:
        def on_grads(self, grads, step, rank):
            return {n: g[:1] for n, g in grads.items()}

    with pytest.raises(ValueError, match="on_grads must return a gradient of shape"):
        rank_step(spec, train, 0, 0, params, model, sketch, Bad())

    class Extra:
        def on_grads(self, grads, step, rank):
            return {**grads, "smuggled": next(iter(grads.values()))}

    class Missing:
        def on_grads(self, grads, step, rank):
            return dict(list(grads.items())[1:])

    for cheat in (Extra(), Missing()):
        with pytest.raises(ValueError, match="a gradient for each of the 3 parameters and nothing else"):
            rank_step(spec, train, 0, 0, params, model, sketch, cheat)


def test_set_lr_sets_every_group_to_the_schedule(tmp_path) -> None:
    spec = _spec(tmp_path)
    opt = spec.deepspeed.optimizer
    groups = [{"lr": 0.0}, {"lr": 1.0}]
    for step in (0, opt.warmup_steps, spec.steps - 1):
        lr = set_lr(groups, spec, step)
        assert lr == lr_at(step, spec.steps, opt.lr, opt.min_lr, opt.warmup_steps)
        assert [g["lr"] for g in groups] == [lr, lr]


def test_a_frozen_parameter_is_refused_up_front(tmp_path) -> None:
    _, _, model, _, _ = _setup(tmp_path)
    assert [n for n, _ in job_parameters(model)] == ["emb.weight", "head.weight", "head.bias"]
    model.emb.weight.requires_grad_(False)  # replay lays out every parameter: a frozen one would convict
    with pytest.raises(ValueError, match=r"frozen parameters are not supported.*emb.weight"):
        job_parameters(model)
