"""The eBPF program: compile it with bcc, and read and write its maps.

Compiling happens once per load of the backend; everything after works on raw
map fds (`maps`: name -> fd), so a later process that opened the maps from
their pins can update the policy and read counters without bcc or a
recompile. Only this module (and its siblings) imports bcc.

Policy updates go by generation (bpf/maps.h explains why):
`write_generation(maps, ir, g + 1)`, `activate(maps, ir, g + 1)`,
`purge_generations(maps, keep=g + 1)`.
"""

from __future__ import annotations

import ctypes
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netaddr
from bcc import BPF

from .. import abi, capacity, evaluate
from ..errors import BackendError, ProgramRejected
from ..evaluate import Classifier
from ..ir import IR, PROTO_TCP, PROTO_UDP
from . import bpfsys

BPF_DIR = Path(__file__).resolve().parent.parent.parent / "bpf"
SOURCE = BPF_DIR / "isoebpf.c"
XDP_NAME = "xdp_isoebpf"
TC_NAME = "tc_isoebpf"
MAP_NAMES = abi.MAP_NAMES

# Map sizes a user may raise at compile time, from the environment of the
# command that compiles (`ISOEBPF_MAX_CONNECTIONS=1000000 isoebpf load ...`).
SIZE_MACROS = ("ISOEBPF_MAX_RULES", *sorted(set(abi.MAP_SIZE_MACROS.values()) - {"ISOEBPF_MAX_RULES"}))

_LOCAL_INCLUDE = re.compile(r'#include "([^"]+)"\s*$')

# The maps that hold policy tables, each keyed by generation.
_POLICY_MAPS: dict[str, type[ctypes.Structure]] = {
    "classes_v4": abi.ClassV4Key,
    "classes_v6": abi.ClassV6Key,
    "exceptions": abi.ExceptionKey,
    "hairpins": abi.HairpinKey,
    "allowed": abi.AllowKey,
}

Maps = Mapping[str, int]


def source() -> str:
    """isoebpf.c with its local headers inlined, each once.

    bcc rewrites map accesses only in the file it compiles, never in included
    headers; the #line markers keep compiler and verifier messages pointing at
    the real files and lines.
    """
    return _inline(SOURCE, set())


def _inline(path: Path, seen: set[Path]) -> str:
    lines = [f'#line 1 "{path}"']
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = _LOCAL_INCLUDE.match(line)
        if match is None:
            lines.append(line)
            continue
        header = (path.parent / match.group(1)).resolve()
        if header not in seen:
            seen.add(header)
            lines.append(_inline(header, seen))
        lines.append(f'#line {number + 1} "{path}"')
    return "\n".join(lines) + "\n"


def size_flags(sizes: Mapping[str, int] | None = None) -> list[str]:
    """-D flags for map sizes: explicit `sizes` first, then the environment."""
    chosen = capacity.environment_sizes()
    for macro, value in (sizes or {}).items():
        if macro not in SIZE_MACROS:
            raise BackendError(f"unknown map size {macro} (known: {', '.join(SIZE_MACROS)})")
        chosen[macro] = value
    return [f"-D{macro}={value}" for macro, value in sorted(chosen.items())]


@dataclass
class CompiledProgram:
    """The two programs and every map, alive as long as this object (or their pins)."""

    bpf: Any
    prog_fds: dict[str, int]  # "xdp", "tc"
    map_fds: dict[str, int]
    compile_seconds: float

    def close(self) -> None:
        """Release our fds; pinned programs and maps live on."""
        self.bpf.cleanup()


