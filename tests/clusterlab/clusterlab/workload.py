"""Clients that log their history: publishers whose payloads carry (publisher, sequence), and
persistent subscribers that reconnect to random nodes.

```python
history = History()
nodes = lambda: [("127.0.0.1", port)]        # called again at every (re)connection
pubs = [Publisher(history, f"pub-{i}", nodes, qos=1 + i % 2) for i in range(4)]
subs = [Subscriber(history, f"sub-{i}", nodes, hop_every=(2.0, 5.0)) for i in range(3)]
for s in subs: s.start(); s.wait_subscribed(30)
for p in pubs: p.start()
...                                           # kill, partition, pause, restart nodes
for p in pubs: p.stop()
quiesce(subs, quiet=3.0, limit=60.0)          # until nothing new arrives for 3 s
for s in subs: s.stop()
report = check(history)
```

Given `net` (a `ClusterNet`), clients open their sockets in its clients' namespace.

Each connection is a fresh paho-mqtt client driven by a thread of its own that calls `loop()`:
paho's own reconnection is never used, so that a connection the broker closed (a takeover, a
node killed) stays closed, and every new connection is one the history records.
"""

from __future__ import annotations

import json
import random
import threading
import time
import traceback

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import raw
from .checker import check
from .history import History

TOPIC_PREFIX = "lab"
# Long enough never to expire during a run: an expired session is not what the lab tests.
SESSION_EXPIRY = 3600
# A CONNECT may wait for the cluster: a claim needs a quorum (up to 5 s; an election takes up
# to 3 s), and a session taken from a node that does not answer waits for its lease (3 s).
CONNECT_TIMEOUT = 10.0
KEEPALIVE = 10
ACK_TIMEOUT = 5.0


