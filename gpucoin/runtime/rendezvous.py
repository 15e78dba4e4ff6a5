"""The ranks' c10d rendezvous store listens on the rank-0 node's address only, not on every interface.

``torch.distributed``'s ``env://`` rendezvous starts a ``TCPStore`` server in rank 0 that binds
the wildcard address whatever ``MASTER_ADDR`` says (torch 2.x), so in the embedded mode it was
the one listener of a run reachable from the network (an unauthenticated key-value store the
ranks rendezvous through). ``TCPStore`` accepts an already-listening socket
(``master_listen_fd``); Ray Train's torch backend is left as it is except that, before it sets up
the process group, each worker's store factory is wrapped to hand rank 0's store a socket bound
to ``MASTER_ADDR``. Clients connect to ``MASTER_ADDR`` as before.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

STORE_BACKLOG = 1024
"""Pending connections the store's socket queues (torch's own servers use a few thousand)."""


def bind_store_to_master_addr() -> None:
    """In this process, make rank 0's rendezvous store listen on ``MASTER_ADDR`` only (idempotent)."""
    import importlib

    from torch.distributed import TCPStore

    # the module, not torch.distributed.rendezvous the function, which shadows it as an attribute
    rdzv = importlib.import_module("torch.distributed.rendezvous")

    original = rdzv._create_c10d_store
    if getattr(original, "_bound_to_master_addr", False):
        return

    def create(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank != 0 or not use_libuv or rdzv._torchelastic_use_agent_store():
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        family, kind, proto, _, addr = socket.getaddrinfo(hostname, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(STORE_BACKLOG)
        return TCPStore(  # takes ownership of the socket
            host_name=hostname,
            port=port,
            world_size=world_size,
            is_master=True,
            timeout=timeout,
            multi_tenant=True,
            use_libuv=True,
            master_listen_fd=sock.detach(),
        )

    create._bound_to_master_addr = True
    rdzv._create_c10d_store = create


def torch_config():
    """Ray Train's ``TorchConfig`` whose backend binds the rendezvous store as above first."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class _Backend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            worker_group.execute(bind_store_to_master_addr)
            super().on_start(worker_group, backend_config)

    @dataclass
    class _Config(TorchConfig):
        @property
        def backend_cls(self):
            return _Backend

    return _Config()
