"""Moving one DeepSpeed checkpoint tag between a rank's disk and the store, by manifest.

``commit_checkpoint``: a rank puts the files it wrote and then their manifest; the manifest's
digest is what its WorkReceipt signs. ``fetch_checkpoint``: a verifier, a resuming rank or the
evaluation rebuilds a tag directory from the ranks' manifest digests, checking every byte against
what was signed, and learns which rank's commitment does not hold.

Both take the store as plain ``put``/``get`` callables, so the same code runs against the head's
``ContentStore`` and against the head's API (``runtime.channel.HttpChannel``).
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

from gpucoin.exceptions import BadCommittedFile, ObjectMissing, TrainingError
from gpucoin.storage.manifest import CheckpointManifest, FileEntry, rank_files

Put = Callable[[bytes], str]
"""Stores bytes, returns their name (``ContentStore.put``)."""
Get = Callable[[str], bytes]
"""Returns the bytes stored under a name (``ContentStore.get``); raises ``ObjectMissing``."""


def commit_checkpoint(
    put: Put, tag_dir: Path, *, job_id: str, rank: int, step: int, zero_stage: int, world: int
) -> str:
    """Store the files this rank wrote under ``tag_dir`` and their manifest; return the manifest's
    digest (the receipt's ``checkpointHash``).

    Raises:
        TrainingError: if the rank wrote other files than DeepSpeed's format says it writes
            (``rank_files``): the format changed under us.
    """
    tag_dir = Path(tag_dir)
    want = rank_files(zero_stage, world, rank)
    got = tuple(sorted(p.name for p in tag_dir.iterdir())) if tag_dir.is_dir() else ()
    if got != want:
        raise TrainingError(
            f"rank {rank} wrote {list(got)} under {tag_dir}; DeepSpeed's ZeRO {zero_stage} writes {list(want)}"
        )
    entries = []
    for name in want:
        data = (tag_dir / name).read_bytes()
        digest = put(data)
        entries.append(FileEntry(name=name, size=len(data), sha256=digest))
    manifest = CheckpointManifest(jobId=job_id, rank=rank, step=step, files=tuple(entries))
    return put(manifest.canonical())


def commitment_problem(
    get: Get,
    has: Callable[[list[str]], list[bool]],
    digest: str,
    *,
    job_id: str,
    rank: int,
    step: int,
    zero_stage: int,
    world: int,
) -> str | None:
    """Why the manifest a receipt signed cannot serve a replay, without fetching its files, or None.

    The coordinator asks this of every receipt: an interval whose checkpoint is not all in the
    store is drawn for replay for sure, and the replay convicts the rank (``fetch_checkpoint``).

    Raises:
        ObjectCorrupted: the store's own bytes do not hash to their names.
    """
    try:
        m = CheckpointManifest.parse(get(digest))
        m.check(job_id, rank, step, zero_stage, world)
    except ObjectMissing:
        return f"its manifest {digest} is not in the store"
    except BadCommittedFile as exc:
        return str(exc)
    missing = [f.name for f, ok in zip(m.files, has([f.sha256 for f in m.files]), strict=True) if not ok]
    return f"{', '.join(missing)} not in the store" if missing else None


def fetch_checkpoint(
    get: Get, manifests: list[str], *, job_id: str, step: int, zero_stage: int, dest: Path
) -> dict[int, BadCommittedFile]:
    """Rebuild the tag directory of the checkpoint after ``step`` steps in ``dest`` from the ranks'
    manifest digests (rank order, one per rank), every file read-only and checked against the
    manifest its rank signed.

    Args:
        manifests: per rank, the ``checkpointHash`` its WorkReceipt for the interval ending at
            ``step`` signed.

    Returns:
        Per rank whose commitment does not hold, why: its manifest or a file it names is not
        stored, the manifest is malformed or names other files than the rank writes, or a file's
        size differs. Empty if every file is in ``dest``. (Whether the files load and agree with
        DeepSpeed's layout is for the loader: ``gpucoin.verify.consolidate``.)

    Raises:
        ObjectCorrupted: a stored object that no longer hashes to its name (the store's fault).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    world = len(manifests)
    failures: dict[int, BadCommittedFile] = {}
    for rank, digest in enumerate(manifests):
        try:
            try:
                m = CheckpointManifest.parse(get(digest))
            except ObjectMissing:
                raise BadCommittedFile("manifest", f"{digest} is not in the store") from None
            m.check(job_id, rank, step, zero_stage, world)
            for f in m.files:
                try:
                    data = get(f.sha256)
                except ObjectMissing:
                    raise BadCommittedFile(f.name, f"{f.sha256} is not in the store") from None
                if len(data) != f.size:
                    raise BadCommittedFile(f.name, f"holds {len(data)} bytes, the manifest says {f.size}")
                path = dest / f.name
                path.write_bytes(data)
                path.chmod(stat.S_IRUSR)
        except BadCommittedFile as exc:
            failures[rank] = exc
    return failures
