"""Hostile frames: random, truncated and malformed traffic about a policy's addresses.

`HostileEpisode` extends the differential test's traffic (connections,
replies, ICMP errors, fragments) with frames an attacker or a broken stack
sends: random bytes behind an IP ethertype, frames cut at every header
boundary, bad IHL and total lengths, IPv4 options of every kind (valid,
zero-length, overlong), IPv6 extension-header chains (long, repeated,
unknown, cut), overlapping and tiny fragments (a first fragment too short for
its ports, a second "first" fragment under the same id), forged ICMP errors
(quoting a denied flow, someone else's connection, a quote cut short or
nested), VLAN and QinQ tags (and tags the parser cannot read: a third, one
cut short), bit flips anywhere. Every frame is derived from
the episode's random generator, so a seed reproduces a run.
"""

from __future__ import annotations

import random
import struct
from dataclasses import replace

from isoebpf.ir.evaluate import ICMP_ERRORS, IPPROTO_ICMPV6, TCP_ACK, TCP_SYN, Packet
from isoebpf.ir.tables import PROTO_ICMP, PROTO_TCP, PROTO_UDP
from tests.bpf.test_differential import Episode
from tests.packets import (
    ETH_P_8021Q,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    EXTENSION_HEADERS,
    IPPROTO_FRAGMENT,
    VLAN_TPIDS,
    Wire,
    build,
    transport,
    vlan_tags,
)
from tests.policygen import GeneratedPolicy, random_first_packet

# Next-header values no parser here knows: mobility, HIP, shim6, experimental, no-next-header.
UNKNOWN_NEXT_HEADERS = (135, 139, 140, 253, 254, 59)
# IPv4 options as (type, length or None for single-byte ones): EOL, NOP, RR, TS, LSRR, SSRR, RA.
IPV4_OPTIONS = ((0, None), (1, None), (7, 7), (68, 12), (131, 11), (137, 7), (148, 4))

# What each hostile frame is, by weight; "normal" keeps state (connections, fragments) coming.
HOSTILE_KINDS = {
    "normal": 24, "random-bytes": 6, "cut": 12, "bad-ihl": 5, "ip-options": 6, "ext-chain": 8,
    "overlap-fragment": 6, "tiny-fragment": 5, "forged-icmp": 12, "vlan": 4, "vlan-unreadable": 3,
    "bit-flip": 10, "ethertype-mismatch": 2,
}


REPLAYED = 512  # frames an episode keeps to send again, as they were or damaged


