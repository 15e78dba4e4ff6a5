"""The checkpoint store and manifests, hostile inputs first (no Ray, no torch files)."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpucoin.exceptions import BadCommittedFile, ObjectCorrupted, ObjectMissing, StorageError
from gpucoin.storage import CheckpointManifest, ContentStore, FileEntry, file_owner, rank_files, sha256_digest
from gpucoin.storage.checkpoints import commitment_problem, fetch_checkpoint


def test_put_names_bytes_by_hash_once_and_get_gives_them_back(tmp_path) -> None:
    store = ContentStore(tmp_path)
    d = store.put(b"weights")
    assert d == sha256_digest(b"weights") and store.get(d) == b"weights"
    assert store.put(b"weights") == d  # a second put is a no-op
    path = tmp_path / "sha256" / d[2:4] / d[4:]
    assert not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)  # read-only
    assert store.has([d, sha256_digest(b"other")]) == [True, False]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_nothing_stored_is_replaced_and_tampering_is_named(tmp_path) -> None:
    store = ContentStore(tmp_path)
    d = store.put(b"honest")
    path = tmp_path / "sha256" / d[2:4] / d[4:]
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    path.write_bytes(b"swapped")  # someone with the head's disk
    with pytest.raises(ObjectCorrupted):
        store.get(d)
    with pytest.raises(ObjectCorrupted):
        store.put(b"honest")  # never repaired by overwriting: the head must look
    assert path.read_bytes() == b"swapped"


@pytest.mark.parametrize("name", ["", "0x12", "../../etc/passwd", "0x" + "A" * 64, "0x" + "0" * 63 + "/", 7])
def test_names_that_are_not_digests_are_refused(tmp_path, name) -> None:
    store = ContentStore(tmp_path)
    with pytest.raises(StorageError):
        store.get(name)
    with pytest.raises(StorageError):
        store.has([name])


def test_missing_and_oversized_objects(tmp_path) -> None:
    store = ContentStore(tmp_path, max_object_bytes=10)
    with pytest.raises(ObjectMissing):
        store.get(sha256_digest(b"never put"))
    with pytest.raises(StorageError, match="larger than"):
        store.put(b"x" * 11)
    with pytest.raises(StorageError, match="bytes"):
        store.put("text")  # type: ignore[arg-type]


def test_which_rank_writes_which_file() -> None:
    assert rank_files(0, 3, 0) == ("mp_rank_00_model_states.pt",)
    assert rank_files(0, 3, 2) == ()
    assert rank_files(2, 3, 0) == ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert rank_files(1, 3, 2) == ("zero_pp_rank_2_mp_rank_00_optim_states.pt",)
    assert file_owner("zero_pp_rank_1_mp_rank_00_optim_states.pt", 2, 2) == 1
    with pytest.raises(ValueError):
        file_owner("zero_pp_rank_5_mp_rank_00_optim_states.pt", 2, 2)
    with pytest.raises(ValueError):
        rank_files(3, 2, 0)


def _manifest(job="j", rank=1, step=4, files=None) -> CheckpointManifest:
    data = b"shard"
    files = files or (
        FileEntry(name="zero_pp_rank_1_mp_rank_00_optim_states.pt", size=len(data), sha256=sha256_digest(data)),
    )
    return CheckpointManifest(jobId=job, rank=rank, step=step, files=files)


def test_a_manifest_has_one_canonical_form() -> None:
    m = _manifest()
    assert CheckpointManifest.parse(m.canonical()) == m and m.digest() == sha256_digest(m.canonical())
    spaced = m.canonical().replace(b",", b", ")
    with pytest.raises(BadCommittedFile, match="canonical"):
        CheckpointManifest.parse(spaced)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b"{" * 70_000,
        b'{"files":[],"jobId":"j","rank":-1,"step":4}',
        b'{"files":[],"jobId":"j","rank":1,"step":4,"extra":1}',
        b'{"files":[{"name":"../x","sha256":"0x' + b"0" * 64 + b'","size":1}],"jobId":"j","rank":1,"step":4}',
        b'{"files":[{"name":"a","sha256":"0x'
        + b"0" * 64
        + b'","size":1},{"name":"a","sha256":"0x'
        + b"0" * 64
        + b'","size":1}],"jobId":"j","rank":1,"step":4}',
        b'{"files":[],"jobId":"j","rank":true,"step":4}',
        b'{"files":[],"jobId":"j","rank":1,"step":4.0}',
    ],
)
def test_malformed_manifests_are_the_signers_fault(data) -> None:
    with pytest.raises(BadCommittedFile) as exc:
        CheckpointManifest.parse(data)
    assert exc.value.name == "manifest"


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_refused_as_the_signers_fault(data) -> None:
    try:
        m = CheckpointManifest.parse(data)
    except BadCommittedFile:
        return
    assert m.canonical() == data


def test_a_manifest_must_name_exactly_the_signers_own_files() -> None:
    m = _manifest()
    m.check("j", 1, 4, zero_stage=2, world=2)
    with pytest.raises(BadCommittedFile, match="rank 1 step 4"):
        m.check("j", 1, 8, zero_stage=2, world=2)
    theirs = _manifest(files=(FileEntry(name="mp_rank_00_model_states.pt", size=1, sha256=sha256_digest(b"x")),))
    with pytest.raises(BadCommittedFile, match="writes"):  # a co-worker's file
        theirs.check("j", 1, 4, zero_stage=2, world=2)


def test_fetch_names_the_rank_whose_commitment_does_not_hold(tmp_path) -> None:
    store = ContentStore(tmp_path / "store")
    shard = b"rank one's partition"
    entry = FileEntry(name="zero_pp_rank_1_mp_rank_00_optim_states.pt", size=len(shard), sha256=sha256_digest(shard))
    ok0 = store.put(
        CheckpointManifest(
            jobId="j",
            rank=0,
            step=4,
            files=(
                FileEntry(name="mp_rank_00_model_states.pt", size=1, sha256=store.put(b"m")),
                FileEntry(name="zero_pp_rank_0_mp_rank_00_optim_states.pt", size=1, sha256=store.put(b"z")),
            ),
        ).canonical()
    )
    withheld = store.put(_manifest(files=(entry,)).canonical())  # signed, never stored
    kw = {"job_id": "j", "step": 4, "zero_stage": 2}
    bad = fetch_checkpoint(store.get, [ok0, withheld], dest=tmp_path / "a", **kw)
    assert list(bad) == [1] and "not in the store" in str(bad[1]) and bad[1].name == entry.name
    assert (tmp_path / "a" / "mp_rank_00_model_states.pt").read_bytes() == b"m"
    assert commitment_problem(store.get, store.has, withheld, rank=1, world=2, **kw)
    assert commitment_problem(store.get, store.has, ok0, rank=0, world=2, **kw) is None

    store.put(shard)
    assert fetch_checkpoint(store.get, [ok0, withheld], dest=tmp_path / "b", **kw) == {}
    liar = store.put(_manifest(files=(entry.model_copy(update={"size": 3}),)).canonical())  # wrong size
    assert "bytes" in str(fetch_checkpoint(store.get, [ok0, liar], dest=tmp_path / "c", **kw)[1])
    nowhere = sha256_digest(b"a manifest nobody stored")
    bad = fetch_checkpoint(store.get, [nowhere, ok0], dest=tmp_path / "d", **kw)
    assert sorted(bad) == [0, 1]  # rank 0's manifest missing; rank 1 signed rank 0's manifest
