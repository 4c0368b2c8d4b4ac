"""A history: what every client of a run did and saw, in the order it happened.

Each event is a dict with at least `t` (`time.monotonic_ns()`: one clock for every process on
the machine, network namespaces included), `client` and `type`. The types:

publishers (`client` is the publisher's name, which payloads carry as `p`):
  dial     {conn, host}                   a new connection to the node at `host`
  invoke   {conn, seq, topic, qos, mid}   a PUBLISH is about to be sent (before the send)
  ok       {conn, mid}                    PUBACK (QoS 1) or PUBCOMP (QoS 2) for `mid` on `conn`
  fail     {conn, seq, why}               no acknowledgement: the publication is indeterminate

subscribers (persistent sessions):
  connect  {conn, node}                   a CONNECT is about to be sent to node `node`
  connack  {conn, session_present, rc}
  suback   {conn, filter, granted}
  deliver  {conn, topic, qos, dup, p, seq}
  lost     {conn, why}                    the connection ended (taken over, dropped, closed)

`conn` numbers a client's connections 0, 1, 2, ... in the order they were opened.

Events are kept in memory (appending to a list is atomic under the GIL) and written as JSON
lines by `dump`, one line per event, so that a failed run leaves its history as an artifact.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class History:
    """The events of a run, appended from any thread."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def record(self, client: str, type_: str, **fields) -> dict:
        event = {"t": time.monotonic_ns(), "client": client, "type": type_, **fields}
        self.events.append(event)
        return event

    def extend(self, events) -> None:
        self.events.extend(events)

    def sorted(self) -> list[dict]:
        """The events in time order (threads append with a small lag)."""
        return sorted(self.events, key=lambda e: e["t"])

    def dump(self, path: Path) -> None:
        with open(path, "w") as out:
            for event in self.sorted():
                out.write(json.dumps(event, separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: Path) -> "History":
        history = cls()
        with open(path) as lines:
            history.events = [json.loads(line) for line in lines if line.strip()]
        return history
