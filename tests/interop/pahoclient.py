"""paho-mqtt made blocking: `PahoClient` turns paho's callbacks into calls that wait, with a
timeout, for what the broker answers. Shared helpers for the tests live here too."""

from __future__ import annotations

import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

# Seconds to wait for anything the broker should do promptly: an upper bound that only a hang
# reaches, however slow and loaded the machine.
TIMEOUT = 30.0

V311, V5 = 4, 5
# Runs a test once per protocol version.
BOTH_VERSIONS = pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])


def persistent(version: int, expiry: int = 3600) -> dict:
    """Connect arguments for a session that outlives the connection: clean session 0 in 3.1.1,
    clean start 0 and a session expiry interval in 5.0."""
    if version == V5:
        return {"clean": False, "properties": props("CONNECT", SessionExpiryInterval=expiry)}
    return {"clean": False}


@dataclass
class Msg:
    """A received message, with its topic resolved if it came through a topic alias."""
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    properties: Properties | None
    raw_topic: str

    def prop(self, name, default=None):
        if self.properties is None:
            return default
        return getattr(self.properties, name, default)


def props(packet_type, **values) -> Properties:
    """paho Properties for `packet_type` ("PUBLISH", "CONNECT", ...) from keyword arguments."""
    p = Properties(getattr(PacketTypes, packet_type))
    for name, value in values.items():
        setattr(p, name, value)
    return p


