"""Job packages on the head: a submitter uploads its package as a zip; the head keeps it by hash.

The hash is ``gpucoin.spec.package_hash`` of the unpacked files, recomputed by the head: an
upload is kept only under the hash its content has, so a JobOrder's signed ``packageHash`` names
exactly the code its ranks and its verifier run. An upload is hostile until checked: its
entries must be plain relative paths of regular files, at most ``MAX_PACKAGE_FILES`` of them and
``MAX_PACKAGE_BYTES`` in all, unpacked and re-hashed in a fresh directory before it is kept.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from gpucoin.exceptions import SpecError
from gpucoin.spec import MAX_PACKAGE_FILES, package_files, package_hash

MAX_PACKAGE_BYTES = 64 << 20
"""The largest package (zip and unpacked content both): 64 MiB."""

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def pack(package_dir: Path) -> bytes:
    """The files ``package_hash`` covers under ``package_dir`` as a zip (deterministic: sorted,
    fixed timestamps), for ``PUT /v1/packages/{hash}``.

    Raises:
        SpecError: as ``package_files``, or a package over ``MAX_PACKAGE_BYTES``.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in package_files(package_dir):
            info = zipfile.ZipInfo(f.relative_to(package_dir).as_posix(), _ZIP_TIME)
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, f.read_bytes())
    data = buf.getvalue()
    if len(data) > MAX_PACKAGE_BYTES:
        raise SpecError(f"{package_dir}: the package zips to {len(data)} bytes, over {MAX_PACKAGE_BYTES}")
    return data


def unpack(data: bytes, dest: Path) -> int:
    """Write the files of zip ``data`` under the empty directory ``dest``; return how many.

    Raises:
        SpecError: not a zip; an entry that is not a plain relative path of a regular file (absolute,
            ``..``, a link, a device, a directory entry with content, a duplicate); more than
            ``MAX_PACKAGE_FILES`` files or ``MAX_PACKAGE_BYTES`` in all (declared or actual).
    """
    if len(data) > MAX_PACKAGE_BYTES:
        raise SpecError(f"a package of {len(data)} bytes is over the limit of {MAX_PACKAGE_BYTES}")
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        infos = z.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise SpecError(f"the package is not a zip file: {e}") from None
    files = [i for i in infos if not i.is_dir()]
    if len(files) > MAX_PACKAGE_FILES:
        raise SpecError(f"the package has {len(files)} files, over the limit of {MAX_PACKAGE_FILES}")
    if sum(i.file_size for i in files) > MAX_PACKAGE_BYTES:
        raise SpecError(f"the package unpacks to more than {MAX_PACKAGE_BYTES} bytes")
    seen: set[str] = set()
    total = 0
    for info in files:
        rel = _safe_name(info)
        if rel in seen:
            raise SpecError(f"the package names {rel!r} twice")
        seen.add(rel)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with z.open(info) as src, open(target, "xb") as out:
            while chunk := src.read(1 << 20):
                total += len(chunk)
                if total > MAX_PACKAGE_BYTES:  # the declared sizes may lie
                    raise SpecError(f"the package unpacks to more than {MAX_PACKAGE_BYTES} bytes")
                out.write(chunk)
    return len(files)


def _safe_name(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if mode and not stat.S_ISREG(mode):
        raise SpecError(f"package entry {info.filename!r} is not a regular file")
    name = info.filename
    path = PurePosixPath(name)
    if "\\" in name or "\0" in name or path.is_absolute() or not path.parts or ".." in path.parts:
        raise SpecError(f"package entry {name!r} is not a plain relative path")
    return path.as_posix()


class PackageStore:
    """The head's job packages, one directory per package hash under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path | None:
        """The unpacked package named ``digest``, or None if the head has none by that hash."""
        d = self.root / _checked_hash(digest)
        return d if d.is_dir() else None

    def put(self, digest: str, data: bytes) -> int:
        """Keep the zip ``data`` as package ``digest``; return its file count. Idempotent.

        Raises:
            SpecError: as ``unpack``, or the files hash to something else than ``digest``.
        """
        digest = _checked_hash(digest)
        have = self.path(digest)
        if have is not None:
            return len(package_files(have))
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.root))
        try:
            n = unpack(data, tmp)
            got = package_hash(tmp)
            if got != digest:
                raise SpecError(f"the uploaded package hashes to {got}, not {digest}")
            try:
                os.rename(tmp, self.root / digest)
            except OSError:  # a concurrent upload of the same package won
                if self.path(digest) is None:
                    raise
            return n
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def materialize(self, digest: str, dest: Path) -> Path:
        """Copy package ``digest`` to ``dest`` (a directory named as the job's module, which is
        how Ray's ``py_modules`` names the import); return ``dest``.

        Raises:
            SpecError: the head holds no such package.
        """
        src = self.path(digest)
        if src is None:
            raise SpecError(f"no package {digest} was uploaded")
        shutil.copytree(src, dest)
        return dest


def _checked_hash(digest: str) -> str:
    d = str(digest).lower()
    if len(d) != 66 or not d.startswith("0x") or any(c not in "0123456789abcdef" for c in d[2:]):
        raise SpecError(f"{digest!r} is not a package hash (0x + 64 hex digits)")
    return d
