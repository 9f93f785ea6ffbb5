"""IR stage: the reference evaluator, the contract's semantics executed on the IR.

It is the executable spec. Every backend is tested against it: the eBPF
program through BPF_PROG_TEST_RUN and both backends with real traffic.
`decide` is pure; `Conntrack` holds the state (tracked connections and first
fragments) and applies the effects of each decision.

Reads only `tables`; `explain` asks it, and the backends' tests hold them to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

import netaddr

from .tables import (
    IR,
    PORT_BITS,
    PROTO_BITS,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    RULE_DEFAULT,
    RULE_ESTABLISHED,
    RULE_FRAGMENT,
    RULE_MALFORMED,
    RULE_UNFILTERED,
)

IPPROTO_ICMPV6 = 58
K = TypeVar("K")
V = TypeVar("V")
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10

# ICMP errors that may concern a tracked connection: destination unreachable
# (which carries "fragmentation needed"), time exceeded, and for IPv6 packet too big.
ICMP_ERRORS = {PROTO_ICMP: {3, 11}, IPPROTO_ICMPV6: {1, 2, 3}}
ICMP_ECHO_REQUEST = {PROTO_ICMP: 8, IPPROTO_ICMPV6: 128}
ICMP_ECHO_REPLY = {PROTO_ICMP: 0, IPPROTO_ICMPV6: 129}
# ICMPv6 router/neighbour solicitation and advertisement, and redirect: the
# link's own plumbing, which the contract leaves unfiltered.
ICMPV6_NEIGHBOUR_DISCOVERY = range(133, 138)
# How long the first fragment's verdict is kept for the fragments that follow.
FRAGMENT_TIMEOUT = 30


@dataclass(frozen=True)
class Packet:
    """What the classifier reads from one IP packet.

    `proto` is the IP protocol number (ICMPv6 is 58). For a later fragment
    (`frag_offset` > 0) the ports are not in the packet and are ignored.
    `inner` is the header an ICMP error quotes.
    """

    src: netaddr.IPAddress
    dst: netaddr.IPAddress
    proto: int
    sport: int = 0
    dport: int = 0
    tcp_flags: int = 0
    icmp_type: int = 0
    icmp_code: int = 0
    icmp_id: int = 0
    inner: Packet | None = None
    frag_id: int = 0
    frag_offset: int = 0
    more_fragments: bool = False
    truncated: bool = False  # the transport header is cut short

    @property
    def is_icmp(self) -> bool:
        return self.proto in (PROTO_ICMP, IPPROTO_ICMPV6)

    @property
    def is_later_fragment(self) -> bool:
        return self.frag_offset > 0

    @property
    def is_fragment(self) -> bool:
        return self.frag_offset > 0 or self.more_fragments


FlowKey = tuple[int, netaddr.IPAddress, int, netaddr.IPAddress, int]
FragmentKey = tuple[netaddr.IPAddress, netaddr.IPAddress, int, int]


def flow_key(pkt: Packet) -> FlowKey | None:
    """The connection a packet belongs to, seen from its sender; None if untrackable."""
    if pkt.truncated:
        return None
    if pkt.proto in (PROTO_TCP, PROTO_UDP):
        return pkt.proto, pkt.src, pkt.sport, pkt.dst, pkt.dport
    if pkt.is_icmp:
        if pkt.icmp_type in (ICMP_ECHO_REQUEST[pkt.proto], ICMP_ECHO_REPLY[pkt.proto]):
            # Echo request and reply share the identifier: use it as both "ports".
            return pkt.proto, pkt.src, pkt.icmp_id, pkt.dst, pkt.icmp_id
        return None
    return pkt.proto, pkt.src, 0, pkt.dst, 0


def reverse(key: FlowKey) -> FlowKey:
    proto, src, sport, dst, dport = key
    return proto, dst, dport, src, sport


@dataclass
class Connection:
    """A tracked connection, stored under the key of its first packet."""

    last_seen: float
    fin_orig: bool = False
    fin_reply: bool = False
    closing: bool = False  # after RST or FIN both ways: alive only for tcp_closing


@dataclass(frozen=True)
class Decision:
    action: str  # "allow" | "reject" | "drop"
    rule: int  # rule id in ir.rules
    filtered: bool
    reason: str
    track: bool = False  # the packet starts a tracked connection
    connection: FlowKey | None = None  # the tracked connection it belongs to
    # Audit mode let a denial through (and tracks its connection, so that its replies
    # are not denials too); `action` is what enforcing would have done.
    audit: bool = False


class Classifier:
    """Lookups on the IR, organised like the kernel's maps."""

    def __init__(self, ir: IR) -> None:
        self.ir = ir
        prefixes: dict[tuple[int, int], dict[int, tuple[int, int]]] = {}
        for c in ir.classes:
            table = prefixes.setdefault((c.network.version, c.network.prefixlen), {})
            table[c.network.first] = (c.class_id, c.overlay_id)
        # Per family, longest prefix first: (network mask, {network: (class, overlay)}).
        self._masks: dict[int, list[tuple[int, dict[int, tuple[int, int]]]]] = {4: [], 6: []}
        for version, length in sorted(prefixes, key=lambda k: -k[1]):
            width = 32 if version == 4 else 128
            mask = ((1 << length) - 1) << (width - length)
            self._masks[version].append((mask, prefixes[(version, length)]))
        self._exceptions = {(e.src_class, e.dst_class): e.rule for e in ir.exceptions}
        self._allowed: dict[tuple[int, int], dict[tuple[int, int, int], int]] = {}
        for a in ir.allowed:
            self._allowed.setdefault((a.src_class, a.dst_class), {})[
                (a.proto, a.port, a.match_bits)
            ] = a.rule
        self._hairpin = {o.id: o.hairpin_rule for o in ir.overlays}

    def address_class(self, addr: netaddr.IPAddress) -> tuple[int, int]:
        """(class, overlay) of the longest named prefix holding addr; (0, 0) if none."""
        value = int(addr)
        for mask, table in self._masks[addr.version]:
            found = table.get(value & mask)
            if found is not None:
                return found
        return 0, 0

    def allow_rule(self, src: int, dst: int, proto: int, port: int) -> int | None:
        """The allow entry with the longest (protocol, port) prefix matching, as an LPM does."""
        table = self._allowed.get((src, dst))
        if not table:
            return None
        for bits in range(PROTO_BITS + PORT_BITS, -1, -1):
            if 0 < bits < PROTO_BITS:
                continue
            if bits == 0:
                key = (0, 0, 0)
            else:
                port_bits = bits - PROTO_BITS
                mask = ((1 << port_bits) - 1) << (PORT_BITS - port_bits)
                key = (proto, port & mask, bits)
            if key in table:
                return table[key]
        return None

    def judge(self, pkt: Packet) -> Decision:
        """Steps 1 and 2b-2d of the contract: the verdict for a packet of a new connection."""
        if (pkt.proto == IPPROTO_ICMPV6 and not pkt.truncated and not pkt.is_later_fragment
                and pkt.icmp_type in ICMPV6_NEIGHBOUR_DISCOVERY):
            return Decision("allow", RULE_UNFILTERED, False, "neighbour discovery")
        src_class, src_overlay = self.address_class(pkt.src)
        dst_class, dst_overlay = self.address_class(pkt.dst)
        if not src_class or not dst_class:
            return Decision("allow", RULE_UNFILTERED, False, "not between overlays")
        exception = self._exceptions.get((src_class, dst_class))
        if exception is not None:
            return Decision("allow", exception, False, "exception: never filtered", track=True)
        if pkt.truncated:
            return Decision("drop", RULE_MALFORMED, True, "transport header cut short")
        if src_overlay == dst_overlay and self._hairpin[src_overlay]:
            return Decision("allow", self._hairpin[src_overlay], True, "same overlay", track=True)
        proto = PROTO_ICMP if pkt.is_icmp else pkt.proto
        port = pkt.dport if proto in (PROTO_TCP, PROTO_UDP) else 0
        rule = self.allow_rule(src_class, dst_class, proto, port)
        if rule is not None:
            return Decision("allow", rule, True, "allowed by rule", track=True)
        if self.ir.default_action == "allow":
            return Decision("allow", RULE_DEFAULT, True, "default allow", track=True)
        return Decision(self.ir.default_action, RULE_DEFAULT, True, "default deny")


