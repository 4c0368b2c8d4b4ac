"""The command-line tools the tests run besides the broker: `mqttd passwd`, Debian's
`mosquitto_passwd`, and the Mosquitto clients `mosquitto_pub` / `mosquitto_sub`."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
from pathlib import Path

from pahoclient import TIMEOUT

REPO = Path(__file__).resolve().parents[2]


def mqttd_bin() -> str:
    return os.environ.get("MQTTD_BIN") or str(REPO / "target" / "debug" / "mqttd")


# --- password files ------------------------------------------------------------------------

def mqttd_passwd(path: Path, user: str, password: str | None = None, *, delete: bool = False,
                 check: bool = True) -> subprocess.CompletedProcess:
    """`mqttd passwd FILE USER -p PASSWORD`, or `-D` to remove the user."""
    cmd = [mqttd_bin(), "passwd", str(path), user]
    cmd += ["-D"] if delete else ["-p", password]
    result = subprocess.run(cmd, capture_output=True, timeout=30,
                            env={**os.environ, "RUST_BACKTRACE": "0"})
    if check:
        assert result.returncode == 0, result
    return result


def mosquitto_passwd(path: Path, user: str, password: str) -> None:
    """`mosquitto_passwd -b [-c] FILE USER PASSWORD` (`-c` creates the file)."""
    create = [] if path.exists() else ["-c"]
    result = subprocess.run(["mosquitto_passwd", "-b", *create, str(path), user, password],
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result


PASSWORD_TOOLS = {"mqttd": mqttd_passwd, "mosquitto_passwd": mosquitto_passwd}


def write_password_file(path: Path, users: dict[str, str], tool: str = "mqttd") -> None:
    """Creates `path` with one entry per user, written by `tool` ("mqttd" or
    "mosquitto_passwd")."""
    for user, password in users.items():
        PASSWORD_TOOLS[tool](path, user, password)


# --- Mosquitto clients ---------------------------------------------------------------------

class MosquittoSub:
    """`mosquitto_sub -d` in the background; its lines are read by a thread into a queue, so
    the test can wait for "received SUBACK" before publishing."""

    def __init__(self, port, *args):
        cmd = ["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-d",
               "-F", "MSG %t|%q|%r|%p", "-W", "20", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, text: str) -> str:
        seen = []
        while True:
            try:
                line = self.lines.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"mosquitto_sub never printed {text!r}; got {seen}") from None
            if line is None:
                raise AssertionError(f"mosquitto_sub exited before {text!r}; got {seen}")
            seen.append(line)
            if text in line:
                return line

    def messages(self, n: int) -> list[str]:
        return [self.wait_for("MSG ")[len("MSG "):] for _ in range(n)]

    def finish(self) -> int:
        try:
            return self.proc.wait(TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def mosquitto_pub(port, *args, check: bool = True) -> subprocess.CompletedProcess:
    """Runs `mosquitto_pub`; asserts that it exits 0 unless `check` is false."""
    result = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), *args],
                            capture_output=True, timeout=TIMEOUT)
    if check:
        assert result.returncode == 0, result
    return result
