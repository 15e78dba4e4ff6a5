"""``gpucoin wallet new / list / show / import / balance`` against real keystores and a real SQLite ledger.

No Ray. The commands run through click's test runner in this process (one also as a subprocess);
keystores use a light scrypt work factor through the hidden ``--scrypt-n`` option so the file stays
fast. Every invocation checks that no private key and no password appears in its output, errors
included.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from eth_account import Account

from gpucoin.cli.main import cli
from gpucoin.exceptions import WalletError
from gpucoin.ledger import Ledger
from gpucoin.wallet.keystore import (
    check_new_wallet,
    find_wallet,
    import_keystore,
    import_private_key,
    list_wallets,
    load_keystore,
    parse_private_key,
    save_keystore,
)
from tests.ledger.helpers import GPC, Market, open_market

REPO = Path(__file__).resolve().parents[2]
FAST_N = "1024"
PASSWORD = "correct-horse-7913"
KEY = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
KEY_ADDRESS = Account.from_key(KEY).address
CLEAN_ENV = {
    "COLUMNS": "200",
    "GPUCOIN_PASSWORD": None,
    "GPUCOIN_PRIVATE_KEY": None,
    "GPUCOIN_WALLETS_DIR": None,
    "GPUCOIN_LEDGER_URL": None,
}


class WalletCli:
    """Runs ``gpucoin wallet ...`` with ``--home`` set; asserts no registered secret is ever printed."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.wallets = home / "wallets"
        self.secrets: set[str] = {KEY, PASSWORD}

    def secret(self, value: str | bytes) -> None:
        self.secrets.add(value.hex() if isinstance(value, bytes) else value)

    def __call__(self, *args: str, input: str | None = None, **env: str | None) -> Result:
        r = CliRunner().invoke(
            cli, ["wallet", *args, "--home", str(self.home)], input=input, env=CLEAN_ENV | env, catch_exceptions=False
        )
        self.check_no_secret(r.output, r.stdout, r.stderr)
        assert "Traceback" not in r.output
        return r

    def check_no_secret(self, *texts: str) -> None:
        for text in texts:
            flat = text.lower()
            for s in self.secrets:
                bare = s.lower().removeprefix("0x")
                assert bare not in flat, f"a secret appears in the output: {text!r}"

    def fail(self, *args: str, code: int = 1, input: str | None = None, **env: str | None) -> str:
        """Run a command that must fail: the exit code and the one-line error it printed."""
        r = self(*args, input=input, **env)
        assert r.exit_code == code, r.output
        errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, r.output
        return errors[0]


@pytest.fixture
def run(tmp_path: Path) -> WalletCli:
    return WalletCli(tmp_path / "home")


def created_address(r: Result) -> str:
    m = re.search(r"(?:created|imported) wallet \S+ (0x[0-9a-fA-F]{40})", r.stdout)
    assert m, r.output
    return m.group(1)


def kdf_of(path: Path) -> tuple[str, int]:
    crypto = json.loads(path.read_text())["crypto"]
    return crypto["kdf"], crypto["kdfparams"].get("n", crypto["kdfparams"].get("c"))


# -- new, list, show -----------------------------------------------------------------------


