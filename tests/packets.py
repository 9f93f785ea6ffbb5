"""Raw Ethernet frames for the bpf tier: build them from evaluator Packets, read them back.

`build` turns a `Packet` into the bytes a wire would carry (IPv4 with options
and fragments, IPv6 with extension headers, TCP/UDP/ICMP/ICMPv6, ICMP errors
quoting a packet, VLAN tags, truncation). `parse` reads a frame by the
datapath's rules (bpf/parse.h) and says which `Packet` the reference evaluator
must be given for it; that is how a frame's expected verdict is known.
`parse_reply` reads a REJECT answer back for checking. Pure Python (struct).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import netaddr

from isoebpf.backends.ebpf.abi import IPV6_MAX_EXT_HEADERS, VLAN_MAX_TAGS
from isoebpf.ir.evaluate import ICMP_ERRORS, IPPROTO_ICMPV6, Packet
from isoebpf.ir.tables import PROTO_ICMP, PROTO_TCP, PROTO_UDP

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ETH_P_ARP = 0x0806
VLAN_TPIDS = (ETH_P_8021Q, ETH_P_8021AD)  # the ethertypes that announce a VLAN tag

IPPROTO_HOPOPTS = 0
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_DSTOPTS = 60
EXTENSION_HEADERS = (IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT)

CLIENT_MAC = bytes.fromhex("020000000001")
SERVER_MAC = bytes.fromhex("020000000002")
BROADCAST_MAC = b"\xff" * 6

QUOTED_TRANSPORT_BYTES = 8  # what a quote needs beyond the IP header to name a flow


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of data, as the 16-bit value to store."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header(src: netaddr.IPAddress, dst: netaddr.IPAddress, proto: int, length: int) -> bytes:
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!BBH", 0, proto, length)
    return src.packed + dst.packed + struct.pack("!I3xB", length, proto)


@dataclass(frozen=True)
class Wire:
    """What a frame carries beyond the `Packet` the classifier reads."""

    tags: Sequence[tuple[int, int]] = ()  # VLAN tags before the ethertype, outermost first: (TPID, TCI)
    src_mac: bytes = CLIENT_MAC
    dst_mac: bytes = SERVER_MAC
    ip_options: bytes = b""  # IPv4 options, padded to 4 bytes
    ext_headers: Sequence[int] = ()  # IPv6 extension headers before the transport (or fragment) header
    seq: int = 0
    ack: int = 0
    payload: bytes = b""
    quote: int | None = None  # bytes of the inner packet an ICMP error quotes (None: all of it)
    cut: int | None = None  # truncate the frame to this many bytes
    ttl: int = 64


PLAIN = Wire()  # a frame with nothing special about it


def transport(pkt: Packet, wire: Wire) -> bytes:
    """The transport header and payload (for a later fragment: only payload)."""
    if pkt.is_later_fragment:
        return wire.payload or bytes(8)
    if pkt.proto == PROTO_TCP:
        header = struct.pack("!HHIIBBHHH", pkt.sport, pkt.dport, wire.seq, wire.ack, 5 << 4,
                             pkt.tcp_flags, 65535, 0, 0)
        body = header + wire.payload
        csum = checksum(_pseudo_header(pkt.src, pkt.dst, PROTO_TCP, len(body)) + body)
        return body[:16] + struct.pack("!H", csum) + body[18:]
    if pkt.proto == PROTO_UDP:
        body = struct.pack("!HHHH", pkt.sport, pkt.dport, 8 + len(wire.payload), 0) + wire.payload
        csum = checksum(_pseudo_header(pkt.src, pkt.dst, PROTO_UDP, len(body)) + body) or 0xFFFF
        return body[:6] + struct.pack("!H", csum) + body[8:]
    if pkt.is_icmp:
        if pkt.inner is not None:
            quoted = ip_packet(pkt.inner, Wire(payload=wire.payload))
            rest = quoted[: wire.quote] if wire.quote is not None else quoted
            body = struct.pack("!BBHI", pkt.icmp_type, pkt.icmp_code, 0, 0) + rest
        else:
            body = struct.pack("!BBHHH", pkt.icmp_type, pkt.icmp_code, 0, pkt.icmp_id, 1) + wire.payload
        pseudo = _pseudo_header(pkt.src, pkt.dst, IPPROTO_ICMPV6, len(body)) if pkt.proto == IPPROTO_ICMPV6 else b""
        csum = checksum(pseudo + body)
        return body[:2] + struct.pack("!H", csum) + body[4:]
    return wire.payload or bytes(8)


def ip_packet(pkt: Packet, wire: Wire = PLAIN) -> bytes:
    """The IP packet (header, extension headers, transport) without a link header."""
    l4 = transport(pkt, wire)
    if pkt.src.version == 4:
        options = wire.ip_options + bytes(-len(wire.ip_options) % 4)
        ihl = 5 + len(options) // 4
        frag = (0x2000 if pkt.more_fragments else 0) | (pkt.frag_offset & 0x1FFF)
        header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(l4), pkt.frag_id & 0xFFFF,
                             frag, wire.ttl, pkt.proto, 0, pkt.src.packed, pkt.dst.packed) + options
        header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
        return header + l4
    chain: list[int] = list(wire.ext_headers)
    if pkt.is_fragment:
        chain.append(IPPROTO_FRAGMENT)
    extensions = b""
    for i, kind in enumerate(chain):
        following = chain[i + 1] if i + 1 < len(chain) else pkt.proto
        if kind == IPPROTO_FRAGMENT:
            field = (pkt.frag_offset << 3) | int(pkt.more_fragments)
            extensions += struct.pack("!BBHI", following, 0, field, pkt.frag_id)
        else:
            extensions += struct.pack("!BB6x", following, 0)
    first = chain[0] if chain else pkt.proto
    header = struct.pack("!IHBB16s16s", 6 << 28, len(extensions) + len(l4), first, wire.ttl,
                         pkt.src.packed, pkt.dst.packed)
    return header + extensions + l4


def _frame(ethertype: int, payload: bytes, wire: Wire) -> bytes:
    tags = b"".join(struct.pack("!HH", tpid, tci) for tpid, tci in wire.tags)
    frame = wire.dst_mac + wire.src_mac + tags + struct.pack("!H", ethertype) + payload
    return frame[: wire.cut] if wire.cut is not None else frame


def build(pkt: Packet, wire: Wire = PLAIN) -> bytes:
    """The Ethernet frame carrying pkt."""
    return _frame(ETH_P_IP if pkt.src.version == 4 else ETH_P_IPV6, ip_packet(pkt, wire), wire)


def build_other(ethertype: int, payload: bytes = bytes(46), wire: Wire = PLAIN) -> bytes:
    """A frame that is not IP (ARP and the like)."""
    return _frame(ethertype, payload, wire)


def vlan_tags(frame: bytes) -> tuple[tuple[int, int], ...]:
    """The (TPID, TCI) of every VLAN tag a frame leads with, however many, as far as it holds them."""
    tags, at = [], 12
    while len(frame) >= at + 6 and struct.unpack("!H", frame[at : at + 2])[0] in VLAN_TPIDS:
        tags.append(struct.unpack("!HH", frame[at : at + 4]))
        at += 4
    return tuple(tags)


# -- reading frames as the datapath does ----------------------------------------


@dataclass(frozen=True)
class Parsed:
    """A frame as bpf/parse.h reads it."""

    kind: str  # "not-ip" | "malformed" | "ip"
    packet: Packet | None = None
    link_multicast: bool = False
    l3_off: int = 0
    l4_off: int = 0
    ip_len: int = 0  # the datagram's length by its own header
    tcp_seq: int = 0
    tcp_ack: int = 0
    tcp_header_len: int = 0


def _address(data: bytes, version: int) -> netaddr.IPAddress:
    return netaddr.IPAddress(int.from_bytes(data, "big"), version)


def _quoted(data: bytes, version: int) -> Packet | None:
    """The packet an ICMP error quotes: an IP header and 8 transport bytes, else None."""
    if version == 4:
        if len(data) < 20 or data[0] >> 4 != 4 or data[0] & 0xF < 5:
            return None
        l4_at, proto = (data[0] & 0xF) * 4, data[9]
        src, dst = _address(data[12:16], 4), _address(data[16:20], 4)
    else:
        if len(data) < 40 or data[0] >> 4 != 6:
            return None
        l4_at, proto = 40, data[6]
        src, dst = _address(data[8:24], 6), _address(data[24:40], 6)
    l4 = data[l4_at : l4_at + QUOTED_TRANSPORT_BYTES]
    if len(l4) < QUOTED_TRANSPORT_BYTES:
        return None
    if proto in (PROTO_TCP, PROTO_UDP):
        sport, dport = struct.unpack("!HH", l4[:4])
        return Packet(src, dst, proto, sport=sport, dport=dport)
    if proto in (PROTO_ICMP, IPPROTO_ICMPV6):
        return Packet(src, dst, proto, icmp_type=l4[0], icmp_id=struct.unpack("!H", l4[4:6])[0])
    return Packet(src, dst, proto)


def parse(frame: bytes) -> Parsed:
    """A link header that cannot be read (cut short, more than VLAN_MAX_TAGS tags) is
    malformed; an ethertype other than IPv4/IPv6 after the tags is not IP."""
    if len(frame) < 14:
        return Parsed("malformed")
    multicast = bool(frame[0] & 1)
    ethertype, at = struct.unpack("!H", frame[12:14])[0], 14
    tags = 0
    while ethertype in VLAN_TPIDS:
        if tags == VLAN_MAX_TAGS or len(frame) < at + 4:
            return Parsed("malformed")
        ethertype, at, tags = struct.unpack("!H", frame[at + 2 : at + 4])[0], at + 4, tags + 1
    if ethertype not in (ETH_P_IP, ETH_P_IPV6):
        return Parsed("not-ip")
    l3 = at
    data = frame[l3:]
    later = first = False
    frag_id = frag_offset = 0
    if ethertype == ETH_P_IP:
        if len(data) < 20 or data[0] >> 4 != 4 or data[0] & 0xF < 5:
            return Parsed("malformed")
        header_len = (data[0] & 0xF) * 4
        total = struct.unpack("!H", data[2:4])[0]
        if len(data) < header_len or total < header_len:
            return Parsed("malformed")
        version, ip_len, proto = 4, total, data[9]
        src, dst = _address(data[12:16], 4), _address(data[16:20], 4)
        frag_id, frag = struct.unpack("!HH", data[4:8])
        frag_offset = frag & 0x1FFF
        later = frag_offset != 0
        first = not later and bool(frag & 0x2000)
        at = l3 + header_len
    else:
        if len(data) < 40 or data[0] >> 4 != 6:
            return Parsed("malformed")
        version, ip_len, proto = 6, 40 + struct.unpack("!H", data[4:6])[0], data[6]
        src, dst = _address(data[8:24], 6), _address(data[24:40], 6)
        at = l3 + 40
        walked = 0
        while proto in EXTENSION_HEADERS:
            # The datapath reads a fragment header whole, other headers' first 2 bytes.
            needed = 8 if proto == IPPROTO_FRAGMENT else 2
            if walked == IPV6_MAX_EXT_HEADERS or len(frame) < at + needed:
                return Parsed("malformed")
            walked += 1
            if proto == IPPROTO_FRAGMENT:
                proto, _, field, frag_id = struct.unpack("!BBHI", frame[at : at + 8])
                at += 8
                frag_offset = field >> 3
                if frag_offset:
                    later = True
                    break
                first = bool(field & 1)
            else:
                proto, length = frame[at], frame[at + 1]
                at += (length + 1) * 8
    more = first or (later and _more_fragments(frame, l3, version, at))
    fields: dict[str, Any] = {}
    seq = ack = tcp_header_len = 0
    l4 = frame[at:]
    if later:
        pass
    elif proto == PROTO_TCP:
        if len(l4) < 20:
            fields["truncated"] = True
        else:
            sport, dport, seq, ack, offset, flags = struct.unpack("!HHIIBB", l4[:14])
            fields.update(sport=sport, dport=dport, tcp_flags=flags)
            tcp_header_len = (offset >> 4) * 4
    elif proto == PROTO_UDP:
        if len(l4) < 8:
            fields["truncated"] = True
        else:
            fields["sport"], fields["dport"] = struct.unpack("!HH", l4[:4])
    elif proto in (PROTO_ICMP, IPPROTO_ICMPV6):
        if len(l4) < 8:
            fields["truncated"] = True
        else:
            kind, code, _, ident = struct.unpack("!BBHH", l4[:6])
            inner = _quoted(l4[8:], version) if kind in ICMP_ERRORS[proto] else None
            fields.update(icmp_type=kind, icmp_code=code, icmp_id=ident, inner=inner)
    # One Packet per frame, built once: this runs for every frame of the bpf tier.
    packet = Packet(src, dst, proto, frag_id=frag_id, frag_offset=frag_offset, more_fragments=more, **fields)
    return Parsed("ip", packet, multicast, l3, at, ip_len, seq, ack, tcp_header_len)


def _more_fragments(frame: bytes, l3: int, version: int, after_fragment_header: int) -> bool:
    """The M flag of a later fragment (it does not change its verdict; kept for equality)."""
    if version == 4:
        return bool(struct.unpack("!H", frame[l3 + 6 : l3 + 8])[0] & 0x2000)
    field = struct.unpack("!H", frame[after_fragment_header - 6 : after_fragment_header - 4])[0]
    return bool(field & 1)


# -- REJECT replies ---------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A REJECT answer, with every checksum verified."""

    src_mac: bytes
    dst_mac: bytes
    tags: tuple[tuple[int, int], ...]  # VLAN tags, outermost first: (TPID, TCI)
    src: netaddr.IPAddress
    dst: netaddr.IPAddress
    ttl: int
    proto: int
    ip_total: int  # the IP packet's length (header included)
    checksums_ok: bool
    tcp: tuple[int, int, int, int, int] | None = None  # sport, dport, seq, ack, flags
    icmp: tuple[int, int] | None = None  # type, code
    quote: bytes = b""
    notes: list[str] = field(default_factory=list)


