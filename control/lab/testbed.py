"""Lab: a throw-away network in namespaces, a router with one bridge per network and
one namespace per host, each joined to its bridge by a veth pair.

The router namespace forwards between the bridges, so traffic between overlays
crosses it; the host-side veth ends (`v-<host>`) are where isoebpf enforces.
Used by `make demo`, the integration tests and the benchmarks. Everything it
makes it removes on exit, also after a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import netaddr

from ..resource import Resource


@dataclass(frozen=True)
class Network:
    name: str
    gateway: str  # the router's address with the prefix length, e.g. 10.250.0.1/16
    gateway6: str | None = None


@dataclass(frozen=True)
class Host:
    name: str  # at most 13 characters: the router-side veth is v-<name>
    network: str
    address: str
    address6: str | None = None
    tcp_ports: tuple[int, ...] = (80, 22)
    udp_ports: tuple[int, ...] = (53,)


def default_prefix() -> str:
    """What this process's testbeds' namespaces are named after (`<prefix>-<host>`)."""
    return f"iso{os.getpid() % 100000}"


@dataclass
class Testbed(Resource):
    __test__ = False  # not a pytest class, despite the name

    networks: Sequence[Network]
    hosts: list[Host]
    prefix: str = field(default_factory=default_prefix)
    _servers: list[subprocess.Popen[str]] = field(default_factory=list)
    _made: list[str] = field(default_factory=list)

    @property
    def router(self) -> str:
        return f"{self.prefix}-router"

    def netns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    @staticmethod
    def veth(host: str) -> str:
        return f"v-{host}"

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def address_of(self, target: str) -> str:
        """A try's target as an address: itself, or the named host's IPv4 address."""
        return target if any(c in target for c in ".:") else self.host(target).address

    def host_of(self, target: str) -> Host:
        """The host a try's target names: a host name or one of its addresses."""
        return next(h for h in self.hosts if target in (h.name, h.address, h.address6))

    def _open(self) -> None:
        self._add_router(self.router)
        for net in self.networks:
            self._add_bridge(self.router, net)
        for host in self.hosts:
            self._plug(host)

    def _add_router(self, ns: str) -> None:
        """A namespace that forwards."""
        self._add_netns(ns)
        self.run_in(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        _ip("-n", ns, "link", "set", "lo", "up")

    @staticmethod
    def _add_bridge(ns: str, net: Network) -> None:
        """The network's bridge in `ns`, with the network's gateway addresses."""
        bridge = f"br-{net.name}"
        _ip("-n", ns, "link", "add", bridge, "type", "bridge")
        _ip("-n", ns, "addr", "add", net.gateway, "dev", bridge)
        if net.gateway6:
            _ip("-n", ns, "addr", "add", net.gateway6, "dev", bridge, "nodad")
        _ip("-n", ns, "link", "set", bridge, "up")

    def add_host(self, host: Host) -> None:
        """Plug one more host in while the testbed runs (a container starting)."""
        self.hosts = [*self.hosts, host]
        self._plug(host)

    def router_of(self, host: Host) -> str:
        """The namespace whose bridge the host is plugged into."""
        return self.router

    def _plug(self, host: Host) -> None:
        gateways = {n.name: n for n in self.networks}
        ns = self.netns(host.name)
        self._add_netns(ns)
        net = gateways[host.network]
        router = self.router_of(host)
        _ip("-n", router, "link", "add", self.veth(host.name), "type", "veth",
            "peer", "name", "eth0", "netns", ns)
        _ip("-n", router, "link", "set", self.veth(host.name), "master",
            f"br-{net.name}", "up")
        prefixlen = netaddr.IPNetwork(net.gateway).prefixlen
        _ip("-n", ns, "addr", "add", f"{host.address}/{prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "add", "default", "via", bare_address(net.gateway))
        if host.address6 and net.gateway6:
            length6 = netaddr.IPNetwork(net.gateway6).prefixlen
            _ip("-n", ns, "addr", "add", f"{host.address6}/{length6}", "dev", "eth0", "nodad")
            _ip("-n", ns, "-6", "route", "add", "default", "via", bare_address(net.gateway6))
        self._start_server(host)

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def _start_server(self, host: Host) -> None:
        args = [sys.executable, "-m", "isoebpf.lab.probe", "serve"]
        for port in host.tcp_ports:
            args += ["--tcp", str(port)]
        for port in host.udp_ports:
            args += ["--udp", str(port)]
        server = subprocess.Popen(["ip", "netns", "exec", self.netns(host.name), *args],
                                  stdout=subprocess.PIPE, text=True)
        self._servers.append(server)
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"probe server in {host.name} did not start")

    def run_in(self, netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", netns, *args], check=check,
                              capture_output=True, text=True)

    def probe(self, client: str, proto: str, target: str, port: int = 0,
              timeout: float = 2.0) -> dict[str, object]:
        """What `client` sees when it tries `target` (a host name or an address)."""
        address = self.address_of(target)
        args = [sys.executable, "-m", "isoebpf.lab.probe", "connect", proto, address, str(port),
                "--timeout", str(timeout)]
        done = self.run_in(self.netns(client), *args)
        answer: dict[str, object] = json.loads(done.stdout)
        return answer

    def session(self, client: str, target: str, port: int, timeout: float = 2.0) -> Session:
        """A TCP connection from `client` that stays open until the Session is closed."""
        address = self.address_of(target)
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.netns(client), sys.executable, "-m", "isoebpf.lab.probe",
             "session", address, str(port), "--timeout", str(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        opened = Session(process)
        if opened.read() != "open":
            opened.close()
            raise RuntimeError(f"{client} could not open a session to {target}:{port}")
        return opened

    def close(self) -> None:
        stop_servers(self._servers)
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        self._made.clear()


@dataclass
class Session:
    """A live TCP connection driven from a probe process."""

    process: subprocess.Popen[str]

    def read(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        return str(json.loads(line)["outcome"]) if line else "closed"

    def exchange(self) -> str:
        """Send a line on the open connection: "echoed", "reset", "timeout" or "closed"."""
        assert self.process.stdin is not None
        self.process.stdin.write("ping\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream:
                stream.close()


def bare_address(address: str) -> str:
    """10.0.0.1/24 -> 10.0.0.1"""
    return address.split("/")[0]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def it_hr() -> Testbed:
    """The guide's example: IT and HR overlays, plus a network outside every overlay."""
    return Testbed(
        networks=[
            Network("it", "10.250.0.1/16"),
            Network("hr", "192.168.0.1/16", "fd00:4852::1/48"),
            Network("out", "203.0.113.1/24"),
        ],
        hosts=[
            Host("it1", "it", "10.250.1.10"),
            Host("it2", "it", "10.250.2.20"),
            Host("hr1", "hr", "192.168.1.10", "fd00:4852::10"),
            Host("hr2", "hr", "192.168.2.20", "fd00:4852::20"),
            Host("out1", "out", "203.0.113.10"),
        ],
    )


def stop_servers(servers: list[subprocess.Popen[str]]) -> None:
    """Kill probe servers (`isoebpf.lab.probe serve`) and forget them."""
    for server in servers:
        server.kill()
        server.wait()
        if server.stdout:
            server.stdout.close()
    servers.clear()
