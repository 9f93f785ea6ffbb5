"""tests/packets.py reads back what it builds, as the datapath would read it."""

from __future__ import annotations

from dataclasses import replace

import netaddr
import pytest

from isoebpf.ir.evaluate import IPPROTO_ICMPV6, TCP_ACK, TCP_SYN, Packet
from isoebpf.ir.tables import PROTO_ICMP, PROTO_TCP, PROTO_UDP
from tests.packets import (
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_ARP,
    IPPROTO_DSTOPTS,
    IPPROTO_HOPOPTS,
    Wire,
    build,
    build_other,
    checksum,
    ip_packet,
    parse,
)

pytestmark = pytest.mark.unit

A4, B4 = netaddr.IPAddress("10.0.0.1"), netaddr.IPAddress("10.0.0.2")
A6, B6 = netaddr.IPAddress("fd00::1"), netaddr.IPAddress("fd00::2")
SYN = Packet(A4, B4, PROTO_TCP, sport=1234, dport=80, tcp_flags=TCP_SYN, frag_id=9)

ROUND_TRIPS = [
    SYN,
    Packet(A4, B4, PROTO_UDP, sport=53, dport=5353, frag_id=1),
    Packet(A4, B4, PROTO_ICMP, icmp_type=8, icmp_id=77),
    Packet(A4, B4, PROTO_ICMP, icmp_type=3, icmp_code=13,
           inner=Packet(B4, A4, PROTO_TCP, sport=80, dport=1234)),
    Packet(A4, B4, 47, frag_id=5),
    Packet(A4, B4, PROTO_UDP, sport=1, dport=2, frag_id=700, more_fragments=True),
    Packet(A4, B4, PROTO_UDP, frag_id=700, frag_offset=100),
    Packet(A6, B6, PROTO_TCP, sport=1, dport=443, tcp_flags=TCP_ACK),
    Packet(A6, B6, IPPROTO_ICMPV6, icmp_type=128, icmp_id=3),
    Packet(A6, B6, IPPROTO_ICMPV6, icmp_type=2, inner=Packet(B6, A6, PROTO_UDP, sport=9, dport=10)),
    Packet(A6, B6, PROTO_TCP, sport=1, dport=2, frag_id=70000, more_fragments=True),
    Packet(A6, B6, PROTO_TCP, frag_id=70000, frag_offset=9, more_fragments=True),
]


@pytest.mark.parametrize("pkt", ROUND_TRIPS, ids=range(len(ROUND_TRIPS)))
@pytest.mark.parametrize("wire", [Wire(), Wire(tags=((ETH_P_8021AD, 7), (ETH_P_8021Q, 8)), ip_options=b"\x01" * 4,
                                               ext_headers=(IPPROTO_HOPOPTS, IPPROTO_DSTOPTS))])
def test_round_trip(pkt: Packet, wire: Wire) -> None:
    parsed = parse(build(pkt, wire))
    assert parsed.kind == "ip"
    assert parsed.packet == pkt
    assert parsed.l3_off == 14 + 4 * len(wire.tags)


def test_checksums_are_right() -> None:
    datagram = ip_packet(SYN, Wire(payload=b"abc"))
    assert checksum(datagram[:20]) == 0
    pseudo = A4.packed + B4.packed + bytes([0, PROTO_TCP]) + (len(datagram) - 20).to_bytes(2, "big")
    assert checksum(pseudo + datagram[20:]) == 0


def test_cut_frames() -> None:
    frame = build(SYN)
    assert parse(frame[:13]).kind == "malformed"
    assert parse(frame[:14 + 19]).kind == "malformed"
    cut = parse(frame[:14 + 20 + 19]).packet
    assert cut == replace(SYN, sport=0, dport=0, tcp_flags=0, truncated=True)
    assert parse(frame[:14] + b"\x4f" + frame[15:]).kind == "malformed"  # IHL 60 > 40 bytes there


def test_vlan_tags() -> None:
    """Two tags of either kind are read; a third, or a tag cut short, is malformed."""
    for outer in (ETH_P_8021AD, ETH_P_8021Q):
        for inner in (ETH_P_8021AD, ETH_P_8021Q):
            parsed = parse(build(SYN, Wire(tags=((outer, 1), (inner, 2)))))
            assert (parsed.kind, parsed.packet, parsed.l3_off) == ("ip", SYN, 22)
    assert parse(build(SYN, Wire(tags=((ETH_P_8021Q, 1),) * 3))).kind == "malformed"
    assert parse(build_other(ETH_P_ARP, wire=Wire(tags=((ETH_P_8021Q, 1),) * 3))).kind == "malformed"
    for cut in (14, 15, 17, 19, 21):
        assert parse(build(SYN, Wire(tags=((ETH_P_8021AD, 1), (ETH_P_8021Q, 2)), cut=cut))).kind == "malformed"
    assert parse(build_other(ETH_P_ARP, wire=Wire(tags=((ETH_P_8021AD, 1), (ETH_P_8021Q, 2))))).kind == "not-ip"


def test_too_many_extension_headers() -> None:
    pkt = Packet(A6, B6, PROTO_UDP, sport=1, dport=2)
    assert parse(build(pkt, Wire(ext_headers=(IPPROTO_DSTOPTS,) * 8))).kind == "ip"
    assert parse(build(pkt, Wire(ext_headers=(IPPROTO_DSTOPTS,) * 9))).kind == "malformed"


def test_short_quote_names_no_packet() -> None:
    error = Packet(A4, B4, PROTO_ICMP, icmp_type=3, inner=Packet(B4, A4, PROTO_UDP, sport=1, dport=2))
    assert parse(build(error, Wire(quote=27))).packet == replace(error, inner=None)
    assert parse(build(error, Wire(quote=28))).packet == error
