"""A checkpoint file a worker wrote cannot run code in the process that loads it (issue 9, part 1).

Real DeepSpeed 0.19 checkpoints of a tiny model (ZeRO 0, 1 and 2, one rank, written by
``tests/security/ds_checkpoint.py`` in a child process) load through gpucoin's weights-only path.
Then one of their files is replaced by a crafted pickle that, loaded the ordinary way, runs code
(it writes a marker file: shown in a child process). On each load path, the verifier's
consolidation, a co-worker's resume through DeepSpeed's engine, the coordinator's evaluation,
the crafted file is refused with ``UnsafeCheckpoint`` and the marker is never written. No Ray.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpucoin.exceptions import BadCommittedFile
from gpucoin.runtime.safe_load import UnsafeCheckpoint, safe_torch_load, verified_copy
from gpucoin.storage import ContentStore, commit_checkpoint
from gpucoin.verify.consolidate import load_consolidated
from tests.security.ds_checkpoint import model

REPO = Path(__file__).resolve().parents[2]
TAG = "step00000001"
NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


def _child(*args: str) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "tests.security.ds_checkpoint", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, Path]:
    """ZeRO stage -> a directory holding a real DeepSpeed checkpoint (tag ``step00000001``)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for stage in (0, 1, 2):
        assert _child("save", str(root / f"z{stage}"), str(stage)) == "saved"
        out[stage] = root / f"z{stage}"
    return out


class Payload:
    """Unpickled the ordinary way, writes ``marker``: what an attacker's checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def crafted(src: Path, dst: Path, file: str, marker: Path) -> Path:
    """A copy of checkpoint ``src`` whose ``file`` carries ``Payload`` beside its real contents."""
    shutil.copytree(src, dst)
    path = dst / TAG / file
    state = safe_torch_load(path)
    state["evil"] = Payload(marker)
    torch.save(state, path)
    return dst


def test_real_checkpoints_of_every_zero_stage_load_weights_only(checkpoints) -> None:
    for stage, root in checkpoints.items():
        state = load_consolidated(root / TAG, model(), stage, 1, 1)
        assert set(state.weights) == set(NAMES) and state.global_steps == 1, stage
        assert state.adam_step == 1 and all(state.exp_avg[n].abs().sum() > 0 for n in NAMES), stage
    # DeepSpeed's own consolidation still works on a verified copy (what evaluation hands it)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with verified_copy(checkpoints[2] / TAG) as copy:
        weights = get_fp32_state_dict_from_zero_checkpoint(str(copy), tag=TAG)
        assert all(not (copy / TAG / f).stat().st_mode & 0o222 for f in ("mp_rank_00_model_states.pt",))
    reference = load_consolidated(checkpoints[2] / TAG, model(), 2, 1, 1).weights
    assert all(torch.equal(weights[n], reference[n]) for n in NAMES)


FILES = {
    0: ["mp_rank_00_model_states.pt"],
    2: ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
}


@pytest.mark.parametrize(("stage", "file"), [(s, f) for s, fs in FILES.items() for f in fs])
def test_a_crafted_pickle_runs_nothing_on_any_load_path(checkpoints, tmp_path, stage: int, file: str) -> None:
    marker = tmp_path / "pwned"
    evil = crafted(checkpoints[stage], tmp_path / "evil", file, marker)
    path = evil / TAG / file
    # the payload is live: an ordinary load runs it (in a child process)
    probe = subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0 and marker.read_text() == "code ran", probe.stderr[-2000:]
    marker.unlink()

    # the verifier's consolidation: refused, and the file (so its writer) named
    with pytest.raises(BadCommittedFile, match="refused by a weights-only load") as refused:
        load_consolidated(evil / TAG, model(), stage, 1, 1)
    assert refused.value.name == file
    # a co-worker resuming through DeepSpeed's engine, with gpucoin's checkpoint engine installed
    assert _child("resume", str(evil), str(stage)).startswith("refused UnsafeCheckpoint")
    # the coordinator's evaluation: ZeRO 0 reads the model states, ZeRO 1/2 hands DeepSpeed a verified copy
    if stage == 0:
        with pytest.raises(UnsafeCheckpoint):
            safe_torch_load(path)
    else:
        with pytest.raises(UnsafeCheckpoint), verified_copy(evil / TAG):
            pass
    assert not marker.exists()


def test_a_file_that_is_no_torch_file_is_refused_as_unsafe(checkpoints, tmp_path) -> None:
    shutil.copytree(checkpoints[2], tmp_path / "junk")
    (tmp_path / "junk" / TAG / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x04not a zip at all")
    with pytest.raises(BadCommittedFile, match="refused by a weights-only load") as refused:
        load_consolidated(tmp_path / "junk" / TAG, model(), 2, 1, 1)
    assert refused.value.name == "mp_rank_00_model_states.pt"


def test_the_coordinators_evaluation_refuses_a_crafted_checkpoint(checkpoints, tmp_path) -> None:
    from gpucoin.coordinator.evaluate import evaluate_checkpoint, rebuilt_checkpoint
    from gpucoin.spec import load_spec
    from tests.conftest import TINY_MODEL, write_spec

    marker = tmp_path / "pwned"
    for stage, file in ((0, "mp_rank_00_model_states.pt"), (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt")):
        evil = crafted(checkpoints[stage], tmp_path / f"evil{stage}", file, marker)
        edits = {**TINY_MODEL, "zero_stage: 2": f"zero_stage: {stage}", "workers: 2": "workers: 1"}
        spec = load_spec(write_spec(tmp_path / f"job{stage}", edits)).spec
        # the rank signed it and the store holds it: the evaluation rebuilds it from there
        store = ContentStore(tmp_path / f"store{stage}")
        manifest = commit_checkpoint(store.put, evil / TAG, job_id="j", rank=0, step=1, zero_stage=stage, world=1)
        with pytest.raises(UnsafeCheckpoint), rebuilt_checkpoint(spec, store.get, "j", [manifest], 1) as tag_dir:
            evaluate_checkpoint(spec, None, None, tag_dir, 1)
    assert not marker.exists()


def _save_two_ranks(path: Path, stage: int) -> None:
    """A real checkpoint written by two DeepSpeed ranks (two processes on gloo)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.security.ds_checkpoint",
                "save",
                str(path),
                str(stage),
                str(r),
                "2",
                str(port),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0 and out.strip().endswith("saved"), err[-3000:]


