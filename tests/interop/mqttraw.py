"""A tiny, independent MQTT 3.1.1 / 5.0 encoder and decoder over a plain socket.

The interop tests use it where a library client would hide what is on the wire: a client that
stops talking, one that never acknowledges, a malformed CONNECT, or checking that a PUBLISH
really carries an empty topic and a topic alias. It is written from the specification, not
from the broker's code, so it also serves as a second opinion on the broker's codec.

Only what the tests need is here; every function is a direct transcription of the packet
layout in the specification (section numbers in the docstrings).
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

# Packet types (MQTT 5.0 section 2.1.2).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = (
    8, 9, 10, 11, 12, 13, 14, 15,
)
TYPE_NAMES = {
    1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
    7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
    12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH",
}

V311, V5 = 4, 5

# Seconds to wait for a packet: an upper bound that only a hang reaches.
TIMEOUT = 30.0

# Properties (section 2.2.2.2): identifier -> (name, wire type). Names are paho's.
PROPERTIES = {
    0x01: ("PayloadFormatIndicator", "byte"),
    0x02: ("MessageExpiryInterval", "u32"),
    0x03: ("ContentType", "str"),
    0x08: ("ResponseTopic", "str"),
    0x09: ("CorrelationData", "bin"),
    0x0B: ("SubscriptionIdentifier", "varint"),
    0x11: ("SessionExpiryInterval", "u32"),
    0x12: ("AssignedClientIdentifier", "str"),
    0x13: ("ServerKeepAlive", "u16"),
    0x15: ("AuthenticationMethod", "str"),
    0x16: ("AuthenticationData", "bin"),
    0x17: ("RequestProblemInformation", "byte"),
    0x18: ("WillDelayInterval", "u32"),
    0x19: ("RequestResponseInformation", "byte"),
    0x1A: ("ResponseInformation", "str"),
    0x1C: ("ServerReference", "str"),
    0x1F: ("ReasonString", "str"),
    0x21: ("ReceiveMaximum", "u16"),
    0x22: ("TopicAliasMaximum", "u16"),
    0x23: ("TopicAlias", "u16"),
    0x24: ("MaximumQoS", "byte"),
    0x25: ("RetainAvailable", "byte"),
    0x26: ("UserProperty", "pair"),
    0x27: ("MaximumPacketSize", "u32"),
    0x28: ("WildcardSubscriptionAvailable", "byte"),
    0x29: ("SubscriptionIdentifierAvailable", "byte"),
    0x2A: ("SharedSubscriptionAvailable", "byte"),
}
PROPERTY_IDS = {name: (ident, kind) for ident, (name, kind) in PROPERTIES.items()}
# Properties that may appear more than once; decoded as lists.
REPEATABLE = {"UserProperty", "SubscriptionIdentifier"}


# --- primitive encoders (section 1.5) -------------------------------------------------------

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def binary(b: bytes) -> bytes:
    return u16(len(b)) + b


def string(s: str | bytes) -> bytes:
    return binary(s.encode() if isinstance(s, str) else s)


def properties(props: dict | None) -> bytes:
    """Encodes a property block: its length, then each property. Lists repeat a property."""
    body = bytearray()
    for name, value in (props or {}).items():
        ident, kind = PROPERTY_IDS[name]
        values = value if name in REPEATABLE and isinstance(value, list) else [value]
        for v in values:
            body += varint(ident)
            if kind == "byte":
                body.append(v)
            elif kind == "u16":
                body += u16(v)
            elif kind == "u32":
                body += u32(v)
            elif kind == "varint":
                body += varint(v)
            elif kind == "str":
                body += string(v)
            elif kind == "bin":
                body += binary(v)
            elif kind == "pair":
                body += string(v[0]) + string(v[1])
    return varint(len(body)) + bytes(body)


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    """Fixed header (section 2.1.1) + body."""
    return bytes([(ptype << 4) | flags]) + varint(len(body)) + body


# --- packet encoders -----------------------------------------------------------------------

@dataclass
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: dict | None = None


def connect(client_id: str = "", *, version: int = V5, clean: bool = True, keepalive: int = 60,
            props: dict | None = None, will: Will | None = None, username: str | None = None,
            password: bytes | None = None, protocol_name: str | None = None,
            reserved_flag: bool = False) -> bytes:
    """CONNECT (section 3.1). `protocol_name` and `reserved_flag` exist to build bad ones."""
    flags = (0x02 if clean else 0) | (0x01 if reserved_flag else 0)
    if will:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    name = protocol_name if protocol_name is not None else ("MQIsdp" if version == 3 else "MQTT")
    body = string(name) + bytes([version, flags]) + u16(keepalive)
    if version == V5:
        body += properties(props)
    body += string(client_id)
    if will:
        if version == V5:
            body += properties(will.properties)
        body += string(will.topic) + binary(will.payload)
    if username is not None:
        body += string(username)
    if password is not None:
        body += binary(password)
    return packet(CONNECT, 0, body)


def publish(topic: str, payload: bytes = b"", *, qos: int = 0, retain: bool = False,
            dup: bool = False, packet_id: int | None = None, version: int = V5,
            props: dict | None = None) -> bytes:
    """PUBLISH (section 3.3)."""
    flags = (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = string(topic)
    if qos:
        body += u16(packet_id)
    if version == V5:
        body += properties(props)
    return packet(PUBLISH, flags, body + payload)


def _ack(ptype: int, flags: int, packet_id: int, version: int, reason: int) -> bytes:
    body = u16(packet_id)
    if version == V5 and reason:
        body += bytes([reason])
    return packet(ptype, flags, body)


def puback(packet_id: int, *, version: int = V5, reason: int = 0) -> bytes:
    return _ack(PUBACK, 0, packet_id, version, reason)


def pubrec(packet_id: int, *, version: int = V5, reason: int = 0) -> bytes:
    return _ack(PUBREC, 0, packet_id, version, reason)


def pubrel(packet_id: int, *, version: int = V5) -> bytes:
    return _ack(PUBREL, 2, packet_id, version, 0)


def pubcomp(packet_id: int, *, version: int = V5) -> bytes:
    return _ack(PUBCOMP, 0, packet_id, version, 0)


def subscribe(packet_id: int, filters: list[tuple[str, int]], *, version: int = V5,
              props: dict | None = None) -> bytes:
    """SUBSCRIBE (section 3.8); each filter comes with its options byte (QoS in bits 0-1)."""
    body = u16(packet_id)
    if version == V5:
        body += properties(props)
    for topic_filter, options in filters:
        body += string(topic_filter) + bytes([options])
    return packet(SUBSCRIBE, 2, body)


def pingreq() -> bytes:
    return packet(PINGREQ, 0, b"")


def auth(reason: int, *, method: str | None = None, data: bytes | None = None,
         props: dict | None = None) -> bytes:
    """AUTH (section 3.15): a reason code (0x00 success, 0x18 continue, 0x19 re-authenticate)
    and properties, of which `method` and `data` are Authentication Method and Data."""
    props = dict(props or {})
    if method is not None:
        props["AuthenticationMethod"] = method
    if data is not None:
        props["AuthenticationData"] = data
    return packet(AUTH, 0, bytes([reason]) + properties(props))


def disconnect(*, version: int = V5, reason: int = 0, props: dict | None = None) -> bytes:
    body = b""
    if version == V5 and (reason or props):
        body = bytes([reason]) + properties(props)
    return packet(DISCONNECT, 0, body)


# --- decoding ------------------------------------------------------------------------------

@dataclass
class Packet:
    """A decoded packet. Fields not in the packet type keep their defaults."""
    type: int
    flags: int
    raw: bytes
    reason: int | None = None
    session_present: bool = False
    packet_id: int | None = None
    topic: str | None = None
    qos: int = 0
    retain: bool = False
    dup: bool = False
    payload: bytes = b""
    properties: dict = field(default_factory=dict)
    reasons: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return TYPE_NAMES.get(self.type, f"type {self.type}")

    def __repr__(self) -> str:
        interesting = {k: v for k, v in self.__dict__.items()
                       if k not in ("type", "flags", "raw") and v not in (None, b"", [], {}, False)}
        return f"<{self.name} {interesting}>"


class Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated packet")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        return self.binary().decode()

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def properties(self) -> dict:
        end = self.varint() + self.pos
        props: dict = {}
        while self.pos < end:
            name, kind = PROPERTIES[self.varint()]
            value = {"byte": self.byte, "u16": self.u16, "u32": self.u32, "varint": self.varint,
                     "str": self.string, "bin": self.binary,
                     "pair": lambda: (self.string(), self.string())}[kind]()
            if name in REPEATABLE:
                props.setdefault(name, []).append(value)
            elif name in props:
                raise ValueError(f"duplicate property {name}")
            else:
                props[name] = value
        return props


def decode(first: int, body: bytes, version: int) -> Packet:
    """Decodes one packet whose fixed header byte is `first` and whose body is `body`."""
    p = Packet(type=first >> 4, flags=first & 0x0F, raw=bytes([first]) + varint(len(body)) + body)
    r = Reader(body)
    v5 = version == V5
    if p.type == CONNACK:
        p.session_present = bool(r.byte() & 1)
        p.reason = r.byte()
        if v5 and not r.at_end():
            p.properties = r.properties()
    elif p.type == PUBLISH:
        p.dup, p.qos, p.retain = bool(p.flags & 8), (p.flags >> 1) & 3, bool(p.flags & 1)
        p.topic = r.string()
        if p.qos:
            p.packet_id = r.u16()
        if v5:
            p.properties = r.properties()
        p.payload = r.rest()
    elif p.type in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        p.packet_id = r.u16()
        p.reason = 0
        if v5 and not r.at_end():
            p.reason = r.byte()
            if not r.at_end():
                p.properties = r.properties()
    elif p.type in (SUBACK, UNSUBACK):
        p.packet_id = r.u16()
        if v5:
            p.properties = r.properties()
        p.reasons = list(r.rest())
    elif p.type in (DISCONNECT, AUTH):
        p.reason = 0
        if not r.at_end():
            p.reason = r.byte()
            if not r.at_end():
                p.properties = r.properties()
    return p


class Closed(Exception):
    """The broker closed the connection."""


class RawClient:
    """A blocking socket that sends encoded packets and reads decoded ones."""

    def __init__(self, port: int, version: int = V5, host: str = "127.0.0.1",
                 source: str | None = None):
        """Connects the socket (from address `source` if given, say another loopback
        address)."""
        self.version = version
        self.sock = socket.create_connection(
            (host, port), timeout=TIMEOUT, source_address=(source, 0) if source else None)
        self.buf = b""
        self.next_id = 1

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def packet_id(self) -> int:
        pid, self.next_id = self.next_id, self.next_id % 65535 + 1
        return pid

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no packet from the broker in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no packet from the broker in time") from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise Closed("connection closed by the broker")
        self.buf += chunk

    def recv(self, timeout: float = TIMEOUT) -> Packet:
        """The next packet; TimeoutError if none in `timeout` s, Closed on EOF."""
        deadline = time.monotonic() + timeout
        while True:
            # Fixed header: one byte, then a variable byte integer of at most 4 bytes.
            if len(self.buf) >= 2:
                length, shift, i = 0, 0, 1
                while i < len(self.buf) and i <= 4:
                    b = self.buf[i]
                    length |= (b & 0x7F) << shift
                    shift += 7
                    i += 1
                    if not b & 0x80:
                        if len(self.buf) >= i + length:
                            first, body = self.buf[0], self.buf[i:i + length]
                            self.buf = self.buf[i + length:]
                            return decode(first, body, self.version)
                        break
            self._fill(deadline)

    def expect(self, ptype: int, timeout: float = TIMEOUT) -> Packet:
        p = self.recv(timeout)
        assert p.type == ptype, f"expected {TYPE_NAMES[ptype]}, got {p!r}"
        return p

    def expect_among(self, ptype: int, timeout: float = TIMEOUT) -> tuple[Packet, list[Packet]]:
        """Waits for a packet of type `ptype`; returns it and the packets that came before it
        (say, PUBLISHes that arrive while an AUTH exchange is under way)."""
        deadline = time.monotonic() + timeout
        before = []
        while True:
            p = self.recv(max(deadline - time.monotonic(), 0.001))
            if p.type == ptype:
                return p, before
            before.append(p)

    def until_publish(self, topic: str, payload: bytes, timeout: float = TIMEOUT) -> list[Packet]:
        """Packets received before the PUBLISH of `payload` on `topic`: a marker the test sent
        after what it checks, through a subscription of this client at QoS 1 or 2, so that it
        waits in the same queue as the messages before it. A QoS 1 marker is acknowledged."""
        deadline = time.monotonic() + timeout
        before = []
        while True:
            p = self.recv(max(deadline - time.monotonic(), 0.001))
            if p.type == PUBLISH and (p.topic, p.payload) == (topic, payload):
                if p.qos == 1:
                    self.puback(p.packet_id)
                return before
            before.append(p)

    def ping_fence(self) -> list[Packet]:
        """Sends PINGREQ; returns the packets that came before the PINGRESP. The broker answers
        once it has read the PINGREQ, so anything it had already decided to send (say, messages
        it held when the receive maximum was not yet reached) comes first."""
        self.send(pingreq())
        p, before = self.expect_among(PINGRESP)
        return before

    def expect_silence(self, seconds: float) -> None:
        """Asserts that no packet arrives for `seconds` (and the connection stays open)."""
        try:
            p = self.recv(seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected nothing for {seconds} s, got {p!r}")

    def expect_closed(self, timeout: float = TIMEOUT) -> list[Packet]:
        """Reads until the broker closes the connection; returns the packets read before."""
        packets = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                packets.append(self.recv(max(deadline - time.monotonic(), 0.001)))
            except Closed:
                return packets
            except TimeoutError:
                raise AssertionError(
                    f"connection still open after {timeout} s; got {packets!r}") from None

    # Conveniences for the common exchanges.

    def connect(self, client_id: str = "", **kwargs) -> Packet:
        self.send(connect(client_id, version=self.version, **kwargs))
        return self.expect(CONNACK)

    def subscribe(self, filters: list[tuple[str, int]], props: dict | None = None) -> Packet:
        pid = self.packet_id()
        self.send(subscribe(pid, filters, version=self.version, props=props))
        ack = self.expect(SUBACK)
        assert ack.packet_id == pid
        return ack

    def publish(self, topic: str, payload: bytes = b"", qos: int = 0, **kwargs) -> Packet | None:
        """Publishes; for QoS 1 waits for and returns the PUBACK."""
        pid = self.packet_id() if qos else None
        self.send(publish(topic, payload, qos=qos, packet_id=pid, version=self.version, **kwargs))
        if qos == 1:
            ack = self.expect(PUBACK)
            assert ack.packet_id == pid
            return ack
        return None

    def puback(self, packet_id: int) -> None:
        self.send(puback(packet_id, version=self.version))
