"""The policy schema: the shipped policies load, bad ones fail with one line naming the field."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from gpucoin.exceptions import PolicyError
from gpucoin.policy.model import (
    SHIPPED_POLICIES_DIR,
    Policy,
    canonical_json,
    load_policy,
    parse_policy,
    policy_hash,
    resolve_policy,
)

POLICIES = SHIPPED_POLICIES_DIR
DEFAULT = POLICIES / "default.toml"
LOCAL = POLICIES / "local.toml"


def _edited(tmp_path: Path, old: str, new: str) -> Path:
    """default.toml with one line's text replaced, written to a temp file."""
    text = DEFAULT.read_text()
    assert old in text, old
    out = tmp_path / "edited.toml"
    out.write_text(text.replace(old, new, 1))
    return out


def _error(path: Path) -> str:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


def test_default_policy_loads_with_the_documented_numbers() -> None:
    p = load_policy(DEFAULT)
    assert p.name == "default" and p.version == 3 and p.chain_id == 31337
    assert p.market.clearing == "uniform" and p.market.min_bond_ugpc == 100_000_000
    assert p.market.allow_preemption is False
    t = p.tokenomics
    assert (t.mode, t.burn_share_bps, t.treasury_share_bps) == ("burn_and_mint", 9000, 1000)
    assert (t.worker_share_bps, t.verifier_share_bps) == (8000, 2000)
    assert t.hard_cap_ugpc == 10**15 and t.epoch_length_s == 86400
    assert t.initial_emission_ugpc == 50_000_000_000 and t.emission_halving_epochs == 365
    v = p.verification
    assert (v.check_probability, v.new_node_check_probability, v.new_node_intervals) == (0.1, 1.0, 2)
    assert (v.sketch_buckets, v.tolerance_rel_l2, v.challenge_window_s) == (256, 1e-3, 3600)
    assert (p.slashing.fraud_slash_fraction_bps, p.slashing.whistleblower_share_bps) == (5000, 2000)
    assert p.bonding.unbonding_epochs == 7


def test_the_shipped_policies_vet_the_main_jobs_package_as_it_is() -> None:
    """A change to the main job's code changes its hash: it must be reviewed and the policies' list
    updated (and the policies' version bumped), or its ranks could no longer be slashed."""
    from gpucoin.spec import package_hash

    main_job = package_hash(Path(__file__).resolve().parents[2] / "jobs" / "shakespeare_char")
    for path in (DEFAULT, LOCAL):
        assert load_policy(path).verification.vetted_packages == (main_job,), path


def test_vetted_packages_must_be_hashes(tmp_path) -> None:
    text = DEFAULT.read_text()
    bad = text.replace('"0x8b69', '"0X8B69', 1)
    path = tmp_path / "bad.toml"
    path.write_text(bad)
    assert "vetted_packages" in _error(path)


def test_local_policy_differs_from_default_only_in_name_epoch_window_timeout_recheck_ban_and_emission() -> None:
    d = load_policy(DEFAULT).model_dump()
    loc = load_policy(LOCAL).model_dump()
    assert loc["name"] == "local"
    assert loc["tokenomics"]["epoch_length_s"] == 10
    assert loc["verification"]["challenge_window_s"] == 0
    loc["name"] = "default"
    loc["tokenomics"]["epoch_length_s"] = d["tokenomics"]["epoch_length_s"]
    loc["verification"]["challenge_window_s"] = d["verification"]["challenge_window_s"]
    assert loc["verification"]["recheck_share_bps"] == 0  # the embedded mode has one verifier: nobody to re-check it
    loc["verification"]["recheck_share_bps"] = d["verification"]["recheck_share_bps"]
    assert loc["slashing"]["ban_after_frauds"] > d["slashing"]["ban_after_frauds"]  # dev volunteers cheat on request
    loc["slashing"]["ban_after_frauds"] = d["slashing"]["ban_after_frauds"]
    assert loc["metering"]["interval_timeout_s"] < d["metering"]["interval_timeout_s"]  # a demo gives up sooner
    loc["metering"]["interval_timeout_s"] = d["metering"]["interval_timeout_s"]
    epochs_per_default_epoch = d["tokenomics"]["epoch_length_s"] // 10
    # same emission per second (to the µGPC) and the same halving time in days
    assert (
        loc["tokenomics"]["initial_emission_ugpc"]
        == d["tokenomics"]["initial_emission_ugpc"] // epochs_per_default_epoch
    )
    assert (
        loc["tokenomics"]["emission_halving_epochs"]
        == d["tokenomics"]["emission_halving_epochs"] * epochs_per_default_epoch
    )
    for k in ("initial_emission_ugpc", "emission_halving_epochs"):
        loc["tokenomics"][k] = d["tokenomics"][k]
    assert loc == d


def test_unknown_key_in_a_section_is_named(tmp_path: Path) -> None:
    msg = _error(_edited(tmp_path, "allow_preemption = false", "allow_preemption = false\nallow_premption = true"))
    assert "market.allow_premption" in msg and "unknown key" in msg


