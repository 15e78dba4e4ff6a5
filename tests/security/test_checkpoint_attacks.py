"""Attacks on the checkpoints a rank commits to (issue 9): each convicts its signer and nobody else.

One local market for the module (``LocalMarket``: a head, 2 volunteers and a verifier, nothing
drawn by chance). One honest job runs on it (2 ranks, ZeRO 2, steps 0-4 and 4-8); its store,
receipts and sketches are then attacked offline, each attack being what one rank could sign and
store in place of its honest checkpoint, and judged by the verifier's own code
(``judge_interval``) with no Ray. In two more jobs vol1 withholds or alters its files, to see the
coordinator draw the interval, the verifier convict, and the ledger slash that rank alone.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from gpucoin.coordinator.job import LocalMarket, LocalOptions, new_job_id
from gpucoin.ledger import Ledger
from gpucoin.ledger.accounts import BURNED, wallet_account
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy
from gpucoin.runtime.faults import FAULT_CHECKPOINT_ENV, FAULTS_BY_JOB_ENV
from gpucoin.spec import JobSpec, load_spec
from gpucoin.storage import CheckpointManifest, ContentStore, FileEntry, sha256_digest
from gpucoin.verify.verifier import Finding, ReplayRequest, judge_interval
from tests.conftest import EXCERPT, TINY_MODEL, write_spec

REPO = Path(__file__).resolve().parents[2]
POLICY = load_policy(SHIPPED_POLICIES_DIR / "local.toml")
STAKE = 500_000_000
MODEL = "mp_rank_00_model_states.pt"
SHARD1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
NEVER_DRAWN = POLICY.model_copy(
    update={
        "verification": POLICY.verification.model_copy(
            update={"check_probability": 0.0, "new_node_check_probability": 0.0}
        )
    }
)
"""The local policy with no interval drawn by chance: what is replayed is what the coordinator must replay."""

pytestmark = pytest.mark.ray


@dataclass
class Honest:
    """What the honest run left: its spec, job id, store, and per interval start the receipts'
    digests, manifests and committed sketches, rank order."""

    spec: JobSpec
    job_id: str
    package_hash: str
    store: Path
    receipts: dict[int, list[str]]
    manifests: dict[int, list[str]]
    sketches: dict[int, np.ndarray]


def _spec(directory: Path) -> JobSpec:
    return load_spec(write_spec(directory, TINY_MODEL), {"steps": 8, "checkpoint_interval_steps": 4})


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> Iterator[LocalMarket]:
    """vol1 withholds its step-4 files in the jobs named ``withhold-``, alters them in ``alter-``."""
    attacks = {"withhold-": {FAULT_CHECKPOINT_ENV: "withhold@4"}, "alter-": {FAULT_CHECKPOINT_ENV: "alter@4"}}
    opts = LocalOptions(
        policy=NEVER_DRAWN,
        home=tmp_path_factory.mktemp("market"),
        stake_ugpc=STAKE,
        node_env={"vol1": {FAULTS_BY_JOB_ENV: json.dumps(attacks)}},
    )
    with LocalMarket(opts) as m:
        yield m


@pytest.fixture(scope="module")
def honest(market, tmp_path_factory) -> Iterator[Honest]:
    loaded = _spec(tmp_path_factory.mktemp("honest"))
    s = market.run(loaded)
    # nothing is drawn by chance: the last interval is the one always checked
    assert s["receipts"]["passed"] == 1 and s["max_replay_distance"] == 0.0, s
    home = market.opts.home
    job_dir = home / "jobs" / s["job_id"]
    receipts: dict[int, dict[int, tuple[str, str]]] = {}
    with Ledger(f"sqlite:///{home / 'ledger.db'}") as lg:
        for row in lg.messages("WorkReceipt"):
            m = json.loads(row.typed_data)["message"]
            if m["jobId"] == s["job_id"]:
                receipts.setdefault(m["stepStart"], {})[m["rank"]] = (row.digest, m["checkpointHash"])
    starts = sorted(receipts)
    # the offline replays below run in this process, which imports the job's package like a verifier
    sys.path.insert(0, str(loaded.module_dir.parent))
    yield Honest(
        spec=loaded.spec,
        job_id=s["job_id"],
        package_hash=loaded.package_hash,
        store=job_dir / "store",
        receipts={a: [receipts[a][r][0] for r in range(2)] for a in starts},
        manifests={a: [receipts[a][r][1] for r in range(2)] for a in starts},
        sketches={
            a: np.stack([np.load(job_dir / "sketches" / f"rank{r}-step{a:08d}.npy") for r in range(2)]) for a in starts
        },
    )
    sys.path.remove(str(loaded.module_dir.parent))


@pytest.fixture
def store(honest, tmp_path) -> ContentStore:
    """A copy of the honest run's store that an attacker may add to (what any rank can do)."""
    shutil.copytree(honest.store, tmp_path / "store")
    return ContentStore(tmp_path / "store")


