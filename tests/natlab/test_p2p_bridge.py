"""A bridge over a peer-to-peer link across two NATs keeps QoS 1 traffic flowing, with nothing
acknowledged lost, while its path moves from the relay to a direct one, and across a kill -9
of the local broker.

Both sites are port-restricted cones (endpoint-independent mapping, address-and-port-dependent
filtering): a hole punch works, but only once both sides have sent, so the bridge's connection
starts through the relay (its URL names only the remote node and the relay) and moves to a
direct path when iroh's hole punch succeeds. The local broker on site a's host has no p2p
listener: its bridge dials with a node of its own (the broker's `node.key`) on the relay the
URL names. The remote broker on site b's host has a `p2p://` listener on the same relay; a
subscriber on site b's host reads what the bridge delivers there.

A numbered QoS 1 stream is published at site a's host, one `mqttd pub -q 1` per message (its
exit status 0 means the local broker sent PUBACK: the message is acknowledged). The local
broker's log says which path the bridge's connection is on (`bridge peer-to-peer connection
open path=...`, then `bridge path selected path=...` at each move). Once the path is direct,
the local broker is killed with SIGKILL mid-stream, publishing goes on (failing until it is
back), and it is started again on the same data directory. The verdict: the subscriber
receives every acknowledged number (as a set: QoS 1 allows duplicates), and the log shows the
connection relayed first and direct later.
"""

from __future__ import annotations

import re
import threading
import time

import pytest

from natlab import Nat, mqttd

# How many acknowledged messages to publish on the direct path before the kill, and after the
# restart.
BEFORE_KILL = 15
AFTER_RESTART = 20
# Bounds on hangs, never verdicts on speed.
PATH_TIMEOUT = 30.0
DELIVERY_TIMEOUT = 60.0
# The log of the local broker: its bridge's lines, warnings elsewhere.
LOCAL_LOG = "warn,mqttd_broker::bridge=info"

_PATH = re.compile(r"bridge (?:peer-to-peer connection open|path selected).*?path=\S*?(relayed|direct)")


class Subscriber:
    """`mqttd sub` on the remote broker, its payloads collected by a thread."""

    def __init__(self, node, port: int, topic: str):
        self.node, self.port, self.topic = node, port, topic
        self.process = mqttd.client_popen(
            node, ["sub", "-L", f"mqtt://127.0.0.1:{port}/{topic}", "-q", "1"])
        self.payloads: list[str] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self.lock:
                self.payloads.append(line.rstrip("\n"))

    def seen(self) -> set[str]:
        with self.lock:
            return set(self.payloads)

    def subscribed(self, timeout: float) -> None:
        """Returns once a probe published on the broker itself (under the subscribed filter,
        `prefix/#`) comes back: the subscription is in place."""
        probe = self.topic.replace("#", "probe")
        deadline = time.monotonic() + timeout
        while "probe" not in self.seen():
            assert time.monotonic() < deadline, "the subscriber got no probe"
            mqttd.client(self.node, ["pub", "-L", f"mqtt://127.0.0.1:{self.port}/{probe}",
                                     "-m", "probe", "-q", "1"])
            time.sleep(0.2)

    def wait_for(self, wanted: set[str], timeout: float) -> set[str]:
        """Waits until every payload of `wanted` arrived; returns those missing."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            missing = wanted - self.seen()
            if not missing:
                return set()
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        return wanted - self.seen()


def publish_acked(node, port: int, topic: str, payload: str) -> bool:
    """`mqttd pub -q 1` of `payload` to the broker at 127.0.0.1:`port` in `node`: whether the
    broker acknowledged it (exit status 0)."""
    done = mqttd.client(node, ["pub", "-L", f"mqtt://127.0.0.1:{port}/{topic}", "-m", payload,
                               "-q", "1"], check=False, timeout=15)
    return done.returncode == 0


def paths(broker: mqttd.Mqttd) -> list[str]:
    """The bridge's paths in the order its log names them (`relayed`, `direct`)."""
    return [m.group(1) for line in broker.log().splitlines() if (m := _PATH.search(line))]


def bridge_config(relay: mqttd.Mqttd, remote: mqttd.Mqttd) -> str:
    url = f"p2p://{remote.node_id}?relay={relay.relay_url}"
    return (f"allow_anonymous = true\n"
            f"[p2p]\nrelays = {mqttd.toml_string([relay.relay_url])}\n"
            f"relay_cafile = {mqttd.toml_string(str(relay.ca_file))}\n"
            f"[[bridge]]\nname = \"lab\"\nurls = {mqttd.toml_string([url])}\n"
            f"topics = [\"bridge/# out 1\"]\nreconnect_min = 0.05\nreconnect_max = 0.5\n"
            f"connect_timeout = 10\n")


@pytest.mark.timeout(240)
def test_a_p2p_bridge_loses_nothing_while_its_path_moves_and_across_a_kill_9(
        make_topology, mqttd_bin, tmp_path):
    topo = make_topology(Nat.PORT_RESTRICTED, Nat.PORT_RESTRICTED)
    relay = mqttd.start_relay(topo.relay, tmp_path / "relay")
    remote = mqttd.start_broker(topo.b.host, tmp_path / "remote", relays=[relay],
                                listen=("p2p://", "tcp://127.0.0.1:0"))
    _, remote_port = remote.addr("tcp")
    sub = Subscriber(topo.b.host, remote_port, "bridge/#")
    sub.subscribed(PATH_TIMEOUT)

    local_dir = tmp_path / "local"
    config = bridge_config(relay, remote)

    def start_local() -> mqttd.Mqttd:
        return mqttd.start(topo.a.host, local_dir, ["tcp://127.0.0.1:0"], config, log=LOCAL_LOG)

    local = start_local()
    acked: set[str] = set()
    attempts = 0

    def publish_one() -> bool:
        nonlocal attempts
        n = str(attempts)
        attempts += 1
        ok = publish_acked(topo.a.host, local.addr("tcp")[1], "bridge/n", n)
        if ok:
            acked.add(n)
        return ok

    # The stream starts at once, while the bridge connects through the relay, and goes on
    # until its path is direct, then a few more.
    deadline = time.monotonic() + PATH_TIMEOUT
    while "direct" not in paths(local):
        assert time.monotonic() < deadline, \
            f"the bridge's path never went direct: {paths(local)}\n{local.describe()}"
        assert publish_one(), local.describe()
    while_relayed = len(acked)
    for _ in range(BEFORE_KILL):
        assert publish_one(), local.describe()
    seen_before_kill = paths(local)

    # kill -9 mid-stream: publishing goes on, unacknowledged, until the broker is back.
    assert local.kill() == -9
    for _ in range(3):
        assert not publish_one()
    local = start_local()
    for _ in range(AFTER_RESTART):
        assert publish_one(), local.describe()
    missing = sub.wait_for(acked, DELIVERY_TIMEOUT)
    assert not missing, (f"{len(missing)} of {len(acked)} acknowledged messages never arrived: "
                         f"{sorted(missing, key=int)[:20]}\npaths before the kill: "
                         f"{seen_before_kill}\n{local.describe()}\n{remote.describe()}")

    # Relayed first, direct later: the move happened under the stream.
    assert seen_before_kill[0] == "relayed", seen_before_kill
    assert "direct" in seen_before_kill, seen_before_kill
    print(f"acknowledged {len(acked)} of {attempts} ({while_relayed} before the path was direct);"
          f" paths before the kill {seen_before_kill}; "
          f"after the restart {paths(local)[len(seen_before_kill):]}")
    assert local.stop() == 0
    assert remote.stop() == 0
