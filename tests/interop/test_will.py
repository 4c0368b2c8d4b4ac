"""Will messages: published when a client vanishes, not when it says goodbye; MQTT 5's will
delay and DISCONNECT with reason 0x04."""

import time

import mqttraw
from pahoclient import BOTH_VERSIONS, V5, persistent, props

WILL_TOPIC = "will/status"


def watcher(client, version=V5):
    w = client(version=version)
    w.subscribe("will/#", 2)
    return w


@BOTH_VERSIONS
def test_will_is_published_when_the_connection_drops(client, version):
    w = watcher(client, version)
    victim = client(version=version, will=(WILL_TOPIC, b"offline", 1, False, None))
    victim.subscribe("something/else", 0)

    victim.kill()

    m = w.recv()
    assert (m.topic, m.payload, m.qos) == (WILL_TOPIC, b"offline", 1)


def fence_wills(client, w, client_id, version):
    """Asserts that `w` got no will from the connection of `client_id` that just closed.

    A new connection with the same client identifier gets its CONNACK only once the broker has
    finished with the old one, will included; a marker through `w`'s queue after that proves
    that any will it published has been delivered."""
    again = client(client_id, version=version, clean=True)
    assert w.collect_until_marker(again) == []


@BOTH_VERSIONS
def test_will_is_not_published_on_normal_disconnect(client, version):
    w = watcher(client, version)
    polite = client("polite", version=version, will=(WILL_TOPIC, b"offline", 1, False, None))

    polite.disconnect()

    fence_wills(client, w, "polite", version)


@BOTH_VERSIONS
def test_retained_will_is_kept_for_later_subscribers(client, version):
    w = watcher(client, version)
    victim = client(version=version, will=(WILL_TOPIC, b"offline", 1, True, None))
    victim.kill()
    assert w.recv().payload == b"offline"  # published, so retained by now

    late = client(version=version)
    late.subscribe(WILL_TOPIC, 1)
    m = late.recv()
    assert (m.payload, m.retain) == (b"offline", True)


def test_disconnect_with_will_message_publishes_the_will(client):
    w = watcher(client)
    c = client(version=V5, will=(WILL_TOPIC, b"asked for", 1, False, None))

    c.disconnect(reason=0x04)  # Disconnect with Will Message

    m = w.recv()
    assert (m.topic, m.payload) == (WILL_TOPIC, b"asked for")


def test_will_properties_are_passed_on(client):
    w = watcher(client)
    will_props = props("WILLMESSAGE", ContentType="text/plain", UserProperty=[("why", "crash")],
                       ResponseTopic="will/ask", CorrelationData=b"\x01\x02")
    victim = client(version=V5, will=(WILL_TOPIC, b"bye", 1, False, will_props))
    victim.kill()

    m = w.recv()
    assert m.prop("ContentType") == "text/plain"
    assert m.prop("UserProperty") == [("why", "crash")]
    assert m.prop("ResponseTopic") == "will/ask"
    assert m.prop("CorrelationData") == b"\x01\x02"


def persistent_with_delayed_will(client, client_id, delay, expiry):
    return client(client_id, version=V5, clean=True,
                  properties=props("CONNECT", SessionExpiryInterval=expiry),
                  will=(WILL_TOPIC, b"late", 1, False,
                        props("WILLMESSAGE", WillDelayInterval=delay)))


def test_will_delay_postpones_the_will(client):
    w = watcher(client)
    victim = persistent_with_delayed_will(client, "delayed", delay=2, expiry=60)
    gone = time.monotonic()  # the broker sees the connection drop after this
    victim.kill()

    m = w.recv()
    elapsed = time.monotonic() - gone

    assert m.payload == b"late"
    assert elapsed >= 1.8, elapsed  # not before the delay; later only on a slow machine


def fence_delayed_will(client, w, delay):
    """A will with `delay` from a client dropped now: it is due after any will of that delay
    from a client dropped earlier, so its arrival proves those were not published. Returns the
    messages `w` received before it."""
    fence = client(version=V5, will=("will/fence", b"fence", 1, False,
                                     props("WILLMESSAGE", WillDelayInterval=delay)),
                   properties=props("CONNECT", SessionExpiryInterval=delay + 60))
    fence.kill()
    out = []
    while (m := w.recv()).topic != "will/fence":
        out.append(m)
    return out


def test_will_is_not_published_if_the_client_reconnects_within_the_delay(client):
    w = watcher(client)
    # The reconnect must come within the delay: 10 s is plenty even on a slow machine.
    persistent_with_delayed_will(client, "comes-back", delay=10, expiry=60).kill()

    back = client("comes-back", version=V5, clean=False,
                  properties=props("CONNECT", SessionExpiryInterval=60))
    assert back.session_present

    # [MQTT-3.1.3-9]: a new connection to the session before the delay cancels the will.
    assert fence_delayed_will(client, w, 10) == []


def test_will_is_published_when_the_session_ends_before_the_delay(client):
    w = watcher(client)
    victim = persistent_with_delayed_will(client, "short-session", delay=60, expiry=1)
    gone = time.monotonic()  # the broker sees the connection drop after this
    victim.kill()

    # The will goes out when the delay passes or the session ends, whichever is first: after
    # about 1 s, not 60 (the wait for it ends after 30 s).
    m = w.recv()
    assert m.payload == b"late"
    assert time.monotonic() - gone >= 0.8


def test_will_delay_with_normal_disconnect_sends_nothing(client):
    w = watcher(client)
    persistent_with_delayed_will(client, "polite-delayed", delay=1, expiry=2).disconnect()
    # The fence's will is due 3 s after the DISCONNECT, after both the delay and the end of
    # the session, either of which would have published the will.
    assert fence_delayed_will(client, w, 3) == []


@BOTH_VERSIONS
def test_will_is_published_when_the_session_is_taken_over(client, version):
    w = watcher(client, version)
    client("will-taken", version=version, will=(WILL_TOPIC, b"replaced", 1, False, None))

    client("will-taken", version=version)

    # The old connection was closed by the broker, not by a DISCONNECT: its will goes out.
    assert w.recv().payload == b"replaced"


@BOTH_VERSIONS
def test_will_is_published_when_a_persistent_session_is_taken_over(client, version):
    w = watcher(client, version)
    client("will-resumed", version=version, will=(WILL_TOPIC, b"replaced", 1, False, None),
           **persistent(version))

    taker = client("will-resumed", version=version, **persistent(version))

    assert taker.session_present
    # The broker closed the old connection: its will (no delay) goes out [MQTT-3.1.4-3], even
    # though the new connection resumes the session.
    assert w.recv().payload == b"replaced"


@BOTH_VERSIONS
def test_disconnect_then_immediate_reconnect_publishes_no_will(client, raw, version):
    w = watcher(client, version)
    session = {"SessionExpiryInterval": 3600} if version == V5 else None
    for i in range(20):  # the reconnect races the DISCONNECT inside the broker
        a = raw(f"quick-{i}", version=version, clean=False, props=session,
                will=mqttraw.Will(WILL_TOPIC, b"should not be sent"))
        a.send(mqttraw.disconnect(version=version))
        b = raw(f"quick-{i}", version=version, clean=False, props=session)
        assert b.connack.session_present
        a.close()
        b.close()
    # Each CONNACK to b came after the broker had finished with a, will included.
    assert w.collect_until_marker(client(version=version)) == []
