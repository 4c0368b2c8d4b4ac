"""MQTT over QUIC with aioquic: a client whose streams the tests choose, and UDP relays.

aioquic (https://github.com/aiortc/aioquic) is a QUIC and TLS 1.3 stack written independently of
the broker's (noq, rustls), so these tests are a second opinion on the broker's QUIC as much as
on its MQTT. The client drives aioquic's sans-IO `QuicConnection` from an asyncio UDP socket of
its own, so that a test can put any packet on any stream, send CONNECT as 0-RTT early data, move
to another local port (migration), hold back a stream's flow-control credit (a client that does
not read), or see each RESET_STREAM, STOP_SENDING and CONNECTION_CLOSE the broker sends.

MQTT packets are `mqttraw`'s: encoded and decoded by the same independent codec as the TCP
tests, one byte stream per QUIC stream.

`Relay` stands between one client and the broker: it can drop datagrams (seeded, so each run
makes the same decisions in the same order), capture the client's first flight and replay it
from another port, or move its upstream socket to a new port (NAT rebinding).
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from dataclasses import dataclass, field

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.logger import QuicLogger
from aioquic.tls import SessionTicket

import mqttraw
from mqttraw import (CONNACK, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC, SUBACK, TYPE_NAMES,
                     UNSUBACK, V5, Packet)

# Seconds to wait for a packet or an event: an upper bound that only a hang reaches.
TIMEOUT = 15.0
ALPN = "mqtt"
# QUIC transport error codes (RFC 9000 section 20.1).
STREAM_LIMIT_ERROR = 0x04


class StreamReset(Exception):
    """The broker reset the stream (RESET_STREAM); `code` is its application error code."""

    def __init__(self, stream_id: int, code: int):
        super().__init__(f"stream {stream_id} reset by the broker with code {code:#x}")
        self.code = code


class ConnectionClosed(Exception):
    """The QUIC connection ended; `event` is aioquic's ConnectionTerminated."""

    def __init__(self, event: events.ConnectionTerminated):
        super().__init__(f"connection closed: code {event.error_code:#x} "
                         f"frame {event.frame_type} {event.reason_phrase!r}")
        self.event = event


def unsubscribe(packet_id: int, filters: list[str], *, version: int = V5) -> bytes:
    """UNSUBSCRIBE (MQTT 5.0 section 3.10)."""
    body = mqttraw.u16(packet_id)
    if version == V5:
        body += mqttraw.properties(None)
    for f in filters:
        body += mqttraw.string(f)
    return mqttraw.packet(mqttraw.UNSUBSCRIBE, 2, body)


