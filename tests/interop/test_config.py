"""Broker settings a client can observe, graceful shutdown (SIGTERM and SIGINT), and the log
formats."""

import json
import re
import signal
import time
import uuid

import pytest

import mqttraw
from mqttraw import CONNACK, DISCONNECT, PUBLISH, V311, V5
from pahoclient import BOTH_VERSIONS, persistent, props, wait_until

# SUBACK codes for a refused filter: MQTT 5 says why, 3.1.1 has only "failure".
TOPIC_FILTER_INVALID, QUOTA_EXCEEDED, V311_SUBACK_FAILURE = 0x8F, 0x97, 0x80
TOPIC_NAME_INVALID = 0x90


def refused(version, v5_code):
    return v5_code if version == V5 else V311_SUBACK_FAILURE


@pytest.mark.broker_config("max_qos = 1")
def test_max_qos_is_announced_and_caps_subscriptions(client, raw):
    c = client(version=V5)
    assert c.connack_properties.MaximumQoS == 1
    assert c.subscribe("mq/t", 2) == [1]  # granted QoS 1
    v3 = client(version=4)
    assert v3.subscribe("mq/t", 2) == [1]

    # A QoS 2 PUBLISH from a client told the maximum is 1: DISCONNECT 0x9B [MQTT-3.2.2-11].
    r = raw(version=V5)
    r.send(mqttraw.publish("mq/t", b"x", qos=2, packet_id=1))
    assert [(p.type, p.reason) for p in r.expect_closed()] == [(DISCONNECT, 0x9B)]


@pytest.mark.broker_config("retain_available = false")
def test_retain_unavailable_is_announced_and_enforced(client, raw):
    c = client(version=V5)
    assert c.connack_properties.RetainAvailable == 0
    r = raw(version=V5)
    r.send(mqttraw.publish("ra/t", b"x", qos=1, packet_id=1, retain=True))
    assert [(p.type, p.reason) for p in r.expect_closed()] == [(DISCONNECT, 0x9A)]

    # A will with RETAIN is refused at CONNECT [MQTT-3.2.2-13].
    w = raw(version=V5, connect=False)
    w.send(mqttraw.connect("ra-will", will=mqttraw.Will("ra/w", b"x", retain=True)))
    assert w.expect(CONNACK).reason == 0x9A


@pytest.mark.broker_config("max_queued_messages = 3")
@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_offline_queue_is_bounded(client, version):
    sub = client("bounded", version=version, **persistent(version))
    sub.subscribe("bq/t", 1)
    sub.disconnect()
    pub = client(version=version)
    for i in range(10):
        pub.publish("bq/t", str(i).encode(), 1)

    back = client("bounded", version=version, **persistent(version))
    got = [int(m.payload) for m in back.collect_until_marker(pub)]
    assert len(got) == 3, got
    assert got == sorted(got)


def test_shutdown_sends_v5_clients_disconnect_0x8b(broker, raw):
    v5 = raw(version=V5)
    v3 = raw(version=V311)

    assert broker.stop() == 0  # the fixture checks this again

    assert [(p.type, p.reason) for p in v5.expect_closed()] == [(DISCONNECT, 0x8B)]
    assert v3.expect_closed() == []


def test_shutdown_delivers_what_was_already_sent(broker, client, raw):
    sub = raw(version=V5)
    sub.subscribe([("sd/t", 1)])
    pub = client(version=V5)
    sent = [str(i).encode() for i in range(20)]
    for payload in sent:
        pub.publish("sd/t", payload, 1)  # each acknowledged by the broker
    broker.stop()
    packets = sub.expect_closed()
    # Everything the broker acknowledged before shutdown reached the online subscriber (a
    # clean session: nothing can wait for it elsewhere), in order, and then DISCONNECT 0x8B.
    assert [p.payload for p in packets if p.type == PUBLISH] == sent, packets
    assert len(packets) == len(sent) + 1, packets
    assert (packets[-1].type, packets[-1].reason) == (DISCONNECT, 0x8B)


def test_sigint_shuts_down_gracefully_like_sigterm(broker, client, raw):
    v5 = raw(version=V5)
    v3 = raw(version=V311)
    sub = raw(version=V5)
    sub.subscribe([("si/t", 1)])
    pub = client(version=V5)
    sent = [str(i).encode() for i in range(5)]
    for payload in sent:
        pub.publish("si/t", payload, 1)

    assert broker.stop(signal.SIGINT) == 0  # the fixture checks the exit status again

    assert [(p.type, p.reason) for p in v5.expect_closed()] == [(DISCONNECT, 0x8B)]
    assert v3.expect_closed() == []
    packets = sub.expect_closed()
    assert [(p.type, p.payload) for p in packets[:-1]] == [(PUBLISH, s) for s in sent]
    assert (packets[-1].type, packets[-1].reason) == (DISCONNECT, 0x8B)
    assert "shutting down" in broker.logs()


