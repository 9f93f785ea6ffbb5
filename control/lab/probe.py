"""Lab: real sockets for the testbed, servers that answer and clients that report what they saw.

Run inside a network namespace (`ip netns exec NS python -m isoebpf.lab.probe ...`).
A client prints one JSON line: the outcome a user would see
("connected", "refused", "unreachable" or "timeout") and how long it took.

Run by `testbed` inside its namespaces; imports nothing of ours.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable

GREETING = b"isoebpf-probe\n"
ICMP_ECHO_REQUEST = {socket.AF_INET: 8, socket.AF_INET6: 128}
ICMP_ECHO_REPLY = {socket.AF_INET: 0, socket.AF_INET6: 129}
ICMP_UNREACHABLE = {socket.AF_INET: 3, socket.AF_INET6: 1}
UNREACHABLE_ERRNOS = (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM)


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def serve(tcp_ports: list[int], udp_ports: list[int]) -> None:
    """TCP: greet and close. UDP: echo. Until killed."""
    sockets = []
    for port in tcp_ports:
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
            s.listen(128)
            sockets.append(s)
    for port in udp_ports:
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
            sockets.append(s)
    print("ready", flush=True)
    while True:
        readable, _, _ = select.select(sockets, [], [])
        for s in readable:
            if s.type == socket.SOCK_STREAM:
                conn, _ = s.accept()
                threading.Thread(target=_greet, args=(conn,), daemon=True).start()
            else:
                data, peer = s.recvfrom(2048)
                s.sendto(data, peer)


def _greet(conn: socket.socket) -> None:
    """Greet, then echo until the client closes: long-lived sessions need a partner."""
    with conn, contextlib.suppress(ConnectionError):  # a client that only shook hands
        conn.sendall(GREETING)
        while data := conn.recv(2048):
            conn.sendall(data)


def session_tcp(address: str, port: int, timeout: float) -> None:
    """Open a connection, say "open", then on each line of stdin send it and say what came back."""
    with socket.socket(_family(address), socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((address, port))
        if s.recv(64) != GREETING:
            raise SystemExit("no greeting")
        print(json.dumps({"outcome": "open"}), flush=True)
        for line in sys.stdin:
            try:
                s.sendall(line.encode())
                outcome = "echoed" if s.recv(2048) == line.encode() else "garbled"
            except (ConnectionResetError, BrokenPipeError):
                outcome = "reset"
            except TimeoutError:
                outcome = "timeout"
            print(json.dumps({"outcome": outcome}), flush=True)


def _outcome(attempt: Callable[[socket.socket], str], sock: socket.socket) -> str:
    """What a user would call the attempt's result."""
    try:
        return attempt(sock)
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError as err:
        if err.errno in UNREACHABLE_ERRNOS:
            return "unreachable"
        raise


