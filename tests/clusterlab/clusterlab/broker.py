"""A real mqttd for the lab: started on port 0 with a data directory of its own (in a lab
namespace when given one), paused with SIGSTOP, killed with SIGKILL, started again on the same
data directory (on a new port: `nodes()` callables give the workload the current addresses)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
START_TIMEOUT = 30.0


def binary() -> str:
    """`$MQTTD_BIN`, else the debug build."""
    path = os.environ.get("MQTTD_BIN") or str(ROOT / "target" / "debug" / "mqttd")
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"no mqttd binary at {path}: run `cargo build -p mqttd` or set "
                                f"MQTTD_BIN")
    return path


class Broker:
    """One mqttd process at a time on `data_dir`."""

    def __init__(self, data_dir: Path, config: str = "", host: str = "127.0.0.1", ns=None):
        self.data_dir = data_dir
        self.ns = ns
        self.config = config
        self.host = host
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.starts = 0

    def start(self) -> "Broker":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [binary(), "--listen", f"tcp://{self.host}:0", "--data-dir",
               str(self.data_dir / "data"), "--allow-anonymous"]
        if self.config:
            path = self.data_dir / "mqttd.toml"
            path.write_text(self.config)
            cmd += ["--config", str(path)]
        log = open(self.data_dir / "mqttd.log", "ab")
        popen = subprocess.Popen if self.ns is None else self.ns.popen
        self.proc = popen(cmd, stdout=subprocess.PIPE, stderr=log, bufsize=0,
                          env={**os.environ, "RUST_LOG": "warn"})
        log.close()
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                text = self.proc.stdout.readline().decode().strip()
                if text.startswith("mqttd listening on tcp://"):
                    self.port = int(text.rsplit(":", 1)[1])
                    return self
            if self.proc.poll() is not None:
                break
        self.proc.kill()
        raise RuntimeError(f"mqttd did not report its port:\n{self.log()[-3000:]}")

    def addr(self) -> tuple[str, int]:
        return self.host, self.port

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
