"""Test fault injection scoped to jobs: a node of a test's market cheats only in the jobs named for it."""

from __future__ import annotations

import json

import pytest

from gpucoin.runtime import faults
from gpucoin.runtime.faults import FAULT_CHECKPOINT_ENV, FAULT_SKIP_ENV, FAULTS_BY_JOB_ENV


@pytest.fixture
def clean_env(monkeypatch):
    for name in (*faults.FAULT_VARS, FAULTS_BY_JOB_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_fault_applies_only_to_the_jobs_its_prefix_names(clean_env) -> None:
    by_job = {"cheat-": {FAULT_SKIP_ENV: "2"}, "alter-": {FAULT_CHECKPOINT_ENV: "alter@4"}}
    clean_env.setenv(FAULTS_BY_JOB_ENV, json.dumps(by_job))
    faults.scope_to_job("honest-20261207-1200-ab12")
    assert faults.skipped_sequences() == 0 and faults.checkpoint_attack(4) is None
    faults.scope_to_job("cheat-20261207-1200-ab12")
    assert faults.skipped_sequences() == 2 and faults.checkpoint_attack(4) is None
    faults.scope_to_job("alter-20261207-1200-ab12")
    assert faults.checkpoint_attack(4) == "alter" and faults.checkpoint_attack(8) is None


@pytest.mark.parametrize("raw", ["[1]", '{"x-": 3}', '{"x-": {"PATH": "/tmp"}}', "not json"])
def test_a_malformed_scope_is_refused_and_sets_nothing_else(clean_env, raw) -> None:
    clean_env.setenv(FAULTS_BY_JOB_ENV, raw)
    with pytest.raises(ValueError):
        faults.scope_to_job("x-1")
    assert faults.skipped_sequences() == 0
