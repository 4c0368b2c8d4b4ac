"""The workload and the checker against one real mqttd: persistent subscribers that keep
taking their sessions over, QoS 1 and 2 publishers, and a kill -9 of the broker in the middle
(`durability = "sync"`, the default). With one node, a kill -9 of the whole "cluster": nothing
acknowledged may be lost, nothing delivered twice at QoS 2, nothing out of order, no session
lost. The same workload and checker run against three nodes once the broker clusters."""

from __future__ import annotations

import time

from clusterlab import run
from clusterlab.broker import Broker


def test_kill_minus_9_loses_nothing_acknowledged(tmp_path, history):
    broker = Broker(tmp_path / "node").start()
    nodes = lambda: [broker.addr()]  # noqa: E731 - the address changes at the restart
    before_kill = 0

    def kill_and_restart(pubs):
        nonlocal before_kill
        time.sleep(4)
        before_kill = sum(p.acked for p in pubs)
        broker.kill()
        time.sleep(0.5)
        broker.start()
        time.sleep(4)

    try:
        report = run(history, nodes, kill_and_restart, publishers=4, subscribers=3)
    finally:
        broker.stop()
    print(report.summary())
    assert report.ok, report.summary() + "\n" + broker.log()[-3000:]
    # The run did something: publications on both sides of the kill, and takeovers.
    assert before_kill >= 20, report.summary()
    assert report.published_ok >= before_kill + 20, report.summary()
    assert report.reconnects >= 3, report.summary()