# --- connection limits ---------------------------------------------------------------------


def outcome(r: mqttraw.RawClient) -> str:
    """Sends CONNECT on a fresh socket: "accepted" (CONNACK 0) or "refused" (closed without a
    CONNACK, as a broker that closes the connection at accept does)."""
    try:
        r.send(mqttraw.connect(f"o-{uuid.uuid4().hex[:8]}", version=r.version))
    except OSError:
        return "refused"  # already closed
    try:
        p = r.recv()
    except mqttraw.Closed:
        return "refused"
    assert (p.type, p.reason) == (CONNACK, 0), p
    return "accepted"


@pytest.mark.broker_config("max_connections = 2")
def test_max_connections_closes_further_connections_at_accept(broker, raw):
    a = raw(version=V5)
    b = raw(version=V311)
    assert outcome(raw(connect=False)) == "refused"
    assert outcome(raw(version=V311, connect=False)) == "refused"

    # The two admitted clients are unaffected.
    a.subscribe([("mc/t", 1)])
    b.publish("mc/t", b"x", 1)
    assert a.expect(PUBLISH).payload == b"x"

    # A client that leaves frees its place (once the broker has closed its connection).
    b.send(mqttraw.disconnect(version=V311))
    assert b.expect_closed() == []
    wait_until(lambda: outcome(mqttraw.RawClient(broker.port)) == "accepted", interval=0.1)


@pytest.mark.broker_config("max_connection_rate = 3")
def test_max_connection_rate_refuses_the_excess_within_a_second(broker):
    # Six connections from 127.0.0.1 and one from 127.0.0.2, as fast as they can be made: the
    # first three from 127.0.0.1 are accepted, the next three refused, and the other address
    # has its own budget. The broker counts per second, so this holds only if every one of
    # them was accepted within one second: the burst is measured from before the first connect
    # to after the last answer (every accept lies between), and made again if it took longer.
    for _ in range(10):
        start = time.monotonic()
        socks = [mqttraw.RawClient(broker.port) for _ in range(6)]
        socks.append(mqttraw.RawClient(broker.port, source="127.0.0.2"))
        got = [outcome(r) for r in socks]
        span = time.monotonic() - start
        for r in socks:
            r.close()
        if span < 1.0:
            break
        time.sleep(1.5)  # let the broker's one-second window pass before the next burst
    else:
        pytest.fail("no burst of 7 connections took less than 1 s")
    assert got == ["accepted"] * 3 + ["refused"] * 3 + ["accepted"], got

    # A rate, not a cap: a later second admits connections again.
    wait_until(lambda: outcome(mqttraw.RawClient(broker.port)) == "accepted", interval=0.5)


# --- topic limits ----------------------------------------------------------------------------


@pytest.mark.broker_config("max_topic_length = 64")
@BOTH_VERSIONS
def test_max_topic_length_refuses_longer_names_and_filters(client, version):
    at_limit = "tl/" + "x" * 61  # 64 bytes
    over = at_limit + "y"
    over_utf8 = "tl/" + "\u00e9" * 31  # 34 characters, but 65 bytes in UTF-8
    assert len(at_limit.encode()) == 64 and len(over_utf8.encode()) == 65

    sub = client(version=version)
    assert sub.subscribe(over, 1) == [refused(version, TOPIC_FILTER_INVALID)]
    assert sub.subscribe(over_utf8, 1) == [refused(version, TOPIC_FILTER_INVALID)]
    assert sub.subscribe(at_limit, 1) == [1]
    assert sub.subscribe("tl/#", 1) == [1]

    pub = client(version=version)
    ok = pub.publish(at_limit, b"at the limit", 1)
    too_long = [pub.publish(over, b"too long", 1), pub.publish(over_utf8, b"too long", 1)]
    pub.publish(over, b"too long at QoS 0", 0)
    if version == V5:
        assert ok.value == 0 and [r.value for r in too_long] == [TOPIC_NAME_INVALID] * 2

    # One copy of the message at the limit (two subscriptions match it), nothing else.
    assert [(m.topic, m.payload) for m in sub.collect_until_marker(pub)] == [
        (at_limit, b"at the limit")]


