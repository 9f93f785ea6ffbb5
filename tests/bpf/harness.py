"""Driving the compiled program through BPF_PROG_TEST_RUN, and what to expect of it.

One `Datapath` wraps one compiled program for a whole test session: policies
are swapped in by generation (the no-recompile update path), state is cleared
between scenarios, and every run reports the verdict and the frame the program
left (a REJECT reply). `expected` says, from a frame alone, what the reference
evaluator requires of it. Benchmarks import both.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from isoebpf.backends.ebpf import abi, bpfsys, entries, program
from isoebpf.ir.evaluate import IPPROTO_ICMPV6, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Classifier, Conntrack
from isoebpf.ir.tables import IR, PROTO_ICMP, PROTO_TCP, RULE_MALFORMED, RULE_UNFILTERED
from tests.packets import Parsed, parse, parse_reply, vlan_tags

XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3
TC_ACT_UNSPEC, TC_ACT_SHOT, TC_ACT_REDIRECT = 0xFFFFFFFF, 2, 7
VERDICTS = {
    "xdp": {XDP_PASS: "pass", XDP_DROP: "drop", XDP_TX: "tx"},
    "tc": {TC_ACT_UNSPEC: "pass", TC_ACT_SHOT: "drop", TC_ACT_REDIRECT: "tx"},
}
PROGRAMS = ("xdp", "tc")
ICMPV4_ERRORS = {3, 4, 5, 11, 12}  # RFC 1122 3.2.2: never answered with an error


def slot_contents(maps: program.Maps, slot: int) -> set[tuple[str, bytes, bytes]]:
    """What the kernel holds in one slot of the policy maps."""
    found = set()
    for name, (key_type, _) in entries.POLICY_MAPS.items():
        info = bpfsys.map_info(maps[name])
        for raw in bpfsys.map_keys(maps[name], info.key_size):
            if key_type.from_buffer_copy(raw).slot == slot:
                found.add((name, raw, bpfsys.map_lookup(maps[name], raw, info.value_size) or b""))
    return found


def policy_entries(ir: IR, slot: int) -> Iterator[tuple[str, bytes, bytes]]:
    """(map, key, value), packed, for every policy table entry of `ir` in slot `slot`."""
    for name, table in entries.tables_of(ir).items():
        pack_key, pack_value = entries.key_packer(name, slot), entries.value_packer(name)
        for key, value in table.items():
            yield name, pack_key(key), pack_value(*value)


def slot_wanted(ir: IR, slot: int) -> set[tuple[str, bytes, bytes]]:
    """What one slot of the policy maps holds with `ir` written into it."""
    return set(policy_entries(ir, slot))



@dataclass(frozen=True)
class Run:
    verdict: str  # "pass" | "drop" | "tx"
    frame: bytes  # as the program left it: the reply when verdict is "tx"


@dataclass(frozen=True)
class Expectation:
    verdict: str
    rule: int
    action: str  # the evaluator's action: "allow" | "drop" | "reject"


class Datapath:
    """One compiled program, reused across policies by writing new generations."""

    def __init__(self, compiled: program.CompiledProgram) -> None:
        self.compiled = compiled
        self.maps = compiled.map_fds
        self.gen = program.active_generation(self.maps)
        # What each slot holds, so that every policy switch writes only the
        # difference, as the backend's updates do (fresh maps hold nothing).
        self.held: dict[int, entries.Tables] = {0: {}, 1: {}} if self.gen == 0 else {}

    def load(self, ir: IR, *, sweep: bool = True, fresh: Iterable[int] | None = None) -> None:
        """Replace the policy as the backend does. `sweep=False` flips the config
        word only, leaving revocation to the datapath's lazy re-judging. `fresh`:
        the rule ids whose counters start at 0 (None: all of `ir`'s)."""
        new = self.gen + 1
        slot = program.slot_of(new)
        beside = self.held.get(1 - slot)
        self.held[slot] = program.write_generation(
            self.maps, ir, new, self.held.get(slot),
            entries.entry_counts(beside) if beside is not None else None, fresh)
        if sweep:
            program.activate(self.maps, ir, new)
        else:
            bpfsys.map_update(self.maps["config"], ctypes.c_uint32(0), ctypes.c_uint32(new))
        self.gen = new

    def clear_state(self) -> None:
        program.clear(self.maps, "conntrack")
        program.clear(self.maps, "fragments")

    @staticmethod
    def runs(prog: str, frame: bytes) -> bool:
        """Whether BPF_PROG_TEST_RUN takes the frame: never under 14 bytes, and for
        TC (the kernel checks this since 6.x) not when an IPv4/IPv6 ethertype is
        followed by less than a base IP header."""
        if len(frame) < 14:
            return False
        if prog == "tc":
            minimum = {b"\x08\x00": 14 + 20, b"\x86\xdd": 14 + 40}.get(frame[12:14], 14)
            return len(frame) >= minimum
        return True

    def run(self, prog: str, frame: bytes) -> Run:
        result = bpfsys.prog_test_run(self.compiled.prog_fds[prog], frame)
        verdict = VERDICTS[prog].get(result.retval, f"retval {result.retval:#x}")
        return Run(verdict, result.data)

    def counter(self, rule: int) -> tuple[int, int]:
        return program.read_counter(self.maps, rule)


def answerable(parsed: Parsed) -> bool:
    """Whether the datapath answers a REJECT (bpf/reject.h reply_allowed)."""
    pkt = parsed.packet
    assert pkt is not None
    def group(addr_first_byte: int) -> bool:
        return addr_first_byte >= 224 if pkt.src.version == 4 else addr_first_byte == 0xFF
    if parsed.link_multicast or group(pkt.src.packed[0]) or group(pkt.dst.packed[0]):
        return False
    if pkt.proto == PROTO_TCP:
        return not pkt.tcp_flags & TCP_RST
    if pkt.proto == PROTO_ICMP:
        return pkt.icmp_type not in ICMPV4_ERRORS
    if pkt.proto == IPPROTO_ICMPV6:
        return pkt.icmp_type >= 128
    return True


def expected(frame: bytes, *, conntrack: Conntrack | None = None, classifier: Classifier | None = None,
             now: float = 0.0) -> tuple[Parsed, Expectation]:
    """What the evaluator requires for `frame`, applying the packet's effects to `conntrack`."""
    parsed = parse(frame)
    if parsed.kind == "not-ip":
        return parsed, Expectation("pass", RULE_UNFILTERED, "allow")
    if parsed.kind == "malformed":
        return parsed, Expectation("drop", RULE_MALFORMED, "drop")
    assert parsed.packet is not None and conntrack is not None and classifier is not None
    decision = conntrack.step(classifier, parsed.packet, now)
    if decision.action == "allow" or decision.audit:
        verdict = "pass"
    elif decision.action == "reject" and answerable(parsed):
        verdict = "tx"
    else:
        verdict = "drop"
    return parsed, Expectation(verdict, decision.rule, decision.action)


def reply_problems(sent: Parsed, frame_in: bytes, reply_frame: bytes) -> list[str]:
    """What is wrong with a REJECT reply to `frame_in` (empty: nothing)."""
    pkt = sent.packet
    assert pkt is not None
    reply = parse_reply(reply_frame)
    problems = list(reply.notes)
    if (reply.src_mac, reply.dst_mac) != (frame_in[:6], frame_in[6:12]):
        problems.append("MAC addresses not swapped")
    if reply.tags != vlan_tags(frame_in):
        problems.append(f"VLAN tags {reply.tags} are not the request's {vlan_tags(frame_in)}")
    if (reply.src, reply.dst) != (pkt.dst, pkt.src):
        problems.append(f"addressed {reply.src} -> {reply.dst}")
    if reply.ttl != abi.REPLY_HOP_LIMIT:
        problems.append(f"TTL {reply.ttl}")
    if pkt.proto == PROTO_TCP:
        if reply.tcp is None:
            return [*problems, "not a TCP reset"]
        sport, dport, seq, ack, flags = reply.tcp
        if (sport, dport) != (pkt.dport, pkt.sport):
            problems.append(f"ports {sport}->{dport}")
        if pkt.tcp_flags & TCP_ACK:
            want = (sent.tcp_ack, 0, TCP_RST)
        else:
            payload = max(0, sent.ip_len - (sent.l4_off - sent.l3_off) - sent.tcp_header_len)
            occupied = payload + bool(pkt.tcp_flags & TCP_SYN) + bool(pkt.tcp_flags & TCP_FIN)
            want = (0, (sent.tcp_seq + occupied) % 2**32, TCP_RST | TCP_ACK)
        if (seq, ack if flags & TCP_ACK else 0, flags) != want:
            problems.append(f"seq/ack/flags {seq}/{ack}/{flags:#x}, want {want}")
        return problems
    want_icmp = (3, 13) if pkt.src.version == 4 else (1, 1)
    if reply.icmp != want_icmp:
        problems.append(f"ICMP type/code {reply.icmp}")
    limit = abi.REPLY_MAX_IPV4 if pkt.src.version == 4 else abi.REPLY_MAX_IPV6
    original = frame_in[sent.l3_off:][: sent.ip_len]
    fits = limit - (20 if pkt.src.version == 4 else 40) - 8
    if reply.quote != original[:fits]:
        problems.append(f"the quote ({len(reply.quote)} bytes) is not the first "
                        f"{min(fits, len(original))} bytes of the offending packet")
    if reply.ip_total > limit:
        problems.append(f"reply of {reply.ip_total} bytes exceeds {limit}")
    return problems


def by_address(entries: set[tuple[str, bytes, bytes]]) -> frozenset[tuple[object, ...]]:
    """A slot's entries with the numbering taken out: classes by their prefix and overlay
    kept apart only as the same or another, pairs by their classes' prefixes. Two slots
    alike here hold the same policy whatever ids it was compiled under (an update keeps
    the ids in force; a fresh compile numbers in file order); rule ids are left out."""
    prefixes: dict[int, tuple[int, bytes]] = {}
    found: set[tuple[object, ...]] = set()
    decoded = [(name, entries_key(name, key), value) for name, key, value in entries]
    for name, key, value in decoded:
        if name.startswith("classes_"):
            class_id = int.from_bytes(value[:4], sys.byteorder)
            prefixes[class_id] = (key.prefixlen, bytes(key.addr))
            found.add((name, key.prefixlen, bytes(key.addr)))
    for name, key, _ in decoded:
        if name == "exceptions":
            found.add((name, prefixes[key.src_class], prefixes[key.dst_class]))
        elif name == "allowed":
            found.add((name, prefixes[key.src_class], prefixes[key.dst_class], key.proto,
                       bytes(key.port), key.prefixlen))
        elif name == "hairpins":
            found.add((name, len([k for n, k, _ in decoded if n == "hairpins"])))
    return frozenset(found)


def entries_key(name: str, key: bytes) -> Any:
    key_type, _ = entries.POLICY_MAPS[name]
    return key_type.from_buffer_copy(key)