def parse_reply(frame: bytes) -> Reply:
    dst_mac, src_mac = frame[:6], frame[6:12]
    tags = vlan_tags(frame)
    at = 14 + 4 * len(tags)
    ethertype = struct.unpack("!H", frame[at - 2 : at])[0]
    data = frame[at:]
    notes: list[str] = []
    if ethertype == ETH_P_IP:
        header_len = (data[0] & 0xF) * 4
        total, ttl, proto = struct.unpack("!H", data[2:4])[0], data[8], data[9]
        src, dst = _address(data[12:16], 4), _address(data[16:20], 4)
        ok = checksum(data[:header_len]) == 0
        if not ok:
            notes.append("IPv4 header checksum")
        body = data[header_len:total]
        pseudo = _pseudo_header(src, dst, proto, len(body))
    else:
        total = 40 + struct.unpack("!H", data[4:6])[0]
        proto, ttl = data[6], data[7]
        src, dst = _address(data[8:24], 6), _address(data[24:40], 6)
        ok = True
        body = data[40:total]
        pseudo = _pseudo_header(src, dst, proto, len(body))
    if len(data) != total:
        notes.append(f"frame carries {len(data)} IP bytes, header says {total}")
        ok = False
    reply = Reply(src_mac, dst_mac, tags, src, dst, ttl, proto, total, ok, notes=notes)
    if proto == PROTO_TCP:
        sport, dport, seq, ack, _, flags = struct.unpack("!HHIIBB", body[:14])
        good = checksum(pseudo + body) == 0
        if not good:
            notes.append("TCP checksum")
        return replace(reply, checksums_ok=ok and good, tcp=(sport, dport, seq, ack, flags))
    kind, code = body[0], body[1]
    good = checksum((pseudo if proto == IPPROTO_ICMPV6 else b"") + body) == 0
    if not good:
        notes.append("ICMP checksum")
    return replace(reply, checksums_ok=ok and good, icmp=(kind, code), quote=body[8:])
