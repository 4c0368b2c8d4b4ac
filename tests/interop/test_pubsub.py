"""Publish/subscribe basics with paho-mqtt: QoS levels, wildcards, overlapping subscriptions,
unsubscribe and `$` topics."""

import pytest

import mqttraw

from pahoclient import BOTH_VERSIONS, V5, props


@BOTH_VERSIONS
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_reaches_subscriber_once_at_qos(client, version, qos):
    sub = client(version=version)
    assert sub.subscribe("pubsub/t", qos) == [qos]
    pub = client(version=version)
    pub.publish("pubsub/t", b"hello", qos)
    pub.publish("pubsub/other", b"not for sub", qos)

    received = sub.collect_until_marker(pub)

    assert [(m.topic, m.payload, m.qos, m.retain) for m in received] == [
        ("pubsub/t", b"hello", qos, False)
    ]


@BOTH_VERSIONS
def test_delivery_qos_is_the_lower_of_publish_and_subscription(client, version):
    sub0, sub1, sub2 = (client(version=version) for _ in range(3))
    sub0.subscribe("grade/t", 0)
    sub1.subscribe("grade/t", 1)
    sub2.subscribe("grade/t", 2)
    pub = client(version=version)
    pub.publish("grade/t", b"q2", 2)
    pub.publish("grade/t", b"q1", 1)

    assert [(m.payload, m.qos) for m in sub0.recv_n(2)] == [(b"q2", 0), (b"q1", 0)]
    assert [(m.payload, m.qos) for m in sub1.recv_n(2)] == [(b"q2", 1), (b"q1", 1)]
    # Sorted: paho passes a QoS 2 message on at PUBREL, possibly after the QoS 1 one.
    assert sorted((m.payload, m.qos) for m in sub2.recv_n(2)) == [(b"q1", 1), (b"q2", 2)]


@BOTH_VERSIONS
def test_messages_from_one_publisher_arrive_in_order(client, version):
    sub = client(version=version)
    sub.subscribe("order/t", 1)
    pub = client(version=version)
    for i in range(50):
        pub.publish("order/t", str(i).encode(), 1, wait=False)
    assert [m.payload for m in sub.recv_n(50)] == [str(i).encode() for i in range(50)]


@BOTH_VERSIONS
def test_wildcards_match_as_specified(client, version):
    sub = client(version=version)
    sub.subscribe("sport/tennis/+", 0)
    sub.subscribe("sport/#", 0)  # also matches the parent "sport" [MQTT-4.7.1-2]
    sub.subscribe("+/+", 0)
    sub.subscribe("+", 0)
    pub = client(version=version)
    topics = ["sport", "sport/tennis", "sport/tennis/player1", "sport/tennis/player1/ranking",
              "finance", "finance/x/y", "/finance"]
    for t in topics:
        pub.publish(t, t.encode(), 0)

    received = sorted(m.topic for m in sub.collect_until_marker(pub))

    # One copy per message, however many subscriptions match [MQTT-3.3.4-2]. "marker/..." is
    # matched by "+/+", so the fence itself proves nothing went missing after it.
    assert received == sorted(["sport", "sport/tennis", "sport/tennis/player1",
                               "sport/tennis/player1/ranking", "finance", "/finance"])


@BOTH_VERSIONS
def test_overlapping_subscriptions_give_one_copy_at_the_highest_qos(client, version):
    sub = client(version=version)
    if version == V5:
        sub.subscribe("ov/#", 0, properties=props("SUBSCRIBE", SubscriptionIdentifier=1))
        sub.subscribe("ov/+", 2, properties=props("SUBSCRIBE", SubscriptionIdentifier=2))
        sub.subscribe("ov/a", 1, properties=props("SUBSCRIBE", SubscriptionIdentifier=3))
    else:
        sub.subscribe("ov/#", 0)
        sub.subscribe("ov/+", 2)
        sub.subscribe("ov/a", 1)
    pub = client(version=version)
    pub.publish("ov/a", b"x", 2)

    received = sub.collect_until_marker(pub)

    assert len(received) == 1, received
    assert received[0].qos == 2
    if version == V5:
        # Every matching subscription's identifier, in one PUBLISH [MQTT-3.3.4-3, -5].
        assert sorted(received[0].prop("SubscriptionIdentifier")) == [1, 2, 3]


