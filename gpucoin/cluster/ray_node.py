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


def main() -> None:
    """Run Ray's CLI (``ray start ...``) with the node IP taken as given."""
    from ray.scripts.scripts import main as ray_main

    with loopback_kept():
        ray_main()


if __name__ == "__main__":
    main()
