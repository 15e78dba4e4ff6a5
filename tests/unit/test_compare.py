"""Sketch comparison and the sampling draw (pure, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpucoin.runtime.sketch import CountSketch
from gpucoin.verify.commitment import sketch_root
from gpucoin.verify.compare import compare_interval, rel_l2
from gpucoin.verify.sampling import draw, is_checked


def test_rel_l2_is_relative_to_the_replayed_sketch():
    b = np.array([3.0, 4.0])
    assert rel_l2(b, b) == 0.0
    assert rel_l2(b * 1.1, b) == pytest.approx(0.1)
    assert rel_l2(b * 1000 * 1.1, b * 1000) == pytest.approx(0.1)  # scale-free
    assert rel_l2(np.zeros(2), np.zeros(2)) == 0.0
    assert rel_l2(np.ones(2), np.zeros(2)) == float("inf")
    with pytest.raises(ValueError):
        rel_l2(np.ones(2), np.ones(3))


def _interval(rng, R=2, K=4, B=64):
    return rng.normal(size=(R, K, B))


def test_honest_noise_passes_and_names_no_step():
    rng = np.random.default_rng(0)
    rep = _interval(rng)
    com = rep * (1 + 1e-7 * rng.normal(size=rep.shape))  # fp32 reordering noise
    v = compare_interval(100, com, rep, 1e-3)
    assert [x.passed for x in v] == [True, True]
    assert all(x.first_bad_step is None and x.max_distance < 1e-6 for x in v)


def test_cheating_rank_is_named_at_its_first_bad_step_and_honest_rank_is_not():
    rng = np.random.default_rng(1)
    rep = _interval(rng)
    com = rep.copy()
    com[1, 2] = rep[1, 2] * 0.9 + 0.1 * rng.normal(size=rep.shape[2])  # rank 1 deviates at step 102
    com[0, 3] = rng.normal(size=rep.shape[2])  # later steps diverge for everyone once weights differ
    v = compare_interval(100, com, rep, 1e-3)
    assert v[1].passed is False and v[1].first_bad_step == 102
    assert v[0].passed is True and v[0].first_bad_step is None


def test_another_ranks_sketch_does_not_pass():
    rng = np.random.default_rng(2)
    rep = _interval(rng)
    com = rep[::-1].copy()  # ranks swapped: each committed the other's gradient
    assert not any(x.passed for x in compare_interval(0, com, rep, 1e-3))


def test_ranks_that_diverge_together_are_void_never_slashed():
    """A poisoned all-reduce reaches every rank: from the next step every honest rank's gradient is
    computed on corrupted weights, so all of them mismatch at once. Nobody is named."""
    rng = np.random.default_rng(3)
    rep = _interval(rng, R=3)
    com = rep.copy()
    com[:, 2:] = rng.normal(size=com[:, 2:].shape)  # every rank diverges from step 102 on
    v = compare_interval(100, com, rep, 1e-3)
    assert [x.verdict for x in v] == ["void"] * 3 and all(x.first_bad_step == 102 for x in v)
    assert not any(x.passed for x in v)


def test_one_rank_alone_is_answerable_for_its_own_state():
    """With one rank no other party touched its weights: its mismatch is its own."""
    rng = np.random.default_rng(4)
    rep = _interval(rng, R=1)
    com = rep.copy()
    com[0, 1] *= 1.5
    assert [x.verdict for x in compare_interval(0, com, rep, 1e-3)] == ["fail"]


def test_blame_needs_a_co_worker_that_agrees():
    from gpucoin.verify.compare import blame

    assert blame([False, False]) == ["pass", "pass"]
    assert blame([True, False, False]) == ["fail", "pass", "pass"]
    assert blame([True, True, False]) == ["fail", "fail", "pass"]
    assert blame([True, True]) == ["void", "void"]
    assert blame([True]) == ["fail"]


def test_compare_refuses_bad_input():
    z = np.zeros((2, 3, 4))
    with pytest.raises(ValueError):
        compare_interval(0, z, z, 0.0)
    with pytest.raises(ValueError):
        compare_interval(0, z, np.zeros((2, 3, 5)), 1e-3)


def test_count_sketch_is_linear_and_seeded():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000))
    a, b = torch.randn(1000), torch.randn(1000)
    s = CountSketch([p], 32, seed=7)
    assert np.allclose(s.sketch(0, a + b).numpy(), s.sketch(0, a).numpy() + s.sketch(0, b).numpy())
    s2 = CountSketch([p], 32, seed=7)
    assert np.array_equal(s.sketch(0, a).numpy(), s2.sketch(0, a).numpy())
    s3 = CountSketch([p], 32, seed=8)
    assert not np.array_equal(s.sketch(0, a).numpy(), s3.sketch(0, a).numpy())


def test_the_sketch_of_a_models_gradient_is_the_sum_of_its_parameters_sketches():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    s = CountSketch(lin.parameters(), 16, seed=1)
    grads = torch.autograd.grad(lin(torch.randn(5, 8)).pow(2).sum(), list(lin.parameters()))
    whole = s.sketch_grads(grads)
    assert np.allclose(whole, s.sketch(0, grads[0]).numpy() + s.sketch(1, grads[1]).numpy())
    assert np.array_equal(s.sketch_grads([grads[0], None]), s.sketch(0, grads[0]).numpy())
    assert not np.array_equal(s.sketch_grads([2 * grads[0], grads[1]]), whole)


def test_sketch_root_commits_to_values_and_start_step():
    sk = np.arange(12, dtype=np.float64).reshape(3, 4)
    r = sketch_root(10, sk)
    assert r == sketch_root(10, sk.copy())
    assert r != sketch_root(11, sk)
    sk2 = sk.copy()
    sk2[2, 3] = np.nextafter(sk2[2, 3], 100)
    assert r != sketch_root(10, sk2)
    with pytest.raises(ValueError):
        sketch_root(0, sk.astype(np.float32))


def test_draw_is_keyed_uniform_and_rate_matches_probability():
    secret = b"s" * 32
    d = ["0x" + "ab" * 32, "0x" + "cd" * 32]
    assert draw(secret, d) == draw(secret, list(d))
    assert draw(secret, d) != draw(b"t" * 32, d)
    n, p = 4000, 0.1
    hits = sum(is_checked(secret, [f"0x{i:064x}"], p) for i in range(n))
    assert abs(hits / n - p) < 4 * (p * (1 - p) / n) ** 0.5
    assert is_checked(secret, d, 1.0) and not is_checked(secret, d, 0.0)
    with pytest.raises(ValueError):
        draw(b"short", d)
