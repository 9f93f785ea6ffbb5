"""eBPF backend, kernel half: the program compiled with bcc, and its maps read and written.

Compiling happens once per load of the backend; everything after works on raw
map fds (`maps`: name -> fd), so a later process that opened the maps from
their pins can update the policy and read counters without bcc or a
recompile. Only this module (and its siblings) imports bcc.

Policy updates go by generation, in two slots (bpf/maps.h explains why):
`first_generation` fills fresh maps, `next_generation` writes the slot the
live generation does not use and flips to it; `SlotFiles` remembers what
each slot holds, so that an update writes only what differs from it.

Used by `backend`; built on `bpfsys`, `abi` and `capacity`; judges connections with `ir.evaluate`.
"""

from __future__ import annotations

import array
import ctypes
import marshal
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netaddr
from bcc import BPF

from ...errors import BackendError, ProgramRejected
from ...ir import evaluate
from ...ir.evaluate import Classifier
from ...ir.tables import IR, PROTO_TCP, PROTO_UDP, rule_identities
from .. import counts
from ..state import write_atomically
from . import abi, bpfsys, capacity
from .entries import (
    POLICY_MAPS,
    Change,
    Plan,
    Tables,
    diff,
    entry_counts,
    from_plain,
    key_packer,
    tables_of,
    then,
    to_plain,
    value_packer,
)

BPF_DIR = capacity.BPF_DIR
SOURCE = BPF_DIR / "isoebpf.c"
XDP_NAME = "xdp_isoebpf"
TC_NAME = "tc_isoebpf"
# The program tc_isoebpf tail-calls beside Docker, and its index in `forwarders` (FORWARDER, bpf/maps.h).
FORWARDER_NAME = "tc_forward"
FORWARDER_INDEX = 0
MAP_NAMES = abi.MAP_NAMES

# Map sizes a user may raise at compile time, from the environment of the
# command that compiles (`ISOEBPF_MAX_CONNECTIONS=1000000 isoebpf load ...`).
SIZE_MACROS = ("ISOEBPF_MAX_RULES", *sorted(set(abi.MAP_SIZE_MACROS.values()) - {"ISOEBPF_MAX_RULES"}))

_LOCAL_INCLUDE = re.compile(r'#include "([^"]+)"\s*$')

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


# The maps a program compiled to replace a running one shares with it, by their pins.
SHARED_STATE = ("conntrack", "fragments")


# bcc compiles with clang and LLVM inside the process, which are not safe on two
# threads at once: a failed load's abandoned compile may still run when the next starts.
_one_compile_at_a_time = threading.Lock()


def bcc_compile(text: bytes, cflags: Sequence[str]) -> Any:
    """bcc's BPF(text=...), one at a time in this process; every compile goes through here."""
    with _one_compile_at_a_time:
        return BPF(text=text, cflags=list(cflags))


def compile_program(sizes: Mapping[str, int] | None = None,
                    shared_state: Path | None = None) -> CompiledProgram:
    """Compile and load both programs and create the maps (takes a few seconds).
    `shared_state`: the pin directory of a running program whose connection state
    (SHARED_STATE) the new one is to share instead of creating its own."""
    pins = [f'-DISOEBPF_{name.upper()}_PIN="{shared_state / name}"' for name in SHARED_STATE] \
        if shared_state is not None else []
    cflags = ["-Wall", "-Werror", f"-I{BPF_DIR}", *size_flags(sizes), *pins]
    started = time.monotonic()
    try:
        bpf = bcc_compile(source().encode(), cflags)
    except Exception as err:  # bcc raises a bare Exception; clang's messages went to stderr
        raise BackendError(f"bcc could not compile {SOURCE} ({err}); the compiler's messages "
                           "are above. Are kernel headers installed (scripts/setup.sh)?") from err
    try:
        xdp = bpf.load_func(XDP_NAME.encode(), BPF.XDP)
        tc = bpf.load_func(TC_NAME.encode(), BPF.SCHED_CLS)
        forwarder = bpf.load_func(FORWARDER_NAME.encode(), BPF.SCHED_CLS)
    except Exception as err:  # the verifier's log went to stderr
        bpf.cleanup()
        raise ProgramRejected(f"the kernel refused the program ({err}); the verifier's log is "
                              "above") from err
    elapsed = time.monotonic() - started
    map_fds = {name: int(bpf.get_table(name.encode()).map_fd) for name in MAP_NAMES}
    bpfsys.map_update(map_fds["forwarders"], ctypes.c_uint32(FORWARDER_INDEX), ctypes.c_uint32(forwarder.fd))
    return CompiledProgram(bpf, {"xdp": int(xdp.fd), "tc": int(tc.fd)}, map_fds, elapsed)


