"""What one rank's receipt commits to: the manifest of the checkpoint files that rank wrote.

A WorkReceipt's ``checkpointHash`` is the digest of a ``CheckpointManifest``: the job, rank and
step, and the name, size and sha256 of every file the rank wrote for that step's DeepSpeed
checkpoint. The manifest is itself a stored object (its canonical JSON), so a receipt names,
through one hash, exactly the bytes its signer is answerable for.

Which files each rank writes is fixed by DeepSpeed's format (``rank_files``), so a manifest that
claims a co-worker's file, or leaves out one of its own, is refused like a missing file.
"""

from __future__ import annotations

import hashlib
import json
import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gpucoin.exceptions import BadCommittedFile

MAX_MANIFEST_BYTES = 64 * 1024
"""Largest manifest a store serves or a verifier parses (a rank writes at most two files)."""
MAX_MANIFEST_FILES = 16

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^0x[0-9a-f]{64}$")


def sha256_digest(data: bytes) -> str:
    """``0x`` + the sha256 of ``data`` in lowercase hex: the name of a stored object and a bytes32 field."""
    return "0x" + hashlib.sha256(data).hexdigest()


def model_states_file() -> str:
    """DeepSpeed 0.19's file of the module weights (and, under ZeRO 0, the optimizer state), written by rank 0."""
    return "mp_rank_00_model_states.pt"


def optim_states_file(rank: int) -> str:
    """DeepSpeed 0.19's ZeRO 1/2 file of rank ``rank``'s optimizer partition, written by that rank."""
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def rank_files(zero_stage: int, world: int, rank: int) -> tuple[str, ...]:
    """The files rank ``rank`` of ``world`` writes into a DeepSpeed 0.19 checkpoint tag, sorted.

    ZeRO 0: rank 0 writes the model-states file (weights and the whole optimizer), the others
    write nothing. ZeRO 1/2: rank 0 also writes the model-states file, and every rank writes its
    optimizer partition (measured with two ranks saving into separate directories:
    ``tests/security/test_checkpoint_safety.py``).

    Raises:
        ValueError: for a stage other than 0, 1, 2 or a rank outside [0, world).
    """
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"ZeRO stage must be 0, 1 or 2, got {zero_stage}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    files = [model_states_file()] if rank == 0 else []
    if zero_stage in (1, 2):
        files.append(optim_states_file(rank))
    return tuple(sorted(files))


def file_owner(name: str, zero_stage: int, world: int) -> int:
    """The rank that writes checkpoint file ``name`` (``rank_files`` inverted).

    Raises:
        ValueError: for a name no rank writes.
    """
    for r in range(world):
        if name in rank_files(zero_stage, world, r):
            return r
    raise ValueError(f"no rank of {world} writes {name!r} under ZeRO {zero_stage}")


class FileEntry(BaseModel):
    """One checkpoint file as committed: its name in the tag directory, size (bytes) and sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str
    """File name inside the DeepSpeed tag directory (no directories)."""
    size: int = Field(ge=0)
    """Length in bytes."""
    sha256: str
    """``0x`` + 64 lowercase hex digits: the stored object's name."""

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"file name {v[:80]!r} is not a plain name ([A-Za-z0-9_.-], at most 128)")
        return v

    @field_validator("sha256")
    @classmethod
    def _digest(cls, v: str) -> str:
        if not _DIGEST.match(v):
            raise ValueError(f"sha256 {v[:80]!r} is not 0x + 64 lowercase hex digits")
        return v


class CheckpointManifest(BaseModel):
    """The files one rank wrote for the checkpoint after ``step`` steps of job ``jobId``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    jobId: str = Field(min_length=1, max_length=128)  # noqa: N815 - the receipt's field name
    """The job, as in the WorkReceipt."""
    rank: int = Field(ge=0)
    """The writer's data-parallel rank."""
    step: int = Field(ge=0)
    """Optimizer steps taken when the checkpoint was saved (the receipt's ``stepEnd``)."""
    files: tuple[FileEntry, ...] = Field(max_length=MAX_MANIFEST_FILES)
    """The rank's files, sorted by name, each once."""

    @field_validator("files")
    @classmethod
    def _sorted_unique(cls, v: tuple[FileEntry, ...]) -> tuple[FileEntry, ...]:
        names = [f.name for f in v]
        if names != sorted(set(names)):
            raise ValueError(f"files must be sorted by name, each once; got {names}")
        return v

    def canonical(self) -> bytes:
        """The stored form: JSON with sorted keys and no spaces (one byte string per manifest)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        """The receipt's ``checkpointHash``: ``sha256_digest(canonical())``."""
        return sha256_digest(self.canonical())

    def names(self) -> tuple[str, ...]:
        """File names, sorted."""
        return tuple(f.name for f in self.files)

    @classmethod
    def parse(cls, data: bytes) -> CheckpointManifest:
        """The manifest stored as ``data``, which must be exactly its canonical form.

        Raises:
            BadCommittedFile: (name ``"manifest"``) too long, not JSON, not the schema, or not canonical.
        """
        if len(data) > MAX_MANIFEST_BYTES:
            raise BadCommittedFile("manifest", f"{len(data)} bytes, more than {MAX_MANIFEST_BYTES}")
        try:
            m = cls.model_validate_json(data)
        except ValidationError as exc:
            first = str(exc).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:3])
            raise BadCommittedFile("manifest", f"not a checkpoint manifest: {detail[:300]}") from None
        if m.canonical() != data:
            raise BadCommittedFile("manifest", "not in canonical form (sorted keys, no spaces)")
        return m

    def check(self, job_id: str, rank: int, step: int, zero_stage: int, world: int) -> None:
        """Check that this is the manifest rank ``rank`` must sign for ``step`` of ``job_id``.

        Raises:
            BadCommittedFile: another job, rank or step, or not exactly ``rank_files(...)``.
        """
        if (self.jobId, self.rank, self.step) != (job_id, rank, step):
            raise BadCommittedFile(
                "manifest",
                f"names job {self.jobId!r} rank {self.rank} step {self.step}, expected {job_id!r} rank {rank} step {step}",
            )
        want = rank_files(zero_stage, world, rank)
        if self.names() != want:
            raise BadCommittedFile(
                "manifest",
                f"lists {list(self.names())}; rank {rank} of {world} under ZeRO {zero_stage} writes {list(want)}",
            )
