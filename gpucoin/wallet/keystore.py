"""Wallet keystores: eth-account encrypted JSON v3 files (scrypt KDF, AES-128-CTR), mode 0600.

A wallet is one secp256k1 key held as an eth-account ``LocalAccount``. On disk it is only ever the
encrypted keystore; no private key is printed, logged or stored elsewhere (SPEC.md, Trust and
security). Keystores are readable by geth, web3.py and ethers.js.

Dev wallets (``dev_account``) exist only for the embedded local mode (``gpucoin train`` without
``--address``): they are encrypted with a fixed, public dev password and light scrypt parameters so
a demo and the tests start fast. They protect nothing and must never hold value on a real cluster.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
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
]

DEFAULT_SCRYPT_N = 2**18
"""scrypt work factor of user keystores (geth's and eth-account's default; ~1 s, 256 MiB)."""

DEV_SCRYPT_N = 2**14
"""scrypt work factor of dev wallets (~30 ms): fast, and weak on purpose (see module docstring)."""

DEV_PASSWORD = "gpucoin-dev-wallet-insecure"
"""Fixed password of dev wallets; public, so a dev wallet is not a secret."""

_MAX_SCRYPT_N = 2**20
_MAX_PBKDF2_C = 10**7
_MAX_KEYSTORE_BYTES = 64 * 1024
_DEV_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
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
    if not isinstance(work, int) or isinstance(work, bool) or not 1 <= work <= limit:
        raise WalletError(f"keystore {path} is corrupt: unsupported kdf {kdf!r} or work factor {work!r}")
    return keyfile


def keystore_address(path: str | os.PathLike[str]) -> str:
    """Checksum address a keystore names, without decrypting it (for ``gpucoin wallet show``).

    Raises:
        WalletError: missing, unreadable or corrupt file, or no valid address in it.
    """
    path = Path(path)
    address = _read_keyfile(path).get("address")
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
    if not isinstance(name, str) or not _DEV_NAME.match(name):
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