def probe_compile() -> None:
    """Can bcc compile and the kernel load an XDP program here? Raise BackendError if not."""
    probe = b"int isoebpf_probe(struct xdp_md *ctx) { return XDP_PASS; }"
    try:
        bpf = bcc_compile(probe, ["-Wall", "-Werror"])
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
    """Rule ids the counters hold, as the loaded program was compiled."""
    return bpfsys.map_info(maps["counters"]).max_entries


def _seconds_to_ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def params_of(ir: IR, accept_mark: int = 0) -> abi.Params:
    """`accept_mark`: the bits TC sets on packets the policy allows between two overlays."""
    return abi.Params(
        tcp_timeout_ns=_seconds_to_ns(ir.timeouts["tcp"]),
        tcp_closing_timeout_ns=_seconds_to_ns(ir.timeouts["tcp_closing"]),
        udp_timeout_ns=_seconds_to_ns(ir.timeouts["udp"]),
        icmp_timeout_ns=_seconds_to_ns(ir.timeouts["icmp"]),
        # Read at call time, so tests can shorten it.
        fragment_timeout_ns=_seconds_to_ns(evaluate.FRAGMENT_TIMEOUT),
        default_action=abi.ACTIONS[ir.default_action],
        accept_mark=accept_mark,
        audit=int(ir.audit),
        has_exceptions=int(bool(ir.exceptions)),
    )


def slot_of(gen: int) -> int:
    """The half of the policy tables that generation `gen` lives in."""
    return gen & 1


def _slot_entries(maps: Maps, slot: int) -> dict[str, list[bytes]]:
    """The keys each policy map holds in `slot`, read from the kernel (one call per key)."""
    found: dict[str, list[bytes]] = {}
    for name, (key_type, _) in POLICY_MAPS.items():
        found[name] = [raw for raw in bpfsys.map_keys(maps[name], ctypes.sizeof(key_type))
                       if key_type.from_buffer_copy(raw).slot == slot]
    return found


def write_generation(maps: Maps, ir: IR, gen: int, held: Tables | None = None,
                     beside: Mapping[str, int] | None = None,
                     fresh: Iterable[int] | None = None) -> Tables:
    """Write `ir` as generation `gen` into its slot, beside the active generation
    in the other; packets do not see it yet. Returns the slot's tables.

    `held` is what the slot holds now: only the entries that differ are written
    and deleted. None: unknown, so every entry of the slot goes first (a slot a
    killed update left half-written). `beside`: how many entries each map holds
    in the other slot (None: counted in the kernel). A policy that does not fit
    is refused before anything is written. `fresh`: the rule ids whose counters
    start at 0 (None: all of `ir`'s)."""
    tables = tables_of(ir)
    _check_fits(maps, ir, gen, needed_entries(ir, tables), beside)
    _write(maps, ir, gen, diff(held, tables), [r.id for r in ir.rules] if fresh is None else fresh)
    return tables


def _check_fits(maps: Maps, ir: IR, gen: int, needed: Mapping[str, int],
                beside: Mapping[str, int] | None) -> None:
    """`needed`: entries per map (`counters`: one past the highest rule id); `beside`:
    what the live generation holds in the other slot (None: counted in the kernel)."""
    if not 1 <= gen < 2**32:
        raise BackendError(f"generation {gen} is out of range (1 to 2^32-1): unload and load again")
    if beside is None:
        beside = {name: len(keys) for name, keys in _slot_entries(maps, 1 - slot_of(gen)).items()}
    capacity.check(ir, _room(maps), beside, needed=needed)


