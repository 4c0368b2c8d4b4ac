"""The real mqttd in the lab: relays, brokers with a `p2p://` listener, and client commands.

```python
from natlab import mqttd

relay = mqttd.start_relay(topo.relay, tmp_path / "relay")           # relay://203.0.113.10:0
broker = mqttd.start_broker(topo.b.host, tmp_path / "broker", relays=[relay])
sub = mqttd.client(topo.a.host, ["sub", "-t", "t", "-C", "1"], broker, relays=[relay])
mqttd.ping(topo.a.host, broker, relays=[relay], count=5).direct_ms
relay.kill()                                                         # kill -9
```

* The binary is `$MQTTD_BIN`, else `<repo>/target/debug/mqttd` (`cargo build -p mqttd`);
  `binary()` fails (or skips, outside CI: see `binary`) with what to do when it is missing.
* `start(node, data_dir, listen, config)` runs `mqttd serve` in a lab node with a data
  directory and a TOML configuration of its own, and waits for the lines it prints on standard
  output once its listeners are bound: `mqttd listening on SCHEME://ADDR` per listener (for
  `p2p://` the node id instead of an address, followed by `mqttd p2p direct ADDR` per UDP
  socket of the node), and `mqttd relay url URL` after a `relay://` one. Listeners bind port 0
  and the real ports are read back from those lines. Standard error (the log) goes to
  `<data_dir>/mqttd.log`, which `Mqttd.log()` reads for failure messages.
* `start_relay` and `start_broker` are the two roles the peer-to-peer tests need: a relay that
  admits any node, with a generated certificate naming the relay's addresses (so that peers
  trust it with `--relay-cafile relay.ca`), and a broker whose `p2p://` listener's node stays
  connected to the relays named.
* `client(node, argv, broker, relays)` runs `mqttd pub|sub|bench -L p2p://ID/...` to
  completion; `client_popen` starts one (a subscriber) and returns the process. `ping` runs
  `mqttd p2p ping` and parses its lines (`PingResult`).
* `Mqttd.stop()` sends SIGTERM and waits (its exit status is returned), `Mqttd.kill()` sends
  SIGKILL (kill -9), `Mqttd.metrics()` reads `/metrics` from an `http://` listener.

Every process is started with `Node.popen`, so the topology stops whatever a test leaves
running.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from .topology import RELAY_IP, RELAY_IP2

ROOT = Path(__file__).resolve().parents[3]
# How long a broker may take to bind its listeners (a debug build, a loaded CI machine): only
# reached when it hangs or fails, since the wait ends on the line it prints.
START_TIMEOUT = 30.0
# How long a client command may run before it counts as hung.
CLIENT_TIMEOUT = 30.0
# Quiet logs by default: the lab reads standard output, the log is for failure messages.
DEFAULT_LOG = "warn"


class MissingBinary(RuntimeError):
    """The mqttd binary is not where the lab looks for it."""


def binary() -> Path:
    """The mqttd binary: `$MQTTD_BIN`, else `<repo>/target/debug/mqttd`.

    Raises `MissingBinary` (with what to do) when it does not exist; the `mqttd_bin` fixture
    of conftest.py turns that into a skip, or a failure under `NATLAB_REQUIRED=1`.
    """
    env = os.environ.get("MQTTD_BIN")
    path = Path(env) if env else ROOT / "target" / "debug" / "mqttd"
    if not path.is_file() or not os.access(path, os.X_OK):
        origin = "MQTTD_BIN" if env else "the default"
        raise MissingBinary(
            f"no mqttd binary at {path} ({origin}): build it with `cargo build -p mqttd`, or "
            f"set MQTTD_BIN to one")
    return path


def toml_string(value) -> str:
    """A TOML basic string (or a list of them) for `value`."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_string(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


_LISTENING = re.compile(r"^mqttd listening on (\w+)://(\S+)$")
_RELAY_URL = re.compile(r"^mqttd relay url (\S+)$")
_DIRECT = re.compile(r"^mqttd p2p direct (\S+)$")


