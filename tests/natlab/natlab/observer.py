"""A UDP observer on the public segment: tells a sender the address it was seen from.

Like a STUN server with RFC 3489's CHANGE-REQUEST, in plain text. The server has three sockets:
`primary` (address 1, port p), `other_port` (address 1, another port) and `other_address`
(address 2, yet another port). A request

    natlab whoami <token> [same|primary|other_port|other_address]

sent to any of them is answered with

    natlab you <token> <ip> <port> <answering socket>

where `<ip> <port>` is the request's source as the observer saw it (the sender's mapped
address), sent from the receiving socket (`same`, the default) or the one named. Answering
from another socket is how a probe tests a NAT's filtering: the answer is a packet from an
address or port the inside host never sent to.

This file is also the server program (standalone on purpose, it imports nothing from the
package): `python3 observer.py ADDRESS OTHER_ADDRESS` binds the three sockets on port 0,
prints their addresses as one JSON line and serves until SIGTERM.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import time

SOCKETS = ("primary", "other_port", "other_address")
# Only a hang waits this long: nothing in the lab is lost or delayed.
HANG_TIMEOUT = 10.0


def serve(address: str, other_address: str) -> None:
    """The server loop (runs in the relay's namespace)."""
    socks = {}
    for name, ip in zip(SOCKETS, (address, address, other_address)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((ip, 0))
        socks[name] = sock
    by_fd = {sock.fileno(): name for name, sock in socks.items()}
    print(json.dumps({name: list(sock.getsockname()) for name, sock in socks.items()}),
          flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        readable, _, _ = select.select(list(socks.values()), [], [])
        for sock in readable:
            data, (ip, port) = sock.recvfrom(2048)
            words = data.decode("ascii", "replace").split()
            if len(words) < 3 or words[:2] != ["natlab", "whoami"]:
                continue
            token = words[2]
            answer_from = words[3] if len(words) > 3 else "same"
            if answer_from == "same":
                answer_from = by_fd[sock.fileno()]
            if answer_from not in socks:
                continue
            reply = f"natlab you {token} {ip} {port} {answer_from}".encode()
            socks[answer_from].sendto(reply, (ip, port))


class Observer:
    """The test side: a running observer process and requests to it."""

    def __init__(self, node, address: str, other_address: str):
        """Starts the observer in `node` (the relay host), on two of its addresses."""
        self.node = node
        self.process = node.popen([sys.executable, __file__, address, other_address],
                                  stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.process.stdout], [], [], HANG_TIMEOUT)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the observer in {node.name} printed no addresses "
                               f"(exit status {self.process.poll()})")
        self.addresses = {name: tuple(addr) for name, addr in json.loads(line).items()}
        self._tokens = iter(range(1, 1 << 62))

    def request(self, sock: socket.socket, to: str = "primary",
                answer_from: str = "same") -> str:
        """Sends a whoami request from `sock` to the observer's socket `to`; returns its token."""
        token = f"{id(sock):x}.{next(self._tokens)}"
        sock.sendto(f"natlab whoami {token} {answer_from}".encode(), self.addresses[to])
        return token

    def whoami(self, sock: socket.socket, to: str = "primary") -> tuple[str, int]:
        """The address `sock`'s packets to the observer's socket `to` arrive from."""
        token = self.request(sock, to)
        deadline = time.monotonic() + HANG_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            answer = read_answer(sock, token, left)
            if answer is not None:
                return answer
        raise AssertionError(f"no answer from the observer's {to} socket within "
                             f"{HANG_TIMEOUT}s")


def read_answer(sock: socket.socket, token: str, timeout: float) -> tuple[str, int] | None:
    """Waits up to `timeout` for the observer's answer to `token`; returns the mapped address.

    Other datagrams are read and ignored.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([sock], [], [], max(0.0, left))
        if not ready:
            return None
        data, _ = sock.recvfrom(2048)
        words = data.decode("ascii", "replace").split()
        if len(words) >= 5 and words[:3] == ["natlab", "you", token]:
            return words[3], int(words[4])


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
