"""The lab's own machinery: addresses as documented, programs inside namespaces, teardown."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from natlab import RELAY_IP, RELAY_IP2, SITE_PLANS, Nat, Topology, cleanup_leftovers, netns
from natlab.observer import HANG_TIMEOUT
from natlab.probe import receive


def namespaces_with(prefix: str) -> list[str]:
    return [name for name in netns.list_namespaces() if name.startswith(prefix)]


def addresses(node) -> set[str]:
    out = node.run(["ip", "-4", "-o", "addr", "show", "scope", "global"]).stdout
    return {line.split()[3].split("/")[0] for line in out.splitlines()}


def test_addresses_and_routes_are_as_documented(make_topology):
    topo = make_topology(a=Nat.PORT_RESTRICTED, b=Nat.NONE)
    assert addresses(topo.relay) == {RELAY_IP, RELAY_IP2}
    assert addresses(topo.a.router) == {SITE_PLANS["a"].wan_ip, SITE_PLANS["a"].private_gateway}
    assert addresses(topo.a.host) == {SITE_PLANS["a"].private_host}
    assert addresses(topo.b.router) == {SITE_PLANS["b"].wan_ip, SITE_PLANS["b"].public_gateway}
    assert addresses(topo.b.host) == {SITE_PLANS["b"].public_host}
    assert topo.a.public_ip == SITE_PLANS["a"].wan_ip
    assert topo.b.public_ip == SITE_PLANS["b"].public_host
    # The internet routes to public LANs only: no route to a site's private addresses.
    inet_routes = topo.inet.run(["ip", "-4", "route"]).stdout
    assert "192.0.2.128/25 via 192.0.2.2" in inet_routes
    assert "10.0." not in inet_routes
    # No IPv6 anywhere, so nothing goes around the NATs.
    for node in topo.nodes():
        assert node.run(["ip", "-6", "-o", "addr"]).stdout == "", node


def test_programs_run_inside_a_namespace_and_stop_with_the_topology():
    with Topology(Nat.SYMMETRIC, Nat.FULL_CONE) as topo:
        prefix = topo.prefix
        assert len(namespaces_with(prefix)) == 6
        # A program in the relay's namespace, reached over the lab from site b's host.
        echo = topo.relay.popen(
            ["python3", "-c",
             "import socket\n"
             "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             f"s.bind(('{RELAY_IP}', 0)); print(s.getsockname()[1], flush=True)\n"
             "while True:\n"
             "    data, peer = s.recvfrom(2048); s.sendto(data, peer)\n"],
            stdout=subprocess.PIPE, text=True)
        port = int(echo.stdout.readline())
        sock = topo.b.host.udp_socket()
        sock.sendto(b"natlab echo", (RELAY_IP, port))
        assert receive(sock) == (b"natlab echo", (RELAY_IP, port))
        assert topo.a.host.run(["ip", "route", "get", RELAY_IP]).stdout.startswith(
            f"{RELAY_IP} via {SITE_PLANS['a'].private_gateway} dev eth0")
    assert echo.poll() is not None, "the program outlived its topology"
    assert namespaces_with(prefix) == []


def test_a_failure_tears_down_everything_built_so_far(monkeypatch):
    topo = Topology(Nat.FULL_CONE, Nat.SYMMETRIC)
    # Site b's router gets a ruleset nft refuses: the build fails half way.
    from natlab import nat

    real = nat.ruleset
    monkeypatch.setattr(nat, "ruleset",
                        lambda kind, **kw: "this is not nft" if kind is Nat.SYMMETRIC
                        else real(kind, **kw))
    with pytest.raises(RuntimeError, match="nft"):
        with topo:
            pass
    assert namespaces_with(topo.prefix) == []

    with pytest.raises(ZeroDivisionError):
        with Topology() as topo:
            1 / 0
    assert namespaces_with(topo.prefix) == []


def test_leftovers_of_a_dead_run_are_removed_and_a_live_run_is_left_alone():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netns.PREFIX}{dead.pid}-1-relay"
    owner = subprocess.Popen(["sleep", "600"])  # a run that is still going
    live = f"{netns.PREFIX}{owner.pid}-1-relay"
    # This process's pid, but not made by this process: an earlier run with the same pid.
    reused = f"{netns.PREFIX}{os.getpid()}-999-relay"
    for name in (stale, live, reused):
        subprocess.run(["ip", "netns", "add", name], check=True)
    # A program a crashed run left running inside.
    sleeper = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "600"])
    try:
        deadline = time.monotonic() + HANG_TIMEOUT
        while str(sleeper.pid) not in subprocess.run(["ip", "netns", "pids", stale],
                                                     capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, "the sleeper never entered its namespace"
            time.sleep(0.01)
        with Topology() as mine:  # this run's own namespaces are never leftovers
            removed = cleanup_leftovers()
            assert reused in removed and live not in removed
            assert len(namespaces_with(mine.prefix)) == 6
        # Another lab run starting meanwhile may have removed `stale` first: either is fine.
        assert stale not in netns.list_namespaces()
        assert sleeper.wait(timeout=HANG_TIMEOUT) == -9
        assert live in netns.list_namespaces()
    finally:
        sleeper.kill()
        owner.kill()
        sleeper.wait()
        owner.wait()
        subprocess.run(["ip", "netns", "delete", live])
        for name in (stale, reused):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
