"""Job packages a submitter uploads are hostile until the head has unpacked and re-hashed them."""

from __future__ import annotations

import contextlib
import io
import stat
import zipfile

import pytest

from gpucoin.exceptions import SpecError
from gpucoin.head import packages
from gpucoin.head.packages import PackageStore, pack, unpack
from gpucoin.spec import package_hash
from tests.conftest import JOB_PACKAGE


def _zip(entries: list[tuple[str, bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            z.writestr(info, data)
    return buf.getvalue()


def test_a_package_round_trips_under_its_hash(tmp_path):
    data = pack(JOB_PACKAGE)
    assert pack(JOB_PACKAGE) == data  # deterministic: the same package, the same bytes
    store = PackageStore(tmp_path / "pkgs")
    digest = package_hash(JOB_PACKAGE)
    n = store.put(digest, data)
    assert n == len(zipfile.ZipFile(io.BytesIO(data)).namelist()) >= 3
    assert package_hash(store.path(digest)) == digest
    assert store.put(digest, data) == n  # a retry keeps what is there
    dest = store.materialize(digest, tmp_path / "run" / "shakespeare_char")
    assert package_hash(dest) == digest


def test_an_upload_under_another_hash_is_refused_and_leaves_nothing(tmp_path):
    store = PackageStore(tmp_path / "pkgs")
    with pytest.raises(SpecError, match="hashes to"):
        store.put("0x" + "ab" * 32, pack(JOB_PACKAGE))
    assert store.path("0x" + "ab" * 32) is None
    assert [p.name for p in (tmp_path / "pkgs").iterdir()] == []


@pytest.mark.parametrize(
    "entries, problem",
    [
        ([("/etc/evil.py", b"x", stat.S_IFREG | 0o644)], "plain relative path"),
        ([("../evil.py", b"x", stat.S_IFREG | 0o644)], "plain relative path"),
        ([("a/../../evil.py", b"x", stat.S_IFREG | 0o644)], "plain relative path"),
        ([("link.py", b"/etc/passwd", stat.S_IFLNK | 0o777)], "not a regular file"),
        ([("a.py", b"1", stat.S_IFREG | 0o644), ("a.py", b"2", stat.S_IFREG | 0o644)], "twice"),
    ],
)
def test_hostile_entries_are_refused(tmp_path, entries, problem):
    with pytest.warns(UserWarning) if len(entries) == 2 else contextlib.nullcontext():  # zipfile warns of a duplicate
        data = _zip(entries)
    with pytest.raises(SpecError, match=problem):
        unpack(data, tmp_path)
    assert not (tmp_path.parent / "evil.py").exists() and not (tmp_path / "link.py").is_symlink()


def test_not_a_zip_and_too_big_are_refused(tmp_path, monkeypatch):
    with pytest.raises(SpecError, match="not a zip"):
        unpack(b"PK\x03\x04 not really", tmp_path / "a")
    monkeypatch.setattr(packages, "MAX_PACKAGE_BYTES", 1000)
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.py", b"\0" * 100_000)  # compresses to far less than the limit
    assert len(bomb.getvalue()) < 1000
    with pytest.raises(SpecError, match="more than 1000 bytes"):
        unpack(bomb.getvalue(), tmp_path / "b")