def test_unknown_top_level_section_is_named(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(DEFAULT.read_text() + "\n[governance]\nquorum = 3\n")
    msg = _error(path)
    assert "governance" in msg and "unknown key" in msg


def test_burn_and_treasury_shares_must_sum_to_10000(tmp_path: Path) -> None:
    msg = _error(_edited(tmp_path, "burn_share_bps = 9000", "burn_share_bps = 8500"))
    assert "tokenomics" in msg and "burn_share_bps + treasury_share_bps" in msg and "9500" in msg


def test_worker_and_verifier_shares_must_sum_to_10000(tmp_path: Path) -> None:
    msg = _error(_edited(tmp_path, "verifier_share_bps = 2000", "verifier_share_bps = 2001"))
    assert "worker_share_bps + verifier_share_bps" in msg and "10001" in msg


def test_float_money_is_refused(tmp_path: Path) -> None:
    msg = _error(_edited(tmp_path, "min_bond_ugpc = 100_000_000", "min_bond_ugpc = 1e8"))
    assert "market.min_bond_ugpc" in msg and "integer" in msg and "100000000.0" in msg


def test_float_emission_is_refused(tmp_path: Path) -> None:
    msg = _error(_edited(tmp_path, "initial_emission_ugpc = 50_000_000_000", "initial_emission_ugpc = 5.0e10"))
    assert "tokenomics.initial_emission_ugpc" in msg and "integer" in msg


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("burn_share_bps = 9000", "burn_share_bps = 10001", "tokenomics.burn_share_bps"),
        ("fraud_slash_fraction_bps = 5000", "fraud_slash_fraction_bps = -1", "slashing.fraud_slash_fraction_bps"),
        ("check_probability = 0.1", "check_probability = 1.5", "verification.check_probability"),
        (
            "new_node_check_probability = 1.0",
            "new_node_check_probability = nan",
            "verification.new_node_check_probability",
        ),
        ("tolerance_rel_l2 = 1e-3", "tolerance_rel_l2 = 0.0", "verification.tolerance_rel_l2"),
        ('clearing = "uniform"', 'clearing = "vickrey"', "market.clearing"),
        ('mode = "burn_and_mint"', 'mode = "inflation"', "tokenomics.mode"),
        ("allow_preemption = false", "allow_preemption = 0", "market.allow_preemption"),
        ("epoch_length_s = 86400", "epoch_length_s = 0", "tokenomics.epoch_length_s"),
        ("sketch_buckets = 256", "sketch_buckets = true", "verification.sketch_buckets"),
        ("chain_id = 31337", 'chain_id = "31337"', "chain_id"),
        (
            "hard_cap_ugpc = 1_000_000_000_000_000",
            "hard_cap_ugpc = 9_223_372_036_854_775_808",
            "tokenomics.hard_cap_ugpc",
        ),
    ],
)
def test_bad_values_name_their_field(tmp_path: Path, old: str, new: str, field: str) -> None:
    msg = _error(_edited(tmp_path, old, new))
    assert f": {field}:" in msg


def test_missing_key_is_named(tmp_path: Path) -> None:
    msg = _error(_edited(tmp_path, "unbonding_epochs = 7", ""))
    assert "bonding.unbonding_epochs" in msg and "missing" in msg


def test_new_nodes_cannot_be_checked_less_than_established_ones(tmp_path: Path) -> None:
    msg = _error(_edited(tmp_path, "new_node_check_probability = 1.0", "new_node_check_probability = 0.05"))
    assert "new_node_check_probability" in msg and "check_probability" in msg


def test_emission_above_the_cap_is_refused(tmp_path: Path) -> None:
    path = _edited(tmp_path, "hard_cap_ugpc = 1_000_000_000_000_000", "hard_cap_ugpc = 1_000")
    assert "initial_emission_ugpc" in _error(path)


def test_invalid_toml_and_missing_file_are_policy_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    assert "not valid TOML" in _error(bad)
    missing = tmp_path / "nope.toml"
    assert "cannot read" in _error(missing)


def test_several_problems_still_give_one_line() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy({"name": "x"}, "dict")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("dict: ") and "more problems" in msg


def test_policy_is_immutable() -> None:
    p = load_policy(DEFAULT)
    with pytest.raises(ValidationError):
        p.market.min_bond_ugpc = 1  # type: ignore[misc]


def test_policy_hash_is_keccak_of_canonical_json_and_tracks_every_value() -> None:
    p = load_policy(DEFAULT)
    h = policy_hash(p)
    assert re.fullmatch(r"0x[0-9a-f]{64}", h)
    assert h == policy_hash(load_policy(DEFAULT))
    assert h != policy_hash(load_policy(LOCAL))
    # The well-known keccak256 of the empty string, to pin the hash function (not sha3-256).
    from eth_utils import keccak

    assert keccak(text="").hex() == "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    assert h == "0x" + keccak(text=canonical_json(p)).hex()
    data = tomllib.loads(DEFAULT.read_text())
    data["tokenomics"]["emission_halving_epochs"] = 366
    assert policy_hash(Policy.model_validate(data)) != h


def test_policy_hash_does_not_depend_on_key_order() -> None:
    data = tomllib.loads(DEFAULT.read_text())
    reordered = {
        k: (dict(reversed(list(v.items()))) if isinstance(v, dict) else v) for k, v in reversed(list(data.items()))
    }
    assert policy_hash(parse_policy(reordered)) == policy_hash(parse_policy(data))


def test_a_policy_is_named_or_a_file(tmp_path: Path, monkeypatch) -> None:
    assert resolve_policy("local") == load_policy(LOCAL)
    _edited(tmp_path, "version = ", "version = 9\nold_version = ")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PolicyError, match="edited.toml"):
        resolve_policy("edited.toml")  # a file, relative to here: read and checked like any other
    with pytest.raises(PolicyError, match="no policy 'mainnet': the shipped ones are default, local"):
        resolve_policy("mainnet")
