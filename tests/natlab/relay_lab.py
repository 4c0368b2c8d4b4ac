"""Running mqttd's relay and `mqttd p2p swarm` in the lab, for the scale and abuse tests.

The binary is the worktree's debug build (`cargo build -p mqttd` first), or `MQTTD_BIN`.
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from pathlib import Path

from natlab import RELAY_IP

ROOT = Path(__file__).resolve().parents[2]
MQTTD = Path(os.environ.get("MQTTD_BIN", ROOT / "target" / "debug" / "mqttd"))
RELAY_PORT = 4433


def start_relay(topo, workdir: Path, *, relay_table: str = "allow_any = true\n",
                max_clients: int = 1024, extra_env: dict | None = None):
    """Starts mqttd with a `relay://` listener on the topology's relay host.

    Returns the process; its stdout is a pipe, read by `relay_url_and_ca`. Its log (at info,
    with the relay's own debug lines) goes to `workdir/relay.log`.
    """
    data = workdir / "relay-data"
    data.mkdir(exist_ok=True)
    config = workdir / "relay.toml"
    config.write_text(f'[tls]\nhostnames = ["{RELAY_IP}"]\n'
                      f"[relay]\n{relay_table}max_clients = {max_clients}\n")
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info,mqttd_p2p=debug")
    env.update(extra_env or {})
    log = open(workdir / "relay.log", "w")
    process = topo.relay.popen(
        [MQTTD, "-c", config, "--data-dir", data, "--listen", f"relay://{RELAY_IP}:{RELAY_PORT}"],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    process.workdir = workdir
    return process


def relay_url_and_ca(process, timeout: float = 30) -> tuple[str, Path]:
    """Waits for the relay's `mqttd relay url URL` line: the URL and the CA file to trust."""
    found: queue.Queue = queue.Queue()

    def read():
        for line in process.stdout:
            if line.startswith("mqttd relay url "):
                found.put(line.split()[-1].rstrip("/"))
        found.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        url = found.get(timeout=timeout)
    except queue.Empty:
        url = None
    if url is None:
        log = (process.workdir / "relay.log").read_text()
        raise AssertionError(f"the relay did not start:\n{log[-3000:]}")
    return url, process.workdir / "relay-data" / "tls" / "ca.pem"


def swarm_argv(role: str, url: str, ca: Path, *args) -> list:
    """`mqttd p2p swarm ROLE` through `url`, trusting `ca`."""
    perf = os.environ.get("NATLAB_PERF_" + role.upper())
    prefix = ["perf", "record", "-F", "499", "-g", "-o", perf, "--"] if perf else []
    return [*prefix, MQTTD, "p2p", "swarm", role, "--relay", url, "--relay-cafile", ca, *args]


def summary_fields(line: str) -> dict[str, str]:
    """`key=value` pairs of a summary line."""
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_measured(node, argv, timeout: float) -> tuple[int, str, str, float]:
    """Runs `argv` in `node` to completion: exit status, stdout, stderr, CPU seconds used."""
    before = os.times()
    process = node.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.communicate(timeout=timeout)
    after = os.times()
    # `ip netns exec` execs the program: the child reaped is the program itself.
    cpu = (after.children_user - before.children_user
           + after.children_system - before.children_system)
    return process.returncode, out, err, cpu
