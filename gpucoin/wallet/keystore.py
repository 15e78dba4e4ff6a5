"""Wallet keystores: eth-account encrypted JSON v3 files (scrypt KDF, AES-128-CTR), mode 0600.

A wallet is one secp256k1 key held as an eth-account ``LocalAccount``. On disk it is only ever the
encrypted keystore; no private key is printed, logged or stored elsewhere (SPEC.md, Trust and
security). Keystores are readable by geth, web3.py and ethers.js.

A wallets directory holds one keystore per wallet, ``<name>.json`` (``create_wallet``,
``import_private_key``, ``import_keystore``, ``list_wallets``, ``find_wallet``; the ``gpucoin wallet``
commands). Nothing here decrypts a keystore unless it needs the key, and no error message ever
contains a private key or a password.

Dev wallets (``dev_account``) exist only for the embedded local mode (``gpucoin train`` without
``--address``): they are encrypted with a fixed, public dev password and light scrypt parameters so
a demo and the tests start fast. They protect nothing and must never hold value on a real cluster.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from gpucoin.exceptions import WalletError

__all__ = [
    "DEFAULT_SCRYPT_N",
    "DEV_SCRYPT_N",
    "DEV_PASSWORD",
    "new_account",
    "save_keystore",
    "load_keystore",
    "keystore_address",
    "dev_account",
    "WalletInfo",
    "validate_wallet_name",
    "wallet_path",
    "keystore_info",
    "is_dev_keystore",
    "list_wallets",
    "find_wallet",
    "next_wallet_name",
    "check_new_wallet",
    "parse_private_key",
    "create_wallet",
    "import_private_key",
    "import_keystore",
]

DEFAULT_SCRYPT_N = 2**18
"""scrypt work factor of user keystores (geth's and eth-account's default; ~1 s, 256 MiB)."""

DEV_SCRYPT_N = 2**14
"""scrypt work factor of dev wallets (~30 ms): fast, and weak on purpose (see module docstring)."""

DEV_PASSWORD = "gpucoin-dev-wallet-insecure"
"""Fixed password of dev wallets; public, so a dev wallet is not a secret."""

_MAX_SCRYPT_N = 2**20
_MAX_SCRYPT_R = 8
_MAX_SCRYPT_P = 16
_MAX_SCRYPT_WORK = _MAX_SCRYPT_N * _MAX_SCRYPT_R
"""Bound on N·r·p: scrypt's memory is 128·r·N bytes and its time grows with N·r·p (RFC 7914, 6).
geth's standard (N 2**18, r 8, p 1) and light (N 2**12, r 8, p 6) keystores are within it."""
_KEY_BYTES = 32
_MAX_PBKDF2_C = 10**7
_MAX_KEYSTORE_BYTES = 64 * 1024
_WALLET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_PRIVATE_KEY = re.compile(r"^(?:0x)?[0-9a-fA-F]{64}$")
_DEV_CREATE_ATTEMPTS = 3


def new_account() -> LocalAccount:
    """A fresh random account (256 bits from ``os.urandom`` through keccak, eth-account's ``create``)."""
    return Account.create()


def _check_password(password: Any) -> str:
    if not isinstance(password, str) or not password:
        raise WalletError("a keystore password must be a non-empty string")
    return password


def save_keystore(
    account: LocalAccount, path: str | os.PathLike[str], password: str, *, scrypt_n: int = DEFAULT_SCRYPT_N
) -> Path:
    """Encrypt ``account``'s key into a JSON v3 keystore at ``path`` (scrypt, file mode 0600).

    The file appears atomically and complete (written to a temporary file, then hard-linked into
    place), and an existing file is never replaced. Missing parent folders are created with mode 0700.

    Args:
        scrypt_n: scrypt work factor N, a power of two in [2**10, 2**20].

    Returns:
        The path written.

    Raises:
        WalletError: if ``path`` exists, the password is empty, ``scrypt_n`` is out of range,
            or the file cannot be written.
    """
    path = Path(path)
    _check_password(password)
    if not isinstance(scrypt_n, int) or scrypt_n < 2**10 or scrypt_n > _MAX_SCRYPT_N or scrypt_n & (scrypt_n - 1):
        raise WalletError(f"scrypt_n must be a power of two in [2**10, 2**20], got {scrypt_n!r}")
    if path.exists():
        raise WalletError(f"refusing to overwrite the existing keystore {path}")
    keyfile = Account.encrypt(account.key, password, kdf="scrypt", iterations=scrypt_n)
    data = json.dumps(keyfile, indent=2).encode()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".keystore-", suffix=".tmp", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # fails if path exists: no overwrite, even in a race
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links: exclusive create instead
                fd2 = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd2, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            os.unlink(tmp)
    except FileExistsError:
        raise WalletError(f"refusing to overwrite the existing keystore {path}") from None
    except OSError as e:
        raise WalletError(f"cannot write keystore {path}: {e.strerror or e}") from None
    return path