@pytest.mark.parametrize("stage", [1, 2])
def test_the_derived_state_before_step_0_is_what_deepspeed_saves(tmp_path, stage: int) -> None:
    """The replay of an interval that starts at step 0 never loads a worker's file: it derives the
    weights from the seed, zero moments and the ZeRO layout. That is exactly DeepSpeed's own step-0
    checkpoint, on one rank and on two (where the layout splits a parameter between the ranks)."""
    from gpucoin.verify.consolidate import initial_state, zero_partitions

    _save_two_ranks(tmp_path / "two", stage)
    saved = load_consolidated(tmp_path / "two" / "step00000000", model(), stage, 2, 0)
    derived = initial_state(model(), stage, 2)
    assert derived.partitions == saved.partitions and len(saved.partitions) == 2
    assert saved.partitions[0][-1][0] == saved.partitions[1][0][0]  # a parameter cut in two
    assert all(torch.equal(derived.weights[n], saved.weights[n]) for n in NAMES)
    assert all(torch.equal(derived.exp_avg[n], saved.exp_avg[n]) for n in NAMES)
    assert (derived.adam_step, derived.global_steps) == (saved.adam_step, saved.global_steps) == (0, 0)
    after = load_consolidated(tmp_path / "two" / TAG, model(), stage, 2, 1)  # the layout does not change with training
    assert after.partitions == derived.partitions
    for world in (1, 3, 4):  # and the layout for other world sizes covers every number once
        parts = zero_partitions([(n, 7 + i) for i, n in enumerate(NAMES)], world)
        assert len(parts) == world and sum(k for frags in parts for _, k in frags) == sum(
            7 + i for i in range(len(NAMES))
        )
