"""Lab: TCP relays that let a namespace reach services of the root namespace.

The cluster tests run each node's agent inside the node's namespace, so that a
firewall rule there cuts the node off from etcd as a partition would; etcd
runs on the root namespace's loopback. A relay listens on the node's loopback
(one port per target) and carries each connection to its target: a member's
client port. A target that dies resets what the relay carries, and a
connection to it is closed at once, as the member's own would be.

    python -m isoebpf.lab.relay NETNS HOST:PORT...   prints the ports it listens on, as JSON
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..resource import Resource

CLONE_NEWNET = 0x40000000


@dataclass
class Relay(Resource):
    """Relays from `netns`'s loopback to each of `targets` (host, port) of ours."""

    netns: str
    targets: Sequence[tuple[str, int]]
    ports: list[int] = field(default_factory=list)  # where each target is reached from netns
    _process: subprocess.Popen[str] | None = None

    def _open(self) -> None:
        self._process = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "--", sys.executable, "-m", "isoebpf.lab.relay",
             self.netns, *(f"{host}:{port}" for host, port in self.targets)],
            stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the relay into {self.netns} did not start")
        self.ports = json.loads(line)

    def urls(self, scheme: str = "http") -> list[str]:
        return [f"{scheme}://127.0.0.1:{port}" for port in self.ports]

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def _listeners(netns: str, count: int) -> list[socket.socket]:
    """`count` listening sockets on `netns`'s loopback: made there, used from here."""
    home = f"/proc/{os.getpid()}/task/{threading.get_native_id()}/ns/net"
    home_fd = os.open(home, os.O_RDONLY)
    try:
        _setns(f"/run/netns/{netns}")
        try:
            found = []
            for _ in range(count):
                listener = socket.socket()
                listener.bind(("127.0.0.1", 0))
                listener.listen(64)
                found.append(listener)
            return found
        finally:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.setns(home_fd, CLONE_NEWNET)
    finally:
        os.close(home_fd)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    for end in (source, sink):
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)


def _carry(client: socket.socket, target: tuple[str, int]) -> None:
    try:
        upstream = socket.create_connection(target, timeout=2)
    except OSError:
        client.close()  # as the dead member's own port would refuse it
        return
    upstream.settimeout(None)
    threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
    _pump(client, upstream)


def _serve(listener: socket.socket, target: tuple[str, int]) -> None:
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_carry, args=(client, target), daemon=True).start()


def main(argv: list[str]) -> None:
    netns, *said = argv
    targets = [(host, int(port)) for host, _, port in (t.rpartition(":") for t in said)]
    listeners = _listeners(netns, len(targets))
    for listener, target in zip(listeners, targets, strict=True):
        threading.Thread(target=_serve, args=(listener, target), daemon=True).start()
    print(json.dumps([listener.getsockname()[1] for listener in listeners]), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
