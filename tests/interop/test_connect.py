"""Connecting: client identifiers, keep alive, session takeover, and what the broker does with
a CONNECT it cannot accept or a client that does not start with CONNECT."""

import time

import pytest

import mqttraw
from mqttraw import CONNACK, DISCONNECT, PINGRESP, V311, V5
from pahoclient import BOTH_VERSIONS, persistent, props

# --- client identifiers --------------------------------------------------------------------


def test_v311_empty_client_id_with_clean_session(raw):
    r = raw("", version=V311, clean=True)
    assert r.connack.raw == b"\x20\x02\x00\x00"
    r.subscribe([("id/t", 1)])


def test_v311_empty_client_id_without_clean_session_is_rejected(raw):
    r = raw(version=V311, connect=False)
    r.send(mqttraw.connect("", version=V311, clean=False))
    # CONNACK return code 0x02, identifier rejected [MQTT-3.1.3-8], then close.
    assert r.expect(CONNACK).raw == b"\x20\x02\x00\x02"
    assert r.expect_closed() == []


def test_v5_empty_client_id_gets_an_assigned_identifier(client):
    a = client("", version=V5)
    b = client("", version=V5)
    id_a = getattr(a.connack_properties, "AssignedClientIdentifier", None)
    id_b = getattr(b.connack_properties, "AssignedClientIdentifier", None)
    assert id_a and id_b and id_a != id_b
    # The assigned identifier names a real session: a subscription works.
    a.subscribe("id/t", 1)
    b.publish("id/t", b"x", 1)
    assert a.recv().payload == b"x"


def test_v5_assigned_identifier_can_resume_its_session(client):
    first = client("", version=V5, properties=props("CONNECT", SessionExpiryInterval=60))
    assigned = first.connack_properties.AssignedClientIdentifier
    first.subscribe("id/resume", 1)
    first.disconnect()

    again = client(assigned, version=V5, clean=False,
                   properties=props("CONNECT", SessionExpiryInterval=60))
    assert again.session_present
    client(version=V5).publish("id/resume", b"still subscribed", 1)
    assert again.recv().payload == b"still subscribed"


# --- keep alive ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])
def test_silent_client_is_disconnected_after_one_and_a_half_keepalives(client, raw, version):
    watcher = client(version=5)
    watcher.subscribe("ka/will", 1)
    silent = raw(version=version, connect=False)
    sent = time.monotonic()  # the CONNECT, the client's last packet, leaves after this
    silent.send(mqttraw.connect("silent", version=version, keepalive=1,
                                will=mqttraw.Will("ka/will", b"timed out", 1)))
    assert silent.expect(CONNACK).reason == 0

    packets = silent.expect_closed()
    elapsed = time.monotonic() - sent

    # [MQTT-3.1.2-24]: after one and a half keep alive periods of silence, not (much) earlier.
    # How much later depends on the machine's load: only a hang reaches the timeout.
    assert elapsed >= 1.4, elapsed
    if version == V5:
        assert [(p.type, p.reason) for p in packets] == [(DISCONNECT, 0x8D)]  # Keep Alive timeout
    else:
        assert packets == []
    assert watcher.recv().payload == b"timed out"


def test_pings_keep_a_quiet_client_connected(raw):
    r = raw(version=V5, keepalive=2)
    start = time.monotonic()
    # Twice the 3 s limit, a ping every half second: 2.5 s of slack for a slow machine.
    while time.monotonic() - start < 6:
        time.sleep(0.5)
        r.send(mqttraw.pingreq())
        assert r.expect(PINGRESP).type == PINGRESP


@pytest.mark.broker_args("--max-keepalive", "10")
def test_server_keep_alive_caps_a_v5_clients_keep_alive(client):
    c = client(version=V5, keepalive=60)
    assert getattr(c.connack_properties, "ServerKeepAlive", None) == 10
    zero = client(version=V5, keepalive=0)  # "no keep alive" is above any maximum too
    assert getattr(zero.connack_properties, "ServerKeepAlive", None) == 10
    fine = client(version=V5, keepalive=5)
    assert getattr(fine.connack_properties, "ServerKeepAlive", None) is None


@pytest.mark.broker_args("--max-keepalive", "10")
def test_max_keepalive_for_v311_clients(raw):
    # 3.1.1 has no way to tell a client its keep alive; like Mosquitto, refuse with 0x02.
    over = raw(version=V311, connect=False)
    over.send(mqttraw.connect("ka-over", version=V311, keepalive=60))
    assert over.expect(CONNACK).raw == b"\x20\x02\x00\x02"
    ok = raw("ka-ok", version=V311, keepalive=10)
    assert ok.connack.reason == 0


