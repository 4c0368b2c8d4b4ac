"""The lab's network (root): nodes and clients on one bridge, partitions between nodes, and
the workload driven from the clients' namespace against a broker in a node's namespace that is
paused (SIGSTOP) and killed (SIGKILL) mid-run."""

from __future__ import annotations

import os
import socket
import time

import pytest

from clusterlab import run
from clusterlab.broker import Broker

if os.geteuid() != 0:
    if os.environ.get("CLUSTERLAB_REQUIRED") == "1":
        raise RuntimeError("CLUSTERLAB_REQUIRED=1 but the lab's network needs root")
    pytest.skip("the cluster lab's network needs root (network namespaces, nftables)",
                allow_module_level=True)

from clusterlab.net import ClusterNet, node_ip  # noqa: E402


@pytest.fixture
def net():
    with ClusterNet(3) as made:
        yield made


def reaches(net, src, dst: int) -> bool:
    """Whether a UDP datagram from `src` (a node number, or "clients") gets to node `dst`."""
    receiver = net.nodes[dst].udp_socket(node_ip(dst), 0)
    receiver.settimeout(0.3)
    port = receiver.getsockname()[1]
    sender = (net.clients if src == "clients" else net.nodes[src]).socket()
    try:
        sender.sendto(b"ping", (node_ip(dst), port))
    except PermissionError:  # the sender's own output chain dropped it
        return False
    try:
        return receiver.recv(16) == b"ping"
    except socket.timeout:
        return False


def test_partitions_cut_nodes_off_and_heal(net):
    pairs = [(a, b) for a in (1, 2, 3) for b in (1, 2, 3) if a != b]
    assert all(reaches(net, a, b) for a, b in pairs)
    net.partition([[1, 2], [3]])
    assert reaches(net, 1, 2) and reaches(net, 2, 1)
    assert not any(reaches(net, a, b) for a, b in [(1, 3), (3, 1), (2, 3), (3, 2)])
    assert all(reaches(net, "clients", i) for i in (1, 2, 3))
    net.partition([[1], [2], [3]])
    assert not any(reaches(net, a, b) for a, b in pairs)
    assert all(reaches(net, "clients", i) for i in (1, 2, 3))
    net.heal()
    assert all(reaches(net, a, b) for a, b in pairs)


def test_workload_from_the_clients_namespace_across_a_pause_and_a_kill(net, tmp_path, history):
    broker = Broker(tmp_path / "n2", host=node_ip(2), ns=net.nodes[2]).start()
    nodes = lambda: [broker.addr()]  # noqa: E731 - the port changes at the restart

    def pause_then_kill(pubs):
        time.sleep(2)
        broker.pause()
        time.sleep(2)
        broker.resume()
        time.sleep(2)
        broker.kill()
        broker.start()
        time.sleep(3)

    try:
        report = run(history, nodes, pause_then_kill, publishers=2, subscribers=2, net=net)
    finally:
        broker.stop()
    print(report.summary())
    assert report.ok, report.summary() + "\n" + broker.log()[-3000:]
    assert report.published_ok >= 40, report.summary()
