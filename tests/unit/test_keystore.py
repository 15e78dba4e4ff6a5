"""Wallet keystores: encrypted JSON v3 files and dev wallets (gpucoin.wallet.keystore)."""

from __future__ import annotations

import json
import stat

import pytest
from eth_account import Account

from gpucoin.exceptions import WalletError
from gpucoin.wallet import (
    DEV_PASSWORD,
    DEV_SCRYPT_N,
    dev_account,
    keystore_address,
    load_keystore,
    new_account,
    save_keystore,
)

FAST_N = 2**14


def test_new_accounts_are_distinct():
    a, b = new_account(), new_account()
    assert a.address != b.address and a.key != b.key


def test_save_then_load_round_trip(tmp_path):
    account = new_account()
    path = save_keystore(account, tmp_path / "w" / "me.json", "correct horse", scrypt_n=FAST_N)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert account.key.hex() not in text.lower()  # only the ciphertext is on disk
    keyfile = json.loads(text)
    assert keyfile["version"] == 3
    assert keyfile["crypto"]["kdf"] == "scrypt" and keyfile["crypto"]["kdfparams"]["n"] == FAST_N
    loaded = load_keystore(path, "correct horse")
    assert loaded.address == account.address and loaded.key == account.key
    # A standard keystore: eth-account (and so geth, web3.py) reads it too.
    assert Account.decrypt(keyfile, "correct horse") == account.key
    assert keystore_address(path) == account.address
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_default_work_factor_is_geths(tmp_path):
    path = save_keystore(new_account(), tmp_path / "k.json", "pw")
    assert json.loads(path.read_text())["crypto"]["kdfparams"]["n"] == 2**18


def test_refuses_to_overwrite(tmp_path):
    path = save_keystore(new_account(), tmp_path / "k.json", "pw", scrypt_n=FAST_N)
    before = path.read_bytes()
    with pytest.raises(WalletError, match="overwrite"):
        save_keystore(new_account(), path, "pw", scrypt_n=FAST_N)
    assert path.read_bytes() == before


def test_wrong_password_is_a_one_line_wallet_error(tmp_path):
    path = save_keystore(new_account(), tmp_path / "k.json", "right", scrypt_n=FAST_N)
    with pytest.raises(WalletError, match="wrong password") as info:
        load_keystore(path, "wrong")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda text: "{not json",
        lambda text: text[: len(text) // 2],
        lambda text: json.dumps(dict(json.loads(text), version=4)),
        lambda text: json.dumps(dict(json.loads(text), address="00" * 20)),
        lambda text: text.replace('"ciphertext": "', '"ciphertext": "00'),
    ],
)
def test_corrupt_keystore_is_a_wallet_error(tmp_path, corrupt):
    path = save_keystore(new_account(), tmp_path / "k.json", "pw", scrypt_n=FAST_N)
    path.write_text(corrupt(path.read_text()))
    with pytest.raises(WalletError) as info:
        load_keystore(path, "pw")
    assert "\n" not in str(info.value)


def test_excessive_kdf_work_is_refused_before_running(tmp_path):
    path = save_keystore(new_account(), tmp_path / "k.json", "pw", scrypt_n=FAST_N)
    keyfile = json.loads(path.read_text())
    keyfile["crypto"]["kdfparams"]["n"] = 2**30
    path.write_text(json.dumps(keyfile))
    with pytest.raises(WalletError, match="work factor"):
        load_keystore(path, "pw")


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(WalletError, match="no keystore"):
        load_keystore(tmp_path / "absent.json", "pw")
    with pytest.raises(WalletError, match="password"):
        save_keystore(new_account(), tmp_path / "k.json", "")
    with pytest.raises(WalletError, match="scrypt_n"):
        save_keystore(new_account(), tmp_path / "k.json", "pw", scrypt_n=1000)
    assert not (tmp_path / "k.json").exists()


def test_dev_account_is_created_once_then_loaded(tmp_path):
    first = dev_account("alice", tmp_path / "wallets")
    path = tmp_path / "wallets" / "alice.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["crypto"]["kdfparams"]["n"] == DEV_SCRYPT_N
    assert dev_account("alice", tmp_path / "wallets").address == first.address
    assert load_keystore(path, DEV_PASSWORD).address == first.address
    assert dev_account("bob", tmp_path / "wallets").address != first.address


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x" * 65])
def test_dev_account_refuses_unsafe_names(tmp_path, name):
    with pytest.raises(WalletError, match="dev wallet name"):
        dev_account(name, tmp_path)
    assert list(tmp_path.iterdir()) == []
