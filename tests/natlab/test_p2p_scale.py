"""1,000 concurrent traversal attempts coordinated by one relay, across two NATed sites.

Site a runs `mqttd p2p swarm serve` (TARGETS nodes answering pings), site b runs
`mqttd p2p swarm dial` (PER_TARGET nodes, each dialing every target at once): TARGETS x
PER_TARGET attempts, each between a different pair of nodes, so each is its own traversal (its
own coordination through the relay and its own hole punch). Both routers are port-restricted
cones, a cell where the hole punch works. At least 99% must connect; the summary line with
p50/p99 times (to the first ping answer and to a direct path) is printed.

NATLAB_SCALE_TARGETS and NATLAB_SCALE_PER_TARGET change the shape (default 25 x 40).
"""

from __future__ import annotations

import os
import time

import pytest

from natlab import Nat
from relay_lab import (cpu_seconds, relay_url_and_ca, run_measured, start_relay,
                       summary_fields, swarm_argv)

TARGETS = int(os.environ.get("NATLAB_SCALE_TARGETS", "25"))
PER_TARGET = int(os.environ.get("NATLAB_SCALE_PER_TARGET", "40"))
DEADLINE = 60
RAMP = float(os.environ.get("NATLAB_SCALE_RAMP", "10"))


@pytest.mark.timeout(150)
def test_1000_concurrent_traversal_attempts(make_topology, tmp_path):
    began = time.monotonic()
    topo = make_topology(Nat.PORT_RESTRICTED, Nat.PORT_RESTRICTED)
    attempts = TARGETS * PER_TARGET
    # Every node of both sides is a relay client at once.
    relay = start_relay(topo, tmp_path, max_clients=TARGETS + PER_TARGET + 16)
    url, ca = relay_url_and_ca(relay)
    ids = tmp_path / "ids"
    server = topo.a.host.popen(
        swarm_argv("serve", url, ca, "--nodes", TARGETS, "--ids-out", ids),
        stdout=open(tmp_path / "serve.out", "w"), stderr=open(tmp_path / "serve.err", "w"))
    limit = time.monotonic() + 60
    while not ids.exists():
        assert server.poll() is None, (tmp_path / "serve.err").read_text()
        assert time.monotonic() < limit, "the serving nodes never got online"
        time.sleep(0.1)
    online = time.monotonic()
    status, out, err, dial_cpu = run_measured(
        topo.b.host,
        swarm_argv("dial", url, ca, "--ids", ids, "--per-target", PER_TARGET,
                   "--deadline", DEADLINE, "--ramp", RAMP),
        timeout=DEADLINE + 60)
    took = time.monotonic() - online
    lines = [line for line in out.splitlines() if line.startswith("swarm attempts=")]
    assert lines, f"no summary (status {status}): {out}\n{err}"
    fields = summary_fields(lines[-1])
    failures = "\n".join(line for line in err.splitlines() if line.startswith("swarm failed"))
    print(f"\n{lines[-1]}\n{failures}")
    print(f"natlab scale: {attempts} attempts in {took:.1f} s (setup {online - began:.1f} s, "
          f"test {time.monotonic() - began:.1f} s); CPU seconds: dial {dial_cpu:.1f}, "
          f"serve {cpu_seconds(server.pid):.1f}, relay {cpu_seconds(relay.pid):.1f}")
    assert fields["attempts"] == str(attempts)
    assert int(fields["connected"]) >= attempts * 99 // 100, lines[-1]