def needed_entries(ir: IR, tables: Tables) -> dict[str, int]:
    """Entries per map `ir` takes as one generation, given its `tables` (`counters`: one
    past its highest rule id)."""
    return {**entry_counts(tables), "counters": capacity.rule_slots(ir)}


def _write(maps: Maps, ir: IR, gen: int, plan: Plan, fresh: Iterable[int]) -> None:
    """Write `ir`'s parameters and `plan` into generation `gen`'s slot, and zero the
    counters of the `fresh` rule ids (those that count a rule they did not before).
    The accept mark is the node's, not the policy's: it stays what it is."""
    slot = slot_of(gen)
    bpfsys.map_update(maps["params"], ctypes.c_uint32(slot), params_of(ir, accept_mark(maps)))
    zero = bytes(ctypes.sizeof(abi.Counter) * bpfsys.possible_cpus())
    indexes = array.array("I", fresh)
    bpfsys.map_update_packed(maps["counters"], indexes.tobytes(), zero * len(indexes), len(indexes))
    write_plan(maps, slot, plan)


def write_plan(maps: Maps, slot: int, plan: Plan) -> None:
    """Carry out `plan` in `slot`: its deletions, then its writes, map by map."""
    if plan.clear:
        for name, keys in _slot_entries(maps, slot).items():
            bpfsys.map_delete_many(maps[name], keys)
    for name, change in plan.changes.items():
        pack_key, pack_value = key_packer(name, slot), value_packer(name)
        bpfsys.map_delete_many(maps[name], [pack_key(key) for key in change.delete])
        bpfsys.map_update_packed(maps[name], b"".join(map(pack_key, change.write)),
                                 b"".join(pack_value(*value) for value in change.write.values()),
                                 len(change.write))


def _room(maps: Maps) -> dict[str, int]:
    return {"counters": max_rules(maps),
            **{name: bpfsys.map_info(maps[name]).max_entries for name in POLICY_MAPS}}


@dataclass(frozen=True)
class SlotFiles:
    """What each slot of one program's policy maps holds, remembered in a file
    per slot (under the scope's /run directory) so that an update writes only
    what differs.

    A file exists only while its slot holds exactly what it says: it goes
    before the slot is written and comes back after, so a command killed in
    between leaves none, and the next update rewrites that slot whole. marshal,
    not JSON: it reads 100,000 entries in tens of milliseconds; the file is
    root's alone, and one it cannot read means "unknown" too. A short header
    (whose maps, how many entries) comes first, so the slot an update does not
    write into costs no more than that."""

    directory: Path

    def path(self, slot: int) -> Path:
        return self.directory / f"slot-{slot}"

    def _load(self, maps: Maps, slot: int, whole: bool) -> tuple[dict[str, int], Tables] | None:
        try:
            with self.path(slot).open("rb") as saved:
                size = int.from_bytes(saved.read(4), "little")
                identity, counts = marshal.loads(saved.read(size))
                # The maps of another load (a killed unload left the file) hold nothing of it.
                if identity != _maps_identity(maps):
                    return None
                # One read, then marshal.loads: marshal.load reads a file in small pieces.
                return counts, (marshal.loads(saved.read()) if whole else {})
        except (OSError, ValueError, EOFError, TypeError):
            return None

    def read(self, maps: Maps, slot: int) -> Tables | None:
        """What `slot` holds, or None: unknown."""
        loaded = self._load(maps, slot, whole=True)
        return loaded[1] if loaded else None

    def read_counts(self, maps: Maps, slot: int) -> dict[str, int] | None:
        """How many entries each map holds in `slot`, or None: unknown."""
        loaded = self._load(maps, slot, whole=False)
        return loaded[0] if loaded else None

    def forget(self, slot: int) -> None:
        self.path(slot).unlink(missing_ok=True)

    def remember(self, maps: Maps, slot: int, tables: Tables) -> None:
        header = marshal.dumps((_maps_identity(maps), entry_counts(tables)))
        write_atomically(self.path(slot),
                         len(header).to_bytes(4, "little") + header + marshal.dumps(tables))

    # A slot's way to the live generation, where a change came as a difference (the
    # agent's): `pending-N` exists only while slot N holds the live generation's
    # entries but for this plan, and says how many entries the live one holds. An
    # update with a difference then writes that plan and its own, and nothing of
    # the size of the policy. Same lifecycle as the slot files.

    def pending_path(self, slot: int) -> Path:
        return self.directory / f"pending-{slot}"

    def read_pending(self, maps: Maps, slot: int) -> tuple[dict[str, int], Plan] | None:
        """(the live generation's entries per map, the plan that brings `slot` to it), or None."""
        try:
            identity, live, plain = marshal.loads(self.pending_path(slot).read_bytes())
        except (OSError, ValueError, EOFError, TypeError):
            return None
        if identity != _maps_identity(maps):
            return None
        return live, from_plain(plain)

    def remember_pending(self, maps: Maps, slot: int, live: Mapping[str, int], plan: Plan) -> None:
        write_atomically(self.pending_path(slot),
                         marshal.dumps((_maps_identity(maps), dict(live), to_plain(plan))))

    def forget_pending(self, slot: int) -> None:
        self.pending_path(slot).unlink(missing_ok=True)


