"""Abuse of the relay over the lab's network: what a stranger, a greedy client, a crowd and a
forger of source addresses get from it.

* A node not on the allow-list is refused: it relays nothing to an allowed node, and the
  refusal is in the relay's log.
* `max_clients`: client N+1 is refused while the first N stay connected.
* QUIC address discovery does not amplify: Initials sent with a forged source address (a raw
  socket, the packets built by aioquic) get answers no larger than themselves.

The client rate limit is tested on loopback (crates/mqttd-p2p/tests/relay.rs), where the bytes
through the relay are counted exactly.
"""

from __future__ import annotations

import re
import socket
import struct
import time

import pytest

from natlab import RELAY_IP, Nat
from relay_lab import RELAY_PORT, relay_url_and_ca, start_relay

#: An address inside site b's public LAN that no host has: what the relay sends there is lost.
VICTIM = "192.0.2.200"


def nft_counters(node, table: str) -> dict[str, int]:
    """Bytes of each named counter of `table` (family inet) in `node`."""
    out = node.run(["nft", "list", "counters", "table", "inet", table]).stdout
    return {name: int(n) for name, n in re.findall(r"counter (\w+) \{\s*packets \d+ bytes (\d+)", out)}


def spoofed_initials(count: int) -> list[bytes]:
    """`count` client Initial datagrams of new connections to the relay's address discovery."""
    aioquic = pytest.importorskip("aioquic", reason="aioquic (the interop suite's venv) builds the QUIC Initials")
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    datagrams = []
    for _ in range(count):
        config = QuicConfiguration(is_client=True, alpn_protocols=["/iroh-qad/0"],
                                   server_name=RELAY_IP)
        conn = QuicConnection(configuration=config)
        now = time.monotonic()
        conn.connect((RELAY_IP, RELAY_PORT), now=now)
        datagrams.extend(data for data, _ in conn.datagrams_to_send(now=now))
    assert datagrams and all(len(d) >= 1200 for d in datagrams), aioquic
    return datagrams


def ip_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4 header (the kernel fills in the length and checksum) and a UDP header."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)  # no UDP checksum (IPv4)
    return ip + udp + payload


def test_address_discovery_does_not_amplify_toward_forged_sources(make_topology, tmp_path):
    began = time.monotonic()
    topo = make_topology(Nat.NONE, Nat.NONE)
    relay = start_relay(topo, tmp_path)
    relay_url_and_ca(relay)
    # What the relay receives from and sends to the victim's address, at its own interface.
    topo.relay.ns.nft(f"""
table inet amp {{
    counter from_victim {{}}
    counter to_victim {{}}
    chain in {{ type filter hook input priority 0; ip saddr {VICTIM} udp dport {RELAY_PORT} counter name from_victim; }}
    chain out {{ type filter hook output priority 0; ip daddr {VICTIM} counter name to_victim; }}
}}
""")
    datagrams = spoofed_initials(20)
    raw = topo.a.host.ns.call(socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        for n, datagram in enumerate(datagrams):
            raw.sendto(ip_udp(VICTIM, RELAY_IP, 40000 + n, RELAY_PORT, datagram),
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
