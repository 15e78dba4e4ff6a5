"""Checkpoint storage: write-once content-addressed objects and the manifests receipts sign.

- ``objects``: ``ContentStore``, the directory the head controls;
- ``manifest``: ``CheckpointManifest`` (a receipt's ``checkpointHash``), which files each rank writes;
- ``checkpoints``: ``commit_checkpoint`` (a rank's files in), ``fetch_checkpoint`` (a checked tag
  directory out, and whose commitment failed).
"""

from gpucoin.storage.checkpoints import commit_checkpoint, fetch_checkpoint
from gpucoin.storage.manifest import CheckpointManifest, FileEntry, file_owner, rank_files, sha256_digest
from gpucoin.storage.objects import ContentStore

__all__ = [
    "CheckpointManifest",
    "ContentStore",
    "FileEntry",
    "commit_checkpoint",
    "fetch_checkpoint",
    "file_owner",
    "rank_files",
    "sha256_digest",
]
