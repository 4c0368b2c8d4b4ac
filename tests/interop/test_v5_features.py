"""MQTT 5 features: properties passed through, request/response, no local, subscription
identifiers, topic aliases, maximum packet size, receive maximum and shared subscriptions."""

import pytest

import mqttraw
from mqttraw import DISCONNECT, PUBLISH
from pahoclient import V5, props


def test_request_response_properties_pass_through(client):
    requester = client(version=V5)
    requester.subscribe("rr/responses/requester", 1)
    responder = client(version=V5)
    responder.subscribe("rr/requests", 1)

    requester.publish("rr/requests", '{"op": "add"}'.encode(), 1, properties=props(
        "PUBLISH", ResponseTopic="rr/responses/requester", CorrelationData=b"\x00req-42\xff",
        PayloadFormatIndicator=1, ContentType="application/json",
        UserProperty=[("a", "1"), ("b", "2"), ("a", "3")]))

    req = responder.recv()
    assert req.prop("ResponseTopic") == "rr/responses/requester"
    assert req.prop("CorrelationData") == b"\x00req-42\xff"
    assert req.prop("PayloadFormatIndicator") == 1
    assert req.prop("ContentType") == "application/json"
    # User properties keep their order and duplicates [MQTT-3.3.2-18].
    assert req.prop("UserProperty") == [("a", "1"), ("b", "2"), ("a", "3")]

    responder.publish(req.prop("ResponseTopic"), b"3", 1,
                      properties=props("PUBLISH", CorrelationData=req.prop("CorrelationData")))
    resp = requester.recv()
    assert (resp.topic, resp.payload) == ("rr/responses/requester", b"3")
    assert resp.prop("CorrelationData") == b"\x00req-42\xff"
    assert resp.prop("ResponseTopic") is None and resp.prop("UserProperty") is None


def test_no_local_hides_a_clients_own_messages(client):
    me = client(version=V5)
    me.subscribe("nl/t", 1, no_local=True)
    other = client(version=V5)
    other.subscribe("nl/t", 1)

    me.publish("nl/t", b"mine", 1)
    client(version=V5).publish("nl/t", b"theirs", 1)

    assert [m.payload for m in me.collect_until_marker(me)] == [b"theirs"]
    assert [m.payload for m in other.recv_n(2)] == [b"mine", b"theirs"]


def test_subscription_identifiers(client):
    sub = client(version=V5)
    sub.subscribe("sid/a", 1, properties=props("SUBSCRIBE", SubscriptionIdentifier=5))
    sub.subscribe("sid/#", 1, properties=props("SUBSCRIBE", SubscriptionIdentifier=268435455))
    sub.subscribe("sid/none", 1)
    pub = client(version=V5)

    pub.publish("sid/a", b"a", 1)
    pub.publish("sid/b", b"b", 1)
    pub.publish("sid/none", b"n", 1)
    got = {m.payload: m for m in sub.recv_n(3)}

    assert sorted(got[b"a"].prop("SubscriptionIdentifier")) == [5, 268435455]
    assert got[b"b"].prop("SubscriptionIdentifier") == [268435455]
    assert got[b"n"].prop("SubscriptionIdentifier") == [268435455]  # sid/# matches too

    # Subscribing again replaces the subscription, identifier included [MQTT-3.8.4-3].
    sub.subscribe("sid/#", 1, properties=props("SUBSCRIBE", SubscriptionIdentifier=9))
    sub.unsubscribe("sid/a")
    pub.publish("sid/a", b"again", 1)
    assert sub.recv().prop("SubscriptionIdentifier") == [9]


def test_subscription_identifier_on_retained_messages(client):
    pub = client(version=V5)
    pub.publish("sid/ret", b"r", 1, retain=True)
    sub = client(version=V5)
    sub.subscribe("sid/+", 1, properties=props("SUBSCRIBE", SubscriptionIdentifier=77))
    m = sub.recv()
    assert m.retain and m.prop("SubscriptionIdentifier") == [77]


