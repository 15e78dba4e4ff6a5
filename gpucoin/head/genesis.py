"""A network's Genesis: the file an operator writes (``gpucoin up --genesis FILE``) and the one
place a head's ledger gets its Genesis message (SPEC.md, Money: tokens enter a network only
through its Genesis and emission).

The file is TOML with a closed schema::

    policy = "default"            # a shipped policy's name, or a policy TOML file (relative to this file)
    admin = "0x..."               # optional: whose PolicyChange messages count (default: the coordinator)

    [[allocations]]               # minted at genesis, each to one wallet
    address = "0x..."
    amount = "250000"             # GPC, decimal text (at most 6 decimals)

The ledger's admission rule for a Genesis (``ledger.admission.Admission.admit_genesis``: no
recipient twice, no allocation of 0, their sum within the policy's hard cap) decides; this
module parses and signs.
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gpucoin.exceptions import GpucoinError, HeadError
from gpucoin.ledger import Ledger
from gpucoin.money import parse_gpc
from gpucoin.policy.model import Policy, policy_hash, resolve_policy
from gpucoin.wallet.messages import MAX_ARRAY_ITEMS, Domain, parse_address

MAX_ALLOCATIONS = MAX_ARRAY_ITEMS
"""Bound on a Genesis file's allocations: as many as a signed message's array may hold."""


class Allocation(BaseModel):
    """One wallet's tokens at genesis."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field(description="the recipient wallet's address (0x + 40 hex; mixed case must be EIP-55)")
    amount_ugpc: int = Field(alias="amount", description="µGPC minted to it, written in the file as GPC text")

    @field_validator("address", mode="before")
    @classmethod
    def _address(cls, v: object) -> str:
        return parse_address(v, "address")

    @field_validator("amount_ugpc", mode="before")
    @classmethod
    def _amount(cls, v: object) -> int:
        if isinstance(v, float):
            raise ValueError(f'write the amount as decimal text, e.g. "{v}" (a TOML float is not exact)')
        return parse_gpc(v)  # an int is whole GPC, as on the command line


class GenesisFile(BaseModel):
    """What ``gpucoin up --genesis FILE`` starts a network with (module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str = Field(default="default", description="a shipped policy's name or a policy TOML path")
    admin: str | None = Field(default=None, description="address whose PolicyChange messages count")
    allocations: tuple[Allocation, ...] = Field(default=(), max_length=MAX_ALLOCATIONS)

    @field_validator("admin", mode="before")
    @classmethod
    def _admin(cls, v: object) -> str | None:
        return None if v is None else parse_address(v, "admin")


def load_genesis_file(path: str | Path) -> tuple[GenesisFile, Policy]:
    """The Genesis file at ``path`` and the policy it names (a relative policy path is taken
    from the file's directory).

    Raises:
        HeadError: one line naming the file and the problem (unreadable, not TOML, an unknown or
            missing key, a bad address or amount, a policy that does not load).
    """
    p = Path(path).expanduser()
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise HeadError(f"{p}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise HeadError(f"{p}: not UTF-8 text: {e.reason}") from None
    except tomllib.TOMLDecodeError as e:
        raise HeadError(f"{p}: not valid TOML: {' '.join(str(e).split())}") from None
    try:
        spec = GenesisFile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise HeadError(f"{p}: {where}: {err['msg'].removeprefix('Value error, ')}") from None
    except GpucoinError as e:  # an amount or address the validators refused in their own words
        raise HeadError(f"{p}: {e}") from None
    ref = spec.policy
    if ref.endswith(".toml") and not Path(ref).is_absolute():
        ref = str(p.parent / ref)
    try:
        policy = resolve_policy(ref)
    except GpucoinError as e:
        raise HeadError(f"{p}: policy: {e}") from None
    return spec, policy


def ensure_genesis(
    ledger_url: str,
    coordinator,
    *,
    dev: bool,
    policy: Policy | None,
    genesis: GenesisFile | None = None,
    start_s: int | None = None,
) -> Domain:
    """Give the ledger at ``ledger_url`` its Genesis, signed by ``coordinator`` (an eth-account
    ``LocalAccount``), unless it has one; return the market's EIP-712 domain.

    A new ledger gets a dev Genesis (``dev``: ``policy``, no allocations, Faucet admitted) or the
    one ``genesis`` describes with ``policy``. A ledger that has a Genesis keeps it: it must be
    this coordinator's market, and a ``genesis`` given again must be the one it holds.

    Raises:
        HeadError: no Genesis and neither ``dev`` nor ``genesis``; the ledger is another
            coordinator's market, or holds another Genesis than ``genesis``; the ledger's rules
            refused the Genesis (their reason).
        LedgerError: the database cannot be opened.
    """
    from gpucoin.coordinator.settle import genesis_message

    ledger = Ledger(ledger_url)
    try:
        held = ledger.genesis
        if held is not None:
            if held.coordinator != coordinator.address:
                raise HeadError(
                    f"the ledger at {safe_url(ledger_url)} is the market of coordinator {held.coordinator}, "
                    f"not of this head's key {coordinator.address}"
                )
            if genesis is not None and policy is not None:
                _check_same(ledger, held, genesis, policy, ledger_url)
            return Domain(chain_id=held.policy.chain_id, verifying_contract=held.coordinator)
        if genesis is None and not dev:
            raise HeadError(
                f"the ledger at {safe_url(ledger_url)} has no Genesis: start a network with --genesis FILE "
                "(or a development one with --dev)"
            )
        assert policy is not None, "a new network's Genesis names a policy"
        domain = Domain(chain_id=policy.chain_id, verifying_contract=coordinator.address)
        message = genesis_message(
            coordinator,
            domain,
            policy,
            dev=dev and genesis is None,
            admin=None if genesis is None else genesis.admin,
            allocations=[] if genesis is None else [(a.address, a.amount_ugpc) for a in genesis.allocations],
            start_s=int(time.time()) if start_s is None else start_s,
        )
        ledger.close()
        ledger = Ledger(ledger_url, domain=domain)
        try:
            ledger.init_genesis(message, policy)
        except GpucoinError as e:
            raise HeadError(f"the ledger refused the Genesis: {e}") from None
        return domain
    finally:
        ledger.close()


def _check_same(ledger: Ledger, held, genesis: GenesisFile, policy: Policy, ledger_url: str) -> None:
    row = ledger.message(held.digest)
    m = json.loads(row.typed_data)["message"] if row is not None else {}
    have = [(a["recipient"], int(a["amount"])) for a in m.get("allocations", [])]
    want = [(a.address, a.amount_ugpc) for a in genesis.allocations]
    differs = [
        what
        for what, same in (
            ("policy", held.policy_hash == policy_hash(policy)),
            ("admin", held.admin == (genesis.admin or held.coordinator)),
            ("allocations", have == want),
            ("dev", not held.dev),
        )
        if not same
    ]
    if differs:
        raise HeadError(
            f"the ledger at {safe_url(ledger_url)} already holds another Genesis ({held.digest[:12]}…; its "
            f"{', '.join(differs)} differ from the file's): a network's Genesis never changes; start again "
            "without --genesis, or give a new ledger"
        )


def safe_url(url: str) -> str:
    """``url`` without a password, for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL that does not parse is shown as its scheme only
        return url.split(":", 1)[0] + ":..."
