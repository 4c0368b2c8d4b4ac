"""The checker: reads a history afterwards and says what the brokers did wrong.

Modelled on Jepsen's total-queue check: every acknowledged publication must come out at every
subscriber that was subscribed before it was sent, and nothing may come out that was never put
in. The rules (the pass criteria of docs/cluster.md):

1. lost: a publication acknowledged (PUBACK/PUBCOMP) that a persistent subscriber whose SUBACK
   came before the publication was sent never received.
2. duplicates: a QoS 2 message delivered twice to one subscriber is a violation; a QoS 1
   message delivered again is allowed when the repeat has DUP set or comes on a later
   connection (counted, not a violation), otherwise a violation.
3. order: a subscriber's first deliveries of acknowledged publications from one publisher on
   one topic come in sequence order.
4. session: a connection to a session that has not expired comes back with session present
   = 1 (the lab's sessions never expire during a run).
5. late: nothing is delivered on a connection after the CONNACK of the same client's next
   connection (allowing `grace` seconds for the reader threads' scheduling). A PUBLISH the
   client read on a connection it had left (`stale`, not a delivery) counts here too.
6. phantom: nothing is delivered that no publisher ever sent.

Publications that got no acknowledgement (fail) are indeterminate: they may or may not arrive.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from .history import History

NS = 1_000_000_000
PUBLISH = 3  # the MQTT packet type a `stale` event names


@dataclasses.dataclass
class Report:
    """What the checker found: counts, and a few examples of each violation."""

    published_ok: int = 0
    published_indeterminate: int = 0
    deliveries: int = 0
    subscribers: int = 0
    reconnects: int = 0
    qos1_redeliveries: int = 0
    violations: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: defaultdict(list))

    EXAMPLES = 10

    def flag(self, rule: str, example: str) -> None:
        self.violations[rule].append(example)

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())

    def count(self, rule: str) -> int:
        return len(self.violations.get(rule, []))

    def summary(self) -> str:
        lines = [
            f"publications acknowledged {self.published_ok}, indeterminate "
            f"{self.published_indeterminate}; deliveries {self.deliveries} to "
            f"{self.subscribers} subscribers over {self.reconnects} reconnections; QoS 1 "
            f"redeliveries allowed {self.qos1_redeliveries}",
        ]
        for rule, examples in sorted(self.violations.items()):
            if examples:
                lines.append(f"VIOLATION {rule}: {len(examples)}")
                lines.extend(f"    {e}" for e in examples[: self.EXAMPLES])
        if self.ok:
            lines.append("no violations")
        return "\n".join(lines)


def check(history: History, grace: float = 0.25) -> Report:
    """Checks a history (see the module's documentation)."""
    events = history.sorted()
    report = Report()

    # --- publications -------------------------------------------------------------------
    # (publisher, seq) -> invoke event, with "status" ok / fail / unknown.
    pubs: dict[tuple[str, int], dict] = {}
    by_mid: dict[tuple[str, int, int], tuple[str, int]] = {}
    for e in events:
        if e["type"] == "invoke":
            key = (e["client"], e["seq"])
            pubs[key] = dict(e, status="unknown")
            by_mid[(e["client"], e["conn"], e["mid"])] = key
        elif e["type"] == "ok":
            key = by_mid.get((e["client"], e["conn"], e["mid"]))
            if key is None:
                report.flag("checker", f"an acknowledgement for no publication: {e}")
                continue
            pubs[key]["status"] = "ok"
        elif e["type"] == "fail":
            key = (e["client"], e["seq"])
            if key in pubs and pubs[key]["status"] == "unknown":
                pubs[key]["status"] = "fail"
    report.published_ok = sum(1 for p in pubs.values() if p["status"] == "ok")
    report.published_indeterminate = len(pubs) - report.published_ok

    # --- subscribers --------------------------------------------------------------------
    per_sub: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        if e["type"] in ("connect", "connack", "suback", "deliver", "resent", "stale", "lost",
                         "disconnected"):
            per_sub[e["client"]].append(e)
    report.subscribers = len(per_sub)

    for sub, evs in sorted(per_sub.items()):
        subacks = [e for e in evs if e["type"] == "suback"]
        first_suback = subacks[0]["t"] if subacks else None
        connacks = [e for e in evs if e["type"] == "connack" and e["rc"] == 0]
        report.reconnects += max(len(connacks) - 1, 0)
        deliveries = [e for e in evs if e["type"] == "deliver"]
        report.deliveries += len(deliveries)

        # 4. session present on every connection after the session was made.
        for ack in connacks:
            if first_suback is not None and ack["t"] > first_suback and not ack["session_present"]:
                report.flag("session", f"{sub} conn {ack['conn']}: session present = 0 at "
                                       f"{ack['t'] / NS:.3f}s")

        # 5. nothing on a connection after the next connection's CONNACK.
        # A PUBLISH the client read on a connection it had already left (`stale`: not a
        # delivery, the broker sends it again) still says when the broker sent it.
        acked_at = {ack["conn"]: ack["t"] for ack in connacks}
        stale = [e for e in evs if e["type"] == "stale" and e.get("packet") == PUBLISH]
        for d in sorted(deliveries + stale, key=lambda e: e["t"]):
            later = [t for conn, t in acked_at.items() if conn > d["conn"]]
            if later and d["t"] > min(later) + grace * NS:
                report.flag("late", f"{sub} conn {d['conn']}: {d['p']}/{d['seq']} delivered "
                                    f"{(d['t'] - min(later)) / NS:.3f}s after a later CONNACK")

        # 6, 2, 3: what each delivery is.
        seen: dict[tuple[str, int], dict] = {}
        last_seq: dict[tuple[str, str], int] = {}
        for d in deliveries:
            key = (d["p"], d["seq"])
            pub = pubs.get(key)
            if pub is None:
                report.flag("phantom", f"{sub} conn {d['conn']}: {d['topic']} {key} was never "
                                       f"published")
                continue
            previous = seen.get(key)
            if previous is None:
                seen[key] = d
                stream = (d["p"], d["topic"])
                if pub["status"] != "ok":
                    # Given up on by its publisher, it may come late (from a connection the
                    # publisher left): order is about acknowledged publications.
                    continue
                if d["seq"] < last_seq.get(stream, 0):
                    report.flag("order", f"{sub}: {d['p']}/{d['seq']} after "
                                         f"{d['p']}/{last_seq[stream]} on {d['topic']}")
                last_seq[stream] = max(last_seq.get(stream, 0), d["seq"])
            elif d["qos"] == 2:
                report.flag("duplicate", f"{sub}: QoS 2 {key} delivered again (conn "
                                         f"{previous['conn']} then {d['conn']})")
            elif d["dup"] or d["conn"] != previous["conn"]:
                report.qos1_redeliveries += 1
                seen[key] = d
            else:
                report.flag("duplicate", f"{sub}: QoS 1 {key} delivered again on conn "
                                         f"{d['conn']} without DUP")

        # 1. every acknowledged publication sent after the SUBACK arrived.
        if first_suback is not None:
            for key, pub in pubs.items():
                if pub["status"] == "ok" and pub["qos"] > 0 and pub["t"] > first_suback \
                        and key not in seen:
                    report.flag("lost", f"{sub}: {key[0]}/{key[1]} (QoS {pub['qos']}, "
                                        f"acknowledged) never delivered")
    return report