# --- topic aliases -------------------------------------------------------------------------


def test_client_to_broker_topic_alias(client):
    sub = client(version=V5)
    sub.subscribe("alias/#", 1)
    pub = client(version=V5)
    assert pub.connack_properties.TopicAliasMaximum >= 1

    pub.publish("alias/long/topic/name", b"1", 1, properties=props("PUBLISH", TopicAlias=1))
    pub.publish("", b"2", 1, properties=props("PUBLISH", TopicAlias=1))
    pub.publish("alias/other", b"3", 1, properties=props("PUBLISH", TopicAlias=1))  # remapped
    pub.publish("", b"4", 1, properties=props("PUBLISH", TopicAlias=1))

    assert [(m.topic, m.payload, m.prop("TopicAlias")) for m in sub.recv_n(4)] == [
        ("alias/long/topic/name", b"1", None), ("alias/long/topic/name", b"2", None),
        ("alias/other", b"3", None), ("alias/other", b"4", None)]


def test_topic_alias_above_the_maximum_is_refused(client):
    pub = client(version=V5)
    too_big = pub.connack_properties.TopicAliasMaximum + 1
    pub.publish("alias/x", b"1", 1, properties=props("PUBLISH", TopicAlias=too_big), wait=False)
    assert pub.wait_disconnected().value == 0x94  # Topic Alias invalid


def test_unknown_topic_alias_is_a_protocol_error(client):
    pub = client(version=V5)
    pub.publish("", b"1", 1, properties=props("PUBLISH", TopicAlias=3), wait=False)
    assert pub.wait_disconnected().value == 0x82


def test_broker_to_client_topic_aliases_resolve_to_the_right_topics(client):
    sub = client(version=V5, properties=props("CONNECT", TopicAliasMaximum=2))
    sub.subscribe("sa/#", 1)
    pub = client(version=V5)
    topics = ["sa/one", "sa/two", "sa/three", "sa/one", "sa/two", "sa/three", "sa/three"]
    for i, t in enumerate(topics):
        pub.publish(t, str(i).encode(), 1)

    got = sub.recv_n(len(topics))

    assert [(m.topic, m.payload) for m in got] == [
        (t, str(i).encode()) for i, t in enumerate(topics)]
    assert all(m.prop("TopicAlias") is None or 1 <= m.prop("TopicAlias") <= 2 for m in got)


def test_broker_uses_an_alias_on_the_wire_once_set(client, raw):
    r = raw(version=V5, props={"TopicAliasMaximum": 10})
    r.subscribe([("wire/#", 0)])
    pub = client(version=V5)
    pub.publish("wire/a/long/topic", b"1", 1)
    pub.publish("wire/a/long/topic", b"2", 1)

    first, second = r.expect(PUBLISH), r.expect(PUBLISH)
    alias = first.properties.get("TopicAlias")
    assert first.topic == "wire/a/long/topic" and alias is not None and 1 <= alias <= 10
    assert (second.topic, second.properties.get("TopicAlias")) == ("", alias)
    assert second.payload == b"2"


def test_broker_aliases_do_not_survive_a_reconnect(client, raw):
    session = {"TopicAliasMaximum": 10, "SessionExpiryInterval": 3600}
    r = raw("alias-reconnect", version=V5, clean=False, props=session)
    r.subscribe([("again/#", 1)])
    pub = client(version=V5)
    pub.publish("again/topic", b"1", 1)
    first = r.expect(PUBLISH)
    assert first.topic == "again/topic"
    r.puback(first.packet_id)
    r.close()

    pub.publish("again/topic", b"2", 1)  # queued while offline
    r2 = raw("alias-reconnect", version=V5, clean=False, props=session)
    assert r2.connack.session_present
    second = r2.expect(PUBLISH)
    # Aliases belong to a network connection [MQTT-3.3.2-7]: the topic must be spelled out.
    assert (second.topic, second.payload) == ("again/topic", b"2")


