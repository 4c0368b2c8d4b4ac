"""Fixtures of the NAT lab.

* `lab_environment` (session, automatic): skips the whole suite, saying why, when the machine
  cannot run it (not root, no `ip netns`, no `nft`), unless `NATLAB_REQUIRED=1` (set by
  scripts/test.sh in CI) turns that into a failure. Then it deletes what crashed runs left
  behind (`netns.cleanup_leftovers`).
* `make_topology(a, b)`: builds a `Topology` with sites of those router types and tears it
  down after the test, whatever happened; on failure it prints every router's ruleset (with
  its counters and the full-cone map) and conntrack table first.
* `observer(topo)`: starts the UDP observer on `topo`'s relay host (stopped with the
  topology).
* Tables that tests fill with `natlab.report.row` are printed at the end of the run and
  written to `<basetemp>/<table>.md`.
* `mqttd_bin` (session): the mqttd binary (`natlab.mqttd.binary()`: `$MQTTD_BIN`, else
  target/debug/mqttd); skips the test when it is missing, or fails under `NATLAB_REQUIRED=1`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import pytest

from natlab import RELAY_IP, RELAY_IP2, Nat, Observer, Topology, cleanup_leftovers, mqttd, report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def missing_requirements() -> str | None:
    """Why this machine cannot run the lab, or None."""
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces and nftables)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"the NAT lab needs `{tool}` (Debian package {package})"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "the NAT lab needs `ip netns` (iproute2 with network namespace support)"
    return None


@pytest.fixture(scope="session", autouse=True)
def lab_environment():
    reason = missing_requirements()
    if reason:
        if os.environ.get("NATLAB_REQUIRED") == "1":
            pytest.fail(f"NATLAB_REQUIRED=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    removed = cleanup_leftovers()
    if removed:
        print(f"natlab: removed {len(removed)} namespaces left by earlier runs")


def dump(topo: Topology) -> str:
    """The routers' rulesets, counters and conntrack tables, for a failure report."""
    parts = [repr(topo)]
    for site in topo.sites.values():
        router = site.router
        for argv in (["nft", "list", "ruleset"], ["cat", "/proc/net/nf_conntrack"]):
            done = router.run(argv, check=False)
            parts.append(f"--- {router.name}: {' '.join(argv)}\n{done.stdout}{done.stderr}")
    return "\n".join(parts)


@pytest.fixture
def make_topology(request):
    """`make_topology(a=Nat.X, b=Nat.Y)` -> a built `Topology`, torn down after the test."""
    with contextlib.ExitStack() as stack:
        made: list[Topology] = []

        def make(a: Nat = Nat.NONE, b: Nat = Nat.NONE) -> Topology:
            topo = stack.enter_context(Topology(a, b))
            made.append(topo)
            return topo

        yield make
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            for topo in made:
                print(dump(topo))


@pytest.fixture
def observer():
    """`observer(topo)` -> an `Observer` running on the topology's relay host."""
    return lambda topo: Observer(topo.relay, RELAY_IP, RELAY_IP2)


@pytest.fixture(scope="session")
def mqttd_bin():
    """The mqttd binary the tests run (`natlab.mqttd.binary()`)."""
    try:
        return mqttd.binary()
    except mqttd.MissingBinary as err:
        if os.environ.get("NATLAB_REQUIRED") == "1":
            pytest.fail(f"NATLAB_REQUIRED=1 but {err}", pytrace=False)
        pytest.skip(str(err))


# The lab's own tests first (they check what the others rely on), the rest in file order.
FIRST = ("test_lab.py", "test_nat_types.py", "test_holepunch.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return FIRST.index(name) if name in FIRST else len(FIRST)

    items.sort(key=rank)


def pytest_terminal_summary(terminalreporter, config):
    tables = report.tables()
    if not tables:
        return
    base = config._tmp_path_factory.getbasetemp()
    for name, text in tables.items():
        path = base / f"{name}.md"
        path.write_text(text)
        terminalreporter.write_sep("=", f"{name} (also in {path})")
        terminalreporter.write(text)