class PahoClient:
    """A paho-mqtt client with blocking, time-limited operations.

    Received messages wait in a queue; `recv()` takes the next one. Topic aliases the broker
    sends are resolved here, as a paho application must do itself (paho 2.x does not). paho
    passes messages on in the order of their last packet (PUBLISH, or PUBREL for QoS 2), so
    the tests that check aliases use QoS 1 only.
    """

    def __init__(self, port: int, client_id: str = "", version: int = 5, manual_ack=False,
                 transport: str = "tcp", ca_file: str | None = None):
        self.port = port
        # A CA file turns TLS on (MQTT over TLS, or WebSocket over TLS), trusting that CA.
        self.ca_file = ca_file
        # "tcp", or "websockets" for MQTT over WebSocket on the path /mqtt.
        self.transport = transport
        self.client_id = client_id
        self.version = version
        self.manual_ack = manual_ack
        self.c = None
        self.messages: queue.Queue[Msg] = queue.Queue()
        self.aliases: dict[int, str] = {}
        self.connack = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.disconnect_reason = None
        self.disconnect_properties = None
        self._acks: dict[int, tuple] = {}
        self._cond = threading.Condition()

    # callbacks (paho's network thread)

    def _on_connect(self, c, userdata, flags, reason_code, properties):
        self.connack = (reason_code, flags.session_present, properties)
        self.connected.set()

    def _on_disconnect(self, c, userdata, flags, reason_code, properties):
        self.disconnect_reason = reason_code
        self.disconnect_properties = properties
        self.disconnected.set()

    def _on_message(self, c, userdata, m):
        topic = m.topic
        alias = getattr(m.properties, "TopicAlias", None) if m.properties else None
        if alias is not None:
            if topic:
                self.aliases[alias] = topic
            else:
                topic = self.aliases.get(alias, f"<unknown alias {alias}>")
        self.messages.put(Msg(topic, m.payload, m.qos, bool(m.retain), m.mid, m.properties, m.topic))

    def _on_ack(self, c, userdata, mid, reason_codes, properties):
        with self._cond:
            self._acks[mid] = (reason_codes, properties)
            self._cond.notify_all()

    def _on_publish(self, c, userdata, mid, reason_code, properties):
        with self._cond:
            self._acks[mid] = (reason_code, properties)
            self._cond.notify_all()

    def _wait_ack(self, mid: int, what: str):
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._acks, TIMEOUT):
                raise AssertionError(f"no {what} from the broker within {TIMEOUT} s")
            return self._acks.pop(mid)

    # operations

    def connect(self, clean: bool = True, keepalive: int = 60, properties=None, will=None,
                expect_success: bool = True, username: str | None = None,
                password: str | None = None):
        """Connects and waits for CONNACK; returns (reason code, session present, properties).
        In 3.1.1 paho reports a refusal's return code as the MQTT 5 reason code with the same
        meaning (4 as 0x86 "Bad user name or password", 5 as 0x87 "Not authorized")."""
        if self.version == 5:
            self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 protocol=mqtt.MQTTv5, manual_ack=self.manual_ack,
                                 reconnect_on_failure=False, transport=self.transport)
        else:
            self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 protocol=mqtt.MQTTv311, clean_session=clean,
                                 manual_ack=self.manual_ack, reconnect_on_failure=False,
                                 transport=self.transport)
        if self.transport == "websockets":
            self.c.ws_set_options(path="/mqtt")
        if self.ca_file is not None:
            self.c.tls_set(ca_certs=self.ca_file)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_ack
        self.c.on_unsubscribe = self._on_ack
        self.c.on_publish = self._on_publish
        if username is not None:
            self.c.username_pw_set(username, password)
        if will is not None:
            topic, payload, qos, retain, will_props = will
            self.c.will_set(topic, payload, qos, retain, will_props)
        if self.version == 5:
            self.c.connect("127.0.0.1", self.port, keepalive, clean_start=clean,
                           properties=properties)
        else:
            self.c.connect("127.0.0.1", self.port, keepalive)
        self.c.loop_start()
        assert self.connected.wait(TIMEOUT), f"no CONNACK within {TIMEOUT} s"
        if expect_success:
            assert not self.connack[0].is_failure, f"connection refused: {self.connack[0]}"
        return self.connack

    @property
    def session_present(self) -> bool:
        return bool(self.connack[1])

    @property
    def connack_properties(self):
        return self.connack[2]

    def subscribe(self, topic: str, qos: int = 0, *, no_local=False, retain_as_published=False,
                  retain_handling=0, properties=None) -> list:
        """Subscribes and returns the SUBACK reason codes (as ints)."""
        if self.version == 5:
            opts = SubscribeOptions(qos=qos, noLocal=no_local,
                                    retainAsPublished=retain_as_published,
                                    retainHandling=retain_handling)
            rc, mid = self.c.subscribe(topic, options=opts, properties=properties)
        else:
            rc, mid = self.c.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        codes, _ = self._wait_ack(mid, "SUBACK")
        return [c.value for c in codes]

    def unsubscribe(self, topic: str) -> list:
        rc, mid = self.c.unsubscribe(topic)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        codes, _ = self._wait_ack(mid, "UNSUBACK")
        return [c.value for c in codes] if isinstance(codes, list) else []

    def publish(self, topic: str, payload=b"", qos: int = 0, retain: bool = False,
                properties=None, wait: bool = True):
        """Publishes; for QoS 1 and 2 waits until the flow completes and returns its reason."""
        info = self.c.publish(topic, payload, qos, retain, properties)
        if not wait:
            # Not checked: paho rewrites `rc` once the broker closes the connection, which is
            # what some tests send the message for.
            return info
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish failed: {info.rc}"
        if qos == 0:
            info.wait_for_publish(TIMEOUT)
            return None
        reason, _ = self._wait_ack(info.mid, "PUBACK/PUBCOMP")
        return reason

    def recv(self, timeout: float = TIMEOUT) -> Msg:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout} s") from None

    def recv_n(self, n: int, timeout: float = TIMEOUT) -> list[Msg]:
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < n:
            remaining = deadline - time.monotonic()
            try:
                out.append(self.messages.get(timeout=max(remaining, 0.001)))
            except queue.Empty:
                raise AssertionError(f"got {len(out)} of {n} messages: {out}") from None
        return out

    def assert_no_message(self, seconds: float = 0.5) -> None:
        """For what cannot be fenced with `collect_until_marker`: nothing arrives for a while."""
        try:
            m = self.messages.get(timeout=seconds)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message {m}")

    def collect_until_marker(self, publisher: "PahoClient", topic: str | None = None) -> list[Msg]:
        """Returns every message received before a marker that `publisher` sends after the
        messages under test. Messages from one publisher are delivered in order, so once the
        marker is here, anything the broker was going to deliver has been delivered.

        The marker goes at QoS 2 because paho hands a QoS 2 message to the application only
        at PUBREL, one round trip after the PUBLISH: a QoS 0 or 1 marker could overtake it.
        It goes to a topic of its own, or to `topic`, one this client already subscribes to
        at QoS 1 or 2 (for a client that may not subscribe to more)."""
        payload = f"marker {uuid.uuid4().hex}".encode()
        if topic is None:
            topic = f"marker/{uuid.uuid4().hex}"
            assert self.subscribe(topic, 2) == [2]
        publisher.publish(topic, payload, 2)
        out = []
        while True:
            m = self.recv()
            if (m.topic, m.payload) == (topic, payload):
                return out
            out.append(m)

    def ack(self, mid: int, qos: int = 1) -> None:
        self.c.ack(mid, qos)

    def disconnect(self, reason: int | None = None, properties=None) -> None:
        """Sends DISCONNECT (with `reason` in MQTT 5) and waits for the socket to close."""
        if reason is not None:
            rc = ReasonCode(PacketTypes.DISCONNECT, identifier=reason)
            self.c.disconnect(reasoncode=rc, properties=properties)
        else:
            self.c.disconnect(properties=properties)
        assert self.disconnected.wait(TIMEOUT)
        self.c.loop_stop()

    def wait_disconnected(self, timeout: float = TIMEOUT):
        """Waits for the broker to close the connection; returns its reason code (or None)."""
        assert self.disconnected.wait(timeout), f"still connected after {timeout} s"
        return self.disconnect_reason

    def kill(self) -> None:
        """Drops the TCP connection without DISCONNECT, as a crashed client would."""
        self.c.socket().shutdown(socket.SHUT_RDWR)
        assert self.disconnected.wait(TIMEOUT)
        self.c.loop_stop()

    def stop(self) -> None:
        if self.c is None:
            return
        try:
            if self.c.is_connected():
                self.c.disconnect()
                self.disconnected.wait(1)
        finally:
            self.c.loop_stop()


def wait_until(predicate, timeout: float = TIMEOUT, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
