"""Checkpoints in DeepSpeed's own format, named by a content hash the receipts commit to."""

from __future__ import annotations

import hashlib
from pathlib import Path

from gpucoin.exceptions import VerificationError

_CHUNK_BYTES = 1 << 20


def tag_for(step: int) -> str:
    """DeepSpeed checkpoint tag of the state before optimizer step ``step`` (after ``step`` steps)."""
    return f"step{step:08d}"


def content_hash(tag_dir: Path) -> str:
    """0x sha256 over the relative path and bytes of every file under a checkpoint tag directory.

    Files are visited in sorted order, so the hash depends only on content.

    Raises:
        VerificationError: if the directory does not exist or holds no file.
    """
    tag_dir = Path(tag_dir)
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file()) if tag_dir.is_dir() else []
    if not files:
        raise VerificationError(f"no checkpoint files under {tag_dir}")
    h = hashlib.sha256()
    for f in files:
        rel = f.relative_to(tag_dir).as_posix().encode()
        h.update(len(rel).to_bytes(4, "big") + rel + f.stat().st_size.to_bytes(8, "big"))
        with f.open("rb") as fh:
            while chunk := fh.read(_CHUNK_BYTES):
                h.update(chunk)
    return "0x" + h.hexdigest()


def check_hash(tag_dir: Path, expected: str) -> None:
    """Raise ``VerificationError`` naming both hashes if the checkpoint's content hash differs."""
    got = content_hash(tag_dir)
    if got != expected:
        raise VerificationError(f"checkpoint {tag_dir} has content hash {got}, receipts name {expected}")
