"""eBPF backend, pure half: the ctypes mirror of `bpf/abi.h`: map layouts, verdict codes and map names.

Field for field as the header declares them; tests/unit/test_abi.py parses the
header and checks every size, offset and constant here against it. Fields the
header calls `__be16`/`__be32` (and every field inside an LPM key's data) are
big-endian types here too, so Python code reads and writes plain numbers and
the byte order is stated once, in the type.

Read by `program` (keys and values), `capacity` (map sizes) and `backend` (events); imports only the IR's numbering.
"""

from __future__ import annotations

import ctypes
import struct

from ...ir.tables import (
    FIRST_POLICY_RULE,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    RULE_DEFAULT,
    RULE_ESTABLISHED,
    RULE_FRAGMENT,
    RULE_MALFORMED,
    RULE_UNFILTERED,
)

__all__ = [
    "FIRST_POLICY_RULE", "PROTO_ICMP", "PROTO_TCP", "PROTO_UDP", "RULE_DEFAULT",
    "RULE_ESTABLISHED", "RULE_FRAGMENT", "RULE_MALFORMED", "RULE_UNFILTERED",
]

# Counter slots per generation (the compile-time default; program.py reads the
# real one off the loaded map, since ISOEBPF_MAX_RULES can be overridden).
ISOEBPF_MAX_RULES = 4096

ACTION_ALLOW = 1
ACTION_DROP = 2
ACTION_REJECT = 3
ACTIONS = {"allow": ACTION_ALLOW, "drop": ACTION_DROP, "reject": ACTION_REJECT}
ACTION_NAMES = {code: name for name, code in ACTIONS.items()}

FAMILY_IPV4 = 4
FAMILY_IPV6 = 6

IPV6_MAX_EXT_HEADERS = 8
VLAN_MAX_TAGS = 2
REPLY_MAX_IPV4 = 576
REPLY_MAX_IPV6 = 1280
REPLY_HOP_LIMIT = 64

CLASS_FIXED_BITS = 32
ALLOW_FIXED_BITS = 96

FLOW_FIN_ORIG = 1
FLOW_FIN_REPLY = 2
FLOW_CLOSING = 4
FLOW_OPEN = 8

FLOW_BY_SRC = 0
FLOW_BY_DST = 1

# Every map the program declares (bpf/maps.h), in declaration order: what the
# backend pins and opens.
MAP_NAMES = (
    "config", "params", "classes_v4", "classes_v6", "exceptions", "hairpins", "allowed",
    "conntrack", "fragments", "counters", "events", "event_rate", "event_tokens", "forwarders",
    "packets", "route_lookup",
)

# The compile-time constant that sizes each map, for messages that say what to raise.
MAP_SIZE_MACROS = {
    "classes_v4": "ISOEBPF_MAX_CLASSES",
    "classes_v6": "ISOEBPF_MAX_CLASSES",
    "exceptions": "ISOEBPF_MAX_EXCEPTIONS",
    "hairpins": "ISOEBPF_MAX_HAIRPINS",
    "allowed": "ISOEBPF_MAX_ALLOWED",
    "conntrack": "ISOEBPF_MAX_CONNECTIONS",
    "fragments": "ISOEBPF_MAX_FRAGMENTS",
    "counters": "ISOEBPF_MAX_RULES",
}

_u8 = ctypes.c_uint8
_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64
_be16 = ctypes.c_uint16.__ctype_be__
_be32 = ctypes.c_uint32.__ctype_be__
_Addr4 = ctypes.c_uint8 * 4
_Addr16 = ctypes.c_uint8 * 16


class ClassV4Key(ctypes.Structure):
    _fields_ = [("prefixlen", _u32), ("slot", _be32), ("addr", _Addr4)]


class ClassV6Key(ctypes.Structure):
    _fields_ = [("prefixlen", _u32), ("slot", _be32), ("addr", _Addr16)]


class ClassValue(ctypes.Structure):
    _fields_ = [("class_id", _u32), ("overlay_id", _u32)]


class ExceptionKey(ctypes.Structure):
    _fields_ = [("slot", _u32), ("src_class", _u32), ("dst_class", _u32)]


class HairpinKey(ctypes.Structure):
    _fields_ = [("slot", _u32), ("overlay_id", _u32)]


class AllowKey(ctypes.Structure):
    _fields_ = [
        ("prefixlen", _u32), ("slot", _be32), ("src_class", _be32), ("dst_class", _be32),
        ("proto", _u8), ("port", _u8 * 2), ("pad", _u8),
    ]