@BOTH_VERSIONS
def test_unsubscribe_stops_delivery(client, version):
    sub = client(version=version)
    sub.subscribe("unsub/a", 1)
    sub.subscribe("unsub/b", 1)
    pub = client(version=version)
    pub.publish("unsub/a", b"1", 1)
    assert sub.recv().payload == b"1"

    codes = sub.unsubscribe("unsub/a")
    if version == V5:
        assert codes == [0x00]
        assert sub.unsubscribe("unsub/never") == [0x11]  # No subscription existed
    pub.publish("unsub/a", b"2", 1)
    pub.publish("unsub/b", b"3", 1)

    assert [(m.topic, m.payload) for m in sub.collect_until_marker(pub)] == [("unsub/b", b"3")]


@BOTH_VERSIONS
def test_dollar_topics_are_not_matched_by_leading_wildcards(client, version):
    sub = client(version=version)
    sub.subscribe("#", 0)
    sub.subscribe("+/x", 0)
    sub.subscribe("+/#", 0)
    dollar = client(version=version)
    dollar.subscribe("$test/#", 0)
    pub = client(version=version)
    pub.publish("$test/x", b"dollar", 0)

    # [MQTT-4.7.2-1]: "#" and "+/..." do not match topics starting with "$".
    assert sub.collect_until_marker(pub) == []
    assert [m.topic for m in dollar.collect_until_marker(pub)] == ["$test/x"]


def test_v5_puback_says_no_matching_subscribers(client):
    pub = client(version=V5)
    assert pub.publish("nobody/listens", b"x", 1).value == 0x10
    client(version=V5).subscribe("nobody/listens", 0)
    assert pub.publish("nobody/listens", b"x", 1).value == 0x00


@BOTH_VERSIONS
def test_large_payload_round_trips(client, version):
    sub = client(version=version)
    sub.subscribe("big", 1)
    pub = client(version=version)
    payload = bytes(range(256)) * 2048  # 512 KiB, below the default 1 MiB limit
    pub.publish("big", payload, 1)
    assert sub.recv().payload == payload


def test_v311_and_v5_clients_interoperate(client):
    v3 = client(version=4)
    v5 = client(version=5)
    v3.subscribe("mixed/t", 2)
    v5.subscribe("mixed/t", 2)
    v5.publish("mixed/t", b"from v5", 2,
               properties=props("PUBLISH", UserProperty=[("k", "v")], ContentType="text/plain"))
    v3.publish("mixed/t", b"from v3", 2)

    assert [m.payload for m in v3.recv_n(2)] == [b"from v5", b"from v3"]
    got = v5.recv_n(2)
    assert [m.payload for m in got] == [b"from v5", b"from v3"]
    assert got[0].prop("UserProperty") == [("k", "v")]
    assert got[1].prop("UserProperty") is None


@BOTH_VERSIONS
def test_retained_dollar_topics_are_not_matched_by_leading_wildcards(client, version):
    pub = client(version=version)
    pub.publish("$test/retained", b"dollar", 1, retain=True)
    pub.publish("plain/retained", b"plain", 1, retain=True)

    for wildcard in ("#", "+/retained"):
        sub = client(version=version)
        sub.subscribe(wildcard, 1)
        # Not $test/retained, nor the broker's own retained $SYS topics.
        assert [m.topic for m in sub.collect_until_marker(pub)] == ["plain/retained"], wildcard


def test_sys_topics_describe_the_broker(client):
    sub = client(version=V5)
    sub.subscribe("$SYS/broker/version", 0)
    sub.subscribe("$SYS/broker/uptime", 0)
    got = {m.topic: m for m in sub.recv_n(2)}
    assert got["$SYS/broker/version"].payload.startswith(b"mqttd version ")
    assert got["$SYS/broker/uptime"].payload.endswith(b" seconds")
    # They are retained: a later subscriber gets them at once, flagged so. (The first one may
    # have subscribed before the broker's first $SYS publication, and then got it live.)
    late = client(version=V5)
    late.subscribe("$SYS/broker/version", 0)
    late.subscribe("$SYS/broker/uptime", 0)
    # The first message of each subscription is its retained one, whatever comes live after.
    first = {}
    while len(first) < 2:
        (m,) = late.recv_n(1)
        first.setdefault(m.topic, m)
    assert all(m.retain for m in first.values()), first


