"""The NAT lab: network namespaces, veth pairs and nftables routers for peer-to-peer tests.

* `netns`: namespaces with per-run names, leftover cleanup, programs and sockets inside one.
* `nat`: the four router types (`Nat`) and the nftables rulesets that make them.
* `topology`: `Topology(a, b)`, the public segment with the relay and two sites; addresses.
* `observer`: a UDP observer on the relay (a STUN server in miniature) and its client.
* `probe`: classifying a router from outside, and a plain UDP hole punch between the sites.
* `mqttd`: the real mqttd in a lab node: relays, brokers with a `p2p://` listener, client
  commands (`pub`, `sub`, `p2p ping`) and what they print.
* `report`: tables of numbers a run prints at its end (the P2P matrix).
"""

from . import mqttd, report
from .nat import EXPECTED_BEHAVIOUR, Nat
from .netns import Namespace, cleanup_leftovers
from .observer import Observer
from .probe import Behaviour, PunchResult, classify, hole_punch
from .topology import RELAY_IP, RELAY_IP2, SITE_PLANS, Node, Site, Topology

__all__ = [
    "EXPECTED_BEHAVIOUR", "Nat", "Namespace", "cleanup_leftovers", "Observer", "Behaviour",
    "PunchResult", "classify", "hole_punch", "RELAY_IP", "RELAY_IP2", "SITE_PLANS", "Node",
    "Site", "Topology", "mqttd", "report",
]