def _maps_identity(maps: Maps) -> list[int]:
    return [bpfsys.map_info(maps[name]).id for name in POLICY_MAPS]


def first_generation(maps: Maps, ir: IR, slots: SlotFiles, gen: int = 1,
                     sweep: bool = True) -> tuple[int, list[str]]:
    """Write `ir` into freshly created maps as generation `gen` and make it active;
    returns `gen` and why an update to a policy of its size would not fit
    (room_for_next). `sweep=False`: leave the connection table to the caller
    (maps that replace a running program's, which shares it, go live later).

    The other slot gets the same policy where both fit, so that the first update
    is a difference too."""
    for slot in (0, 1):
        slots.forget(slot)
        slots.forget_pending(slot)
    tables = write_generation(maps, ir, gen, held={}, beside={})
    activate(maps, ir, gen, sweep)
    slots.remember(maps, slot_of(gen), tables)
    copy: Tables = {}
    other = 1 - slot_of(gen)
    no_room = room_for_next(maps, ir, needed_entries(ir, tables))
    if not no_room:
        write_plan(maps, other, diff({}, tables))
        copy = tables
    slots.remember(maps, other, copy)
    live = entry_counts(tables)
    slots.remember_pending(maps, slot_of(gen), live, Plan({}))
    slots.remember_pending(maps, other, live, Plan({}) if not no_room else diff({}, tables))
    return gen, no_room


def room_for_next(maps: Maps, ir: IR, needed: Mapping[str, int] | None = None) -> list[str]:
    """Why an update to a policy the size of `ir` would not fit beside it (an update
    writes the new policy while the one in force stays), or [] when it would.
    `needed`: its entries per map, where the caller has them (see _check_fits)."""
    wanted = needed if needed is not None else needed_entries(ir, tables_of(ir))
    # Rules keep their ids across updates: counters are not needed twice.
    return capacity.problems(ir, _room(maps), {**wanted, "counters": 0}, wanted)


def prepare_next(maps: Maps, ir: IR, slots: SlotFiles) -> Tables:
    """`ir`'s tables, once sure they fit beside the live generation's entries; a
    policy that does not is refused before the update writes or attaches anything."""
    tables = tables_of(ir)
    new = active_generation(maps) + 1
    _check_fits(maps, ir, new, needed_entries(ir, tables), slots.read_counts(maps, 1 - slot_of(new)))
    return tables


