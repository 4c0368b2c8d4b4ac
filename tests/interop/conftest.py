"""Fixtures: a fresh mqttd per test, and clients of three kinds connected to it.

* `broker`: starts `mqttd` with `tcp://`, `ws://`, `tls://` and `wss://` listeners on port 0 and
  a temporary data directory, reads the bound ports (`broker.port`, `broker.ws_port`,
  `broker.tls_port`, `broker.wss_port`; TLS clients trust `broker.ca_file`) from its standard
  output, and at teardown sends SIGTERM and asserts that it
  exits with status 0 (graceful shutdown is a feature) before `TIMEOUT`. Mark a test with
  `@pytest.mark.broker_args("--max-keepalive", "10")` or
  `@pytest.mark.broker_config("max_packet_size = 1000")` to start it differently. It runs with
  `--allow-anonymous` unless marked `@pytest.mark.allow_anonymous(False)`;
  `@pytest.mark.password_file({"user": "password"}, tool="mqttd")` and
  `@pytest.mark.acl_file("...")` give it a password file (made with `mqttd passwd` or
  `mosquitto_passwd`) and an ACL file, at `broker.password_file` and `broker.acl_file`.
  `@pytest.mark.broker_listeners("quic://127.0.0.1:0", "http://127.0.0.1:0")` adds listeners;
  `broker.ports` has every bound port by scheme, and `broker.metrics()` reads `/metrics` from
  an `http://` listener.
  `broker.reload()` sends SIGHUP and waits for the outcome.
* `client(...)`: a connected paho-mqtt client (MQTT 3.1.1 or 5.0) wrapped in `PahoClient`,
  which turns paho's callbacks into blocking calls with timeouts; `client(ws=True)` connects
  over WebSocket (path `/mqtt`).
* `raw(...)`: an `mqttraw.RawClient` socket, optionally already connected.
* `mosquitto_sub(...)`: a `clitools.MosquittoSub` running in the background.

The broker's log (stderr) is kept in the test's temporary directory and printed when a test
fails.
"""

from __future__ import annotations

import select
import signal
import subprocess
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

import mqttraw
from clitools import MosquittoSub, mqttd_bin, write_password_file
from pahoclient import TIMEOUT, PahoClient


def pytest_configure(config):
    config.addinivalue_line("markers", "broker_args(*args): extra mqttd command-line arguments")
    config.addinivalue_line("markers", "broker_config(toml): mqttd configuration file contents")
    config.addinivalue_line("markers", "allow_anonymous(bool): pass --allow-anonymous (default)")
    config.addinivalue_line(
        "markers", "password_file(users, tool='mqttd'): a password file for the broker")
    config.addinivalue_line("markers", "acl_file(text): an ACL file for the broker")
    config.addinivalue_line("markers", "broker_listeners(*urls): extra listeners (port 0)")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


# --- the broker ----------------------------------------------------------------------------