class RuleValue(ctypes.Structure):
    _fields_ = [("rule", _u32)]


class FlowKey(ctypes.Structure):
    _fields_ = [
        ("family", _u8), ("proto", _u8), ("sport", _be16), ("dport", _be16), ("pad", _u16),
        ("src", _Addr16), ("dst", _Addr16),
    ]


class FlowState(ctypes.Structure):
    _fields_ = [("last_seen_ns", _u64), ("gen", _u32), ("flags", _u8), ("pad", _u8 * 3)]


class FlowEntry(ctypes.Structure):
    _fields_ = [("opened", FlowState * 2)]


class FragmentKey(ctypes.Structure):
    _fields_ = [
        ("family", _u8), ("proto", _u8), ("pad", _u16), ("id", _u32),
        ("src", _Addr16), ("dst", _Addr16),
    ]


class FragmentVerdict(ctypes.Structure):
    _fields_ = [("seen_ns", _u64), ("rule", _u32), ("action", _u8), ("pad", _u8 * 3)]


class Params(ctypes.Structure):
    _fields_ = [
        ("tcp_timeout_ns", _u64), ("tcp_closing_timeout_ns", _u64), ("udp_timeout_ns", _u64),
        ("icmp_timeout_ns", _u64), ("fragment_timeout_ns", _u64),
        ("default_action", _u32), ("accept_mark", _u32),
        ("audit", _u32), ("has_exceptions", _u32),
    ]


class Counter(ctypes.Structure):
    _fields_ = [("packets", _u64), ("bytes", _u64)]


class TokenBucket(ctypes.Structure):
    _fields_ = [("refilled_ns", _u64), ("nanotokens", _u64), ("suppressed", _u64), ("lost", _u64)]


class VerdictEvent(ctypes.Structure):
    _fields_ = [
        ("timestamp_ns", _u64), ("ifindex", _u32), ("rule", _u32),
        ("family", _u8), ("proto", _u8), ("action", _u8), ("audit", _u8),
        ("sport", _be16), ("dport", _be16), ("src", _Addr16), ("dst", _Addr16),
    ]


# Header struct name -> its mirror, for the drift test.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "class_v4_key": ClassV4Key,
    "class_v6_key": ClassV6Key,
    "class_value": ClassValue,
    "exception_key": ExceptionKey,
    "hairpin_key": HairpinKey,
    "allow_key": AllowKey,
    "rule_value": RuleValue,
    "flow_key": FlowKey,
    "flow_state": FlowState,
    "flow_entry": FlowEntry,
    "fragment_key": FragmentKey,
    "fragment_verdict": FragmentVerdict,
    "params": Params,
    "counter": Counter,
    "token_bucket": TokenBucket,
    "verdict_event": VerdictEvent,
}


# -- the same layouts for struct ---------------------------------------------------

# Integer width -> struct's letter; a byte array is an address or a port in network
# order, so it packs as big-endian integers (16 bytes: two halves).
_LETTERS = {1: "B", 2: "H", 4: "I", 8: "Q"}


def packing(layout: type[ctypes.Structure]) -> tuple[struct.Struct, tuple[str, ...]]:
    """`layout` as a struct.Struct that packs its fields in order, and the fields whose
    values the caller must byte-swap: built from the ctypes fields, so the two cannot
    differ (writing 100k entries one ctypes object each took seconds; struct takes ms).

    Big-endian ('>') when any field is, else native ('='). A native integer among
    big-endian fields (an LPM key's prefix length) is then packed swapped: its
    value must be swapped first, and it is named in the second element."""
    letters: list[str] = []
    big = False
    native: list[str] = []
    for name, kind, *_ in layout._fields_:
        size = ctypes.sizeof(kind)
        if name.startswith("pad"):
            letters.append("x" * size)
        elif issubclass(kind, ctypes.Array):
            big = True
            letters.append("QQ" if size == 16 else _LETTERS[size])
        elif size > 1 and getattr(kind, "__ctype_be__", None) is kind:
            big = True
            letters.append(_LETTERS[size])
        else:
            letters.append(_LETTERS[size])
            if size > 1:
                native.append(name)
    swapped = tuple(native) if big and struct.pack("=H", 1) != struct.pack(">H", 1) else ()
    return struct.Struct((">" if big else "=") + "".join(letters)), swapped
