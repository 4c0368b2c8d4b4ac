"""Plain UDP probes: what a router does to mapping and filtering, and a plain hole punch.

Verdicts are accounts, not quiet periods: a probe that does not arrive is only called dropped
once a router's `dropped` counter has counted it. Every packet the lab sends is either received
or counted, so each wait ends as soon as everything is accounted for; `HANG_TIMEOUT` is reached
only when something hangs, and then the test fails and says what is missing.
"""

from __future__ import annotations

import dataclasses
import select
import socket
import time

from .nat import (ADDRESS_AND_PORT_DEPENDENT, ADDRESS_DEPENDENT, ENDPOINT_INDEPENDENT,
                  NO_TRANSLATION)
from .observer import HANG_TIMEOUT, Observer, read_answer

# How often a wait reads the routers' counters while nothing arrives.
POLL_INTERVAL = 0.02


@dataclasses.dataclass
class Behaviour:
    """How a site's router looked from outside."""

    mapping: str
    filtering: str
    #: The host's socket address.
    local: tuple[str, int]
    #: Its mapped address as each observer socket saw it.
    mapped: dict[str, tuple[str, int]]
    #: Whether the answer from another address, and from another port, got in.
    answers_in: dict[str, bool]

    @property
    def port_preserved(self) -> bool:
        """Whether every mapping kept the host's own port."""
        return all(port == self.local[1] for _, port in self.mapped.values())


def answer_or_drop(sock: socket.socket, token: str, site, drops_before: int):
    """Waits for the observer's answer `token` on `sock`, or for `site`'s router to drop it.

    Returns the mapped address from the answer, or None if the router counted a drop.
    """
    deadline = time.monotonic() + HANG_TIMEOUT
    while time.monotonic() < deadline:
        answer = read_answer(sock, token, POLL_INTERVAL)
        if answer is not None:
            return answer
        if site.dropped() > drops_before:
            return None
    raise AssertionError(f"the observer's answer {token} neither reached {site.host.name} nor "
                         f"was dropped by {site.router.name} within {HANG_TIMEOUT}s")


def wait_dropped(site, drops_before: int, count: int = 1) -> None:
    """Waits until `site`'s router has dropped `count` packets more than `drops_before`."""
    deadline = time.monotonic() + HANG_TIMEOUT
    while site.dropped() < drops_before + count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{site.router.name} did not drop {count} packet(s) within "
                                 f"{HANG_TIMEOUT}s")
        time.sleep(POLL_INTERVAL)


def receive(sock: socket.socket) -> tuple[bytes, tuple[str, int]]:
    """The next datagram on `sock` and its source; fails after `HANG_TIMEOUT`."""
    ready, _, _ = select.select([sock], [], [], HANG_TIMEOUT)
    if not ready:
        raise AssertionError(f"nothing arrived on {sock.getsockname()} within {HANG_TIMEOUT}s")
    return sock.recvfrom(2048)


def classify(site, observer: Observer) -> Behaviour:
    """Classifies `site`'s router by probing the observer from the site's host.

    Mapping: one socket asks all three observer sockets (another port, another address) for
    its mapped address; one address throughout is endpoint-independent, a change with the port
    is address-and-port-dependent, a change only with the address address-dependent, the
    host's own address no translation at all.

    Filtering: a fresh socket sends to the primary observer socket only and asks for answers
    from the other address and from the other port. The first getting in is
    endpoint-independent filtering; only the second, address-dependent; neither,
    address-and-port-dependent.
    """
    sock = site.host.udp_socket()
    local = (site.host.ip, sock.getsockname()[1])
    mapped = {to: observer.whoami(sock, to)
              for to in ("primary", "other_port", "other_address")}
    sock.close()
    if all(address == local for address in mapped.values()):
        mapping = NO_TRANSLATION
    elif mapped["primary"] == mapped["other_port"] == mapped["other_address"]:
        mapping = ENDPOINT_INDEPENDENT
    elif mapped["primary"] == mapped["other_port"]:
        # Random ports coincide once in about 64000 symmetric probes and land here.
        mapping = ADDRESS_DEPENDENT
    else:
        mapping = ADDRESS_AND_PORT_DEPENDENT

    sock = site.host.udp_socket()
    observer.whoami(sock, "primary")
    answers_in = {}
    for answer_from in ("other_address", "other_port"):
        drops_before = site.dropped()
        token = observer.request(sock, "primary", answer_from)
        answers_in[answer_from] = answer_or_drop(sock, token, site, drops_before) is not None
    sock.close()
    if answers_in["other_address"]:
        filtering = ENDPOINT_INDEPENDENT
    elif answers_in["other_port"]:
        filtering = ADDRESS_DEPENDENT
    else:
        filtering = ADDRESS_AND_PORT_DEPENDENT
    return Behaviour(mapping, filtering, local, mapped, answers_in)


