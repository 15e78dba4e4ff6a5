"""Which node registrations the head admits (pure: no Ray, no I/O; SPEC.md, Scheduling).

What a node declares about itself (resources, its IP) is untrusted. The head admits a node by
the Ray node id its registration names and the provider who signed it: the id must be a live
node in the head's own view of Ray, not the head node, not another provider's, and started for
that provider: ``gpucoin join`` starts the node's raylet with the label ``PROVIDER_LABEL`` =
its provider's address, which Ray fixes for the node's life and only whoever starts a raylet can
set, so a provider can register no node but one it started (a node of another host carries that
host's provider). The ledger then checks the signature, the domain, the deadline and the nonce,
and bonds the stake.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpucoin.exceptions import NodeRefused
from gpucoin.head.ray_state import RayNode
from gpucoin.wallet.messages import SignedMessage

PROVIDER_LABEL = "gpucoin.io/provider"
"""The Ray node label ``gpucoin join`` starts a raylet with: the address of the provider it is for."""


def check_registration(reg: SignedMessage, ray_nodes: Mapping[str, RayNode], holders: Mapping[str, str]) -> None:
    """Refuse ``reg`` unless it names a live, non-head Ray node no other provider holds, started
    for ``reg``'s provider (its ``PROVIDER_LABEL``).

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
    started_for = node.labels.get(PROVIDER_LABEL)
    if started_for is None or started_for.lower() != provider.lower():
        raise NodeRefused(
            f"node {node_id} was started for "
            + (f"provider {started_for}" if started_for else f"no provider (no Ray label {PROVIDER_LABEL})")
            + f", not {provider}: a provider registers only a node `gpucoin join` started for it"
        )