def decide(
    ir: IR | Classifier,
    pkt: Packet,
    tracked: Mapping[FlowKey, Connection] | None = None,
    fragments: Mapping[FragmentKey, Decision] | None = None,
) -> Decision:
    """The verdict for `pkt`, given the live (unexpired) tracked connections and
    the verdicts of first fragments seen."""
    classifier = ir if isinstance(ir, Classifier) else Classifier(ir)
    tracked = {} if tracked is None else tracked
    if pkt.is_later_fragment:
        verdict = classifier.judge(replace(pkt, sport=0, dport=0))
        if not verdict.filtered:
            return verdict
        first = ({} if fragments is None else fragments).get(_fragment_key(pkt))
        if first is None:
            return Decision("drop", RULE_FRAGMENT, True, "fragment without its first fragment",
                            audit=classifier.ir.audit)
        # A rejected datagram's later fragments are dropped: one answer is enough.
        action = "drop" if first.action == "reject" else first.action
        return replace(first, action=action, track=False, reason="follows its first fragment",
                       audit=action != "allow" and classifier.ir.audit)

    verdict = classifier.judge(pkt)
    key = flow_key(pkt)
    if not verdict.filtered:
        if verdict.track:  # an exception: its replies must find the connection
            return replace(verdict, connection=key, track=key is not None and key not in tracked)
        return verdict
    if key is not None and not pkt.truncated:
        for candidate in (key, reverse(key)):
            if candidate in tracked:
                return Decision("allow", RULE_ESTABLISHED, True, "tracked connection",
                                connection=candidate)
    if pkt.is_icmp and pkt.icmp_type in ICMP_ERRORS[pkt.proto] and pkt.inner is not None:
        inner = flow_key(pkt.inner)
        # The error must travel back to the quoted packet's sender.
        if inner is not None and pkt.dst == pkt.inner.src:
            for candidate in (inner, reverse(inner)):
                if candidate in tracked:
                    return Decision("allow", RULE_ESTABLISHED, True,
                                    "ICMP error about a tracked connection")
    audit = verdict.action != "allow" and classifier.ir.audit
    track = (verdict.track or audit) and key is not None and not _ends_tcp(pkt)
    return replace(verdict, track=track, connection=key if track else None, audit=audit)