@BOTH_VERSIONS
def test_qos2_retransmission_is_delivered_exactly_once(client, raw, version):
    sub = client(version=version)
    sub.subscribe("once/t", 2)
    r = raw(version=version)
    r.send(mqttraw.publish("once/t", b"exactly", qos=2, packet_id=7, version=version))
    assert r.expect(mqttraw.PUBREC).packet_id == 7
    # The client did not see the PUBREC (say) and sends the PUBLISH again, DUP set.
    r.send(mqttraw.publish("once/t", b"exactly", qos=2, packet_id=7, dup=True, version=version))
    assert r.expect(mqttraw.PUBREC).packet_id == 7
    r.send(mqttraw.pubrel(7, version=version))
    comp = r.expect(mqttraw.PUBCOMP)
    assert (comp.packet_id, comp.reason) == (7, 0)

    pub = client(version=version)
    assert [m.payload for m in sub.collect_until_marker(pub)] == [b"exactly"]


@BOTH_VERSIONS
def test_qos2_retransmission_after_reconnect_is_not_delivered_again(client, raw, version):
    sub = client(version=version)
    sub.subscribe("once/r", 2)
    props5 = {"SessionExpiryInterval": 3600} if version == V5 else None
    r = raw("q2-sender", version=version, clean=False, props=props5)
    r.send(mqttraw.publish("once/r", b"exactly", qos=2, packet_id=9, version=version))
    assert r.expect(mqttraw.PUBREC).packet_id == 9
    r.close()

    r2 = raw("q2-sender", version=version, clean=False, props=props5)
    assert r2.connack.session_present
    r2.send(mqttraw.publish("once/r", b"exactly", qos=2, packet_id=9, dup=True, version=version))
    assert r2.expect(mqttraw.PUBREC).packet_id == 9
    r2.send(mqttraw.pubrel(9, version=version))
    assert r2.expect(mqttraw.PUBCOMP).packet_id == 9

    pub = client(version=version)
    assert [m.payload for m in sub.collect_until_marker(pub)] == [b"exactly"]


@pytest.mark.parametrize("bad", ["a/#/b", "a/b#", "a+/b"])
def test_invalid_topic_filter_is_not_granted(raw, bad):
    r = raw(version=V5)
    r.send(mqttraw.subscribe(1, [(bad, 1)], version=V5))
    try:
        p = r.recv()
    except mqttraw.Closed:
        return  # closing the connection is allowed too (spec 4.13)
    if p.type == mqttraw.SUBACK:
        assert p.reasons == [0x8F], p  # Topic Filter invalid
    else:
        assert (p.type, p.reason) in ((mqttraw.DISCONNECT, 0x81), (mqttraw.DISCONNECT, 0x8F)), p


@BOTH_VERSIONS
def test_publish_to_a_wildcard_topic_closes_the_connection(client, raw, version):
    watcher = client(version=V5)
    watcher.subscribe("#", 0)
    r = raw(version=version)
    r.send(mqttraw.publish("wild/+", b"x", qos=1, packet_id=1, version=version))
    packets = r.expect_closed()
    if version == V5:
        assert [(p.type, p.reason) for p in packets] == [(mqttraw.DISCONNECT, 0x90)]
    else:
        assert packets == []
    assert watcher.collect_until_marker(client(version=V5)) == []


@BOTH_VERSIONS
def test_topic_levels_may_be_empty_or_unicode(client, version):
    sub = client(version=version)
    sub.subscribe("lv/+/b", 1)
    sub.subscribe("capteur/température/+", 1)
    pub = client(version=version)
    pub.publish("lv//b", b"empty level", 1)
    pub.publish("capteur/température/°C", "21,5 °C".encode(), 1)
    pub.publish("lv/x/y/b", b"too deep", 1)

    got = [(m.topic, m.payload) for m in sub.collect_until_marker(pub)]
    assert got == [("lv//b", b"empty level"), ("capteur/température/°C", "21,5 °C".encode())]
