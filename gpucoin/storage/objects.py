"""A write-once, content-addressed object store in a directory the head controls.

Objects are named by the sha256 of their bytes (``0x`` + hex, as receipts carry it) and live at
``<root>/sha256/<first two hex>/<the other 62>``, read-only. A put of bytes already stored is a
no-op that returns the same name; nothing is ever overwritten or deleted through the store, so a
file a receipt names by hash cannot change or vanish behind it. Every read re-hashes what it
returns.

In the embedded local mode the root is a directory of the job on the head's disk, reached by
the ranks and the verifier through a ``StoreActor`` on the head (``gpucoin.storage.service``).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path

from gpucoin.exceptions import ObjectCorrupted, ObjectMissing, StorageError

MAX_OBJECT_BYTES = 2 * 1024**3
"""Largest object the store takes: 2 GiB (one rank's checkpoint file of a model of a few hundred
million parameters); larger models need an object-store backend that streams."""

_DIGEST = re.compile(r"^0x[0-9a-f]{64}$")
_CHUNK_BYTES = 1 << 20


class ContentStore:
    """Write-once objects named by their sha256 under ``root`` (created if missing).

    Args:
        root: the store's directory.
        max_object_bytes: largest object ``put`` takes.
    """

    def __init__(self, root: str | Path, max_object_bytes: int = MAX_OBJECT_BYTES) -> None:
        self.root = Path(root)
        self.max_object_bytes = max_object_bytes
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)

    def _path(self, digest: str) -> Path:
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise StorageError(f"{str(digest)[:80]!r} is not an object name (0x + 64 lowercase hex digits)")
        return self.root / "sha256" / digest[2:4] / digest[4:]

    def put(self, data: bytes) -> str:
        """Store ``data`` once; return its name (``0x`` + sha256 hex). Storing it again changes nothing.

        Raises:
            StorageError: if ``data`` is not bytes or is larger than ``max_object_bytes``.
            ObjectCorrupted: if an object of that name is stored but no longer has those bytes.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StorageError(f"an object is bytes, got {type(data).__name__}")
        if len(data) > self.max_object_bytes:
            raise StorageError(f"an object of {len(data)} bytes is larger than the store's {self.max_object_bytes}")
        digest = "0x" + hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        if path.exists():
            self._check(path, digest)
            return digest
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            try:
                os.link(tmp, path)  # fails if the name exists: never replaces what a racing put stored
            except FileExistsError:
                self._check(path, digest)
        finally:
            os.unlink(tmp)
        return digest

    def get(self, digest: str) -> bytes:
        """The bytes stored under ``digest``, re-hashed.

        Raises:
            StorageError: for a malformed name.
            ObjectMissing: if nothing is stored under it.
            ObjectCorrupted: if the stored bytes no longer hash to it.
        """
        path = self._path(digest)
        try:  # never through a link, never blocking on a FIFO: the store's dir may be another user's
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ObjectMissing(f"no object {digest} in the store") from None
        except OSError as e:
            raise ObjectCorrupted(f"object {digest} in {self.root} cannot be read: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ObjectCorrupted(f"object {digest} in {self.root} is not a regular file")
            data = f.read()
        if "0x" + hashlib.sha256(data).hexdigest() != digest:
            raise ObjectCorrupted(f"object {digest} in {self.root} no longer hashes to its name")
        return data

    def has(self, digests: list[str]) -> list[bool]:
        """For each name, whether an object is stored under it (not re-hashed; ``get`` checks).

        Raises:
            StorageError: for a malformed name.
        """
        return [self._path(d).is_file() for d in digests]

    def _check(self, path: Path, digest: str) -> None:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK_BYTES):
                h.update(chunk)
        if "0x" + h.hexdigest() != digest:
            raise ObjectCorrupted(f"object {digest} in {self.root} no longer hashes to its name")
