"""A hostile keystore cannot make `wallet import` or any load exhaust memory or time.

scrypt needs 128·r·N bytes and time in N·r·p; every one of the three comes from the file. Each
case below would take minutes or tens of GiB if the KDF ran, so the test finishing shows the
file was refused before it did.
"""

from __future__ import annotations

import json

import pytest

from gpucoin.exceptions import WalletError
from gpucoin.wallet.keystore import import_keystore, keystore_address, load_keystore, new_account, save_keystore

FAST_N = 2**10


@pytest.mark.parametrize(
    "params",
    [
        {"r": 2**24},
        {"p": 2**24},
        {"r": 8, "p": 2**12},
        {"r": 0},
        {"p": -1},
        {"r": "8"},
        {"r": True},
        {"dklen": 2**31},
        {"n": 3 * 2**10},
    ],
    ids=repr,
)
def test_excessive_or_malformed_scrypt_parameters_are_refused_before_the_kdf(tmp_path, params) -> None:
    path = save_keystore(new_account(), tmp_path / "hostile.json", "pw", scrypt_n=FAST_N)
    keyfile = json.loads(path.read_text())
    keyfile["crypto"]["kdfparams"].update(params)
    path.write_text(json.dumps(keyfile))
    for load in (lambda: load_keystore(path, "pw"), lambda: import_keystore(tmp_path / "w", "x", path, "pw")):
        with pytest.raises(WalletError, match="scrypt") as info:
            load()
        assert "\n" not in str(info.value)
    with pytest.raises(WalletError, match="scrypt"):
        keystore_address(path)


def test_geths_light_and_standard_parameters_still_load(tmp_path) -> None:
    acct = new_account()
    path = save_keystore(acct, tmp_path / "ok.json", "pw", scrypt_n=FAST_N)
    keyfile = json.loads(path.read_text())
    assert keyfile["crypto"]["kdfparams"]["r"] == 8 and keyfile["crypto"]["kdfparams"]["p"] == 1
    assert load_keystore(path, "pw").address == acct.address
