"""Judging an end checkpoint file by file: the AdamW-consistency test and the verdict rules (no files)."""

from __future__ import annotations

import math

import pytest
import torch

from gpucoin.verify.compare import EndOutcome, FileCheck, RankVerdict, judge_end
from gpucoin.verify.endcheck import AdamHyper, adam_inconsistency

H = AdamHyper(lr=2e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, step=5)


def _adam_step(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One step of torch's own AdamW from (w, m, v) with gradient g, Adam's count then H.step."""
    p = torch.nn.Parameter(w.clone())
    opt = torch.optim.AdamW([p], lr=H.lr, betas=H.betas, eps=H.eps, weight_decay=H.weight_decay)
    opt.state[p] = {"step": torch.tensor(float(H.step - 1)), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    p.grad = g.clone()
    opt.step()
    return p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()


@pytest.fixture
def before() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    w = 0.02 * torch.randn(5000, generator=g)
    m = 1e-3 * torch.randn(5000, generator=g)
    v = 1e-6 * torch.rand(5000, generator=g)
    return w, m, v


def test_any_honest_adamw_step_is_consistent_whatever_the_gradient(before) -> None:
    g = torch.Generator().manual_seed(1)
    for scale in (1e-4, 1e-2, 1.0):
        after = _adam_step(*before, scale * torch.randn(5000, generator=g))
        assert adam_inconsistency(before, after, H) < 1e-4, scale


@pytest.mark.parametrize("which", [0, 1, 2])
def test_a_step_that_is_no_adamw_step_is_named(before, which) -> None:
    after = list(_adam_step(*before, 1e-3 * torch.randn(5000, generator=torch.Generator().manual_seed(2))))
    after[which] = after[which] * 1.01  # weights, first or second moment off by 1 %
    assert adam_inconsistency(before, tuple(after), H) > 1e-3


def test_nan_and_negative_moments_are_never_consistent(before) -> None:
    w, m, v = _adam_step(*before, torch.randn(5000))
    assert math.isnan(adam_inconsistency(before, (w, m, -v), H)) or adam_inconsistency(before, (w, m, -v), H) > 1
    assert not adam_inconsistency(before, (w * float("nan"), m, v), H) <= 1e-3


def _v(rank: int, verdict: str = "pass", d: float = 0.0) -> RankVerdict:
    return RankVerdict(rank, verdict, d, None)


def _c(rank: int, outcome: EndOutcome, name: str | None = None) -> FileCheck:
    dist = {EndOutcome.MATCH: 0.0, EndOutcome.BROKEN: math.inf}.get(outcome, 0.5)
    return FileCheck(name or f"file{rank}", rank, outcome, dist, None if outcome == EndOutcome.MATCH else "why")


def _verdicts(out: list[RankVerdict]) -> list[str]:
    return [v.verdict for v in out]


def test_a_matching_end_checkpoint_keeps_the_pass() -> None:
    out = judge_end([_v(0), _v(1)], [_c(0, EndOutcome.MATCH), _c(1, EndOutcome.MATCH)])
    assert _verdicts(out) == ["pass", "pass"]


def test_a_broken_file_fails_its_writer_whatever_the_sketches_said() -> None:
    for sketch in (["pass", "pass"], ["void", "void"], ["pass", "fail"]):
        out = judge_end([_v(0, sketch[0]), _v(1, sketch[1])], [_c(0, EndOutcome.BROKEN), _c(1, EndOutcome.MATCH)])
        assert out[0].verdict == "fail" and out[0].max_distance == math.inf and out[1].verdict == sketch[1]


def test_a_step_no_adamw_step_explains_fails_its_writer_alone() -> None:
    out = judge_end([_v(0), _v(1)], [_c(0, EndOutcome.MATCH), _c(1, EndOutcome.NOT_ADAM)])
    assert _verdicts(out) == ["pass", "fail"]


def test_a_diverged_file_names_nobody_in_a_job_of_several_ranks() -> None:
    # an AdamW step for another gradient: a co-worker that fed the all-reduce explains it too
    out = judge_end(
        [_v(0), _v(1), _v(2)], [_c(0, EndOutcome.MATCH), _c(1, EndOutcome.DIVERGED), _c(2, EndOutcome.MATCH)]
    )
    assert _verdicts(out) == ["void", "void", "void"]
    out = judge_end([_v(0), _v(1)], [_c(0, EndOutcome.DIVERGED), _c(1, EndOutcome.NOT_ADAM)])
    assert _verdicts(out) == ["void", "fail"]
    # alone, nobody else touched its state
    assert _verdicts(judge_end([_v(0)], [_c(0, EndOutcome.DIVERGED)])) == ["fail"]


def test_after_a_sketch_mismatch_only_broken_files_count() -> None:
    # the replayed end state is not the job's then: honest files differ from it and must not convict
    checks = [_c(0, EndOutcome.DIVERGED), _c(1, EndOutcome.NOT_ADAM)]
    assert _verdicts(judge_end([_v(0, "fail"), _v(1)], checks)) == ["fail", "pass"]
    assert _verdicts(judge_end([_v(0, "void"), _v(1, "void")], checks)) == ["void", "void"]
