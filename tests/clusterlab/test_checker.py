"""The checker on histories written by hand: each rule flags what it must, and only that. A
checker that cannot fail would make every lab run pass."""

from __future__ import annotations

from clusterlab import History, check

MS = 1_000_000


class Script:
    """Writes a history event by event, 1 ms apart."""

    def __init__(self) -> None:
        self.h = History()
        self.t = 0

    def ev(self, client: str, type_: str, **fields) -> dict:
        self.t += MS
        event = {"t": self.t, "client": client, "type": type_, **fields}
        self.h.events.append(event)
        return event

    def subscribe(self, sub: str = "s", conn: int = 0, present: bool = False) -> None:
        self.ev(sub, "connect", conn=conn, node=0)
        self.ev(sub, "connack", conn=conn, session_present=present, rc=0)
        if not present:
            self.ev(sub, "suback", conn=conn, filter="lab/#", granted=2)

    def publish(self, seq: int, qos: int = 1, acked: bool = True, p: str = "p", conn: int = 0):
        self.ev(p, "invoke", conn=conn, seq=seq, topic=f"lab/{p}", qos=qos, mid=seq)
        if acked:
            self.ev(p, "ok", conn=conn, mid=seq)
        else:
            self.ev(p, "fail", conn=conn, seq=seq, why="no ack")

    def deliver(self, seq: int, qos: int = 1, sub: str = "s", conn: int = 0, dup: bool = False,
                p: str = "p") -> None:
        self.ev(sub, "deliver", conn=conn, topic=f"lab/{p}", qos=qos, dup=dup, p=p, seq=seq)


def rules(script: Script) -> set[str]:
    return {rule for rule, examples in check(script.h).violations.items() if examples}


def test_a_clean_history_passes():
    s = Script()
    s.subscribe()
    for seq in range(1, 6):
        s.publish(seq, qos=1 + seq % 2)
        s.deliver(seq, qos=1 + seq % 2)
    report = check(s.h)
    assert report.ok, report.summary()
    assert (report.published_ok, report.deliveries, report.subscribers) == (5, 5, 1)


def test_an_acknowledged_message_never_delivered_is_lost():
    s = Script()
    s.subscribe()
    s.publish(1)
    s.deliver(1)
    s.publish(2)
    report = check(s.h)
    assert rules(s) == {"lost"}
    assert report.count("lost") == 1


def test_what_was_not_acknowledged_or_came_before_the_suback_may_be_missing():
    s = Script()
    s.publish(1)  # before the subscription
    s.subscribe()
    s.publish(2, acked=False)  # indeterminate
    s.publish(3)
    s.deliver(3)
    assert rules(s) == set()
    # and an indeterminate one may arrive too, even after a later one
    s.deliver(2)
    assert rules(s) == set()


def test_a_qos2_message_delivered_twice_is_a_duplicate_even_across_connections():
    s = Script()
    s.subscribe()
    s.publish(1, qos=2)
    s.deliver(1, qos=2)
    s.subscribe(conn=1, present=True)
    s.deliver(1, qos=2, conn=1, dup=True)
    assert rules(s) == {"duplicate"}


def test_qos1_redelivery_needs_dup_or_a_new_connection():
    allowed = Script()
    allowed.subscribe()
    allowed.publish(1)
    allowed.deliver(1)
    allowed.deliver(1, dup=True)
    allowed.subscribe(conn=1, present=True)
    allowed.deliver(1, conn=1)
    report = check(allowed.h)
    assert report.ok, report.summary()
    assert report.qos1_redeliveries == 2

    flagged = Script()
    flagged.subscribe()
    flagged.publish(1)
    flagged.deliver(1)
    flagged.deliver(1)
    assert rules(flagged) == {"duplicate"}


def test_first_deliveries_out_of_sequence_order_are_flagged():
    s = Script()
    s.subscribe()
    for seq in (1, 2, 3):
        s.publish(seq)
    s.deliver(1)
    s.deliver(3)
    s.deliver(2)
    assert rules(s) == {"order"}


def test_order_is_per_publisher():
    s = Script()
    s.subscribe()
    s.publish(1, p="a")
    s.publish(1, p="b")
    s.publish(2, p="a")
    s.deliver(1, p="b")
    s.deliver(1, p="a")
    s.deliver(2, p="a")
    assert rules(s) == set()


def test_a_resumed_session_that_comes_back_empty_is_flagged():
    s = Script()
    s.subscribe()
    s.ev("s", "connect", conn=1, node=1)
    s.ev("s", "connack", conn=1, session_present=False, rc=0)
    assert rules(s) == {"session"}


def test_a_delivery_on_the_old_connection_after_the_new_connack_is_late():
    s = Script()
    s.subscribe()
    s.publish(1)
    s.publish(2)
    s.deliver(1)
    s.subscribe(conn=1, present=True)
    s.t += 1000 * MS  # a second later: past any grace
    s.deliver(2, conn=0)
    assert rules(s) == {"late"}

    within = Script()
    within.subscribe()
    within.publish(1)
    within.subscribe(conn=1, present=True)
    within.deliver(1, conn=0)  # 1 ms after: the reader threads' scheduling
    assert rules(within) == set()


def test_a_publish_read_on_a_left_connection_is_not_a_delivery_but_can_be_late():
    s = Script()
    s.subscribe()
    s.publish(1)
    s.subscribe(conn=1, present=True)
    s.ev("s", "stale", conn=0, packet=3, pid=7, topic="lab/p", qos=1, dup=False, p="p", seq=1)
    assert rules(s) == {"lost"}, "the broker must send it again on the new connection"
    s.deliver(1, conn=1, dup=True)
    assert rules(s) == set()
    s.t += 1000 * MS  # a second after the new CONNACK: the broker sent it on the old one late
    s.ev("s", "stale", conn=0, packet=3, pid=8, topic="lab/p", qos=1, dup=False, p="p", seq=1)
    assert rules(s) == {"late"}


def test_a_message_nobody_sent_is_a_phantom():
    s = Script()
    s.subscribe()
    s.deliver(7)
    assert rules(s) == {"phantom"}


def test_an_acknowledgement_is_matched_by_connection_and_packet_id():
    s = Script()
    s.subscribe()
    s.ev("p", "invoke", conn=0, seq=1, topic="lab/p", qos=1, mid=1)
    s.ev("p", "fail", conn=0, seq=1, why="no ack")
    s.ev("p", "invoke", conn=1, seq=2, topic="lab/p", qos=1, mid=1)
    s.ev("p", "ok", conn=1, mid=1)
    report = check(s.h)
    # seq 2 was acknowledged (on connection 1), seq 1 was not: only 2 must arrive.
    assert report.published_ok == 1
    assert rules(s) == {"lost"}
    assert "p/2" in report.violations["lost"][0]
