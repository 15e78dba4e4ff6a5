"""Which node registrations the head admits (pure: no Ray, no I/O; SPEC.md, Scheduling).

What a node declares about itself (labels, resources, its IP) is untrusted. The head admits a
node by the Ray node id its registration names and the provider who signed it: the id must be a
live node in the head's own view of Ray, not the head node, and not another provider's. The
ledger then checks the signature, the domain, the deadline and the nonce, and bonds the stake.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpucoin.exceptions import NodeRefused
from gpucoin.head.ray_state import RayNode
from gpucoin.wallet.messages import SignedMessage


def check_registration(reg: SignedMessage, ray_nodes: Mapping[str, RayNode], holders: Mapping[str, str]) -> None:
    """Refuse ``reg`` unless it names a live, non-head Ray node no other provider holds.

    Args:
        reg: the signed message (already parsed).
        ray_nodes: Ray's nodes by id, as the head reads them.
        holders: node id -> provider of the newest admitted registration of that node.

    Raises:
        NodeRefused: naming the rule ``reg`` breaks.
    """
    if reg.primary_type != "NodeRegistration":
        raise NodeRefused(f"expected a NodeRegistration, got a {reg.primary_type}")
    node_id, provider = reg.message["nodeId"], reg.message["provider"]
    node = ray_nodes.get(node_id)
    if node is None or not node.alive:
        raise NodeRefused(f"node {node_id} is no live node of this cluster in Ray's view; join it first")
    if node.is_head:
        raise NodeRefused(f"node {node_id} is the head node, which offers no compute")
    holder = holders.get(node_id)
    if holder is not None and holder != provider:
        raise NodeRefused(f"node {node_id} is registered by {holder}, not {provider}")