def test_new_list_show(run: WalletCli) -> None:
    r = run("new", "--name", "alice", "--scrypt-n", FAST_N, input=f"{PASSWORD}\n{PASSWORD}\n")
    assert r.exit_code == 0, r.output
    assert "Password for the new wallet alice" in r.output and "Repeat the password" in r.output
    address = created_address(r)
    path = run.wallets / "alice.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert kdf_of(path) == ("scrypt", 1024)
    account = load_keystore(path, PASSWORD)  # the password typed at the prompt unlocks it
    assert account.address == address
    run.secret(account.key)

    r = run("new", "--scrypt-n", FAST_N, GPUCOIN_PASSWORD=PASSWORD)  # no --name: the first free wallet-N
    assert r.exit_code == 0 and "Password" not in r.output, r.output
    second = created_address(r)
    assert load_keystore(run.wallets / "wallet-1.json", PASSWORD).address == second != address
    run.secret(load_keystore(run.wallets / "wallet-1.json", PASSWORD).key)

    r = run("list")
    assert r.exit_code == 0, r.output
    rows = [line for line in r.stdout.splitlines() if "0x" in line]
    assert len(rows) == 2
    assert "alice" in rows[0] and address in rows[0] and str(path) in rows[0]
    assert "wallet-1" in rows[1] and second in rows[1] and str(run.wallets / "wallet-1.json") in rows[1]

    for ref in ("alice", address, address.lower()):
        r = run("show", ref)
        assert r.exit_code == 0, r.output
        assert r.stdout.splitlines() == [
            "name      alice",
            f"address   {address}",
            f"keystore  {path}",
            "kdf       scrypt (n=1024)",
        ]
    assert "2 wallets" in run.fail("show", code=2) and "alice, wallet-1" in run.fail("show", code=2)


