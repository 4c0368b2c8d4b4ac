"""Relay failover: two relays, and the one in use killed with SIGKILL.

Two relays run on the relay host, one on each of its addresses (RELAY_IP and RELAY_IP2); the
broker on b-host and the clients on a-host name both. The relay in use is the broker's home
relay, the only one its node keeps a connection to (read from the relay host's TCP
connections): a client dials through every relay it knows, and only the broker's home
delivers. Then, in a cell where the connection stays relayed (symmetric x symmetric) and in one
where it goes direct (port-restricted x port-restricted):

* before the kill, an MQTT subscriber on a-host (over p2p://, QoS 1, a persistent session)
  receives what a publisher on b-host sends, and a ping session from a-host is answered;
* the relay in use is killed with SIGKILL;
* a new connection from a-host made after the kill succeeds, through the other relay (the
  broker's node notices the loss of its home relay at once and measures the relays again,
  instead of waiting up to 26 s for iroh's next periodic measurement: mqttd-p2p's home-relay
  watch), within `NEW_CONNECTION_BOUND`;
* the established session keeps working:
  - direct cell: on the same connection. The ping session started before the kill is answered
    throughout, and the subscriber started before the kill receives every message published
    after it, without reconnecting.
  - relayed cell: iroh 1.4 cannot move an established connection from one relay to another
    (it opens relay paths only when it connects, and chooses among paths already open), so
    the connection ends with its relay. The MQTT session does not: the subscriber
    reconnects (`-c`, the same client id) through the other relay and receives every QoS 1
    message published while it was away, nothing lost.

The times go into the table `p2p-failover`, printed at the end of the run.
"""

from __future__ import annotations

import queue
import subprocess
import time

import pytest

from natlab import RELAY_IP, RELAY_IP2, Nat, mqttd, report
from test_p2p import lines_of, wait_line

# The home-relay watch notices a lost relay at once; iroh's measurement then waits up to 3 s
# for the dead relay's QUIC probe. A generous bound on top of that.
NEW_CONNECTION_BOUND = 15.0
MESSAGE_WAIT = 15.0

CASES = [
    pytest.param(Nat.SYMMETRIC, Nat.SYMMETRIC, False, id="relayed.symmetric.vs.symmetric"),
    pytest.param(Nat.PORT_RESTRICTED, Nat.PORT_RESTRICTED, True,
                 id="direct.port-restricted.vs.port-restricted"),
]


def home_relay(topo, relays, timeout: float = 10.0):
    """The relay the broker's node is connected to (from the relay host's TCP connections)."""
    by_port = {int(r.relay_url.rsplit(":", 1)[1].rstrip("/")): r for r in relays}
    deadline = time.monotonic() + timeout
    while True:
        out = topo.relay.run(["ss", "-Htn", "state", "established"]).stdout
        homes = set()
        for line in out.splitlines():
            fields = line.split()
            if len(fields) < 4:
                continue
            local, peer = fields[-2], fields[-1]
            port = int(local.rsplit(":", 1)[1])
            if port in by_port and peer.rsplit(":", 1)[0] == topo.b.public_ip:
                homes.add(port)
        if len(homes) == 1:
            return by_port[homes.pop()]
        if time.monotonic() > deadline:
            raise AssertionError(f"the broker's relay connections are not one: {homes}\n{out}")
        time.sleep(0.1)