@pytest.mark.broker_config("max_topic_levels = 4")
@BOTH_VERSIONS
def test_max_topic_levels_refuses_deeper_names_and_filters(client, version):
    sub = client(version=version)
    assert sub.subscribe("tv/b/c/d/e", 1) == [refused(version, TOPIC_FILTER_INVALID)]
    assert sub.subscribe("tv/+/+/+/#", 1) == [refused(version, TOPIC_FILTER_INVALID)]
    # Empty levels count.
    assert sub.subscribe("tv/b/c//", 1) == [refused(version, TOPIC_FILTER_INVALID)]
    assert sub.subscribe("tv/+/+/#", 1) == [1]

    pub = client(version=version)
    ok = pub.publish("tv/b/c/d", b"four levels", 1)
    too_deep = [pub.publish("tv/b/c/d/e", b"five", 1), pub.publish("tv/b/c/d/", b"five", 1)]
    pub.publish("tv/b/c/d/e", b"five at QoS 0", 0)
    if version == V5:
        assert ok.value == 0 and [r.value for r in too_deep] == [TOPIC_NAME_INVALID] * 2

    assert [(m.topic, m.payload) for m in sub.collect_until_marker(pub)] == [
        ("tv/b/c/d", b"four levels")]


@pytest.mark.broker_config("max_topic_length = 64\nmax_topic_levels = 4")
@pytest.mark.parametrize("topic", ["wl/" + "x" * 62, "wl/b/c/d/e"], ids=["length", "levels"])
def test_topic_limits_apply_to_will_topics(raw, topic):
    # A will is a message published on the client's behalf: like a will on a topic the ACL
    # forbids, one on a topic beyond the limits is refused at CONNECT (Topic Name invalid)
    # rather than published later past them.
    r = raw(version=V5, connect=False)
    r.send(mqttraw.connect("will-over-limit", will=mqttraw.Will(topic, b"x", 1)))
    assert r.expect(CONNACK).reason == TOPIC_NAME_INVALID


@pytest.mark.broker_config("max_subscriptions = 2")
@BOTH_VERSIONS
def test_max_subscriptions_refuses_a_third_subscription(client, raw, version):
    c = client(version=version)
    assert c.subscribe("ms/a", 1) == [1]
    assert c.subscribe("ms/b", 1) == [1]
    assert c.subscribe("ms/c", 1) == [refused(version, QUOTA_EXCEEDED)]
    assert c.subscribe("ms/a", 1) == [1]  # replacing a subscription it holds adds none

    pub = client(version=version)
    pub.publish("ms/c", b"not subscribed", 1)
    pub.publish("ms/a", b"subscribed", 1)
    # The fence goes through "ms/a": the client may not subscribe to a marker topic.
    assert [m.payload for m in c.collect_until_marker(pub, topic="ms/a")] == [b"subscribed"]

    # Unsubscribing frees a place.
    c.unsubscribe("ms/b")
    assert c.subscribe("ms/c", 1) == [1]
    assert c.subscribe("ms/d", 1) == [refused(version, QUOTA_EXCEEDED)]

    # One SUBSCRIBE with three filters: the first two fit, the third does not.
    r = raw(version=version)
    ack = r.subscribe([("ms/x", 1), ("ms/y", 1), ("ms/z", 1)])
    assert ack.reasons == [1, 1, refused(version, QUOTA_EXCEEDED)]


# --- sessions ------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, kept", [
    pytest.param("queue", True, marks=pytest.mark.broker_config('offline_qos0 = "queue"'),
                 id="queue"),
    pytest.param("drop", False, marks=pytest.mark.broker_config('offline_qos0 = "drop"'),
                 id="drop"),
])
@BOTH_VERSIONS
def test_offline_qos0(client, version, setting, kept):
    sub = client("oq0", version=version, **persistent(version))
    sub.subscribe("oq/t", 1)
    sub.disconnect()
    pub = client(version=version)
    pub.publish("oq/t", b"a", 0)
    pub.publish("oq/t", b"b", 1)
    pub.publish("oq/t", b"c", 0)
    # Its PUBACK proves the broker has routed "c" (same connection, in order) while the
    # subscriber was still offline.
    pub.publish("oq/t", b"d", 1)

    back = client("oq0", version=version, **persistent(version))
    assert back.session_present
    got = [(m.payload, m.qos) for m in back.collect_until_marker(pub)]
    if kept:  # queued like QoS 1 and 2 messages, in order, still at QoS 0
        assert got == [(b"a", 0), (b"b", 1), (b"c", 0), (b"d", 1)]
    else:
        assert got == [(b"b", 1), (b"d", 1)]


