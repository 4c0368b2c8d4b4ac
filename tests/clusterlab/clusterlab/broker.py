"""A real mqttd for the lab: started with listeners on port 0 and a data directory of its own
(in a lab namespace when given one), paused with SIGSTOP, killed with SIGKILL, started again on
the same data directory (on new ports: `nodes()` callables give the workload the current
addresses)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
START_TIMEOUT = 30.0
LISTENING = "mqttd listening on "
API_KEY = "mqttd api key admin "


def binary() -> str:
    """`$MQTTD_BIN`, else the debug build."""
    path = os.environ.get("MQTTD_BIN") or str(ROOT / "target" / "debug" / "mqttd")
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"no mqttd binary at {path}: run `cargo build -p mqttd` or set "
                                f"MQTTD_BIN")
    return path


class Broker:
    """One mqttd process at a time on `data_dir`. `listen` are its listeners' URLs (port 0);
    after `start()`, `ports` has each bound port by scheme and `api_key` the admin key it
    printed on its first start with an `http://` listener."""

    def __init__(self, data_dir: Path, config: str = "", host: str = "127.0.0.1", ns=None,
                 listen: list[str] | None = None):
        self.data_dir = data_dir
        self.ns = ns
        self.config = config
        self.host = host
        self.listen = listen or [f"tcp://{host}:0"]
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.api_key: str | None = None
        self.stdout: list[str] = []
        self.starts = 0

    def start(self) -> "Broker":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [binary()]
        for url in self.listen:
            cmd += ["--listen", url]
        cmd += ["--data-dir", str(self.data_dir / "data"), "--allow-anonymous"]
        if self.config:
            path = self.data_dir / "mqttd.toml"
            path.write_text(self.config)
            cmd += ["--config", str(path)]
        log = open(self.data_dir / "mqttd.log", "ab")
        popen = subprocess.Popen if self.ns is None else self.ns.popen
        self.proc = popen(cmd, stdout=subprocess.PIPE, stderr=log,
                          env={**os.environ, "RUST_LOG": os.environ.get("LAB_LOG", "warn")})
        log.close()
        self.starts += 1
        # The ports of this start, published at once when all are known: clients keep dialling
        # the previous ones (and failing) until then.
        ports: dict[str, int] = {}
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, lines, ports), daemon=True).start()
        schemes = {url.split("://", 1)[0] for url in self.listen}
        deadline = time.monotonic() + START_TIMEOUT
        while not schemes <= ports.keys():
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                line = ""
            if line is None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"mqttd did not report its listeners:\n{self.log()[-3000:]}")
        self.ports = dict(ports)
        return self

    def _read(self, proc: subprocess.Popen, lines: queue.Queue, ports: dict) -> None:
        for raw in proc.stdout:
            text = raw.decode(errors="replace").strip()
            self.stdout.append(text)
            if text.startswith(LISTENING):
                scheme, addr = text[len(LISTENING):].split("://", 1)
                ports.setdefault(scheme, int(addr.rsplit(":", 1)[1]))
            elif text.startswith(API_KEY):
                self.api_key = text[len(API_KEY):]
            lines.put(text)
        lines.put(None)

    def addr(self, scheme: str = "tcp") -> tuple[str, int]:
        return self.host, self.ports[scheme]

    def api(self, path: str, method: str = "GET", body=None, timeout: float = 10.0):
        """A call to the admin API (inside the broker's namespace when it has one): the decoded
        JSON answer."""
        url = f"http://{self.host}:{self.ports['http']}{path}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"})

        def call():
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return json.loads(answer.read() or b"null")
        return call() if self.ns is None else self.ns.call(call)

    def pause(self) -> None:
        """SIGSTOP: the process stays, and answers nothing."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """kill -9, and wait for it to be gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        path = self.data_dir / "mqttd.log"
        return path.read_text(errors="replace") if path.exists() else ""