def compile_program(sizes: Mapping[str, int] | None = None) -> CompiledProgram:
    """Compile and load both programs and create the maps (takes a few seconds)."""
    cflags = ["-Wall", "-Werror", f"-I{BPF_DIR}", *size_flags(sizes)]
    started = time.monotonic()
    try:
        bpf = BPF(text=source().encode(), cflags=cflags)
    except Exception as err:  # bcc raises a bare Exception; clang's messages went to stderr
        raise BackendError(f"bcc could not compile {SOURCE} ({err}); the compiler's messages "
                           "are above. Are kernel headers installed (scripts/setup.sh)?") from err
    try:
        xdp = bpf.load_func(XDP_NAME.encode(), BPF.XDP)
        tc = bpf.load_func(TC_NAME.encode(), BPF.SCHED_CLS)
    except Exception as err:  # the verifier's log went to stderr
        bpf.cleanup()
        raise ProgramRejected(f"the kernel refused the program ({err}); the verifier's log is "
                              "above") from err
    elapsed = time.monotonic() - started
    map_fds = {name: int(bpf.get_table(name.encode()).map_fd) for name in MAP_NAMES}
    return CompiledProgram(bpf, {"xdp": int(xdp.fd), "tc": int(tc.fd)}, map_fds, elapsed)


def probe_compile() -> None:
    """Can bcc compile and the kernel load an XDP program here? Raise BackendError if not."""
    probe = b"int isoebpf_probe(struct xdp_md *ctx) { return XDP_PASS; }"
    try:
        bpf = BPF(text=probe, cflags=["-Wall", "-Werror"])
    except Exception as err:
        raise BackendError(f"bcc cannot compile a trivial program ({err}): are kernel headers "
                           "installed (scripts/setup.sh)?") from err
    try:
        bpf.load_func(b"isoebpf_probe", BPF.XDP)
    except Exception as err:
        raise BackendError(f"the kernel refused a trivial XDP program ({err}): run as root "
                           "(or with CAP_BPF and CAP_NET_ADMIN)") from err
    finally:
        bpf.cleanup()


# -- writing a policy ---------------------------------------------------------


def max_rules(maps: Maps) -> int:
    """Counter slots per generation, as the loaded program was compiled."""
    return bpfsys.map_info(maps["counters"]).max_entries // 2


def _seconds_to_ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def params_of(ir: IR) -> abi.Params:
    return abi.Params(
        tcp_timeout_ns=_seconds_to_ns(ir.timeouts["tcp"]),
        tcp_closing_timeout_ns=_seconds_to_ns(ir.timeouts["tcp_closing"]),
        udp_timeout_ns=_seconds_to_ns(ir.timeouts["udp"]),
        icmp_timeout_ns=_seconds_to_ns(ir.timeouts["icmp"]),
        # Read at call time, so tests can shorten it.
        fragment_timeout_ns=_seconds_to_ns(evaluate.FRAGMENT_TIMEOUT),
        default_action=abi.ACTIONS[ir.default_action],
    )


def policy_entries(ir: IR, gen: int) -> Iterator[tuple[str, ctypes.Structure, ctypes.Structure]]:
    """(map, key, value) for every policy table entry of `ir` as generation `gen`."""
    for c in ir.classes:
        value = abi.ClassValue(c.class_id, c.overlay_id)
        if c.network.version == 4:
            key4 = abi.ClassV4Key(abi.CLASS_FIXED_BITS + c.network.prefixlen, gen)
            key4.addr[:] = c.network.network.packed
            yield "classes_v4", key4, value
        else:
            key6 = abi.ClassV6Key(abi.CLASS_FIXED_BITS + c.network.prefixlen, gen)
            key6.addr[:] = c.network.network.packed
            yield "classes_v6", key6, value
    for e in ir.exceptions:
        yield "exceptions", abi.ExceptionKey(gen, e.src_class, e.dst_class), abi.RuleValue(e.rule)
    for o in ir.overlays:
        if o.hairpin_rule:
            yield "hairpins", abi.HairpinKey(gen, o.id), abi.RuleValue(o.hairpin_rule)
    for a in ir.allowed:
        key = abi.AllowKey(abi.ALLOW_FIXED_BITS + a.match_bits, gen, a.src_class, a.dst_class,
                           a.proto)
        key.port[:] = a.port.to_bytes(2, "big")
        yield "allowed", key, abi.RuleValue(a.rule)


def capacity_of(maps: Maps) -> tuple[dict[str, int], dict[str, int]]:
    """(room, taken) of a loaded program's policy maps, for capacity.check."""
    room, taken = {"counters": max_rules(maps)}, {}
    for name in _POLICY_MAPS:
        info = bpfsys.map_info(maps[name])
        room[name] = info.max_entries
        taken[name] = sum(1 for _ in bpfsys.map_keys(maps[name], info.key_size))
    return room, taken