class HostileEpisode(Episode):
    def __init__(self, rng: random.Random, generated: GeneratedPolicy) -> None:
        super().__init__(rng, generated)
        self.sent: list[tuple[str, bytes]] = []

    def hostile_frame(self, replay_share: float = 0.0) -> tuple[str, bytes]:
        """A new frame or, with probability `replay_share`, one sent before, again
        or cut or with a byte changed: replays are cheap to make, and the state
        they meet has moved on (a repeated first packet is now established)."""
        rng = self.rng
        if self.sent and rng.random() < replay_share:
            kind, frame = self.sent[rng.getrandbits(9) % len(self.sent)]
            how = rng.getrandbits(2)
            if how == 1 and len(frame) > 15:
                frame = frame[: 14 + rng.getrandbits(10) % (len(frame) - 14)]
            elif how >= 2:
                at = 14 + rng.getrandbits(10) % (len(frame) - 14) if len(frame) > 14 else 12
                frame = frame[:at] + bytes([rng.getrandbits(8)]) + frame[at + 1 :]
            return kind, frame
        kind = rng.choices(list(HOSTILE_KINDS), weights=list(HOSTILE_KINDS.values()))[0]
        if kind == "normal":
            kind, frame = self.frame()
        else:
            frame = getattr(self, kind.replace("-", "_"))()
        if len(self.sent) < REPLAYED:
            self.sent.append((kind, frame))
        else:
            self.sent[rng.getrandbits(9)] = (kind, frame)
        return kind, frame

    def some_frame(self) -> bytes:
        """A well-formed frame about the episode's flows, to damage."""
        pkt = self.known() if self.rng.random() < 0.6 else random_first_packet(self.rng, self.generated)
        return build(pkt, self.wire(pkt))

    def random_bytes(self) -> bytes:
        rng = self.rng
        ethertype = rng.choice([ETH_P_IP, ETH_P_IPV6, ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q])
        body = bytearray(rng.randbytes(rng.choice([0, 1, 8, 19, 20, 39, 40, 60, 90, 200])))
        if body and rng.random() < 0.7:  # a plausible version nibble gets further into the parser
            body[0] = (4 if ethertype == ETH_P_IP else 6) << 4 | (body[0] & 0xF)
        if len(body) >= 40 and rng.random() < 0.5:  # and addresses in the policy reach the classifier
            pkt = self.known()
            if pkt.src.version == 4 and ethertype == ETH_P_IP:
                body[12:20] = pkt.src.packed + pkt.dst.packed
            elif pkt.src.version == 6 and ethertype == ETH_P_IPV6 and len(body) >= 40:
                body[8:40] = pkt.src.packed + pkt.dst.packed
        return bytes(rng.randbytes(12)) + struct.pack("!H", ethertype) + bytes(body)

    def cut(self) -> bytes:
        """A frame cut at a header boundary, or one byte either side of it."""
        rng = self.rng
        frame = self.some_frame()
        l3 = _l3(frame)
        boundaries = [l3 - 4, l3, l3 + 1, l3 + 19, l3 + 20, l3 + 39, l3 + 40]
        l4 = l3 + (frame[l3] & 15) * 4 if frame[l3] >> 4 == 4 else l3 + 40
        boundaries += [l4 + n for n in (0, 1, 2, 4, 7, 8, 9, 13, 14, 19, 20, 28, 36, 48)]
        at = rng.choice(boundaries) + rng.choice([-1, 0, 0, 1])
        return frame[: max(14, min(at, len(frame) - 1))]

    def bad_ihl(self) -> bytes:
        rng = self.rng
        pkt = self.known() if rng.random() < 0.5 else random_first_packet(rng, self.generated, version=4)
        if pkt.src.version == 6:
            pkt = random_first_packet(rng, self.generated, version=4)
        frame = bytearray(build(pkt, self.wire(pkt)))
        l3 = _l3(frame)
        damage = rng.choice(["short", "beyond", "total-short", "total-long"])
        if damage == "short":
            frame[l3] = 0x40 | rng.randrange(5)
        elif damage == "beyond":  # claims more header than the frame holds
            frame[l3] = 0x40 | 15
            del frame[l3 + rng.randint(20, 59):]
        elif damage == "total-short":
            frame[l3 + 2 : l3 + 4] = rng.randrange(20).to_bytes(2, "big")
        else:
            frame[l3 + 2 : l3 + 4] = rng.randint(len(frame), 65535).to_bytes(2, "big")
        return bytes(frame)

    def ip_options(self) -> bytes:
        rng = self.rng
        pkt = random_first_packet(rng, self.generated, version=4) if rng.random() < 0.7 else self.known()
        options = b""
        while len(options) < 40 and rng.random() < 0.8:
            kind, length = rng.choice(IPV4_OPTIONS)
            if length is None:
                options += bytes([kind])
            else:  # sometimes a lying length: 0, 1, or past the header
                said = rng.choice([length, length, 0, 1, 255])
                options += bytes([kind, said]) + rng.randbytes(length - 2)
        options = options[:40]
        return build(pkt, replace(self.wire(pkt), ip_options=options))

    def ext_chain(self) -> bytes:
        """IPv6 extension headers: long chains, repeats, unknown types, cuts, odd lengths."""
        rng = self.rng
        pkt = random_first_packet(rng, self.generated, version=6) if rng.random() < 0.7 else self.known()
        if pkt.src.version == 4:
            pkt = random_first_packet(rng, self.generated, version=6)
        count = rng.choice([1, 2, 7, 8, 9, 12])
        same = rng.choice(EXTENSION_HEADERS[:3])
        chain = [same if rng.random() < 0.4 else rng.choice(EXTENSION_HEADERS) for _ in range(count)]
        last = rng.choice([pkt.proto] * 4 + list(UNKNOWN_NEXT_HEADERS))
        l4 = transport(pkt, Wire(payload=self.rng.randbytes(rng.choice([0, 8, 40]))))
        ext = b""
        for i, kind in enumerate(chain):
            following = chain[i + 1] if i + 1 < len(chain) else last
            if kind == IPPROTO_FRAGMENT:
                offset = rng.choice([0, 0, 1, 100])
                ext += struct.pack("!BBHI", following, 0, offset << 3 | rng.randrange(2), rng.randrange(1, 6))
            else:
                units = rng.choice([0, 0, 1, 3])
                ext += struct.pack("!BB", following, units) + rng.randbytes(6 + 8 * units)
        payload = ext + l4
        header = struct.pack("!IHBB16s16s", 6 << 28, len(payload), chain[0], 64, pkt.src.packed, pkt.dst.packed)
        frame = bytes(12) + struct.pack("!H", ETH_P_IPV6) + header + payload
        if rng.random() < 0.2:
            frame = frame[: rng.randint(54, len(frame))]
        return frame

    def overlap_fragment(self) -> bytes:
        """A second first fragment under a used id (other ports), or later fragments overlapping."""
        rng = self.rng
        if self.fragments and rng.random() < 0.5:
            first = rng.choice(self.fragments)
            other = random_first_packet(rng, self.generated, version=first.src.version)
            pkt = replace(other, src=first.src, dst=first.dst, proto=first.proto, frag_id=first.frag_id,
                          more_fragments=True)
            self.fragments.append(pkt)
            return build(pkt, self.wire(pkt))
        first = rng.choice(self.fragments) if self.fragments else self.known()
        pkt = Packet(first.src, first.dst, first.proto, frag_id=first.frag_id or rng.randrange(1, 6),
                     frag_offset=rng.choice([1, 2, 3, 8191]), more_fragments=rng.random() < 0.5)
        return build(pkt, replace(self.wire(pkt), ext_headers=(), payload=rng.randbytes(rng.choice([1, 8, 24]))))

    def tiny_fragment(self) -> bytes:
        """A first fragment too short to hold its ports (the classic evasion), or its 8-byte sequel."""
        rng = self.rng
        pkt = random_first_packet(rng, self.generated)
        if pkt.proto not in (PROTO_TCP, PROTO_UDP) and rng.random() < 0.7:
            pkt = replace(pkt, proto=PROTO_TCP, sport=rng.randrange(1, 65536), dport=rng.randrange(1, 65536),
                          tcp_flags=TCP_SYN, icmp_type=0, icmp_id=0)
        pkt = replace(pkt, frag_id=rng.randrange(1, 6), more_fragments=True)
        if rng.random() < 0.3:
            # The sequel at offset 8 bytes carries the transport header the first one lacked.
            later = Packet(pkt.src, pkt.dst, pkt.proto, frag_id=pkt.frag_id, frag_offset=1)
            return build(later, replace(self.wire(later), ext_headers=(),
                                        payload=struct.pack("!HH", 1, pkt.dport) + bytes(16)))
        self.fragments.append(pkt)
        frame = build(pkt, replace(self.wire(pkt), ext_headers=()))
        l3 = _l3(frame)
        header = (frame[l3] & 0xF) * 4 if pkt.src.version == 4 else 48
        return frame[: l3 + header + rng.choice([0, 1, 4, 7, 8, 12, 16, 19])]

    def forged_icmp(self) -> bytes:
        """An ICMP error nobody asked for: about a denied or untracked flow, from a
        stranger, quoting a tracked flow backwards or sideways, cut short, nested."""
        rng = self.rng
        version = rng.choice([4, 6])
        proto = PROTO_ICMP if version == 4 else IPPROTO_ICMPV6
        about = random_first_packet(rng, self.generated, version=version)
        if self.flows and rng.random() < 0.5:
            about = rng.choice(self.flows)
            version = about.src.version
            proto = PROTO_ICMP if version == 4 else IPPROTO_ICMPV6
        src = rng.choice([about.dst, about.src, self.address(version)])
        dst = rng.choice([about.src, about.dst, self.address(version)])
        inner = replace(about, tcp_flags=0, frag_id=0, more_fragments=False)
        if rng.random() < 0.15:  # an error quoting an error
            inner = Packet(inner.dst, inner.src, proto, icmp_type=rng.choice(sorted(ICMP_ERRORS[proto])),
                           inner=inner)
        kind = rng.choice([*sorted(ICMP_ERRORS[proto]), rng.randrange(256)])
        pkt = Packet(src, dst, proto, icmp_type=kind, icmp_code=rng.randrange(16), inner=inner)
        quote = rng.choice([None, None, 0, 19, 20, 27, 28, 39, 40, 47, 48])
        wire = replace(self.wire(pkt), quote=quote)
        if rng.random() < 0.2:
            wire = replace(wire, payload=b"", ip_options=bytes([1] * 4) if version == 4 else b"")
        return build(pkt, wire)

    def vlan(self) -> bytes:
        """One or two tags of either kind (parsed: judged by what they carry), in front
        of an IP frame of the episode's or of ARP (not IP: unfiltered)."""
        rng = self.rng
        inner = self._untagged() if rng.random() < 0.85 else bytes(12) + struct.pack("!H", ETH_P_ARP) + bytes(28)
        return inner[:12] + self._tags(rng.choice([1, 2, 2])) + inner[12:]

    def vlan_unreadable(self) -> bytes:
        """Tags the parser cannot read, in front of anything: a third tag (or more), or a
        tag cut short, after none, one or two whole ones. Dropped as malformed."""
        rng = self.rng
        frame = self._untagged()
        if rng.random() < 0.5:
            return frame[:12] + self._tags(rng.choice([3, 3, 4, 8])) + frame[12:]
        whole = rng.randrange(3)
        return (frame[:12] + self._tags(whole) + struct.pack("!H", rng.choice(VLAN_TPIDS))
                + rng.randbytes(rng.randrange(3)))

    def _untagged(self) -> bytes:
        """A well-formed frame of the episode's flows, without the tags it may have had."""
        frame = self.some_frame()
        return frame[:12] + frame[_l3(frame) - 2 :]

    def _tags(self, count: int) -> bytes:
        rng = self.rng
        return b"".join(struct.pack("!HH", rng.choice(VLAN_TPIDS), rng.randrange(65536)) for _ in range(count))

    def bit_flip(self) -> bytes:
        rng = self.rng
        frame = bytearray(self.some_frame())
        for _ in range(rng.choice([1, 1, 2, 4, 8])):
            at = rng.randrange(12, len(frame))
            frame[at] ^= 1 << rng.randrange(8)
        if rng.random() < 0.3:
            at = rng.randrange(12, len(frame))
            frame[at] = rng.choice([0, 0xFF, 5, 6, 0x45, 0x60, TCP_ACK])
        return bytes(frame)

    def ethertype_mismatch(self) -> bytes:
        """An IPv6 header behind the IPv4 ethertype, or the other way round."""
        frame = self.some_frame()
        at = _l3(frame) - 2
        ethertype = ETH_P_IP if frame[at : at + 2] == struct.pack("!H", ETH_P_IPV6) else ETH_P_IPV6
        return frame[:at] + struct.pack("!H", ethertype) + frame[at + 2 :]


def _l3(frame: bytes) -> int:
    """Where a frame's IP header starts: after its VLAN tags."""
    return 14 + 4 * len(vlan_tags(frame))
