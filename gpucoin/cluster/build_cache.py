"""Stale locks in torch's extension build cache, where DeepSpeed compiles its CPU ops.

DeepSpeed compiles an op on first use with torch's JIT extension builder
(``torch.utils.cpp_extension.load``), which guards each build directory with a file ``lock``
(``torch.utils.file_baton.FileBaton``): created with ``O_EXCL``, kept open by the builder,
removed when the build ends. A process that finds it polls until it is gone, with no time limit.
A build killed part way (Ctrl-C during a first run, a cancelled CI job) leaves the file behind,
and every later run's ranks wait on it until the job's ``interval_timeout_s`` declares them
lost. A lock is held only while its builder keeps it open, so one that no process of the cache's
owner has open is stale, and gpucoin removes it before it starts nodes.

Layout (torch 2.13 ``_get_build_directory``): ``$TORCH_EXTENSIONS_DIR/<op>/lock`` when that
variable is set, else ``<cache>/torch_extensions/py<ver>_<accelerator>/<op>/lock`` where
``<cache>`` is ``$XDG_CACHE_HOME`` or ``~/.cache``.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path

LOCK_NAME = "lock"
MAX_DEPTH = 2  # <root>/<build folder>/<op>/lock: the lock's directory is at most 2 below the root


def build_root(env: Mapping[str, str], home: Path) -> Path:
    """The root of torch's extension build cache for a process with environment ``env`` and home
    directory ``home`` (as ``torch.utils.cpp_extension`` finds it, without importing torch)."""
    if env.get("TORCH_EXTENSIONS_DIR"):
        return Path(env["TORCH_EXTENSIONS_DIR"])
    cache = env.get("XDG_CACHE_HOME") or str(Path(home) / ".cache")
    return Path(cache) / "torch_extensions"


def open_files(uid: int) -> set[str]:
    """The real paths of the regular files that processes of ``uid`` hold open (those we may
    inspect: our own, or any as root)."""
    import psutil

    held: set[str] = set()
    for p in psutil.process_iter(["uids"]):
        uids = p.info["uids"]
        if uids is None or uid not in (uids.real, uids.effective):
            continue
        with contextlib.suppress(psutil.Error):
            held.update(os.path.realpath(f.path) for f in p.open_files())
    return held


def clear_stale_locks(root: Path, uid: int) -> list[Path]:
    """Remove every build ``lock`` under ``root`` that no process of ``uid`` holds open.

    Never follows a symbolic link (the cache may belong to another user, who could point a link
    anywhere): the walk does not enter linked directories and removes only regular files.

    Returns:
        The locks removed.
    """
    root = Path(root)
    if root.is_symlink() or not root.is_dir():
        return []
    held = open_files(uid)
    removed: list[Path] = []
    for top, dirs, files, dir_fd in os.fwalk(root, follow_symlinks=False):
        if len(Path(top).relative_to(root).parts) >= MAX_DEPTH:
            dirs.clear()  # the walk stays bounded however deep the cache is
        if LOCK_NAME not in files:
            continue
        path = Path(top) / LOCK_NAME
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(LOCK_NAME, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or os.path.realpath(path) in held:
                continue
            os.unlink(LOCK_NAME, dir_fd=dir_fd)
            removed.append(path)
    return removed
