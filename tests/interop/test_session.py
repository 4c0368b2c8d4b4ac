"""Persistent sessions: session present, offline queueing, redelivery of unacknowledged
messages, session expiry and message expiry."""

import time

import mqttraw
from mqttraw import PUBLISH, PUBREL, V5
from pahoclient import BOTH_VERSIONS, persistent, props, wait_until


@BOTH_VERSIONS
def test_session_present_reflects_a_stored_session(client, version):
    first = client("sp", version=version, **persistent(version))
    assert not first.session_present
    first.disconnect()

    again = client("sp", version=version, **persistent(version))
    assert again.session_present
    again.disconnect()

    clean = client("sp", version=version, clean=True)
    assert not clean.session_present  # clean start discards the session [MQTT-3.1.2-4]
    clean.disconnect()

    after_clean = client("sp", version=version, **persistent(version))
    assert not after_clean.session_present


@BOTH_VERSIONS
def test_offline_messages_are_queued_for_a_persistent_session(client, version):
    sub = client("offline-sub", version=version, **persistent(version))
    sub.subscribe("queue/#", 2)
    sub.disconnect()

    pub = client(version=version)
    pub.publish("queue/a", b"one", 1)
    pub.publish("queue/b", b"two", 2)
    pub.publish("queue/c", b"zero", 0)  # QoS 0 to an offline client: dropped by default
    pub.publish("queue/a", b"three", 1)

    back = client("offline-sub", version=version, **persistent(version))
    assert back.session_present
    received = back.collect_until_marker(pub)
    # (Sorted: paho passes a QoS 2 message on only at PUBREL, so it may come after a later
    # QoS 1 one. Order within a topic is checked: "one" before "three".)
    assert sorted((m.topic, m.payload, m.qos) for m in received) == [
        ("queue/a", b"one", 1), ("queue/a", b"three", 1), ("queue/b", b"two", 2)]
    assert [m.payload for m in received if m.topic == "queue/a"] == [b"one", b"three"]


@BOTH_VERSIONS
def test_clean_start_discards_subscriptions_and_queued_messages(client, version):
    sub = client("discard", version=version, **persistent(version))
    sub.subscribe("discard/t", 1)
    sub.disconnect()
    pub = client(version=version)
    pub.publish("discard/t", b"queued", 1)

    fresh = client("discard", version=version, clean=True)
    assert not fresh.session_present
    pub.publish("discard/t", b"live", 1)
    assert fresh.collect_until_marker(pub) == []


def test_v5_session_with_zero_expiry_ends_at_disconnect(client):
    # clean_start=False alone is not enough in MQTT 5: the default expiry is 0.
    first = client("zero-expiry", version=V5, clean=False)
    first.subscribe("zx/t", 1)
    first.disconnect()
    again = client("zero-expiry", version=V5, clean=False)
    assert not again.session_present


def test_v5_session_expires_after_its_interval(client):
    first = client("expiring", version=V5, **persistent(V5, expiry=1))
    first.subscribe("exp/t", 1)
    pub = client(version=V5)
    gone = time.monotonic()
    first.disconnect()
    # The session (and so its subscription: PUBACK 0x10, no matching subscribers) ends one
    # second after the broker read the DISCONNECT, so not within a second of `gone`.
    wait_until(lambda: pub.publish("exp/t", b"queued", 1).value == 0x10, interval=0.1)
    assert time.monotonic() - gone >= 1.0
    pub.publish("exp/t", b"after expiry", 1)

    again = client("expiring", version=V5, **persistent(V5, expiry=1))
    assert not again.session_present
    assert again.collect_until_marker(pub) == []


def test_v5_session_expiry_can_be_changed_at_disconnect(client):
    c = client("expiry-at-disconnect", version=V5, **persistent(V5, expiry=3600))
    c.subscribe("ead/t", 1)
    c.disconnect(properties=props("DISCONNECT", SessionExpiryInterval=0))

    again = client("expiry-at-disconnect", version=V5, **persistent(V5))
    assert not again.session_present


