"""Retained messages: set, replace, delete, the RETAIN flag on delivery, and MQTT 5's retain
handling and retain-as-published subscription options."""

import time

from pahoclient import BOTH_VERSIONS, V5, props


@BOTH_VERSIONS
def test_retained_message_is_sent_to_new_subscribers_with_retain_set(client, version):
    pub = client(version=version)
    pub.publish("ret/a", b"one", 1, retain=True)
    pub.publish("ret/b", b"two", 2, retain=True)
    pub.publish("ret/c/deep", b"three", 1, retain=True)
    pub.publish("ret/plain", b"not retained", 1)

    sub = client(version=version)
    sub.subscribe("ret/+", 1)
    received = sub.collect_until_marker(pub)

    assert sorted((m.topic, m.payload, m.qos, m.retain) for m in received) == [
        ("ret/a", b"one", 1, True),
        ("ret/b", b"two", 1, True),  # QoS 2 message, QoS 1 subscription
    ]


@BOTH_VERSIONS
def test_retained_message_is_replaced(client, version):
    pub = client(version=version)
    pub.publish("ret/r", b"old", 1, retain=True)
    pub.publish("ret/r", b"new", 1, retain=True)

    sub = client(version=version)
    sub.subscribe("ret/r", 1)

    assert [(m.payload, m.retain) for m in sub.collect_until_marker(pub)] == [(b"new", True)]


@BOTH_VERSIONS
def test_empty_retained_payload_deletes_and_is_still_delivered_live(client, version):
    pub = client(version=version)
    pub.publish("ret/d", b"doomed", 1, retain=True)
    live = client(version=version)
    live.subscribe("ret/d", 1)
    assert live.recv().payload == b"doomed"

    pub.publish("ret/d", b"", 1, retain=True)
    # Existing subscribers get the empty message like any other [MQTT-3.3.1-6 / 3.3.1.3].
    m = live.recv()
    assert (m.topic, m.payload) == ("ret/d", b"")

    late = client(version=version)
    late.subscribe("ret/#", 1)
    assert late.collect_until_marker(pub) == []


@BOTH_VERSIONS
def test_live_delivery_clears_retain_unless_retain_as_published(client, version):
    sub = client(version=version)
    sub.subscribe("ret/live", 1)
    rap = None
    if version == V5:
        rap = client(version=version)
        rap.subscribe("ret/live", 1, retain_as_published=True)
    pub = client(version=version)
    pub.publish("ret/live", b"x", 1, retain=True)

    # RETAIN is 0 when a message goes to an established subscription [MQTT-3.3.1-9 (3.1.1),
    # MQTT-3.3.1-12 (5.0)] ...
    assert sub.recv().retain is False
    if rap is not None:
        # ... unless the subscription asked for Retain As Published [MQTT-3.3.1-13].
        assert rap.recv().retain is True
        pub.publish("ret/live", b"y", 1)
        assert rap.recv().retain is False


def test_retain_handling_options(client):
    pub = client(version=V5)
    pub.publish("rh/t", b"kept", 1, retain=True)

    always = client(version=V5)
    always.subscribe("rh/t", 1, retain_handling=0)
    assert [m.payload for m in always.collect_until_marker(pub)] == [b"kept"]
    always.subscribe("rh/t", 1, retain_handling=0)  # again: sent again
    assert [m.payload for m in always.collect_until_marker(pub)] == [b"kept"]

    if_new = client(version=V5)
    if_new.subscribe("rh/t", 1, retain_handling=1)
    assert [m.payload for m in if_new.collect_until_marker(pub)] == [b"kept"]
    if_new.subscribe("rh/t", 1, retain_handling=1)  # the subscription exists: not sent
    assert if_new.collect_until_marker(pub) == []

    never = client(version=V5)
    never.subscribe("rh/t", 1, retain_handling=2)
    assert never.collect_until_marker(pub) == []
    pub.publish("rh/t", b"live", 1)  # but live messages flow
    assert [m.payload for m in never.collect_until_marker(pub)] == [b"live"]


def test_retained_message_expires(client):
    pub = client(version=V5)
    published = time.monotonic()
    pub.publish("ret/exp", b"short", 1, retain=True,
                properties=props("PUBLISH", MessageExpiryInterval=1))
    pub.publish("ret/keep", b"long", 1, retain=True,
                properties=props("PUBLISH", MessageExpiryInterval=100))
    time.sleep(2)  # the broker held them at least this long

    sub = client(version=V5)
    sub.subscribe("ret/+", 1)
    received = sub.collect_until_marker(pub)
    held = time.monotonic() - published  # at most this long

    assert [m.payload for m in received] == [b"long"]
    # The expiry interval sent on is what is left of it [MQTT-3.3.2-6].
    assert 100 - held - 1 <= received[0].prop("MessageExpiryInterval") <= 98


def test_retained_message_from_v5_keeps_its_properties(client):
    pub = client(version=V5)
    pub.publish("ret/props", b"{}", 1, retain=True,
                properties=props("PUBLISH", ContentType="application/json",
                                 UserProperty=[("origin", "sensor-7")]))
    sub = client(version=V5)
    sub.subscribe("ret/props", 1)
    m = sub.recv()
    assert m.retain and m.prop("ContentType") == "application/json"
    assert m.prop("UserProperty") == [("origin", "sensor-7")]