class _Connection(QuicConnection):
    """aioquic's connection, able to withhold flow-control credit on chosen streams."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Streams whose receive window never grows: what a client that stops reading a stream
        # does to its sender. aioquic otherwise grows it as data arrives, read or not.
        self.stalled: set[int] = set()

    def _write_stream_limits(self, builder, space, stream) -> None:
        if stream.stream_id in self.stalled:
            return
        super()._write_stream_limits(builder, space, stream)


class Stream:
    """One client-initiated bidirectional stream: MQTT packets out, decoded packets in."""

    def __init__(self, client: QuicClient, stream_id: int):
        self.client = client
        self.id = stream_id
        self.version = client.version
        self.buf = b""
        self.packets: deque[Packet] = deque()
        self.received_bytes = 0
        # What the broker did to the stream: RESET_STREAM's code, STOP_SENDING's code, FIN.
        self.reset_code: int | None = None
        self.stop_code: int | None = None
        self.finished = False
        self._wake = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Stream {self.id}>"

    # --- input from aioquic ---

    def _data(self, data: bytes, end: bool) -> None:
        self.received_bytes += len(data)
        self.buf += data
        while True:
            packet = self._parse()
            if packet is None:
                break
            self.packets.append(packet)
        if end:
            self.finished = True
        self._wake.set()

    def _parse(self) -> Packet | None:
        if len(self.buf) < 2:
            return None
        length, shift, i = 0, 0, 1
        while i < len(self.buf) and i <= 4:
            b = self.buf[i]
            length |= (b & 0x7F) << shift
            shift += 7
            i += 1
            if not b & 0x80:
                if len(self.buf) < i + length:
                    return None
                first, body = self.buf[0], self.buf[i:i + length]
                self.buf = self.buf[i + length:]
                return mqttraw.decode(first, body, self.version)
        return None

    def _reset(self, code: int) -> None:
        self.reset_code = code
        self._wake.set()

    def _stop(self, code: int) -> None:
        self.stop_code = code
        self._wake.set()

    # --- output ---

    def send(self, data: bytes, end: bool = False) -> None:
        self.client.conn.send_stream_data(self.id, data, end_stream=end)
        self.client.transmit()

    def finish(self) -> None:
        """Sends FIN: the client is done with this stream."""
        self.send(b"", end=True)

    def reset(self, code: int = 0) -> None:
        """Abandons the stream both ways: RESET_STREAM and STOP_SENDING."""
        self.client.conn.reset_stream(self.id, code)
        self.client.conn.stop_stream(self.id, code)
        self.client.transmit()

    def stall(self) -> None:
        """Stops granting the broker flow-control credit on this stream, as a client that
        stopped reading it would: the broker can send what the window allows, no more."""
        self.client.conn.stalled.add(self.id)

    @property
    def window(self) -> int:
        """Bytes the broker may send on this stream in all (the window granted so far)."""
        return self.client.conn._streams[self.id].max_stream_data_local

    def unstall(self) -> None:
        """Grants credit again (with the next packet the client sends)."""
        self.client.conn.stalled.discard(self.id)

    @property
    def blocked(self) -> bool:
        """aioquic holds the stream back: the broker's stream limit does not allow it yet."""
        stream = self.client.conn._streams.get(self.id)
        return stream is not None and stream.is_blocked

    # --- reading ---

    async def recv(self, timeout: float = TIMEOUT) -> Packet:
        """The next packet on this stream; StreamReset, ConnectionClosed, or TimeoutError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.packets:
                return self.packets.popleft()
            if self.reset_code is not None:
                raise StreamReset(self.id, self.reset_code)
            if self.client.terminated is not None:
                raise ConnectionClosed(self.client.terminated)
            if self.finished:
                raise EOFError(f"stream {self.id} finished by the broker")
            self._wake.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"nothing on stream {self.id} in {timeout} s")
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def wait_reset(self, timeout: float = TIMEOUT) -> int:
        """Waits for the broker's RESET_STREAM; returns its code and the packets before."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.reset_code is None:
            if self.client.terminated is not None:
                raise ConnectionClosed(self.client.terminated)
            self._wake.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"stream {self.id} not reset in {timeout} s")
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return self.reset_code

    def pending(self) -> list[Packet]:
        """The packets received and not yet read, taken."""
        out = list(self.packets)
        self.packets.clear()
        return out

    async def expect(self, ptype: int, timeout: float = TIMEOUT) -> Packet:
        p = await self.recv(timeout)
        assert p.type == ptype, f"stream {self.id}: expected {TYPE_NAMES[ptype]}, got {p!r}"
        return p

    async def expect_among(self, ptype: int,
                           timeout: float = TIMEOUT) -> tuple[Packet, list[Packet]]:
        """The first packet of type `ptype`, and the packets that came before it."""
        before = []
        while True:
            p = await self.recv(timeout)
            if p.type == ptype:
                return p, before
            before.append(p)

    async def ack(self, ptype: int, packet_id: int, timeout: float = TIMEOUT) -> Packet:
        """The acknowledgement of type `ptype` for `packet_id` on this stream. Packets that come
        before it (deliveries interleaved with it) stay queued, in order, for `recv`."""
        before = []
        try:
            while True:
                p = await self.recv(timeout)
                if p.type == ptype and p.packet_id == packet_id:
                    return p
                before.append(p)
        finally:
            self.packets.extendleft(reversed(before))

    async def until_publish(self, topic: str, payload: bytes,
                            timeout: float = TIMEOUT) -> list[Packet]:
        """Packets before the PUBLISH of `payload` on `topic` (a marker), acknowledging a QoS 1
        marker; like `RawClient.until_publish`."""
        before = []
        while True:
            p = await self.recv(timeout)
            if p.type == PUBLISH and (p.topic, p.payload) == (topic, payload):
                if p.qos == 1:
                    self.puback(p.packet_id)
                return before
            before.append(p)

    async def ping_fence(self) -> list[Packet]:
        """PINGREQ; the packets that came on this stream before the PINGRESP."""
        self.send(mqttraw.pingreq())
        _, before = await self.expect_among(PINGRESP)
        return before

    # --- MQTT exchanges ---

    async def connect(self, client_id: str = "", **kwargs) -> Packet:
        self.send(mqttraw.connect(client_id, version=self.version, **kwargs))
        return await self.expect(CONNACK)

    async def subscribe(self, filters: list[tuple[str, int]], props: dict | None = None) -> Packet:
        pid = self.client.packet_id()
        self.send(mqttraw.subscribe(pid, filters, version=self.version, props=props))
        return await self.ack(SUBACK, pid)

    async def unsubscribe(self, filters: list[str]) -> Packet:
        pid = self.client.packet_id()
        self.send(unsubscribe(pid, filters, version=self.version))
        return await self.ack(UNSUBACK, pid)

    async def publish(self, topic: str, payload: bytes = b"", qos: int = 0,
                      **kwargs) -> Packet | None:
        """Publishes; QoS 1 returns the PUBACK, QoS 2 the PUBCOMP after PUBREC and PUBREL,
        each expected on this stream (deliveries that come between stay queued)."""
        pid = self.client.packet_id() if qos else None
        self.send(mqttraw.publish(topic, payload, qos=qos, packet_id=pid, version=self.version,
                                  **kwargs))
        if qos == 1:
            return await self.ack(PUBACK, pid)
        if qos == 2:
            await self.ack(PUBREC, pid)
            self.send(mqttraw.pubrel(pid, version=self.version))
            return await self.ack(PUBCOMP, pid)
        return None

    def puback(self, packet_id: int) -> None:
        self.send(mqttraw.puback(packet_id, version=self.version))

    async def receive_publish(self, timeout: float = TIMEOUT) -> Packet:
        """The next PUBLISH, acknowledged (QoS 1: PUBACK; QoS 2: PUBREC, PUBREL, PUBCOMP)."""
        p = await self.expect(PUBLISH, timeout)
        if p.qos == 1:
            self.puback(p.packet_id)
        elif p.qos == 2:
            self.send(mqttraw.pubrec(p.packet_id, version=self.version))
            await self.ack(mqttraw.PUBREL, p.packet_id, timeout)
            self.send(mqttraw.pubcomp(p.packet_id, version=self.version))
        return p

    def disconnect(self, **kwargs) -> None:
        self.send(mqttraw.disconnect(version=self.version, **kwargs))


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, on_datagram):
        self.on_datagram = on_datagram

    def datagram_received(self, data, addr):
        self.on_datagram(data, addr)


