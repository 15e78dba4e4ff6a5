"""The head's view of its Ray nodes, read from Ray's state API over the dashboard's HTTP (JSON).

The head service is no Ray driver: it never receives a Ray object (which Ray unpickles, and a
volunteer's node could have made), only JSON from its own dashboard on loopback, authorized by
the cluster's token (``Authorization: Bearer``, Ray's token authentication).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gpucoin.exceptions import HeadError

MAX_NODES = 10_000
"""The most nodes one listing asks Ray for."""

TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RayNode:
    """One node in Ray's view: id (hex), IP, whether it is the head node, alive, labels."""

    node_id: str
    ip: str
    is_head: bool
    alive: bool
    labels: dict[str, str]


def list_nodes(dashboard_url: str, token_path: Path) -> dict[str, RayNode]:
    """Every node Ray knows (alive or dead), by node id.

    Raises:
        HeadError: the dashboard cannot be reached or answers outside the state API's shape.
    """
    token = Path(token_path).read_text().strip()
    req = urllib.request.Request(
        f"{dashboard_url}/api/v0/nodes?limit={MAX_NODES}&detail=1&timeout={int(TIMEOUT_S)}",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S + 5) as r:  # noqa: S310 - our own loopback URL
            body = json.loads(r.read(64 << 20))
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise HeadError(f"cannot read Ray's nodes from its dashboard: {getattr(e, 'reason', e)}") from None
    try:
        rows = body["data"]["result"]["result"]
        return {
            row["node_id"]: RayNode(
                node_id=row["node_id"],
                ip=row.get("node_ip", ""),
                is_head=bool(row.get("is_head_node")),
                alive=row.get("state") == "ALIVE",
                labels={str(k): str(v) for k, v in (row.get("labels") or {}).items()},
            )
            for row in rows
        }
    except (KeyError, TypeError, AttributeError) as e:
        raise HeadError(f"Ray's state API answered an unexpected shape ({e!r})") from None
