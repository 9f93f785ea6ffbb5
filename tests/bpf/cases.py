"""The datapath's table of cases: policy, packets, and what each must come to.

Plain data, so that tests/bpf/test_table.py and a benchmark can both walk it.
A case is a policy and a sequence of steps; each step sends one frame and
names the verdict ("pass", "drop", or "tx" for a REJECT answer sent back) and
the rule whose counter must move. Steps may first wait (expiry) or switch the
policy (revocation).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import netaddr

from isoebpf.ir.evaluate import IPPROTO_ICMPV6, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Packet
from isoebpf.ir.tables import PROTO_ICMP, PROTO_TCP, PROTO_UDP
from tests.packets import (
    BROADCAST_MAC,
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_ARP,
    IPPROTO_DSTOPTS,
    IPPROTO_HOPOPTS,
    PLAIN,
    Wire,
    build,
    build_other,
)

GRE = 47

POLICY = """\
version: 1
default: deny
deny_action: reject
overlays:
  it:
    subnets: [10.250.0.0/16, "fd00:250::/48"]
  hr:
    subnets: [192.168.0.0/16, "fd00:4852::/48"]
  lab:
    subnets: [172.20.0.0/16]
    isolated: true
exceptions:
  - {from: 10.250.7.0/24, to: 192.168.9.0/24}
allow:
  - {from: hr, to: it, ports: [tcp/80]}
  - {from: 192.168.5.0/24, to: 10.250.3.0/24}
  - {from: it, to: lab, ports: [udp/5000-5010, icmp, tcp/443]}