@dataclass
class QuicClient:
    """An MQTT-over-QUIC client on aioquic's sans-IO connection and a UDP socket of its own.

    `await open()` sends the first Initial; streams are made with `stream()` (the first is the
    control stream). With a `session_ticket`, whatever is sent before the handshake completes
    goes as 0-RTT early data in the first flight.
    """

    port: int
    ca_file: str
    host: str = "127.0.0.1"
    version: int = V5
    session_ticket: SessionTicket | None = None
    server_name: str = "localhost"
    # Bytes each stream may receive before the client grants more (aioquic's default: 1 MiB).
    max_stream_data: int | None = None
    alpn: str = ALPN
    idle_timeout: float = 60.0

    conn: _Connection = field(init=False)
    streams: dict[int, Stream] = field(init=False, default_factory=dict)
    tickets: list[SessionTicket] = field(init=False, default_factory=list)
    handshake: events.HandshakeCompleted | None = field(init=False, default=None)
    terminated: events.ConnectionTerminated | None = field(init=False, default=None)
    logger: QuicLogger = field(init=False, default_factory=QuicLogger)

    def __post_init__(self):
        config = QuicConfiguration(is_client=True, alpn_protocols=[self.alpn],
                                   server_name=self.server_name, idle_timeout=self.idle_timeout,
                                   quic_logger=self.logger)
        if self.max_stream_data is not None:
            config.max_stream_data = self.max_stream_data
        config.load_verify_locations(cafile=self.ca_file)
        if self.session_ticket is not None:
            config.session_ticket = self.session_ticket
        self.conn = _Connection(configuration=config,
                                session_ticket_handler=self.tickets.append)
        self.transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._next_id = 1
        self._wake = asyncio.Event()
        self._pings: dict[int, asyncio.Event] = {}
        self._ping_uid = 0
        self.loop = asyncio.get_running_loop()

    # --- life cycle ---

    async def open(self) -> QuicClient:
        """Binds a UDP socket on a free port and sends the first flight."""
        self.transport = await self._bind()
        self.conn.connect((self.host, self.port), now=self.loop.time())
        self.transmit()
        return self

    async def _bind(self) -> asyncio.DatagramTransport:
        transport, _ = await self.loop.create_datagram_endpoint(
            lambda: _Datagrams(self._datagram), local_addr=(self.host, 0))
        return transport

    @property
    def local_port(self) -> int:
        return self.transport.get_extra_info("sockname")[1]

    async def wait_handshake(self, timeout: float = TIMEOUT) -> events.HandshakeCompleted:
        await self._until(lambda: self.handshake is not None or self.terminated is not None,
                          timeout, "handshake")
        if self.handshake is None:
            raise ConnectionClosed(self.terminated)
        return self.handshake

    async def wait_ticket(self, timeout: float = TIMEOUT) -> SessionTicket:
        """The first session ticket the broker sent (NewSessionTicket, after the handshake)."""
        await self._until(lambda: self.tickets or self.terminated is not None, timeout,
                          "session ticket")
        if not self.tickets:
            raise ConnectionClosed(self.terminated)
        return self.tickets[0]

    async def wait_closed(self, timeout: float = TIMEOUT) -> events.ConnectionTerminated:
        await self._until(lambda: self.terminated is not None, timeout, "connection close")
        return self.terminated

    async def quic_ping(self, timeout: float = TIMEOUT) -> None:
        """A QUIC PING, acknowledged: the broker's QUIC stack has everything sent before."""
        self._ping_uid += 1
        uid = self._ping_uid
        self._pings[uid] = asyncio.Event()
        self.conn.send_ping(uid)
        self.transmit()
        await asyncio.wait_for(self._pings[uid].wait(), timeout)

    async def _until(self, cond, timeout: float, what: str) -> None:
        deadline = self.loop.time() + timeout
        while not cond():
            self._wake.clear()
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no {what} in {timeout} s")
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def close(self, code: int = 0) -> None:
        """Closes the connection (CONNECTION_CLOSE) and the socket."""
        if self.transport is None:
            return
        if self.terminated is None:
            self.conn.close(error_code=code)
            self.transmit()
        if self._timer is not None:
            self._timer.cancel()
        self.transport.close()
        self.transport = None

    async def migrate(self) -> int:
        """Moves to a new local port with a new connection ID (active migration); the old
        socket is closed. Returns the new port."""
        old = self.transport
        self.transport = await self._bind()
        old.close()
        self.conn.change_connection_id()
        self.transmit()
        return self.local_port

    # --- streams ---

    def stream(self) -> Stream:
        """A new bidirectional stream (nothing is sent until the test sends on it)."""
        sid = self.conn.get_next_available_stream_id()
        # aioquic creates the stream on first send; reserve the id now.
        self.conn._get_or_create_stream_for_send(sid)
        s = self.streams[sid] = Stream(self, sid)
        return s

    def packet_id(self) -> int:
        pid, self._next_id = self._next_id, self._next_id % 65535 + 1
        return pid

    # --- aioquic plumbing ---

    def _datagram(self, data: bytes, addr) -> None:
        if self.transport is None:
            return
        self.conn.receive_datagram(data, addr, now=self.loop.time())
        self._events()
        self.transmit()

    def _events(self) -> None:
        while (ev := self.conn.next_event()) is not None:
            if isinstance(ev, events.StreamDataReceived):
                s = self.streams.get(ev.stream_id)
                if s is None:
                    s = self.streams[ev.stream_id] = Stream(self, ev.stream_id)
                s._data(ev.data, ev.end_stream)
            elif isinstance(ev, events.StreamReset):
                if (s := self.streams.get(ev.stream_id)) is not None:
                    s._reset(ev.error_code)
            elif isinstance(ev, events.StopSendingReceived):
                if (s := self.streams.get(ev.stream_id)) is not None:
                    s._stop(ev.error_code)
            elif isinstance(ev, events.HandshakeCompleted):
                self.handshake = ev
            elif isinstance(ev, events.ConnectionTerminated):
                self.terminated = ev
                for s in self.streams.values():
                    s._wake.set()
            elif isinstance(ev, events.PingAcknowledged):
                if (p := self._pings.get(ev.uid)) is not None:
                    p.set()
        self._wake.set()

    def transmit(self) -> None:
        if self.transport is None:
            return
        now = self.loop.time()
        for data, addr in self.conn.datagrams_to_send(now=now):
            self.transport.sendto(data, addr)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self.conn.get_timer()
        if at is not None:
            self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        self.conn.handle_timer(now=self.loop.time())
        self._events()
        self.transmit()

    # --- what aioquic saw ---

    def logged_packets(self, direction: str = "sent") -> list[dict]:
        """aioquic's qlog events `transport:packet_sent` (or `_received`): header and frames."""
        out = []
        for trace in self.logger.to_dict()["traces"]:
            for ev in trace["events"]:
                if ev["name"] == f"transport:packet_{direction}":
                    out.append(ev["data"])
        return out


