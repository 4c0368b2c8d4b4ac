"""A cluster of real mqttd nodes in the lab's network: node `i` runs in namespace `n<i>` at
10.88.0.<i>, with a `[cluster]` section naming the others as seeds (cluster port 1884 in each
node's own namespace, so no port is shared with anything else), certificates from the lab's CA,
and `tcp://` and `http://` listeners on port 0.

```python
with ClusterNet(3) as net:
    cluster = LabCluster(net, tmp_path)
    cluster.start_all()
    leader = cluster.wait_leader(60)          # agreed on by every node running
    cluster.brokers[leader].kill()            # kill -9
    cluster.wait_leader(60, among=others)
    nodes = cluster.nodes                      # [(ip, tcp port)] of the nodes running
```
"""

from __future__ import annotations

import time
from pathlib import Path

from .broker import Broker
from .certs import make_ca, make_node
from .net import ClusterNet, node_ip

CLUSTER_PORT = 1884
# A lab session may be unreachable for much of a run (its claims refused while faults come one
# after another): its queue holds everything published meanwhile, so that a message dropped
# for a full queue (the default holds 1,000) is never mistaken for one the cluster lost.
QUEUE_CONFIG = """max_queued_messages = 1000000
max_queued_bytes = 0
"""


def node_name(i: int) -> str:
    return f"node-{i}"


class LabCluster:
    """`net.n` mqttd nodes configured as one cluster (started by `start_all`)."""

    def __init__(self, net: ClusterNet, base: Path, extra_config: str = ""):
        self.net = net
        self.base = base
        certs = base / "certs"
        make_ca(certs)
        self.brokers: dict[int, Broker] = {}
        for i in net.nodes:
            cert, key = make_node(certs, node_name(i))
            seeds = ", ".join(
                f'{{ id = {j}, name = "{node_name(j)}", addr = "{node_ip(j)}:{CLUSTER_PORT}" }}'
                for j in net.nodes if j != i)
            config = f"""{QUEUE_CONFIG}{extra_config}
[cluster]
node_id = {i}
name = "{node_name(i)}"
listen = "{node_ip(i)}:{CLUSTER_PORT}"
seeds = [{seeds}]
ca = "{certs / 'ca.pem'}"
cert = "{cert}"
key = "{key}"
"""
            ip = node_ip(i)
            self.brokers[i] = Broker(base / f"n{i}", config=config, host=ip, ns=net.nodes[i],
                                     listen=[f"tcp://{ip}:0", f"http://{ip}:0"])

    def start_all(self) -> None:
        for broker in self.brokers.values():
            broker.start()

    def running(self) -> list[int]:
        return [i for i, b in self.brokers.items() if b.proc is not None and b.proc.poll() is None]

    def nodes(self) -> list[tuple[str, int]]:
        """(address, MQTT port) of every node running: the workload's `nodes` callable."""
        return [self.brokers[i].addr() for i in self.running()]

    def status(self, i: int) -> dict | None:
        """Node `i`'s `GET /api/v1/cluster`, or None if it does not answer."""
        try:
            return self.brokers[i].api("/api/v1/cluster", timeout=3.0)
        except OSError:
            return None

    def wait_leader(self, timeout: float, among: list[int] | None = None,
                    not_: set[int] = frozenset()) -> int:
        """The leader every node of `among` (default: those running) agrees on, with every
        configured node a member, and not one of `not_` (a node just killed or cut off, which
        the others name until they elect another); waits for it."""
        among = among if among is not None else self.running()
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            seen = {i: self.status(i) for i in among}
            leaders = {s.get("leader") if s else None for s in seen.values()}
            if len(leaders) == 1 and None not in leaders:
                leader = leaders.pop()
                if leader not in not_ and all(len(s["members"]) == len(self.brokers) for s in seen.values()):
                    return leader
            time.sleep(0.3)
        raise TimeoutError(f"no agreed leader among {among} within {timeout}s: {seen}")

    def membership(self, i: int) -> tuple | None:
        """Node `i`'s view of the membership: (id, name, role, incarnation) of every member,
        sorted, or None if it does not answer."""
        status = self.status(i)
        if status is None:
            return None
        return tuple(sorted((m["node_id"], m["name"], m["role"], m.get("incarnation"))
                            for m in status["members"]))

    def wait_converged(self, timeout: float) -> dict:
        """Waits until every running node agrees on the leader, the membership (every
        configured node a member, same roles and incarnations) and every member's route digest,
        with nothing known of a node that is not a member (criterion 7). Returns the agreed
        view; raises TimeoutError with the last views."""
        deadline = time.monotonic() + timeout
        views = None
        while True:
            views = {}
            for i in self.running():
                status = self.status(i)
                if status is None:
                    views[i] = None
                    continue
                members = self.membership(i)
                digests = {m["node_id"]: (m.get("routes") or {}).get("digest")
                           for m in status["members"]}
                views[i] = (status.get("leader"), members, tuple(sorted(digests.items())))
            distinct = set(views.values())
            if len(distinct) == 1 and None not in distinct:
                leader, members, digests = distinct.pop()
                ids = {m[0] for m in members}
                if (leader is not None and ids == set(self.brokers)
                        and {d[0] for d in digests} == ids and all(d[1] for d in digests)):
                    return {"leader": leader, "members": members, "digests": dict(digests)}
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the nodes did not agree within {timeout:.1f}s: {views}")
            time.sleep(0.3)

    def digests(self, i: int) -> dict[int, str | None] | None:
        """Node `i`'s view of every member's route digest (`GET /api/v1/cluster`)."""
        status = self.status(i)
        if status is None:
            return None
        return {m["node_id"]: (m.get("routes") or {}).get("digest") for m in status["members"]}

    def wait_digests_agree(self, timeout: float) -> dict[int, str | None]:
        """Waits until every running node holds the same routes (digests) for every member."""
        deadline = time.monotonic() + timeout
        views = None
        while time.monotonic() < deadline:
            views = {i: self.digests(i) for i in self.running()}
            distinct = {tuple(sorted(v.items())) if v else None for v in views.values()}
            if len(distinct) == 1 and None not in distinct:
                return next(iter(views.values()))
            time.sleep(0.3)
        raise TimeoutError(f"the nodes' route digests did not agree within {timeout}s: {views}")
