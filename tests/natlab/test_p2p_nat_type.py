"""The NAT type mqttd detects with two relays, behind each of the four router types.

A broker's `p2p://` node names two relays on the relay host's two addresses (`RELAY_IP`,
`RELAY_IP2`). Each relay tells the node, by QUIC address discovery, the public address its
packets came from; a symmetric router maps the flow to each relay to a port of its own (the
mapping depends on the destination), the cone routers keep one mapping for every destination,
and without a router the relays see the host's own address. The node's verdict is read from
the metric `mqttd_p2p_nat_type{nat=...}` (1 for the type detected).

A symmetric router picks random ports (`masquerade fully-random`): the two flows get the same
port only by a coincidence of about one in 28,000, which would read as endpoint-independent.
"""

from __future__ import annotations

import re
import time

import pytest

from natlab import RELAY_IP, RELAY_IP2, Nat, mqttd

EXPECTED = {
    Nat.NONE: "none",
    Nat.FULL_CONE: "endpoint_independent",
    Nat.PORT_RESTRICTED: "endpoint_independent",
    Nat.SYMMETRIC: "endpoint_dependent",
}
# Both relays answer within a net report (a few seconds at most); a debug build is slow.
DETECT_TIMEOUT = 30.0
# How often the broker copies the NAT type and the relays' states into its metrics, and more.
STATE_REFRESH = 3.0
_NAT_TYPE = re.compile(r'^mqttd_p2p_nat_type\{nat="(\w+)"\} 1$', re.M)


def detected(broker: mqttd.Mqttd) -> str | None:
    """The NAT type the broker's node reports now (None before the first look)."""
    match = _NAT_TYPE.search(broker.metrics())
    return match.group(1) if match else None


def start(topo, tmp_path) -> tuple[list[mqttd.Mqttd], mqttd.Mqttd]:
    """Two relays on the relay host's two addresses, and a broker in site a using both."""
    relays = [mqttd.start_relay(topo.relay, tmp_path / f"relay{n}", ip=ip)
              for n, ip in enumerate((RELAY_IP, RELAY_IP2))]
    broker = mqttd.start_broker(topo.a.host, tmp_path / "broker", relays=relays,
                                listen=("p2p://", "http://127.0.0.1:0"),
                                log="warn,mqttd_p2p=info")
    return relays, broker


def wait_detected(broker: mqttd.Mqttd, deadline: float) -> str | None:
    """The NAT type once it is known (or what it is at the deadline)."""
    seen = detected(broker)
    while seen in (None, "unknown") and time.monotonic() < deadline:
        time.sleep(0.25)
        seen = detected(broker)
    return seen


@pytest.mark.parametrize("nat", list(Nat), ids=[str(n) for n in Nat])
def test_two_relays_tell_the_nat_type(make_topology, mqttd_bin, tmp_path, nat):
    topo = make_topology(nat, Nat.NONE)
    relays, broker = start(topo, tmp_path)
    deadline = time.monotonic() + DETECT_TIMEOUT
    seen = wait_detected(broker, deadline)
    assert seen == EXPECTED[nat], (
        f"behind {nat}: detected {seen}, expected {EXPECTED[nat]}\n{broker.describe()}")
    # The change was logged, once.
    assert broker.log().count("NAT type") == 1, broker.describe()
    # Both relays are known to the node, one of them its home (the metrics are refreshed
    # every 2 s: the home relay may be connected after the NAT type is known).
    metrics, up = "", []
    while time.monotonic() < deadline + STATE_REFRESH:
        metrics = broker.metrics()
        up = re.findall(r'^mqttd_p2p_relay_up\{relay="([^"]+)"\} (\d)$', metrics, re.M)
        if [v for _, v in up].count("1") == 1:
            break
        time.sleep(0.25)
    assert sorted(url for url, _ in up) == sorted(r.relay_url for r in relays), metrics
    assert [v for _, v in up].count("1") == 1, metrics


TRAVERSALS = [
    # A cone router and no NAT: hole punching works.
    (Nat.FULL_CONE, Nat.NONE, "direct"),
    # Symmetric on both sides: no direct path, the relay carries it all.
    (Nat.SYMMETRIC, Nat.SYMMETRIC, "relay_only"),
]


@pytest.mark.parametrize(("a", "b", "outcome"), TRAVERSALS,
                         ids=[f"{a}.vs.{b}" for a, b, _ in TRAVERSALS])
def test_traversal_metrics_carry_the_nat_type(make_topology, mqttd_bin, tmp_path, a, b,
                                              outcome):
    topo = make_topology(a, b)
    relays, broker = start(topo, tmp_path)
    nat = wait_detected(broker, time.monotonic() + DETECT_TIMEOUT)
    assert nat == EXPECTED[a], broker.describe()
    result = mqttd.ping(topo.b.host, broker, relays, count=3, ca_bundle=tmp_path / "ca.pem")
    assert result.received == 3, f"{result}\n{broker.describe()}"
    # The ping's connection is closed: its outcome is decided.
    name = f'mqttd_p2p_traversals_total{{nat="{nat}",outcome="{outcome}"}}'
    deadline = time.monotonic() + STATE_REFRESH
    metrics = broker.metrics()
    while f"{name} 1" not in metrics.splitlines() and time.monotonic() < deadline:
        time.sleep(0.1)
        metrics = broker.metrics()
    assert f"{name} 1" in metrics.splitlines(), f"{name} not 1\n{metrics}"
    assert f'mqttd_p2p_traversal_attempts_total{{nat="{nat}"}} 1' in metrics.splitlines()
    # One log line per phase, with the peer's short id.
    phases = re.findall(r'p2p traversal peer="(\w+)" phase="(\w+)"', broker.log())
    names = [phase for _, phase in phases]
    assert names[0] == "connected_relay" and names[-1] == "closed", broker.describe()
    assert ("direct_selected" in names) == (outcome == "direct"), broker.describe()
    assert ("stayed_relayed" in names) == (outcome == "relay_only"), broker.describe()
    assert len({peer for peer, _ in phases}) == 1, broker.describe()