def write_generation(maps: Maps, ir: IR, gen: int) -> None:
    """Write `ir` as generation `gen` beside the active one; packets do not see it
    yet. A policy that does not fit is refused before anything is written."""
    if not 1 <= gen < 2**32:
        raise BackendError(f"generation {gen} is out of range (1 to 2^32-1): unload and load again")
    capacity.check(ir, *capacity_of(maps))
    slots = max_rules(maps)
    highest = max(r.id for r in ir.rules)  # capacity.check made sure it has a counter
    slot = gen & 1
    bpfsys.map_update(maps["params"], ctypes.c_uint32(slot), params_of(ir))
    zero = bytes(ctypes.sizeof(abi.Counter) * bpfsys.possible_cpus())
    # Only the slots this policy's rules count in: the others are never read for it.
    used = highest + 1
    indexes = (ctypes.c_uint32 * used)(*range(slot * slots, slot * slots + used))
    bpfsys.map_update_packed(maps["counters"], bytes(indexes), zero * used, used)
    by_map: dict[str, list[tuple[bpfsys.Buffer, bpfsys.Buffer]]] = {}
    for name, key, value in policy_entries(ir, gen):
        by_map.setdefault(name, []).append((key, value))
    for name, entries in by_map.items():
        bpfsys.map_update_many(maps[name], entries)


def activate(maps: Maps, ir: IR, gen: int) -> None:
    """Make `gen` the policy every packet from now on is judged by, then cut the
    connections it forbids.

    The flip is one word, so each packet sees wholly one policy. The datapath
    re-judges a connection lazily when its next packet arrives; the sweep here
    cuts the others now, so that a connection this policy forbids stays cut
    even if the next policy would allow it again (as evaluate.Conntrack.revalidate).
    """
    bpfsys.map_update(maps["config"], ctypes.c_uint32(0), ctypes.c_uint32(gen))
    classifier: Classifier | None = None  # built only when there is a connection to judge
    allowed: dict[bytes, bool] = {}  # by what the verdict depends on: never the source port
    for raw in list(bpfsys.map_keys(maps["conntrack"], ctypes.sizeof(abi.FlowKey))):
        verdict_key = _verdict_key(raw)
        if verdict_key not in allowed:
            classifier = classifier or Classifier(ir)
            first = evaluate.first_packet(flow_of(abi.FlowKey.from_buffer_copy(raw)))
            allowed[verdict_key] = classifier.judge(first).action == "allow"
        if not allowed[verdict_key]:
            bpfsys.map_delete(maps["conntrack"], raw)


_SPORT = slice(abi.FlowKey.sport.offset, abi.FlowKey.sport.offset + abi.FlowKey.sport.size)
_PORTS = slice(abi.FlowKey.sport.offset, abi.FlowKey.dport.offset + abi.FlowKey.dport.size)
_PROTO = abi.FlowKey.proto.offset


def _verdict_key(raw: bytes) -> bytes:
    """A conntrack key without what a first packet's verdict never depends on: the
    source port, and both ports (the echo id) outside TCP and UDP."""
    cut = _SPORT if raw[_PROTO] in (PROTO_TCP, PROTO_UDP) else _PORTS
    return raw[:cut.start] + bytes(cut.stop - cut.start) + raw[cut.stop:]


def purge_generations(maps: Maps, keep: int) -> int:
    """Delete the policy entries of every generation but `keep`; returns how many went."""
    removed = 0
    for name, key_type in _POLICY_MAPS.items():
        fd = maps[name]
        stale = [raw for raw in bpfsys.map_keys(fd, ctypes.sizeof(key_type))
                 if key_type.from_buffer_copy(raw).gen != keep]
        removed += bpfsys.map_delete_many(fd, stale)
    return removed


def active_generation(maps: Maps) -> int:
    raw = bpfsys.map_lookup(maps["config"], ctypes.c_uint32(0), ctypes.sizeof(ctypes.c_uint32))
    return ctypes.c_uint32.from_buffer_copy(raw).value if raw else 0


