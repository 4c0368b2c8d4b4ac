"""Broker settings a client can observe, and graceful shutdown."""

import pytest

import mqttraw
from mqttraw import CONNACK, DISCONNECT, PUBLISH, V311, V5
from pahoclient import persistent


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
    for i in range(20):
        pub.publish("sd/t", str(i).encode(), 1)  # each acknowledged by the broker
    broker.stop()
    packets = sub.expect_closed()
    publishes = [p.payload for p in packets if p.type == PUBLISH]
    # Everything the broker acknowledged before shutdown reached the online subscriber,
    # or is still pending in its session; none arrives out of order.
    assert publishes == [str(i).encode() for i in range(len(publishes))]
    assert packets[-1].type == DISCONNECT and packets[-1].reason == 0x8B