def test_wallets_dir_option_and_env(run: WalletCli, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    r = run("new", "--name", "a", "--wallets-dir", str(elsewhere), "--scrypt-n", FAST_N, GPUCOIN_PASSWORD=PASSWORD)
    assert r.exit_code == 0, r.output
    assert (elsewhere / "a.json").exists() and not run.wallets.exists()
    r = run("show", GPUCOIN_WALLETS_DIR=str(elsewhere))  # the only wallet there
    assert r.exit_code == 0 and f"keystore  {elsewhere / 'a.json'}" in r.stdout, r.output
    assert "no wallets in" in run("list").stdout


def test_password_confirmation_is_asked_again_on_mismatch(run: WalletCli) -> None:
    r = run(
        "new", "--name", "bob", "--scrypt-n", FAST_N, input=f"{PASSWORD}\nother-password-1\n{PASSWORD}\n{PASSWORD}\n"
    )
    assert r.exit_code == 0, r.output
    assert "do not match" in r.output
    load_keystore(run.wallets / "bob.json", PASSWORD)


def test_dev_wallets_are_labelled(run: WalletCli) -> None:
    from gpucoin.wallet.keystore import dev_account

    run.secret(dev_account("engineer", run.wallets).key)
    r = run("show", "engineer")
    assert r.exit_code == 0 and "dev wallet" in r.stdout and "kdf       scrypt (n=16384)" in r.stdout, r.output


# -- import ----------------------------------------------------------------------------------


def test_import_private_key_from_prompt_then_env(run: WalletCli, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    r = run("import", "--name", "k", "--scrypt-n", FAST_N, input=f"{KEY}\n{PASSWORD}\n{PASSWORD}\n")
    assert r.exit_code == 0, r.output
    assert "Private key" in r.output and created_address(r) == KEY_ADDRESS
    assert load_keystore(run.wallets / "k.json", PASSWORD).key.hex().removeprefix("0x") == KEY[2:]
    assert kdf_of(run.wallets / "k.json") == ("scrypt", 1024)

    # The same key again, from the environment, without 0x and in upper case: refused, nothing written.
    error = run.fail(
        "import", "--name", "k2", "--scrypt-n", FAST_N, GPUCOIN_PRIVATE_KEY=KEY[2:].upper(), GPUCOIN_PASSWORD=PASSWORD
    )
    assert f"address {KEY_ADDRESS} is already in wallet 'k'" in error
    assert not (run.wallets / "k2.json").exists()

    other = Account.create()
    run.secret(other.key)
    r = run(
        "import", "--name", "k2", "--scrypt-n", FAST_N, GPUCOIN_PRIVATE_KEY=other.key.hex(), GPUCOIN_PASSWORD=PASSWORD
    )
    assert r.exit_code == 0 and created_address(r) == other.address, r.output
    run.check_no_secret(caplog.text)


@pytest.mark.parametrize(
    "bad_key",
    [KEY + "00", KEY[:-2], "0x" + "00" * 32, "0x" + "ff" * 32, KEY[:-1] + "g", KEY + " " + KEY],
    ids=["long", "short", "zero", "above-n", "not-hex", "two-keys"],
)
def test_malformed_private_key_is_refused_without_echoing_it(run: WalletCli, bad_key: str) -> None:
    run.secret(bad_key)
    run.secret(bad_key.removeprefix("0x")[:40])  # not even a part of it
    error = run.fail("import", "--name", "k", "--scrypt-n", FAST_N, input=f"{bad_key}\n")
    assert "private key" in error
    assert "Password" not in run("import", "--name", "k", input=f"{bad_key}\n").output  # refused before the password
    assert list_wallets(run.wallets) == []


def test_import_keystore(run: WalletCli, tmp_path: Path) -> None:
    # A geth-style keystore: pbkdf2, as geth, web3.py and ethers.js also write them.
    account = Account.create()
    run.secret(account.key)
    source = tmp_path / "UTC--2026-11-29--geth.json"
    source.write_text(json.dumps(Account.encrypt(account.key, PASSWORD, kdf="pbkdf2", iterations=1000)))
    before = source.read_bytes()

    error = run.fail("import", "--keystore", str(source), "--name", "g", "--scrypt-n", FAST_N, input="wrong-password\n")
    assert "wrong password" in error and not (run.wallets / "g.json").exists()

    r = run("import", "--keystore", str(source), "--name", "g", "--scrypt-n", FAST_N, input=f"{PASSWORD}\n")
    assert r.exit_code == 0, r.output
    assert f"Password of {source}" in r.output and "Repeat" not in r.output
    assert created_address(r) == account.address and source.read_bytes() == before
    copy = run.wallets / "g.json"
    assert kdf_of(copy) == ("scrypt", 1024)  # re-encrypted under scrypt, with the same password
    assert load_keystore(copy, PASSWORD).key == account.key

    error = run.fail("import", "--keystore", str(source), "--name", "g2", "--scrypt-n", FAST_N, input=f"{PASSWORD}\n")
    assert "already in wallet 'g'" in error
    error = run.fail(
        "import", "--keystore", str(source), "--name", "g2", code=2, GPUCOIN_PRIVATE_KEY=KEY, GPUCOIN_PASSWORD=PASSWORD
    )
    assert "both --keystore and GPUCOIN_PRIVATE_KEY" in error
    assert [i.name for i in list_wallets(run.wallets)] == ["g"]


@pytest.mark.parametrize(
    "content, reason",
    [
        ("{not json", "not JSON"),
        ('{"hello": "world"}', "not an encrypted JSON v3 keystore"),
        ('{"version": 3, "address": "00", "crypto": {}}', "no kdfparams"),
        (None, "no keystore at"),
    ],
    ids=["not-json", "not-keystore", "no-kdf", "missing"],
)
def test_corrupt_or_missing_keystore_to_import(
    run: WalletCli, tmp_path: Path, content: str | None, reason: str
) -> None:
    source = tmp_path / "in.json"
    if content is not None:
        source.write_text(content)
    error = run.fail("import", "--keystore", str(source), "--name", "x", GPUCOIN_PASSWORD=PASSWORD)
    assert reason in error
    assert list_wallets(run.wallets) == []


def test_corrupt_keystore_with_a_valid_header(run: WalletCli, tmp_path: Path) -> None:
    """Header and address fine, ciphertext damaged: found on decryption, a one-line error."""
    account = Account.create()
    run.secret(account.key)
    source = save_keystore(account, tmp_path / "in.json", PASSWORD, scrypt_n=1024)
    keyfile = json.loads(source.read_text())
    keyfile["crypto"]["ciphertext"] = "00" + keyfile["crypto"]["ciphertext"]
    source.write_text(json.dumps(keyfile))
    error = run.fail("import", "--keystore", str(source), "--name", "x", GPUCOIN_PASSWORD=PASSWORD)
    assert str(source) in error
    assert list_wallets(run.wallets) == []


def test_corrupt_file_in_the_wallets_dir(run: WalletCli) -> None:
    assert run("new", "--name", "good", "--scrypt-n", FAST_N, GPUCOIN_PASSWORD=PASSWORD).exit_code == 0
    run.secret(load_keystore(run.wallets / "good.json", PASSWORD).key)
    (run.wallets / "broken.json").write_text("{not json")
    r = run("list")
    assert r.exit_code == 0, r.output
    assert re.search(r"broken .*unreadable", r.stdout) and "good" in r.stdout
    assert "broken.json is corrupt: not JSON" in r.stdout
    assert "corrupt: not JSON" in run.fail("show", "broken")
    assert r.stdout.count("0x") == 1


# -- names -------------------------------------------------------------------------------------


def test_duplicate_and_invalid_names(run: WalletCli) -> None:
    assert run("new", "--name", "alice", "--scrypt-n", FAST_N, GPUCOIN_PASSWORD=PASSWORD).exit_code == 0
    path = run.wallets / "alice.json"
    run.secret(load_keystore(path, PASSWORD).key)
    before = path.read_bytes()

    r = run("new", "--name", "alice", "--scrypt-n", FAST_N, input=f"{PASSWORD}\n{PASSWORD}\n")
    assert r.exit_code == 1 and "Password" not in r.output, r.output  # refused before any prompt
    assert "a wallet named 'alice' already exists" in r.stderr
    assert path.read_bytes() == before
    assert "already exists" in run.fail("import", "--name", "alice", GPUCOIN_PRIVATE_KEY=KEY, GPUCOIN_PASSWORD=PASSWORD)

    for bad in ("../escape", "a/b", ".hidden", "-x", "x" * 65, "has space", KEY_ADDRESS):
        assert "not a valid wallet name" in run.fail("new", "--name", bad, GPUCOIN_PASSWORD=PASSWORD), bad
    assert sorted(p.name for p in run.wallets.iterdir()) == ["alice.json"]
    assert not (run.home / "escape.json").exists()

    assert "no wallet named 'bob'" in run.fail("show", "bob")
    assert "no wallet with address" in run.fail("show", KEY_ADDRESS)
    assert "no wallet named 'bob'" in run.fail("balance", "bob")


def test_empty_password_from_env_is_refused(run: WalletCli) -> None:
    assert "GPUCOIN_PASSWORD is set but empty" in run.fail("new", "--name", "a", code=2, GPUCOIN_PASSWORD="")
    assert not run.wallets.exists() or list_wallets(run.wallets) == []


# -- balance -----------------------------------------------------------------------------------


def balance_rows(text: str) -> dict[str, tuple[str, int]]:
    """{kind: (GPC text, µGPC)} from one wallet's balance table."""
    rows = {}
    for kind, gpc, micro in re.findall(r"(available|bonded|unbonding|total)\s*│\s*([\d.]+)\s*│\s*(\d+)", text):
        rows[kind] = (gpc, int(micro))
    return rows


def test_balance_reads_the_ledger(run: WalletCli) -> None:
    assert "no wallets in" in run.fail("balance")
    assert run("new", "--name", "alice", "--scrypt-n", FAST_N, GPUCOIN_PASSWORD=PASSWORD).exit_code == 0
    assert (
        run("import", "--name", "k", "--scrypt-n", FAST_N, GPUCOIN_PRIVATE_KEY=KEY, GPUCOIN_PASSWORD=PASSWORD).exit_code
        == 0
    )
    alice = load_keystore(run.wallets / "alice.json", PASSWORD)
    run.secret(alice.key)
    assert "no ledger at" in run.fail("balance", "alice")

    # A real SQLite ledger at the default place under --home: a faucet grant, a bond, an unbond.
    with open_market(f"sqlite:///{run.home / 'ledger.db'}") as lg:
        m = Market(lg)
        m.fund(alice, 1000 * GPC + 5)
        m.register(alice, 500 * GPC)
        m.unbond(alice, 100 * GPC)

    expected_alice = {
        "available": ("500.000005", 500_000_005),
        "bonded": ("400.000000", 400_000_000),
        "unbonding": ("100.000000", 100_000_000),
        "total": ("1000.000005", 1_000_000_005),
    }
    zero = {k: ("0.000000", 0) for k in ("available", "bonded", "unbonding", "total")}
    for ref in ("alice", alice.address, alice.address.lower()):
        r = run("balance", ref)
        assert r.exit_code == 0, r.output
        assert f"alice {alice.address}" in r.stdout
        assert balance_rows(r.stdout) == expected_alice

    r = run("balance")  # every wallet, in name order
    assert r.exit_code == 0, r.output
    first, second = r.stdout.split(f"k {KEY_ADDRESS}")
    assert f"alice {alice.address}" in first
    assert balance_rows(first) == expected_alice and balance_rows(second) == zero

    stranger = Account.create().address  # any address, a wallet here or not
    r = run("balance", stranger)
    assert r.exit_code == 0 and "no wallet in" in r.stdout and balance_rows(r.stdout) == zero, r.output

    # --ledger-url (and its env var) point elsewhere: an empty ledger there.
    other = run.home.parent / "other.db"
    Ledger(f"sqlite:///{other}").close()
    assert balance_rows(run("balance", "alice", "--ledger-url", f"sqlite:///{other}").stdout) == zero
    assert balance_rows(run("balance", "alice", GPUCOIN_LEDGER_URL=f"sqlite:///{other}").stdout) == zero
    assert "no ledger at" in run.fail("balance", "alice", "--ledger-url", f"sqlite:///{run.home / 'absent.db'}")


# -- a real process, and the library under the commands ---------------------------------------


def test_subprocess_import_and_help(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "GPUCOIN_PRIVATE_KEY": KEY, "GPUCOIN_PASSWORD": PASSWORD}
    cmd = [sys.executable, "-m", "gpucoin", "wallet", "import", "--home", str(tmp_path / "h"), "--scrypt-n", FAST_N]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    p2 = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)  # the same key again
    assert p2.returncode == 1 and p2.stderr.startswith("error: ") and len(p2.stderr.splitlines()) == 1, p2.stderr
    for text in (p.stdout, p.stderr, p2.stdout, p2.stderr):
        assert KEY[2:] not in text.lower() and PASSWORD not in text
    h = subprocess.run(
        [sys.executable, "-m", "gpucoin", "wallet", "import", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert h.returncode == 0 and "GPUCOIN_PRIVATE_KEY" in h.stdout and "shell history" in h.stdout
    assert "GPUCOIN_PASSWORD" in h.stdout and "--scrypt-n" not in h.stdout


def test_library_errors_never_contain_the_key(tmp_path: Path) -> None:
    for bad in (KEY + "00", "0x" + "00" * 32):
        with pytest.raises(WalletError) as info:
            parse_private_key(bad)
        assert bad[2:10] not in str(info.value)
    info = import_private_key(tmp_path, "k", KEY, PASSWORD, scrypt_n=1024)
    assert info.address == KEY_ADDRESS and find_wallet(tmp_path, KEY_ADDRESS.lower()) == info
    with pytest.raises(WalletError, match="already in wallet 'k'"):
        check_new_wallet(tmp_path, "k2", KEY_ADDRESS)
    with pytest.raises(WalletError, match="already in wallet 'k'"):
        import_keystore(tmp_path, "k3", info.path, PASSWORD, scrypt_n=1024)