def set_event_rate(maps: Maps, per_second: int) -> None:
    """Let each CPU send at most `per_second` verdict events a second (0: none)."""
    bpfsys.map_update(maps["event_rate"], ctypes.c_uint32(0), ctypes.c_uint32(per_second))


def suppressed_events(maps: Maps) -> int:
    """Verdicts the rate limit kept from being sent while tracing, summed over CPUs."""
    return sum(b.suppressed for b in _percpu(maps, "event_tokens", 0, abi.TokenBucket))


# -- reading state ------------------------------------------------------------


def address(family: int, raw: ctypes.Array[ctypes.c_uint8]) -> netaddr.IPAddress:
    """An address as keys and events hold it (IPv4 in the first 4 bytes)."""
    data = bytes(raw)
    if family == abi.FAMILY_IPV4:
        return netaddr.IPAddress(int.from_bytes(data[:4], "big"), 4)
    return netaddr.IPAddress(int.from_bytes(data, "big"), 6)


def flow_of(key: abi.FlowKey) -> evaluate.FlowKey:
    """A conntrack key as the evaluator writes flows: (proto, src, sport, dst, dport)."""
    return (key.proto, address(key.family, key.src), key.sport,
            address(key.family, key.dst), key.dport)


def _percpu(maps: Maps, name: str, index: int, value_type: type[ctypes.Structure]) -> list[Any]:
    size = ctypes.sizeof(value_type)
    stride = (size + 7) // 8 * 8  # the kernel rounds each CPU's value up to 8 bytes
    raw = bpfsys.map_lookup(maps[name], ctypes.c_uint32(index), stride * bpfsys.possible_cpus())
    if raw is None:
        return []
    return [value_type.from_buffer_copy(raw, cpu * stride) for cpu in range(len(raw) // stride)]


def read_counter(maps: Maps, gen: int, rule: int) -> tuple[int, int]:
    """(packets, bytes) of one rule in generation `gen`'s slot, summed over CPUs."""
    slots = max_rules(maps)
    if not 0 <= rule < slots:
        return 0, 0
    values = _percpu(maps, "counters", (gen & 1) * slots + rule, abi.Counter)
    return sum(v.packets for v in values), sum(v.bytes for v in values)


def read_counters(maps: Maps, gen: int) -> dict[int, tuple[int, int]]:
    """Rule id -> (packets, bytes) for every rule slot of generation `gen`."""
    slots = max_rules(maps)
    found: dict[int, tuple[int, int]] = {}
    for rule in range(slots):
        values = _percpu(maps, "counters", (gen & 1) * slots + rule, abi.Counter)
        found[rule] = (sum(v.packets for v in values), sum(v.bytes for v in values))
    return found


def connections(maps: Maps) -> Iterator[tuple[abi.FlowKey, abi.FlowState]]:
    """Every conntrack entry, expired ones included (the datapath ignores those)."""
    fd = maps["conntrack"]
    for raw in bpfsys.map_keys(fd, ctypes.sizeof(abi.FlowKey)):
        value = bpfsys.map_lookup(fd, raw, ctypes.sizeof(abi.FlowState))
        if value is not None:
            yield abi.FlowKey.from_buffer_copy(raw), abi.FlowState.from_buffer_copy(value)


def count_connections(maps: Maps) -> int:
    return sum(1 for _ in bpfsys.map_keys(maps["conntrack"], ctypes.sizeof(abi.FlowKey)))


def map_fill(maps: Maps) -> dict[str, dict[str, int]]:
    """Entries and capacity of every map that fills up (hash, LRU and LPM maps)."""
    fill: dict[str, dict[str, int]] = {}
    for name in abi.MAP_SIZE_MACROS:
        if name == "counters":
            continue
        info = bpfsys.map_info(maps[name])
        entries = sum(1 for _ in bpfsys.map_keys(maps[name], info.key_size))
        fill[name] = {"entries": entries, "max_entries": info.max_entries}
    return fill


def clear(maps: Maps, name: str) -> int:
    """Delete every entry of a hash or LPM map (tests start each scenario clean)."""
    fd = maps[name]
    size = bpfsys.map_info(fd).key_size
    return sum(bpfsys.map_delete(fd, raw) for raw in list(bpfsys.map_keys(fd, size)))
