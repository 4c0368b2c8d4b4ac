"""A bridge over a relay-only peer-to-peer link survives the death of its relay: with two relays,
killing the one in use (SIGKILL) costs the bridge its connection, which it makes again through
the other relay by itself, and every acknowledged QoS 1 message still arrives.

Both sites are symmetric NATs, so no direct path exists and everything goes through a relay.
Two relays run on the relay host's two addresses; both brokers name both. The remote broker on
site b's host has a `p2p://` listener (at home on one relay: the one in use); the local broker
on site a's host bridges `bridge/# out 1` to it by node id alone. A numbered QoS 1 stream is
published at site a's host before, across and after the kill of the relay in use; a subscriber
on site b's host must receive every number the local broker acknowledged. iroh cannot move a
connection to another relay (see test_p2p_failover.py), so the established MQTT session
survives the way a bridge's does: its persistent session in the local broker holds what the
remote has not acknowledged, and the bridge reconnects through the other relay.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from natlab import RELAY_IP, RELAY_IP2, Nat, mqttd
from test_p2p_bridge import LOCAL_LOG, Subscriber, publish_acked
from test_p2p_failover import home_relay

BEFORE_KILL = 10
AFTER_KILL = 20
# Bounds on hangs, never verdicts on speed.
DELIVERY_TIMEOUT = 60.0
OPEN_TIMEOUT = 30.0


def opened(broker: mqttd.Mqttd) -> int:
    """How many times the local broker's bridge opened its peer-to-peer connection."""
    return sum("bridge peer-to-peer connection open" in line
               for line in broker.log().splitlines())


@pytest.mark.timeout(240)
def test_a_relayed_p2p_bridge_survives_the_death_of_its_relay(make_topology, mqttd_bin,
                                                              tmp_path):
    topo = make_topology(Nat.SYMMETRIC, Nat.SYMMETRIC)
    relays = [mqttd.start_relay(topo.relay, tmp_path / "relay1", ip=RELAY_IP),
              mqttd.start_relay(topo.relay, tmp_path / "relay2", ip=RELAY_IP2)]
    remote = mqttd.start_broker(topo.b.host, tmp_path / "remote", relays=relays,
                                listen=("p2p://", "tcp://127.0.0.1:0"))
    _, remote_port = remote.addr("tcp")
    sub = Subscriber(topo.b.host, remote_port, "bridge/#")
    sub.subscribed(OPEN_TIMEOUT)

    bundle = tmp_path / "relays-ca.pem"
    bundle.write_text("".join(Path(r.ca_file).read_text() for r in relays))
    urls = [r.relay_url for r in relays]
    config = (f"allow_anonymous = true\n"
              f"[p2p]\nrelays = {mqttd.toml_string(urls)}\n"
              f"relay_cafile = {mqttd.toml_string(str(bundle))}\n"
              f"[[bridge]]\nname = \"lab\"\n"
              f"urls = {mqttd.toml_string([f'p2p://{remote.node_id}'])}\n"
              f"topics = [\"bridge/# out 1\"]\nreconnect_min = 0.05\nreconnect_max = 0.5\n"
              f"connect_timeout = 10\n")
    local = mqttd.start(topo.a.host, tmp_path / "local", ["tcp://127.0.0.1:0"], config,
                        log=LOCAL_LOG)
    _, local_port = local.addr("tcp")
    acked: set[str] = set()
    attempts = 0

    def publish_one() -> bool:
        nonlocal attempts
        n = str(attempts)
        attempts += 1
        ok = publish_acked(topo.a.host, local_port, "bridge/n", n)
        if ok:
            acked.add(n)
        return ok

    for _ in range(BEFORE_KILL):
        assert publish_one(), local.describe()
    missing = sub.wait_for(set(acked), DELIVERY_TIMEOUT)
    assert not missing, f"before the kill: {sorted(missing, key=int)}\n{local.describe()}"
    assert opened(local) == 1, local.describe()

    in_use = home_relay(topo, relays)
    assert in_use.kill() == -9
    # The stream goes on at once: the local broker acknowledges and queues for the bridge.
    for _ in range(AFTER_KILL):
        assert publish_one(), local.describe()
    missing = sub.wait_for(set(acked), DELIVERY_TIMEOUT)
    assert not missing, (f"{len(missing)} of {len(acked)} acknowledged messages never arrived "
                         f"after the relay in use ({in_use.relay_url}) was killed: "
                         f"{sorted(missing, key=int)[:20]}\n{local.describe()}\n"
                         f"{remote.describe()}")
    reopened = opened(local)
    assert reopened >= 2, f"the bridge never connected again:\n{local.describe()}"
    print(f"acknowledged {len(acked)} of {attempts}; the bridge's connection opened "
          f"{reopened} times; relay killed: {in_use.relay_url}")
    assert local.stop() == 0
    assert remote.stop() == 0