def next_generation(maps: Maps, ir: IR, slots: SlotFiles, tables: Tables | None = None,
                    fresh: Iterable[int] | None = None, change: Change | None = None) -> int:
    """Make `ir` the active policy as the generation after the live one; returns it.
    `tables`: prepare_next's (None: checked here). `fresh`: the rule ids whose
    counters start at 0 (None: all of `ir`'s). `change`: what differs from the live
    generation, where the caller knows (a compiled difference, see ir.compiler.Delta).

    Writes into the slot the live generation does not use only what differs
    from what that slot holds (the policy before the live one, usually), and
    leaves the live generation's entries in place for the next update. With a
    `change` and that slot's way to the live generation on file, no step costs
    more than the change: neither the tables nor the files of the whole policy
    are made or read."""
    new = active_generation(maps) + 1
    slot = slot_of(new)
    fresh = [r.id for r in ir.rules] if fresh is None else list(fresh)
    pending = slots.read_pending(maps, slot) if change is not None else None
    if change is not None and pending is not None:
        live, catch_up = pending
        plan = then(catch_up, change.plan)
        _check_fits(maps, ir, new, change.sizes, live)
        slots.forget(slot)
        slots.forget_pending(slot)
        _write(maps, ir, new, plan, fresh)
        activate(maps, ir, new, sweep=plan.takes_away)
        sizes = {name: n for name, n in change.sizes.items() if name != "counters"}
        slots.remember_pending(maps, slot, sizes, Plan({}))
        slots.remember_pending(maps, 1 - slot, sizes, change.plan)
        return new
    if tables is None:
        tables = prepare_next(maps, ir, slots)
    plan = diff(slots.read(maps, slot), tables)
    slots.forget(slot)
    slots.forget_pending(slot)
    _write(maps, ir, new, plan, fresh)
    activate(maps, ir, new)
    slots.remember(maps, slot, tables)
    live = entry_counts(tables)
    slots.remember_pending(maps, slot, live, Plan({}))
    if change is not None:
        slots.remember_pending(maps, 1 - slot, live, change.plan)
    else:
        slots.forget_pending(1 - slot)
    return new


def change_fits(maps: Maps, ir: IR, slots: SlotFiles, change: Change) -> bool:
    """Whether next_generation can write `change` as it is (the standby slot's way to the
    live generation is on file: False when not); raise CapacityError when it cannot fit."""
    pending = slots.read_pending(maps, slot_of(active_generation(maps) + 1))
    if pending is None:
        return False
    _check_fits(maps, ir, active_generation(maps) + 1, change.sizes, pending[0])
    return True


def activate(maps: Maps, ir: IR, gen: int, sweep: bool = True) -> None:
    """Make `gen` the policy every packet from now on is judged by, then cut the
    connections it forbids.

    The flip is one word, so each packet sees wholly one policy. The datapath
    re-judges a connection lazily when its next packet arrives; the sweep here
    cuts the others now, so that a connection this policy forbids stays cut
    even if the next policy would allow it again (as evaluate.Conntrack.revalidate).
    `sweep=False`: the change only adds entries, so it forbids nothing new; nor
    does audit mode.
    """
    set_active(maps, gen)
    if not sweep or ir.audit:
        return
    classifier: Classifier | None = None  # built only when there is a connection to judge
    allowed: dict[bytes, bool] = {}  # by what the verdict depends on: never the source port
    forbidden: list[bytes] = []
    # Pairs where one end's connection is cut and the other's kept: written back
    # without the first (a refresh of the other the datapath makes meanwhile is lost:
    # at worst that connection expires a little early, and only in this rare case).
    narrowed: list[tuple[bytes, abi.FlowEntry]] = []
    for raw, entry in _entries(maps):
        kept = cut = False
        for by, opener_first, _ in _opened(raw, entry):
            verdict_key = _verdict_key(opener_first)
            if verdict_key not in allowed:
                classifier = classifier or Classifier(ir)
                first = evaluate.first_packet(flow_of(abi.FlowKey.from_buffer_copy(opener_first)))
                allowed[verdict_key] = classifier.judge(first).action == "allow"
            if allowed[verdict_key]:
                kept = True
            else:
                entry.opened[by].flags = 0
                cut = True
        if not kept:  # also a pair whose connections the datapath closed itself
            forbidden.append(raw)
        elif cut:
            narrowed.append((raw, entry))
    bpfsys.map_delete_many(maps["conntrack"], forbidden)
    for raw, entry in narrowed:
        bpfsys.map_update(maps["conntrack"], raw, entry)


