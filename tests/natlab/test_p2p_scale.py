"""1,000 concurrent traversal attempts coordinated by one relay, across two NATed sites.

Site a runs `mqttd p2p swarm serve` (TARGETS nodes answering pings), site b runs
`mqttd p2p swarm dial` (PER_TARGET nodes, each dialing every target): TARGETS x PER_TARGET
attempts, each between a different pair of nodes, so each is its own traversal (its own
coordination through the relay, its own hole punch). Both routers are port-restricted cones, a
cell where the hole punch works. With a debug build the starts are spread over RAMP seconds
(15; 0 with a release build); the summary says how many attempts were under way at once
(`peak_in_flight`). At least 99% must connect; the summary
line with p50/p99 times (to the first ping answer, and to a direct path) is printed, with the
CPU time each process used.

NATLAB_SCALE_TARGETS, NATLAB_SCALE_PER_TARGET and NATLAB_SCALE_RAMP change the shape
(default 25 x 40). docs/p2p.md has the numbers.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from natlab import Nat, mqttd

TARGETS = int(os.environ.get("NATLAB_SCALE_TARGETS", "25"))
PER_TARGET = int(os.environ.get("NATLAB_SCALE_PER_TARGET", "40"))
# A debug build (CI's) cannot start 1,000 at once on two cores: each attempt costs it ~18 ms of
# CPU, and handshakes queued behind each other past QUIC's probe timeouts are sent again, which
# costs more, until most miss the deadline (docs/p2p.md). A release build starts all at once.
RAMP = float(os.environ.get("NATLAB_SCALE_RAMP",
                            "0" if "release" in os.environ.get("MQTTD_BIN", "") else "15"))
# Per attempt, from its start.
DEADLINE = 60


def swarm_argv(role: str, relay: mqttd.Mqttd, *args) -> list:
    """`mqttd p2p swarm ROLE` through `relay`."""
    return [mqttd.binary(), "p2p", "swarm", role, *mqttd.relay_flags([relay]), *map(str, args)]


def summary_fields(line: str) -> dict[str, str]:
    """The `key=value` pairs of a summary line."""
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.timeout(DEADLINE + RAMP + 80)
def test_1000_concurrent_traversal_attempts(make_topology, mqttd_bin, tmp_path):
    began = time.monotonic()
    topo = make_topology(Nat.PORT_RESTRICTED, Nat.PORT_RESTRICTED)
    attempts = TARGETS * PER_TARGET
    # Every node of both sides is a relay client at once.
    relay = mqttd.start_relay(topo.relay, tmp_path / "relay",
                              config=f"max_clients = {TARGETS + PER_TARGET + 16}\n")
    ids = tmp_path / "ids"
    with open(tmp_path / "serve.log", "w") as log:
        server = topo.a.host.popen(swarm_argv("serve", relay, "--nodes", TARGETS,
                                              "--ids-out", ids),
                                   stdout=log, stderr=log)
    limit = time.monotonic() + 60
    while not ids.exists():
        assert server.poll() is None, (tmp_path / "serve.log").read_text()
        assert time.monotonic() < limit, "the serving nodes never got online"
        time.sleep(0.1)
    online = time.monotonic()
    # `ip netns exec` execs mqttd: the child reaped is mqttd itself, whose CPU time the
    # children's total then includes.
    before = os.times()
    dial = topo.b.host.popen(
        swarm_argv("dial", relay, "--ids", ids, "--per-target", PER_TARGET,
                   "--deadline", DEADLINE, "--ramp", RAMP),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = dial.communicate(timeout=DEADLINE + RAMP + 30)
    after = os.times()
    dial_cpu = (after.children_user - before.children_user
                + after.children_system - before.children_system)
    took = time.monotonic() - online
    lines = [line for line in out.splitlines() if line.startswith("swarm attempts=")]
    assert lines, f"no summary (status {dial.returncode}): {out}\n{err}"
    fields = summary_fields(lines[-1])
    failures = "\n".join(line for line in err.splitlines() if line.startswith("swarm failed"))
    print(f"\n{lines[-1]}\n{failures}")
    print(f"natlab scale: {attempts} attempts in {took:.1f} s (setup {online - began:.1f} s, "
          f"test {time.monotonic() - began:.1f} s); CPU seconds: dial {dial_cpu:.1f}, "
          f"serve {cpu_seconds(server.pid):.1f}, relay {cpu_seconds(relay.process.pid):.1f}")
    assert fields["attempts"] == str(attempts)
    assert int(fields["connected"]) >= attempts * 99 // 100, lines[-1]
    if RAMP == 0:
        # All started at once: they must have been under way together, or this measured
        # something else than concurrent attempts.
        assert int(fields["peak_in_flight"]) >= attempts * 9 // 10, lines[-1]
