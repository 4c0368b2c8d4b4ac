"""Topologies: a public segment with a relay host, and two sites behind routers of given types.

```
                    relay  203.0.113.10, .11 (eth0)
                      |
                    inet   203.0.113.1 (relay)   198.51.100.1 (a)   192.0.2.1 (b)
                   /    \\
   198.51.100.2 (wan)    (wan) 192.0.2.2
        a-router              b-router
   10.0.1.1 (lan)          (lan) 10.0.2.1          <- private LANs behind a NAT
   198.51.100.129          (lan) 192.0.2.129      <- public LANs when the type is Nat.NONE
        |                        |
      a-host (eth0)            b-host (eth0)
   10.0.1.2 | 198.51.100.130   10.0.2.2 | 192.0.2.130
```

Every box is a network namespace (`natlab-<pid>-<n>-<role>`), every line a veth pair. `inet`
is the internet: a router with one link per public party and no NAT, routing to the sites'
public LANs only (a private LAN is unreachable from outside, as on the internet). Each party
owns one documentation prefix: the relay 203.0.113.0/24, site a 198.51.100.0/24, site b
192.0.2.0/24; a site's WAN link is the lower /25, its public LAN the upper /25. The relay host
has a second address (203.0.113.11) so that a probe can answer from another address.

The lab is IPv4 only (IPv6 is disabled in every namespace, so nothing finds a way around the
NATs) and adds no delay or loss: the links are as fast as the kernel.
"""

from __future__ import annotations

import dataclasses
import itertools

from . import nat as natmod
from .nat import Nat
from .netns import Namespace, run_prefix

RELAY_IP = "203.0.113.10"
RELAY_IP2 = "203.0.113.11"
INET_RELAY_IP = "203.0.113.1"


@dataclasses.dataclass(frozen=True)
class SitePlan:
    """The addresses of one site."""

    inet_ip: str  # inet's address on the site's WAN link
    wan_ip: str  # the router's public address
    public_gateway: str  # the router's LAN address when the LAN is public (Nat.NONE)
    public_host: str
    private_gateway: str  # the router's LAN address behind a NAT
    private_host: str
    public_lan: str


SITE_PLANS = {
    "a": SitePlan("198.51.100.1", "198.51.100.2", "198.51.100.129", "198.51.100.130",
                  "10.0.1.1", "10.0.1.2", "198.51.100.128/25"),
    "b": SitePlan("192.0.2.1", "192.0.2.2", "192.0.2.129", "192.0.2.130",
                  "10.0.2.1", "10.0.2.2", "192.0.2.128/25"),
}

_topology_ids = itertools.count(1)


class Node:
    """A namespace in a topology, with its role and its main address."""

    def __init__(self, namespace: Namespace, role: str, ip: str):
        self.ns = namespace
        self.role = role
        self.ip = ip

    def __repr__(self) -> str:
        return f"Node({self.role}, {self.ip}, {self.ns.name})"

    @property
    def name(self) -> str:
        """The namespace name, for `ip netns exec` and friends."""
        return self.ns.name

    def run(self, argv, **kwargs):
        """`Namespace.run` in this node."""
        return self.ns.run(argv, **kwargs)

    def popen(self, argv, **kwargs):
        """`Namespace.popen` in this node; stopped at teardown."""
        return self.ns.popen(argv, **kwargs)

    def udp_socket(self, port: int = 0, address: str = "0.0.0.0"):
        """A UDP socket in this node, bound to `address:port`."""
        return self.ns.udp_socket(address, port)

    def socket(self, *args):
        """`Namespace.socket` in this node."""
        return self.ns.socket(*args)


class Site:
    """A router of some type and the one host behind it."""

    def __init__(self, name: str, nat: Nat, router: Node, host: Node, plan: SitePlan):
        self.name = name
        self.nat = nat
        self.router = router
        self.host = host
        self.plan = plan

    def __repr__(self) -> str:
        return f"Site({self.name}, {self.nat})"

    @property
    def public_ip(self) -> str:
        """The address the site's host is seen from outside with."""
        return self.host.ip if self.nat is Nat.NONE else self.plan.wan_ip

    def dropped(self) -> int:
        """Packets the site's router has dropped so far."""
        return natmod.dropped(self.router.ns)