def set_active(maps: Maps, gen: int) -> None:
    """The one word every packet reads first: which generation judges it."""
    bpfsys.map_update(maps["config"], ctypes.c_uint32(0), ctypes.c_uint32(gen))


_SPORT = slice(abi.FlowKey.sport.offset, abi.FlowKey.sport.offset + abi.FlowKey.sport.size)
_DPORT = slice(abi.FlowKey.dport.offset, abi.FlowKey.dport.offset + abi.FlowKey.dport.size)
_PORTS = slice(abi.FlowKey.sport.offset, abi.FlowKey.dport.offset + abi.FlowKey.dport.size)
_SRC = slice(abi.FlowKey.src.offset, abi.FlowKey.src.offset + abi.FlowKey.src.size)
_DST = slice(abi.FlowKey.dst.offset, abi.FlowKey.dst.offset + abi.FlowKey.dst.size)
_PROTO = abi.FlowKey.proto.offset


def _reversed(raw: bytes) -> bytes:
    """A conntrack key with its ends swapped: addresses and ports."""
    key = bytearray(raw)
    key[_SPORT], key[_DPORT] = raw[_DPORT], raw[_SPORT]
    key[_SRC], key[_DST] = raw[_DST], raw[_SRC]
    return bytes(key)


def _entries(maps: Maps) -> Iterator[tuple[bytes, abi.FlowEntry]]:
    """Every conntrack entry: (its key, the connections its ends opened)."""
    fd = maps["conntrack"]
    for raw in bpfsys.map_keys(fd, ctypes.sizeof(abi.FlowKey)):
        value = bpfsys.map_lookup(fd, raw, ctypes.sizeof(abi.FlowEntry))
        if value is not None:
            yield raw, abi.FlowEntry.from_buffer_copy(value)


def _opened(raw: bytes, entry: abi.FlowEntry) -> Iterator[tuple[int, bytes, abi.FlowState]]:
    """The connections an entry holds (bpf/abi.h struct flow_entry): for each end that
    opened one, (that end, the key with it as source, the connection's state)."""
    for by in (abi.FLOW_BY_SRC, abi.FLOW_BY_DST):
        state = entry.opened[by]
        if state.flags & abi.FLOW_OPEN:
            yield by, raw if by == abi.FLOW_BY_SRC else _reversed(raw), state


def _verdict_key(raw: bytes) -> bytes:
    """A conntrack key without what a first packet's verdict never depends on: the
    source port, and both ports (the echo id) outside TCP and UDP."""
    cut = _SPORT if raw[_PROTO] in (PROTO_TCP, PROTO_UDP) else _PORTS
    return raw[:cut.start] + bytes(cut.stop - cut.start) + raw[cut.stop:]


def active_generation(maps: Maps) -> int:
    raw = bpfsys.map_lookup(maps["config"], ctypes.c_uint32(0), ctypes.sizeof(ctypes.c_uint32))
    return ctypes.c_uint32.from_buffer_copy(raw).value if raw else 0


def _params(maps: Maps, slot: int) -> abi.Params:
    raw = bpfsys.map_lookup(maps["params"], ctypes.c_uint32(slot), ctypes.sizeof(abi.Params))
    return abi.Params.from_buffer_copy(raw) if raw else abi.Params()


def accept_mark(maps: Maps) -> int:
    """The mark bits the TC program sets on packets the policy allows between overlays."""
    return int(_params(maps, slot_of(active_generation(maps))).accept_mark)


def set_accept_mark(maps: Maps, mark: int) -> None:
    """Set the accept mark in both generations' parameters, in place: the rest of each
    is written again as it was, so a packet that reads one meanwhile sees the same."""
    for slot in (0, 1):
        params = _params(maps, slot)
        params.accept_mark = mark
        bpfsys.map_update(maps["params"], ctypes.c_uint32(slot), params)


def set_event_rate(maps: Maps, per_second: int) -> None:
    """Let each CPU send at most `per_second` verdict events a second (0: none)."""
    bpfsys.map_update(maps["event_rate"], ctypes.c_uint32(0), ctypes.c_uint32(per_second))


