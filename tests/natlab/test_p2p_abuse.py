"""Abuse of the relay over the lab's network: what a stranger, a crowd and a forger of source
addresses get from it.

* A node not on the allow-list is refused: it relays nothing to an allowed node (which never
  hears of it), and the refusal is in the relay's log.
* `max_clients`: client N+1 is refused while the first N keep working.
* QUIC address discovery does not amplify: Initials sent with a forged source address (a raw
  socket; aioquic builds the packets) get answers smaller than themselves.

The per-client rate limit is tested on loopback (crates/mqttd-p2p/tests/relay.rs), where the
bytes through the relay are counted exactly.
"""

from __future__ import annotations

import re
import socket
import struct
import time

import pytest

from natlab import RELAY_IP, Nat, mqttd

RELAY_LOG = "info,mqttd_p2p=debug"


#: An address inside site b's public LAN that no host has: what the relay sends there is lost.
VICTIM = "192.0.2.200"


def nft_counters(node, table: str) -> dict[str, int]:
    """Bytes of each named counter of `table` (family inet) in `node`."""
    out = node.run(["nft", "list", "counters", "table", "inet", table]).stdout
    found = re.findall(r"counter (\w+) \{\s*packets \d+ bytes (\d+)", out)
    return {name: int(n) for name, n in found}


def spoofed_initials(count: int, port: int) -> list[bytes]:
    """`count` client Initial datagrams of new connections to the relay's address discovery."""
    aioquic = pytest.importorskip(
        "aioquic", reason="aioquic (the interoperability suite's virtualenv) builds them")
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    datagrams = []
    for _ in range(count):
        config = QuicConfiguration(is_client=True, alpn_protocols=["/iroh-qad/0"],
                                   server_name=RELAY_IP)
        conn = QuicConnection(configuration=config)
        now = time.monotonic()
        conn.connect((RELAY_IP, port), now=now)
        datagrams.extend(data for data, _ in conn.datagrams_to_send(now=now))
    assert datagrams and all(len(d) >= 1200 for d in datagrams), aioquic
    return datagrams


def ip_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4 header (the kernel fills in the length and checksum) and a UDP header."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)  # no UDP checksum (IPv4)
    return ip + udp + payload