def test_v5_message_expiry_drops_stale_queued_messages_and_reduces_the_rest(client):
    sub = client("msg-expiry", version=V5, **persistent(V5))
    sub.subscribe("mexp/#", 1)
    sub.disconnect()
    pub = client(version=V5)
    published = time.monotonic()
    pub.publish("mexp/short", b"stale", 1, properties=props("PUBLISH", MessageExpiryInterval=1))
    pub.publish("mexp/long", b"fresh", 1, properties=props("PUBLISH", MessageExpiryInterval=30))
    pub.publish("mexp/none", b"forever", 1)
    time.sleep(2)  # the broker held them at least this long

    back = client("msg-expiry", version=V5, **persistent(V5))
    received = back.collect_until_marker(pub)
    held = time.monotonic() - published  # at most this long

    assert [m.payload for m in received] == [b"fresh", b"forever"]
    # What is left of the interval, not the original [MQTT-3.3.2-6].
    assert 30 - held - 1 <= received[0].prop("MessageExpiryInterval") <= 28
    assert received[1].prop("MessageExpiryInterval") is None


def test_v5_message_expiry_is_passed_on_to_online_subscribers(client):
    sub = client(version=V5)
    sub.subscribe("mexp/online", 1)
    pub = client(version=V5)
    published = time.monotonic()
    pub.publish("mexp/online", b"x", 1, properties=props("PUBLISH", MessageExpiryInterval=60))
    interval = sub.recv().prop("MessageExpiryInterval")
    held = time.monotonic() - published  # the broker held it at most this long
    assert 60 - held - 1 <= interval <= 60


def raw_persistent(raw, client_id, version, **kwargs):
    connect_props = {"SessionExpiryInterval": 3600} if version == V5 else None
    return raw(client_id, version=version, clean=False, props=connect_props, **kwargs)


@BOTH_VERSIONS
def test_unacknowledged_qos1_is_redelivered_with_dup_on_reconnect(client, raw, version):
    r = raw_persistent(raw, "redeliver", version)
    r.subscribe([("redeliver/t", 1)])
    pub = client(version=version)
    pub.publish("redeliver/t", b"ack me", 1)
    first = r.expect(PUBLISH)
    assert (first.payload, first.qos, first.dup) == (b"ack me", 1, False)
    r.close()  # no PUBACK

    r2 = raw_persistent(raw, "redeliver", version)
    assert r2.connack.session_present
    again = r2.expect(PUBLISH)
    # Same packet identifier, DUP set [MQTT-4.4.0-1, MQTT-3.3.1-1].
    assert (again.payload, again.packet_id, again.dup) == (b"ack me", first.packet_id, True)
    r2.puback(again.packet_id)
    # A marker through the same subscription: the next PUBLISH, so no third copy came first.
    pub.publish("redeliver/t", b"marker", 1)
    assert r2.until_publish("redeliver/t", b"marker") == []

    r2.close()
    r3 = raw_persistent(raw, "redeliver", version)
    pub.publish("redeliver/t", b"marker 2", 1)
    # Acknowledged: never again. A redelivery would come at reconnect, before anything new.
    assert r3.until_publish("redeliver/t", b"marker 2") == []


@BOTH_VERSIONS
def test_qos2_flow_resumes_with_pubrel_after_reconnect(client, raw, version):
    r = raw_persistent(raw, "qos2-resume", version)
    r.subscribe([("q2/t", 2)])
    pub = client(version=version)
    pub.publish("q2/t", b"exactly once", 2)
    p = r.expect(PUBLISH)
    assert p.qos == 2
    r.send(mqttraw.pubrec(p.packet_id, version=version))
    assert r.expect(PUBREL).packet_id == p.packet_id
    r.close()  # no PUBCOMP

    r2 = raw_persistent(raw, "qos2-resume", version)
    # The message itself must not come again: only the PUBREL [MQTT-4.4.0-1].
    rel = r2.expect(PUBREL)
    assert rel.packet_id == p.packet_id
    r2.send(mqttraw.pubcomp(p.packet_id, version=version))
    pub.publish("q2/t", b"marker", 1)
    assert r2.until_publish("q2/t", b"marker") == []