def undelivered_events(maps: Maps) -> tuple[int, int]:
    """(suppressed, lost), summed over CPUs: verdicts the rate limit kept from being
    sent while tracing, and events that found the ring buffer full."""
    buckets = _percpu(maps, "event_tokens", 0, abi.TokenBucket)
    return sum(b.suppressed for b in buckets), sum(b.lost for b in buckets)


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


def read_counter(maps: Maps, rule: int) -> tuple[int, int]:
    """(packets, bytes) of one rule, summed over CPUs."""
    return read_counters(maps, [rule])[rule]


def read_counters(maps: Maps, rules: Iterable[int]) -> dict[int, tuple[int, int]]:
    """Rule id -> (packets, bytes) for these rules, summed over CPUs: one batch read
    of the counters up to the highest id asked for."""
    wanted = list(rules)
    slots = max_rules(maps)
    cpus = bpfsys.possible_cpus()
    words = ctypes.sizeof(abi.Counter) // 8  # u64 fields: no padding between CPUs' values
    read = max((r for r in wanted if 0 <= r < slots), default=-1) + 1
    raw = bpfsys.map_lookup_range(maps["counters"], 0, read, words * 8 * cpus)
    values = array.array("Q", raw)  # per rule, per CPU: the fields of struct counter
    stride = words * cpus

    def summed(field: int) -> Iterator[int]:
        """One field of every rule, summed over CPUs (zip and sum loop in C)."""
        return map(sum, zip(*(values[cpu * words + field // 8::stride] for cpu in range(cpus)),
                            strict=True))

    per_rule = list(zip(summed(abi.Counter.packets.offset), summed(abi.Counter.bytes.offset),
                        strict=True))
    return {rule: per_rule[rule] if 0 <= rule < read else (0, 0) for rule in wanted}


def counters_across(maps: Maps, rules: Sequence[Sequence[Any]], carried: Mapping[str, Sequence[int]],
                    ir: IR) -> tuple[counts.Carried, list[int]]:
    """How the counters go from the policy in force (its `rules`, [id, name, text] as
    the state record lists them, which `carried` what) to `ir`: what each rule of
    `ir` carries, and the ids whose counters must start at 0.

    A rule `ir` numbers as the policy in force did (an update keeps the numbering,
    see ir.compiler) counts on in its counter: nothing to carry or zero. A rule
    under an id new to it starts at 0; if the policy in force had it under another
    id (its numbering was not at hand), what it counted there is carried. Read
    before the flip: a packet counted meanwhile under the old id is not carried."""
    old = [(str(name), str(text)) for _, name, text in rules]
    old_ids = dict(zip(rule_identities(old).values(), (int(r[0]) for r in rules), strict=True))
    new_ids = dict(zip(rule_identities((r.name, r.text) for r in ir.rules).values(),
                       (r.id for r in ir.rules), strict=True))
    fresh = [rule_id for identity, rule_id in new_ids.items() if old_ids.get(identity) != rule_id]
    moved = {old_ids[identity]: name for identity, name in zip(new_ids, (r.name for r in ir.rules),
                                                                strict=True)
             if identity in old_ids and old_ids[identity] != new_ids[identity]}
    names = {int(rule_id): str(name) for rule_id, name, _ in rules}
    live = {names[i]: count for i, count in read_counters(maps, moved).items()
            if count != (0, 0)}  # a rule that counted nothing carries nothing
    return counts.carry(counts.totals(live, carried), old, [(r.name, r.text) for r in ir.rules]), fresh


def connections(maps: Maps) -> Iterator[tuple[abi.FlowKey, abi.FlowState]]:
    """Every tracked connection, its opener as the key's source; expired ones included
    (the datapath ignores those)."""
    for raw, entry in _entries(maps):
        for _, opener_first, state in _opened(raw, entry):
            yield abi.FlowKey.from_buffer_copy(opener_first), state


def count_connections(maps: Maps) -> int:
    """Pairs of endpoints tracked (one entry each, whichever end opened): status reads
    this for tables of 100k entries, so it counts keys and reads no value."""
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