@pytest.mark.broker_args("--max-keepalive", "1")
def test_server_keep_alive_is_enforced(raw):
    r = raw(version=V5, connect=False)
    sent = time.monotonic()
    r.send(mqttraw.connect("server-ka", keepalive=60))
    assert r.expect(CONNACK).properties.get("ServerKeepAlive") == 1
    packets = r.expect_closed()
    assert time.monotonic() - sent >= 1.4  # one and a half Server Keep Alive periods
    assert [(p.type, p.reason) for p in packets] == [(DISCONNECT, 0x8D)]


# --- takeover ------------------------------------------------------------------------------


@BOTH_VERSIONS
def test_second_connection_with_same_id_takes_over(client, version):
    first = client("same-id", version=version, **persistent(version))
    first.subscribe("takeover/t", 1)

    second = client("same-id", version=version, **persistent(version))

    reason = first.wait_disconnected()
    if version == V5:
        assert reason.value == 0x8E  # Session taken over
    assert second.session_present  # it took the live session over, subscription included
    client(version=version).publish("takeover/t", b"to the new one", 1)
    assert second.recv().payload == b"to the new one"
    assert first.messages.empty()  # closed before the message was published


def test_takeover_of_a_raw_v5_connection_sends_disconnect_0x8e(raw):
    first = raw("taken", version=V5)
    raw("taken", version=V5)
    assert [(p.type, p.reason) for p in first.expect_closed()] == [(DISCONNECT, 0x8E)]


# --- bad starts ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,level", [("MQTT", 3), ("MQTT", 2), ("MQIsdp", 4)])
def test_v3_connect_with_bad_protocol_level_gets_connack_0x01(raw, name, level):
    r = raw(connect=False)
    r.send(mqttraw.connect("bad-level", version=level, protocol_name=name))
    # 3.1.1 return code 0x01: unacceptable protocol version [MQTT-3.1.2-2].
    assert r.expect(CONNACK).raw == b"\x20\x02\x00\x01"
    assert r.expect_closed() == []


def test_v5_connect_with_a_property_not_allowed_gets_connack_error(raw):
    r = raw(version=V5, connect=False)
    # Topic Alias is a PUBLISH property; in CONNECT it is a Protocol Error (or malformed).
    r.send(mqttraw.connect("bad-prop", version=V5, props={"TopicAlias": 1}))
    connack = r.expect(CONNACK)
    assert connack.reason in (0x81, 0x82), connack
    assert r.expect_closed() == []


def test_v5_connect_with_truncated_body_gets_connack_malformed(raw):
    r = raw(version=V5, connect=False)
    good = mqttraw.connect("truncated", version=V5)
    # Same bytes, but the client identifier's length claims 10 more bytes than there are.
    body = bytearray(good[2:])
    id_len_at = len(body) - len("truncated") - 2
    body[id_len_at + 1] += 10
    r.send(bytes([good[0]]) + mqttraw.varint(len(body)) + bytes(body))
    connack = r.expect(CONNACK)
    assert connack.reason == 0x81, connack  # Malformed Packet
    assert r.expect_closed() == []


@pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])
def test_connect_with_reserved_flag_set_is_refused(raw, version):
    r = raw(version=version, connect=False)
    r.send(mqttraw.connect("reserved", version=version, reserved_flag=True))
    # [MQTT-3.1.2-3]: malformed; the broker closes (a CONNACK, if any, must be an error).
    packets = r.expect_closed()
    assert all(p.type == CONNACK and p.reason != 0 for p in packets), packets


@pytest.mark.parametrize("first", [
    mqttraw.pingreq(),
    mqttraw.publish("no/connect", b"x", version=V311),
    mqttraw.subscribe(1, [("no/connect", 0)], version=V311),
], ids=["pingreq", "publish", "subscribe"])
def test_first_packet_not_connect_closes_the_connection(raw, client, first):
    watcher = client(version=V5)
    watcher.subscribe("no/connect", 0)
    r = raw(connect=False)
    r.send(first)
    # [MQTT-3.1.0-1]: nothing in reply, and nothing published.
    assert r.expect_closed() == []
    assert watcher.collect_until_marker(client(version=V5)) == []


def test_second_connect_is_a_protocol_error(raw):
    r = raw(version=V5)
    r.send(mqttraw.connect("again", version=V5))
    assert [(p.type, p.reason) for p in r.expect_closed()] == [(DISCONNECT, 0x82)]


@pytest.mark.broker_config("connect_timeout = 1")
def test_connect_timeout_is_configurable(raw):
    start = time.monotonic()  # before the TCP connection, so before the broker accepts it
    r = raw(connect=False)
    assert r.expect_closed() == []
    assert time.monotonic() - start >= 0.8  # not before the timeout; later only if slow