class Publisher:
    """`mqttd pub -l` on b-host over loopback TCP: one QoS 1 message per line written."""

    def __init__(self, topo, broker, topic):
        host, port = broker.addr("tcp")
        self.process = topo.b.host.popen(
            [mqttd.binary(), "pub", "-h", host, "-p", port, "-t", topic, "-q", "1", "-l"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.sent = 0

    def send(self, n: int = 1) -> list[str]:
        messages = []
        for _ in range(n):
            self.sent += 1
            messages.append(f"m{self.sent}")
            self.process.stdin.write(f"m{self.sent}\n")
        self.process.stdin.flush()
        return messages


def subscriber(topo, broker, relays, bundle):
    """A persistent-session QoS 1 subscriber on a-host over p2p://, and its output lines."""
    sub = mqttd.client_popen(topo.a.host, ["sub", "-t", "lab/failover", "-q", "1", "-i",
                                           "failover-sub", "-c", "-d"],
                             broker, relays, ca_bundle=bundle)
    return sub, lines_of(sub.stdout), lines_of(sub.stderr)


def receive(lines, expected: list[str], seen: list, what: str) -> None:
    """Waits until every message of `expected` has been printed, in order."""
    for message in expected:
        wait_line(lines, lambda line, m=message: line == m, MESSAGE_WAIT,
                  f"{what}: message {message}", seen)


def drain(lines, timeout: float = 5.0) -> list[str]:
    """The lines left in `lines` up to its end (its process has exited)."""
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        out.append(line)
    return out


@pytest.mark.parametrize(("a", "b", "direct"), CASES)
def test_killing_the_relay_in_use(make_topology, mqttd_bin, tmp_path, a, b, direct):
    topo = make_topology(a, b)
    r1 = mqttd.start_relay(topo.relay, tmp_path / "relay1", ip=RELAY_IP)
    r2 = mqttd.start_relay(topo.relay, tmp_path / "relay2", ip=RELAY_IP2)
    relays = [r1, r2]
    bundle = tmp_path / "relays-ca.pem"
    broker = mqttd.start_broker(topo.b.host, tmp_path / "broker", relays=relays,
                                listen=["p2p://", "tcp://127.0.0.1:0"])
    victim = home_relay(topo, relays)
    survivor = r2 if victim is r1 else r1

    # The established sessions: MQTT (subscriber on a-host, publisher on b-host) and pings.
    sub, sub_out, sub_err = subscriber(topo, broker, relays, bundle)
    seen: list = []
    wait_line(sub_err, lambda l: "received SUBACK" in l, mqttd.CLIENT_TIMEOUT,
              "the subscriber's SUBACK", seen)
    publisher = Publisher(topo, broker, "lab/failover")
    receive(sub_out, publisher.send(3), seen, "before the kill")
    pings = mqttd.client_popen(topo.a.host, ["p2p", "ping", broker.node_id, "--count", "1000",
                                             "--interval", "0.1", "--wait", "1"],
                               None, relays, ca_bundle=bundle)
    ping_lines, ping_seen = lines_of(pings.stdout), []
    if direct:
        wait_line(ping_lines, lambda l: " path=direct " in l, 10.0, "a direct path", ping_seen)
    else:
        wait_line(ping_lines, lambda l: " path=relay " in l, 10.0, "a relayed ping", ping_seen)

    killed_at = time.monotonic()
    assert victim.kill() == -9
    context = lambda: (f"killed {victim.relay_url}, kept {survivor.relay_url}\n"
                       f"{broker.describe()}")

    # A new connection after the kill: through the other relay.
    new = mqttd.ping(topo.a.host, broker, relays, count=3, interval=0.1, ca_bundle=bundle,
                     extra_args=["--connect-timeout", str(int(NEW_CONNECTION_BOUND))])
    new_after = time.monotonic() - killed_at
    assert new.received > 0, f"no new connection after the kill\n{new.stdout}{new.stderr}\n" \
                             f"{context()}"
    assert new_after < NEW_CONNECTION_BOUND + 5, context()
    assert home_relay(topo, [survivor]) is survivor, context()
    report.row("p2p-failover", **{
        "site a": str(a), "site b": str(b), "path": "direct" if direct else "relay",
        "new connection answered after the kill (ms)": round(new_after * 1000),
        "established session": "same connection" if direct else "resumed after reconnecting",
    })

    if direct:
        # The same connection and the same subscriber keep working.
        after = publisher.send(3)
        receive(sub_out, after, seen, "after the kill, on the established connection")
        assert sub.poll() is None, "the subscriber's connection ended"
        mark = len(ping_seen)
        for _ in range(10):
            wait_line(ping_lines, lambda l: l.startswith("seq="), 5.0, "pings", ping_seen)
        after_kill = ping_seen[mark:]
        assert all(" path=direct " in l for l in after_kill), "\n".join(ping_seen)
        assert not any("timeout" in l for l in ping_seen), "\n".join(ping_seen)
    else:
        # The relayed connection ends with its relay; the MQTT session survives it.
        during = publisher.send(3)
        sub.kill()
        sub.wait()
        # Whatever the old connection still delivered (nothing, with iroh 1.4) is not resent.
        old = drain(sub_out)
        sub, sub_out, _ = subscriber(topo, broker, relays, bundle)
        receive(sub_out, [m for m in during if m not in old], seen,
                "queued while away, after reconnecting")
        receive(sub_out, publisher.send(3), seen, "after reconnecting")
    assert broker.alive() and survivor.alive(), context()
    sub.kill()
    pings.kill()