class Topology:
    """The lab network; a context manager that builds it and always tears it down.

    ```python
    with Topology(Nat.PORT_RESTRICTED, Nat.SYMMETRIC) as topo:
        sock = topo.a.host.udp_socket()
        relay = topo.relay.popen([...])
    ```
    """

    def __init__(self, a: Nat = Nat.NONE, b: Nat = Nat.NONE):
        self.nats = {"a": Nat(a), "b": Nat(b)}
        self.id = next(_topology_ids)
        self.prefix = f"{run_prefix()}{self.id}-"
        self.namespaces: list[Namespace] = []
        self.inet: Node | None = None
        self.relay: Node | None = None
        self.sites: dict[str, Site] = {}

    def __repr__(self) -> str:
        return f"Topology(a={self.nats['a']}, b={self.nats['b']}, prefix={self.prefix!r})"

    @property
    def a(self) -> Site:
        return self.sites["a"]

    @property
    def b(self) -> Site:
        return self.sites["b"]

    def nodes(self) -> list[Node]:
        """Every node: inet, relay, then each site's router and host."""
        out = [self.inet, self.relay]
        for site in self.sites.values():
            out += [site.router, site.host]
        return out

    def dropped(self) -> int:
        """Packets all routers together have dropped so far."""
        return sum(site.dropped() for site in self.sites.values())

    # --- building ----------------------------------------------------------------------

    def __enter__(self) -> "Topology":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _namespace(self, role: str, *, forwarding: bool = False) -> Namespace:
        ns = Namespace(self.prefix + role)
        self.namespaces.append(ns)
        ns.sysctl({
            # Links created from here on inherit "default"; "all" covers what exists (lo).
            "net.ipv6.conf.all.disable_ipv6": 1,
            "net.ipv6.conf.default.disable_ipv6": 1,
            # IPv4 settings of a new namespace are copied from the host's; a strict reverse
            # path filter there must not decide what the lab routes.
            "net.ipv4.conf.all.rp_filter": 0,
            "net.ipv4.conf.default.rp_filter": 0,
            "net.ipv4.ip_forward": 1 if forwarding else 0,
        })
        return ns

    @staticmethod
    def _veth(left: Namespace, left_name: str, right: Namespace, right_name: str) -> None:
        # Created inside the namespaces, so that no name is ever taken in the host's.
        left.ip(f"link add name {left_name} type veth peer name {right_name} netns {right.name}")

    def _build(self) -> None:
        inet = self._namespace("inet", forwarding=True)
        relay = self._namespace("relay")
        self.inet = Node(inet, "inet", INET_RELAY_IP)
        self.relay = Node(relay, "relay", RELAY_IP)
        self._veth(inet, "relay", relay, "eth0")
        relay.ip("link set dev eth0 up",
                 f"addr add {RELAY_IP}/24 dev eth0",
                 f"addr add {RELAY_IP2}/24 dev eth0",
                 f"route add default via {INET_RELAY_IP}")
        inet_commands = ["link set dev relay up", f"addr add {INET_RELAY_IP}/24 dev relay"]

        for name, nat in self.nats.items():
            plan = SITE_PLANS[name]
            router = self._namespace(f"{name}-router", forwarding=True)
            host = self._namespace(f"{name}-host")
            self._veth(inet, f"site-{name}", router, "wan")
            self._veth(router, "lan", host, "eth0")
            inet_commands += [f"link set dev site-{name} up",
                              f"addr add {plan.inet_ip}/25 dev site-{name}"]
            if nat.translates:
                gateway, host_ip, prefix = plan.private_gateway, plan.private_host, 24
            else:
                gateway, host_ip, prefix = plan.public_gateway, plan.public_host, 25
                inet_commands.append(f"route add {plan.public_lan} via {plan.wan_ip}")
            router.ip("link set dev wan up", f"addr add {plan.wan_ip}/25 dev wan",
                      f"route add default via {plan.inet_ip}",
                      "link set dev lan up", f"addr add {gateway}/{prefix} dev lan")
            host.ip("link set dev eth0 up", f"addr add {host_ip}/{prefix} dev eth0",
                    f"route add default via {gateway}")
            router.nft(natmod.ruleset(nat))
            self.sites[name] = Site(name, nat, Node(router, f"{name}-router", plan.wan_ip),
                                    Node(host, f"{name}-host", host_ip), plan)
        inet.ip(*inet_commands)

    def close(self) -> None:
        """Stops every process started in the lab and deletes its namespaces (idempotent)."""
        errors = []
        # Hosts first, so that programs stop while the network they use still exists.
        for ns in reversed(self.namespaces):
            try:
                ns.stop_processes()
            except Exception as err:  # keep going: every namespace must go
                errors.append(err)
        for ns in reversed(self.namespaces):
            try:
                ns.delete()
            except Exception as err:
                errors.append(err)
        self.namespaces.clear()
        if errors:
            raise errors[0]

