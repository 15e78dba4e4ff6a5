"""The job spec's closed schema and the data order (pure, no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpucoin.exceptions import SpecError
from gpucoin.runtime.data_order import micro_batch, window_offsets
from gpucoin.runtime.schedule import lr_at
from gpucoin.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "shakespeare_char" / "job.yaml"


@pytest.fixture
def edited(tmp_path):
    """Write the main spec with one text edit into a private copy of the job package."""
    from tests.conftest import write_spec

    def make(old, new):
        return write_spec(tmp_path, {old: new}, excerpt=False)

    return make


def test_main_job_spec_loads():
    s = load_spec(JOB).spec
    assert s.workers == 2 and s.deepspeed.zero_stage == 2
    assert s.bid_ugpc_per_worker_hour == 2_000_000 and s.budget_ugpc == 5_000_000
    assert s.intervals()[0] == (0, 50) and s.intervals()[-1][1] == s.steps


def test_unknown_key_is_an_error_naming_it(edited):
    with pytest.raises(SpecError, match=r"deepspeed.zero_stag: unknown key"):
        load_spec(edited("  zero_stage: 2", "  zero_stag: 2"))


@pytest.mark.parametrize("bad", ['"-1"', "-1", '"1.0000001"', '"abc"'])
def test_bad_bid_is_an_error(edited, bad):
    with pytest.raises(SpecError, match="bid_gpc_per_worker_hour"):
        load_spec(edited('bid_gpc_per_worker_hour: "2"', f"bid_gpc_per_worker_hour: {bad}"))


def test_overrides_replace_keys_and_are_validated():
    assert load_spec(JOB, {"steps": 10, "checkpoint_interval_steps": 5}).spec.intervals() == [(0, 5), (5, 10)]
    with pytest.raises(SpecError, match="workers"):
        load_spec(JOB, {"workers": 0})
    with pytest.raises(SpecError, match="exceeds steps"):
        load_spec(JOB, {"steps": 10, "checkpoint_interval_steps": 50})


def test_unreadable_or_non_mapping_spec(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(p)


def test_window_offsets_are_a_pure_function_of_seed_step_rank_micro():
    a = window_offsets(1, 5, 0, 0, 8, 10_000, 64)
    assert np.array_equal(a, window_offsets(1, 5, 0, 0, 8, 10_000, 64))
    assert not np.array_equal(a, window_offsets(1, 5, 1, 0, 8, 10_000, 64))
    assert not np.array_equal(a, window_offsets(1, 6, 0, 0, 8, 10_000, 64))
    assert not np.array_equal(a, window_offsets(1, 5, 0, 1, 8, 10_000, 64))
    assert a.min() >= 0 and a.max() < 10_000 - 64 - 1
    tokens = np.arange(10_000) % 251
    x, y = micro_batch(tokens.astype(np.uint8), a, 64)
    assert tuple(x.shape) == (8, 64) and (y[:, :-1] == x[:, 1:]).all()


def test_lr_schedule_warms_up_then_decays_to_min():
    lrs = [lr_at(s, 100, 1e-3, 1e-4, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    with pytest.raises(ValueError):
        lr_at(100, 100, 1e-3, 1e-4, 10)


@pytest.mark.parametrize("name", ["keys.yaml", "__pycache__/x.pyc", "helper.py"])
def test_a_package_with_a_symlink_anywhere_is_refused(tmp_path, name):
    """Even where the hash skips a file (specs, bytecode), a link would be shipped and copied:
    ``keys.yaml -> a keystore`` must not reach the nodes."""
    from tests.conftest import write_spec

    spec = write_spec(tmp_path / "job")
    link = spec.parent / name
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(tmp_path / "secret")
    (tmp_path / "secret").write_text("key")
    with pytest.raises(SpecError, match="symbolic link"):
        load_spec(spec)


def test_a_missing_package_directory_has_no_hash(tmp_path) -> None:
    """It used to hash as an empty package, which a policy could then list as vetted."""
    from gpucoin.exceptions import SpecError
    from gpucoin.spec import package_hash

    with pytest.raises(SpecError, match="no such directory"):
        package_hash(tmp_path / "nowhere")
