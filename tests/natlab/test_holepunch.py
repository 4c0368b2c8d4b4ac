"""A plain UDP hole punch across every pair of router types: the lab's own acceptance test.

Both hosts learn their mapped address from the observer and send to each other's at the same
time, then to wherever the other's datagrams came from (`probe.hole_punch`). That works unless
a symmetric router is paired with a router that filters by address and port: a symmetric
router gives the flow to the peer a new public port, which the peer learns nothing about
beforehand, and a port-restricted or symmetric router on the other side drops the datagrams
from that unknown port, so neither side ever hears the other. With a full-cone router or a
public address on the other side, the symmetric side's datagram gets in, and the answer goes
back to the port it came from.

The peer-to-peer tests reuse these topologies with mqttd; a cell that fails here fails there
for the network's reasons, not the product's, and needs the relay.
"""

from __future__ import annotations

import itertools

import pytest

from natlab import Nat, hole_punch

FILTERS_BY_PORT = {Nat.PORT_RESTRICTED, Nat.SYMMETRIC}


def punch_works(a: Nat, b: Nat) -> bool:
    """Whether a plain hole punch between routers of types `a` and `b` can succeed."""
    return not ((a is Nat.SYMMETRIC and b in FILTERS_BY_PORT)
                or (b is Nat.SYMMETRIC and a in FILTERS_BY_PORT))


def test_the_expectation_has_13_working_cells():
    assert sum(punch_works(a, b) for a, b in CELLS) == 13
    assert [cell for cell in CELLS if not punch_works(*cell)] == [
        (Nat.PORT_RESTRICTED, Nat.SYMMETRIC),
        (Nat.SYMMETRIC, Nat.PORT_RESTRICTED),
        (Nat.SYMMETRIC, Nat.SYMMETRIC),
    ]


CELLS = list(itertools.product(Nat, Nat))


@pytest.mark.parametrize(("a", "b"), CELLS, ids=[f"{a}.vs.{b}" for a, b in CELLS])
def test_plain_hole_punch(make_topology, observer, a, b):
    topo = make_topology(a, b)
    result = hole_punch(topo, observer(topo))
    log = "\n".join(result.log)
    if punch_works(a, b):
        assert result.success, f"{a} x {b}: the punch failed, it should work\n{log}"
        assert result.rounds <= 2, f"{a} x {b}: took {result.rounds} rounds\n{log}"
    else:
        assert not result.success, f"{a} x {b}: the punch worked, it should not\n{log}"