class Mqttd:
    """A running `mqttd serve` in a lab node (see the module's documentation)."""

    def __init__(self, node, data_dir: Path, process: subprocess.Popen, listen: list[str]):
        self.node = node
        self.data_dir = data_dir
        self.process = process
        self.listen = list(listen)
        # scheme -> addresses (for p2p: node ids), in the order printed.
        self.listening: dict[str, list[str]] = {}
        self.relay_urls: list[str] = []
        self.direct: list[str] = []
        self.stdout: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"mqttd stdout {node.name}")
        self._reader.start()

    def __repr__(self) -> str:
        return f"Mqttd({self.node.role}, pid={self.process.pid}, listen={self.listen})"

    def _read(self) -> None:
        try:
            for line in self.process.stdout:
                self._lines.put(line.rstrip("\n"))
        except (ValueError, OSError):  # the pipe was closed at teardown
            pass
        self._lines.put(None)

    def _take(self, line: str) -> None:
        self.stdout.append(line)
        if match := _LISTENING.match(line):
            self.listening.setdefault(match.group(1), []).append(match.group(2))
        elif match := _RELAY_URL.match(line):
            self.relay_urls.append(match.group(1))
        elif match := _DIRECT.match(line):
            self.direct.append(match.group(1))

    def _wait_until(self, done, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self!r}: {what} not printed within {timeout}s\n"
                                   f"{self.describe()}")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.process.wait()
                raise RuntimeError(f"{self!r} exited with status {self.process.returncode} "
                                   f"before printing {what}\n{self.describe()}")
            self._take(line)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> "Mqttd":
        """Waits for one `listening` line per listener, and the relay URL of each relay."""
        relays = sum(1 for url in self.listen if url.startswith("relay://"))

        def ready():
            return (sum(map(len, self.listening.values())) >= len(self.listen)
                    and len(self.relay_urls) >= relays)
        self._wait_until(ready, timeout, "its listeners")
        # The direct lines follow the p2p line at once (stdout is line-buffered).
        if "p2p" in self.listening:
            self._wait_until(lambda: self.direct, timeout, "`mqttd p2p direct`")
        return self

    # --- what it printed ----------------------------------------------------------------

    @property
    def node_id(self) -> str:
        """The node id of the `p2p://` listener."""
        return self.listening["p2p"][0]

    @property
    def relay_url(self) -> str:
        """The URL of the (first) `relay://` listener, as peers pass it to `--relay`."""
        return self.relay_urls[0]

    @property
    def ca_file(self) -> Path:
        """The CA of the generated certificates (`--relay-cafile`, `--cafile`)."""
        return self.data_dir / "tls" / "ca.pem"

    def addr(self, scheme: str) -> tuple[str, int]:
        """(host, port) of the first listener of `scheme` (not p2p)."""
        host, _, port = self.listening[scheme][0].rpartition(":")
        return host.strip("[]"), int(port)

    def log(self) -> str:
        """Its standard error so far (the log)."""
        path = self.data_dir / "mqttd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def describe(self, tail: int = 60) -> str:
        """Standard output and the end of the log, for failure messages."""
        log = self.log().splitlines()[-tail:]
        return (f"--- {self!r} stdout\n" + "\n".join(self.stdout)
                + f"\n--- log ({self.data_dir / 'mqttd.log'}), last {tail} lines\n"
                + "\n".join(log))

    def metrics(self, timeout: float = 10.0) -> str:
        """The text of `/metrics` from its `http://` listener (read inside its namespace)."""
        host, port = self.addr("http")
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"

        def fetch():
            with urllib.request.urlopen(f"http://{host}:{port}/metrics",
                                        timeout=timeout) as response:
                return response.read().decode()
        return self.node.ns.call(fetch)

    # --- stopping -------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then waits for it to exit; returns its exit status."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self, timeout: float = 15.0) -> int:
        """SIGKILL (kill -9): no shutdown at all; returns the exit status (-9)."""
        return self._signal(signal.SIGKILL, timeout)

    def _signal(self, sig: int, timeout: float) -> int:
        if self.process.poll() is None:
            # The group: `ip netns exec` execs mqttd, so the leader is mqttd itself.
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
        return self.process.wait(timeout=timeout)


