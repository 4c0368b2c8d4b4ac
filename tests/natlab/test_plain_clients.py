"""Clients without NAT traversal reach a broker with a public address through its ordinary
listeners, from behind any router type: the peer-to-peer listener is one more way in, not a
replacement.

The broker runs on site b's host with a public address (`Nat.NONE`) and listens on TCP, QUIC and
`p2p://`; the client on site a's host, behind each router type in turn, uses plain TCP and plain
QUIC (no node, no relay) and must deliver a message both ways.
"""

from __future__ import annotations

import pytest

from natlab import Nat, mqttd

CLIENT_SITES = [Nat.NONE, Nat.FULL_CONE, Nat.PORT_RESTRICTED, Nat.SYMMETRIC]


@pytest.mark.parametrize("nat", CLIENT_SITES, ids=str)
def test_plain_tcp_and_quic_clients_reach_the_broker(make_topology, mqttd_bin, tmp_path, nat):
    topo = make_topology(nat, Nat.NONE)
    ip = topo.b.public_ip
    broker = mqttd.start(topo.b.host, tmp_path / "broker",
                         [f"tcp://{ip}:0", f"quic://{ip}:0", "p2p://"],
                         f'allow_anonymous = true\n[tls]\nhostnames = ["{ip}"]\n')
    for scheme in ("tcp", "quic"):
        host, port = broker.addr(scheme)
        url = {"tcp": "mqtt", "quic": "quic"}[scheme]
        tls = ["--cafile", str(broker.ca_file)] if scheme == "quic" else []
        topic = f"plain/{scheme}"
        # A retained message, then a subscriber that must get it: both from behind the NAT.
        mqttd.client(topo.a.host, ["pub", "-L", f"{url}://{host}:{port}/{topic}", "-m",
                                   f"hello over {scheme}", "-q", "1", "-r", *tls])
        got = mqttd.client(topo.a.host, ["sub", "-L", f"{url}://{host}:{port}/{topic}",
                                         "-C", "1", "-W", "10", *tls])
        assert got.stdout.strip() == f"hello over {scheme}", (scheme, got.stderr)
    assert broker.alive()