@pytest.mark.broker_config("persistent_client_expiration = 1")
def test_persistent_client_expiration_ends_idle_v311_sessions(client):
    v3 = client("pce-v3", version=V311, clean=False)
    v3.subscribe("pce/v3", 1)
    v5 = client("pce-v5", version=V5, **persistent(V5, expiry=3600))
    v5.subscribe("pce/v5", 1)
    pub = client(version=V5)  # MQTT 5, so that PUBACK says whether anyone is subscribed

    gone = time.monotonic()
    v3.disconnect()
    # The session and its subscription end one second after the broker saw the DISCONNECT,
    # so not within a second of `gone`. Each QoS 1 message published meanwhile is queued for
    # the session, and then dropped with it.
    wait_until(lambda: pub.publish("pce/v3", b"queued", 1).value == 0x10, interval=0.1)
    assert time.monotonic() - gone >= 1.0

    again = client("pce-v3", version=V311, clean=False)
    assert not again.session_present
    pub.publish("pce/v3", b"after", 1)
    assert again.collect_until_marker(pub) == []

    # MQTT 5 sessions keep the expiry they asked for.
    v5.disconnect()
    pub.publish("pce/v5", b"kept", 1)
    v5_again = client("pce-v5", version=V5, **persistent(V5, expiry=3600))
    assert v5_again.session_present
    assert [m.payload for m in v5_again.collect_until_marker(pub)] == [b"kept"]


@pytest.mark.broker_config("persistent_client_expiration = 3600")
def test_persistent_client_expiration_keeps_sessions_until_then(client):
    v3 = client("pce-long", version=V311, clean=False)
    v3.subscribe("pce/long", 1)
    v3.disconnect()
    pub = client(version=V311)
    pub.publish("pce/long", b"queued", 1)
    again = client("pce-long", version=V311, clean=False)
    assert again.session_present
    assert [m.payload for m in again.collect_until_marker(pub)] == [b"queued"]


@pytest.mark.broker_config("max_queued_bytes = 350")
@BOTH_VERSIONS
def test_max_queued_bytes_bounds_an_offline_queue(client, version):
    sub = client("mqb", version=version, **persistent(version))
    sub.subscribe("qb/#", 1)
    sub.disconnect()
    pub = client(version=version)
    # Six messages of about 100 bytes each: three fit in 350, the newest three are dropped.
    payloads = [str(i).encode() * 100 for i in range(6)]
    for p in payloads:
        pub.publish("qb/p", p, 1)
    if version == V5:
        # Properties count too: 10 bytes of payload and 90 of user property, six times.
        for i in range(6):
            pub.publish("qb/u", str(i).encode() * 10, 1,
                        properties=props("PUBLISH", UserProperty=[("k", "v" * 89)]))

    back = client("mqb", version=version, **persistent(version))
    got = [m.payload for m in back.collect_until_marker(pub)]
    assert got == payloads[:3], [g[:1] for g in got]

    # Room again once the queue was delivered.
    back.disconnect()
    pub.publish("qb/p", b"later", 1)
    again = client("mqb", version=version, **persistent(version))
    assert [m.payload for m in again.collect_until_marker(pub)] == [b"later"]


# --- logs ----------------------------------------------------------------------------------


def connected_line_appears(broker, client_id):
    wait_until(lambda: "client connected" in broker.logs() and client_id in broker.logs())


@pytest.mark.broker_args("--log-format", "json")
def test_json_log_lines_carry_the_documented_fields(broker, raw):
    r = raw("json-logger", version=V5)
    peer = "%s:%d" % r.sock.getsockname()
    connected_line_appears(broker, "json-logger")
    r.send(mqttraw.disconnect())
    assert r.expect_closed() == []
    assert broker.stop() == 0

    lines = [line for line in broker.logs().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for rec in records:
        assert {"timestamp", "level", "fields", "target"} <= rec.keys(), rec
        assert isinstance(rec["fields"].get("message"), str), rec
    assert any(rec["fields"]["message"] == "shutting down" for rec in records)
    # Every line about the connection names the peer address, the listener, the transport
    # and the client identifier.
    about = [rec for rec in records if rec.get("span", {}).get("peer") == peer]
    messages = [rec["fields"]["message"] for rec in about]
    assert {"client connected", "client disconnected"} <= set(messages), about
    for rec in about:
        assert rec["span"]["listener"] == "tcp://127.0.0.1:0"
        assert rec["span"]["transport"] == "tcp"
        assert rec["span"]["client_id"] == "json-logger"


def test_text_log_lines_are_not_json(broker, raw):
    r = raw("text-logger", version=V5)
    peer = "%s:%d" % r.sock.getsockname()
    connected_line_appears(broker, "text-logger")
    assert broker.stop() == 0

    lines = [line for line in broker.logs().splitlines() if line.strip()]
    assert lines
    for line in lines:
        with pytest.raises(ValueError):
            json.loads(line)
    connected = [line for line in lines if "client connected" in line]
    assert len(connected) == 1, lines
    for field in (f"peer={peer}", "listener=tcp://127.0.0.1:0", "transport=tcp",
                  'client_id="text-logger"'):
        assert field in connected[0], connected[0]
    assert re.match(r"\d{4}-\d\d-\d\dT[\d:.]+Z +INFO ", connected[0]), connected[0]