def guarded(worker, fn, *args) -> None:
    """Runs a worker's thread; an exception is kept in `worker.crashed` (see `healthy`), so that
    a bug in the lab is never mistaken for a message the broker lost."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - reported by healthy()
        worker.crashed = traceback.format_exc()


def healthy(*workers) -> None:
    """Raises if a publisher's or subscriber's thread died of an exception."""
    for worker in workers:
        if worker.crashed:
            raise RuntimeError(f"the lab's {worker.name} crashed:\n{worker.crashed}")


def dial(net, connect):
    """Runs `connect()` (which opens a socket) inside the lab network's clients' namespace when
    there is one (`ClusterNet.call`): the socket lives there for its whole life."""
    return connect() if net is None else net.call(connect)


class Connection:
    """One MQTT 5 connection of a publisher: a paho client and the thread that runs its network
    loop."""

    def __init__(self, client_id: str, node: tuple[str, int], clean_start: bool, net=None):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.node = node
        self.net = net
        self.connack = threading.Event()
        self.session_present = None
        self.rc = None
        self.alive = True
        self._stop = False
        self.client.on_connect = self._connected
        self.client.on_disconnect = self._disconnected
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0 if clean_start else SESSION_EXPIRY
        self._props = props
        self._clean_start = clean_start
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"mqtt {client_id}")

    def open(self) -> bool:
        """Connects and waits for CONNACK; False if refused or nothing came in time."""
        try:
            dial(self.net, lambda: self.client.connect(
                self.node[0], self.node[1], keepalive=10, clean_start=self._clean_start,
                properties=self._props))
        except OSError:
            self.alive = False
            return False
        self._thread.start()
        if not self.connack.wait(CONNECT_TIMEOUT) or self.rc is None or self.rc.is_failure:
            self.close()
            return False
        return True

    def _run(self) -> None:
        while not self._stop:
            if self.client.loop(0.05) != mqtt.MQTT_ERR_SUCCESS:
                break
        self.alive = False

    def _connected(self, client, userdata, flags, rc, properties):
        self.session_present = bool(flags.session_present)
        self.rc = rc
        self.connack.set()

    def _disconnected(self, client, userdata, flags, rc, properties):
        self.alive = False

    def close(self) -> None:
        self._stop = True
        try:
            self.client.disconnect()
        except Exception:  # noqa: BLE001 - closing a connection that may be gone already
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2)


def wait_ack(acks: threading.Event, conn: Connection) -> bool:
    """Waits for the acknowledgement, giving up at once when the connection is gone."""
    deadline = time.monotonic() + ACK_TIMEOUT
    while time.monotonic() < deadline:
        if acks.wait(0.05):
            return True
        if not conn.alive:
            return acks.is_set()
    return False


class Publisher:
    """Publishes `{"p": name, "s": seq}` to `lab/<name>` at QoS `qos`, one at a time: each
    publication is acknowledged (ok), or given up after ACK_TIMEOUT (fail: indeterminate) and
    the publisher moves on to a new connection and the next sequence number."""

    def __init__(self, history: History, name: str, nodes, qos: int, pause: float = 0.0,
                 net=None):
        self.history = history
        self.net = net
        self.name = name
        self.nodes = nodes
        self.qos = qos
        self.pause = pause
        self.topic = f"{TOPIC_PREFIX}/{name}"
        self.acked = 0
        self.failed = 0
        self._stop = threading.Event()
        self.crashed: str | None = None
        self._thread = threading.Thread(target=guarded, args=(self, self._run), daemon=True,
                                        name=name)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        seq = 0
        conn_no = -1
        conn = None
        while not self._stop.is_set():
            if conn is None or not conn.alive:
                if conn is not None:
                    conn.close()
                nodes = self.nodes()
                if not nodes:  # every node down (a whole-cluster kill): wait for one
                    time.sleep(0.2)
                    continue
                conn_no += 1
                node = random.choice(nodes)
                self.history.record(self.name, "dial", conn=conn_no, host=node[0])
                conn = Connection(f"{self.name}-{conn_no}", node, clean_start=True,
                                  net=self.net)
                acks = threading.Event()
                number = conn_no

                def published(client, userdata, mid, rc, properties, number=number, acks=acks):
                    self.history.record(self.name, "ok", conn=number, mid=mid)
                    acks.set()
                conn.client.on_publish = published
                if not conn.open():
                    conn = None
                    time.sleep(0.2)
                    continue
            seq += 1
            acks.clear()
            payload = json.dumps({"p": self.name, "s": seq})
            event = self.history.record(self.name, "invoke", conn=conn_no, seq=seq,
                                        topic=self.topic, qos=self.qos, mid=None)
            info = conn.client.publish(self.topic, payload, qos=self.qos)
            event["mid"] = info.mid
            if info.rc != mqtt.MQTT_ERR_SUCCESS or not wait_ack(acks, conn):
                self.history.record(self.name, "fail", conn=conn_no, seq=seq,
                                    why=f"rc {info.rc}" if info.rc else "no ack")
                self.failed += 1
                conn.close()
                conn = None
                continue
            self.acked += 1
            if self.pause:
                time.sleep(self.pause)
        if conn is not None:
            conn.close()


def _origin(packet: raw.Packet) -> tuple[str | None, int | None]:
    """The (publisher, sequence) a lab payload names, or (None, None) for anything else."""
    try:
        body = json.loads(packet.payload)
        return body["p"], body["s"]
    except (ValueError, KeyError, TypeError):
        return None, None


class Subscriber:
    """A persistent session subscribed to `lab/#` at QoS 2, which moves to a random node every
    `hop_every` seconds (a range; None: never) by connecting there while its old connection is
    still open (the broker takes the session over), and reconnects whenever it loses its
    connection.

    It speaks MQTT 5 through the suite's own codec (`tests/interop/mqttraw.py`) rather than
    paho, because its QoS 2 state must outlive a connection: a message is delivered when its
    PUBLISH first arrives, and its packet id is kept until PUBREL, across connections, so that
    a PUBLISH the broker sends again (DUP) on a later connection is recognised, as a client
    keeping its session state does (MQTT 5.0 section 4.3.3). Once a later connection has its
    CONNACK, what an older one still reads is recorded as `stale` and otherwise ignored: the
    session has moved, and the broker sends what was in flight again on the new connection."""

    def __init__(self, history: History, name: str, nodes, hop_every=None, net=None):
        self.history = history
        self.net = net
        self.name = name
        self.nodes = nodes
        self.hop_every = hop_every
        self.filter = f"{TOPIC_PREFIX}/#"
        self.delivered = 0
        self.subscribed = threading.Event()
        # The client's side of the session: QoS 2 packet ids received and not yet released.
        self._awaiting_rel: set[int] = set()
        self._state = threading.Lock()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._current = -1
        self._threads: list[threading.Thread] = []
        self._conn_no = -1
        self.crashed: str | None = None
        self._thread = threading.Thread(target=guarded, args=(self, self._run), daemon=True,
                                        name=name)

    def start(self) -> None:
        self._thread.start()

    @property
    def connected(self) -> bool:
        """Whether a connection of this subscriber is open (it had its CONNACK)."""
        return self._current >= 0 and not self._lost.is_set()

    def wait_subscribed(self, timeout: float) -> None:
        if not self.subscribed.wait(timeout):
            raise TimeoutError(f"{self.name} not subscribed within {timeout}s")

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        self._lost.set()
        self._thread.join(timeout)
        for thread in self._threads:
            thread.join(timeout)

    def _connect(self) -> raw.RawClient | None:
        """Opens a connection, CONNECT, CONNACK, and SUBSCRIBE when the session is new."""
        nodes = self.nodes()
        if not nodes:  # every node down (a whole-cluster kill): try again shortly
            return None
        self._conn_no += 1
        number = self._conn_no
        index = random.randrange(len(nodes))
        host, port = nodes[index]
        self.history.record(self.name, "connect", conn=number, node=index, host=host)
        try:
            client = dial(self.net, lambda: raw.RawClient(port, host=host))
            client.send(raw.connect(self.name, clean=False, keepalive=KEEPALIVE,
                                    props={"SessionExpiryInterval": SESSION_EXPIRY}))
            ack = client.expect(raw.CONNACK, CONNECT_TIMEOUT)
        except (OSError, raw.Closed, TimeoutError, AssertionError) as e:
            self.history.record(self.name, "connack", conn=number, session_present=None,
                                rc=f"failed: {e}")
            return None
        self.history.record(self.name, "connack", conn=number,
                            session_present=ack.session_present, rc=ack.reason)
        if ack.reason:
            client.close()
            return None
        with self._state:
            self._current = number
        if not ack.session_present:
            pid = client.packet_id()
            client.send(raw.subscribe(pid, [(self.filter, 2)]))
            try:
                # Deliveries of a resumed session may come first: handle them in order.
                while True:
                    packet = client.recv(ACK_TIMEOUT)
                    if packet.type == raw.SUBACK:
                        break
                    self._handle(client, number, packet)
            except (OSError, raw.Closed, TimeoutError) as e:
                self.history.record(self.name, "lost", conn=number, why=f"no SUBACK: {e}")
                client.close()
                return None
            self.history.record(self.name, "suback", conn=number, filter=self.filter,
                                granted=packet.reasons[0] if packet.reasons else None)
            self.subscribed.set()
        return client

    def _handle(self, client: raw.RawClient, number: int, packet: raw.Packet) -> None:
        with self._state:
            if number < self._current and packet.type != raw.DISCONNECT:
                # A later connection has its CONNACK: the session lives there now. What this
                # one still had unread is stale, and the client neither acknowledges it nor
                # lets it touch the session's state: a PUBLISH read here after the later
                # connection had it again and saw its PUBREL would otherwise hold its packet
                # id forever, and the next message the broker sends with that id would pass
                # for a repeat. The broker sends whatever was in flight here again there.
                self._record_stale(number, packet)
                return
            reply = self._receive(number, packet)
        if reply is not None:
            client.send(reply)

    def _record_stale(self, number: int, packet: raw.Packet) -> None:
        fields = {"conn": number, "packet": packet.type, "pid": packet.packet_id}
        if packet.type == raw.PUBLISH:
            p, seq = _origin(packet)
            fields.update(topic=packet.topic, qos=packet.qos, dup=packet.dup, p=p, seq=seq)
        self.history.record(self.name, "stale", **fields)

    def _receive(self, number: int, packet: raw.Packet) -> bytes | None:
        """What `packet` does to the session (called with `_state` held); returns the reply."""
        if packet.type == raw.PUBLISH:
            p, seq = _origin(packet)
            again = packet.qos == 2 and packet.packet_id in self._awaiting_rel
            if packet.qos == 2:
                self._awaiting_rel.add(packet.packet_id)
            if again:
                # Sent again before PUBREL: not a new delivery (the session remembers it).
                self.history.record(self.name, "resent", conn=number, topic=packet.topic,
                                    qos=2, dup=packet.dup, p=p, seq=seq, pid=packet.packet_id)
            else:
                self.history.record(self.name, "deliver", conn=number, topic=packet.topic,
                                    qos=packet.qos, dup=packet.dup, p=p, seq=seq,
                                    pid=packet.packet_id)
                self.delivered += 1
            if packet.qos == 1:
                return raw.puback(packet.packet_id)
            if packet.qos == 2:
                return raw.pubrec(packet.packet_id)
        elif packet.type == raw.PUBREL:
            self.history.record(self.name, "pubrel", conn=number, pid=packet.packet_id)
            self._awaiting_rel.discard(packet.packet_id)
            return raw.pubcomp(packet.packet_id)
        elif packet.type == raw.DISCONNECT:
            self.history.record(self.name, "disconnected", conn=number, rc=packet.reason)
        return None

    def _serve(self, client: raw.RawClient, number: int) -> None:
        """The connection's reader until it closes or the subscriber stops."""
        last_sent = time.monotonic()
        why = "stopped"
        try:
            while not self._stop.is_set():
                try:
                    packet = client.recv(0.2)
                except TimeoutError:
                    if time.monotonic() - last_sent > KEEPALIVE / 2:
                        client.send(raw.pingreq())
                        last_sent = time.monotonic()
                    continue
                self._handle(client, number, packet)
        except raw.Closed:
            why = "closed by the broker"
        except OSError as e:
            why = f"socket error: {e}"
        finally:
            client.close()
        self.history.record(self.name, "lost", conn=number, why=why)
        if number == self._current:
            self._lost.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            client = self._connect()
            if client is None:
                time.sleep(0.3)
                continue
            self._lost.clear()
            thread = threading.Thread(target=guarded, args=(self, self._serve, client,
                                                            self._current),
                                      daemon=True, name=f"{self.name}-{self._current}")
            self._threads.append(thread)
            thread.start()
            wait = None if self.hop_every is None else random.uniform(*self.hop_every)
            self._lost.wait(wait)


