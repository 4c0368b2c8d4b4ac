"""The lab's subscriber as a client: what it does with packets that arrive on its connections,
fed by hand (no broker). Its session state must be right, or the checker blames the broker for
what the client got wrong."""

from __future__ import annotations

import json

from clusterlab import History, check
from clusterlab import raw
from clusterlab.workload import Subscriber


class Wire:
    """Stands in for a connection: keeps what the subscriber sends."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


def publish(seq: int, pid: int, dup: bool = False) -> raw.Packet:
    return raw.Packet(type=raw.PUBLISH, flags=0, raw=b"", packet_id=pid, topic="lab/p", qos=2,
                      dup=dup, payload=json.dumps({"p": "p", "s": seq}).encode())


def pubrel(pid: int) -> raw.Packet:
    return raw.Packet(type=raw.PUBREL, flags=2, raw=b"", packet_id=pid)


def test_what_a_left_connection_still_reads_does_not_touch_the_session():
    history = History()
    sub = Subscriber(history, "s", lambda: [])
    old, new = Wire(), Wire()
    for seq in (1, 2):
        history.record("p", "invoke", conn=0, seq=seq, topic="lab/p", qos=2, mid=seq)
        history.record("p", "ok", conn=0, mid=seq)
    history.record("s", "connack", conn=0, session_present=False, rc=0)
    history.record("s", "suback", conn=0, filter="lab/#", granted=2)
    sub._current = 0
    # The broker sent message 1 on connection 0 (packet id 7), then the client connected again
    # before reading it: connection 1 has its CONNACK and gets message 1 again, with DUP,
    # and its PUBREL. Only then does connection 0's reader get to the first copy.
    history.record("s", "connack", conn=1, session_present=True, rc=0)
    sub._current = 1
    sub._handle(new, 1, publish(1, 7, dup=True))
    sub._handle(new, 1, pubrel(7))
    sub._handle(old, 0, publish(1, 7))
    sub._handle(old, 0, pubrel(7))
    # The broker reuses packet id 7 for the next message: a new delivery, not a repeat.
    sub._handle(new, 1, publish(2, 7))

    assert old.sent == [], "nothing is acknowledged on a connection the client left"
    assert new.sent == [raw.pubrec(7), raw.pubcomp(7), raw.pubrec(7)]
    kinds = [(e["type"], e["conn"], e.get("seq")) for e in history.events if e["client"] == "s"
             and e["type"] in ("deliver", "resent", "stale")]
    assert kinds == [("deliver", 1, 1), ("stale", 0, 1), ("stale", 0, None), ("deliver", 1, 2)]
    report = check(history)
    assert report.ok, report.summary()
    assert report.deliveries == 2


def test_a_disconnect_on_a_left_connection_is_still_recorded():
    history = History()
    sub = Subscriber(history, "s", lambda: [])
    sub._current = 1
    sub._handle(Wire(), 0, raw.Packet(type=raw.DISCONNECT, flags=0, raw=b"", reason=0x8E))
    assert [(e["type"], e["rc"]) for e in history.events] == [("disconnected", 0x8E)]
