"""The shipped cheat strategies (``runtime.cheats``) depart from the honest step where they say,
and nowhere else, on a toy model without Ray or DeepSpeed; how they are loaded and refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpucoin.runtime import faults
from gpucoin.runtime.cheats import (
    SHIPPED,
    CheatContext,
    CopiedCommitment,
    HalfBatch,
    HonestCommitmentOtherGradient,
    RandomGradient,
    StaleGradient,
    ZeroGradient,
    check_ref,
    load_cheat,
)
from gpucoin.runtime.step import rank_step
from tests.unit.test_step import _setup


def _bound(cheat, spec, train, params, sketch):
    if hasattr(cheat, "bind"):
        cheat.bind(CheatContext(spec, train, tuple(n for n, _ in params), sketch.sketch_grads))
    return cheat


@pytest.fixture
def job(tmp_path):
    spec, train, model, params, sketch = _setup(tmp_path, gas=2)
    spec = spec.model_copy(update={"workers": 2})

    def run(step, rank, cheat=None):
        return rank_step(spec, train, step, rank, params, model, sketch, cheat)

    return spec, train, params, sketch, run


def test_skipping_the_work_sends_and_commits_a_zero_or_random_gradient(job) -> None:
    spec, train, params, sketch, run = job
    honest = run(5, 0)
    zero = run(5, 0, ZeroGradient())
    assert all(not g.any() for g in zero.grads) and not zero.sketch.any()
    rnd = run(5, 0, RandomGradient())
    assert np.array_equal(rnd.sketch, sketch.sketch_grads(rnd.grads))
    for g, h in zip(rnd.grads, honest.grads, strict=True):
        assert torch.allclose(g.norm(), h.norm()) and not torch.allclose(g, h)  # as large, unrelated
    assert np.array_equal(run(5, 0, RandomGradient()).sketch, rnd.sketch)  # seeded: a rerun cheats the same


def test_half_a_micro_batch_gives_another_gradient(job) -> None:
    spec, train, params, sketch, run = job
    honest, half = run(5, 0), run(5, 0, HalfBatch())
    assert half.samples == honest.samples  # it claims the whole batch
    assert not np.allclose(half.sketch, honest.sketch)


def test_a_stale_gradient_is_the_one_of_the_step_before(job) -> None:
    spec, train, params, sketch, run = job
    cheat = StaleGradient()
    first, second = run(5, 0, cheat), run(6, 0, cheat)
    assert np.array_equal(first.sketch, run(5, 0).sketch)  # nothing earlier to reuse: honest
    assert all(torch.equal(a, b) for a, b in zip(second.grads, run(5, 0).grads, strict=True))
    assert np.array_equal(second.sketch, first.sketch)


def test_a_copied_commitment_is_the_co_workers_gradient_and_sketch(job) -> None:
    spec, train, params, sketch, run = job
    cheat = _bound(CopiedCommitment(), spec, train, params, sketch)
    copied, other = run(5, 0, cheat), run(5, 1)
    assert all(torch.equal(a, b) for a, b in zip(copied.grads, other.grads, strict=True))
    assert np.array_equal(copied.sketch, other.sketch) and not np.array_equal(copied.sketch, run(5, 0).sketch)
    assert np.array_equal(run(6, 0, cheat).sketch, run(6, 1).sketch)  # the micro-step count starts again per step


def test_an_honest_commitment_with_another_gradient_sent(job) -> None:
    spec, train, params, sketch, run = job
    honest = run(5, 0)
    cheat = _bound(HonestCommitmentOtherGradient(), spec, train, params, sketch)
    done = run(5, 0, cheat)
    assert np.array_equal(done.sketch, honest.sketch)  # no sketch pins it ...
    assert all(not g.any() for g in done.grads)  # ... but the all-reduce gets something else


def test_a_cheat_is_named_by_a_shipped_name_or_module_and_name() -> None:
    assert all(check_ref(n) == n for n in SHIPPED)
    assert isinstance(load_cheat("half_batch"), HalfBatch)
    assert isinstance(load_cheat("gpucoin.runtime.cheats:StaleGradient"), StaleGradient)
    for bad in ("no_such_cheat", "a:b:c", "mod:", "1mod:x", ""):
        with pytest.raises(ValueError, match="MODULE:NAME"):
            check_ref(bad)
    with pytest.raises(ValueError, match="has none of"):
        load_cheat("gpucoin.runtime.cheats:CheatContext")
    with pytest.raises(ImportError):
        load_cheat("gpucoin.no_such_module:Cheat")


def test_the_node_variable_makes_only_the_named_rank_cheat_in_the_first_attempt(job, monkeypatch) -> None:
    spec, train, params, sketch, run = job
    names = [n for n, _ in params]
    monkeypatch.setenv(faults.FAULT_CHEAT_ENV, "copied_commitment@1")
    assert faults.rank_cheat(0, spec, train, sketch, names) is None
    cheat = faults.rank_cheat(1, spec, train, sketch, names)
    assert isinstance(cheat, CopiedCommitment) and cheat.ctx.spec is spec  # bound to its job
    assert faults.rank_cheat(1, spec, train, sketch, names, attempt=1) is None  # its replacement, after a Rewind
    monkeypatch.setenv(faults.FAULT_CHEAT_ENV, "copied_commitment@*")  # a node that cheats: any rank, any attempt
    assert all(faults.rank_cheat(r, spec, train, sketch, names, attempt=a) for r in (0, 1) for a in (0, 2))
    monkeypatch.setenv(faults.FAULT_CHEAT_ENV, "half_batch")
    with pytest.raises(ValueError, match="@<rank>"):
        faults.rank_cheat(0, spec, train, sketch, names)
    monkeypatch.delenv(faults.FAULT_CHEAT_ENV)
    monkeypatch.setenv(faults.FAULT_SKIP_ENV, "1")
    assert isinstance(faults.rank_cheat(0, spec, train, sketch, names), faults.SkipSequences)
