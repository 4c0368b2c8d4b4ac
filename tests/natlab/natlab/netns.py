"""Network namespaces: names, creation and removal, and running code inside one.

Every namespace the lab creates is named `natlab-<pid>-<topology>-<role>`, where `<pid>` is the
process that created it. That makes the prefix unique per run and lets a later run recognise
what a crashed one left behind: `cleanup_leftovers()` removes every `natlab-<pid>-...`
namespace whose process is gone (and the processes still running inside it), and leaves those
of a run that is still alive alone.

Code runs inside a namespace in two ways:

* `Namespace.run()` and `Namespace.popen()` start a program with `ip netns exec`, for programs
  under test (a broker, a relay) and for `ip`/`nft` themselves.
* `Namespace.call()` runs a Python function on a short-lived thread that has joined the
  namespace with setns(2). A socket created there stays in that namespace for its whole life,
  so the test process can hold sockets in several namespaces at once and drive them from one
  loop, with no helper process to coordinate.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

PREFIX = "natlab-"
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
# How long a process gets between SIGTERM and SIGKILL at teardown.
TERM_GRACE = 5.0

_LEFTOVER = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")
# Names this process has created and not deleted yet: never leftovers, even for a reused pid.
_created: set[str] = set()


def run_prefix() -> str:
    """The prefix of every namespace this process creates."""
    return f"{PREFIX}{os.getpid()}-"


def _run(argv, *, input: str | None = None) -> str:
    done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed with status {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (those `ip netns` knows)."""
    out = _run(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_all_inside(name: str) -> None:
    """SIGKILLs every process still running in namespace `name` (only lab namespaces)."""
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in out.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def delete_namespace(name: str) -> None:
    """Removes a lab namespace: its processes first, then the name. Its links go with it."""
    if not name.startswith(PREFIX):
        raise ValueError(f"refusing to delete {name!r}: not a lab namespace")
    _kill_all_inside(name)
    done = subprocess.run(["ip", "netns", "delete", name], capture_output=True, text=True)
    if done.returncode != 0 and name in list_namespaces():
        raise RuntimeError(f"ip netns delete {name} failed: {done.stderr.strip()}")
    _created.discard(name)


def cleanup_leftovers() -> list[str]:
    """Deletes namespaces left by lab runs that are gone; returns their names.

    A run is gone when its process is. A namespace named with this process's own pid that this
    process did not create is a leftover too (the pid was reused).
    """
    removed = []
    for name in list_namespaces():
        match = _LEFTOVER.match(name)
        if not match or name in _created:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or not _pid_alive(pid):
            delete_namespace(name)
            removed.append(name)
    return removed


class Namespace:
    """One network namespace and the processes started in it."""

    def __init__(self, name: str):
        if not name.startswith(PREFIX):
            raise ValueError(f"lab namespace names start with {PREFIX!r}: {name!r}")
        self.name = name
        self._processes: list[subprocess.Popen] = []
        self._sockets: list[socket.socket] = []
        _run(["ip", "netns", "add", name])
        _created.add(name)
        try:
            self.ip("link set dev lo up")
        except BaseException:
            delete_namespace(name)
            raise

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    # --- programs ------------------------------------------------------------------------

    def exec_argv(self, argv) -> list[str]:
        """`argv` prefixed so that it runs inside this namespace."""
        return ["ip", "netns", "exec", self.name, *map(str, argv)]

    def run(self, argv, *, check: bool = True, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Runs a program inside the namespace to completion, capturing its output as text."""
        done = subprocess.run(self.exec_argv(argv), input=input, capture_output=True,
                              text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"in {self.name}: {' '.join(map(str, argv))} failed with status "
                               f"{done.returncode}: {done.stderr.strip()}")
        return done

    def popen(self, argv, **kwargs) -> subprocess.Popen:
        """Starts a program inside the namespace in its own process group.

        Keyword arguments go to `subprocess.Popen` (always with a new session, so that teardown
        can signal the whole group and nothing else). The process is terminated when the
        namespace is deleted (SIGTERM to its group, SIGKILL after `TERM_GRACE` seconds), unless
        it has exited by then; callers that care about its exit status stop it themselves.
        """
        kwargs["start_new_session"] = True
        process = subprocess.Popen(self.exec_argv(argv), **kwargs)
        self._processes.append(process)
        return process

    def ip(self, *commands: str) -> None:
        """Runs `ip` commands (one per argument, `ip -batch` syntax) inside the namespace."""
        _run(["ip", "-n", self.name, "-batch", "-"], input="\n".join(commands) + "\n")

    def nft(self, ruleset: str) -> None:
        """Loads an nftables ruleset (`nft -f` syntax) into the namespace."""
        _run(self.exec_argv(["nft", "-f", "-"]), input=ruleset)

    # --- code on a thread inside the namespace -------------------------------------------

    def call(self, fn, *args):
        """Runs `fn(*args)` on a thread that has joined this namespace; returns its result.

        setns(2) moves only the calling thread, so the rest of the process is unaffected.
        """
        result: dict = {}

        def target():
            try:
                with open(NETNS_DIR / self.name) as handle:
                    _setns(handle.fileno())
                result["value"] = fn(*args)
            except BaseException as err:  # handed to the caller below
                result["error"] = err

        thread = threading.Thread(target=target, name=f"netns {self.name}")
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["value"]

    def socket(self, family=socket.AF_INET, kind=socket.SOCK_DGRAM) -> socket.socket:
        """A socket that lives in this namespace, closed when the namespace is deleted."""
        sock = self.call(socket.socket, family, kind)
        self._sockets.append(sock)
        return sock

    def udp_socket(self, address: str = "0.0.0.0", port: int = 0) -> socket.socket:
        """A UDP socket in this namespace bound to `address:port` (port 0: any)."""
        sock = self.socket()
        sock.bind((address, port))
        return sock

    def sysctl(self, settings: dict) -> None:
        """Sets sysctls of this namespace: `sysctl({"net.ipv4.ip_forward": 1})`.

        /proc/sys/net shows the namespace of the thread that opens it. Keys whose file does not
        exist (IPv6 compiled out) are skipped.
        """
        def write():
            for key, value in settings.items():
                path = Path("/proc/sys") / key.replace(".", "/")
                if path.exists():
                    path.write_text(f"{value}\n")
        self.call(write)

    # --- teardown --------------------------------------------------------------------------

    def stop_processes(self) -> None:
        """SIGTERM to every process group started here, SIGKILL to those still alive later."""
        live = [p for p in self._processes if p.poll() is None]
        for process in live:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE
        for process in live:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
        for process in self._processes:
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None:
                    pipe.close()
        self._processes.clear()

    def delete(self) -> None:
        """Stops the processes started here, closes its sockets and deletes the namespace."""
        try:
            self.stop_processes()
        finally:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()
            delete_namespace(self.name)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass

