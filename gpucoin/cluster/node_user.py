"""The unprivileged OS user that Ray's node processes (and so job code) run as when gpucoin is root.

Job code runs in Ray's workers. Run as the user of the signers and the head, it could read their
keystores, their ``/proc/<pid>/environ`` and memory; as root, everything. So when gpucoin starts
nodes as root they run as ``NODE_USER`` (created if missing: a system user with its own home
for its caches, no login shell, in no other group). What that user may read is only what any user
may, plus:

- search (``x``, not read) permission, by a POSIX ACL entry for that user alone, on each
  directory above the Python interpreter, the environment and gpucoin that it could not search
  (e.g. ``/root`` 0700 when Python lives under ``/root/.pyenv``): enough to run them, not to
  list or read anything else there;
- the directories gpucoin hands the nodes (``chown_tree``): the cluster's temp dir, the job's
  working dirs, a copy of the Ray token.

As a normal user gpucoin cannot switch users: job code shares that user's privileges, and
``gpucoin train`` says so.
"""

from __future__ import annotations

import errno
import os
import pwd
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from gpucoin.cluster.procs import end_processes
from gpucoin.exceptions import ClusterError

NODE_USER = "gpucoin-node"
"""Name of the node user gpucoin creates and uses when it runs as root."""

NODE_HOME = Path("/var/lib/gpucoin-node")
"""The node user's home: its caches (DeepSpeed's compiled ops, corpora) persist there between runs."""

CHECK_TIMEOUT_S = 120.0
"""Bound on creating the user and on checking that it can run gpucoin."""

_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_UNDEFINED_ID = 0xFFFFFFFF
_SEARCH = 0o1


@dataclass(frozen=True)
class NodeUser:
    """An OS user Ray's node processes run as.

    Attributes:
        name: login name; uid / gid: its ids (never 0); home: its home directory.
    """

    name: str
    uid: int
    gid: int
    home: Path

    def popen_kwargs(self) -> dict:
        """``subprocess.Popen`` arguments that start a process as this user, in no other group."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def env(self) -> dict[str, str]:
        """The variables a process of this user needs to find its own home and caches."""
        return {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name}


def switching_users() -> bool:
    """Whether gpucoin runs its nodes as ``NODE_USER``: only when it runs as root."""
    return os.geteuid() == 0


def ensure_node_user(name: str = NODE_USER, home: Path = NODE_HOME) -> NodeUser:
    """The node user ``name``, created with ``useradd`` if missing, with ``home`` (0700, its own).

    Raises:
        ClusterError: not root, ``useradd`` failed, or the user exists with uid 0.
    """
    if not switching_users():
        raise ClusterError("only root can create or switch to the node user")
    if not _exists(name):
        cmd = ["useradd", "--system", "--user-group", "--home-dir", str(home), "--shell", "/usr/sbin/nologin", name]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ClusterError(f"cannot create the node user {name!r}: {e}") from None
        if done.returncode != 0:
            raise ClusterError(f"cannot create the node user {name!r}: {done.stderr.strip()}")
    entry = pwd.getpwnam(name)
    if entry.pw_uid == 0:
        raise ClusterError(f"the node user {name!r} has uid 0; job code must not run as root")
    user = NodeUser(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))
    user.home.mkdir(parents=True, exist_ok=True)
    os.chown(user.home, user.uid, user.gid)
    os.chmod(user.home, 0o700)
    return user


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def can_search(st: os.stat_result, user: NodeUser) -> bool:
    """Whether ``user`` may search a directory with stat ``st`` by its mode bits (an ACL may allow more)."""
    if st.st_uid == user.uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid == user.gid:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def _parse_acl(blob: bytes) -> list[tuple[int, int, int]]:
    (version,) = struct.unpack_from("<I", blob)
    if version != _ACL_VERSION or (len(blob) - 4) % 8:
        raise ValueError(f"unknown POSIX ACL format (version {version}, {len(blob)} bytes)")
    return [struct.unpack_from("<HHI", blob, 4 + 8 * i) for i in range((len(blob) - 4) // 8)]


def acl_with_search(blob: bytes | None, mode: int, uid: int) -> bytes:
    """The ``system.posix_acl_access`` value that adds search for ``uid`` to ``blob`` (None: the
    directory has no ACL, its ``mode`` gives the base entries); the mask widens to allow it.

    Source: the Linux POSIX ACL xattr format (include/uapi/linux/posix_acl_xattr.h, version 2:
    a u32 version, then entries of u16 tag, u16 perm, u32 id, sorted by tag then id).
    """
    if blob is None:
        entries = [(_USER_OBJ, (mode >> 6) & 7, _UNDEFINED_ID), (_GROUP_OBJ, (mode >> 3) & 7, _UNDEFINED_ID)]
        entries.append((_OTHER, mode & 7, _UNDEFINED_ID))
    else:
        entries = _parse_acl(blob)
    by_key = {(tag, i): perm for tag, perm, i in entries}
    by_key[(_USER, uid)] = by_key.get((_USER, uid), 0) | _SEARCH
    # a new mask keeps what the owning group had; the mask bounds every named entry
    mask = by_key.get((_MASK, _UNDEFINED_ID), by_key[(_GROUP_OBJ, _UNDEFINED_ID)])
    by_key[(_MASK, _UNDEFINED_ID)] = mask | _SEARCH
    ordered = sorted(by_key.items())
    return struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", t, p, i) for (t, i), p in ordered)


def grant_search(target: Path, user: NodeUser) -> list[Path]:
    """Let ``user`` reach ``target``: add search for it (an ACL entry of its own) on each
    directory above ``target`` that its mode bits do not let it search.

    Returns:
        The directories changed (gpucoin reports them).

    Raises:
        ClusterError: the file system refuses ACLs.
    """
    changed = []
    for d in reversed(Path(target).resolve().parents):
        st = d.stat()
        if can_search(st, user):
            continue
        try:
            try:
                blob = os.getxattr(d, _ACL_XATTR)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                    raise
                blob = None
            os.setxattr(d, _ACL_XATTR, acl_with_search(blob, st.st_mode, user.uid))
        except OSError as e:
            raise ClusterError(
                f"cannot let the node user {user.name!r} search {d} ({e.strerror}): install gpucoin and "
                f"Python where other users can read them"
            ) from None
        changed.append(d)
    return changed


def runtime_paths() -> list[Path]:
    """What a node process must reach: the interpreter (and the file it links to), the
    environment, the standard library and gpucoin itself."""
    import gpucoin

    paths = [Path(sys.executable), Path(sys.executable).resolve(), Path(sys.prefix), Path(sys.base_prefix)]
    paths += [Path(os.__file__).parent, Path(gpucoin.__file__).parent]
    return [p / "x" if p.is_dir() else p for p in paths]  # search on the dir itself too


def prepare_node_user(name: str = NODE_USER) -> tuple[NodeUser, list[Path]]:
    """``ensure_node_user``, let it reach the runtime (``grant_search``), then check that it can
    run gpucoin.

    Returns:
        (the user, the directories whose ACL was widened).

    Raises:
        ClusterError: as ``ensure_node_user`` and ``grant_search``, or the user still cannot
            import gpucoin (its error quoted).
    """
    user = ensure_node_user(name)
    changed: list[Path] = []
    for p in runtime_paths():
        changed += grant_search(p, user)
    cmd = [sys.executable, "-c", "import gpucoin, ray"]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, cwd="/", env=_env(user), **user.popen_kwargs()
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ClusterError(f"the node user {user.name!r} cannot run {sys.executable}: {e}") from None
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ClusterError(f"the node user {user.name!r} cannot import gpucoin with {sys.executable}: {tail[0]}")
    return user, sorted(set(changed))


def _env(user: NodeUser) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **user.env()}


def chown_tree(path: Path, user: NodeUser) -> None:
    """Give ``path`` and everything under it to ``user``; never through a symbolic link (a link
    itself is given, not its target; a link at ``path`` is refused).

    Raises:
        ClusterError: ``path`` is a symbolic link.
    """
    if Path(path).is_symlink():
        raise ClusterError(f"{path} is a symbolic link; refusing to hand it to {user.name!r}")
    os.chown(path, user.uid, user.gid, follow_symlinks=False)
    for _, dirs, files, dir_fd in os.fwalk(path, follow_symlinks=False):
        for n in dirs + files:
            os.chown(n, user.uid, user.gid, dir_fd=dir_fd, follow_symlinks=False)


def node_dir(parent: Path, user: NodeUser, name: str = "n") -> Path:
    """A directory ``parent/name`` that ``user`` owns (0700), in ``parent``, a directory of ours
    that it may only search (0711): it cannot rename or replace its own directory (as it could in
    a sticky ``/tmp``), so paths we later read under it stay where we made them."""
    os.chmod(parent, 0o711)
    d = Path(parent) / name
    d.mkdir(mode=0o700)
    os.chown(d, user.uid, user.gid)
    return d


def kill_processes(user: NodeUser, timeout_s: float = 10.0) -> int:
    """Terminate, then kill, every process of ``user`` (its uid is gpucoin's alone): what job
    code left running, for instance a daemon in a session of its own, must not outlive its run.

    Returns:
        How many processes were found.
    """
    import psutil

    found = []
    for p in psutil.process_iter(["uids"]):
        uids = p.info["uids"]
        if uids is not None and user.uid in (uids.real, uids.effective):
            found.append(p)
    return end_processes(found, timeout_s)


def kill_marked_processes(user: NodeUser, mark: str, timeout_s: float = 10.0) -> int:
    """Terminate, then kill, every process of ``user`` whose environment holds ``mark`` (a
    ``NAME=value`` pair given to one child alone) or whose working directory is under ``mark``'s
    value when that is a path: what one job-code child left running, without touching the user's
    other processes (the Ray nodes of this host run as the same user while the head evaluates a
    job). A process that cleared its environment and left both is not found: it can do no more
    than any job code running as that user already can (docs/security.md, residual risks).

    Returns:
        How many processes were found.
    """
    import psutil

    name, _, value = mark.partition("=")
    found = []
    for p in psutil.process_iter(["uids", "environ", "cwd"]):
        uids = p.info["uids"]
        if uids is None or user.uid not in (uids.real, uids.effective):
            continue
        env = p.info["environ"] or {}
        cwd = p.info["cwd"] or ""
        if env.get(name) == value or (value.startswith("/") and (cwd == value or cwd.startswith(value + "/"))):
            found.append(p)
    return end_processes(found, timeout_s)