async def connected(port: int, ca_file: str, client_id: str, **kwargs) -> tuple[QuicClient,
                                                                                 Stream]:
    """A client after the handshake and a successful CONNECT on its control stream."""
    connect_args = {k: kwargs.pop(k) for k in ("clean", "props", "will", "keepalive",
                                                "username", "password") if k in kwargs}
    c = QuicClient(port, ca_file, **kwargs)
    await c.open()
    await c.wait_handshake()
    control = c.stream()
    ack = await control.connect(client_id, **connect_args)
    assert ack.reason == 0, f"CONNECT refused: {ack!r}"
    c.connack = ack
    return c, control


# --- relays -----------------------------------------------------------------------------------

class Relay:
    """A UDP relay between one client and the broker.

    The client sends to `relay.port`; the relay forwards from an upstream socket of its own,
    so the broker sees the relay's address. `loss` drops that share of datagrams each way,
    decided by a random generator seeded per direction: the same datagram sequence gets the
    same decisions. Until the broker's first datagram has come back, what the client sends is
    kept in `first_flight`.
    """

    def __init__(self, upstream: tuple[str, int], *, loss: float = 0.0, seed: int = 0):
        self.upstream = upstream
        self.loss = loss
        self.rng_up = random.Random(seed)
        self.rng_down = random.Random(seed + 1)
        self.first_flight: list[bytes] = []
        self.seen_broker = False
        self.client_addr = None
        self.up_forwarded = self.up_dropped = 0
        self.down_forwarded = self.down_dropped = 0
        # Datagrams the broker sent to each upstream port the relay used.
        self.down_by_port: dict[int, int] = {}
        self.listen: asyncio.DatagramTransport | None = None
        self.up: asyncio.DatagramTransport | None = None
        self.loop = asyncio.get_running_loop()

    async def start(self) -> Relay:
        self.listen, _ = await self.loop.create_datagram_endpoint(
            lambda: _Datagrams(self._from_client), local_addr=("127.0.0.1", 0))
        self.up = await self._upstream()
        return self

    @property
    def port(self) -> int:
        return self.listen.get_extra_info("sockname")[1]

    @property
    def upstream_port(self) -> int:
        return self.up.get_extra_info("sockname")[1]

    async def _upstream(self) -> asyncio.DatagramTransport:
        holder: dict = {}

        def from_broker(data, addr):
            port = holder["t"].get_extra_info("sockname")[1]
            self.down_by_port[port] = self.down_by_port.get(port, 0) + 1
            self._from_broker(data, holder["t"])

        t, _ = await self.loop.create_datagram_endpoint(
            lambda: _Datagrams(from_broker), local_addr=("127.0.0.1", 0))
        holder["t"] = t
        return t

    def _from_client(self, data: bytes, addr) -> None:
        self.client_addr = addr
        if not self.seen_broker:
            self.first_flight.append(data)
        if self.loss and self.rng_up.random() < self.loss:
            self.up_dropped += 1
            return
        self.up_forwarded += 1
        self.up.sendto(data, self.upstream)

    def _from_broker(self, data: bytes, via: asyncio.DatagramTransport) -> None:
        if via is not self.up:
            return  # to a socket the relay has left
        self.seen_broker = True
        if self.loss and self.rng_down.random() < self.loss:
            self.down_dropped += 1
            return
        self.down_forwarded += 1
        if self.client_addr is not None:
            self.listen.sendto(data, self.client_addr)

    async def rebind(self) -> int:
        """Moves upstream to a new socket on a new port (a NAT rebinding); the old one closes.
        Returns the new port."""
        old = self.up
        self.up = await self._upstream()
        old.close()
        return self.upstream_port

    def close(self) -> None:
        for t in (self.listen, self.up):
            if t is not None:
                t.close()


