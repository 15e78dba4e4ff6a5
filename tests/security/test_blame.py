"""An honest rank is never slashed by what another rank does (issue 9, blame), at the verifier's level.

The replay (``gpucoin.verify.replay.replay_interval``) and the verdicts (``compare_interval``) run
here in this process on the main job's tiny model with three ranks, no Ray: the committed
sketches of honest ranks are what an honest computation gives (the replay is bit-exact with
DeepSpeed, ``tests/integration/test_fraud_and_zero_stages.py``), an attacker's are computed from
the state it chose.

- Framing through the start checkpoint: rank 2 overwrites the step-0 checkpoint with other
  weights and commits its own first sketches at them. A replay that loaded that file (what the
  verifier did before) convicts the two honest ranks; the replay now derives step 0 from the
  spec's seed and convicts rank 2 alone.
- A poisoned all-reduce: every rank diverges at once; nobody is convicted (void).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from gpucoin.spec import load_spec
from gpucoin.verify import replay as replay_module
from gpucoin.verify.compare import compare_interval
from gpucoin.verify.consolidate import initial_state
from tests.conftest import EXCERPT, TINY_MODEL, write_spec

BUCKETS = 64
TOL = 1e-3


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    d = tmp_path_factory.mktemp("job")
    path = write_spec(d, {**TINY_MODEL, "workers: 2": "workers: 3"})
    sys.path.insert(0, str(d))  # the job's package, as Ray ships it to a verifier
    try:
        yield load_spec(path, {"steps": 4, "checkpoint_interval_steps": 2}).spec
    finally:
        sys.path.remove(str(d))


def replay(spec, monkeypatch=None, start=None) -> np.ndarray:
    """(W, K, B) sketches of steps 0-2 from the derived state, or from ``start`` (a state some file held)."""
    if start is not None:
        monkeypatch.setattr(replay_module, "initial_state", lambda *a, **k: start)
    try:
        return replay_module.replay_interval(spec, str(EXCERPT), None, 0, 2, BUCKETS).sketches
    finally:
        if start is not None:
            monkeypatch.undo()


def overwritten_start(spec):
    """The state rank 2 put in the step-0 checkpoint file: the true one with every weight nudged."""
    module = __import__(spec.module)
    corpus = module.prepare_corpus(str(EXCERPT), val_fraction=spec.data.val_fraction)
    torch.manual_seed(spec.seed)
    model = module.build_model(spec.model.model_dump(), corpus.vocab_size)
    state = initial_state(model, spec.deepspeed.zero_stage, spec.workers)
    g = torch.Generator().manual_seed(7)
    for w in state.weights.values():
        w.add_(1e-2 * torch.randn(w.shape, generator=g))
    return state


def test_an_overwritten_start_checkpoint_frames_nobody(spec, monkeypatch) -> None:
    honest = replay(spec)  # what ranks that trained from the true initialization commit
    forged = replay(spec, monkeypatch, overwritten_start(spec))  # what rank 2 computed at its own weights
    committed = honest.copy()
    committed[2] = forged[2]

    # the old verifier replayed from the file on disk: the honest ranks would have been the cheaters
    then = compare_interval(0, committed, forged, TOL)
    assert [v.verdict for v in then] == ["fail", "fail", "pass"]

    # now the state before step 0 follows from the seed: only rank 2 is convicted
    now = compare_interval(0, committed, replay(spec), TOL)
    assert [v.verdict for v in now] == ["pass", "pass", "fail"] and now[2].first_bad_step == 0


def test_a_poisoned_all_reduce_convicts_nobody(spec) -> None:
    honest = replay(spec)
    committed = honest.copy()
    committed[:, 1] += 0.5 * np.abs(honest[:, 1]).max()  # every rank computed step 1 on poisoned weights
    assert [v.verdict for v in compare_interval(0, committed, honest, TOL)] == ["void"] * 3
