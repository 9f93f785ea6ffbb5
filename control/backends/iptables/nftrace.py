"""iptables backend, kernel half: verdict events from nf_tables' packet tracing (nftrace).

Only where iptables is the nf_tables flavour. While tracing, a table of our own
(`inet isoebpf-trace`) marks forwarded packets for tracing, at most `per_second`
of them a second (the rest are counted, as suppressed), and `nft monitor` reports
each marked packet's way through the filter table. The trace names rules by
handle only (nftables cannot show iptables-nft's comments), so handles are mapped
to our rule names by position: `nft -a list chain` and `iptables-save` list our
chain in the same order.

The table is outside the filter table the drift check and the canary read, and is
deleted when tracing ends; one left behind by a trace killed outright is replaced
by the next trace, or removed by `unload`.

The iptables `Backend`'s tracer; yields `interface.Verdict`s as the eBPF one does.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import netaddr

from ...errors import BackendError
from ...ir.evaluate import IPPROTO_ICMPV6
from ...resource import Resource
from ..interface import PROTOCOLS as PROTOCOLS_BY_CODE
from ..interface import Verdict

TABLE = "isoebpf-trace"
CHAIN = "forward"
PRIORITY = -200  # before iptables-nft's filter chains (priority 0)
READY_SECONDS = 10.0  # how long `nft monitor` may take to subscribe
MAX_PENDING = 10000  # traces still waiting for their verdict; older ones are forgotten
FAMILIES = {"ip": 4, "ip6": 6}
# Protocol names as nft prints them (ICMPv6 also as "ipv6-icmp").
PROTOCOLS = {name: code for code, name in PROTOCOLS_BY_CODE.items()} | {"ipv6-icmp": IPPROTO_ICMPV6}
TRACE = re.compile(r"trace id (\w+) (\S+) (\S+) (\S+) (.*)\Z")
VERDICT = re.compile(r"handle (\d+) \(verdict ([^)]*)\)")
HANDLE = re.compile(r"# handle (\d+)\Z")



class Run(Protocol):
    """Runs a command in the traced namespace (argument list, optional stdin), returns stdout."""

    def __call__(self, args: Sequence[str], stdin: str | None = None) -> str: ...


# Our chain's rules in one family, in order: (rule name, action, audit mode let it pass
# instead), from iptables-save.
ChainRules = Callable[[int], list[tuple[str, str, bool]]]


def remove_table(run: Run) -> bool:
    """Delete our table where one is left (a trace killed outright); whether it was."""
    if TABLE not in run(["nft", "list", "tables", "inet"]).split():
        return False
    run(["nft", "delete", "table", "inet", TABLE])
    return True


def table_script(per_second: int) -> str:
    """`nft -f` input (re)creating our table in one transaction: packets beyond the
    rate are counted and leave the chain before the rule that marks them."""
    return (f"table inet {TABLE}\ndelete table inet {TABLE}\n"
            f"table inet {TABLE} {{\n chain {CHAIN} {{\n"
            f"  type filter hook forward priority {PRIORITY}; policy accept;\n"
            f"  limit rate over {per_second}/second counter return\n"
            "  meta nftrace set 1\n }\n}\n")


def chain_handles(listing: str) -> list[int]:
    """The rule handles of an `nft -a list chain` listing, in order."""
    return [int(m[1]) for line in listing.splitlines()
            if (m := HANDLE.search(line.strip())) and not line.strip().startswith("chain ")]


@dataclass
class Packet:
    """What a trace's `packet:` line says, and whether the packet took our jump."""

    ifname: str = "?"
    family: int = 0
    proto: int = 0
    src: netaddr.IPAddress = field(default_factory=lambda: netaddr.IPAddress(0))
    sport: int = 0
    dst: netaddr.IPAddress = field(default_factory=lambda: netaddr.IPAddress(0))
    dport: int = 0
    filtered: bool = False

    @staticmethod
    def parse(text: str) -> Packet:
        packet = Packet()
        if m := re.search(r'\biif "([^"]+)"', text):
            packet.ifname = m[1]
        for family, version in FAMILIES.items():
            src = re.search(rf"\b{family} saddr (\S+)", text)
            dst = re.search(rf"\b{family} daddr (\S+)", text)
            if src and dst:
                packet.family = version
                packet.src, packet.dst = netaddr.IPAddress(src[1]), netaddr.IPAddress(dst[1])
        if m := re.search(r"\b(?:ip protocol|ip6 nexthdr) (\S+)", text):
            packet.proto = PROTOCOLS.get(m[1]) or _protocol_number(m[1])
        if m := re.search(r"\b(?:tcp|udp) sport (\d+)", text):
            packet.sport = int(m[1])
        if m := re.search(r"\b(?:tcp|udp) dport (\d+)", text):
            packet.dport = int(m[1])
        return packet