def _ends_tcp(pkt: Packet) -> bool:
    return pkt.proto == PROTO_TCP and bool(pkt.tcp_flags & TCP_RST)


def _fragment_key(pkt: Packet) -> FragmentKey:
    return pkt.src, pkt.dst, pkt.proto, pkt.frag_id


class _Unexpired(Mapping[K, V]):
    """The entries of `entries` that `alive` accepts, checked on access: judging
    one packet looks up a few keys, so filtering the whole table would be waste."""

    def __init__(self, entries: Mapping[K, V], alive: Callable[[K, V], bool]) -> None:
        self._entries, self._alive = entries, alive

    def __getitem__(self, key: K) -> V:
        value = self._entries[key]
        if not self._alive(key, value):
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[K]:
        return (k for k, v in self._entries.items() if self._alive(k, v))

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclass
class Conntrack:
    """The evaluator's state: tracked connections and first-fragment verdicts."""

    connections: dict[FlowKey, Connection] = field(default_factory=dict)
    fragments: dict[FragmentKey, tuple[Decision, float]] = field(default_factory=dict)

    def live(self, ir: IR, now: float) -> Mapping[FlowKey, Connection]:
        return _Unexpired(self.connections, lambda k, c: not self._expired(ir, k, c, now))

    @staticmethod
    def _expired(ir: IR, key: FlowKey, conn: Connection, now: float) -> bool:
        proto = key[0]
        if conn.closing:
            timeout = ir.timeouts["tcp_closing"]
        elif proto == PROTO_TCP:
            timeout = ir.timeouts["tcp"]
        elif proto in (PROTO_ICMP, IPPROTO_ICMPV6):
            timeout = ir.timeouts["icmp"]
        else:
            timeout = ir.timeouts["udp"]
        return now - conn.last_seen > timeout

    def step(self, classifier: Classifier, pkt: Packet, now: float = 0.0) -> Decision:
        """Judge one packet and apply its effects on the state."""
        ir = classifier.ir
        live = self.live(ir, now)
        fragment = _fragment_key(pkt)
        first = self.fragments.get(fragment)
        fragments = {fragment: first[0]} if first and now - first[1] <= FRAGMENT_TIMEOUT else {}
        decision = decide(classifier, pkt, live, fragments)
        if pkt.more_fragments and not pkt.is_later_fragment:
            self.fragments[fragment] = (decision, now)
        if (decision.action != "allow" and not decision.audit) or pkt.is_later_fragment:
            return decision
        key = decision.connection
        if decision.track and key is not None:
            self.connections[key] = Connection(last_seen=now)
        elif key is not None and key in live:
            self._advance(key, live[key], pkt, now)
        return decision

    def _advance(self, key: FlowKey, conn: Connection, pkt: Packet, now: float) -> None:
        conn.last_seen = now
        if key[0] != PROTO_TCP:
            return
        if pkt.tcp_flags & TCP_RST:
            conn.closing = True
        elif pkt.tcp_flags & TCP_FIN:
            if flow_key(pkt) == key:
                conn.fin_orig = True
            else:
                conn.fin_reply = True
            conn.closing = conn.closing or (conn.fin_orig and conn.fin_reply)

    def revalidate(self, classifier: Classifier) -> None:
        """After a policy change: forget connections the new policy would not allow."""
        for key in list(self.connections):
            if classifier.judge(first_packet(key)).action != "allow":
                del self.connections[key]


def first_packet(key: FlowKey) -> Packet:
    """The packet that opened a tracked connection, as far as policy cares:
    what a new policy judges to decide whether the connection may live on."""
    proto, src, sport, dst, dport = key
    return Packet(src, dst, proto, sport=sport, dport=dport, tcp_flags=TCP_SYN,
                  icmp_type=ICMP_ECHO_REQUEST.get(proto, 0), icmp_id=sport)
