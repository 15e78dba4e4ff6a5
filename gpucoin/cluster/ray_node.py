"""Ray nodes and a driver that keep a loopback node IP.

``ray start --node-ip-address=127.0.0.1`` and ``ray.init(address="127.0.0.1:<port>")`` replace
the loopback address by the host's routable one (``ray._private.services.resolve_ip_for_localhost``),
and every Ray server then listens on all interfaces. Ray 2.60 binds its gRPC servers and agents
to loopback only when the node IP *is* 127.0.0.1 (measured here: gcs_server, raylets, core
workers and agents all on 127.0.0.1), so the embedded mode, whose nodes all share this host,
starts them through ``python -m gpucoin.cluster.ray_node start ...`` and connects its driver
inside ``loopback_kept()``. Everything else is Ray's own CLI and ``ray.init`` unchanged.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def loopback_kept():
    """Within the block Ray takes a loopback host (``127.0.0.1``, ``localhost``) as given."""
    import ray._private.services as services

    original = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = original


LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Set to 0, Ray's ``get_node_ip_address`` answers 127.0.0.1 instead of the host's routable IP
(``ray._private.services``). A loopback node's processes inherit it, so a process Ray starts
there that connects on its own (the dashboard agent's job manager, a Ray job's driver) looks for
the node's raylet on 127.0.0.1, where it is, instead of waiting forever on the host's IP."""


def main() -> None:
    """Run Ray's CLI (``ray start ...``) with the node IP taken as given; a loopback node's
    processes keep to loopback (``LOCAL_ONLY_ENV``)."""
    import os
    import sys

    loopback = any(a in ("--node-ip-address=127.0.0.1", "--node-ip-address=localhost") for a in sys.argv)
    if loopback:
        os.environ[LOCAL_ONLY_ENV] = "0"
    from ray._private import ray_constants
    from ray.scripts.scripts import main as ray_main

    ray_constants.ENABLE_RAY_CLUSTER = True  # this process starts a node of a multi-node cluster all the same
    with loopback_kept():
        ray_main()


if __name__ == "__main__":
    main()