class Broker:
    """One mqttd process."""

    def __init__(self, workdir: Path, args=(), config: str | None = None, *,
                 allow_anonymous: bool = True, password_file: Path | None = None,
                 acl_file: Path | None = None, listeners=()):
        self.workdir = workdir
        self.log_path = workdir / "mqttd.log"
        self.password_file = password_file
        self.acl_file = acl_file
        urls = ["tcp://127.0.0.1:0", "ws://127.0.0.1:0", "tls://127.0.0.1:0",
                "wss://127.0.0.1:0", *listeners]
        self.schemes = {url.split("://", 1)[0] for url in urls}
        cmd = [mqttd_bin()]
        for url in urls:
            cmd += ["--listen", url]
        cmd += ["--data-dir", str(workdir / "data")]
        if allow_anonymous:
            cmd.append("--allow-anonymous")
        if password_file is not None:
            cmd += ["--password-file", str(password_file)]
        if acl_file is not None:
            cmd += ["--acl-file", str(acl_file)]
        if config is not None:
            path = workdir / "mqttd.toml"
            path.write_text(config)
            cmd += ["--config", str(path)]
        cmd += list(args)
        self.log = open(self.log_path, "wb")
        # Unbuffered: a buffered readline would take several listening lines at once, which
        # select() would then not see.
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, bufsize=0)
        ports = self.ports = self._read_ports()
        self.port = ports["tcp"]
        self.ws_port = ports["ws"]
        self.tls_port = ports["tls"]
        self.wss_port = ports["wss"]
        # The local CA the broker generated for its TLS-based listeners.
        self.ca_file = str(workdir / "data" / "tls" / "ca.pem")

    def _read_ports(self) -> dict[str, int]:
        """The port of each listener, by scheme, from the lines the broker prints."""
        deadline = time.monotonic() + TIMEOUT
        line = b""
        ports = {}
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                text = line.decode().strip()
                prefix = "mqttd listening on "
                if text.startswith(prefix):
                    scheme, addr = text[len(prefix):].split("://", 1)
                    ports[scheme] = int(addr.rsplit(":", 1)[1])
                    if all(k in ports for k in self.schemes):
                        return ports
            if self.proc.poll() is not None:
                break
        self.proc.kill()
        raise RuntimeError(f"mqttd did not report its port (last line {line!r}):\n{self.logs()}")

    def metrics(self) -> dict[str, float]:
        """The broker's metrics (Prometheus text from the `http://` listener), by name."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['http']}/metrics",
                                    timeout=TIMEOUT) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def logs(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    RELOADED = "reloaded config, access"
    RELOAD_FAILED = "reload failed, the previous configuration stays"

    def reload(self) -> bool:
        """Sends SIGHUP and waits until the broker logs the outcome: True if it reloaded the
        password and ACL files, False if it kept the previous rules."""
        def outcomes():
            log = self.logs()
            return log.count(self.RELOADED), log.count(self.RELOAD_FAILED)

        before = outcomes()
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            after = outcomes()
            if after != before:
                return after[0] > before[0]
            assert self.proc.poll() is None, f"mqttd exited after SIGHUP:\n{self.logs()[-5000:]}"
            time.sleep(0.02)
        raise AssertionError(f"mqttd logged no reload within {TIMEOUT} s of SIGHUP")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """`sig` (SIGTERM unless told), then the exit status (None if the broker had not exited
        within `TIMEOUT` s and had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        self.proc.stdout.close()
        self.log.close()
        return code


@pytest.fixture
def broker(request, tmp_path):
    args = [a for m in request.node.iter_markers("broker_args") for a in m.args]
    configs = [m.args[0] for m in request.node.iter_markers("broker_config")]
    anonymous = request.node.get_closest_marker("allow_anonymous")
    password_file = acl_file = None
    if (m := request.node.get_closest_marker("password_file")) is not None:
        password_file = tmp_path / "passwords"
        write_password_file(password_file, *m.args, **m.kwargs)
    if (m := request.node.get_closest_marker("acl_file")) is not None:
        acl_file = tmp_path / "acl"
        acl_file.write_text(textwrap.dedent(m.args[0]))
    listeners = [u for m in request.node.iter_markers("broker_listeners") for u in m.args]
    b = Broker(tmp_path, args, "\n".join(configs) if configs else None,
               allow_anonymous=anonymous.args[0] if anonymous else True,
               password_file=password_file, acl_file=acl_file, listeners=listeners)
    yield b
    code = b.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(f"--- mqttd log ---\n{b.logs()[-20000:]}")
    assert code == 0, (f"mqttd did not exit 0 within {TIMEOUT} s of SIGTERM (status {code}):\n"
                       f"{b.logs()[-5000:]}")


@pytest.fixture
def client(broker):
    """`client(client_id="", version=5, clean=True, ...)` -> a connected PahoClient."""
    made = []

    def make(client_id: str | None = None, version: int = 5, *, connect: bool = True,
             manual_ack: bool = False, port: int | None = None, ws: bool = False,
             tls: bool = False, **connect_args) -> PahoClient:
        if client_id is None:
            client_id = f"c-{uuid.uuid4().hex[:12]}"
        default_port = {(False, False): broker.port, (True, False): broker.ws_port,
                        (False, True): broker.tls_port, (True, True): broker.wss_port}[(ws, tls)]
        c = PahoClient(port or default_port, client_id, version, manual_ack,
                       transport="websockets" if ws else "tcp",
                       ca_file=broker.ca_file if tls else None)
        made.append(c)
        if connect:
            c.connect(**connect_args)
        return c

    yield make
    for c in made:
        c.stop()


@pytest.fixture
def raw(broker):
    """`raw(version=5, client_id=None, connect=True, **connect_kwargs)` -> a RawClient."""
    made = []

    def make(client_id: str | None = None, version: int = 5, *, connect: bool = True,
             **connect_kwargs) -> mqttraw.RawClient:
        r = mqttraw.RawClient(broker.port, version)
        made.append(r)
        if connect:
            if client_id is None:
                client_id = f"r-{uuid.uuid4().hex[:12]}"
            r.connack = r.connect(client_id, **connect_kwargs)
            assert r.connack.reason == 0, f"connection refused: {r.connack!r}"
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def mosquitto_sub(broker):
    """`mosquitto_sub(*args)` -> a MosquittoSub against the broker, killed at teardown."""
    made = []

    def make(*args):
        s = MosquittoSub(broker.port, *args)
        made.append(s)
        return s

    yield make
    for s in made:
        s.kill()