def test_paho_manual_ack_gets_redelivery_after_reconnect(client):
    sub = client("manual", version=V5, manual_ack=True, **persistent(V5))
    sub.subscribe("manual/t", 1)
    pub = client(version=V5)
    pub.publish("manual/t", b"m1", 1)
    pub.publish("manual/t", b"m2", 1)
    m1, m2 = sub.recv_n(2)
    sub.ack(m1.mid)
    sub.subscribe("manual/fence", 0)  # the SUBACK comes after the PUBACK was read
    sub.kill()  # m2 never acknowledged

    back = client("manual", version=V5, manual_ack=True, **persistent(V5))
    assert back.session_present
    m = back.recv()
    assert m.payload == b"m2"
    back.ack(m.mid)
    assert back.collect_until_marker(pub, topic="manual/t") == []  # m1 was acknowledged


@BOTH_VERSIONS
def test_takeover_hands_unacknowledged_messages_to_the_new_connection(client, raw, version):
    old = raw_persistent(raw, "handover", version)
    old.subscribe([("handover/t", 1)])
    pub = client(version=version)
    pub.publish("handover/t", b"in flight", 1)
    p = old.expect(PUBLISH)  # never acknowledged by the old connection

    new = raw_persistent(raw, "handover", version)
    assert new.connack.session_present
    again = new.expect(PUBLISH)
    assert (again.payload, again.packet_id, again.dup) == (b"in flight", p.packet_id, True)
    new.puback(again.packet_id)
    pub.publish("handover/t", b"marker", 1)
    assert new.until_publish("handover/t", b"marker") == []  # handed over once


def test_queued_messages_respect_receive_maximum_on_reconnect(client, raw):
    session = {"SessionExpiryInterval": 3600, "ReceiveMaximum": 1}
    r = raw("slow-reader", version=V5, clean=False, props=session)
    r.subscribe([("slow/t", 1)])
    r.close()
    pub = client(version=V5)
    for i in range(3):
        pub.publish("slow/t", str(i).encode(), 1)

    r2 = raw("slow-reader", version=V5, clean=False, props=session)
    for i in range(3):
        p = r2.expect(PUBLISH)
        assert p.payload == str(i).encode()
        # One in flight at a time: the broker holds the rest until the PUBACK.
        assert r2.ping_fence() == []
        r2.puback(p.packet_id)
    pub.publish("slow/t", b"marker", 1)
    assert r2.until_publish("slow/t", b"marker") == []


def test_retained_messages_respect_receive_maximum(client, raw):
    pub = client(version=V5)
    for i in range(3):
        pub.publish(f"slowret/{i}", str(i).encode(), 1, retain=True)
    r = raw(version=V5, props={"ReceiveMaximum": 1})
    r.subscribe([("slowret/+", 1)])
    got = []
    for _ in range(3):
        p = r.expect(PUBLISH)
        assert p.retain
        got.append(p.payload)
        assert r.ping_fence() == []  # one in flight at a time
        r.puback(p.packet_id)
    assert sorted(got) == [b"0", b"1", b"2"]
    pub.publish("slowret/0", b"marker", 1)
    assert r.until_publish("slowret/0", b"marker") == []


def test_session_expiry_set_to_zero_at_disconnect_holds_for_an_immediate_reconnect(raw):
    for i in range(20):  # the reconnect races the DISCONNECT inside the broker
        a = raw(f"quick-{i}", version=V5, clean=False, props={"SessionExpiryInterval": 3600})
        a.subscribe([("quick/t", 1)])
        a.send(mqttraw.disconnect(props={"SessionExpiryInterval": 0}))
        b = raw(f"quick-{i}", version=V5, clean=False, props={"SessionExpiryInterval": 3600})
        # The DISCONNECT, sent first, ended the session.
        assert not b.connack.session_present, f"attempt {i}"
        a.close()
        b.close()
