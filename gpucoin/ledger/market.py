"""The market a ledger belongs to, as stored: its EIP-712 domain, its Genesis and its policy.

A ledger is bound to its market when its Genesis is recorded (``Ledger.init_genesis``): the
``market`` row names the domain the Genesis was signed in, the Genesis's digest and its policy's
hash, and the ``policy`` table holds that policy's canonical JSON. Every later message must be
signed in that domain, and every rule that needs a number of the policy reads it from there,
never from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from gpucoin.exceptions import LedgerError, PolicyError, StoredPolicyOutdated
from gpucoin.ledger import migrate
from gpucoin.ledger.facts import GenesisInfo, Msg
from gpucoin.ledger.models import MarketRow, MessageRow, PolicyRow
from gpucoin.policy.model import Policy, parse_policy, policy_hash
from gpucoin.wallet.messages import loads_json


@dataclass(frozen=True)
class Binding:
    """What the ``market`` row says.

    Attributes:
        domain: the EIP-712 domain (``Domain.as_dict()``) every message must be signed in.
        first_message_id: the id of the first message held to it.
        genesis: the Genesis and its policy; None for a ledger bound before Genesis messages existed.
    """

    domain: dict[str, Any]
    first_message_id: int
    genesis: GenesisInfo | None


def msg_of(row: Any) -> Msg:
    """The ``Msg`` of a stored ``message`` row (digest, primary_type, signer, typed_data columns).

    Raises:
        LedgerError: for stored typed data that is not a JSON object with a ``message`` object.
    """
    try:
        fields = loads_json(row.typed_data)["message"]
    except (TypeError, ValueError, KeyError) as exc:
        raise LedgerError(f"message {row.digest}: stored typed data does not parse ({exc})") from None
    if not isinstance(fields, dict):
        raise LedgerError(f"message {row.digest}: stored typed data has no message object")
    return Msg(row.digest, row.primary_type, row.signer, fields)


def load_policy_row(conn: Any, hash_: str) -> Policy:
    """The policy stored under ``hash_``, checked to hash to it.

    Raises:
        StoredPolicyOutdated: if it is valid JSON that fails this gpucoin's policy schema.
        LedgerError: if it is missing, is not JSON, or hashes to something else.
    """
    table = PolicyRow.__table__
    row = conn.execute(select(table.c.body).where(table.c.hash == hash_)).first()
    if row is None:
        raise LedgerError(f"the ledger's policy {hash_} is not stored")
    try:
        data = loads_json(row[0])
    except ValueError as exc:
        raise LedgerError(f"the ledger's policy {hash_} does not parse: {exc}") from None
    try:
        policy = parse_policy(data, f"stored policy {hash_}")
    except PolicyError as exc:
        raise StoredPolicyOutdated(f"the ledger's policy {hash_} does not parse: {exc}") from None
    if policy_hash(policy) != hash_:
        raise LedgerError(f"the ledger's policy stored under {hash_} hashes to {policy_hash(policy)}")
    return policy


def read_binding(conn: Any, *, lock: bool = False) -> Binding | None:
    """The market the ledger behind ``conn`` belongs to, None before its Genesis.

    Args:
        lock: on PostgreSQL, first take the migration's advisory lock in shared mode, so a
            Genesis being recorded (under that lock, exclusive) is either committed and seen or
            waited for.

    Raises:
        LedgerError: for a market row whose Genesis or policy is missing or altered.
    """
    if lock and conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock_shared({migrate.PG_LOCK_KEY})")
    table = MarketRow.__table__
    row = conn.execute(select(table).where(table.c.id == 1)).first()
    if row is None:
        return None
    domain = loads_json(row.domain)
    if row.genesis_digest is None:
        return Binding(domain, int(row.first_message_id), None)
    mtable = MessageRow.__table__
    grow = conn.execute(select(mtable).where(mtable.c.digest == row.genesis_digest)).first()
    if grow is None:
        raise LedgerError(f"the ledger's Genesis {row.genesis_digest} is not stored")
    genesis = msg_of(grow)
    policy = load_policy_row(conn, row.policy_hash)
    if genesis.fields.get("policyHash") != row.policy_hash:
        raise LedgerError(
            f"the ledger's Genesis names policy {genesis.fields.get('policyHash')}, the market row {row.policy_hash}"
        )
    signed_domain = loads_json(grow.typed_data).get("domain")
    if signed_domain != domain:  # the row is a copy; the Genesis's signature is what binds the market
        raise LedgerError(f"the market row names the domain {domain}, but the Genesis is signed in {signed_domain}")
    return Binding(domain, int(row.first_message_id), GenesisInfo.of(genesis, policy))
