"""The bench's network: generator -> router -> sink, one namespace each.

    gen (192.168.1.10, HR)  eth0 == r-gen  router  r-sink == eth0  sink (10.250.1.10, IT)

Enforcers sit in the router (its two veths, or its FORWARD hook). The
generator is pinned to one CPU, and a veth hands a packet to the receiving
namespace on the sending CPU, so that CPU both generates and routes: the
router's work (enforcer included) is that CPU's softirq time, and the
generator's its user and system time. (Steering the router to the other CPU
with RPS overflows the backlog, which stops trafgen.) Neighbours are static, so no ARP moves during
a run. Everything made here is removed on exit, also after a failure or
Ctrl-C (the harness turns SIGTERM into an exception that reaches `close`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from isoebpf.backends import links
from isoebpf.resource import Resource

GEN_ADDR, ROUTER_GEN_ADDR = "192.168.1.10", "192.168.1.1"
SINK_ADDR, ROUTER_SINK_ADDR = "10.250.1.10", "10.250.1.1"
GEN_CPU = 0  # generates, and routes: see above
SINK_CPU = 1  # where iperf3's server reads, so that every TCP run places its processes alike
ROUTER_IFACES = ("r-gen", "r-sink")


def run(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


PREFIX = f"isob{os.getpid() % 100000}"  # the bench's namespaces are named after it


class Topology(Resource):
    def __init__(self) -> None:
        self.prefix = PREFIX
        self.gen, self.router, self.sink = (f"{self.prefix}-{n}" for n in ("gen", "rtr", "sink"))
        self._made: list[str] = []
        self._servers: list[subprocess.Popen[str]] = []
        self.macs: dict[str, str] = {}

    def exec(self, netns: str, *args: str, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", netns, *args, check=check, timeout=timeout)

    def _open(self) -> None:
        for ns in (self.gen, self.router, self.sink):
            run("ip", "netns", "add", ns)
            self._made.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        self.exec(self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for peer, ours, addr, gw in ((self.gen, "r-gen", GEN_ADDR, ROUTER_GEN_ADDR),
                                     (self.sink, "r-sink", SINK_ADDR, ROUTER_SINK_ADDR)):
            run("ip", "-n", self.router, "link", "add", ours, "type", "veth", "peer", "name", "eth0",
                "netns", peer)
            run("ip", "-n", self.router, "addr", "add", f"{gw}/24", "dev", ours)
            run("ip", "-n", peer, "addr", "add", f"{addr}/24", "dev", "eth0")
            run("ip", "-n", self.router, "link", "set", ours, "up")
            run("ip", "-n", peer, "link", "set", "eth0", "up")
            run("ip", "-n", peer, "route", "add", "default", "via", gw)
            self.macs[ours] = self._mac(self.router, ours)
            self.macs[peer] = self._mac(peer, "eth0")
            run("ip", "-n", peer, "neigh", "replace", gw, "lladdr", self.macs[ours], "dev", "eth0",
                "nud", "permanent")
            run("ip", "-n", self.router, "neigh", "replace", addr, "lladdr", self.macs[peer], "dev",
                ours, "nud", "permanent")
        self._start_iperf_server()

    def _mac(self, netns: str, dev: str) -> str:
        shown = json.loads(run("ip", "-j", "-n", netns, "link", "show", dev).stdout)
        return str(shown[0]["address"])

    def _start_iperf_server(self) -> None:
        server = subprocess.Popen(["ip", "netns", "exec", self.sink, "iperf3", "-s", "-p", "5201", "-A", str(SINK_CPU)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        self._servers.append(server)
        # Listening before the first client: on a busy machine that came after it (no result).
        deadline = time.monotonic() + 10
        while not self.exec(self.sink, "ss", "-Hltn", "sport = :5201").stdout.strip():
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("iperf3's server in the sink is not listening")
            time.sleep(0.05)

    def counters(self) -> dict[str, dict[str, int]]:
        """rx/tx packets of every interface on the path, by '<netns role>:<dev>'."""
        found: dict[str, dict[str, int]] = {}
        for role, netns in (("gen", self.gen), ("router", self.router), ("sink", self.sink)):
            for link in json.loads(run("ip", "-j", "-s", "-n", netns, "link", "show").stdout):
                stats: dict[str, Any] = link.get("stats64", {})
                found[f"{role}:{link['ifname']}"] = {
                    "rx": int(stats.get("rx", {}).get("packets", 0)),
                    "tx": int(stats.get("tx", {}).get("packets", 0)),
                    "rx_dropped": int(stats.get("rx", {}).get("dropped", 0)),
                    "tx_dropped": int(stats.get("tx", {}).get("dropped", 0)),
                }
        return found

    def close(self) -> None:
        for server in self._servers:
            server.kill()
            server.wait()
        self._servers.clear()
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        self._made.clear()

    def xdp(self, netns: str, dev: str, prog_fd: int | None, mode: str) -> None:
        """Attach a program to dev in mode ("xdp" native, "xdpgeneric"), or detach (None).
        Through netlink from here: `ip -n` remounts /sys and so hides bpffs pins."""
        with links.netlink(netns) as sock:
            link = next(k for k in links.links(sock) if k.name == dev)
            if prog_fd is None:
                links.detach_xdp(sock, link, mode)
            else:
                links.attach_xdp(sock, link, prog_fd, mode, replace=True)


def cpu_times() -> dict[int, dict[str, int]]:
    """Per-CPU times from /proc/stat, in clock ticks."""
    fields = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    times: dict[int, dict[str, int]] = {}
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                times[int(name[3:])] = dict(zip(fields, map(int, values), strict=False))
    return times


TICK_SECONDS = 1 / os.sysconf("SC_CLK_TCK")
PYTHON = sys.executable