class Tracer(Resource):
    """Verdicts of our chain, while this is open (`with`); `suppressed` counts the
    packets the rate limit left untraced. `lost` stays 0: netlink overruns are not
    counted."""

    def __init__(self, netns: str | None, run: Run, chain: str, chain_rules: ChainRules,
                 texts: Mapping[str, str], per_second: int) -> None:
        self.netns = netns
        self.run = run
        self.chain = chain
        self.chain_rules = chain_rules
        self.texts = dict(texts)
        self.per_second = per_second
        self.suppressed = 0
        self.lost = 0
        self._rules: dict[tuple[int, int], tuple[str, str, bool]] = {}  # (family, handle) -> name, action, audit
        self._pending: dict[str, Packet] = {}  # trace id -> the packet, until its verdict
        self._monitor: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._table = False

    def _open(self) -> None:
        self.learn()
        self._monitor = subprocess.Popen(
            [*(["ip", "netns", "exec", self.netns] if self.netns else []),
             "nft", "-a", "monitor"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._start()

    def _start(self) -> None:
        """Create our table once `nft monitor` listens: it reports the table it sees
        created, so we recreate it until it does."""
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            self.run(["nft", "-f", "-"], table_script(self.per_second))
            self._table = True
            wait = time.monotonic() + 0.5
            while time.monotonic() < wait:
                if any(line.startswith(f"add table inet {TABLE}")
                       for line in self._lines(wait - time.monotonic())):
                    return
        raise BackendError("nft monitor did not start listening in "
                           f"{READY_SECONDS:.0f} s; is nftables installed and working?")

    def close(self) -> None:
        try:
            if self._table:
                self._table = False
                try:
                    listing = self.run(["nft", "list", "chain", "inet", TABLE, CHAIN])
                except BackendError:
                    listing = ""  # someone deleted our table (`nft flush ruleset`)
                if listing:
                    counted = re.search(r"counter packets (\d+)", listing)
                    self.suppressed = int(counted[1]) if counted else 0
                    self.run(["nft", "delete", "table", "inet", TABLE])
        finally:
            if self._monitor is not None:
                self._monitor.terminate()
                self._monitor.wait()
                assert self._monitor.stdout is not None
                self._monitor.stdout.close()
                self._monitor = None

    def learn(self) -> None:
        """Map our chain's rule handles to rule names, per family."""
        rules: dict[tuple[int, int], tuple[str, str, bool]] = {}
        for family, version in FAMILIES.items():
            try:
                listing = self.run(["nft", "-a", "list", "chain", family, "filter", self.chain])
            except BackendError:
                continue  # no such chain: nothing of this family to isolate
            handles, named = chain_handles(listing), self.chain_rules(version)
            if len(handles) != len(named):
                raise BackendError(f"{self.chain} has {len(handles)} rules in nftables but "
                                   f"{len(named)} in iptables-save ({family}); retry")
            rules.update(((version, h), r) for h, r in zip(handles, named, strict=True))
        self._rules = rules

    def _lines(self, timeout: float) -> Iterator[str]:
        """The monitor's complete lines that arrive within `timeout` seconds."""
        assert self._monitor is not None and self._monitor.stdout is not None
        fd = self._monitor.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return
            chunk = os.read(fd, 65536)
            if not chunk:
                raise BackendError("nft monitor stopped")
            *lines, self._buffer = (self._buffer + chunk).split(b"\n")
            yield from (line.decode(errors="replace") for line in lines)

    def verdicts(self, timeout: float) -> Iterator[Verdict]:
        """The verdicts that arrive within `timeout` seconds."""
        for line in self._lines(timeout):
            match = TRACE.match(line.rstrip())
            if match:
                verdict = self.step(*match.groups())
                if verdict is not None:
                    yield verdict

    def step(self, trace_id: str, family: str, table: str, chain: str,
              rest: str) -> Verdict | None:
        """One trace line: a packet's fields (from our table), or where it was judged."""
        if family == "inet" and table == TABLE:
            if rest.startswith("packet:"):
                if len(self._pending) >= MAX_PENDING:
                    del self._pending[next(iter(self._pending))]
                self._pending[trace_id] = Packet.parse(rest)
            return None
        packet = self._pending.get(trace_id)
        if packet is None or table != "filter" or family not in FAMILIES:
            return None
        version = FAMILIES[family]
        ruled = VERDICT.search(rest)
        if chain == self.chain and ruled and ruled[2] in ("return", "drop", "accept"):
            key = (version, int(ruled[1]))
            if key not in self._rules:
                # The policy changed since; if it is changing right now, the handle it is.
                with contextlib.suppress(BackendError):
                    self.learn()
            name, action, audit = self._rules.get(key, (f"rule handle {ruled[1]}", "allow"
                                                        if ruled[2] != "drop" else "drop", False))
            return self._verdict(trace_id, name, action, audit)
        if chain == "FORWARD":
            if ruled and ruled[2] == f"jump {self.chain}":
                packet.filtered = True
            elif not packet.filtered and (rest.startswith("policy ") or
                                                  (ruled and ruled[2] != "continue")):
                return self._verdict(trace_id, "unfiltered", "allow")
        return None

    def _verdict(self, trace_id: str, name: str, action: str, audit: bool = False) -> Verdict:
        p = self._pending.pop(trace_id)
        return Verdict(time.monotonic_ns(), p.ifname, p.family, p.proto, p.src, p.sport, p.dst,
                       p.dport, action, name, self.texts.get(name, name), audit)


def _protocol_number(name: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return socket.getprotobyname(name)
    except OSError:
        return 0
