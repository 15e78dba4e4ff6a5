"""A network from a Genesis file (``gpucoin up --genesis FILE``): what the file may say, the
Genesis a new ledger gets from it (allocations minted, no faucet, the admin it names), and a
ledger that already has one keeping it. The ledger's own Genesis rule refuses what the file's
schema lets through (an allocation above the hard cap), in its words."""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_account import Account

from gpucoin.exceptions import HeadError, UnknownParty
from gpucoin.head.genesis import ensure_genesis, load_genesis_file
from gpucoin.ledger import Ledger
from gpucoin.ledger.accounts import wallet_account
from gpucoin.policy.model import SHIPPED_POLICIES_DIR, load_policy, policy_hash
from gpucoin.wallet.messages import sign

COORD = Account.from_key("0x" + "c0" * 32)
ALICE = Account.from_key("0x" + "a1" * 32).address
BOB = Account.from_key("0x" + "b0" * 32).address
ADMIN = Account.from_key("0x" + "ad" * 32).address


def _file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "genesis.toml"
    p.write_text(text)
    return p


GOOD = f'''
policy = "local"
admin = "{ADMIN}"

[[allocations]]
address = "{ALICE}"
amount = "250000.5"

[[allocations]]
address = "{BOB.lower()}"
amount = 1000
'''


def test_a_genesis_file_gives_a_new_ledger_its_allocations_and_no_faucet(tmp_path, ledger_url) -> None:
    genesis, policy = load_genesis_file(_file(tmp_path, GOOD))
    assert policy.name == "local"
    assert [(a.address, a.amount_ugpc) for a in genesis.allocations] == [(ALICE, 250_000_500_000), (BOB, 1_000_000_000)]

    domain = ensure_genesis(ledger_url, COORD, dev=False, policy=policy, genesis=genesis)
    assert domain.verifying_contract == COORD.address and domain.chain_id == policy.chain_id
    with Ledger(ledger_url, domain=domain) as ledger:
        held = ledger.genesis
        assert held is not None and not held.dev and held.admin == ADMIN and held.coordinator == COORD.address
        assert held.policy_hash == policy_hash(policy)
        assert ledger.balance(wallet_account(ALICE)) == 250_000_500_000
        assert ledger.balance(wallet_account(BOB)) == 1_000_000_000
        assert ledger.totals()["supply"] == 251_000_500_000
        faucet = sign(COORD, "Faucet", domain, {"recipient": ALICE, "amount": 1, "nonce": 1})
        with pytest.raises(UnknownParty, match="not dev"):
            ledger.record_message(faucet)
        assert ledger.audit() == []

    # started again: the same file, or none, keeps it; another file or another key is refused
    again, _ = load_genesis_file(_file(tmp_path, GOOD))
    assert ensure_genesis(ledger_url, COORD, dev=False, policy=policy, genesis=again) == domain
    assert ensure_genesis(ledger_url, COORD, dev=False, policy=None) == domain
    other, other_policy = load_genesis_file(_file(tmp_path, GOOD.replace("250000.5", "250000.6")))
    with pytest.raises(HeadError, match="another Genesis .*allocations differ"):
        ensure_genesis(ledger_url, COORD, dev=False, policy=other_policy, genesis=other)
    with pytest.raises(HeadError, match="market of coordinator"):
        ensure_genesis(ledger_url, Account.create(), dev=False, policy=None)
    with Ledger(ledger_url, domain=domain) as ledger:
        assert len(ledger.messages("Genesis")) == 1


def test_a_ledger_without_genesis_needs_one(tmp_path, ledger_url) -> None:
    with pytest.raises(HeadError, match="has no Genesis: start a network with --genesis"):
        ensure_genesis(ledger_url, COORD, dev=False, policy=None)


def test_the_ledger_rule_refuses_allocations_above_the_hard_cap(tmp_path, ledger_url) -> None:
    cap = load_policy(SHIPPED_POLICIES_DIR / "default.toml").tokenomics.hard_cap_ugpc
    text = f'[[allocations]]\naddress = "{ALICE}"\namount = "{cap // 10**6 + 1}"\n'
    genesis, policy = load_genesis_file(_file(tmp_path, text))
    assert policy.name == "default"  # the default policy when the file names none
    with pytest.raises(HeadError, match="refused the Genesis: .*above the policy's hard cap"):
        ensure_genesis(ledger_url, COORD, dev=False, policy=policy, genesis=genesis)
    with Ledger(ledger_url) as ledger:
        assert ledger.genesis is None and ledger.totals()["supply"] == 0


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("polcy = 'default'\n", "polcy: Extra inputs are not permitted"),
        ("[[allocations]]\naddress = '0x12'\namount = '1'\n", "allocations.0.address: address must be"),
        (
            f"[[allocations]]\naddress = '{ALICE[:2] + ALICE[2:].swapcase()}'\namount = '1'\n",
            "wrong EIP-55 checksum",
        ),
        (f"[[allocations]]\naddress = '{ALICE}'\namount = 1.5\n", 'as decimal text, e.g. "1.5"'),
        (f"[[allocations]]\naddress = '{ALICE}'\namount = '-1'\n", "no sign"),
        (f"[[allocations]]\naddress = '{ALICE}'\n", "allocations.0.amount: Field required"),
        ("policy = 'nosuch'\n", "policy: no policy 'nosuch'"),
        ("admin = 'me'\n", "admin: admin must be"),
        ("policy = [\n", "not valid TOML"),
    ],
)
def test_a_bad_genesis_file_is_one_line_naming_the_field(tmp_path, text: str, says: str) -> None:
    with pytest.raises(HeadError) as e:
        load_genesis_file(_file(tmp_path, text))
    assert says in str(e.value) and "genesis.toml" in str(e.value) and "\n" not in str(e.value)


def test_a_policy_file_is_read_beside_the_genesis_file(tmp_path) -> None:
    (tmp_path / "mine.toml").write_text((SHIPPED_POLICIES_DIR / "local.toml").read_text())
    _, policy = load_genesis_file(_file(tmp_path, "policy = 'mine.toml'\n"))
    assert policy_hash(policy) == policy_hash(load_policy(SHIPPED_POLICIES_DIR / "local.toml"))
    with pytest.raises(HeadError, match="cannot read"):
        load_genesis_file(tmp_path / "missing.toml")