class Probe:
    """A UDP socket that sends datagrams to the broker and never answers: it only counts (and
    keeps) what comes back."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.sent_bytes = 0
        self.received: list[bytes] = []
        self.times: list[float] = []
        self.started = 0.0
        self.transport: asyncio.DatagramTransport | None = None
        self._wake = asyncio.Event()

    async def open(self) -> Probe:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: _Datagrams(self._datagram), local_addr=("127.0.0.1", 0))
        return self

    def _datagram(self, data: bytes, addr) -> None:
        self.received.append(data)
        # When each came, in seconds since the first was sent (for failure messages).
        self.times.append(round(asyncio.get_running_loop().time() - self.started, 3))
        self._wake.set()

    @property
    def received_bytes(self) -> int:
        return sum(len(d) for d in self.received)

    def send(self, data: bytes) -> None:
        if not self.sent_bytes:
            self.started = asyncio.get_running_loop().time()
        self.sent_bytes += len(data)
        self.transport.sendto(data, self.target)

    async def wait_datagrams(self, n: int, timeout: float = TIMEOUT) -> list[bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.received) < n:
            self._wake.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{len(self.received)} datagrams of {n} in {timeout} s")
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return self.received

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def first_flight(ca_file: str, server_name: str = "localhost") -> list[bytes]:
    """The datagrams of an aioquic client's first flight (its Initial with the ClientHello),
    as a fresh client would send them, without sending them."""
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name=server_name)
    config.load_verify_locations(cafile=ca_file)
    conn = QuicConnection(configuration=config)
    conn.connect(("127.0.0.1", 9), now=0.0)
    return [data for data, _ in conn.datagrams_to_send(now=0.0)]
