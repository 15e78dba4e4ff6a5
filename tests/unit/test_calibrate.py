"""The calibration summary (``verify.calibrate``): spreads and the suggested tolerance, pure."""

from __future__ import annotations

import math

import pytest

from gpucoin.verify.calibrate import CROSS_HARDWARE_NOISE, Spread, suggest_tolerance


def test_a_spread_is_count_smallest_median_largest() -> None:
    assert Spread.of([3.0, 1.0, 2.0]) == Spread(n=3, low=1.0, median=2.0, high=3.0)
    with pytest.raises(ValueError, match="no distances"):
        Spread.of([])


def test_the_tolerance_sits_at_the_geometric_mean_of_honest_noise_and_the_smallest_cheat() -> None:
    tol, why = suggest_tolerance([0.0, 0.0], {"half_batch": [0.03, 0.05], "zero_gradient": [1.0]})
    assert tol == pytest.approx(math.sqrt(CROSS_HARDWARE_NOISE * 0.03))  # exact honest replays: the noise floor
    assert "half_batch" in why and "0.0e+00" in why
    tol, _ = suggest_tolerance([1e-5], {"half_batch": [0.04]})
    assert tol == pytest.approx(math.sqrt(1e-5 * 0.04))  # a measured honest spread above the floor counts


def test_the_cheat_no_sketch_pins_is_left_out_and_nothing_separable_is_refused() -> None:
    tol, why = suggest_tolerance([0.0], {"honest_commitment_other_gradient": [0.0, 0.0], "half_batch": [0.02]})
    assert "half_batch" in why and tol < 0.02
    # a step where the cheat did not depart (a stale gradient's first) says nothing about its distance
    tol, why = suggest_tolerance([0.0], {"stale_gradient": [0.0, 0.5]})
    assert "stale_gradient" in why and tol == pytest.approx(math.sqrt(CROSS_HARDWARE_NOISE * 0.5))
    with pytest.raises(ValueError, match="no cheat showed"):
        suggest_tolerance([0.0], {"honest_commitment_other_gradient": [0.0]})
    with pytest.raises(ValueError, match="is not above the honest"):
        suggest_tolerance([0.5], {"half_batch": [0.02]})
    with pytest.raises(ValueError, match="no honest"):
        suggest_tolerance([], {"half_batch": [0.02]})


def test_calibrate_refuses_a_bad_spec_in_one_line(tmp_path) -> None:
    from click.testing import CliRunner

    from gpucoin.cli.main import cli

    bad = tmp_path / "job.yaml"
    bad.write_text("name: x\nlearning_rate: 0.1\n")
    for path in (tmp_path / "missing.yaml", bad):
        r = CliRunner().invoke(cli, ["verify", "calibrate", str(path), "--intervals", "1"])
        assert r.exit_code != 0 and r.output.count("\n") == 1 and r.output.startswith("error: "), r.output
        assert "Traceback" not in r.output