def connect_tcp(address: str, port: int, timeout: float, greeting: bool = True) -> str:
    """"connected" once the server's greeting came back; `greeting=False`: the
    handshake alone, once the SYN-ACK did."""
    def attempt(s: socket.socket) -> str:
        try:
            s.connect((address, port))
        except ConnectionResetError:  # cut mid-handshake by a policy that rejects it
            return "reset"
        if greeting and s.recv(64) != GREETING:
            return "no-greeting"
        return "connected"

    with socket.socket(_family(address), socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        return _outcome(attempt, s)


def connect_udp(address: str, port: int, timeout: float) -> str:
    payload = os.urandom(8)

    def attempt(s: socket.socket) -> str:
        s.send(payload)
        return "connected" if s.recv(64) == payload else "garbled"

    with socket.socket(_family(address), socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((address, port))
        return _outcome(attempt, s)


def ping(address: str, timeout: float) -> str:
    """One echo request over a raw socket; an ICMP unreachable quoting it counts."""
    family = _family(address)
    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    ident = os.getpid() & 0xFFFF
    with socket.socket(family, socket.SOCK_RAW, proto) as s:
        header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST[family], 0, 0, ident, 1)
        payload = b"isoebpf"
        checksum = _checksum(header + payload) if family == socket.AF_INET else 0
        # The kernel fills in ICMPv6 checksums itself (they cover a pseudo-header).
        packet = struct.pack("!BBHHH", ICMP_ECHO_REQUEST[family], 0, checksum, ident, 1) + payload
        s.sendto(packet, (address, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([s], [], [], left)[0]:
                break
            data = s.recv(2048)
            icmp = data[(data[0] & 0x0F) * 4:] if family == socket.AF_INET else data
            kind = icmp[0]
            if kind == ICMP_ECHO_REPLY[family] and struct.unpack("!H", icmp[4:6])[0] == ident:
                return "connected"
            if kind == ICMP_UNREACHABLE[family] and _quotes_echo(icmp[8:], family, ident):
                return "unreachable"
        return "timeout"


def _quotes_echo(quoted: bytes, family: socket.AddressFamily, ident: int) -> bool:
    offset = (quoted[0] & 0x0F) * 4 if family == socket.AF_INET else 40
    inner = quoted[offset:offset + 8]
    return len(inner) >= 6 and struct.unpack("!H", inner[4:6])[0] == ident


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def retrying(attempt: Callable[[float], str], timeout: float, every: float = 0.2) -> str:
    """Repeat a datagram exchange until it is answered or `timeout` passes, as a
    resolver would: an exchange cut by a policy change is tried again under the new one."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        outcome = attempt(min(every, left))
        if outcome != "timeout":
            return outcome
    return "timeout"


def loop(tries: list[tuple[str, str, int]], timeout: float, pause: float) -> None:
    """Attempt `tries` round-robin, `pause` s apart, until stdin closes; one JSON line each.

    TCP is the handshake alone (the kernel retransmits a SYN as it always does);
    UDP and ICMP are resent every 0.2 s within `timeout`.
    """
    stop = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    index = 0
    while not stop.wait(pause):
        proto, address, port = tries[index % len(tries)]
        started = time.monotonic()
        if proto == "tcp":
            outcome = connect_tcp(address, port, timeout, greeting=False)
        elif proto == "udp":
            outcome = retrying(functools.partial(connect_udp, address, port), timeout)
        else:
            outcome = retrying(functools.partial(ping, address), timeout)
        print(json.dumps({"try": index % len(tries), "outcome": outcome, "t0": started,
                          "t1": time.monotonic()}), flush=True)
        index += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m isoebpf.lab.probe")
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser("serve")
    server.add_argument("--tcp", type=int, action="append", default=[])
    server.add_argument("--udp", type=int, action="append", default=[])
    client = sub.add_parser("connect")
    client.add_argument("proto", choices=["tcp", "udp", "icmp"])
    client.add_argument("address")
    client.add_argument("port", type=int, nargs="?", default=0)
    client.add_argument("--timeout", type=float, default=2.0)
    session = sub.add_parser("session")
    session.add_argument("address")
    session.add_argument("port", type=int)
    session.add_argument("--timeout", type=float, default=2.0)
    looping = sub.add_parser("loop")
    looping.add_argument("--try", dest="tries", nargs=3, action="append", required=True,
                         metavar=("PROTO", "ADDRESS", "PORT"))
    looping.add_argument("--timeout", type=float, default=2.5)
    looping.add_argument("--pause", type=float, default=0.01)
    args = parser.parse_args(argv)
    if args.command == "loop":
        loop([(p, a, int(port)) for p, a, port in args.tries], args.timeout, args.pause)
        return 0
    if args.command == "serve":
        serve(args.tcp, args.udp)
        return 0
    if args.command == "session":
        session_tcp(args.address, args.port, args.timeout)
        return 0
    started = time.monotonic()
    if args.proto == "tcp":
        outcome = connect_tcp(args.address, args.port, args.timeout)
    elif args.proto == "udp":
        outcome = connect_udp(args.address, args.port, args.timeout)
    else:
        outcome = ping(args.address, args.timeout)
    elapsed_ms = round((time.monotonic() - started) * 1000, 1)
    print(json.dumps({"outcome": outcome, "ms": elapsed_ms}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