def request(h: Honest, start: int, **changes) -> ReplayRequest:
    """The coordinator's request for the interval starting at ``start`` (``JobRun.replay_request``)."""
    prev = start - 4
    fields = dict(
        spec=h.spec.model_dump(mode="json"),
        data_source=str(EXCERPT),
        job_id=h.job_id,
        step_start=start,
        step_end=start + 4,
        buckets=POLICY.verification.sketch_buckets,
        committed=h.sketches[start],
        receipts=tuple(h.receipts[start]),
        end_manifests=tuple(h.manifests[start]),
        start_receipts=tuple(h.receipts.get(prev, ())),
        start_manifests=tuple(h.manifests.get(prev, ())),
        package_hash=h.package_hash,
        vetted_packages=POLICY.verification.vetted_packages,
        tolerance=POLICY.verification.tolerance_rel_l2,
    )
    fields.update(changes)
    return ReplayRequest(**fields)


def judge(req: ReplayRequest, store: ContentStore, tmp_path: Path, fresh_process: bool = False) -> dict[str, Finding]:
    work = tmp_path / f"work{len(list(tmp_path.glob('work*')))}"
    work.mkdir()
    return {f.receipt: f for f in judge_interval(req, store.get, work, fresh_process=fresh_process)}


def resign(store: ContentStore, manifest: str, name: str, data: bytes | None = None, digest: str | None = None) -> str:
    """What rank r signs instead of ``manifest``: the same manifest with file ``name`` replaced by
    ``data`` (stored, as the rank can) or by a bare ``digest`` (signed, not stored)."""
    m = CheckpointManifest.parse(store.get(manifest))
    if data is not None:
        digest = store.put(data)
    size = len(data) if data is not None else next(f.size for f in m.files if f.name == name)
    files = tuple(FileEntry(name=f.name, size=size, sha256=digest) if f.name == name else f for f in m.files)
    return store.put(m.model_copy(update={"files": files}).canonical())


def file_bytes(store: ContentStore, manifest: str, name: str) -> bytes:
    m = CheckpointManifest.parse(store.get(manifest))
    return store.get(next(f.sha256 for f in m.files if f.name == name))


def saved(state: dict) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def verdicts(found: dict[str, Finding], receipts: list[str]) -> list[str]:
    return [found[d].verdict for d in receipts]


def test_the_honest_intervals_pass_offline_too(honest, store, tmp_path) -> None:
    for start in (0, 4):
        found = judge(request(honest, start), store, tmp_path)
        assert verdicts(found, honest.receipts[start]) == ["pass", "pass"]
        assert all(f.distance == 0.0 for f in found.values())


def test_a_deleted_start_checkpoint_slashes_the_rank_that_signed_it(honest, store, tmp_path) -> None:
    doomed = CheckpointManifest.parse(store.get(honest.manifests[0][1])).files[0].sha256
    path = store.root / "sha256" / doomed[2:4] / doomed[4:]
    path.unlink()  # rank 1 signed its step-4 shard, then it was gone
    found = judge(request(honest, 4), store, tmp_path)
    # the rank that signed the file fails, on the receipt that committed to it; steps 4-8 cannot be replayed
    assert found[honest.receipts[0][1]].verdict == "fail" and "not in the store" in found[honest.receipts[0][1]].reason
    assert honest.receipts[0][0] not in found
    assert verdicts(found, honest.receipts[4]) == ["void", "void"]
    # and the check of steps 0-4 itself, whose end that checkpoint is, convicts the same receipt
    found = judge(request(honest, 0), store, tmp_path)
    assert verdicts(found, honest.receipts[0]) == ["pass", "fail"]


class Payload:
    """Unpickled the ordinary way, writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def loaded(data: bytes) -> dict:
    """A checkpoint file's state dict, read weights-only."""
    import io

    from gpucoin.runtime.safe_load import safe_globals

    with torch.serialization.safe_globals(safe_globals()):
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def replaced(manifests: list[str], rank: int, digest: str) -> tuple[str, ...]:
    return tuple(digest if r == rank else d for r, d in enumerate(manifests))


@pytest.mark.parametrize(("rank", "name"), [(0, MODEL), (1, SHARD1)])
@pytest.mark.parametrize("where", ["start", "end"])
def test_a_crafted_pickle_runs_nothing_and_fails_its_signer(honest, store, tmp_path, rank, name, where) -> None:
    marker = tmp_path / "pwned"
    m4 = honest.manifests[0][rank]  # the checkpoint after step 4: the end of 0-4, the start of 4-8
    state = loaded(file_bytes(store, m4, name))
    state["evil"] = Payload(marker)
    evil = resign(store, m4, name, data=saved(state))
    if where == "start":
        found = judge(request(honest, 4, start_manifests=replaced(honest.manifests[0], rank, evil)), store, tmp_path)
        assert found[honest.receipts[0][rank]].verdict == "fail"
        assert "weights-only" in found[honest.receipts[0][rank]].reason
        assert verdicts(found, honest.receipts[4]) == ["void", "void"]
    else:
        found = judge(request(honest, 0, end_manifests=replaced(honest.manifests[0], rank, evil)), store, tmp_path)
        assert verdicts(found, honest.receipts[0]) == ["fail" if r == rank else "pass" for r in range(2)]
        assert "weights-only" in found[honest.receipts[0][rank]].reason
    assert not marker.exists()


def test_disagreeing_hashes_slash_the_rank_whose_file_does_not_match_its_signed_hash(honest, store, tmp_path) -> None:
    # rank 1 stores its honest shard but signs the hash of other bytes
    liar = resign(store, honest.manifests[0][1], SHARD1, digest=sha256_digest(b"what rank 1 claims it wrote"))
    found = judge(request(honest, 0, end_manifests=replaced(honest.manifests[0], 1, liar)), store, tmp_path)
    assert verdicts(found, honest.receipts[0]) == ["pass", "fail"]
    # or signs rank 0's model file as its own: not the files rank 1 writes
    m0 = CheckpointManifest.parse(store.get(honest.manifests[0][0]))
    theirs = store.put(
        CheckpointManifest(
            jobId=honest.job_id, rank=1, step=4, files=tuple(f for f in m0.files if f.name == MODEL)
        ).canonical()
    )
    found = judge(request(honest, 0, end_manifests=replaced(honest.manifests[0], 1, theirs)), store, tmp_path)
    assert verdicts(found, honest.receipts[0]) == ["pass", "fail"] and "writes" in found[honest.receipts[0][1]].reason


@pytest.mark.parametrize("how", ["nudged", "nan"])
def test_an_altered_final_checkpoint_is_caught_and_convicts_its_writer(honest, store, tmp_path, how) -> None:
    m8 = honest.manifests[4][1]  # rank 1's part of the job's final checkpoint
    state = loaded(file_bytes(store, m8, SHARD1))
    osd = state["optimizer_state_dict"]
    fp32 = osd["single_partition_of_fp32_groups"][0]
    if how == "nudged":  # other weights than it computed, moments left as they were: no AdamW step
        osd["single_partition_of_fp32_groups"][0] = fp32.detach() + 1e-2
    else:
        osd["base_optimizer_state"]["state"][0]["exp_avg"] = torch.full_like(fp32, float("nan"))
    altered = resign(store, m8, SHARD1, data=saved(state))
    found = judge(request(honest, 4, end_manifests=replaced(honest.manifests[4], 1, altered)), store, tmp_path)
    assert verdicts(found, honest.receipts[4]) == ["pass", "fail"]
    assert "no AdamW step" in found[honest.receipts[4][1]].reason


def test_gathered_weights_that_differ_name_nobody(honest, store, tmp_path) -> None:
    """Under ZeRO 2 rank 0's module weights are what the other ranks broadcast: if they differ
    from the replay while every partition matches, rank 0 cannot be told from a co-worker that
    broadcast other numbers than it stored. Void: nobody is paid for the interval, nobody slashed."""
    m8 = honest.manifests[4][0]
    state = loaded(file_bytes(store, m8, MODEL))
    state["module"] = {k: v + 1e-2 for k, v in state["module"].items()}
    altered = resign(store, m8, MODEL, data=saved(state))
    found = judge(request(honest, 4, end_manifests=replaced(honest.manifests[4], 0, altered)), store, tmp_path)
    assert verdicts(found, honest.receipts[4]) == ["void", "void"]