def _read_keyfile(path: Path) -> dict[str, Any]:
    """The parsed JSON of a keystore file, with its KDF work bounded (a file could ask for 2**40)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_KEYSTORE_BYTES + 1)
    except FileNotFoundError:
        raise WalletError(f"no keystore at {path}") from None
    except OSError as e:
        raise WalletError(f"cannot read keystore {path}: {e.strerror or e}") from None
    if len(raw) > _MAX_KEYSTORE_BYTES:
        raise WalletError(f"keystore {path} is corrupt: larger than {_MAX_KEYSTORE_BYTES} bytes")
    try:
        keyfile = json.loads(raw)
    except ValueError:
        raise WalletError(f"keystore {path} is corrupt: not JSON") from None
    if not isinstance(keyfile, dict) or keyfile.get("version") != 3:
        raise WalletError(f"keystore {path} is corrupt: not an encrypted JSON v3 keystore")
    crypto = keyfile.get("crypto") or keyfile.get("Crypto")
    params = crypto.get("kdfparams") if isinstance(crypto, dict) else None
    if not isinstance(params, dict):
        raise WalletError(f"keystore {path} is corrupt: no kdfparams")
    kdf = crypto.get("kdf")
    work = params.get("n") if kdf == "scrypt" else params.get("c") if kdf == "pbkdf2" else None
    limit = _MAX_SCRYPT_N if kdf == "scrypt" else _MAX_PBKDF2_C
    if not _is_int(work) or not 1 <= work <= limit:
        raise WalletError(f"keystore {path} is corrupt: unsupported kdf {kdf!r} or work factor {work!r}")
    if params.get("dklen") != _KEY_BYTES:
        raise WalletError(f"keystore {path} is corrupt: {kdf} dklen {params.get('dklen')!r}, expected {_KEY_BYTES}")
    if kdf == "scrypt":
        _check_scrypt(params, path)
    return keyfile


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_scrypt(params: dict[str, Any], path: Path) -> None:
    """Refuse scrypt parameters that would exhaust memory or time before the KDF runs."""
    n, r, p = params.get("n"), params.get("r"), params.get("p")
    if n & (n - 1):
        raise WalletError(f"keystore {path} is corrupt: scrypt n {n} is not a power of two")
    if not (_is_int(r) and 1 <= r <= _MAX_SCRYPT_R and _is_int(p) and 1 <= p <= _MAX_SCRYPT_P):
        raise WalletError(
            f"keystore {path} is refused: scrypt r {r!r} and p {p!r} must be integers in "
            f"[1, {_MAX_SCRYPT_R}] and [1, {_MAX_SCRYPT_P}]"
        )
    if n * r * p > _MAX_SCRYPT_WORK:
        raise WalletError(
            f"keystore {path} is refused: scrypt n·r·p = {n * r * p} exceeds {_MAX_SCRYPT_WORK} "
            "(memory 128·r·n bytes, time in n·r·p)"
        )


def keystore_address(path: str | os.PathLike[str]) -> str:
    """Checksum address a keystore names, without decrypting it (for ``gpucoin wallet show``).

    Raises:
        WalletError: missing, unreadable or corrupt file, or no valid address in it.
    """
    path = Path(path)
    return _named_address(_read_keyfile(path), path)


def _named_address(keyfile: dict[str, Any], path: Path) -> str:
    address = keyfile.get("address")
    try:
        return to_checksum_address(address if str(address).startswith("0x") else f"0x{address}")
    except (ValueError, TypeError):
        raise WalletError(f"keystore {path} is corrupt: no valid address") from None


def load_keystore(path: str | os.PathLike[str], password: str) -> LocalAccount:
    """Decrypt the keystore at ``path`` into an account.

    Raises:
        WalletError: one line, for a missing or unreadable file, a corrupt file (bad JSON, not v3,
            unsupported or excessive KDF, an address that does not match the key), or a wrong password.
    """
    path = Path(path)
    _check_password(password)
    keyfile = _read_keyfile(path)
    try:
        key = Account.decrypt(keyfile, password)
    except ValueError as e:
        if "MAC mismatch" in str(e):
            raise WalletError(f"wrong password for keystore {path}") from None
        raise WalletError(f"keystore {path} is corrupt: {e}") from None
    except Exception as e:  # eth-keyfile raises KeyError/TypeError on a mangled structure
        raise WalletError(f"keystore {path} is corrupt: {type(e).__name__}") from None
    account = Account.from_key(key)
    named = keyfile.get("address")
    if named is not None:
        try:
            named_ok = to_checksum_address(named if str(named).startswith("0x") else f"0x{named}") == account.address
        except (ValueError, TypeError):
            named_ok = False
        if not named_ok:
            raise WalletError(f"keystore {path} is corrupt: its address does not match its key")
    return account


def dev_account(name: str, wallets_dir: str | os.PathLike[str]) -> LocalAccount:
    """Create or load the dev wallet ``<wallets_dir>/<name>.json`` (embedded local mode only).

    The keystore uses ``DEV_PASSWORD`` and ``DEV_SCRYPT_N``; see the module docstring for why that is
    acceptable only in the embedded local mode. Two processes asking for the same new name at once
    get the same account (the second one loads what the first wrote).

    Raises:
        WalletError: for a name outside ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``, or a keystore that
            cannot be written or read.
    """
    if not isinstance(name, str) or not _WALLET_NAME.match(name):
        raise WalletError(f"not a valid dev wallet name: {name!r} (letters, digits, _ . -; up to 64)")
    path = Path(wallets_dir) / f"{name}.json"
    for _ in range(_DEV_CREATE_ATTEMPTS):
        if path.exists():
            return load_keystore(path, DEV_PASSWORD)
        try:
            account = new_account()
            save_keystore(account, path, DEV_PASSWORD, scrypt_n=DEV_SCRYPT_N)
            return account
        except WalletError:
            if not path.exists():  # a real write failure, not a lost race
                raise
    return load_keystore(path, DEV_PASSWORD)


# -- wallets directories (``gpucoin wallet``) ----------------------------------------------------


@dataclass(frozen=True)
class WalletInfo:
    """One keystore file of a wallets directory, as read without decrypting it.

    Attributes:
        name: the wallet's name, the file name without ``.json``.
        path: the keystore file.
        address: checksum address the keystore names; None if the file could not be read.
        kdf: ``"scrypt"`` or ``"pbkdf2"``; None if the file could not be read.
        work: the KDF work factor (scrypt N or pbkdf2 iterations c); None if unreadable.
        problem: why the file could not be read (one line), or None.
    """

    name: str
    path: Path
    address: str | None
    kdf: str | None
    work: int | None
    problem: str | None = None


def validate_wallet_name(name: Any) -> str:
    """Return ``name`` if it can name a wallet: 1-64 of ``[A-Za-z0-9_.-]``, starting with a letter
    or digit (so it is a plain file name), and not an address (which would make lookups ambiguous).

    Raises:
        WalletError: otherwise.
    """
    if not isinstance(name, str) or not _WALLET_NAME.match(name):
        raise WalletError(
            f"not a valid wallet name: {name!r} (letters, digits, _ . -; up to 64; not starting with . - _)"
        )
    if _ADDRESS.match(name):
        raise WalletError(f"not a valid wallet name: {name!r} (an address cannot be a name)")
    return name


def wallet_path(wallets_dir: str | os.PathLike[str], name: str) -> Path:
    """The keystore file ``<wallets_dir>/<name>.json`` of wallet ``name`` (which need not exist).

    Raises:
        WalletError: for an invalid name (``validate_wallet_name``).
    """
    return Path(wallets_dir) / f"{validate_wallet_name(name)}.json"


def keystore_info(path: str | os.PathLike[str]) -> WalletInfo:
    """Name, address, KDF and work factor of the keystore at ``path``, without decrypting it.

    Raises:
        WalletError: missing, unreadable or corrupt file (as ``keystore_address``).
    """
    path = Path(path)
    keyfile = _read_keyfile(path)
    crypto = keyfile.get("crypto") or keyfile.get("Crypto")
    kdf = crypto["kdf"]
    work = crypto["kdfparams"]["n" if kdf == "scrypt" else "c"]
    return WalletInfo(name=path.stem, path=path, address=_named_address(keyfile, path), kdf=kdf, work=work)


def is_dev_keystore(path: str | os.PathLike[str]) -> bool:
    """True if the keystore at ``path`` is a dev wallet (``DEV_SCRYPT_N``, unlocked by the public
    ``DEV_PASSWORD``). Costs one light scrypt (~30 ms) only for a keystore with the dev work factor.

    Raises:
        WalletError: missing, unreadable or corrupt file.
    """
    info = keystore_info(path)
    if info.kdf != "scrypt" or info.work != DEV_SCRYPT_N:
        return False
    try:
        load_keystore(path, DEV_PASSWORD)
    except WalletError:
        return False
    return True


def list_wallets(wallets_dir: str | os.PathLike[str]) -> list[WalletInfo]:
    """Every keystore ``*.json`` in ``wallets_dir``, by name, read without decrypting.

    A file that cannot be read is listed with ``problem`` set (and no address) rather than hiding
    the others; hidden files (temporary files of ``save_keystore``) are skipped. A directory that
    does not exist holds no wallets.

    Raises:
        WalletError: if ``wallets_dir`` exists but is not a readable directory.
    """
    folder = Path(wallets_dir)
    if not folder.exists():
        return []
    if not folder.is_dir():
        raise WalletError(f"wallets directory {folder} is not a directory")
    try:
        paths = sorted(
            p for p in folder.iterdir() if p.suffix == ".json" and not p.name.startswith(".") and p.is_file()
        )
    except OSError as e:
        raise WalletError(f"cannot read wallets directory {folder}: {e.strerror or e}") from None
    out = []
    for p in paths:
        try:
            out.append(keystore_info(p))
        except WalletError as e:
            out.append(WalletInfo(name=p.stem, path=p, address=None, kdf=None, work=None, problem=str(e)))
    return out


def _wallet_with_address(wallets_dir: str | os.PathLike[str], address: str) -> WalletInfo | None:
    """The readable wallet of ``wallets_dir`` holding ``address`` (any case), or None."""
    for info in list_wallets(wallets_dir):
        if info.address is not None and info.address.lower() == address.lower():
            return info
    return None


def find_wallet(wallets_dir: str | os.PathLike[str], name_or_address: str) -> WalletInfo:
    """The wallet of ``wallets_dir`` named ``name_or_address``, or holding that address (any case).

    Raises:
        WalletError: for no such wallet, an invalid name, or a keystore that cannot be read.
    """
    folder = Path(wallets_dir)
    if isinstance(name_or_address, str) and _ADDRESS.match(name_or_address):
        info = _wallet_with_address(folder, name_or_address)
        if info is None:
            raise WalletError(f"no wallet with address {name_or_address} in {folder}")
        return info
    path = wallet_path(folder, name_or_address)
    if not path.is_file():
        raise WalletError(f"no wallet named {name_or_address!r} in {folder}")
    return keystore_info(path)


def next_wallet_name(wallets_dir: str | os.PathLike[str]) -> str:
    """The first of ``wallet-1``, ``wallet-2``, ... with no keystore in ``wallets_dir``."""
    n = 1
    while (Path(wallets_dir) / f"wallet-{n}.json").exists():
        n += 1
    return f"wallet-{n}"


def check_new_wallet(wallets_dir: str | os.PathLike[str], name: str, address: str | None = None) -> Path:
    """Check that wallet ``name`` (holding ``address``, if known) can be added to ``wallets_dir``:
    a valid name, no keystore of that name, and no wallet there with the same address.

    Returns:
        The keystore path the wallet would get.

    Raises:
        WalletError: naming the existing wallet, or for an invalid name.
    """
    path = wallet_path(wallets_dir, name)
    if path.exists():
        raise WalletError(f"a wallet named {name!r} already exists ({path})")
    info = None if address is None else _wallet_with_address(wallets_dir, address)
    if info is not None:
        raise WalletError(f"address {info.address} is already in wallet {info.name!r} ({info.path})")
    return path


def parse_private_key(text: Any) -> LocalAccount:
    """The account of a private key written as 64 hex digits, with or without ``0x``.

    Raises:
        WalletError: for anything else, or a key outside [1, secp256k1 n - 1]; the message never
            contains the text given.
    """
    if not isinstance(text, str) or not _PRIVATE_KEY.match(text.strip()):
        raise WalletError("not a private key: expected 64 hex digits (32 bytes), with or without 0x")
    key = bytes.fromhex(text.strip().removeprefix("0x"))
    try:
        return Account.from_key(key)
    except Exception:  # eth-keys: zero or not below the curve order
        raise WalletError("not a valid secp256k1 private key (zero, or not below the curve order)") from None


def _add(
    wallets_dir: str | os.PathLike[str], name: str, account: LocalAccount, password: str, scrypt_n: int
) -> WalletInfo:
    path = check_new_wallet(wallets_dir, name, account.address)
    save_keystore(account, path, password, scrypt_n=scrypt_n)
    return keystore_info(path)


def create_wallet(
    wallets_dir: str | os.PathLike[str], name: str, password: str, *, scrypt_n: int = DEFAULT_SCRYPT_N
) -> WalletInfo:
    """Create a wallet with a fresh random key: keystore ``<wallets_dir>/<name>.json`` (scrypt, 0600).

    Args:
        scrypt_n: scrypt work factor N, a power of two in [2**10, 2**20].

    Raises:
        WalletError: for an invalid or taken name, an empty password, a bad ``scrypt_n``, or a
            file that cannot be written.
    """
    check_new_wallet(wallets_dir, name)  # before generating a key, so a bad name costs nothing
    return _add(wallets_dir, name, new_account(), password, scrypt_n)


def import_private_key(
    wallets_dir: str | os.PathLike[str], name: str, private_key: str, password: str, *, scrypt_n: int = DEFAULT_SCRYPT_N
) -> WalletInfo:
    """Store ``private_key`` (64 hex digits, optional ``0x``) as wallet ``name``, encrypted with ``password``.

    Args:
        scrypt_n: scrypt work factor N, a power of two in [2**10, 2**20].

    Raises:
        WalletError: for a malformed key (the message never contains it), an invalid or taken
            name, an address already in ``wallets_dir``, an empty password, or a write failure.
    """
    return _add(wallets_dir, name, parse_private_key(private_key), password, scrypt_n)


def import_keystore(
    wallets_dir: str | os.PathLike[str],
    name: str,
    source: str | os.PathLike[str],
    password: str,
    *,
    scrypt_n: int = DEFAULT_SCRYPT_N,
) -> WalletInfo:
    """Import the JSON v3 keystore at ``source`` (scrypt or pbkdf2, e.g. from geth) as wallet ``name``.

    The source is decrypted with ``password`` (so a wrong password or a corrupt file is found
    before anything is written), then re-encrypted with the same password under scrypt at
    ``scrypt_n`` into ``<wallets_dir>/<name>.json``: every wallet of a directory has the same
    KDF and file mode. ``source`` itself is not changed.

    Raises:
        WalletError: for a missing, corrupt or non-keystore source, a wrong password, an invalid
            or taken name, an address already in ``wallets_dir``, or a write failure.
    """
    check_new_wallet(wallets_dir, name, keystore_address(source))  # before the costly decryption
    return _add(wallets_dir, name, load_keystore(source, password), password, scrypt_n)