def start(node, data_dir: Path, listen: list[str], config: str = "", *,
          log: str = DEFAULT_LOG, extra_args: list[str] = (),
          timeout: float = START_TIMEOUT) -> Mqttd:
    """Starts `mqttd serve` in `node` with these listeners and TOML `config`; waits for it.

    `config` is written to `<data_dir>/mqttd.toml` (without `listen` and `data_dir`, which are
    given on the command line). `log` is its `RUST_LOG`.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    config_file = data_dir / "mqttd.toml"
    config_file.write_text(config)
    argv = [binary(), "serve", "--data-dir", data_dir, "--config", config_file]
    for url in listen:
        argv += ["--listen", url]
    argv += list(extra_args)
    with open(data_dir / "mqttd.log", "ab") as log_file:
        process = node.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=log_file, text=True, bufsize=1,
                             env={**os.environ, "RUST_LOG": log})
    server = Mqttd(node, data_dir, process, listen)
    try:
        return server.wait_ready(timeout)
    except BaseException:
        server.kill()
        raise


def start_relay(node, data_dir: Path, *, ip: str = RELAY_IP, allow_any: bool = True,
                hostnames=(RELAY_IP, RELAY_IP2), config: str = "", **kwargs) -> Mqttd:
    """A relay (`relay://IP:0`) that admits any node (or only `[relay] allow` from `config`).

    Its generated certificate names `hostnames` (the relay host's addresses), so that peers
    trust it with `--relay-cafile <data_dir>/tls/ca.pem` (`Mqttd.ca_file`).
    """
    head = f"[tls]\nhostnames = {toml_string(list(hostnames))}\n"
    relay_table = "[relay]\nallow_any = true\n" if allow_any else ""
    return start(node, data_dir, [f"relay://{ip}:0"], head + relay_table + config, **kwargs)


def start_broker(node, data_dir: Path, *, relays=(), listen=("p2p://",), config: str = "",
                 allow_anonymous: bool = True, **kwargs) -> Mqttd:
    """A broker with a `p2p://` listener (plus `listen`'s others) whose node uses `relays`.

    `relays` are `Mqttd` relays (their URL and CA are used) or `(url, ca_file)` pairs. A
    p2p:// listener is reachable from outside, so anonymous access is off by default: it is
    turned on unless `allow_anonymous=False`.
    """
    urls, cas = _relay_args(relays)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    # [p2p] takes one CA file: concatenate the relays' CAs.
    p2p = f"[p2p]\nrelays = {toml_string(urls)}\n"
    if cas:
        bundle = data_dir / "relays-ca.pem"
        bundle.write_text("".join(Path(ca).read_text() for ca in cas))
        p2p += f"relay_cafile = {toml_string(bundle)}\n"
    head = "allow_anonymous = true\n" if allow_anonymous else ""
    # Top-level keys first: the tables come after them.
    return start(node, data_dir, list(listen), head + config_top(config) + p2p
                 + config_tables(config), **kwargs)


def config_top(config: str) -> str:
    """The top-level keys of a TOML text (what comes before its first table)."""
    return re.split(r"^\[", config, maxsplit=1, flags=re.M)[0]


def config_tables(config: str) -> str:
    """The tables of a TOML text (from its first `[table]` on)."""
    parts = re.split(r"^(?=\[)", config, maxsplit=1, flags=re.M)
    return parts[1] if len(parts) > 1 else ""


def _relay_args(relays) -> tuple[list[str], list[str]]:
    urls, cas = [], []
    for relay in relays:
        if isinstance(relay, Mqttd):
            urls.append(relay.relay_url)
            cas.append(str(relay.ca_file))
        else:
            url, ca = relay
            urls.append(url)
            if ca:
                cas.append(str(ca))
    return urls, cas


def relay_flags(relays, ca_bundle: Path | None = None) -> list[str]:
    """`--relay URL ...` and `--relay-cafile F` for client commands.

    With several relays of different CAs the CAs are concatenated into `ca_bundle` (needed
    then: the clients take one CA file).
    """
    urls, cas = _relay_args(relays)
    flags = []
    for url in urls:
        flags += ["--relay", url]
    unique = list(dict.fromkeys(cas))
    if len(unique) == 1:
        flags += ["--relay-cafile", unique[0]]
    elif unique:
        if ca_bundle is None:
            raise ValueError("relays with different CAs need a ca_bundle path")
        ca_bundle.write_text("".join(Path(ca).read_text() for ca in unique))
        flags += ["--relay-cafile", str(ca_bundle)]
    return flags


def client_argv(argv, broker: Mqttd | str | None = None, relays=(), *, topic: str = "",
                ca_bundle: Path | None = None) -> list:
    """`mqttd ARGV...` with `-L p2p://NODE_ID/TOPIC` (when `broker` is given) and the relays.

    `broker` is an `Mqttd` with a p2p:// listener or a node id.
    """
    full = [binary(), *argv]
    if broker is not None:
        node_id = broker.node_id if isinstance(broker, Mqttd) else broker
        full += ["-L", f"p2p://{node_id}/{topic}"]
    return full + relay_flags(relays, ca_bundle)


def client(node, argv, broker=None, relays=(), *, topic: str = "", timeout=CLIENT_TIMEOUT,
           check: bool = True, log: str = DEFAULT_LOG, ca_bundle: Path | None = None,
           input: str | None = None) -> subprocess.CompletedProcess:
    """Runs a client command (`pub`, `sub`, `bench`, `p2p ping`, `id`) in `node` to completion.

    `check` raises with its output when the exit status is not 0.
    """
    full = client_argv(argv, broker, relays, topic=topic, ca_bundle=ca_bundle)
    done = subprocess.run(node.ns.exec_argv(full), capture_output=True, text=True,
                          timeout=timeout, input=input, env={**os.environ, "RUST_LOG": log})
    if check and done.returncode != 0:
        raise RuntimeError(f"in {node.name}: mqttd {' '.join(map(str, argv))} exited with "
                           f"{done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")
    return done


def client_popen(node, argv, broker=None, relays=(), *, topic: str = "",
                 log: str = DEFAULT_LOG, ca_bundle: Path | None = None,
                 **popen_kwargs) -> subprocess.Popen:
    """Starts a client command in `node` (stdout and stderr piped, text) and returns it."""
    full = client_argv(argv, broker, relays, topic=topic, ca_bundle=ca_bundle)
    popen_kwargs.setdefault("stdout", subprocess.PIPE)
    popen_kwargs.setdefault("stderr", subprocess.PIPE)
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    popen_kwargs.setdefault("text", True)
    popen_kwargs.setdefault("env", {**os.environ, "RUST_LOG": log})
    return node.popen(full, **popen_kwargs)


@dataclasses.dataclass
class Ping:
    """One line of `mqttd p2p ping`: `seq=N path=direct|relay rtt_ms=T` or `seq=N timeout`."""

    seq: int
    path: str | None  # None: timed out
    rtt_ms: float | None


@dataclasses.dataclass
class PingResult:
    """What `mqttd p2p ping` printed, parsed; `elapsed` is the command's own run time (s)."""

    pings: list[Ping]
    sent: int
    received: int
    direct: bool
    first_ms: int | None
    direct_ms: int | None
    status: int
    stdout: str
    stderr: str
    elapsed: float

    @property
    def paths(self) -> list[str | None]:
        return [p.path for p in self.pings]


_PING = re.compile(r"^seq=(\d+) (?:path=(\w+) rtt_ms=([\d.]+)|timeout)$")
_SUMMARY = re.compile(r"^summary sent=(\d+) received=(\d+) direct=(yes|no) "
                      r"first_ms=(\d+|-) direct_ms=(\d+|-)$")


def parse_ping(stdout: str, stderr: str = "", status: int = 0,
               elapsed: float = 0.0) -> PingResult:
    """Parses the output of `mqttd p2p ping`; raises if there is no summary line."""
    pings, summary = [], None
    for line in stdout.splitlines():
        if match := _PING.match(line):
            rtt = match.group(3)
            pings.append(Ping(int(match.group(1)), match.group(2),
                              float(rtt) if rtt else None))
        elif match := _SUMMARY.match(line):
            summary = match
    if summary is None:
        raise ValueError(f"no summary line in the output of mqttd p2p ping (status {status})"
                         f"\nstdout:\n{stdout}\nstderr:\n{stderr}")

    def ms(text):
        return None if text == "-" else int(text)
    return PingResult(pings, int(summary.group(1)), int(summary.group(2)),
                      summary.group(3) == "yes", ms(summary.group(4)), ms(summary.group(5)),
                      status, stdout, stderr, elapsed)


def ping(node, broker, relays=(), *, count: int = 5, interval: float = 0.2,
         wait: float = 2.0, extra_args: list[str] = (), timeout: float | None = None,
         ca_bundle: Path | None = None) -> PingResult:
    """Runs `mqttd p2p ping NODE_ID --count N --interval S` in `node`; parses what it prints.

    Does not raise when no ping was answered (the result says so); raises only when the
    output has no summary line.
    """
    node_id = broker.node_id if isinstance(broker, Mqttd) else broker
    argv = ["p2p", "ping", node_id, "--count", str(count), "--interval", str(interval),
            "--wait", str(wait), *extra_args]
    if timeout is None:
        timeout = CLIENT_TIMEOUT + count * (interval + wait)
    started = time.monotonic()
    done = client(node, argv, None, relays, timeout=timeout, check=False, ca_bundle=ca_bundle)
    return parse_ping(done.stdout, done.stderr, done.returncode, time.monotonic() - started)


def ping_until(node, broker, relays=(), *, window: float, direct_streak: int | None = 3,
               interval: float = 0.1, wait: float = 2.0, extra_args: list[str] = (),
               ca_bundle: Path | None = None) -> PingResult:
    """Pings for at most `window` seconds, stopping early once `direct_streak` answers in a
    row came back on a direct path (never, with None); parses what it printed.

    Stopping is SIGINT, after which `mqttd p2p ping` prints its summary with what it saw
    (`direct_ms` from the path events, not from these lines).
    """
    node_id = broker.node_id if isinstance(broker, Mqttd) else broker
    count = int(window / interval) + 1
    argv = ["p2p", "ping", node_id, "--count", str(count), "--interval", str(interval),
            "--wait", str(wait), *extra_args]
    started = time.monotonic()
    process = client_popen(node, argv, None, relays, ca_bundle=ca_bundle)
    lines: queue.Queue = queue.Queue()

    def read():
        for line in process.stdout:
            lines.put(line)
        lines.put(None)
    threading.Thread(target=read, daemon=True).start()
    out, streak, interrupted = [], 0, False
    # The ping's own connect timeout and waits bound it; this only catches a hang.
    deadline = started + window + CLIENT_TIMEOUT
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            os.killpg(process.pid, signal.SIGKILL)
            raise TimeoutError(f"mqttd p2p ping hung in {node.name}:\n{''.join(out)}")
        if line is None:
            break
        out.append(line)
        streak = streak + 1 if " path=direct " in line else 0
        stop = ((direct_streak is not None and streak >= direct_streak)
                or time.monotonic() - started > window)
        if stop and not interrupted:
            os.killpg(process.pid, signal.SIGINT)
            interrupted = True
    status = process.wait(timeout=CLIENT_TIMEOUT)
    stderr = process.stderr.read()
    return parse_ping("".join(out), stderr, status, time.monotonic() - started)
