"""The lab's network: one namespace per node and one for the clients, on one bridge, with
partitions between nodes made by nftables (root only).

```
            switch (bridge br0)
   ┌──────────┬─────┴────┬──────────┐
  n1         n2         n3        clients
10.88.0.1  10.88.0.2  10.88.0.3  10.88.0.100
```

Clients reach every node all the time; `partition([[1, 2], [3]])` cuts the nodes of different
groups off from each other (both ways, every protocol), `heal()` removes the cut. Each node's
rules live in its own namespace (table `inet clusterlab`), so a cut is one ruleset per node and
a heal deletes those tables.

Namespaces are made with the NAT lab's `natlab.netns` (names `natlab-<pid>-...`, so that a
crashed run's namespaces are removed by the next one), and code runs in the clients'
namespace through `call` (a thread that joined it), which the workload uses to open its
sockets there.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "natlab"))

from natlab.netns import Namespace, cleanup_leftovers, run_prefix  # noqa: E402

SUBNET = "10.88.0"
CLIENTS_IP = f"{SUBNET}.100"


def node_ip(i: int) -> str:
    """The address of node `i` (1-based)."""
    return f"{SUBNET}.{i}"


class ClusterNet:
    """`n` node namespaces and a clients' namespace on one bridge (a context manager)."""

    def __init__(self, n: int = 3, tag: str = "cl"):
        self.n = n
        self.prefix = f"{run_prefix()}{tag}-"
        self.namespaces: list[Namespace] = []
        self.nodes: dict[int, Namespace] = {}
        self.clients: Namespace | None = None
        self.switch: Namespace | None = None
        self.cut: list[list[int]] | None = None

    def __enter__(self) -> "ClusterNet":
        cleanup_leftovers()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _namespace(self, role: str) -> Namespace:
        ns = Namespace(self.prefix + role)
        self.namespaces.append(ns)
        ns.sysctl({"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
        return ns

    def _attach(self, ns: Namespace, port: str, ip: str) -> None:
        # Created inside the namespaces, so that no name is ever taken in the host's.
        ns.ip(f"link add name eth0 type veth peer name {port} netns {self.switch.name}")
        self.switch.ip(f"link set dev {port} master br0", f"link set dev {port} up")
        ns.ip("link set dev eth0 up", f"addr add {ip}/24 dev eth0")

    def _build(self) -> None:
        self.switch = self._namespace("switch")
        self.switch.ip("link add name br0 type bridge", "link set dev br0 up")
        for i in range(1, self.n + 1):
            ns = self._namespace(f"n{i}")
            self._attach(ns, f"n{i}", node_ip(i))
            self.nodes[i] = ns
        self.clients = self._namespace("clients")
        self._attach(self.clients, "clients", CLIENTS_IP)

    def close(self) -> None:
        """Stops every process started in the lab and deletes its namespaces (idempotent)."""
        errors = []
        for ns in reversed(self.namespaces):
            try:
                ns.delete()
            except Exception as e:  # noqa: BLE001 - keep deleting the others
                errors.append(e)
        self.namespaces.clear()
        if errors:
            raise errors[0]

    # --- faults ------------------------------------------------------------------------

    def partition(self, groups: list[list[int]]) -> None:
        """Cuts nodes of different groups off from each other; a node in no group is cut off
        from every other node. Clients keep reaching all of them."""
        self.heal()
        group_of = {i: g for g, members in enumerate(groups) for i in members}
        for i, ns in self.nodes.items():
            others = [node_ip(j) for j in self.nodes
                      if j != i and group_of.get(j, -j) != group_of.get(i, -i)]
            if not others:
                continue
            peers = ", ".join(others)
            ns.nft(f"""
table inet clusterlab {{
    chain input {{ type filter hook input priority 0; ip saddr {{ {peers} }} drop; }}
    chain output {{ type filter hook output priority 0; ip daddr {{ {peers} }} drop; }}
}}
""")
        self.cut = groups

    def heal(self) -> None:
        """Removes every cut."""
        for ns in self.nodes.values():
            ns.run(["nft", "delete", "table", "inet", "clusterlab"], check=False)
        self.cut = None

    def call(self, fn, *args):
        """Runs `fn(*args)` in the clients' namespace (sockets it opens stay there)."""
        return self.clients.call(fn, *args)
