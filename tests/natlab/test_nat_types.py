"""Each router type, probed with plain UDP from its host, behaves as its name says.

The lab's other tests trust these types, so they are checked first and from outside, the way
a STUN client would: the mapped address as three observer sockets see it (mapping), and
whether answers from an address and from a port the host never sent to get in (filtering).
"""

from __future__ import annotations

import pytest

from natlab import EXPECTED_BEHAVIOUR, Nat, classify
from natlab.probe import receive, wait_dropped


@pytest.mark.parametrize("nat", list(Nat), ids=str)
def test_router_behaves_as_its_type(make_topology, observer, nat):
    topo = make_topology(a=nat)
    behaviour = classify(topo.a, observer(topo))
    assert (behaviour.mapping, behaviour.filtering) == EXPECTED_BEHAVIOUR[nat], behaviour
    if nat is Nat.SYMMETRIC:
        return
    # Linux keeps the inside port when it is free; a NAT also keeps the address it maps to.
    assert behaviour.port_preserved, behaviour
    assert {ip for ip, _ in behaviour.mapped.values()} == {topo.a.public_ip}, behaviour


@pytest.mark.parametrize("nat", [Nat.FULL_CONE, Nat.PORT_RESTRICTED], ids=str)
def test_a_peer_sending_first_does_not_move_the_mapping(make_topology, observer, nat):
    """The trap of conntrack NAT: a peer's packet that reaches the router before the host has
    sent to that peer must not leave a conntrack entry that later forces a new public port on
    the host's own flow to the peer (the router drops it before conntrack confirms an entry).
    The plain hole-punch matrix would not notice, since a peer answers wherever the packet
    came from."""
    topo = make_topology(a=nat, b=Nat.NONE)
    obs = observer(topo)
    host = topo.a.host.udp_socket()
    peer = topo.b.host.udp_socket()
    mapped = obs.whoami(host)

    drops_before = topo.a.dropped()
    peer.sendto(b"natlab early", mapped)
    if nat is Nat.PORT_RESTRICTED:
        wait_dropped(topo.a, drops_before)  # unsolicited
    else:
        data, source = receive(host)  # endpoint-independent filtering lets it in
        assert (data, source) == (b"natlab early", (topo.b.host.ip, peer.getsockname()[1]))

    host.sendto(b"natlab late", (topo.b.host.ip, peer.getsockname()[1]))
    data, source = receive(peer)
    assert data == b"natlab late"
    assert source == mapped, f"the host's flow to the peer left from {source}, not {mapped}"