def test_address_discovery_does_not_amplify_toward_forged_sources(make_topology, mqttd_bin,
                                                                  tmp_path):
    began = time.monotonic()
    topo = make_topology(Nat.NONE, Nat.NONE)
    relay = mqttd.start_relay(topo.relay, tmp_path / "relay")
    _, port = relay.addr("relay")
    datagrams = spoofed_initials(20, port)
    # What the relay receives from and sends to the victim's address, at its own interface.
    topo.relay.ns.nft(f"""
table inet amp {{
    counter from_victim {{}}
    counter to_victim {{}}
    chain in {{
        type filter hook input priority 0;
        ip saddr {VICTIM} udp dport {port} counter name from_victim;
    }}
    chain out {{
        type filter hook output priority 0; ip daddr {VICTIM} counter name to_victim;
    }}
}}
""")
    raw = topo.a.host.ns.call(socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        for n, datagram in enumerate(datagrams):
            raw.sendto(ip_udp(VICTIM, RELAY_IP, 40000 + n, port, datagram),
                       (RELAY_IP, 0))
    finally:
        raw.close()
    # Long enough for the server's retransmissions (its first PTO is about a second).
    time.sleep(4)
    counted = nft_counters(topo.relay, "amp")
    print(f"\nnatlab amplification: {len(datagrams)} forged Initials; relay received "
          f"{counted['from_victim']} bytes from {VICTIM}, sent {counted['to_victim']} "
          f"({time.monotonic() - began:.1f} s)")
    assert counted["from_victim"] >= sum(len(d) for d in datagrams)
    assert counted["to_victim"] <= counted["from_victim"], counted


def node_id(node, data_dir) -> str:
    """The id of the key in `data_dir` (created now): `mqttd id`."""
    return mqttd.client(node, ["id", "--data-dir", data_dir]).stdout.strip()


def test_a_node_not_on_the_allow_list_relays_nothing(make_topology, mqttd_bin, tmp_path):
    began = time.monotonic()
    topo = make_topology(Nat.PORT_RESTRICTED, Nat.PORT_RESTRICTED)
    target_dir, friend_dir, stranger_dir = (tmp_path / n for n in ("target", "friend", "stranger"))
    target, friend, stranger = (node_id(topo.a.host, d)
                                for d in (target_dir, friend_dir, stranger_dir))
    relay = mqttd.start_relay(topo.relay, tmp_path / "relay", allow_any=False, log=RELAY_LOG,
                              config=f"[relay]\nallow = {mqttd.toml_string([target, friend])}\n")
    broker = mqttd.start_broker(topo.a.host, target_dir, relays=[relay],
                                log="info,mqttd_broker=debug")
    # Behind a port-restricted NAT the target is reachable only through the relay, or by a hole
    # punch that the relay coordinates.
    refused = mqttd.ping(topo.b.host, broker, relays=[relay], count=2, wait=1,
                         extra_args=["--key-file", stranger_dir / "node.key",
                                     "--connect-timeout", "5"])
    assert refused.received == 0 and refused.status != 0, refused
    allowed = mqttd.ping(topo.b.host, broker, relays=[relay], count=2, wait=2,
                         extra_args=["--key-file", friend_dir / "node.key"])
    assert allowed.received == 2, allowed
    relay_log, broker_log = relay.log(), broker.log()
    print(f"\nnatlab allow-list: stranger refused, friend answered "
          f"({time.monotonic() - began:.1f} s)")
    assert re.search(rf"relay client refused node_id={stranger} reason=.*not allowed",
                     relay_log), relay.describe()
    assert stranger not in broker_log, broker.describe()
    assert friend in broker_log, broker.describe()


def test_the_client_past_max_clients_is_refused_and_the_others_keep_working(
        make_topology, mqttd_bin, tmp_path):
    began = time.monotonic()
    topo = make_topology(Nat.PORT_RESTRICTED, Nat.PORT_RESTRICTED)
    relay = mqttd.start_relay(topo.relay, tmp_path / "relay", log=RELAY_LOG,
                              config="max_clients = 3\n")
    flags = mqttd.relay_flags([relay])
    ids = tmp_path / "ids"
    with open(tmp_path / "serve.log", "w") as log:
        serve = topo.a.host.popen([mqttd.binary(), "p2p", "swarm", "serve", "--nodes", "2",
                                   "--ids-out", ids, *flags], stdout=log, stderr=log)
    wait_for(lambda: ids.exists() or serve.poll() is not None, "the two nodes online")
    first, second = ids.read_text().split()
    # The third client: pings through the relay while the fourth knocks.
    pinger = mqttd.client_popen(topo.b.host, ["p2p", "ping", first, "--count", "12",
                                              "--interval", "0.5", "--wait", "2"],
                                relays=[relay])
    wait_for(lambda: relay.log().count("relay client admitted") >= 3, "the third client")
    fourth = mqttd.client(topo.b.host, ["p2p", "swarm", "serve", "--nodes", "1",
                                        "--ids-out", tmp_path / "fourth", "--online-timeout",
                                        "5", *flags], check=False)
    assert fourth.returncode != 0 and "not connected to a relay" in fourth.stderr, fourth
    out, err = pinger.communicate(timeout=60)
    result = mqttd.parse_ping(out, err, pinger.returncode)
    assert result.received == 12, result
    # The third's place is free again; the second node never left.
    again = mqttd.ping(topo.b.host, second, relays=[relay], count=2, wait=2)
    assert again.received == 2, again
    relay_log = relay.log()
    print(f"\nnatlab max_clients: 4th refused {relay_log.count('relay full')} times, "
          f"3rd answered 12/12 meanwhile ({time.monotonic() - began:.1f} s)")
    assert 'reason="relay full"' in relay_log, relay.describe()


def wait_for(done, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
