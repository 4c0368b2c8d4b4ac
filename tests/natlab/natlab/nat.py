"""The four router types and the nftables rulesets that make them.

RFC 4787 describes a NAT by two behaviours. *Mapping*: does an inside socket keep one public
address:port for every destination (endpoint-independent, EIM) or get a new one per
destination (endpoint-dependent, EDM)? *Filtering*: once a mapping exists, who may send to it:
anyone (endpoint-independent, EIF), only addresses the inside host has sent to
(address-dependent, ADF), or only the exact address:port pairs it has sent to
(address-and-port-dependent, APDF)?

What Linux gives, and what each type therefore uses (every NAT router has the same filter):

* Conntrack is the filter. A packet that matches no connection tracking entry is not
  translated back; it is addressed to the router itself and dropped in the `input` chain. So
  conntrack filtering is always APDF, whatever the mapping.
* `masquerade` keeps the inside source port when the resulting tuple is free. A second flow
  from the same socket to another destination has a different tuple, so it gets the same
  port: EIM in practice. It stops being EIM when a clash forces a new port, and the clash that
  matters for hole punching is self-inflicted: a peer's packet that arrives *before* the inside
  host has sent to that peer creates a conntrack entry for (peer -> router:port) if the router
  accepts it (say, answering with ICMP port unreachable), and the inside host's own packet to
  that peer then clashes with it and is given a random port. Dropping unsolicited packets in
  the input hook, before conntrack confirms the entry, leaves no entry behind; home routers
  drop silently anyway.
* `persistent` (`snat ... persistent`, `masquerade persistent`) only makes the *address*
  choice sticky when the NAT has several public addresses; with one it changes nothing, and it
  never makes filtering endpoint-independent.
* `masquerade fully-random` picks a fresh random port for every new flow: EDM with random
  ports, the symmetric NAT that plain hole punching cannot get through.
* Endpoint-independent filtering does not exist in conntrack. The full-cone router adds it with
  a dynamic map filled from outgoing packets: after source NAT has chosen the public port
  (a filter chain hooked after it, reading `ct reply proto-dst`), the map records
  public port -> inside address:port; a `dnat` in prerouting sends any new packet to a
  mapped port to that inside socket, and the forward chain accepts what was translated so. A
  port that the inside host never used stays closed, unlike a "DMZ host" that forwards every
  port.

Every router counts what its filter drops in the named counter `dropped`, so that a test can
tell "dropped by a router" from "still on its way" without waiting for a quiet moment.
"""

from __future__ import annotations

import enum
import json


class Nat(enum.Enum):
    """A site router's type."""

    #: No NAT and no filter: the site's host has a routed public address.
    NONE = "none"
    #: Endpoint-independent mapping and filtering (full cone).
    FULL_CONE = "full-cone"
    #: Endpoint-independent mapping, address-and-port-dependent filtering (port-restricted cone).
    PORT_RESTRICTED = "port-restricted"
    #: Endpoint-dependent mapping with random ports, address-and-port-dependent filtering.
    SYMMETRIC = "symmetric"

    def __str__(self) -> str:
        return self.value

    @property
    def translates(self) -> bool:
        """Whether the site's host sits on private addresses behind the router."""
        return self is not Nat.NONE


# Mapping and filtering behaviours as a probe classifies them (see probe.classify).
NO_TRANSLATION = "no translation"
ENDPOINT_INDEPENDENT = "endpoint-independent"
ADDRESS_DEPENDENT = "address-dependent"
ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"

#: What each router type must look like from outside.
EXPECTED_BEHAVIOUR = {
    Nat.NONE: (NO_TRANSLATION, ENDPOINT_INDEPENDENT),
    Nat.FULL_CONE: (ENDPOINT_INDEPENDENT, ENDPOINT_INDEPENDENT),
    Nat.PORT_RESTRICTED: (ENDPOINT_INDEPENDENT, ADDRESS_AND_PORT_DEPENDENT),
    Nat.SYMMETRIC: (ADDRESS_AND_PORT_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT),
}

# Seconds a full-cone mapping lives after the inside socket last sent through it.
FULL_CONE_TIMEOUT = 300


def ruleset(nat: Nat, wan: str = "wan") -> str:
    """The nftables ruleset of a router of type `nat` whose public interface is `wan`."""
    if nat is Nat.NONE:
        # A plain router: nothing filtered, nothing translated. The counter exists so that
        # every router can be read the same way.
        return "table ip natlab {\n    counter dropped { }\n}\n"

    full_cone = nat is Nat.FULL_CONE
    snat = {
        Nat.FULL_CONE: "masquerade",
        Nat.PORT_RESTRICTED: "masquerade",
        Nat.SYMMETRIC: "masquerade fully-random",
    }[nat]
    lines = ["table ip natlab {", "    counter dropped { }"]
    if full_cone:
        lines += [
            "    map fullcone {",
            "        type inet_service : ipv4_addr . inet_service",
            "        flags dynamic, timeout",
            f"        timeout {FULL_CONE_TIMEOUT}s",
            "    }",
        ]
    # The prerouting nat chain must exist even when empty: without a nat chain on that hook
    # the kernel does not translate replies back.
    lines += [
        "    chain prerouting {",
        "        type nat hook prerouting priority dstnat; policy accept;",
    ]
    if full_cone:
        lines.append(f'        iif "{wan}" meta l4proto udp dnat ip to udp dport map @fullcone')
    lines += [
        "    }",
        "    chain postrouting {",
        "        type nat hook postrouting priority srcnat; policy accept;",
        f'        oif "{wan}" {snat}',
        "    }",
    ]
    if full_cone:
        # After source NAT (srcnat + 10), so that the reply tuple holds the public port that
        # was really chosen. Only flows started inside: an outside-initiated flow's reply
        # tuple has the peer's port there.
        lines += [
            "    chain record {",
            "        type filter hook postrouting priority srcnat + 10; policy accept;",
            f'        oif "{wan}" ct direction original meta l4proto udp update @fullcone '
            f"{{ ct reply proto-dst timeout {FULL_CONE_TIMEOUT}s : "
            "ct original ip saddr . ct original proto-src }",
            "    }",
        ]
    lines += [
        "    chain input {",
        "        type filter hook input priority filter; policy accept;",
        f'        iif "{wan}" ct state established,related accept',
        f'        iif "{wan}" icmp type echo-request accept',
        f'        iif "{wan}" counter name "dropped" drop',
        "    }",
        "    chain forward {",
        "        type filter hook forward priority filter; policy accept;",
        f'        iif "{wan}" ct state established,related accept',
    ]
    if full_cone:
        lines.append(f'        iif "{wan}" ct status dnat accept')
    lines += [
        f'        iif "{wan}" counter name "dropped" drop',
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def dropped(namespace) -> int:
    """Packets the router in `namespace` has dropped so far (its `dropped` counter)."""
    out = namespace.run(["nft", "-j", "list", "counter", "ip", "natlab", "dropped"]).stdout
    for item in json.loads(out)["nftables"]:
        if "counter" in item:
            return int(item["counter"]["packets"])
    raise RuntimeError(f"no counter natlab/dropped in {namespace.name}")
