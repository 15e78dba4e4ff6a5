"""Stale DeepSpeed op build locks: one no process holds open is removed, a held one is kept, and
the cleanup never follows a link out of the cache (``gpucoin.cluster.build_cache``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gpucoin.cluster.build_cache import build_root, clear_stale_locks

HOLD = """
import sys, time
from torch.utils.file_baton import FileBaton
b = FileBaton(sys.argv[1])
assert b.try_acquire()
print("held", flush=True)
time.sleep(60)
"""


def op_dir(root: Path, op: str = "deepspeed_shm_comm") -> Path:
    d = root / "py311_cpu" / op
    d.mkdir(parents=True)
    return d


def test_build_root_follows_torch() -> None:
    home = Path("/home/u")
    assert build_root({}, home) == home / ".cache" / "torch_extensions"
    assert build_root({"XDG_CACHE_HOME": "/c"}, home) == Path("/c/torch_extensions")
    assert build_root({"XDG_CACHE_HOME": "/c", "TORCH_EXTENSIONS_DIR": "/t"}, home) == Path("/t")


def test_a_lock_left_by_a_killed_build_is_removed_and_the_build_kept(tmp_path) -> None:
    d = op_dir(tmp_path)
    (d / "lock").touch()
    (d / "deepspeed_shm_comm.so").write_bytes(b"built")
    flat = tmp_path / "other_op"  # the TORCH_EXTENSIONS_DIR layout: <root>/<op>/lock
    flat.mkdir()
    (flat / "lock").touch()
    removed = clear_stale_locks(tmp_path, os.getuid())
    assert sorted(removed) == sorted([d / "lock", flat / "lock"])
    assert not (d / "lock").exists() and (d / "deepspeed_shm_comm.so").read_bytes() == b"built"


def test_a_lock_a_running_build_holds_is_kept(tmp_path) -> None:
    d = op_dir(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(d / "lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert clear_stale_locks(tmp_path, os.getuid()) == []
        assert (d / "lock").exists()
    finally:
        holder.kill()
        holder.wait()
    assert clear_stale_locks(tmp_path, os.getuid()) == [d / "lock"]  # its builder died holding it


def test_links_are_never_followed(tmp_path) -> None:
    outside = tmp_path / "outside"
    op_dir(outside)
    (outside / "py311_cpu" / "deepspeed_shm_comm" / "lock").touch()
    (outside / "lock").touch()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "py311_cpu").symlink_to(outside / "py311_cpu")  # a linked build folder
    (cache / "op").mkdir()
    (cache / "op" / "lock").symlink_to(outside / "lock")  # a lock that is a link
    assert clear_stale_locks(cache, os.getuid()) == []
    assert (outside / "py311_cpu" / "deepspeed_shm_comm" / "lock").exists() and (outside / "lock").exists()
    linked_root = tmp_path / "linked_root"
    linked_root.symlink_to(outside)
    assert clear_stale_locks(linked_root, os.getuid()) == []
    assert (outside / "lock").exists()


def test_the_walk_is_bounded_in_depth(tmp_path) -> None:
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "lock").touch()  # not where torch puts a build lock
    assert clear_stale_locks(tmp_path, os.getuid()) == []
    assert (deep / "lock").exists()
