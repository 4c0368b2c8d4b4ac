"""The workload and the checker against one real mqttd: persistent subscribers that keep
taking their sessions over, QoS 1 and 2 publishers, and a kill -9 of the broker in the middle
(`durability = "sync"`, the default). With one node, a kill -9 of the whole "cluster": nothing
acknowledged may be lost, nothing delivered twice at QoS 2, nothing out of order, no session
lost. The same workload and checker run against three nodes once the broker clusters."""

from __future__ import annotations

import time

from clusterlab import Publisher, Subscriber, check, healthy, quiesce
from clusterlab.broker import Broker


def test_kill_minus_9_loses_nothing_acknowledged(tmp_path, history):
    broker = Broker(tmp_path / "node").start()
    nodes = lambda: [broker.addr()]  # noqa: E731 - the address changes at the restart
    subs = [Subscriber(history, f"sub-{i}", nodes, hop_every=(1.0, 3.0)) for i in range(3)]
    pubs = [Publisher(history, f"pub-{i}", nodes, qos=1 + i % 2) for i in range(4)]
    try:
        for s in subs:
            s.start()
        for s in subs:
            s.wait_subscribed(30)
        for p in pubs:
            p.start()
        time.sleep(4)
        before_kill = sum(p.acked for p in pubs)
        broker.kill()
        time.sleep(0.5)
        broker.start()
        time.sleep(4)
        for p in pubs:
            p.stop()
        waited = quiesce(subs, quiet=3.0, limit=90.0)
    finally:
        for p in pubs:
            p.stop()
        for s in subs:
            s.stop()
        broker.stop()
    healthy(*pubs, *subs)
    report = check(history)
    print(report.summary())
    print(f"drained in {waited:.1f}s")
    assert report.ok, report.summary() + "\n" + broker.log()[-3000:]
    # The run did something: publications on both sides of the kill, and takeovers.
    assert before_kill >= 20, report.summary()
    assert report.published_ok >= before_kill + 20, report.summary()
    assert report.reconnects >= 3, report.summary()