@dataclasses.dataclass
class PunchResult:
    """The outcome of `hole_punch`."""

    success: bool
    #: Rounds run (the round in which both sides had heard each other, on success).
    rounds: int
    #: What happened, one line per event, for failure messages.
    log: list[str]


def hole_punch(topo, observer: Observer, max_rounds: int = 4) -> PunchResult:
    """A plain UDP hole punch between the hosts of sites a and b.

    Each host learns its mapped address from the observer (as from STUN) and the two are
    exchanged. Then, in each round, both hosts send one datagram at the same time, each to the
    address it has for the other: at first the learned mapped address, then the address the
    other's datagrams actually came from, once one has arrived (a peer-reflexive candidate in
    ICE's terms). A round ends when both datagrams are accounted for: received, or counted as
    dropped by a router. The punch succeeds when each host has received from the other; when
    it works at all it does in two rounds, since the first datagrams open the mappings and
    filters the second ones pass.
    """
    socks = {name: topo.sites[name].host.udp_socket() for name in ("a", "b")}
    peer = {"a": "b", "b": "a"}
    mapped = {name: observer.whoami(sock) for name, sock in socks.items()}
    target = {name: mapped[peer[name]] for name in socks}
    heard: dict[str, tuple[str, int] | None] = {"a": None, "b": None}
    log = [f"{name}: local {topo.sites[name].host.ip}:{socks[name].getsockname()[1]}, "
           f"mapped {mapped[name][0]}:{mapped[name][1]}" for name in socks]
    fd_name = {sock.fileno(): name for name, sock in socks.items()}
    try:
        for round_ in range(1, max_rounds + 1):
            drops_before = topo.dropped()
            for name, sock in socks.items():
                sock.sendto(f"natlab punch {name} {round_}".encode(), target[name])
                log.append(f"round {round_}: {name} -> {target[name][0]}:{target[name][1]}")
            received = 0
            deadline = time.monotonic() + HANG_TIMEOUT
            while True:
                ready, _, _ = select.select(list(socks.values()), [], [], POLL_INTERVAL)
                for sock in ready:
                    data, source = sock.recvfrom(2048)
                    name = fd_name[sock.fileno()]
                    if not data.startswith(b"natlab punch "):
                        continue
                    received += 1
                    heard[name] = source
                    target[name] = source
                    log.append(f"round {round_}: {name} heard {data.decode()!r} "
                               f"from {source[0]}:{source[1]}")
                if received == len(socks):
                    break
                if not ready:
                    drops = topo.dropped() - drops_before
                    if received + drops >= len(socks):
                        log.append(f"round {round_}: {drops} dropped by the routers")
                        break
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"round {round_}: {len(socks) - received} datagram(s) neither "
                        f"received nor dropped within {HANG_TIMEOUT}s\n" + "\n".join(log))
            if all(heard.values()):
                return PunchResult(True, round_, log)
        return PunchResult(False, max_rounds, log)
    finally:
        for sock in socks.values():
            sock.close()
