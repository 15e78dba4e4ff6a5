"""Every port gpucoin hands Ray is distinct: Ray refuses to start a node when two of its
components are given one port (CI saw ``client_server`` and ``node_manager`` both get 48149 from
two separate free-port probes)."""

import socket

import pytest

from gpucoin.cluster.embedded import PortPool, component_ports, ephemeral_port_range
from gpucoin.exceptions import ClusterError


def test_a_pool_never_hands_out_a_port_twice():
    pool = PortPool()
    ports = [pool.take() for _ in range(300)]
    assert len(set(ports)) == 300
    assert 6379 not in ports


def test_a_pool_skips_ports_that_are_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        pool = PortPool(taken={busy})
        assert busy not in [pool.take() for _ in range(200)]


def test_a_pool_says_when_it_finds_nothing():
    pool = PortPool(taken=set(range(0, 65536)))
    with pytest.raises(ClusterError, match="free TCP port"):
        pool.take()


def test_every_node_of_a_cluster_gets_ports_of_its_own():
    pool = PortPool()
    ports = [pool.take()]  # the head's GCS port
    for head in (True, False, False, False):
        ports += list(component_ports(pool, head).values())
    assert len(ports) == 1 + 8 + 3 * 6
    assert len(set(ports)) == len(ports)


def test_ports_come_from_outside_the_kernels_ephemeral_range():
    low, _ = ephemeral_port_range()
    if low - PortPool.LOWEST < PortPool.MIN_GAP:
        pytest.skip(f"this kernel's ephemeral range starts at {low}: the pool falls back to kernel-picked ports")
    pool = PortPool()
    assert all(PortPool.LOWEST <= pool.take() < low for _ in range(100))
