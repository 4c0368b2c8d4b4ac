"""The lab's faults on a `LabCluster`, each recorded in the history (`client` "nemesis"), and a
randomised schedule of them.

```python
nemesis = Nemesis(cluster, history)
nemesis.kill(2); nemesis.start(2)          # kill -9, and the same data directory again
nemesis.partition([[1, 2], [3]]); nemesis.heal()
nemesis.pause(1); nemesis.resume(1)        # SIGSTOP, SIGCONT
nemesis.heal_all()                         # whatever is still broken, mended

schedule = Schedule(seed=lab_seed(), duration=50)   # LAB_SEED=... reproduces a schedule
run(history, cluster.nodes, lambda pubs: schedule.play(nemesis), ...)
```

A schedule is drawn from `random.Random(seed)` before it is played: the same seed gives the
same faults, nodes, durations and gaps (the workload's own timing still varies). Faults come
one at a time, each healed before a quiet gap, and `play` always ends with everything healed,
resumed and restarted, and a leader every node agrees on.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time

# Elections take 1.5-3 s (docs/cluster.md); a debug build on a loaded machine is slower.
ELECT = 60.0
KINDS = ("kill", "partition", "split", "pause")


def lab_seed() -> int:
    """`$LAB_SEED` if set (to replay a run), else a fresh seed."""
    seed = os.environ.get("LAB_SEED")
    return int(seed) if seed else random.SystemRandom().randrange(1, 2**31)


class Nemesis:
    """Faults on `cluster`, recorded in `history` as `nemesis` events with the node(s)."""

    def __init__(self, cluster, history):
        self.cluster = cluster
        self.history = history
        self.paused: set[int] = set()
        self.killed: set[int] = set()
        self.counts: dict[str, int] = {}
        # The checker's report of the run the faults were part of, once there is one.
        self.report = None

    def _record(self, type_: str, **fields) -> None:
        # The wall clock too, to find the moment in the nodes' logs.
        self.history.record("nemesis", type_, wall=time.strftime(
            "%H:%M:%S", time.gmtime()) + f"{time.time() % 1:.3f}"[1:], **fields)

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def kill(self, node: int) -> None:
        self._record("kill", node=node)
        self.cluster.brokers[node].kill()
        self.killed.add(node)
        self._count("kill")

    def kill_all(self) -> None:
        """kill -9 of every node at once (the signals first, then the waits)."""
        nodes = sorted(self.cluster.running())
        self._record("kill", nodes=nodes)
        for i in nodes:
            self.cluster.brokers[i].proc.kill()
        for i in nodes:
            self.cluster.brokers[i].proc.wait()
        self.killed.update(nodes)
        self._count("kill all")

    def start(self, node: int) -> None:
        self._record("start", node=node)
        self.cluster.brokers[node].start()
        self.killed.discard(node)
        self._record("started", node=node)

    def pause(self, node: int) -> None:
        self._record("pause", node=node)
        self.cluster.brokers[node].pause()
        self.paused.add(node)
        self._count("pause")

    def resume(self, node: int) -> None:
        self.cluster.brokers[node].resume()
        self.paused.discard(node)
        self._record("resume", node=node)

    def partition(self, groups: list[list[int]]) -> None:
        self._record("partition", groups=groups)
        self.cluster.net.partition(groups)
        self._count("partition" if len(groups) == 2 else f"partition {len(groups)} ways")

    def heal(self) -> None:
        self.cluster.net.heal()
        self._record("heal")

    def heal_all(self) -> None:
        """Heals the network, resumes paused nodes and starts killed ones."""
        if self.cluster.net.cut is not None:
            self.heal()
        for node in sorted(self.paused):
            self.resume(node)
        for node in sorted(self.killed):
            self.start(node)

    def last_heal(self) -> int | None:
        """When the last fault was mended (`time.monotonic_ns()`), if any was."""
        times = [e["t"] for e in self.history.events
                 if e["client"] == "nemesis" and e["type"] in ("heal", "resume", "started")]
        return max(times) if times else None

    def summary(self) -> str:
        return ", ".join(f"{kind} {n}" for kind, n in sorted(self.counts.items())) or "none"


@dataclasses.dataclass
class Step:
    """One fault: `kind` on `nodes` (a partition's groups for `partition` and `split`), held
    `hold` seconds, then a quiet `gap`."""

    kind: str
    nodes: list
    hold: float
    gap: float


class Schedule:
    """Faults drawn from `seed` until their holds and gaps fill `duration` seconds: kill -9 and
    restart of a node, a 2/1 partition, a 1/1/1 partition (`split`), a pause (SIGSTOP then
    SIGCONT), held `hold` seconds each (a range) with `gap` seconds (a range) between."""

    def __init__(self, seed: int, duration: float, nodes=(1, 2, 3), hold=(2.0, 8.0),
                 gap=(1.0, 4.0), kinds=KINDS):
        self.seed = seed
        self.duration = duration
        rng = random.Random(seed)
        self.steps: list[Step] = []
        total = 0.0
        nodes = list(nodes)
        while total < duration:
            kind = rng.choice(kinds)
            node = rng.choice(nodes)
            if kind in ("kill", "pause"):
                target = [node]
            elif kind == "partition":
                target = [[i for i in nodes if i != node], [node]]
            else:
                target = [[i] for i in nodes]
            step = Step(kind, target, round(rng.uniform(*hold), 2), round(rng.uniform(*gap), 2))
            self.steps.append(step)
            total += step.hold + step.gap

    def describe(self) -> str:
        return "; ".join(f"{s.kind} {s.nodes} {s.hold}s" for s in self.steps)

    def play(self, nemesis: Nemesis, stop_after: float | None = None) -> None:
        """Applies the steps in order (each mended after its hold, then the cluster's leader
        awaited before the gap), and leaves everything mended whatever happens. Records the
        seed and the schedule first."""
        nemesis.history.record("nemesis", "schedule", seed=self.seed, duration=self.duration,
                               steps=[dataclasses.asdict(s) for s in self.steps])
        started = time.monotonic()
        try:
            for step in self.steps:
                if stop_after is not None and time.monotonic() - started > stop_after:
                    break
                if step.kind == "kill":
                    nemesis.kill(step.nodes[0])
                    time.sleep(step.hold)
                    nemesis.start(step.nodes[0])
                elif step.kind == "pause":
                    nemesis.pause(step.nodes[0])
                    time.sleep(step.hold)
                    nemesis.resume(step.nodes[0])
                else:
                    nemesis.partition(step.nodes)
                    time.sleep(step.hold)
                    nemesis.heal()
                nemesis.cluster.wait_leader(ELECT)
                time.sleep(step.gap)
        finally:
            nemesis.heal_all()
        nemesis.cluster.wait_leader(ELECT)