"""

# The same overlays with nothing allowed between them: what connections are cut by.
POLICY_CLOSED = POLICY.split("exceptions:")[0]

POLICY_DEFAULT_ALLOW = POLICY.replace("default: deny", "default: allow")
POLICY_DROP = POLICY.replace("deny_action: reject", "deny_action: drop")
POLICY_AUDIT = POLICY + "audit: true\n"


def ip(text: str) -> netaddr.IPAddress:
    return netaddr.IPAddress(text)


HR, HR5, HR9 = ip("192.168.1.10"), ip("192.168.5.5"), ip("192.168.9.9")
IT, IT3, IT7 = ip("10.250.1.10"), ip("10.250.3.3"), ip("10.250.7.7")
LAB, LAB2 = ip("172.20.0.5"), ip("172.20.0.6")
OUTSIDE = ip("203.0.113.5")
HR6, IT6 = ip("fd00:4852::10"), ip("fd00:250::10")


def tcp(src: netaddr.IPAddress, dst: netaddr.IPAddress, dport: int, flags: int = TCP_SYN,
        sport: int = 40000, **more: object) -> Packet:
    return Packet(src, dst, PROTO_TCP, sport=sport, dport=dport, tcp_flags=flags, **more)  # type: ignore[arg-type]


def udp(src: netaddr.IPAddress, dst: netaddr.IPAddress, dport: int, sport: int = 40000,
        **more: object) -> Packet:
    return Packet(src, dst, PROTO_UDP, sport=sport, dport=dport, **more)  # type: ignore[arg-type]


def echo(src: netaddr.IPAddress, dst: netaddr.IPAddress, reply: bool = False, ident: int = 7) -> Packet:
    proto = PROTO_ICMP if src.version == 4 else IPPROTO_ICMPV6
    kind = {(PROTO_ICMP, False): 8, (PROTO_ICMP, True): 0,
            (IPPROTO_ICMPV6, False): 128, (IPPROTO_ICMPV6, True): 129}[(proto, reply)]
    return Packet(src, dst, proto, icmp_type=kind, icmp_id=ident)


def icmp_error(src: netaddr.IPAddress, dst: netaddr.IPAddress, about: Packet, kind: int = 3,
               code: int = 1) -> Packet:
    proto = PROTO_ICMP if src.version == 4 else IPPROTO_ICMPV6
    return Packet(src, dst, proto, icmp_type=kind, icmp_code=code, inner=about)


def reverse(pkt: Packet, flags: int = TCP_SYN | TCP_ACK) -> Packet:
    """The answer to pkt: addresses and ports swapped."""
    return replace(pkt, src=pkt.dst, dst=pkt.src, sport=pkt.dport, dport=pkt.sport,
                   tcp_flags=flags if pkt.proto == PROTO_TCP else 0)


@dataclass(frozen=True)
class Step:
    frame: bytes
    verdict: str  # "pass" | "drop" | "tx"
    rule: str  # the rule whose counter moves: "unfiltered", "allow:0", "default", ...
    wait: float = 0.0  # seconds to let pass first (expiry)
    switch_to: str | None = None  # load this policy first
    lazy: bool = False  # ... flipping the generation only: revocation left to the datapath


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    steps: tuple[Step, ...]
    policy: str = POLICY
    timeouts: dict[str, float] = field(default_factory=dict)  # shortened, in seconds
    fragment_timeout: float | None = None


def tagged(*tpids: int, **more: object) -> Wire:
    """A wire whose frames carry one VLAN tag per TPID, outermost first (VIDs 10, 20, ...)."""
    return Wire(tags=tuple((tpid, 10 * (i + 1)) for i, tpid in enumerate(tpids)), **more)  # type: ignore[arg-type]


# QinQ as 802.1ad means it (a service tag, then a customer tag), and as older switches stack it.
QINQ = tagged(ETH_P_8021AD, ETH_P_8021Q)
QINQ_OLD = tagged(ETH_P_8021Q, ETH_P_8021Q)
THREE_TAGS = tagged(ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q)


def step(pkt: Packet, verdict: str, rule: str, wire: Wire = PLAIN, **more: object) -> Step:
    return Step(build(pkt, wire), verdict, rule, **more)  # type: ignore[arg-type]


SHORT = 0.3  # a shortened timeout, in seconds
PAST_SHORT = 0.6  # a wait that outlasts it

SYN_80 = tcp(HR, IT, 80)
SYN_22 = tcp(HR, IT, 22)
FIRST_FRAGMENT = udp(HR5, IT3, 9999, frag_id=77, more_fragments=True)
LATER_FRAGMENT = replace(FIRST_FRAGMENT, sport=0, dport=0, frag_offset=185, more_fragments=False)

CASES: tuple[Case, ...] = (
    Case("arp", "not IP: passes untouched", (
        Step(build_other(ETH_P_ARP), "pass", "unfiltered"),)),
    Case("qinq", "two VLAN tags, either kind in either place, are parsed; the answer keeps both", (
        step(SYN_80, "pass", "allow:0", QINQ),
        step(reverse(SYN_80), "pass", "established", QINQ_OLD),
        step(SYN_22, "tx", "default", QINQ),
        step(udp(HR, IT, 53), "tx", "default", QINQ_OLD),
        step(udp(HR6, IT6, 53), "tx", "default", tagged(ETH_P_8021AD, ETH_P_8021AD)),
        step(tcp(HR6, IT6, 22), "tx", "default", tagged(ETH_P_8021Q, ETH_P_8021AD)),
        step(echo(IT, LAB), "pass", "allow:2", QINQ),
        step(tcp(OUTSIDE, IT, 22), "pass", "unfiltered", QINQ),
        Step(build_other(ETH_P_ARP, wire=QINQ), "pass", "unfiltered"),)),
    Case("unreadable-link-header", "tags, or the IP header behind them, that cannot be read: malformed", (
        step(SYN_80, "drop", "malformed", THREE_TAGS),
        step(tcp(OUTSIDE, IT, 22), "drop", "malformed", THREE_TAGS),
        Step(build_other(ETH_P_ARP, wire=THREE_TAGS), "drop", "malformed"),
        step(SYN_80, "drop", "malformed", tagged(ETH_P_8021Q, cut=14)),
        step(SYN_80, "drop", "malformed", tagged(ETH_P_8021AD, cut=17)),
        step(SYN_80, "drop", "malformed", tagged(ETH_P_8021AD, ETH_P_8021Q, cut=20)),
        step(udp(HR6, IT6, 53), "drop", "malformed", tagged(ETH_P_8021Q, cut=18 + 30)),
        step(udp(HR6, IT6, 53), "drop", "malformed", tagged(ETH_P_8021AD, ETH_P_8021Q, cut=22 + 30)),)),
    Case("neighbour-discovery", "ICMPv6 neighbour solicitation between overlays: unfiltered", (
        step(Packet(HR6, IT6, IPPROTO_ICMPV6, icmp_type=135), "pass", "unfiltered"),
        step(Packet(IT6, HR6, IPPROTO_ICMPV6, icmp_type=136), "pass", "unfiltered"),
        step(Packet(IT6, HR6, IPPROTO_ICMPV6, icmp_type=138), "tx", "default"),)),
    Case("fin-after-rst", "a FIN after a RST does not reopen the connection", (
        step(SYN_80, "pass", "allow:0"),
        step(reverse(SYN_80, TCP_RST), "pass", "established"),
        step(replace(SYN_80, tcp_flags=TCP_FIN | TCP_ACK), "pass", "established"),
        step(reverse(SYN_80, TCP_ACK), "tx", "default", wait=PAST_SHORT)),
        timeouts={"tcp_closing": SHORT}),
    Case("outside", "source outside every overlay: unfiltered", (
        step(tcp(OUTSIDE, IT, 22), "pass", "unfiltered"),
        step(tcp(IT, OUTSIDE, 22), "pass", "unfiltered"),)),
    Case("allow-and-reply", "an allowed connection, then its reply as established", (
        step(SYN_80, "pass", "allow:0"),
        step(reverse(SYN_80), "pass", "established"),
        step(replace(SYN_80, tcp_flags=TCP_ACK), "pass", "established"),)),
    Case("reject-tcp", "default deny answers TCP with a reset", (
        step(SYN_22, "tx", "default"),
        step(tcp(HR, IT, 22, flags=TCP_ACK | 0x08), "tx", "default", Wire(seq=1000, ack=5555)),
        step(tcp(HR, IT, 22), "tx", "default", Wire(seq=4294967290, payload=b"hello world")),)),
    Case("reject-udp", "default deny answers UDP with ICMP admin-prohibited", (
        step(udp(HR, IT, 53), "tx", "default", Wire(payload=b"query")),)),
    Case("reject-quote-limit", "ICMP replies quote no more than 576/1280 bytes allow", (
        step(udp(HR, IT, 53), "tx", "default", Wire(payload=bytes(range(256)) * 6)),
        step(udp(HR6, IT6, 53), "tx", "default", Wire(payload=bytes(range(256)) * 6)),)),
    Case("reverse-not-allowed", "a rule allows one direction only", (
        step(tcp(IT, HR, 80), "tx", "default"),)),
    Case("hairpin", "same overlay, not isolated", (
        step(tcp(IT, IT3, 22), "pass", "hairpin:it"),
        step(reverse(tcp(IT, IT3, 22)), "pass", "established"),)),
    Case("isolated", "same overlay, isolated: judged by rules", (
        step(tcp(LAB, LAB2, 22), "tx", "default"),)),
    Case("exception", "an exception is unfiltered but tracked: its reply passes", (
        step(tcp(IT7, HR9, 22), "pass", "exception:0"),
        step(reverse(tcp(IT7, HR9, 22)), "pass", "established"),
        step(tcp(HR9, IT7, 23), "tx", "default"),)),
    Case("any-protocol", "a rule without ports allows every protocol", (
        step(Packet(HR5, IT3, GRE), "pass", "allow:1"),
        step(Packet(IT3, HR5, GRE), "pass", "established"),
        step(Packet(HR, IT, GRE), "tx", "default"),)),
    Case("port-range-and-icmp", "udp/5000-5010 and icmp", (
        step(udp(IT, LAB, 5005), "pass", "allow:2"),
        step(udp(IT, LAB, 5011), "tx", "default"),
        step(echo(IT, LAB), "pass", "allow:2"),
        step(echo(LAB, IT, reply=True), "pass", "established"),
        step(echo(LAB, IT, ident=8), "tx", "default"),)),
    Case("ipv6", "IPv6 rules, reset and ICMPv6 answers", (
        step(tcp(HR6, IT6, 80), "pass", "allow:0"),
        step(reverse(tcp(HR6, IT6, 80)), "pass", "established"),
        step(tcp(HR6, IT6, 81), "tx", "default"),
        step(udp(HR6, IT6, 53), "tx", "default"),
        step(echo(IT6, HR6), "tx", "default"),)),
    Case("ipv6-extension-headers", "extension headers are walked, up to a bound", (
        step(tcp(HR6, IT6, 80), "pass", "allow:0", Wire(ext_headers=(IPPROTO_HOPOPTS, IPPROTO_DSTOPTS))),
        step(tcp(HR6, IT6, 22, sport=40001), "tx", "default", Wire(ext_headers=(IPPROTO_HOPOPTS,))),
        step(tcp(HR6, IT6, 80, sport=40002), "drop", "malformed", Wire(ext_headers=(IPPROTO_DSTOPTS,) * 9)),)),
    Case("vlan", "one VLAN tag, 802.1Q or 802.1ad, is parsed; the answer keeps it", (
        step(SYN_80, "pass", "allow:0", tagged(ETH_P_8021Q)),
        step(SYN_22, "tx", "default", tagged(ETH_P_8021Q)),
        step(udp(HR, IT, 53), "tx", "default", tagged(ETH_P_8021Q)),
        step(tcp(HR, IT, 22, sport=40001), "tx", "default", tagged(ETH_P_8021AD)),
        step(udp(HR6, IT6, 53), "tx", "default", tagged(ETH_P_8021AD, payload=bytes(range(256)) * 6)),)),
    Case("ipv4-options", "IPv4 options are skipped; an ICMP answer quotes them", (
        step(SYN_80, "pass", "allow:0", Wire(ip_options=b"\x94\x04\x00\x00" * 3)),
        step(udp(HR, IT, 53), "tx", "default", Wire(ip_options=b"\x94\x04\x00\x00")),
        step(tcp(HR, IT, 22), "tx", "default", Wire(ip_options=b"\x01" * 8)),)),
    Case("truncated-transport", "a filtered packet cut inside its transport header", (
        step(SYN_80, "drop", "malformed", Wire(cut=14 + 20 + 10)),
        step(udp(HR6, IT6, 53), "drop", "malformed", Wire(cut=14 + 40 + 4)),
        step(echo(IT, LAB), "drop", "malformed", Wire(cut=14 + 20 + 6)),
        step(tcp(OUTSIDE, IT, 80), "pass", "unfiltered", Wire(cut=14 + 20 + 10)),)),
    Case("malformed-ip", "an IP header that cannot be read is dropped", (
        step(SYN_80, "drop", "malformed", Wire(cut=14 + 12)),
        step(tcp(HR6, IT6, 80), "drop", "malformed", Wire(cut=14 + 30)),
        Step(build(SYN_80)[:14] + bytes([0x44]) + build(SYN_80)[15:], "drop", "malformed"),
        Step(build(SYN_80)[:16] + b"\x00\x10" + build(SYN_80)[18:], "drop", "malformed"),
        Step(build(tcp(HR6, IT6, 80))[:14] + b"\x45" + build(tcp(HR6, IT6, 80))[15:], "drop", "malformed"),)),
    Case("fragments", "later fragments follow the first; without it they are dropped", (
        step(FIRST_FRAGMENT, "pass", "allow:1"),
        step(LATER_FRAGMENT, "pass", "allow:1"),
        step(replace(LATER_FRAGMENT, frag_id=78), "drop", "fragment"),
        step(udp(HR, IT, 53, frag_id=90, more_fragments=True), "tx", "default"),
        step(Packet(HR, IT, PROTO_UDP, frag_id=90, frag_offset=3), "drop", "default"),)),
    Case("ipv6-fragments", "the same through the IPv6 fragment header", (
        step(tcp(HR6, IT6, 80, frag_id=70000, more_fragments=True), "pass", "allow:0"),
        step(Packet(HR6, IT6, PROTO_TCP, frag_id=70000, frag_offset=100), "pass", "allow:0"),
        step(Packet(HR6, IT6, PROTO_TCP, frag_id=70001, frag_offset=100), "drop", "fragment"),)),
    Case("fragment-expiry", "a first fragment's verdict is kept for a while only", (
        step(FIRST_FRAGMENT, "pass", "allow:1"),
        step(LATER_FRAGMENT, "drop", "fragment", wait=PAST_SHORT),), fragment_timeout=SHORT),
    Case("icmp-error-tracked", "an ICMP error about a tracked connection passes", (
        step(SYN_80, "pass", "allow:0"),
        step(icmp_error(IT, HR, SYN_80), "pass", "established"),
        step(icmp_error(OUTSIDE, HR, SYN_80, kind=11, code=0), "pass", "unfiltered"),
        step(icmp_error(IT3, HR, SYN_80, kind=11, code=0), "pass", "established"),
        step(icmp_error(IT, HR5, SYN_80), "drop", "default"),
        step(icmp_error(IT, HR, SYN_22), "drop", "default"),)),
    Case("icmp-error-short-quote", "a quote without 8 transport bytes names no connection", (
        step(SYN_80, "pass", "allow:0"),
        step(icmp_error(IT, HR, SYN_80), "drop", "default", Wire(quote=24)),)),
    Case("icmpv6-error-tracked", "ICMPv6 packet too big about a tracked connection", (
        step(tcp(HR6, IT6, 80), "pass", "allow:0"),
        step(icmp_error(IT6, HR6, tcp(HR6, IT6, 80), kind=2, code=0), "pass", "established"),
        step(icmp_error(IT6, HR6, tcp(HR6, IT6, 81), kind=1, code=4), "drop", "default"),)),
    Case("no-answer-to-answers", "a reset or an ICMP error is never answered", (
        step(tcp(HR, IT, 22, flags=TCP_RST), "drop", "default"),
        step(tcp(HR, IT, 22, flags=TCP_RST), "drop", "default"),
        step(udp(HR, IT, 53), "drop", "default", Wire(dst_mac=BROADCAST_MAC)),
        step(icmp_error(HR, IT, udp(IT, HR, 53)), "drop", "default"),
        step(icmp_error(HR6, IT6, udp(IT6, HR6, 53), kind=3, code=0), "drop", "default"),)),
    Case("rst-opens-nothing", "an allowed reset is not tracked", (
        step(tcp(HR, IT, 80, flags=TCP_RST), "pass", "allow:0"),
        step(reverse(tcp(HR, IT, 80)), "tx", "default"),)),
    Case("default-allow", "default allow, and its connections tracked", (
        step(tcp(IT, HR, 22), "pass", "default"),
        step(reverse(tcp(IT, HR, 22)), "pass", "established"),), policy=POLICY_DEFAULT_ALLOW),
    Case("deny-drop", "deny_action drop answers nothing", (
        step(SYN_22, "drop", "default"),
        step(udp(HR6, IT6, 53), "drop", "default"),), policy=POLICY_DROP),
    Case("fin-both-ways", "FIN both ways closes; after tcp_closing the reply is judged afresh", (
        step(SYN_80, "pass", "allow:0"),
        step(reverse(SYN_80, TCP_FIN | TCP_ACK), "pass", "established"),
        step(replace(SYN_80, tcp_flags=TCP_FIN | TCP_ACK), "pass", "established"),
        step(reverse(SYN_80, TCP_ACK), "tx", "default", wait=PAST_SHORT),),
        timeouts={"tcp_closing": SHORT}),
    Case("fin-one-way", "FIN one way only leaves the connection open", (
        step(SYN_80, "pass", "allow:0"),
        step(replace(SYN_80, tcp_flags=TCP_FIN | TCP_ACK), "pass", "established"),
        step(reverse(SYN_80, TCP_ACK), "pass", "established", wait=PAST_SHORT),),
        timeouts={"tcp_closing": SHORT}),
    Case("rst-closes", "a reset closes the connection", (
        step(SYN_80, "pass", "allow:0"),
        step(reverse(SYN_80, TCP_RST), "pass", "established"),
        step(reverse(SYN_80, TCP_ACK), "tx", "default", wait=PAST_SHORT),),
        timeouts={"tcp_closing": SHORT}),
    Case("udp-expiry", "an idle UDP flow expires", (
        step(udp(HR5, IT3, 53), "pass", "allow:1"),
        step(reverse(udp(HR5, IT3, 53)), "pass", "established"),
        step(reverse(udp(HR5, IT3, 53)), "tx", "default", wait=PAST_SHORT),),
        timeouts={"udp": SHORT}),
    Case("icmp-expiry", "an idle echo flow expires", (
        step(echo(IT, LAB), "pass", "allow:2"),
        step(echo(LAB, IT, reply=True), "tx", "default", wait=PAST_SHORT),),
        timeouts={"icmp": SHORT}),
    Case("revoke", "a new policy cuts the connections it does not allow", (
        step(SYN_80, "pass", "allow:0"),
        step(reverse(SYN_80), "tx", "default", switch_to=POLICY_CLOSED),
        step(tcp(IT, IT3, 22), "pass", "hairpin:it"),)),
    Case("revoke-lazily", "the datapath re-judges a connection under the new generation", (
        step(SYN_80, "pass", "allow:0"),
        step(tcp(IT7, HR9, 22), "pass", "exception:0"),
        step(reverse(SYN_80), "tx", "default", switch_to=POLICY_CLOSED, lazy=True),
        step(reverse(tcp(IT7, HR9, 22)), "tx", "default"),)),
    Case("keep-on-update", "a new policy that still allows a connection keeps it", (
        step(SYN_80, "pass", "allow:0"),
        step(reverse(SYN_80), "pass", "established", switch_to=POLICY_DROP, lazy=True),
        step(reverse(SYN_80), "pass", "established", switch_to=POLICY),)),
    Case("audit", "audit mode passes every denial under its rule, and tracks its connection", (
        step(tcp(HR, IT, 22), "pass", "default"),
        step(reverse(tcp(HR, IT, 22)), "pass", "established"),
        step(tcp(HR, IT, 22, TCP_ACK), "pass", "established"),
        step(udp(HR, IT, 53), "pass", "default"),
        step(echo(IT, HR), "pass", "default"),
        step(tcp(LAB, LAB2, 22), "pass", "default"),
        step(SYN_80, "pass", "allow:0"),), policy=POLICY_AUDIT),
    Case("audit-to-enforce", "enforcing after audit cuts what audit let through, keeps what is allowed", (
        step(SYN_80, "pass", "allow:0"),
        step(tcp(HR, IT, 22), "pass", "default"),
        step(reverse(SYN_80, TCP_ACK), "pass", "established", switch_to=POLICY),
        step(tcp(HR, IT, 22, TCP_ACK), "tx", "default"),), policy=POLICY_AUDIT),
    Case("audit-to-enforce-lazily", "as audit-to-enforce, re-judged by the datapath", (
        step(tcp(HR, IT, 22), "pass", "default"),
        step(tcp(HR, IT, 22, TCP_ACK), "tx", "default", switch_to=POLICY, lazy=True),), policy=POLICY_AUDIT),
    Case("enforce-to-audit", "auditing after enforcing keeps connections", (
        step(SYN_80, "pass", "allow:0"),
        step(reverse(SYN_80, TCP_ACK), "pass", "established", switch_to=POLICY_AUDIT),
        step(tcp(HR, IT, 22), "pass", "default"),)),
)