def test_no_aliases_for_a_client_that_did_not_ask(client, raw):
    r = raw(version=V5)
    r.subscribe([("wire/#", 0)])
    pub = client(version=V5)
    for i in range(3):
        pub.publish("wire/b", str(i).encode(), 1)
    for _ in range(3):
        p = r.expect(PUBLISH)
        assert p.topic == "wire/b" and "TopicAlias" not in p.properties  # [MQTT-3.3.2-8]


# --- maximum packet size -------------------------------------------------------------------


def test_message_larger_than_the_clients_maximum_packet_size_is_skipped(client):
    small = client(version=V5, properties=props("CONNECT", MaximumPacketSize=200))
    small.subscribe("mps/#", 1)
    big = client(version=V5)
    big.subscribe("mps/#", 1)
    pub = client(version=V5)

    pub.publish("mps/t", b"x" * 500, 1)
    pub.publish("mps/t", b"small", 1)

    # [MQTT-3.1.2-25]: discarded for that client, which carries on and still gets the rest.
    assert [m.payload for m in small.collect_until_marker(pub)] == [b"small"]
    assert [len(m.payload) for m in big.recv_n(2)] == [500, 5]
    assert small.c.is_connected()


def test_retained_message_too_large_for_the_client_is_skipped(client):
    pub = client(version=V5)
    pub.publish("mps/ret/big", b"x" * 500, 1, retain=True)
    pub.publish("mps/ret/small", b"ok", 1, retain=True)
    small = client(version=V5, properties=props("CONNECT", MaximumPacketSize=200))
    small.subscribe("mps/ret/+", 1)
    assert [m.payload for m in small.collect_until_marker(pub)] == [b"ok"]


@pytest.mark.broker_config("max_packet_size = 1000")
def test_packet_above_the_brokers_maximum_gets_disconnect_0x95(client):
    c = client(version=V5)
    assert c.connack_properties.MaximumPacketSize == 1000
    watcher = client(version=V5)
    watcher.subscribe("mps/#", 1)

    c.publish("mps/ok", b"x" * 900, 1)
    c.publish("mps/big", b"x" * 2000, 1, wait=False)

    assert c.wait_disconnected().value == 0x95  # Packet too large
    assert [m.topic for m in watcher.collect_until_marker(client(version=V5))] == ["mps/ok"]


@pytest.mark.broker_config("max_packet_size = 1000")
def test_v311_packet_above_the_brokers_maximum_closes_the_connection(client, raw):
    r = raw(version=4)
    r.send(mqttraw.publish("mps/big", b"x" * 2000, version=4))
    assert r.expect_closed() == []


# --- flow control --------------------------------------------------------------------------


def test_receive_maximum_limits_unacknowledged_messages(client, raw):
    r = raw(version=V5, props={"ReceiveMaximum": 2})
    r.subscribe([("flow/t", 1)])
    pub = client(version=V5)
    for i in range(5):
        pub.publish("flow/t", str(i).encode(), 1)

    first = [r.expect(PUBLISH), r.expect(PUBLISH)]
    assert [p.payload for p in first] == [b"0", b"1"]
    # Two in flight: nothing more until one is acknowledged. The broker held all five when it
    # sent these; one that ignored the window would have sent more before reading the ping.
    assert r.ping_fence() == []

    r.puback(first[0].packet_id)
    third = r.expect(PUBLISH)
    assert third.payload == b"2"
    assert r.ping_fence() == []

    r.puback(first[1].packet_id)
    r.puback(third.packet_id)
    rest = [r.expect(PUBLISH), r.expect(PUBLISH)]
    assert [p.payload for p in rest] == [b"3", b"4"]
    # QoS 0 messages are not counted by the window.
    pub.publish("flow/t", b"qos0", 0)
    assert r.expect(PUBLISH).payload == b"qos0"