def run(history: History, nodes, scenario, *, publishers: int, subscribers: int,
        net=None):
    """Runs the lab's workload around `scenario(pubs)`: `subscribers` persistent subscribers
    taking their sessions over every 1-3 s, subscribed before `publishers` publishers start
    (QoS 1 and 2 alternately); when `scenario` returns (its faults done), the publishers stop
    and the subscribers drain (`quiesce`). Returns the checker's report; a lab thread that
    crashed raises instead (`healthy`)."""
    subs = [Subscriber(history, f"sub-{i}", nodes, hop_every=(1.0, 3.0), net=net)
            for i in range(subscribers)]
    pubs = [Publisher(history, f"pub-{i}", nodes, qos=1 + i % 2, net=net)
            for i in range(publishers)]
    try:
        for sub in subs:
            sub.start()
        for sub in subs:
            sub.wait_subscribed(30)
        for pub in pubs:
            pub.start()
        scenario(pubs)
        for pub in pubs:
            pub.stop()
        quiesce(subs, quiet=3.0, limit=90.0)
    finally:
        for pub in pubs:
            pub.stop()
        for sub in subs:
            sub.stop()
    healthy(*pubs, *subs)
    return check(history)


def quiesce(subscribers, quiet: float, limit: float) -> float:
    """Waits until every subscriber has been connected, and none received anything, for
    `quiet` seconds (at most `limit`); returns how long it waited."""
    start = time.monotonic()
    last = [s.delivered for s in subscribers]
    calm_since = time.monotonic()
    while time.monotonic() - start < limit:
        time.sleep(0.2)
        now = [s.delivered for s in subscribers]
        if now != last or not all(s.connected for s in subscribers):
            last = now
            calm_since = time.monotonic()
        elif time.monotonic() - calm_since >= quiet:
            break
    return time.monotonic() - start
