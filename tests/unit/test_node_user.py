"""The node user's access: search-only ACL entries, computed without I/O, and (as root) applied."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from gpucoin.cluster.node_user import (
    NodeUser,
    _parse_acl,
    acl_with_search,
    can_search,
    grant_search,
    prepare_node_user,
    switching_users,
)

USER = NodeUser("n", 999, 995, "/nonexistent")  # type: ignore[arg-type]
UNDEF = 0xFFFFFFFF


def _stat(mode: int, uid: int = 0, gid: int = 0) -> os.stat_result:
    return os.stat_result((0o040000 | mode, 0, 0, 0, uid, gid, 0, 0, 0, 0))


def test_search_by_mode_bits() -> None:
    assert not can_search(_stat(0o700), USER)
    assert can_search(_stat(0o711), USER)
    assert can_search(_stat(0o710, gid=995), USER) and not can_search(_stat(0o701, gid=995), USER)
    assert can_search(_stat(0o100, uid=999), USER) and not can_search(_stat(0o011, uid=999), USER)


def test_a_new_acl_adds_search_for_the_user_only() -> None:
    entries = _parse_acl(acl_with_search(None, 0o750, 999))
    assert entries == [(0x01, 7, UNDEF), (0x02, 1, 999), (0x04, 5, UNDEF), (0x10, 5, UNDEF), (0x20, 0, UNDEF)]
    # /root 0700: the owning group and others get nothing; the mask admits the user's search
    entries = _parse_acl(acl_with_search(None, 0o700, 999))
    assert (0x20, 0, UNDEF) in entries and (0x04, 0, UNDEF) in entries and (0x10, 1, UNDEF) in entries


def test_an_existing_acl_keeps_its_entries() -> None:
    blob = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", *e)
        for e in [(1, 7, UNDEF), (2, 4, 1000), (4, 0, UNDEF), (0x10, 4, UNDEF), (0x20, 0, UNDEF)]
    )
    entries = _parse_acl(acl_with_search(blob, 0o740, 999))
    assert entries == [(1, 7, UNDEF), (2, 1, 999), (2, 4, 1000), (4, 0, UNDEF), (0x10, 5, UNDEF), (0x20, 0, UNDEF)]
    assert _parse_acl(acl_with_search(acl_with_search(blob, 0o740, 999), 0o740, 999)) == entries  # idempotent
    with pytest.raises(ValueError, match="unknown POSIX ACL"):
        _parse_acl(struct.pack("<I", 3))


@pytest.mark.skipif(not switching_users(), reason="only root switches users")
def test_the_node_user_runs_gpucoin_and_reads_nothing_private(tmp_path) -> None:
    user, _ = prepare_node_user()
    assert user.uid != 0 and (user.home.stat().st_mode & 0o777) == 0o700
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "key.json").write_text("secret")
    os.chmod(private / "key.json", 0o600)  # as a keystore is: search on its directory does not open it
    deep = private / "shared"
    deep.mkdir(mode=0o755)
    (deep / "open.txt").write_text("open")
    os.chmod(deep / "open.txt", 0o644)
    assert grant_search(deep / "open.txt", user)  # at least tmp_path's 0700 parents
    probe = (
        "import sys, os, gpucoin\n"
        "print(open(sys.argv[2]).read())\n"
        "try:\n    os.listdir(sys.argv[1]); print('listed')\nexcept PermissionError: print('refused')\n"
        "try:\n    open(sys.argv[1] + '/key.json').read(); print('read')\nexcept PermissionError: print('refused')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(private), str(deep / "open.txt")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        env={"PATH": os.environ["PATH"], **user.env()},
        **user.popen_kwargs(),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["open", "refused", "refused"]