@pytest.mark.broker_config("receive_maximum = 3")
def test_client_exceeding_the_brokers_receive_maximum_is_disconnected(raw):
    r = raw(version=V5)
    assert r.connack.properties.get("ReceiveMaximum") == 3
    # QoS 2 messages never released stay unacknowledged: three are allowed ...
    for i in range(1, 4):
        r.send(mqttraw.publish("flow/in", b"x", qos=2, packet_id=i))
        assert r.expect(mqttraw.PUBREC).packet_id == i
    # ... a fourth is one too many.
    r.send(mqttraw.publish("flow/in", b"x", qos=2, packet_id=4))
    assert [(p.type, p.reason) for p in r.expect_closed()] == [(DISCONNECT, 0x93)]


# --- shared subscriptions ------------------------------------------------------------------


def test_shared_subscription_splits_messages_between_members(client):
    a = client(version=V5)
    b = client(version=V5)
    assert a.subscribe("$share/g/sh/t", 1) == [1]
    assert b.subscribe("$share/g/sh/t", 1) == [1]
    everyone = client(version=V5)
    everyone.subscribe("sh/t", 1)
    pub = client(version=V5)
    for i in range(10):
        pub.publish("sh/t", str(i).encode(), 1)

    got_a = [m.payload for m in a.collect_until_marker(pub)]
    got_b = [m.payload for m in b.collect_until_marker(pub)]

    assert sorted(got_a + got_b, key=int) == [str(i).encode() for i in range(10)]  # no dups
    assert abs(len(got_a) - len(got_b)) <= 1, (got_a, got_b)  # round robin
    assert all(m.topic == "sh/t" for m in everyone.recv_n(10))


def test_shared_subscription_gets_no_retained_messages(client):
    pub = client(version=V5)
    pub.publish("sh/ret", b"retained", 1, retain=True)
    member = client(version=V5)
    member.subscribe("$share/g/sh/ret", 1)

    # Spec 4.8.2: retained messages are not sent when a shared subscription is made.
    assert member.collect_until_marker(pub) == []
    pub.publish("sh/ret", b"live", 1)
    assert member.recv().payload == b"live"


def test_shared_subscription_member_leaving_gets_its_share_redistributed(client):
    a = client(version=V5)
    b = client(version=V5)
    a.subscribe("$share/g/sh/leave", 1)
    b.subscribe("$share/g/sh/leave", 1)
    b.disconnect()
    pub = client(version=V5)
    for i in range(4):
        pub.publish("sh/leave", str(i).encode(), 1)
    assert [m.payload for m in a.recv_n(4)] == [b"0", b"1", b"2", b"3"]


def test_unsubscribing_a_shared_member_sends_everything_to_the_others(client):
    a = client(version=V5)
    b = client(version=V5)
    a.subscribe("$share/g/sh/un", 1)
    b.subscribe("$share/g/sh/un", 1)
    assert b.unsubscribe("$share/g/sh/un") == [0]
    pub = client(version=V5)
    for i in range(4):
        pub.publish("sh/un", str(i).encode(), 1)
    assert [m.payload for m in a.recv_n(4)] == [b"0", b"1", b"2", b"3"]
    assert b.collect_until_marker(pub) == []


def test_two_share_groups_each_get_every_message(client):
    g1 = [client(version=V5) for _ in range(2)]
    g2 = client(version=V5)
    for c in g1:
        c.subscribe("$share/one/sh/groups", 1)
    g2.subscribe("$share/two/sh/groups", 1)
    pub = client(version=V5)
    for i in range(6):
        pub.publish("sh/groups", str(i).encode(), 1)

    one = [m.payload for c in g1 for m in c.collect_until_marker(pub)]
    assert sorted(one) == [str(i).encode() for i in range(6)]
    assert [m.payload for m in g2.recv_n(6)] == [str(i).encode() for i in range(6)]