def test_nothing_convicts_in_a_job_whose_package_is_not_vetted(honest, store, tmp_path) -> None:
    """The same attacks, judged for a job whose package the policy does not list, or lists under
    a hash that is not the package the verifier imports: every conviction becomes void, and the
    interval before is not judged at all."""
    m8 = honest.manifests[4][1]
    state = loaded(file_bytes(store, m8, SHARD1))
    fp32 = state["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    fp32[0] = fp32[0].detach() + 1e-2
    altered = replaced(honest.manifests[4], 1, resign(store, m8, SHARD1, data=saved(state)))
    other = "0x" + "ab" * 32
    for changes in ({"package_hash": other}, {"package_hash": other, "vetted_packages": (other,)}):
        found = judge(request(honest, 4, end_manifests=altered, **changes), store, tmp_path)
        assert verdicts(found, honest.receipts[4]) == ["pass", "void"]
        assert "not vetted" in found[honest.receipts[4][1]].reason
    doomed = CheckpointManifest.parse(store.get(honest.manifests[0][1])).files[0].sha256
    (store.root / "sha256" / doomed[2:4] / doomed[4:]).unlink()
    found = judge(request(honest, 4, package_hash=other), store, tmp_path)
    assert set(found) == set(honest.receipts[4]) and verdicts(found, honest.receipts[4]) == ["void", "void"]


def test_a_convicting_replay_is_reproduced_in_a_fresh_process(honest, store, tmp_path) -> None:
    committed = honest.sketches[4].copy()
    committed[1, 2] *= 1.05  # rank 1's sketch of step 6 is not what it computed
    found = judge(request(honest, 4, committed=committed), store, tmp_path, fresh_process=True)
    assert verdicts(found, honest.receipts[4]) == ["pass", "fail"]
    assert "step 6" in found[honest.receipts[4][1]].reason


def change(s: dict, account: str) -> int:
    """What the job moved into (or out of) ``account``, µGPC."""
    return s["accounts"].get(account, {}).get("change", 0)


def test_a_rank_that_withholds_its_checkpoint_is_slashed_on_the_cluster(market, tmp_path) -> None:
    """Nothing is drawn by chance here (the policy's check probabilities are 0). The coordinator
    sees vol1's signed files missing from the store and draws steps 0-4 for that;
    the verifier convicts vol1's rank; the ledger slashes it alone and pays only the other rank's
    share of the interval."""
    s = market.run(_spec(tmp_path / "job"), job_id=new_job_id("withhold"))
    cheater, honest_rank, verifier = (p.address for p in (*reversed(market.volunteers), market.verifier))
    # steps 4-8, which start from the withheld files, may be judged first and convict the same receipt
    assert s["intervals"][0]["outcome"] == "failed" and "failed the replay" in s["stopped"]
    bond = s["accounts"][wallet_account(cheater, "bonded")]["before"]
    slash = bond * POLICY.slashing.fraud_slash_fraction_bps // 10_000
    whistle = slash * POLICY.slashing.whistleblower_share_bps // 10_000
    assert s["ledger"]["slashed"] == slash > 0 and s["audit"] == "ok"
    assert change(s, wallet_account(cheater, "bonded")) == -slash
    assert change(s, wallet_account(honest_rank, "bonded")) == 0
    assert change(s, wallet_account(cheater)) == 0  # its share of steps 0-4 is not paid
    assert change(s, wallet_account(verifier)) >= whistle
    assert change(s, BURNED) == slash - whistle + s["ledger"]["burned"]


def test_an_altered_checkpoint_nobody_checked_is_traced_to_its_writer(market, tmp_path) -> None:
    """vol1 stores and signs a step-4 checkpoint with other numbers than it computed, and steps
    0-4 are not drawn. The last interval is always checked: its replay starts from that file while
    the ranks trained on, so every rank diverges at once (void). The coordinator then replays the
    interval that wrote the file, whose end check convicts vol1 alone (whichever rank it holds)."""
    s = market.run(_spec(tmp_path / "job"), job_id=new_job_id("alter"))
    assert [iv["outcome"] for iv in s["intervals"]] == ["failed", "void"]
    assert s["receipts"]["checked"] == 2 and s["receipts"]["failed"] == 1 and s["receipts"]["void"] == 1
    cheater, honest_rank = (p.address for p in reversed(market.volunteers))
    bond = s["accounts"][wallet_account(cheater, "bonded")]["before"]
    slash = bond * POLICY.slashing.fraud_slash_fraction_bps // 10_000
    assert s["ledger"]["slashed"] == slash > 0 and s["audit"] == "ok"
    assert change(s, wallet_account(cheater, "bonded")) == -slash
    assert change(s, wallet_account(honest_rank, "bonded")) == 0
