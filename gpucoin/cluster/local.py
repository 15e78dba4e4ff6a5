"""The embedded local mode's participants: dev wallets, the dev faucet, volunteer registration.

Dev wallets and the faucet exist only here (SPEC.md, Trust and security): keystores under
``<home>/wallets`` with a fixed dev password, funded by the coordinator's dev faucet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from gpucoin.coordinator.settle import Coordinator
from gpucoin.ledger.accounts import wallet_account
from gpucoin.wallet.keystore import dev_account
from gpucoin.wallet.messages import SignedMessage, sign

ENGINEER_FAUCET_UGPC = 1_000_000_000
"""What the dev faucet gives the engineer's dev wallet, once: 1,000 GPC."""

REGISTRATION_TTL_S = 600


@dataclass
class Participant:
    """A dev wallet of the local mode: its name, key and keystore file."""

    name: str
    account: object
    keystore: Path

    @property
    def address(self) -> str:
        """Checksum address."""
        return self.account.address


def participant(name: str, home: Path) -> Participant:
    """Create or load the dev wallet ``name`` under ``<home>/wallets``."""
    wallets = home / "wallets"
    acct = dev_account(name, wallets)
    return Participant(name, acct, wallets / f"{name}.json")


def engineer_available_after_faucet(coord: Coordinator, engineer: Participant) -> int:
    """µGPC the engineer will have available once the one-time faucet has run (no ledger write)."""
    have = coord.ledger.balance(wallet_account(engineer.address))
    funded = coord.ledger.operation(f"faucet:{engineer.address}") is not None
    return have if funded else have + ENGINEER_FAUCET_UGPC


def fund_engineer(coord: Coordinator, engineer: Participant) -> None:
    """The one-time dev faucet grant to the engineer's wallet (idempotent by operation id)."""
    coord.faucet(engineer.address, ENGINEER_FAUCET_UGPC, f"faucet:{engineer.address}")


def register_volunteer(
    coord: Coordinator, vol: Participant, node_id: str, ask_ugpc: int, stake_ugpc: int
) -> SignedMessage:
    """Fund (faucet) a dev volunteer up to its stake, sign its NodeRegistration and bond the stake.

    A volunteer that already has ``stake_ugpc`` bonded from an earlier run bonds nothing more; its
    registration for this run's Ray node is still signed and recorded.
    """
    bonded = coord.ledger.balance(wallet_account(vol.address, "bonded"))
    stake = max(0, stake_ugpc - bonded)
    reg = sign(
        vol.account,
        "NodeRegistration",
        coord.domain,
        {
            "provider": vol.address,
            "nodeId": node_id,
            "resources": '{"CPU": 1}',
            "askPerWorkerHour": ask_ugpc,
            "stake": stake,
            "nonce": coord.nonces.next(),
            "deadline": int(time.time()) + REGISTRATION_TTL_S,
        },
    )
    if stake:
        # the dev faucet tops the volunteer up to its stake, once per registration
        coord.faucet(vol.address, stake, f"faucet:{reg.digest}")
        coord.bond(reg)
    else:
        coord.record(reg)
    return reg
